// The mainloop shared by every FP8 GEMM of the family (fp8_gemm.cuh: dense / grouped NT with
// bf16 output; wgrad.cuh: k-grouped weight gradients with fp32 accumulate). A kernel is a small
// policy struct plus a call of gemm_body<Policy>:
//
//   kBlockM, kBlockN, kStages   tile and shared-memory ring depth
//   kClusterM                   1, or 2: a 2-CTA cluster of vertically adjacent tiles in which
//                               each CTA loads half of the shared B tile and multicasts it
//                               (contiguous: only where both tiles use one expert's B;
//                               scheduler.cuh kSplitPairs)
//   kClusterN                   1, or 2: the same for horizontally adjacent tiles sharing A (small
//                               M: every CTA otherwise re-reads all of A from L2); not both
//   kARowChunk                  0, or the rows of one A load (masked or dense layout): a tile loads
//                               only the chunks that hold valid rows (decode: a few tokens of 64;
//                               dense small M: no out-of-bounds rows, which TMA fills slowly); the
//                               slot's other rows keep stale data whose output rows are never
//                               written
//   kTileKBlocks                K blocks per tile when fixed at compile time (NT: K / 128, or a
//                               split's share of them), else 0
//   kColumnScales               false: B scales per 128x128 block (NT), staged once per tile by a
//                               scale warp; true: one B scale per output column per K block
//                               (k-grouped, both operands 1x128 along tokens), a TMA per stage
//   kDoubleBuffer               queue K block kb+1 on the tensor cores before promoting kb
//                               (0: never, 1: always, 2: every other K block)
//   kEmptyTiles                 tiles may have no K block (k-grouped overwriting D; contiguous
//                               with zero padding, an all-padding tile): the
//                               lookahead then queues nothing and the epilogue writes zeros
//   kUpRowOffset                0, or (fused SwiGLU) N / 2: a 256-wide tile's B halves come from
//                               rows b_row and b_row + N / 2 (gate and up blocks; scheduler.cuh)
//   kSkipIdleWarpgroup          a math warpgroup whose 64 rows all lie past the tile's valid rows
//                               issues no wgmma for that tile (it still waits and releases each
//                               slot; its rows are never written)
//   kEarlyB                     the producer reads the tile order (masked_m) and issues the B
//                               loads of the first kStages slots BEFORE waiting for the previous
//                               kernel of the stream (PDL, pdl.cuh): the weights stream while that
//                               kernel finishes. Host contract: neither B nor the layout is written
//                               by the immediately preceding kernel (the decode step's down GEMM:
//                               weights, and masked_m from the dispatch two kernels back). No
//                               cluster.
//   kSwapAB                     (optional, masked layout) the tile's 128 B rows (fused SwiGLU: 256,
//                               a gate and an up block) are the wgmma M side and its rows of A
//                               the N side, rounded to 16 at run time (swap_ab.cuh: decode tiles
//                               of a few dozen rows per expert); P::SwapAbTile runs a tile
//   kGatherA                    (optional, the masked fused SwiGLU GEMM) A's rows come from the
//                               unpermuted token matrix (gemm_body's g_gather_x) at the
//                               dispatch's row_token (g_row_token), copied by producer warps 2-3
//                               with cp.async (decode, fused_swiglu.cuh)
//   kDynamicTiles               (optional, contiguous layouts) tiles claimed at run time from
//                               params.g_tile_counter by the scale warp instead of a fixed
//                               stride (tile_claim.cuh)
//   Scheduler, Epilogue         scheduler.cuh / epilogue.cuh
//
// Warp roles (kNumMathWG = kBlockM / 64 math warpgroups, then one producer warpgroup):
//   producer warp 0   one elected thread issues TMA loads of A, B and the scales into a
//                     kStages-deep ring; `full[s]` completes when the bytes of slot s have landed
//                     (multicast halves from the peer CTA included), `empty[s]` when every math
//                     warp of the cluster has finished reading it.
//   producer warp 1   (block scales) loads the next tile's weight scales into one of two
//                     buffers while the math warpgroups run the current tile.
//   math              warpgroup w owns rows [64w, 64w + 64). Per 128-wide K block: 4 wgmma
//                     m64nNk32 into fresh registers (FP8 tensor-core accumulation is never
//                     trusted across K blocks), then on CUDA cores acc += partial * sa * sb.
#pragma once

#include "epilogue.cuh"
#include "pdl.cuh"
#include "promote.cuh"
#include "ptx.cuh"
#include "scheduler.cuh"
#include "swap_ab.cuh"
#include "tile_claim.cuh"
#include "tile_trace.cuh"

namespace moe_fp8 {

// Register split between the producer and the two math warpgroups (128 * p + 256 * m = 384 * 168,
// the launch allocation). The producer needs 56 for its scheduler state at some widths (40
// spilled at N = 2128, kBlockN = 112); 256-wide tiles (128 accumulators + 64 partials) gained 3 %
// from 232 math registers (H200, 2026-12-05) and their producer fits in 40.
template <bool kWide>
struct RegisterSplit {
  static constexpr int kProducer = kWide ? 40 : 56;
  static constexpr int kMath = kWide ? 232 : 224;
};

// Policies with kSwapAB (masked layout, swap_ab.cuh) put the tile's B rows on the math
// warpgroups' wgmma M side: two math warpgroups whatever kBlockM (64 weight rows each; the fused
// SwiGLU's 64 gate and 64 up rows each).
template <class P>
__host__ __device__ constexpr auto swap_ab_of(int) -> decltype(bool(P::kSwapAB)) {
  return P::kSwapAB;
}
template <class P>
__host__ __device__ constexpr bool swap_ab_of(long) { return false; }
// Policies with kGatherA (masked layout, fused_swiglu.cuh's gather kernel): A's rows are read
// from the unpermuted token matrix by two producer warps (see the producer).
template <class P>
__host__ __device__ constexpr auto gather_a_of(int) -> decltype(bool(P::kGatherA)) {
  return P::kGatherA;
}
template <class P>
__host__ __device__ constexpr bool gather_a_of(long) { return false; }
// Policies with kDynamicTiles claim their tiles at run time (tile_claim.cuh).
template <class P>
__host__ __device__ constexpr auto dynamic_tiles_of(int) -> decltype(bool(P::kDynamicTiles)) {
  return P::kDynamicTiles;
}
template <class P>
__host__ __device__ constexpr bool dynamic_tiles_of(long) { return false; }
template <class P>
__host__ __device__ constexpr int math_warpgroups() {
  return swap_ab_of<P>(0) ? 2 : P::kBlockM / 64;
}

// Byte offsets of the dynamic shared-memory regions (the host mirrors this in heuristics.py).
template <class P>
struct CoreSmem {
  static constexpr int kABytes = P::kBlockM * 128;  // one K block of A: kBlockM rows x 128 bytes
  static constexpr int kBBytes = P::kBlockN * 128;
  static constexpr int kSaBytes = P::kBlockM * 4;
  static constexpr int kSbBytes = P::kColumnScales ? P::kBlockN * 4 : 0;
  static constexpr int kTileSbFloats = P::kColumnScales ? 0 : 2 * P::kTileKBlocks;
  static constexpr int kA = 0;                                   // [kStages][kBlockM][128] e4m3
  static constexpr int kB = kA + P::kStages * kABytes;           // [kStages][kBlockN][128] e4m3
  static constexpr int kD = kB + P::kStages * kBBytes;           // [kNumMathWG][Epilogue::kBytes]
  static constexpr int kSa = kD + math_warpgroups<P>() * P::Epilogue::kBytes;  // [kStages][kBlockM]
  static constexpr int kSb = kSa + P::kStages * kSaBytes;        // [kStages][kBlockN] fp32
  static constexpr int kTileSb = kSb + P::kStages * kSbBytes;    // [2][2][kTileKBlocks] fp32
  static constexpr int kBar = (kTileSb + 2 * kTileSbFloats * 4 + 7) / 8 * 8;
  static constexpr int kEnd = kBar + (2 * P::kStages + 4) * 8;  // full, empty, tile-scale x 4
  // dynamic tiles: mail_full [2], mail_empty [2] (u64), tile index [2], mailbox [2] (int)
  static constexpr int kClaim = kEnd;
  static constexpr int kClaimBytes = dynamic_tiles_of<P>(0) ? 48 : 0;
  static constexpr int kTotal = kClaim + kClaimBytes + 1024;  // slack to 1024-align the base
  static constexpr int kStageTxBytes = kABytes + kBBytes + kSaBytes + kSbBytes;
  static_assert(kABytes / P::kClusterN % 1024 == 0 && kBBytes / P::kClusterM % 1024 == 0,
                "128B-swizzle atoms are 1024 bytes (also for each multicast half of A or B)");
};

template <class P>
__device__ __forceinline__ void gemm_body(const ptx::TmaDesc* tma_a, const ptx::TmaDesc* tma_b,
                                          const ptx::TmaDesc* tma_sa, const ptx::TmaDesc* tma_sb,
                                          const ptx::TmaDesc* tma_d, const GemmParams& params,
                                          const long long* g_row_token = nullptr,
                                          const unsigned char* g_gather_x = nullptr) {
  constexpr int kBlockM = P::kBlockM, kBlockN = P::kBlockN, kStages = P::kStages;
  // a config whose stages were never resolved (heuristics.GemmConfig.resolved) has 0 here
  static_assert(kStages >= 2, "at least two ring stages (an unresolved GemmConfig has 0)");
  constexpr int kClusterM = P::kClusterM, kClusterN = P::kClusterN;
  constexpr int kClusterSize = kClusterM * kClusterN, kTileKBlocks = P::kTileKBlocks;
  constexpr bool kColumnScales = P::kColumnScales;
  using Layout = CoreSmem<P>;
  // A 256-wide tile is computed as two 128-column halves, one after the other, into one
  // 64-register partial set (128 accumulators + 64 partials fit where 2 x 128 would spill); each
  // half lies in one 128-column scale block (column scales: its own 128 of the slot's kBlockN).
  constexpr int kHalves = kBlockN == 256 ? 2 : 1;
  constexpr int kPartN = kBlockN / kHalves;  // columns per wgmma group
  using Mma = ptx::WgmmaFp8<kPartN>;
  using Scheduler = typename P::Scheduler;
  constexpr int kNumMathWG = math_warpgroups<P>();
  constexpr bool kSwapAB = swap_ab_of<P>(0);
  constexpr bool kGatherA = gather_a_of<P>(0);

  constexpr int kAcc = kBlockN / 2;  // accumulator registers per thread
  constexpr int kPart = kPartN / 2;  // partial-product registers per thread
  // Whether a tile's columns may cross a 128-column scale block (then 2 sb values per K block).
  constexpr bool kMayStraddle = !kColumnScales && 128 % kBlockN != 0;
  // Two partial-product register sets beside the accumulator fit the register budget up to
  // kBlockN = 128 (3 x 64 + ~30 registers).
  // NOTE: with one math warpgroup in a 2-CTA cluster, ptxas serialised every wgmma of the
  // double-buffered loop (C7518: a compiler-inserted wait in a divergent path; every width,
  // A or B multicast, nvcc 13.0). Those tiles are the small-M, memory-bound ones: single buffer.
  constexpr bool kDoubleBuffer = P::kDoubleBuffer != 0 && kHalves == 1 && 3 * kAcc <= 192 &&
                                 !(kBlockM == 64 && P::kClusterM * P::kClusterN > 1);
  // kDoubleBuffer == 2: only every other promotion overlaps the next group (the schedule ptxas
  // gave v2 by inserting a wait). Measured equal to full overlap within noise (H100, M = 4096,
  // 2026-11-25), kept as a pinnable variant.
  constexpr bool kHalfOverlap = P::kDoubleBuffer == 2;
  constexpr bool kSkipIdle = P::kSkipIdleWarpgroup && kNumMathWG == 2;
  static_assert(kBlockM == 64 || kBlockM == 128 || (kSwapAB && kBlockM == 96),
                "one or two math warpgroups (swap AB: 64, 96 or 128 tokens on the wgmma N side)");
  static_assert((kClusterM == 1 || kClusterM == 2) && (kClusterN == 1 || kClusterN == 2) &&
                    kClusterSize <= 2, "clusters of 1 or 2 CTAs, sharing A or B");
  constexpr int kARowChunk = P::kARowChunk;
  static_assert(kARowChunk == 0 || (kClusterSize == 1 && kBlockM % kARowChunk == 0 &&
                                    kARowChunk % 8 == 0),
                "A chunks: whole 1024-byte swizzle atoms (8 rows), no cluster");
  static_assert(kColumnScales == (kTileKBlocks == 0), "per-tile K extent <=> column scales");
  // Every tile runs kTileKBlocks K blocks, or (kEmptyTiles: some have none) its own count.
  constexpr bool kFixedK = kTileKBlocks > 0 && !P::kEmptyTiles;
  static_assert(!kGatherA || (Scheduler::kMasked && kClusterSize == 1 && P::kUpRowOffset > 0 &&
                              kARowChunk == 0 && !P::kEarlyB && kFixedK && kBlockM % 32 == 0 &&
                              !kColumnScales),
                "gather: the masked fused SwiGLU GEMM; no cluster, row chunks or early B");
  constexpr int kGatherWarps = 2;  // producer warps 2-3 (warp 0: TMA, warp 1: tile scales)
  constexpr bool kDynamicTiles = dynamic_tiles_of<P>(0);
  static_assert(!kDynamicTiles || (Scheduler::kClaimable && !kColumnScales && !kGatherA &&
                                   !kSwapAB && !P::kEarlyB),
                "dynamic tiles: contiguous layouts, block scales (the scale warp claims), no "
                "gather, swap AB or early B");
  // NOTE: setmaxnreg only moves registers the CTA was launched with (384 threads x 168); asking
  // for more makes the math warpgroups' setmaxnreg.inc wait forever (seen: a hang at 48 + 232).
  using Regs = RegisterSplit<kHalves == 2>;
  static_assert(128 * Regs::kProducer + 256 * Regs::kMath <= 384 * 168, "register budget");

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  // NOTE: the 128B swizzle pattern is a function of address bits [7,10), so every A/B slot must
  // start 1024-byte aligned; the dynamic base is only guaranteed 16-byte aligned. The aligned
  // offset is the same in every CTA, as multicast needs. It is added to smem_raw (not computed
  // through an integer) so the compiler still knows the pointer is shared: through a u64 the
  // scale reads became generic LD.E on the path between a wgmma group's retirement and the
  // promotion FFMAs (SASS, 2026-12-05).
  unsigned char* smem = smem_raw + ((1024 - (ptx::smem_addr(smem_raw) & 1023)) & 1023);
  unsigned char* s_a = smem + Layout::kA;
  unsigned char* s_b = smem + Layout::kB;
  float* s_sa = reinterpret_cast<float*>(smem + Layout::kSa);
  float* s_sb = reinterpret_cast<float*>(smem + Layout::kSb);
  float* s_tile_sb = reinterpret_cast<float*>(smem + Layout::kTileSb);
  u64* full = reinterpret_cast<u64*>(smem + Layout::kBar);
  u64* empty = full + kStages;
  u64* sb_full = empty + kStages;  // [2] tile scales staged
  u64* sb_empty = sb_full + 2;     // [2] tile scales consumed
  // kDynamicTiles (tile_claim.cuh): the claimed tile index of each tile-scale buffer (-1: none
  // left), and rank 1's mailbox with its barriers
  u64* mail_full = reinterpret_cast<u64*>(smem + Layout::kClaim);
  u64* mail_empty = mail_full + 2;
  int* s_tile_idx = reinterpret_cast<int*>(mail_empty + 2);
  int* s_mail = s_tile_idx + 2;

  // NOTE: broadcast from lane 0 so the compiler knows it is warp-uniform: the wgmma
  // descriptors derived from it then stay in uniform registers (no per-issue R2UR moves).
  const int warpgroup = __shfl_sync(0xffffffff, threadIdx.x / 128, 0);
  const int tid = threadIdx.x % 128;  // thread index inside the warpgroup
  const int rank = kClusterSize > 1 ? static_cast<int>(ptx::cluster_ctarank()) : 0;

  if (threadIdx.x == kNumMathWG * 128) {
    if (ptx::dynamic_smem_bytes() < Layout::kTotal) __trap();  // host/device layout mismatch
    if constexpr (!kGatherA) ptx::prefetch_tma_desc(tma_a);
    ptx::prefetch_tma_desc(tma_b);
    ptx::prefetch_tma_desc(tma_sa);
    if constexpr (kColumnScales) ptx::prefetch_tma_desc(tma_sb);
    ptx::prefetch_tma_desc(tma_d);
    for (int s = 0; s < kStages; ++s) {
      // the producer's arrive_expect_tx (gather: and one per copying thread, cp.async's)
      ptx::mbar_init(&full[s], kGatherA ? 1 + kGatherWarps * 32 : 1);
      ptx::mbar_init(&empty[s], kClusterSize * kNumMathWG * 4);  // every math warp of the cluster
    }
    for (int b = 0; b < 2; ++b) {
      ptx::mbar_init(&sb_full[b], 32);              // every lane of the scale warp
      // every math thread of this CTA (dynamic tiles: and the TMA producer, reading the index)
      ptx::mbar_init(&sb_empty[b], kNumMathWG * 128 + (kDynamicTiles ? 1 : 0));
      if constexpr (kDynamicTiles) {
        ptx::mbar_init(&mail_full[b], 1);   // rank 1's expect_tx arrival
        ptx::mbar_init(&mail_empty[b], 1);  // rank 1's remote arrival (on rank 0)
      }
    }
    ptx::fence_barrier_init();
  }
  if constexpr (kClusterSize > 1) ptx::cluster_sync(); else __syncthreads();
  // Everything above touched only parameters and shared memory: with PDL it overlapped the
  // previous kernel; from here on (the scheduler reads m_indices / masked_m / offsets, the
  // producer loads) the previous kernel's writes must be visible.
  if constexpr (!P::kEarlyB) {
    pdl::begin();
  } else if (warpgroup != kNumMathWG || threadIdx.x / 32 % 4 != 0) {
    pdl::begin();  // all but the producer's warp 0, whose elected thread waits after its B loads
  }

  if (warpgroup == kNumMathWG) {
    // ------------------------------------------------------------------ producer warpgroup
    if constexpr (kNumMathWG == 2) ptx::setmaxnreg_dec<Regs::kProducer>();
    const int warp = tid / 32, lane = tid % 32;
    if (kGatherA && warp == 0) {
      // Gather (decode), B side: lane 0 expects each slot's gate and up boxes and A's scales (the
      // dispatch still writes the scales in the masked layout) and loads them; the rows come from
      // the gather warps below.
      if constexpr (kGatherA) {
        if (lane == 0) {
          Scheduler scheduler(params, rank);
          Tile tile;
          int stage = 0;
          u32 phase = 0;
          while (scheduler.next(tile)) {
            for (int kb = 0; kb < kTileKBlocks; ++kb) {
              ptx::mbar_wait_idle(&empty[stage], phase ^ 1);
              const int k = (tile.k_block0 + kb) * 128;
              ptx::mbar_arrive_expect_tx(&full[stage], Layout::kBBytes + Layout::kSaBytes);
              constexpr int kBoxRows = kBlockN / 2;
              for (int h = 0; h < 2; ++h)
                ptx::tma_load_2d(s_b + stage * Layout::kBBytes + h * kBoxRows * 128, tma_b,
                                 &full[stage], k, tile.b_row + h * P::kUpRowOffset);
              ptx::tma_load_2d(s_sa + stage * kBlockM, tma_sa, &full[stage], tile.sa_m,
                               tile.sa_k + kb);
              if (++stage == kStages) stage = 0, phase ^= 1;
            }
          }
        }
      }
    } else if (kGatherA && warp >= 4 - kGatherWarps) {
      // Gather, A side: row r of a slot is the 128 bytes at column k of token g_row_token[m_row +
      // r] in the token matrix (rows of K bytes), for r below rows_valid (the others keep stale
      // data: their outputs are never written; masked tiles start at K block 0). One TMA box per
      // row, issued by one warp, cost the 256-token decode step 324 us (H200, 2026-12-06);
      // cp.async issues from 64 threads: thread t copies 16-byte unit u = t % 8 of rows t / 8,
      // t / 8 + 8, ..., into unit u ^ (r % 8) of the row (the 128B swizzle, a function of the
      // shared address: experiments/tma_row_gather; r % 8 is the thread's constant). Each thread's
      // arrival on the slot's full barrier is issued by the hardware once its copies have landed
      // (cp.async.mbarrier.arrive.noinc), so the copies run as far ahead as the ring allows: a
      // first version that waited for them itself, one slot late, lost 9 us at 256 tokens (H100).
      // The math side fences the proxies after its wait (wgmma reads through the async proxy).
      if constexpr (kGatherA) {
        const int t = tid - (4 - kGatherWarps) * 32;
        const int unit = t % 8, row0 = t / 8;
        const int dst_unit = (unit ^ (row0 % 8)) * 16;
        Scheduler scheduler(params, rank);
        Tile tile;
        int stage = 0;
        u32 phase = 0;
        while (scheduler.next(tile)) {
          const int rows = min(tile.rows_valid, kBlockM);
          const long long* tokens = g_row_token + tile.m_row;
          // 32-bit offsets into x (the host checks T * K < 2^32): a 64-bit address per row spilled
          // the 40-register producer of the 128-row instance
          for (unsigned column = unit * 16; column < kTileKBlocks * 128; column += 128) {
            ptx::mbar_wait_idle(&empty[stage], phase ^ 1);
            unsigned char* dst = s_a + stage * Layout::kABytes + dst_unit;
            for (int r = row0; r < rows; r += 8)
              ptx::cp_async_16(dst + r * 128,
                               g_gather_x + (static_cast<unsigned>(__ldg(tokens + r)) *
                                                 (kTileKBlocks * 128u) + column));
            ptx::cp_async_mbar_arrive_noinc(&full[stage]);
            if (++stage == kStages) stage = 0, phase ^= 1;
          }
        }
      }
    } else if (warp == 0 && ptx::elect_one()) {
      Scheduler scheduler(params, rank);
      Tile tile;
      int stage = 0;
      u32 phase = 0;
      MOE_FP8_TRACE(int trace_tile = 0;)
      // A chunks holding valid rows (kARowChunk > 0; masked and dense tiles have rows_valid >= 1)
      constexpr int kChunkRows = kARowChunk > 0 ? kARowChunk : 1;
      auto a_chunks_of = [](const Tile& t) {
        return kARowChunk == 0 ? 1 :
            min(kBlockM / kChunkRows, (t.rows_valid + kChunkRows - 1) / kChunkRows);
      };
      // bytes a slot of tile t expects: its A chunks, B and the scales
      auto stage_tx_of = [](int a_chunks) -> u32 {
        return kARowChunk == 0 ? Layout::kStageTxBytes :
            Layout::kStageTxBytes - Layout::kABytes + a_chunks * kARowChunk * 128;
      };
      // kDynamicTiles: the tiles the scale warp claimed, read beside their scales
      int feed_buf = 0;
      u32 feed_phase = 0;
      auto next_tile = [&](Tile& t) -> bool {
        if constexpr (kDynamicTiles) {
          ptx::mbar_wait_idle(&sb_full[feed_buf], feed_phase);
          const int idx = s_tile_idx[feed_buf];
          ptx::mbar_arrive(&sb_empty[feed_buf]);
          if (++feed_buf == 2) feed_buf = 0, feed_phase ^= 1;
          return idx >= 0 && scheduler.get(idx, t) == TileStatus::kReady;
        } else {
          return scheduler.next(t);
        }
      };
      int early_b = 0;  // kEarlyB: slots [0, early_b) already expect their bytes and hold B
      if constexpr (P::kEarlyB) {
        // The first kStages slots (the same tile sequence as `scheduler`, walked by a copy that
        // reads masked_m through L2): expect each slot's bytes and load its B now; A and sa
        // follow after the wait.
        typename Scheduler::Coherent first(params, rank);
        Tile t;
        MOE_FP8_TRACE(int trace_first = 0;)
        while (early_b < kStages && first.next(t)) {
          MOE_FP8_TRACE(trace::record(trace_first++, 6, trace::now());)
          const u32 tx = stage_tx_of(a_chunks_of(t));
          const int n_kb = kFixedK ? kTileKBlocks : t.num_k_blocks;
          for (int kb = 0; kb < n_kb && early_b < kStages; ++kb, ++early_b) {
            ptx::mbar_arrive_expect_tx(&full[early_b], tx);
            ptx::tma_load_2d(s_b + early_b * Layout::kBBytes, tma_b, &full[early_b],
                             (t.k_block0 + kb) * 128, t.b_row);
          }
        }
        pdl::begin();
      }
      while (next_tile(tile)) {
        const int num_kb = kFixedK ? kTileKBlocks : tile.num_k_blocks;
        const int a_chunks = a_chunks_of(tile);
        // kSplitPairs: a padding half of a contiguous pair loads only its B half for the peer
        const bool load_a = !Scheduler::kSplitPairs || tile.rows_valid > 0;
        const u32 stage_tx = load_a ? stage_tx_of(a_chunks) : u32(Layout::kBBytes);
        for (int kb = 0; kb < num_kb; ++kb) {
          // kEarlyB: the first kStages slots were claimed (and their B loaded) before the wait
          const bool b_loaded = P::kEarlyB && early_b > 0;
          if (!b_loaded) {
            ptx::mbar_wait_idle(&empty[stage], phase ^ 1);  // slot released by every math warp
            MOE_FP8_TRACE(if (kb == 0) trace::record(trace_tile, 6, trace::now());)
            // The full A and B tiles are expected even when half of one comes from the peer's
            // multicast.
            ptx::mbar_arrive_expect_tx(&full[stage], stage_tx);
          }
          const int k = (tile.k_block0 + kb) * 128;
          // NOTE: A and B spelled out alike on purpose: a shared helper (tried 2026-12-05)
          // reordered ptxas's schedule of the math warps' FFMAs in every GEMM instance, and the
          // measured v4c SASS is kept bit for bit until a GPU run can time such a change.
          if (!load_a) {
          } else if constexpr (kARowChunk > 0) {
            for (int c = 0; c < a_chunks; ++c)
              ptx::tma_load_2d(s_a + stage * Layout::kABytes + c * kARowChunk * 128, tma_a,
                               &full[stage], k, tile.m_row + c * kARowChunk);
          } else if constexpr (kClusterN == 1) {
            ptx::tma_load_2d(s_a + stage * Layout::kABytes, tma_a, &full[stage], k, tile.m_row);
          } else {
            constexpr int kHalfRows = kBlockM / kClusterN;
            ptx::tma_load_2d_multicast(s_a + stage * Layout::kABytes + rank * kHalfRows * 128,
                                       tma_a, &full[stage], k, tile.m_row + rank * kHalfRows,
                                       (1 << kClusterN) - 1);
          }
          if (b_loaded) {
            --early_b;
          } else if constexpr (kClusterM == 1 && P::kUpRowOffset == 0) {
            ptx::tma_load_2d(s_b + stage * Layout::kBBytes, tma_b, &full[stage], k, tile.b_row);
          } else {
            // Two boxes of kBlockN / 2 rows, kBoxStride rows apart in B: the halves of a
            // multicast pair's tile, or (paired halves) the gate and the up block. Shared by the
            // pair: box `rank` from each CTA, multicast to both; else both boxes, locally.
            constexpr int kBoxRows = kBlockN / 2;
            constexpr int kBoxStride = P::kUpRowOffset > 0 ? P::kUpRowOffset : kBoxRows;
            if (kClusterM > 1 && (!Scheduler::kSplitPairs || tile.b_shared)) {
              ptx::tma_load_2d_multicast(s_b + stage * Layout::kBBytes + rank * kBoxRows * 128,
                                         tma_b, &full[stage], k, tile.b_row + rank * kBoxStride,
                                         (1 << kClusterM) - 1);
            } else {
              for (int h = 0; h < 2; ++h)
                ptx::tma_load_2d(s_b + stage * Layout::kBBytes + h * kBoxRows * 128, tma_b,
                                 &full[stage], k, tile.b_row + h * kBoxStride);
            }
          }
          if (load_a)
            ptx::tma_load_2d(s_sa + stage * kBlockM, tma_sa, &full[stage], tile.sa_m,
                             tile.sa_k + kb);
          if constexpr (kColumnScales)
            ptx::tma_load_2d(s_sb + stage * kBlockN, tma_sb, &full[stage], tile.n0,
                             tile.sa_k + kb);
          if (++stage == kStages) stage = 0, phase ^= 1;
        }
        MOE_FP8_TRACE(trace::record(trace_tile++, 7, trace::now());)
      }
    } else if (!kColumnScales && warp == 1) {
      // NOTE: staging these in the math warpgroups (v2) exposed one global-load round trip per
      // tile with the tensor cores idle (~0.5-1 us, 5-10 % of a K = 2048 tile).
      Scheduler scheduler(params, rank);
      Tile tile;
      int buf = 0;
      u32 phase = 0;
      // kDynamicTiles: claim a tile once a buffer is free (skipping padding pairs); with none
      // left, publish -1 in that buffer and (rank 0) count the cluster done
      TileClaim<kClusterSize> claim(params.g_tile_counter, s_mail, mail_full, mail_empty, rank);
      int claimed = -1;
      auto next_tile = [&](Tile& t) -> bool {
        if constexpr (kDynamicTiles) {
          ptx::mbar_wait_idle(&sb_empty[buf], phase ^ 1);
          while (true) {
            claimed = claim.next();
            const TileStatus status = scheduler.get(claimed, t);
            if (status == TileStatus::kReady) return true;
            if (status == TileStatus::kDone) break;
          }
          if (lane == 0) {
            s_tile_idx[buf] = -1;
            if (rank == 0) claim.finish();
          }
          ptx::mbar_arrive(&sb_full[buf]);
          return false;
        } else {
          return scheduler.next(t);
        }
      };
      while (next_tile(tile)) {
        // NOTE: every lane waits here and every math thread arrives (not lane 0 after a
        // __syncwarp): racecheck reported the scale warp's writes against the math warps' reads
        // of the buffer's previous use wherever a CTA walks more than two tiles (128 x 64 to
        // 128 x 256, H100 2026-12-05); per-thread arrive / wait makes the order explicit to it.
        if constexpr (!kDynamicTiles) ptx::mbar_wait_idle(&sb_empty[buf], phase ^ 1);
        // The tile's K blocks of its sb row, then the same K blocks of the next row (a tile
        // straddling two scale blocks). Split K: both are slices of rows kRowStride apart; without
        // it the two runs are contiguous (kRowStride == kTileKBlocks, one run of 2 x kTileKBlocks).
        // Paired halves: the second run is the up block's row, N / 256 rows further.
        constexpr int kRowStride = Scheduler::kNumKBlocks;
        constexpr int kNextRow = P::kUpRowOffset > 0 ? P::kUpRowOffset / 128 : 1;
        const float* g_sb = params.g_sb + long(tile.sb_row) * kRowStride + tile.k_block0;
        const bool has_next_block = kMayStraddle && tile.sb_row + kNextRow < tile.sb_rows_end;
        float* s_dst = s_tile_sb + buf * 2 * kTileKBlocks;
        for (int i = lane; i < 2 * kTileKBlocks; i += 32) {
          const int offset = (kNextRow * kRowStride == kTileKBlocks || i < kTileKBlocks)
                                 ? i : kNextRow * kRowStride + i - kTileKBlocks;
          s_dst[i] = (i < kTileKBlocks || has_next_block) ? __ldg(g_sb + offset) : 0.f;
        }
        if (kDynamicTiles && lane == 0) s_tile_idx[buf] = claimed;
        ptx::mbar_arrive(&sb_full[buf]);
        if (++buf == 2) buf = 0, phase ^= 1;
      }
    }
    if constexpr (kClusterSize > 1) {
      // A peer may still multicast into this CTA or arrive on its barriers until it is done.
      __syncwarp();
      ptx::cluster_sync();
    }
  } else if constexpr (kSwapAB) {
    // ------------------------------------------------------------------ math warpgroups, swap AB
    ptx::setmaxnreg_inc<Regs::kMath>();
    swap_ab_math<P>(s_a, s_b, s_sa, s_tile_sb, full, empty, sb_full, sb_empty, smem + Layout::kD,
                    params, warpgroup, tid);
  } else {
    // ------------------------------------------------------------------ math warpgroups
    // NOTE: with one math warpgroup the launch bound already grants 255 registers.
    if constexpr (kNumMathWG == 2) ptx::setmaxnreg_inc<Regs::kMath>();
    const int warp = tid / 32, lane = tid % 32;
    const int bar_id = 1 + warpgroup;  // named barrier private to this warpgroup
    unsigned char* s_d_wg = smem + Layout::kD + warpgroup * P::Epilogue::kBytes;
    // Rows of this thread inside the tile: lane/4 and lane/4 + 8 of the warp's 16-row slab.
    const int row_lo = warpgroup * 64 + warp * 16 + lane / 4;
    float r_acc[kAcc], r_p0[kPart], r_p1[kDoubleBuffer ? kPart : 1];
    float r_f0[4], r_f1[4];  // promotion factors of the K blocks in r_p0 / r_p1 (see issue)

    // NOTE: descriptors of slot 0, advanced by whole slots (the start-address field is addr >> 4
    // and every slot ends below 256 KB, so the add never carries out of it). Rebuilding them from
    // the address per K block cost ~30 vector-pipe instructions + R2UR on the path between a
    // group's retirement and the next issue (SASS, 2026-11-25).
    const u32 desc_a0 = ptx::desc_k128_sw128_lo(s_a + warpgroup * 64 * 128);
    const u32 desc_b0 = ptx::desc_k128_sw128_lo(s_b);
    Scheduler scheduler(params, rank);
    Tile tile, next_tile;
    int stage_in = 0, stage_out = 0;  // next slot to compute on / to release
    u32 phase_in = 0, phase_out = 0;
    int sb_buf = 0;
    u32 sb_phase = 0;
    // The tile whose K blocks are being issued: its weight scales, and the columns [0,
    // first_cols) that use scale block n0/128 (the rest use block n0/128 + 1).
    const float* s_sb_tile = s_tile_sb;
    int first_cols = kBlockN;
    bool idle = false;  // kSkipIdle: this warpgroup's rows of the tile are all past rows_valid
    MOE_FP8_TRACE(int trace_begun = 0, trace_done = 0;)  // tiles begun / written by this CTA
    auto begin_tile = [&](const Tile& t) {
      MOE_FP8_TRACE(if (threadIdx.x == 0) {
        trace::record_tile(trace_begun, t);
        trace::record(trace_begun++, 2, trace::now());
      })
      s_sb_tile = s_tile_sb + sb_buf * 2 * kTileKBlocks;
      if constexpr (kSkipIdle) idle = t.rows_valid <= warpgroup * 64;
      if constexpr (!kColumnScales) ptx::mbar_wait(&sb_full[sb_buf], sb_phase);
      first_cols = kMayStraddle ? min(kBlockN, 128 - t.n0 % 128) : kBlockN;
    };

    // Partial product of K block kb on the tensor cores, into fresh registers `p`; with block
    // scales, also the promotion factors of kb into `f` (sa x sb for the thread's two rows and
    // the tile's two column blocks), so their shared-memory reads are off the path between the
    // group's retirement and the promotion FFMAs (they stalled the first FMUL, ncu 2026-12-05).
    auto issue = [&](float(&p)[kPart], float(&f)[4], int kb, int half = 0) {
      const u32 desc_a = desc_a0 + static_cast<u32>(stage_in * (Layout::kABytes >> 4));
      const u32 desc_b = desc_b0 + static_cast<u32>(stage_in * (Layout::kBBytes >> 4) +
                                                    half * (kPartN * 128 >> 4));
      if (half == 0) {
        ptx::mbar_wait(&full[stage_in], phase_in);
        // the gather warps' rows of A (cp.async, generic proxy) before wgmma reads them; a 256-wide
        // tile's second half reads the same slot (fencing there too: the same time, H100
        // 2026-12-06, decode 1-256 tokens within +-1.7 us)
        if constexpr (kGatherA) ptx::fence_proxy_async_smem();
      }
      MOE_FP8_TRACE(if (threadIdx.x == 0 && kb == 0 && half == 0)
                        trace::record(trace_begun - 1, 3, trace::now());)
      ptx::fence_regs(p);
      ptx::wgmma_fence();
      if (!kSkipIdle || !idle) {
#pragma unroll
        for (int k = 0; k < 4; ++k)
          Mma::mma(desc_a + k * ptx::kDescKStep, desc_b + k * ptx::kDescKStep, p, k > 0);
      }
      ptx::wgmma_commit();
      // NOTE: without a fence after the commit ptxas moved the last (committing) wgmma of the
      // group behind ~60 promotion FFMAs of the previous K block (SASS, 2026-12-05); the fence
      // keeps the commit ahead of them (ablation `nofence` in benchmarks/ab_variants.py).
      ptx::wgmma_fence();
      if (!kColumnScales && half == 0) {  // a 256-wide tile's halves share one K block's scales
        const float* s_sa_stage = s_sa + stage_in * kBlockM;
        const float sa_lo = s_sa_stage[row_lo], sa_hi = s_sa_stage[row_lo + 8];
        const float sb_0 = s_sb_tile[kb];
        const float sb_1 = kMayStraddle ? s_sb_tile[kTileKBlocks + kb] : 0.f;
        f[0] = sa_lo * sb_0, f[1] = sa_hi * sb_0, f[2] = sa_lo * sb_1, f[3] = sa_hi * sb_1;
      }
      if (half < kHalves - 1) return;  // the slot serves the next half too
      if (++stage_in == kStages) stage_in = 0, phase_in ^= 1;
    };
    // Lane r < kClusterSize of every warp frees the slot in CTA r (its multicast peer included).
    auto release = [&]() {
      __syncwarp();  // every lane has read its scales before the slot is handed back
      if constexpr (kClusterSize == 1) {
        if (lane == 0) ptx::mbar_arrive(&empty[stage_out]);
      } else {
        if (lane < kClusterSize) ptx::mbar_arrive_cluster(&empty[stage_out], lane);
      }
      if (++stage_out == kStages) stage_out = 0, phase_out ^= 1;
    };
    // Once the wgmma group of K block kb has retired (caller waited): release its slot and
    // promote, acc += p * sa[row] * sb[col], one FFMA per element on CUDA cores.
    auto retire = [&](float(&p)[kPart], const float(&f)[4], int half = 0) {
      ptx::fence_regs(p);
      if constexpr (kColumnScales) {
        // Columns [kPartN h, kPartN h + kPartN) of the slot's column scales (h: the half of a
        // 256-wide tile, else 0), a thread's columns 8j + 2 (lane % 4) + {0, 1}: one 8-byte load
        // of sb per j. The slot is handed back once the last half has read them.
        const float* s_sa_stage = s_sa + stage_out * kBlockM;
        const float sa_lo = s_sa_stage[row_lo], sa_hi = s_sa_stage[row_lo + 8];
        const float* s_sb_stage = s_sb + stage_out * kBlockN + half * kPartN + 2 * (lane % 4);
        float* acc = r_acc + half * kPart;
#pragma unroll
        for (int j = 0; j < kPartN / 8; ++j) {
          const float2 sb = *reinterpret_cast<const float2*>(s_sb_stage + 8 * j);
          acc[4 * j + 0] += p[4 * j + 0] * (sa_lo * sb.x);
          acc[4 * j + 1] += p[4 * j + 1] * (sa_lo * sb.y);
          acc[4 * j + 2] += p[4 * j + 2] * (sa_hi * sb.x);
          acc[4 * j + 3] += p[4 * j + 3] * (sa_hi * sb.y);
        }
        if (half == kHalves - 1) release();
      } else if constexpr (kHalves == 2) {
        // Half h covers columns [128 h, 128 h + 128): scale block n0/128 + h (n0 % 256 == 0).
        if (half == kHalves - 1) release();
        const float scale_lo = half == 0 ? f[0] : f[2], scale_hi = half == 0 ? f[1] : f[3];
        float* acc = r_acc + half * kPart;
#pragma unroll
        for (int j = 0; j < kPartN / 8; ++j) {
          acc[4 * j + 0] += p[4 * j + 0] * scale_lo;
          acc[4 * j + 1] += p[4 * j + 1] * scale_lo;
          acc[4 * j + 2] += p[4 * j + 2] * scale_hi;
          acc[4 * j + 3] += p[4 * j + 3] * scale_hi;
        }
      } else if constexpr (kMayStraddle) {
        release();
        promote_straddling<kBlockN / 8, gcd_int(kBlockN, 128) / 8>(first_cols / 8, r_acc, p, f);
      } else {
        release();
        // NOTE: spelled out (not promote_two_blocks): the helper moved ptxas's FFMA schedule in
        // the measured masked instances (SASS, 2026-12-05); this keeps it bit for bit.
        const float s00 = f[0], s10 = f[1];
#pragma unroll
        for (int j = 0; j < kBlockN / 8; ++j) {
          r_acc[4 * j + 0] += p[4 * j + 0] * s00;
          r_acc[4 * j + 1] += p[4 * j + 1] * s00;
          r_acc[4 * j + 2] += p[4 * j + 2] * s10;
          r_acc[4 * j + 3] += p[4 * j + 3] * s10;
        }
      }
    };

    // kDynamicTiles: the tile the scale warp claimed for the current buffer (begin_tile waits
    // on the same phase again: a completed phase, so at once)
    auto next_tile_of = [&](Tile& t) -> bool {
      if constexpr (kDynamicTiles) {
        ptx::mbar_wait(&sb_full[sb_buf], sb_phase);
        const int idx = s_tile_idx[sb_buf];
        return idx >= 0 && scheduler.get(idx, t) == TileStatus::kReady;
      } else {
        return scheduler.next(t);
      }
    };

    // NOTE (lookahead): with double buffering, K block 0 of the next tile is queued on the tensor
    // cores before this tile's epilogue, so the stores overlap MMAs instead of leaving the tensor
    // cores idle between tiles (per-tile overhead, ~10 % of a K = 2048 tile, 2026-12-05).
    bool have_tile = next_tile_of(tile);
    if (have_tile) {
      begin_tile(tile);
      if constexpr (kDoubleBuffer) {
        if (!P::kEmptyTiles || tile.num_k_blocks > 0) issue(r_p0, r_f0, 0);
      }
    }
    while (have_tile) {
      const int num_kb = kFixedK ? kTileKBlocks : tile.num_k_blocks;
#pragma unroll
      for (int i = 0; i < kAcc; ++i) r_acc[i] = 0.f;
      if constexpr (kDoubleBuffer) {
        // K block kb+1 is queued on the tensor cores before kb is promoted, so the FFMAs of
        // the promotion overlap the next MMAs instead of leaving the tensor cores idle. K block
        // 0 is already queued (before the loop, or by the previous tile's lookahead).
        // NOTE: each group is retired (wait 0) before the next is issued: with "issue kb+1,
        // wait 1, promote kb" ptxas could not prove the two register sets apart and serialised
        // every wgmma (C7514).
        // The guards of an odd count are left out where K is even at compile time (ptxas kept
        // them as branches next to the wgmma issue).
        constexpr bool kEvenK = kTileKBlocks > 0 && kTileKBlocks % 2 == 0;
        for (int kb = 0; kb < num_kb; kb += 2) {
          ptx::wgmma_wait<0>();
          if (kEvenK || kb + 1 < num_kb) issue(r_p1, r_f1, kb + 1);
          retire(r_p0, r_f0);
          if (kEvenK || kb + 1 < num_kb) {
            ptx::wgmma_wait<0>();
            if (kb + 2 < num_kb) {
              issue(r_p0, r_f0, kb + 2);
              if constexpr (kHalfOverlap) ptx::wgmma_wait<0>();
            }
            retire(r_p1, r_f1);
          }
        }
      } else {
        for (int kb = 0; kb < num_kb; ++kb) {
#pragma unroll
          for (int half = 0; half < kHalves; ++half) {
            issue(r_p0, r_f0, kb, half);
            ptx::wgmma_wait<0>();
            retire(r_p0, r_f0, half);
          }
        }
      }
      // NOTE: every group has retired here; saying so keeps ptxas from inserting its own wait
      // where the next group first touches the partials (inside a divergent path: C7518, every
      // wgmma serialised).
      ptx::wgmma_wait<0>();
      MOE_FP8_TRACE(if (threadIdx.x == 0) trace::record(trace_done, 4, trace::now());)
      if constexpr (!kColumnScales) {
        ptx::mbar_arrive(&sb_empty[sb_buf]);  // every thread: see the scale warp's NOTE
        if (++sb_buf == 2) sb_buf = 0, sb_phase ^= 1;
      }
      have_tile = next_tile_of(next_tile);
      if (have_tile) {
        begin_tile(next_tile);
        if constexpr (kDoubleBuffer) {
          if (!P::kEmptyTiles || next_tile.num_k_blocks > 0) issue(r_p0, r_f0, 0);
        }
      }
      P::Epilogue::write_tile(r_acc, s_d_wg, tma_d, tile, params, warpgroup, tid, bar_id);
      MOE_FP8_TRACE(if (threadIdx.x == 0) trace::record(trace_done++, 5, trace::now());)
      tile = next_tile;
    }
    if (tid == 0) ptx::tma_store_wait_all();
    if constexpr (kClusterSize > 1) ptx::cluster_sync();
  }
}

}  // namespace moe_fp8
