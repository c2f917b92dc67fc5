// k-grouped FP8 GEMM for MoE weight gradients (sm_90a), on the shared mainloop (gemm_core.cuh).
//
//   D[e][m, n] (fp32) += sum over token blocks tb of expert e:
//                        sa[m, tb] * sb[n, tb] * (A[m, tb] . B[n, tb])
//   A [M, T] e4m3, token-contiguous (dY^T); sa [M, T/128] fp32 MN-major (1 x 128 along tokens)
//   B [N, T] e4m3, token-contiguous (X^T);  sb [N, T/128] fp32 MN-major (1 x 128 along tokens)
//   offsets [E + 1] int32 on the device: expert e owns tokens [offsets[e], offsets[e+1]),
//   every boundary a multiple of 128; D [E, M, N] fp32, accumulated in place (kAccumulate), or
//   overwritten: D[e] = the sum, zeros for an expert without tokens (no zeroing pass before, no
//   read of D: half the epilogue's traffic); or (kBf16Out, overwriting) D bf16, rounded once
//   from the fp32 sum (bf16 master weights: no fp32 buffer and no conversion pass after).
//
// Policy against the NT kernels: the K extent of a tile is its expert's token range (read by the
// scheduler from offsets, no host sync); B's scale varies per output column, so each ring stage
// also carries kBlockN column scales and the promotion multiplies by sa[row] * sb[col]; the
// epilogue adds the tile into D with TMA reduce-add (experts without tokens are not touched), or
// stores it with a TMA store (their tiles run with no K block and store zeros; fp32 D's lines
// are marked to leave L2 first, so the operands stay there).
//
// Constraints: T % 128 == 0 (every segment too); N % 4 == 0 (16-byte rows of D; bf16 D: N % 8);
// kBlockN % 32 == 0.
#pragma once

#include "epilogue.cuh"
#include "gemm_core.cuh"
#include "ptx.cuh"
#include "scheduler.cuh"

namespace moe_fp8 {

// D's epilogue: fp32 (reduce-add, or a store whose lines leave L2 first), or bf16 (store)
template <int kN, int kBlockN, bool kAccumulate, bool kBf16Out>
struct WgradEpilogue {
  using Type = EpilogueAddF32<kN, kBlockN, kAccumulate, !kAccumulate>;
};
template <int kN, int kBlockN>
struct WgradEpilogue<kN, kBlockN, false, true> {
  using Type = EpilogueSliceBf16<kN, kBlockN>;
};

template <int kN, int kBlockM_, int kBlockN_, int kStages_, int kGroupN, int kDoubleBufferOpt,
          int kClusterM_, bool kAccumulate, bool kBf16Out>
struct KGroupedPolicy {
  static_assert(!(kAccumulate && kBf16Out), "bf16 D is overwritten, never accumulated");
  static constexpr int kBlockM = kBlockM_, kBlockN = kBlockN_, kStages = kStages_;
  static constexpr int kClusterM = kClusterM_, kClusterN = 1, kARowChunk = 0;
  static constexpr int kTileKBlocks = 0;
  static constexpr bool kColumnScales = true;
  static constexpr int kDoubleBuffer = kDoubleBufferOpt;
  static constexpr bool kEmptyTiles = !kAccumulate;
  static constexpr bool kSkipIdleWarpgroup = false;
  static constexpr int kUpRowOffset = 0;  // no paired halves (fused_swiglu.cuh)
  static constexpr bool kEarlyB = false;  // B before the PDL wait (gemm_core.cuh)
  using Scheduler = TileScheduler<kLayoutKGrouped, kN, 0, kBlockM, kBlockN, kGroupN, kClusterM, 1,
                                  1, kEmptyTiles>;
  using Epilogue = typename WgradEpilogue<kN, kBlockN, kAccumulate, kBf16Out>::Type;
};

template <int kN, int kBlockM, int kBlockN, int kStages, int kGroupN, int kDoubleBufferOpt = 1,
          int kClusterM = 1, bool kAccumulate = true, bool kBf16Out = false>
__global__ void __launch_bounds__((kBlockM / 64 + 1) * 128, 1)
    k_grouped_wgrad_kernel(const __grid_constant__ ptx::TmaDesc tma_a,
                           const __grid_constant__ ptx::TmaDesc tma_b,
                           const __grid_constant__ ptx::TmaDesc tma_sa,
                           const __grid_constant__ ptx::TmaDesc tma_sb,
                           const __grid_constant__ ptx::TmaDesc tma_d, int m, int num_experts,
                           const int* g_offsets) {
  static_assert(kN % 4 == 0 && kBlockN % 32 == 0 && kBlockN <= 256,
                "16-byte rows of D, 32-column chunks of the epilogue");
  static_assert(!kBf16Out || kN % 8 == 0, "16-byte rows of bf16 D");
  using Policy = KGroupedPolicy<kN, kBlockM, kBlockN, kStages, kGroupN, kDoubleBufferOpt,
                                kClusterM, kAccumulate, kBf16Out>;
  const GemmParams params{m, num_experts, g_offsets, nullptr, nullptr};
  gemm_body<Policy>(&tma_a, &tma_b, &tma_sa, &tma_sb, &tma_d, params);
}

}  // namespace moe_fp8
