// Probe (benchmarks/experiments/tma_row_gather/probe.py): does a 128B-swizzled TMA load of ONE
// row (box 128 bytes x 1 row) written at shared offset r * 128 land exactly where row r of a
// whole-tile box would? If so, the swizzle is a function of the shared address, and a GEMM
// producer can gather a tile's rows from an unpermuted token matrix, one TMA per row.
#pragma once

#include "ptx.cuh"

namespace probe {

using moe_fp8::u32;
using moe_fp8::u64;

// One CTA: s[0] <- box of kRows rows of `packed` (rows 0..kRows-1, one TMA); s[1] <- row
// rows[r] of `source` into slot r (kRows TMAs, issued by the 32 lanes of warp 0). Both are
// written out raw (swizzled as in shared memory) to out[0] and out[1].
template <int kRows>
__global__ void __launch_bounds__(128) row_gather_kernel(
    const __grid_constant__ moe_fp8::ptx::TmaDesc box_desc,
    const __grid_constant__ moe_fp8::ptx::TmaDesc row_desc, const int* rows, uint4* out) {
  namespace ptx = moe_fp8::ptx;
  constexpr int kBytes = kRows * 128;
  __shared__ __align__(1024) unsigned char s[2][kBytes];
  __shared__ __align__(8) u64 bar[2];
  if (threadIdx.x == 0) {
    ptx::mbar_init(&bar[0], 1);
    ptx::mbar_init(&bar[1], 1);
    ptx::fence_barrier_init();
  }
  __syncthreads();
  if (threadIdx.x < 32) {
    if (threadIdx.x == 0) {
      ptx::mbar_arrive_expect_tx(&bar[0], kBytes);
      ptx::tma_load_2d(s[0], &box_desc, &bar[0], 0, 0);
      ptx::mbar_arrive_expect_tx(&bar[1], kBytes);
    }
    __syncwarp();
    for (int r = threadIdx.x; r < kRows; r += 32)
      ptx::tma_load_2d(s[1] + r * 128, &row_desc, &bar[1], 0, rows[r]);
  }
  ptx::mbar_wait(&bar[0], 0);
  ptx::mbar_wait(&bar[1], 0);
  for (int i = threadIdx.x; i < 2 * kBytes / 16; i += blockDim.x)
    out[i] = reinterpret_cast<const uint4*>(&s[0][0])[i];
}

}  // namespace probe
