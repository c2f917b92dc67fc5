// FP8 GEMM with fine-grained scales for sm_90a: dense, grouped-contiguous and grouped-masked.
//
//   D[m, n] (bf16) = sum over K blocks kb of  sa[m, kb] * sb[n / 128, kb] * (A[m, kb] . B[n, kb])
//   A [M, K] e4m3, K-major; sa [M, K/128] fp32 MN-major (one scale per row per 128 channels)
//   B [N, K] e4m3, K-major; sb [ceil(N/128), K/128] fp32 (one scale per 128 x 128 block)
//   (grouped layouts: see scheduler.cuh; B, sb gain a leading expert dimension)
//
// Warp roles (kNumMathWG = kBlockM / 64 math warpgroups, then one producer warpgroup):
//   producer  one elected thread issues TMA loads of A, B and sa into a kStages-deep ring of
//             shared-memory slots; `full[s]` completes when the bytes of slot s have landed,
//             `empty[s]` when every math warp has finished reading it.
//   math      warpgroup w owns rows [64w, 64w + 64) of the tile. For each 128-wide K block it
//             runs 4 wgmma m64nNk32 into fresh registers (the tensor cores' FP8 accumulation is
//             never trusted across K blocks), then promotes on CUDA cores:
//             acc += partial * sa[row] * sb[col block]; finally the epilogue writes bf16.
// The grid is persistent (one CTA per SM); TileScheduler decides which tiles a CTA computes.
//
// Constraints: K % 128 == 0; N % 16 == 0; kBlockN a multiple of 16 such that a tile's columns
// touch at most two 128-column scale blocks; kBlockM in {64, 128}.
#pragma once

#include "epilogue.cuh"
#include "ptx.cuh"
#include "scheduler.cuh"

namespace moe_fp8 {

constexpr int kProducerRegs = 56;  // scheduler state and addresses (40 spilled for N = 2128)
constexpr int kMathRegs = 224;     // 128 * 56 + 256 * 224 = 384 * 168, the launch allocation

// True when every tile start n0 = i * kBlockN (a multiple of 16) sees its columns within two
// 128-column scale blocks: (n0 mod 128) + kBlockN <= 256 for all i.
__host__ __device__ constexpr bool fits_two_scale_blocks(int block_n) {
  for (int i = 0; i < 128; ++i)
    if ((i * block_n) % 128 + block_n > 256) return false;
  return true;
}

// Byte offsets of the dynamic shared-memory regions (the host mirrors this in heuristics.py).
template <int kK, int kBlockM, int kBlockN, int kStages>
struct SmemLayout {
  static constexpr int kNumMathWG = kBlockM / 64;
  static constexpr int kNumKBlocks = kK / 128;
  static constexpr int kABytes = kBlockM * 128;  // one K block of A: kBlockM rows x 128 bytes
  static constexpr int kBBytes = kBlockN * 128;
  static constexpr int kSaBytes = kBlockM * 4;
  static constexpr int kA = 0;                              // [kStages][kBlockM][128] e4m3
  static constexpr int kB = kA + kStages * kABytes;         // [kStages][kBlockN][128] e4m3
  static constexpr int kD = kB + kStages * kBBytes;         // [kNumMathWG][Epilogue] bf16
  static constexpr int kSa = kD + kBlockM * kBlockN * 2;    // [kStages][kBlockM] fp32
  static constexpr int kSb = kSa + kStages * kSaBytes;      // [kNumMathWG][2][kNumKBlocks] fp32
  static constexpr int kBar = (kSb + kNumMathWG * 2 * kNumKBlocks * 4 + 7) / 8 * 8;
  static constexpr int kEnd = kBar + 2 * kStages * 8;       // full[kStages], empty[kStages]
  static constexpr int kTotal = kEnd + 1024;                // slack to 1024-align the base
  static constexpr int kStageTxBytes = kABytes + kBBytes + kSaBytes;
  static_assert(kABytes % 1024 == 0 && kBBytes % 1024 == 0, "128B-swizzle atoms are 1024 bytes");
};

template <int kN, int kK, int kBlockM, int kBlockN, int kStages, int kGroupN, int kLayout,
          int kDoubleBufferOpt = 1>
__global__ void __launch_bounds__((kBlockM / 64 + 1) * 128, 1)
    fp8_gemm_kernel(const __grid_constant__ ptx::TmaDesc tma_a,
                    const __grid_constant__ ptx::TmaDesc tma_b,
                    const __grid_constant__ ptx::TmaDesc tma_sa,
                    const __grid_constant__ ptx::TmaDesc tma_d, int m, int num_experts,
                    const int* g_layout, const float* g_sb, void* g_d) {
  static_assert(kK % 128 == 0 && kN % 16 == 0, "K % 128 and N % 16 must be 0");
  static_assert(kBlockM == 64 || kBlockM == 128, "one or two math warpgroups");
  // NOTE: setmaxnreg only moves registers the CTA was launched with (384 threads x 168); asking
  // for more makes the math warpgroups' setmaxnreg.inc wait forever (seen: a hang at 48 + 232).
  static_assert(128 * kProducerRegs + 256 * kMathRegs <= 384 * 168, "register budget");
  static_assert(kBlockN % 16 == 0 && kBlockN <= 256 && fits_two_scale_blocks(kBlockN),
                "kBlockN: multiple of 16, <= 256, at most two scale blocks per tile");
  using Layout = SmemLayout<kK, kBlockM, kBlockN, kStages>;
  using Epi = Epilogue<kN, kBlockN>;
  using Mma = ptx::WgmmaFp8<kBlockN>;
  using Scheduler = TileScheduler<kLayout, kN, kK, kBlockM, kBlockN, kGroupN>;
  constexpr int kNumMathWG = Layout::kNumMathWG;
  constexpr int kNumKBlocks = Layout::kNumKBlocks;
  constexpr int kAcc = kBlockN / 2;  // accumulator registers per thread
  // Whether a tile's columns may cross a 128-column scale block (then 2 sb values per K block).
  constexpr bool kMayStraddle = 128 % kBlockN != 0;
  // Two partial-product register sets beside the accumulator fit the register budget up to
  // kBlockN = 128 (3 x 64 + ~30 registers); the pipelined loop needs an even K-block count.
  constexpr bool kDoubleBuffer = kDoubleBufferOpt != 0 && 3 * kAcc <= 192 && kNumKBlocks % 2 == 0;

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  // NOTE: the 128B swizzle pattern is a function of address bits [7,10), so every A/B slot must
  // start 1024-byte aligned; the dynamic base is only guaranteed 16-byte aligned.
  unsigned char* smem = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<u64>(smem_raw) + 1023) & ~u64(1023));
  unsigned char* s_a = smem + Layout::kA;
  unsigned char* s_b = smem + Layout::kB;
  unsigned char* s_d = smem + Layout::kD;
  float* s_sa = reinterpret_cast<float*>(smem + Layout::kSa);
  float* s_sb = reinterpret_cast<float*>(smem + Layout::kSb);
  u64* full = reinterpret_cast<u64*>(smem + Layout::kBar);
  u64* empty = full + kStages;

  const GemmParams params{m, num_experts, g_layout, g_sb, g_d};
  const int warpgroup = threadIdx.x / 128;
  const int tid = threadIdx.x % 128;  // thread index inside the warpgroup

  if (threadIdx.x == kNumMathWG * 128) {
    if (ptx::dynamic_smem_bytes() < Layout::kTotal) __trap();  // host/device layout mismatch
    ptx::prefetch_tma_desc(&tma_a);
    ptx::prefetch_tma_desc(&tma_b);
    ptx::prefetch_tma_desc(&tma_sa);
    ptx::prefetch_tma_desc(&tma_d);
    for (int s = 0; s < kStages; ++s) {
      ptx::mbar_init(&full[s], 1);                // the producer's arrive_expect_tx
      ptx::mbar_init(&empty[s], kNumMathWG * 4);  // one arrival per math warp
    }
    ptx::fence_barrier_init();
  }
  __syncthreads();

  if (warpgroup == kNumMathWG) {
    // ------------------------------------------------------------------ producer warpgroup
    if constexpr (kNumMathWG == 2) ptx::setmaxnreg_dec<kProducerRegs>();
    if (tid < 32 && ptx::elect_one()) {
      Scheduler scheduler(params);
      Tile tile;
      int stage = 0;
      u32 phase = 0;
      while (scheduler.next(tile)) {
        for (int kb = 0; kb < kNumKBlocks; ++kb) {
          ptx::mbar_wait(&empty[stage], phase ^ 1);  // slot released by every math warp
          ptx::mbar_arrive_expect_tx(&full[stage], Layout::kStageTxBytes);
          ptx::tma_load_2d(s_a + stage * Layout::kABytes, &tma_a, &full[stage], kb * 128,
                           tile.m_row);
          ptx::tma_load_2d(s_b + stage * Layout::kBBytes, &tma_b, &full[stage], kb * 128,
                           tile.b_row);
          ptx::tma_load_2d(s_sa + stage * kBlockM, &tma_sa, &full[stage], tile.sa_m,
                           tile.sa_k + kb);
          if (++stage == kStages) stage = 0, phase ^= 1;
        }
      }
    }
  } else {
    // ------------------------------------------------------------------ math warpgroups
    // NOTE: with one math warpgroup the launch bound already grants 255 registers.
    if constexpr (kNumMathWG == 2) ptx::setmaxnreg_inc<kMathRegs>();
    const int warp = tid / 32, lane = tid % 32;
    const int bar_id = 1 + warpgroup;  // named barrier private to this warpgroup
    float* s_sb_wg = s_sb + warpgroup * 2 * kNumKBlocks;  // [2][kNumKBlocks]
    unsigned char* s_d_wg = s_d + warpgroup * Epi::kBytes;
    // Rows of this thread inside the tile: lane/4 and lane/4 + 8 of the warp's 16-row slab.
    const int row_lo = warpgroup * 64 + warp * 16 + lane / 4;
    float r_acc[kAcc], r_p0[kAcc], r_p1[kDoubleBuffer ? kAcc : 1];

    Scheduler scheduler(params);
    Tile tile;
    int stage_in = 0, stage_out = 0;  // next slot to compute on / to release
    u32 phase_in = 0, phase_out = 0;
    while (scheduler.next(tile)) {
      // Weight scales of the tile's column block (and the next one if the tile crosses into
      // it) for every K block, staged once per tile. The previous tile's readers are past its
      // epilogue barrier, so overwriting is safe.
      const float* g_sb = params.g_sb + long(tile.sb_row) * kNumKBlocks;
      const bool has_next_block = kMayStraddle && tile.sb_row + 1 < tile.sb_rows_end;
      for (int i = tid; i < 2 * kNumKBlocks; i += 128)
        s_sb_wg[i] = (i < kNumKBlocks || has_next_block) ? __ldg(g_sb + i) : 0.f;
      // Columns [0, first_cols) of the tile use block n0/128, the rest block n0/128 + 1.
      const int first_cols = kMayStraddle ? min(kBlockN, 128 - tile.n0 % 128) : kBlockN;
      ptx::named_barrier(bar_id, 128);

#pragma unroll
      for (int i = 0; i < kAcc; ++i) r_acc[i] = 0.f;

      // Partial product of the next K block on the tensor cores, into fresh registers `p`.
      auto issue = [&](float(&p)[kAcc]) {
        ptx::mbar_wait(&full[stage_in], phase_in);
        const u64 desc_a =
            ptx::make_desc_k128_sw128(s_a + stage_in * Layout::kABytes + warpgroup * 64 * 128);
        const u64 desc_b = ptx::make_desc_k128_sw128(s_b + stage_in * Layout::kBBytes);
        ptx::fence_regs(p);
        ptx::wgmma_fence();
#pragma unroll
        for (int k = 0; k < 4; ++k)
          Mma::mma(desc_a + k * ptx::kDescKStep, desc_b + k * ptx::kDescKStep, p, k > 0);
        ptx::wgmma_commit();
        if (++stage_in == kStages) stage_in = 0, phase_in ^= 1;
      };
      // Once the wgmma group of K block kb has retired (caller waited): release its slot and
      // promote, acc += p * sa[row] * sb[col block], one FFMA per element on CUDA cores.
      auto retire = [&](float(&p)[kAcc], int kb) {
        ptx::fence_regs(p);
        const float* s_sa_stage = s_sa + stage_out * kBlockM;
        const float sa_lo = s_sa_stage[row_lo], sa_hi = s_sa_stage[row_lo + 8];
        const float sb_0 = s_sb_wg[kb];
        const float sb_1 = kMayStraddle ? s_sb_wg[kNumKBlocks + kb] : 0.f;
        __syncwarp();  // every lane has read its sa before lane 0 frees the slot
        if (lane == 0) ptx::mbar_arrive(&empty[stage_out]);
        if (++stage_out == kStages) stage_out = 0, phase_out ^= 1;
        const float s00 = sa_lo * sb_0, s10 = sa_hi * sb_0;
        const float s01 = sa_lo * sb_1, s11 = sa_hi * sb_1;
        const int cols_0 = kMayStraddle ? ptx::opaque(first_cols) : kBlockN;
#pragma unroll
        for (int j = 0; j < kBlockN / 8; ++j) {
          const bool first = !kMayStraddle || j * 8 < cols_0;
          const float scale_lo = first ? s00 : s01, scale_hi = first ? s10 : s11;
          r_acc[4 * j + 0] += p[4 * j + 0] * scale_lo;
          r_acc[4 * j + 1] += p[4 * j + 1] * scale_lo;
          r_acc[4 * j + 2] += p[4 * j + 2] * scale_hi;
          r_acc[4 * j + 3] += p[4 * j + 3] * scale_hi;
        }
      };

      if constexpr (kDoubleBuffer) {
        // K block kb+1 is queued on the tensor cores before kb is promoted, so the FFMAs of
        // the promotion overlap the next MMAs instead of leaving the tensor cores idle.
        // NOTE: each group is retired (wait 0) before the next is issued, and the loop body
        // is branch-free (kNumKBlocks even): with "issue kb+1, wait 1, promote kb" ptxas
        // could not prove the two register sets apart and serialised every wgmma (C7514).
        issue(r_p0);
        for (int kb = 0; kb < kNumKBlocks; kb += 2) {
          ptx::wgmma_wait<0>();
          issue(r_p1);
          retire(r_p0, kb);
          ptx::wgmma_wait<0>();
          if (kb + 2 < kNumKBlocks) issue(r_p0);
          retire(r_p1, kb + 1);
        }
      } else {
        for (int kb = 0; kb < kNumKBlocks; ++kb) {
          issue(r_p0);
          ptx::wgmma_wait<0>();
          retire(r_p0, kb);
        }
      }

      // ---------------------------------------------------------------- epilogue
      // The previous tile's TMA store must have finished reading s_d before it is rewritten.
      if (tid == 0) ptx::tma_store_wait_read<0>();
      ptx::named_barrier(bar_id, 128);
      Epi::to_smem(r_acc, ptx::smem_addr(s_d_wg), warp, lane);
      ptx::fence_proxy_async_smem();
      ptx::named_barrier(bar_id, 128);
      const int rows = tile.rows_valid - warpgroup * 64;  // rows of this warpgroup to write
      const int row0 = tile.m_row + warpgroup * 64;
      if (rows > 0) {
        // Whole 64-row slabs leave through TMA; a slab cut by masked_m, or ending in
        // contiguous-layout padding rows (m_indices == -1 only ever ends a 128-row segment),
        // takes the per-row predicated path so those rows are never written.
        bool whole = true;
        if constexpr (kLayout == kLayoutMasked) whole = rows >= 64;
        if constexpr (kLayout == kLayoutContiguous) whole = __ldg(params.g_layout + row0 + 63) >= 0;
        if (whole) {
          if (tid == 0) Epi::tma_store(&tma_d, s_d_wg, tile.n0, row0);
        } else {
          Epi::predicated_store(reinterpret_cast<const char*>(s_d_wg),
                                static_cast<unsigned short*>(params.g_d),
                                kLayout == kLayoutContiguous ? params.g_layout : nullptr,
                                tile.n0, row0, min(rows, 64), tid);
        }
      }
    }
    if (tid == 0) ptx::tma_store_wait_all();
  }
}

}  // namespace moe_fp8
