// The fused SwiGLU gate-up GEMM's swap-AB tiles (fused_swiglu.cuh's policies with kSwap;
// GemmConfig.swap_ab): the decode step's gate-up with its tokens on the wgmma N side.
#pragma once

#include "gemm_core.cuh"
#include "quant.cuh"
#include "swap_ab.cuh"

namespace moe_fp8 {

// Swap AB (masked layout, decode; GemmConfig.swap_ab, swap_ab.cuh): the tile's 128 gate rows and
// 128 up rows (the slot's two B boxes) are the wgmma M side and its tokens the N side, rounded up
// to 16 per tile, so an expert's 65-80 rows run MMAs for 80 rows, not for 128. Math warpgroup w
// takes channels [64 w, 64 w + 64) of the tile: per K block its gate rows, then its up rows (up to
// 80 tokens into two partial sets, the up MMAs queued before the gate block is promoted: 2 kT
// registers; wider tiles through one set: 1.5 kT, 192 at kT = 128). A token's 128
// channels (one quantisation group) then lie in both warpgroups: each warp reduces its 16 channels
// per token by shuffles and the 8 warps meet in shared memory (SwapAbSwiGluSmem). The values are
// EpilogueSwiGlu's: the same bf16 rounding of h, SiLU, amax, scale and e4m3 conversion per value.
template <int kBlockM>
struct SwapAbSwiGluSmem {
  // per warpgroup: its 4 warps' amax per token; warpgroup 0's fifth row: the tokens' scales
  static constexpr int kBytes = 5 * kBlockM * 4;
  static constexpr int kBarrier = 3;  // both math warpgroups (1 and 2: each one's own)
};

template <bool kPow2>
struct SwapAbSwiGluTile {
  template <class P, int kT>
  __device__ __forceinline__ static void run(SwapAbContext& c, const Tile& tile,
                                             const float* s_sw) {
    constexpr int kStages = P::kStages, kBlockM = P::kBlockM, kKBlocks = P::kTileKBlocks;
    constexpr int kInter = P::kN / 2;
    // descriptor units: a slot of B (gate box, then up box), of A; the up box's offset
    constexpr u32 kWSlot = 256 * 128 >> 4, kXSlot = kBlockM * 128 >> 4, kUpBox = 128 * 128 >> 4;
    using Smem = SwapAbSwiGluSmem<kBlockM>;
    // Up to 80 tokens the up block's MMAs go to the tensor cores before the gate block is promoted
    // (a second partial set: 2 kT registers); wider tiles run gate then up through one set.
    constexpr bool kTwoSets = kT <= 80;
    float gate[kT / 2], up[kT / 2], p[kT / 2], q[kTwoSets ? kT / 2 : 1];
#pragma unroll
    for (int i = 0; i < kT / 2; ++i) gate[i] = 0.f, up[i] = 0.f;
    for (int kb = 0; kb < kKBlocks; ++kb) {
      const u32 desc_w = c.desc_w0 + static_cast<u32>(c.stage) * kWSlot;
      const u32 desc_x = c.desc_x0 + static_cast<u32>(c.stage) * kXSlot;
      ptx::mbar_wait(&c.full[c.stage], c.phase);
      if constexpr (gather_a_of<P>(0)) ptx::fence_proxy_async_smem();  // cp.async rows (gemm_core)
      const float* sx = c.s_sx + c.stage * kBlockM + 2 * (c.lane % 4);
      if constexpr (kTwoSets) {
        swap_ab_issue<kT>(desc_w, desc_x, p);
        swap_ab_issue<kT>(desc_w + kUpBox, desc_x, q);
        ptx::wgmma_wait<1>();
        ptx::fence_regs(p);
        swap_ab_promote<kT>(gate, p, sx, s_sw[kb]);
        ptx::wgmma_wait<0>();
        ptx::fence_regs(q);
        swap_ab_promote<kT>(up, q, sx, s_sw[kKBlocks + kb]);
      } else {
        swap_ab_mma<kT>(desc_w, desc_x, p);
        swap_ab_promote<kT>(gate, p, sx, s_sw[kb]);
        swap_ab_mma<kT>(desc_w + kUpBox, desc_x, p);
        swap_ab_promote<kT>(up, p, sx, s_sw[kKBlocks + kb]);
      }
      swap_ab_release(c, kStages);
    }

    // y = silu(h_gate) * h_up with h = bf16(acc), in place of gate. Thread values: channel
    // 16 warp + lane / 4 (+ 8 at + 2) of this warpgroup's 64, token 8 j + 2 (lane % 4) + {0, 1}.
#pragma unroll
    for (int i = 0; i < kT / 2; i += 2) {
      const u32 g = ptx::pack_bf16x2(gate[i], gate[i + 1]), u = ptx::pack_bf16x2(up[i], up[i + 1]);
      gate[i] = quant::silu_mul_special(__uint_as_float(g << 16), __uint_as_float(u << 16));
      gate[i + 1] = quant::silu_mul_special(__uint_as_float(g & 0xFFFF0000u),
                                            __uint_as_float(u & 0xFFFF0000u));
    }
    float* s_all = reinterpret_cast<float*>(c.s_d - c.warpgroup * Smem::kBytes);
    float* s_scale = s_all + 4 * kBlockM;
    // Every thread of both warpgroups has read the previous tile's scales (after barrier B).
#pragma unroll
    for (int j = 0; j < kT / 8; ++j) {
#pragma unroll
      for (int cc = 0; cc < 2; ++cc) {
        float a = quant::max_nan(fabsf(gate[4 * j + cc]), fabsf(gate[4 * j + 2 + cc]));
        a = quant::max_nan(a, __shfl_xor_sync(0xFFFFFFFFu, a, 4));
        a = quant::max_nan(a, __shfl_xor_sync(0xFFFFFFFFu, a, 8));
        a = quant::max_nan(a, __shfl_xor_sync(0xFFFFFFFFu, a, 16));
        if (c.lane < 4) s_all[(5 * c.warpgroup + c.warp) * kBlockM + 8 * j + 2 * c.lane + cc] = a;
      }
    }
    ptx::named_barrier(Smem::kBarrier, 256);  // A: the 8 warps' amax per token written
    const GemmParams& params = *c.params;
    const int rows = min(tile.rows_valid, kT);
    const int expert = tile.m_row / params.m;
    const int t = 128 * c.warpgroup + c.tid;
    if (t < kT) {
      float amax = 0.0f;  // max.NaN: any order, the same result
#pragma unroll
      for (int w = 0; w < 8; ++w) amax = quant::max_nan(amax, s_all[(w + w / 4) * kBlockM + t]);
      const float scale = quant::scale_from_amax<kPow2>(amax);
      s_scale[t] = scale;
      if (t < rows)
        params.g_ds[expert * params.ds_batch + (tile.n0 / 128) * params.ds_group +
                    (tile.m_row - expert * params.m) + t] = scale;
    }
    ptx::named_barrier(Smem::kBarrier, 256);  // B: the tokens' scales written
    // fp8 bytes of channels c and c + 8 of each token, stored one by one (a few dozen per thread
    // per tile of ~56 K blocks)
    unsigned char* g_act = static_cast<unsigned char*>(params.g_d) +
                           static_cast<long>(tile.m_row) * kInter + tile.n0 + 64 * c.warpgroup +
                           16 * c.warp + c.lane / 4;
#pragma unroll
    for (int j = 0; j < kT / 8; ++j) {
#pragma unroll
      for (int cc = 0; cc < 2; ++cc) {
        const int token = 8 * j + 2 * (c.lane % 4) + cc;
        if (token >= rows) continue;
        const float scale = s_scale[token];
        const unsigned pair = __nv_cvt_float2_to_fp8x2(
            make_float2(quant::quotient(gate[4 * j + cc], scale),
                        quant::quotient(gate[4 * j + 2 + cc], scale)),
            __NV_SATFINITE, __NV_E4M3);
        unsigned char* dst = g_act + static_cast<long>(token) * kInter;
        dst[0] = static_cast<unsigned char>(pair & 0xFFu);
        dst[8] = static_cast<unsigned char>(pair >> 8);
      }
    }
  }
};

}  // namespace moe_fp8
