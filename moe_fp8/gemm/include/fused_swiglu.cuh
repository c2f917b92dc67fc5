// The grouped gate-up GEMM with SiLU-and-mul and the 1x128 FP8 quantisation in its epilogue:
// act[r, :] = quant(silu(h_gate) * h_up) with h = bf16(A[r] . W13[e(r)]^T), the bytes and scales
// that the gate-up GEMM followed by the SiLU-and-mul kernel write (the same bf16 rounding of h,
// the same per-value SiLU, amax, scale and e4m3 conversion), minus the kernel launch between them
// and h's round trip through memory (prefill: 2I bf16 per routed row written and read again).
// Layouts: masked (the decode step; rows r = e * M_max + m, m < masked_m[e]) or contiguous with
// m_indices (the prefill; padding rows, -1, are neither computed (whole padding tiles) nor
// written, as the GEMM leaves them).
//
// W13 [E, 2I, K] keeps its layout (gate rows [0, I), up rows [I, 2I)): a 256-wide tile t pairs
// gate block t with up block t as its two 128-column halves (TileScheduler kPairedHalves,
// gemm_core kUpRowOffset), so a math thread's accumulators of half 0 and half 1 at the same
// index are the gate and the up value of one output element. Output: act fp8 [E, M_max, I] (rows
// < masked_m only) and its scales act_s[e, m, t] at e * ds_batch + t * ds_group + m (MN-major);
// contiguous: act fp8 [M_sum, I] and act_s[r, t] at t * ds_group + r (params.m = M_sum, so the
// epilogue's expert coordinate is 0).
#pragma once

#include "fp8_gemm.cuh"
#include "quant.cuh"
#include "swap_ab_swiglu.cuh"

namespace moe_fp8 {

template <int kN, bool kPow2, int kLayout = kLayoutMasked>
struct EpilogueSwiGlu {
  static constexpr int kInter = kN / 2;
  // no staging tile: act and its scales leave from registers (heuristics.smem_bytes(swiglu=True))
  static constexpr int kBytes = 0;

  // All 128 threads of a math warpgroup: rows [64 w, 64 w + 64) of the tile. A thread holds rows
  // warp * 16 + lane / 4 (+ 8) and, per 8-column group j of each half, columns 8 j + 2 (lane % 4)
  // + {0, 1}: accumulators 4 j + {0, 1} (+ 2 for the second row), half 1 at + 64.
  __device__ __forceinline__ static void write_tile(const float (&r_acc)[128], unsigned char*,
                                                    const ptx::TmaDesc*, const Tile& tile,
                                                    const GemmParams& params, int warpgroup,
                                                    int tid, int) {
    const int warp = tid / 32, lane = tid % 32;
    const int rows = tile.rows_valid - warpgroup * 64;  // this warpgroup's rows to write
    if (rows <= 0) return;                              // warpgroup-uniform
    const int expert = tile.m_row / params.m;  // masked: m_row = e * M_max + m; contiguous: 0
    const int m0 = tile.m_row - expert * params.m + warpgroup * 64;
    const long row0 = static_cast<long>(tile.m_row) + warpgroup * 64;
    unsigned char* g_act = static_cast<unsigned char*>(params.g_d);  // fp8 bytes
    float* g_scale = params.g_ds + expert * params.ds_batch + (tile.n0 / 128) * params.ds_group;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = warp * 16 + h * 8 + lane / 4;
      // Two chunks of 16 values (8-column groups j = 8 q .. 8 q + 7): the bf16 vectors the
      // unfused SiLU kernel would have loaded, value 2 (j - 8 q) + c at column 8 j + 2 (lane%4) + c.
      float y[2][16];
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        uint4 gate[2], up[2];
        unsigned* gw = reinterpret_cast<unsigned*>(gate);
        unsigned* uw = reinterpret_cast<unsigned*>(up);
#pragma unroll
        for (int w = 0; w < 8; ++w) {
          const int a = 4 * (8 * q + w) + 2 * h;
          gw[w] = ptx::pack_bf16x2(r_acc[a], r_acc[a + 1]);  // the bf16 GEMM's store rounding
          uw[w] = ptx::pack_bf16x2(r_acc[64 + a], r_acc[64 + a + 1]);
        }
        quant::silu_mul16_special_values(gate, up, y[q]);
      }
      float amax = 0.0f;
#pragma unroll
      for (int q = 0; q < 2; ++q)
#pragma unroll
        for (int i = 0; i < 16; ++i) amax = quant::max_nan(amax, fabsf(y[q][i]));
      // the row's 128 values live in the 4 lanes of a quad (max.NaN: any order, the same result)
      amax = quant::max_nan(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, 1));
      amax = quant::max_nan(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, 2));
      const float scale = quant::scale_from_amax<kPow2>(amax);
      if (r >= rows) continue;
      // contiguous: padding rows (m_indices -1, only ever ending a segment) are not written
      if constexpr (kLayout == kLayoutContiguous)
        if (__ldg(params.g_layout + row0 + r) < 0) continue;
      // two fp8 bytes per 8-column group j: byte column 8 j + 2 (lane % 4), all offsets even
      unsigned short* dst = reinterpret_cast<unsigned short*>(
          g_act + (row0 + r) * kInter + tile.n0 + 2 * (lane % 4));
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        const uint4 packed = quant::quantize16(y[q], scale);
        const unsigned* words = reinterpret_cast<const unsigned*>(&packed);
#pragma unroll
        for (int w = 0; w < 8; ++w) {
          const unsigned word = words[w / 2];
          dst[4 * (8 * q + w)] = static_cast<unsigned short>(w % 2 ? word >> 16 : word & 0xFFFFu);
        }
      }
      if (lane % 4 == 0) g_scale[m0 + r] = scale;
    }
  }
};

template <bool kCond, class A, class B>
struct SelectType {
  using type = A;
};
template <class A, class B>
struct SelectType<false, A, B> {
  using type = B;
};

template <int kN_, int kK, int kBlockM_, int kStages_, int kGroupN, int kARowChunk_, bool kPow2,
          int kLayout, int kClusterM_, bool kSwap = false, bool kDynamic = false>
struct SwiGluPolicy {
  static constexpr int kN = kN_;  // W13's rows per expert, 2I
  static_assert(kLayout == kLayoutMasked || (kLayout == kLayoutContiguous && kARowChunk_ == 0 &&
                                             kBlockM_ == 128),
                "masked, or contiguous with m_indices (128-row tiles, whole tiles of A)");
  static_assert(kClusterM_ == 1 || (kClusterM_ == 2 && kLayout == kLayoutContiguous),
                "B multicast (a gate and an up box per pair of row blocks): contiguous only");
  static_assert(!kSwap || (kLayout == kLayoutMasked && kClusterM_ == 1), "swap AB: masked layout");
  static constexpr int kBlockM = kBlockM_, kBlockN = 256, kStages = kStages_;
  static constexpr int kClusterM = kClusterM_, kClusterN = 1;
  static constexpr int kARowChunk = kARowChunk_;
  static constexpr int kTileKBlocks = kK / 128;
  static constexpr bool kColumnScales = false;
  static constexpr bool kEmptyTiles = false;
  static constexpr int kDoubleBuffer = 1;  // 256-wide tiles run single-buffered (gemm_core.cuh)
  static constexpr bool kSkipIdleWarpgroup = kARowChunk > 0;
  static constexpr int kUpRowOffset = kN / 2;
  static constexpr bool kEarlyB = false;  // B before the PDL wait (gemm_core.cuh)
  static constexpr bool kSwapAB = kSwap;
  static constexpr bool kDynamicTiles = kDynamic;  // tiles claimed at run time (contiguous)
  using SwapAbTile = SwapAbSwiGluTile<kPow2>;
  using Scheduler =
      TileScheduler<kLayout, kN, kK, kBlockM, 256, kGroupN, kClusterM, 1, 1, false, true>;
  using Epilogue = typename SelectType<kSwap, SwapAbSwiGluSmem<kBlockM>,
                                       EpilogueSwiGlu<kN, kPow2, kLayout>>::type;
};

// kN = 2I (W13's rows per expert), K = H. tma_a / tma_sa / tma_b as for the masked or contiguous
// GEMM (B in 128-row boxes); tma_d: any valid descriptor (prefetched, not used). m: M_max
// (masked) or M_sum (contiguous); g_layout: masked_m [E] or m_indices [M_sum]. kClusterM = 2
// (contiguous): two row blocks of one expert share the gate and up boxes (B multicast). kSwapAB
// (masked): the swap-AB tiles above (384 threads whatever kBlockM).
template <int kN, int kK, int kBlockM, int kStages, int kGroupN, int kARowChunk, bool kPow2,
          int kLayout = kLayoutMasked, int kClusterM = 1, bool kSwapAB = false>
__global__ void __launch_bounds__((kSwapAB ? 2 : kBlockM / 64) * 128 + 128, 1)
    fused_swiglu_gemm_kernel(const __grid_constant__ ptx::TmaDesc tma_a,
                             const __grid_constant__ ptx::TmaDesc tma_b,
                             const __grid_constant__ ptx::TmaDesc tma_sa,
                             const __grid_constant__ ptx::TmaDesc tma_d, int m, int num_experts,
                             const int* g_layout, const float* g_sb, void* g_act,
                             float* g_act_scale, long long scale_batch, long long scale_group) {
  static_assert(kK % 128 == 0 && kN % 256 == 0, "K % 128 == 0 and I % 128 == 0");
  using Policy = SwiGluPolicy<kN, kK, kBlockM, kStages, kGroupN, kARowChunk, kPow2, kLayout,
                              kClusterM, kSwapAB>;
  const GemmParams params{m, num_experts, g_layout, g_sb, g_act, g_act_scale, scale_batch,
                          scale_group};
  gemm_body<Policy>(&tma_a, &tma_b, &tma_sa, nullptr, &tma_d, params);
}

// The contiguous form with dynamic tiles (tile_claim.cuh): fused_swiglu_gemm_kernel's tiles,
// claimed at run time from g_tile_counter (int32 [2], zero before the launch and left zero after
// it; one counter per stream of launches).
template <int kN, int kK, int kStages, int kGroupN, bool kPow2, int kClusterM>
__global__ void __launch_bounds__(3 * 128, 1)
    fused_swiglu_dynamic_kernel(const __grid_constant__ ptx::TmaDesc tma_a,
                                const __grid_constant__ ptx::TmaDesc tma_b,
                                const __grid_constant__ ptx::TmaDesc tma_sa,
                                const __grid_constant__ ptx::TmaDesc tma_d, int m,
                                int num_experts, const int* g_layout, const float* g_sb,
                                void* g_act, float* g_act_scale, long long scale_batch,
                                long long scale_group, int* g_tile_counter) {
  static_assert(kK % 128 == 0 && kN % 256 == 0, "K % 128 == 0 and I % 128 == 0");
  using Policy = SwiGluPolicy<kN, kK, 128, kStages, kGroupN, 0, kPow2, kLayoutContiguous,
                              kClusterM, false, true>;
  GemmParams params{m, num_experts, g_layout, g_sb, g_act, g_act_scale, scale_batch,
                    scale_group};
  params.g_tile_counter = g_tile_counter;
  gemm_body<Policy>(&tma_a, &tma_b, &tma_sa, nullptr, &tma_d, params);
}

// Gather (masked layout, decode): the policy above with A's rows read from the unpermuted token
// matrix (gemm_core.cuh kGatherA), so the dispatch copies no rows, only their scales.
template <int kN, int kK, int kBlockM, int kStages, int kGroupN, bool kPow2, bool kSwap>
struct SwiGluGatherPolicy
    : SwiGluPolicy<kN, kK, kBlockM, kStages, kGroupN, 0, kPow2, kLayoutMasked, 1, kSwap> {
  static constexpr bool kGatherA = true;
  static constexpr bool kSkipIdleWarpgroup = true;  // as with row chunks: rows_valid <= 64
};

// As fused_swiglu_gemm_kernel (masked), with A's rows read from the token matrix g_x = x_fp8
// [T, K] (contiguous rows, 16-byte aligned) at g_row_token [E * M_max] (int64, the dispatch's
// row_token; read for rows below masked_m only); tma_sa over the masked layout's scales. kSwapAB:
// the swap-AB tiles.
template <int kN, int kK, int kBlockM, int kStages, int kGroupN, bool kPow2, bool kSwapAB = false>
__global__ void __launch_bounds__((kSwapAB ? 2 : kBlockM / 64) * 128 + 128, 1)
    fused_swiglu_gather_kernel(const __grid_constant__ ptx::TmaDesc tma_b,
                               const __grid_constant__ ptx::TmaDesc tma_sa,
                               const __grid_constant__ ptx::TmaDesc tma_d, int m, int num_experts,
                               const int* g_layout, const float* g_sb, void* g_act,
                               float* g_act_scale, long long scale_batch, long long scale_group,
                               const long long* g_row_token, const unsigned char* g_x) {
  static_assert(kK % 128 == 0 && kN % 256 == 0, "K % 128 == 0 and I % 128 == 0");
  using Policy = SwiGluGatherPolicy<kN, kK, kBlockM, kStages, kGroupN, kPow2, kSwapAB>;
  const GemmParams params{m, num_experts, g_layout, g_sb, g_act, g_act_scale, scale_batch,
                          scale_group};
  gemm_body<Policy>(nullptr, &tma_b, &tma_sa, nullptr, &tma_d, params, g_row_token, g_x);
}

}  // namespace moe_fp8
