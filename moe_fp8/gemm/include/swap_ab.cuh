// Swap-AB math warpgroups of the masked FP8 GEMM (gemm_core.cuh, policies with kSwapAB).
//
// A decode batch puts a few dozen rows on each expert; a masked tile's rows are the wgmma M side,
// 64 per math warpgroup, so an expert with 65-80 rows runs two warpgroups' MMAs for ~1.2
// warpgroups of rows. (Measured since: the H100's 256-token gate-up waits on the weight stream,
// not on those MMAs: 85 % of the DRAM peak, tensor pipe 28 % busy; ncu, 2026-12-07. Swap AB's
// other use: its token tiles are any multiple of 16 rows, so a 96-row tile leaves room for a
// deeper ring.) Here the roles swap: the tile's 128 weight rows (the output columns) are the
// wgmma M side, 64 per math warpgroup, and its tokens (the output rows) are the wgmma N side,
// rounded up to 16 at run time:
//
//   D^T[n0 + 64 w + i, t] = sum over K blocks kb of sw[kb] * sx[t, kb] * (B[n0 + 64 w + i, kb] . A[t, kb])
//
// The producer and the scale warp are gemm_core's, unchanged: A (the tokens, kBlockM rows, loaded
// in row chunks below masked_m) and B (the weights, kBlockN = 128 rows: one 128 x 128 scale block,
// so sw is one value per K block, staged per tile by the scale warp) land in the same slots.
// The wgmma is m64nTk32 with T = the tile's valid rows rounded up to 16 (one instance of the K
// loop per T: the accumulators are registers, so T must be a compile-time constant in each); the
// token columns past the valid rows read stale shared memory and are never stored. Promotion:
// acc[i, t] += p[i, t] * (sw * sx[t]), the column factors formed once per K block.
// Epilogue: stmatrix .trans writes the tile transposed, [tokens][64 columns] bf16 per warpgroup
// (128-byte rows, 16-byte unit u of row t at u ^ (t % 8): no bank conflicts for the 8 rows of
// one stmatrix nor for the row reads), then 16-byte stores of the valid rows only.
#pragma once

#include "ptx.cuh"
#include "scheduler.cuh"

namespace moe_fp8 {

// Staging of one warpgroup's transposed tile: kBlockM token rows of 64 bf16 columns. With
// kBlockN = 128 the two warpgroups' buffers take what the bf16 epilogue's would (kBlockM / 64
// warpgroups x kBlockN x 64 x 2 bytes), so the host's shared-memory size is the same formula.
template <int kBlockM>
struct SwapAbEpilogue {
  static constexpr int kBytes = kBlockM * 128;
  __device__ __forceinline__ static u32 offset(int row, int unit) {
    return row * 128 + ((unit ^ (row & 7)) << 4);
  }
};

// Everything a math warpgroup's K loop and epilogue use, and the ring position it shares with
// the producer.
struct SwapAbContext {
  u32 desc_w0, desc_x0;      // wgmma descriptors of slot 0: this warpgroup's 64 weight rows, tokens
  const float* s_sx;         // [kStages][kBlockM] token scales
  u64 *full, *empty;
  unsigned char* s_d;        // this warpgroup's share of the epilogue's shared memory
  unsigned short* g_d;       // bf16 D [E * M_max, N]
  const GemmParams* params;
  int warpgroup, tid, warp, lane, bar_id;
  int stage;
  u32 phase;
};

// One K block of this warpgroup's 64 weight rows x kT tokens into fresh registers p: four
// m64nTk32 wgmma, committed as one group (not waited for).
template <int kT>
__device__ __forceinline__ void swap_ab_issue(u32 desc_w, u32 desc_x, float (&p)[kT / 2]) {
  ptx::fence_regs(p);
  ptx::wgmma_fence();
#pragma unroll
  for (int k = 0; k < 4; ++k)
    ptx::WgmmaFp8<kT>::mma(desc_w + k * ptx::kDescKStep, desc_x + k * ptx::kDescKStep, p, k > 0);
  ptx::wgmma_commit();
}

// The same, retired before returning.
template <int kT>
__device__ __forceinline__ void swap_ab_mma(u32 desc_w, u32 desc_x, float (&p)[kT / 2]) {
  swap_ab_issue<kT>(desc_w, desc_x, p);
  ptx::wgmma_wait<0>();
  ptx::fence_regs(p);
}

// acc[i, t] += p[i, t] * (sw * sx[t]). The thread's token columns are 8 j + 2 (lane % 4) + {0, 1}
// (sx: the slot's token scales from column 2 (lane % 4)): one 8-byte scale load per j.
template <int kT>
__device__ __forceinline__ void swap_ab_promote(float (&acc)[kT / 2], const float (&p)[kT / 2],
                                                const float* sx, float sw) {
#pragma unroll
  for (int j = 0; j < kT / 8; ++j) {
    const float2 s = *reinterpret_cast<const float2*>(sx + 8 * j);
    const float f0 = s.x * sw, f1 = s.y * sw;
    acc[4 * j + 0] += p[4 * j + 0] * f0;
    acc[4 * j + 1] += p[4 * j + 1] * f1;
    acc[4 * j + 2] += p[4 * j + 2] * f0;
    acc[4 * j + 3] += p[4 * j + 3] * f1;
  }
}

// Hands the slot the warpgroup has finished reading back to the producer.
__device__ __forceinline__ void swap_ab_release(SwapAbContext& c, int stages) {
  __syncwarp();  // every lane has read its scales before the slot is handed back
  if (c.lane == 0) ptx::mbar_arrive(&c.empty[c.stage]);
  if (++c.stage == stages) c.stage = 0, c.phase ^= 1;
}

// One tile of the bf16 GEMM with kT token columns (kT >= the tile's valid rows): the K loop,
// then the transposed epilogue.
template <class P, int kT>
__device__ __forceinline__ void swap_ab_tile(SwapAbContext& c, const Tile& tile,
                                             const float* s_sw) {
  constexpr int kStages = P::kStages, kBlockM = P::kBlockM;
  constexpr int kKBlocks = P::kTileKBlocks, kN = P::kN;
  constexpr u32 kWSlot = P::kBlockN * 128 >> 4, kXSlot = kBlockM * 128 >> 4;  // descriptor units
  using Out = SwapAbEpilogue<kBlockM>;
  float acc[kT / 2], p[kT / 2];
#pragma unroll
  for (int i = 0; i < kT / 2; ++i) acc[i] = 0.f;
  for (int kb = 0; kb < kKBlocks; ++kb) {
    const u32 desc_w = c.desc_w0 + static_cast<u32>(c.stage) * kWSlot;
    const u32 desc_x = c.desc_x0 + static_cast<u32>(c.stage) * kXSlot;
    ptx::mbar_wait(&c.full[c.stage], c.phase);
    swap_ab_mma<kT>(desc_w, desc_x, p);
    const float sw = s_sw[kb];
    const float* sx = c.s_sx + c.stage * kBlockM + 2 * (c.lane % 4);
    swap_ab_promote<kT>(acc, p, sx, sw);
    swap_ab_release(c, kStages);
  }

  // Epilogue. Every thread of the warpgroup has finished reading the previous tile's buffer.
  ptx::named_barrier(c.bar_id, 128);
  const u32 s_d = ptx::smem_addr(c.s_d);
  // stmatrix x4 .trans over token groups 2 j2 and 2 j2 + 1: matrix m = lane / 8 is (weight rows
  // 16 warp + 8 (m % 2), tokens 8 (2 j2 + m / 2) ..), lane l addresses its token row l % 8.
  const int m = c.lane >> 3;
  const int unit = 2 * c.warp + (m & 1);
#pragma unroll
  for (int j2 = 0; j2 < kT / 16; ++j2) {
    const float* r = acc + 8 * j2;
    const int row = 16 * j2 + 8 * (m >> 1) + (c.lane & 7);
    ptx::stmatrix_x4_trans(s_d + Out::offset(row, unit), ptx::pack_bf16x2(r[0], r[1]),
                           ptx::pack_bf16x2(r[2], r[3]), ptx::pack_bf16x2(r[4], r[5]),
                           ptx::pack_bf16x2(r[6], r[7]));
  }
  ptx::named_barrier(c.bar_id, 128);
  const int rows = min(tile.rows_valid, kT);
  unsigned short* g_row0 = c.g_d + static_cast<long>(tile.m_row) * kN + tile.n0 + 64 * c.warpgroup;
  for (int q = c.tid; q < rows * 8; q += 128) {
    const int row = q >> 3, u = q & 7;
    *reinterpret_cast<uint4*>(g_row0 + static_cast<long>(row) * kN + 8 * u) =
        *reinterpret_cast<const uint4*>(c.s_d + Out::offset(row, u));
  }
}

// The tile body of the bf16 GEMM's policy (SwapAbPolicy::SwapAbTile; the fused SwiGLU GEMM has
// its own, swap_ab_swiglu.cuh).
struct SwapAbGemmTile {
  template <class P, int kT>
  __device__ __forceinline__ static void run(SwapAbContext& c, const Tile& tile,
                                             const float* s_sw) {
    swap_ab_tile<P, kT>(c, tile, s_sw);
  }
};

// The tile's token count rounded up to 16 picks the instance: kT, kT + 16, ... kBlockM.
template <class P, int kT = 16>
__device__ __forceinline__ void swap_ab_dispatch(SwapAbContext& c, const Tile& tile,
                                                 const float* s_sw) {
  if constexpr (kT < P::kBlockM) {
    if (tile.rows_valid > kT) {
      swap_ab_dispatch<P, kT + 16>(c, tile, s_sw);
      return;
    }
  }
  P::SwapAbTile::template run<P, kT>(c, tile, s_sw);
}

// The math warpgroups' whole part (gemm_body's math branch for kSwapAB policies).
template <class P>
__device__ __forceinline__ void swap_ab_math(unsigned char* s_a, unsigned char* s_b,
                                             const float* s_sa, const float* s_tile_sb, u64* full,
                                             u64* empty, u64* sb_full, u64* sb_empty,
                                             unsigned char* s_d, const GemmParams& params,
                                             int warpgroup, int tid) {
  static_assert((P::kBlockN == 128 || (P::kBlockN == 256 && P::kUpRowOffset > 0)) &&
                    P::kClusterM * P::kClusterN == 1 && P::kTileKBlocks > 0 &&
                    P::kBlockM % 16 == 0 && P::kN % 128 == 0,
                "swap AB: 128 weight rows (one scale block) per tile, or a SwiGLU tile's 128 gate "
                "and 128 up rows; no cluster, fixed K");
  SwapAbContext c;
  c.desc_w0 = ptx::desc_k128_sw128_lo(s_b + warpgroup * 64 * 128);
  c.desc_x0 = ptx::desc_k128_sw128_lo(s_a);
  c.s_sx = s_sa;
  c.full = full, c.empty = empty;
  c.s_d = s_d + warpgroup * P::Epilogue::kBytes;
  c.g_d = static_cast<unsigned short*>(params.g_d);
  c.params = &params;
  c.warpgroup = warpgroup, c.tid = tid, c.warp = tid / 32, c.lane = tid % 32;
  c.bar_id = 1 + warpgroup;
  c.stage = 0, c.phase = 0;
  typename P::Scheduler scheduler(params, 0);
  Tile tile;
  int sb_buf = 0;
  u32 sb_phase = 0;
  while (scheduler.next(tile)) {
    ptx::mbar_wait(&sb_full[sb_buf], sb_phase);
    swap_ab_dispatch<P>(c, tile, s_tile_sb + sb_buf * 2 * P::kTileKBlocks);
    ptx::mbar_arrive(&sb_empty[sb_buf]);  // every thread: see gemm_core's scale warp NOTE
    if (++sb_buf == 2) sb_buf = 0, sb_phase ^= 1;
  }
}

}  // namespace moe_fp8
