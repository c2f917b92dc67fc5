// promote.cuh — the promotion step of the FP8 GEMM mainloop (gemm_core.cuh) for tiles whose
// columns straddle two 128-column weight-scale blocks (block_n not dividing 128: 48, 80, 96, 112,
// 144, 160, 192): acc += partial * (sa * sb), with sb the scale of the column's block.
//
// Host emulation: tests/test_heuristics.py compiles this file with g++ and checks every boundary
// a tile can have against the per-column rule; device code keeps to plain C++ here.
#pragma once

namespace moe_fp8 {

// Promotion of a tile that straddles two 128-column weight-scale blocks: column groups (8
// columns each) j < kFirstGroups take the first block's factors f[0] / f[1] (rows lo / hi), the
// others the second block's f[2] / f[3]. The boundary is a template argument, so a column pays
// one FFMA and nothing else: with it at run time ptxas selected and multiplied per group (20
// ISETP + 20 FSEL + 40 FMUL beside the 80 FFMA of a 160-wide tile per K block, SASS 2026-12-05).
template <int kGroups, int kFirstGroups>
__device__ __forceinline__ void promote_two_blocks(float* acc, const float* p, const float (&f)[4]) {
#pragma unroll
  for (int j = 0; j < kGroups; ++j) {
    const float lo = j < kFirstGroups ? f[0] : f[2], hi = j < kFirstGroups ? f[1] : f[3];
    acc[4 * j + 0] += p[4 * j + 0] * lo;
    acc[4 * j + 1] += p[4 * j + 1] * lo;
    acc[4 * j + 2] += p[4 * j + 2] * hi;
    acc[4 * j + 3] += p[4 * j + 3] * hi;
  }
}

// A tile's first-block width is min(kBlockN, 128 - n0 % 128) and n0 is a multiple of kBlockN, so
// its group count is a multiple of kStep = gcd(kBlockN, 128) / 8: one branch per possible value
// (uniform per tile), each a promotion without per-column work; the last covers the rest.
template <int kGroups, int kStep, int kFirstGroups = kStep>
__device__ __forceinline__ void promote_straddling(int first_groups, float* acc, const float* p,
                                                   const float (&f)[4]) {
  constexpr int kLast = kGroups < 16 ? kGroups : 16;
  if constexpr (kFirstGroups >= kLast) {
    promote_two_blocks<kGroups, kLast>(acc, p, f);
  } else {
    if (first_groups == kFirstGroups) {
      promote_two_blocks<kGroups, kFirstGroups>(acc, p, f);
    } else {
      promote_straddling<kGroups, kStep, kFirstGroups + kStep>(first_groups, acc, p, f);
    }
  }
}

__host__ __device__ constexpr int gcd_int(int a, int b) { return b == 0 ? a : gcd_int(b, a % b); }

}  // namespace moe_fp8
