// Split-K dense FP8 GEMM for small M (sm_90a): the dense kernel's math over slices of K, then a
// reduction.
//
//   W[s][m, n] (fp32) = sum over K blocks kb of slice s of  sa[m, kb] * sb[n / 128, kb] * (A . B)
//   D[m, n]    (bf16) = W[0][m, n] + W[1][m, n] + ... + W[kSplitK - 1][m, n]   (in that order)
//
// Why: at M <= 128 a dense GEMM has few output tiles (M = 64, N = 2112: 17 tiles of 64 x 128),
// so filling the SMs takes narrow tiles (64 x 16), and then every CTA re-reads all of A from L2
// for a sliver of B: ~5x the bytes of B. Splitting K keeps 64 x 128 tiles (A is a third of each
// stage's bytes) on as many CTAs as the SMs hold.
//
// The GEMM is fp8_gemm.cuh's dense path with the scheduler's split (scheduler.cuh) and the fp32
// epilogue storing each slice into the workspace W [kSplitK, M, N] (epilogue.cuh, kAdd = false):
// every element of W is written by exactly one CTA, so no zeroing and no atomics, and the sum
// order is fixed (deterministic results). The reduction kernel reads W once (L2-resident at these
// sizes) and writes D.
//
// Constraints: the dense kernel's, plus K / 128 divisible by kSplitK and kBlockN % 32 == 0 (the
// fp32 epilogue's 32-column chunks; TMA clips the last one at N).
#pragma once

#include <cuda_bf16.h>

#include "epilogue.cuh"
#include "fp8_gemm.cuh"
#include "gemm_core.cuh"
#include "pdl.cuh"
#include "ptx.cuh"
#include "scheduler.cuh"

namespace moe_fp8 {

template <int kN, int kK, int kBlockM_, int kBlockN_, int kStages_, int kGroupN,
          int kDoubleBufferOpt, int kSplitK>
struct SplitKPolicy {
  static constexpr int kBlockM = kBlockM_, kBlockN = kBlockN_, kStages = kStages_;
  static constexpr int kClusterM = 1, kClusterN = 1, kARowChunk = 0;
  static constexpr int kTileKBlocks = kK / 128 / kSplitK;
  static constexpr bool kColumnScales = false;
  static constexpr bool kEmptyTiles = false;
  static constexpr bool kSkipIdleWarpgroup = false;
  static constexpr int kUpRowOffset = 0;  // no paired halves (fused_swiglu.cuh)
  static constexpr bool kEarlyB = false;  // B before the PDL wait (gemm_core.cuh)
  static constexpr int kDoubleBuffer = kDoubleBufferOpt;
  using Scheduler = TileScheduler<kLayoutDense, kN, kK, kBlockM, kBlockN, kGroupN, 1, 1, kSplitK>;
  using Epilogue = EpilogueAddF32<kN, kBlockN, /*kAdd=*/false>;
};

// tma_d: the workspace W [kSplitK, M, N] fp32 as a 3-D tensor, 32 x 64 x 1 boxes, 128-byte swizzle.
template <int kN, int kK, int kBlockM, int kBlockN, int kStages, int kGroupN, int kDoubleBufferOpt,
          int kSplitK>
__global__ void __launch_bounds__((kBlockM / 64 + 1) * 128, 1)
    fp8_gemm_split_k_kernel(const __grid_constant__ ptx::TmaDesc tma_a,
                            const __grid_constant__ ptx::TmaDesc tma_b,
                            const __grid_constant__ ptx::TmaDesc tma_sa,
                            const __grid_constant__ ptx::TmaDesc tma_d, int m, const float* g_sb) {
  static_assert(kK % (128 * kSplitK) == 0 && kN % 16 == 0 && kSplitK >= 2,
                "K / 128 divisible by the splits; N % 16 == 0");
  static_assert(kBlockN % 32 == 0 && kBlockN <= 256 && fits_two_scale_blocks(kBlockN),
                "kBlockN: multiple of 32 (fp32 epilogue chunks), at most two scale blocks");
  using Policy = SplitKPolicy<kN, kK, kBlockM, kBlockN, kStages, kGroupN, kDoubleBufferOpt, kSplitK>;
  const GemmParams params{m, 1, nullptr, g_sb, nullptr};
  gemm_body<Policy>(&tma_a, &tma_b, &tma_sa, nullptr, &tma_d, params);
}

constexpr int kSplitKReduceThreads = 256;

// D[i] = bf16(W[0][i] + ... + W[kSplitK - 1][i]) for i < count (= M * N, a multiple of 4): four
// elements per thread (16-byte loads, an 8-byte store), grid-stride.
template <int kSplitK>
__global__ void __launch_bounds__(kSplitKReduceThreads) split_k_reduce_kernel(
    const float* __restrict__ g_w, __nv_bfloat16* __restrict__ g_d, long long count) {
  pdl::begin();  // before any global access (pdl.cuh)
  const long long quads = count / 4;
  for (long long q = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; q < quads;
       q += static_cast<long long>(gridDim.x) * blockDim.x) {
    float4 sum = __ldg(reinterpret_cast<const float4*>(g_w) + q);
#pragma unroll
    for (int s = 1; s < kSplitK; ++s) {
      const float4 w = __ldg(reinterpret_cast<const float4*>(g_w + s * count) + q);
      sum.x += w.x, sum.y += w.y, sum.z += w.z, sum.w += w.w;
    }
    __nv_bfloat162 lo = __floats2bfloat162_rn(sum.x, sum.y);
    __nv_bfloat162 hi = __floats2bfloat162_rn(sum.z, sum.w);
    uint2 packed;
    packed.x = *reinterpret_cast<unsigned*>(&lo);
    packed.y = *reinterpret_cast<unsigned*>(&hi);
    *reinterpret_cast<uint2*>(g_d + 4 * q) = packed;
  }
}

}  // namespace moe_fp8
