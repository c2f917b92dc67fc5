// FP8 GEMM with fine-grained scales for sm_90a: dense, grouped-contiguous and grouped-masked.
//
//   D[m, n] (bf16) = sum over K blocks kb of  sa[m, kb] * sb[n / 128, kb] * (A[m, kb] . B[n, kb])
//   A [M, K] e4m3, K-major; sa [M, K/128] fp32 MN-major (one scale per row per 128 channels)
//   B [N, K] e4m3, K-major; sb [ceil(N/128), K/128] fp32 (one scale per 128 x 128 block)
//   (grouped layouts: see scheduler.cuh; B, sb gain a leading expert dimension)
//
// The mainloop, warp roles and pipeline live in gemm_core.cuh; this file only states the policy:
// K fixed at compile time, weight scales per 128 x 128 block, bf16 epilogue.
//
// Constraints: K % 128 == 0; N % 16 == 0; kBlockN a multiple of 16 such that a tile's columns
// touch at most two 128-column scale blocks; kBlockM in {64, 128}; kClusterM 2 for the dense
// and contiguous layouts (B multicast between two vertically adjacent tiles); kClusterN 2 (A
// multicast between two horizontally adjacent tiles) for any layout whose column blocks pair up
// exactly; not both.
#pragma once

#include "epilogue.cuh"
#include "gemm_core.cuh"
#include "ptx.cuh"
#include "scheduler.cuh"

namespace moe_fp8 {

// True when every tile start n0 = i * kBlockN (a multiple of 16) sees its columns within two
// 128-column scale blocks: (n0 mod 128) + kBlockN <= 256 for all i.
__host__ __device__ constexpr bool fits_two_scale_blocks(int block_n) {
  for (int i = 0; i < 128; ++i)
    if ((i * block_n) % 128 + block_n > 256) return false;
  return true;
}

template <int kN, int kK, int kBlockM_, int kBlockN_, int kStages_, int kGroupN, int kLayout,
          int kDoubleBufferOpt, int kClusterM_, int kClusterN_, int kARowChunk_, bool kEarlyB_,
          bool kDynamicTiles_ = false>
struct NtPolicy {
  static constexpr int kBlockM = kBlockM_, kBlockN = kBlockN_, kStages = kStages_;
  static constexpr int kClusterM = kClusterM_, kClusterN = kClusterN_;
  static constexpr int kARowChunk = kARowChunk_;
  static_assert(kARowChunk == 0 || kLayout == kLayoutMasked || kLayout == kLayoutDense,
                "A chunks: masked or dense layout");
  static constexpr int kTileKBlocks = kK / 128;
  static constexpr bool kColumnScales = false;
  // zero padding: all-padding tiles run with no K block and store zeros
  static constexpr bool kEmptyTiles = kLayout == kLayoutContiguousZeroPad;
  static constexpr int kDoubleBuffer = kDoubleBufferOpt;
  // A 128-row masked tile of an expert with at most 64 rows leaves its second warpgroup idle
  // (decode: tiles sized for the batch's spread, most experts below it; H100 2026-12-05, with
  // the row chunks: 32 x 64 rows gate-up / down 333 -> 324 / 181 -> 176 us, layer at 256 tokens
  // 598 -> 589 us). Only the configs that load A in row chunks (heuristics: the mean below
  // block_m) carry the branch, so full-tile instances keep their measured SASS.
  static constexpr bool kSkipIdleWarpgroup = kLayout == kLayoutMasked && kARowChunk > 0;
  static constexpr int kUpRowOffset = 0;  // no paired halves (fused_swiglu.cuh)
  static constexpr bool kEarlyB = kEarlyB_;  // B before the PDL wait (gemm_core.cuh)
  static constexpr bool kDynamicTiles = kDynamicTiles_;  // tiles claimed at run time
  // early B reads the layout before the PDL wait: only the masked counts have an L2 read
  // (scheduler.cuh kCoherentCounts); the dense layout reads none
  static_assert(!kEarlyB || (kClusterM == 1 && kClusterN == 1 &&
                             (kLayout == kLayoutMasked || kLayout == kLayoutDense)),
                "early B: masked or dense layout, no cluster");
  using Scheduler = TileScheduler<kLayout, kN, kK, kBlockM, kBlockN, kGroupN, kClusterM,
                                  kClusterN, 1, kEmptyTiles>;
  using Epilogue = moe_fp8::Epilogue<kN, kBlockN, kLayout>;
};

template <int kN, int kK, int kBlockM, int kBlockN, int kStages, int kGroupN, int kLayout,
          int kDoubleBufferOpt = 1, int kClusterM = 1, int kClusterN = 1, int kARowChunk = 0,
          bool kEarlyB = false>
__global__ void __launch_bounds__((kBlockM / 64 + 1) * 128, 1)
    fp8_gemm_kernel(const __grid_constant__ ptx::TmaDesc tma_a,
                    const __grid_constant__ ptx::TmaDesc tma_b,
                    const __grid_constant__ ptx::TmaDesc tma_sa,
                    const __grid_constant__ ptx::TmaDesc tma_d, int m, int num_experts,
                    const int* g_layout, const float* g_sb, void* g_d) {
  static_assert(kK % 128 == 0 && kN % 16 == 0, "K % 128 and N % 16 must be 0");
  static_assert(kBlockN % 16 == 0 && kBlockN <= 256 && fits_two_scale_blocks(kBlockN),
                "kBlockN: multiple of 16, <= 256, at most two scale blocks per tile");
  using Policy = NtPolicy<kN, kK, kBlockM, kBlockN, kStages, kGroupN, kLayout, kDoubleBufferOpt,
                          kClusterM, kClusterN, kARowChunk, kEarlyB>;
  const GemmParams params{m, num_experts, g_layout, g_sb, g_d};
  gemm_body<Policy>(&tma_a, &tma_b, &tma_sa, nullptr, &tma_d, params);
}

// The contiguous layouts (kLayout 1, 4 or 5) with dynamic tiles (tile_claim.cuh): the tiles of
// fp8_gemm_kernel, claimed at run time from g_tile_counter (int32 [2], zero before the launch and
// left zero after it; one counter per stream of launches).
template <int kN, int kK, int kBlockM, int kBlockN, int kStages, int kGroupN, int kLayout,
          int kDoubleBufferOpt, int kClusterM>
__global__ void __launch_bounds__((kBlockM / 64 + 1) * 128, 1)
    fp8_gemm_dynamic_kernel(const __grid_constant__ ptx::TmaDesc tma_a,
                            const __grid_constant__ ptx::TmaDesc tma_b,
                            const __grid_constant__ ptx::TmaDesc tma_sa,
                            const __grid_constant__ ptx::TmaDesc tma_d, int m, int num_experts,
                            const int* g_layout, const float* g_sb, void* g_d,
                            int* g_tile_counter) {
  static_assert(kK % 128 == 0 && kN % 16 == 0, "K % 128 and N % 16 must be 0");
  static_assert(kBlockN % 16 == 0 && kBlockN <= 256 && fits_two_scale_blocks(kBlockN),
                "kBlockN: multiple of 16, <= 256, at most two scale blocks per tile");
  using Policy = NtPolicy<kN, kK, kBlockM, kBlockN, kStages, kGroupN, kLayout, kDoubleBufferOpt,
                          kClusterM, 1, 0, false, true>;
  GemmParams params{m, num_experts, g_layout, g_sb, g_d};
  params.g_tile_counter = g_tile_counter;
  gemm_body<Policy>(&tma_a, &tma_b, &tma_sa, nullptr, &tma_d, params);
}

// Swap AB (masked layout, decode; swap_ab.cuh): tiles of kBlockM tokens (rows of A and D, at
// most; the wgmma N side, rounded up to 16 per tile) x 128 weight rows (columns of D; the wgmma M
// side, 64 per math warpgroup). A in row chunks of kARowChunk rows (0: whole tiles) below
// masked_m; rows >= masked_m of D untouched. kEarlyB as for fp8_gemm_kernel. Two math
// warpgroups and the producer: 384 threads whatever kBlockM.
template <int kN_, int kK, int kBlockM_, int kStages_, int kGroupN, int kARowChunk_, bool kEarlyB_>
struct SwapAbPolicy {
  static constexpr int kN = kN_;
  static constexpr int kBlockM = kBlockM_, kBlockN = 128, kStages = kStages_;
  static constexpr int kClusterM = 1, kClusterN = 1;
  static constexpr int kARowChunk = kARowChunk_;
  static constexpr int kTileKBlocks = kK / 128;
  static constexpr bool kColumnScales = false, kEmptyTiles = false, kSkipIdleWarpgroup = false;
  static constexpr int kDoubleBuffer = 0, kUpRowOffset = 0;
  static constexpr bool kEarlyB = kEarlyB_;
  static constexpr bool kSwapAB = true;
  using SwapAbTile = SwapAbGemmTile;
  using Scheduler = TileScheduler<kLayoutMasked, kN, kK, kBlockM, 128, kGroupN>;
  using Epilogue = SwapAbEpilogue<kBlockM>;
};

template <int kN, int kK, int kBlockM, int kStages, int kGroupN, int kARowChunk, bool kEarlyB>
__global__ void __launch_bounds__(384, 1)
    fp8_gemm_swap_ab_kernel(const __grid_constant__ ptx::TmaDesc tma_a,
                            const __grid_constant__ ptx::TmaDesc tma_b,
                            const __grid_constant__ ptx::TmaDesc tma_sa, int m, int num_experts,
                            const int* g_masked_m, const float* g_sb, void* g_d) {
  static_assert(kK % 128 == 0 && kN % 128 == 0, "K % 128 and N % 128 must be 0");
  using Policy = SwapAbPolicy<kN, kK, kBlockM, kStages, kGroupN, kARowChunk, kEarlyB>;
  const GemmParams params{m, num_experts, g_masked_m, g_sb, g_d};
  // no output descriptor (the epilogue stores through registers); tma_a stands in for it
  gemm_body<Policy>(&tma_a, &tma_b, &tma_sa, nullptr, &tma_a, params);
}

}  // namespace moe_fp8
