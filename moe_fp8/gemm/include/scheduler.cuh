// Persistent tile scheduler for the FP8 GEMM family.
//
// Every CTA walks linear tile indices (its cluster's index, + the number of clusters, ...) and a
// small layout policy turns each index into one output tile and the coordinates of its operands
// in the 2-D TMA views. The mainloop and the epilogues never see which layout they serve:
//
//   dense       A [M, K],         B [N, K],       D [M, N]
//   contiguous  A [M_sum, K],     B [E*N, K],     D [M_sum, N]    m_indices [M_sum] (-1: padding)
//   contiguous, zero padding: the same; padding rows are written as zeros (so D may start
//               uninitialised): an all-padding tile runs with no K block (no loads, no MMA)
//   contiguous, offsets form: the same, with offsets [E+1] (expert e owns rows [offsets[e],
//               offsets[e+1]), every entry a multiple of 128; rows >= offsets[E] are padding)
//   masked      A [E*M_max, K],   B [E*N, K],     D [E*M_max, N]  masked_m [E]
//   k-grouped   A [M, T],         B [N, T],       D [E, M, N] fp32 (+=)   offsets [E+1] (tokens)
//               (weight gradient: the reduction runs over expert e's token blocks only)
//
// Activation scales are viewed as 2-D [outer = (E*)K/128, inner = M (or M_max)] (MN-major),
// weight scales as [E*ceil(N/128), K/128]; k-grouped: both scales [T/128, M] and [T/128, N].
//
// Clusters of kClusterM CTAs (dense, k-grouped, contiguous) take kClusterM vertically adjacent
// tiles that share one column block, so B can be multicast: a linear index names a tile pair, the
// CTA's rank in the cluster picks the row block. A pair past the last row block computes on
// zero-filled operands and writes nothing (rows_valid <= 0), so both CTAs always see the same
// tile count. Contiguous pairs (kSplitPairs): two row blocks of different experts each load
// their own whole B (b_shared = false); a padding half (or one past M) takes its peer's expert
// and loads its B half for it, but no A (rows_valid = 0: nothing written; zero padding keeps its
// rows, written as zeros); its MMAs still run, on stale A, to keep the pair in lockstep (in the
// layer's layouts only the pair that ends the valid rows); a pair of two padding blocks is
// skipped (zero padding: no K block).
// Clusters of kClusterN CTAs (NT layouts) take horizontally adjacent tiles that share one row
// block, so A can be multicast: the rank picks the column block. The column blocks must pair up
// exactly (kNumNBlocks % kClusterN == 0: no phantom column block, whose B rows would belong to
// the next expert); both CTAs of a pair see the same rows, hence the same expert and skips.
// Split K (dense only, kSplitK > 1): every output tile is computed kSplitK times, once per
// slice of kK / 128 / kSplitK K blocks; linear index = split * tiles + tile, so the splits of one
// tile run in different waves' positions of the same grid, and the tile's `expert` field carries
// the split (the fp32 epilogue writes slice `split` of the [kSplitK, M, N] workspace).
#pragma once

#include "ptx.cuh"

namespace moe_fp8 {

enum GemmLayout : int {
  kLayoutDense = 0, kLayoutContiguous = 1, kLayoutMasked = 2, kLayoutKGrouped = 3,
  kLayoutContiguousOffsets = 4, kLayoutContiguousZeroPad = 5
};

// The m_indices forms of the contiguous layout: padding rows skipped, or written as zeros.
__host__ __device__ constexpr bool is_m_indices_layout(int layout) {
  return layout == kLayoutContiguous || layout == kLayoutContiguousZeroPad;
}

// Runtime arguments shared by the producer and the math warpgroups (by value, in param space).
struct GemmParams {
  int m;               // dense: M; contiguous: M_sum; masked: M_max; k-grouped: rows of D[e]
  int num_experts;     // grouped layouts; 1 for dense
  const int* g_layout; // contiguous: m_indices [M_sum] or offsets [E+1]; masked: masked_m [E];
                       // k-grouped: offsets [E+1] (tokens)
  const float* g_sb;   // weight scales [E * ceil(N/128), K/128] fp32 (k-grouped: unused)
  void* g_d;           // bf16 output, for the predicated (partially masked) store path
  float* g_ds = nullptr;  // fused SwiGLU: the fp8 output's 1x128 scales (fused_swiglu.cuh)
  long long ds_batch = 0, ds_group = 0;  // their strides per expert / per 128-column block
  int* g_tile_counter = nullptr;  // dynamic tiles: the claim counter [2] (tile_claim.cuh)
};

// One output tile of kBlockM x kBlockN and where its operands live.
struct Tile {
  int m_row;        // first row of the tile in the 2-D views of A (and D, except k-grouped)
  int sa_m;         // first row in the scale view's inner (M) dimension
  int sa_k;         // the scale views' outer coordinate of the tile's first K block
  int k_block0;     // first K block: A and B are read at K = (k_block0 + kb) * 128
  int num_k_blocks; // K blocks of this tile (k-grouped: the expert's token blocks)
  int n0;           // first output column
  int b_row;        // first row of the tile's B in the [E*N, K] view
  int sb_row;       // row of the sb view holding column block n0 / 128
  int sb_rows_end;  // one past the last sb row of this expert (guards the straddling block)
  int rows_valid;   // rows of the tile that may be written, counted from m_row
  int expert;       // k-grouped: D's expert coordinate
  bool b_shared = true;  // kSplitPairs: both row blocks of the pair read this B (multicast)
};

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Linear index inside one [num_m x kNumNBlocks] problem -> (m block, n block). Runs of kGroupN
// n blocks are swept for every m block before moving on, so the CTAs resident at one time share
// a band of B (kGroupN * kBlockN rows) and a few m blocks of A in L2.
template <int kNumNBlocks, int kGroupN>
__device__ __forceinline__ void raster(int idx, int num_m, int& mb, int& nb) {
  const int tiles_per_group = num_m * kGroupN;
  const int group = idx / tiles_per_group;
  const int first_n = group * kGroupN;
  const int n_in_group = min(kGroupN, kNumNBlocks - first_n);
  const int r = idx - group * tiles_per_group;
  mb = r / n_in_group;
  nb = first_n + r - mb * n_in_group;
}

enum class TileStatus { kDone, kSkip, kReady };

// kEmptyTiles: work without K blocks still yields its tiles, with num_k_blocks = 0, so that the
// epilogue writes their zeros (else they are skipped): an expert without tokens (k-grouped,
// overwriting D), an all-padding row block (kLayoutContiguousZeroPad).
// kPairedHalves (masked or contiguous with m_indices, kBlockN = 256, fused SwiGLU): tile t of an
// expert pairs B's gate block t (rows 128 t) with its up block t (rows kN / 2 + 128 t) as the
// tile's two 128-column halves; n0 = 128 t is the tile's first column of the kN / 2 wide product.
// kCoherentCounts: masked_m read through L2 (ld.global.cg) instead of the read-only L1 path,
// for a reader that runs before its PDL wait (gemm_core.cuh kEarlyB): the counts were written
// kernels before, so L2 holds them, but this SM's L1 may still hold an older replay's.
template <int kLayout, int kN, int kK, int kBlockM, int kBlockN, int kGroupN, int kClusterM = 1,
          int kClusterN = 1, int kSplitK = 1, bool kEmptyTiles = false, bool kPairedHalves = false,
          bool kCoherentCounts = false>
struct TileScheduler {
  // The same tile sequence, its counts read through L2.
  using Coherent = TileScheduler<kLayout, kN, kK, kBlockM, kBlockN, kGroupN, kClusterM, kClusterN,
                                 kSplitK, kEmptyTiles, kPairedHalves, true>;
  static_assert(!kPairedHalves || ((kLayout == kLayoutMasked || kLayout == kLayoutContiguous) &&
                                   kBlockN == 256 && kN % 256 == 0 && kClusterN == 1 &&
                                   (kClusterM == 1 || kLayout == kLayoutContiguous)),
                "paired halves: masked or m_indices layout, 256-wide tiles, N / 2 in 128-column "
                "blocks; B multicast pairs of row blocks on the m_indices layout only");
  static_assert(kClusterM == 1 || kLayout != kLayoutMasked,
                "B-multicast pairs: dense, k-grouped or contiguous layouts");
  // Contiguous B-multicast pairs: the two row blocks may belong to different experts (each then
  // loads its whole B) or one may be padding (it loads its B half for the peer, no A).
  static constexpr bool kSplitPairs =
      kClusterM > 1 && kLayout != kLayoutDense && kLayout != kLayoutKGrouped;
  static constexpr int kClusterSize = kClusterM * kClusterN;
  static constexpr int kNumNBlocks = ceil_div(kN, kBlockN);
  static_assert(kClusterN == 1 || (kLayout != kLayoutKGrouped && kNumNBlocks % kClusterN == 0),
                "A-multicast pairs: NT layouts whose column blocks pair up exactly");
  static constexpr int kNumNUnits = kNumNBlocks / kClusterN;  // column blocks, or pairs of them
  static constexpr int kGroupNUnits = kGroupN / kClusterN > 0 ? kGroupN / kClusterN : 1;
  static constexpr int kNumKBlocks = kK / 128;  // 0 for k-grouped (per expert, at run time)
  static_assert(kEmptyTiles == (kLayout == kLayoutContiguousZeroPad) || kLayout == kLayoutKGrouped,
                "empty tiles: k-grouped (either way) or the zero-padding layout (always)");
  static_assert(kSplitK == 1 || (kLayout == kLayoutDense && kClusterM * kClusterN == 1 &&
                                  kNumKBlocks % kSplitK == 0),
                "split K: dense layout, no cluster, K blocks divisible by the splits");
  static constexpr int kSplitKBlocks = kNumKBlocks / kSplitK;  // K blocks per split
  static constexpr int kSbRowsPerExpert = ceil_div(kN, 128);
  static constexpr bool kMasked = kLayout == kLayoutMasked;
  // get() of these layouts depends on the index alone (the masked walk keeps state: it needs
  // increasing indices), so tiles may be claimed in any order (tile_claim.cuh)
  static constexpr bool kClaimable = kLayout == kLayoutContiguous ||
                                     kLayout == kLayoutContiguousZeroPad ||
                                     kLayout == kLayoutContiguousOffsets;

  const GemmParams& params;
  const int rank_m;  // the row block inside a B-multicast pair (kClusterM > 1), else 0
  const int rank_n;  // the column block inside an A-multicast pair (kClusterN > 1), else 0
  int next_idx;
  // masked layout: the expert holding next_idx and the first linear index of that expert
  int expert = 0;
  int expert_base = 0;

  __device__ TileScheduler(const GemmParams& p, int cta_rank)
      : params(p), rank_m(kClusterM > 1 ? cta_rank : 0), rank_n(kClusterN > 1 ? cta_rank : 0),
        next_idx(blockIdx.x / kClusterSize) {}

  __device__ __forceinline__ void fill_n(Tile& t, int nb, int e) const {
    if constexpr (kPairedHalves) {
      t.n0 = nb * 128;
      t.b_row = e * kN + t.n0;  // the up half: kN / 2 rows further
      t.sb_row = e * kSbRowsPerExpert + nb;
    } else {
      t.n0 = nb * kBlockN;
      t.b_row = e * kN + t.n0;
      t.sb_row = e * kSbRowsPerExpert + t.n0 / 128;
    }
    t.sb_rows_end = (e + 1) * kSbRowsPerExpert;
  }

  // Offsets form: the expert whose segment holds `row` (the last e with offsets[e] <= row, so
  // empty experts are passed over), or -1 past offsets[E]. A binary search of L1-resident
  // entries: ~log2(E) dependent loads per tile.
  __device__ __forceinline__ int expert_of_row(int row) const {
    const int* offsets = params.g_layout;
    if (row >= __ldg(offsets + params.num_experts)) return -1;
    int lo = 0, hi = params.num_experts - 1;  // offsets[lo] <= row < offsets[hi + 1]
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (__ldg(offsets + mid) <= row) lo = mid; else hi = mid - 1;
    }
    return lo;
  }

  // Contiguous forms: the expert of row block mb, or -1 (padding, or past M: a pair's second
  // half).
  __device__ __forceinline__ int expert_of_block(int mb) const {
    const int row = mb * kBlockM;
    if (row >= params.m) return -1;
    if constexpr (kLayout == kLayoutContiguousOffsets) {
      return expert_of_row(row);
    } else {
      const int e = __ldg(params.g_layout + row);
      return e < 0 || e >= params.num_experts ? -1 : e;
    }
  }

  __device__ __forceinline__ int masked_rows(int e) const {
    const int count = kCoherentCounts ? __ldcg(params.g_layout + e) : __ldg(params.g_layout + e);
    return min(max(count, 0), params.m);  // clamp untrusted device counts
  }

  __device__ TileStatus get(int idx, Tile& t) {
    t.k_block0 = 0;
    t.num_k_blocks = kNumKBlocks;
    t.expert = 0;
    if constexpr (kLayout == kLayoutMasked) {
      // Experts hold ceil(masked_m / kBlockM) * kNumNUnits tiles (or pairs) each, enumerated
      // densely so that empty experts cost nothing and every CTA gets an even share of the work.
      while (expert < params.num_experts) {
        const int tiles = ceil_div(masked_rows(expert), kBlockM) * kNumNUnits;
        if (idx < expert_base + tiles) break;
        expert_base += tiles;
        ++expert;
      }
      if (expert >= params.num_experts) return TileStatus::kDone;
      const int rows = masked_rows(expert);
      int mb, nu;
      raster<kNumNUnits, kGroupNUnits>(idx - expert_base, ceil_div(rows, kBlockM), mb, nu);
      const int nb = nu * kClusterN + rank_n;
      t.m_row = expert * params.m + mb * kBlockM;
      t.sa_m = mb * kBlockM;
      t.sa_k = expert * kNumKBlocks;
      t.rows_valid = rows - mb * kBlockM;
      fill_n(t, nb, expert);
      return TileStatus::kReady;
    } else if constexpr (kLayout == kLayoutKGrouped) {
      // Every expert owns the same grid of output tiles; an expert without tokens adds nothing,
      // so its tiles are skipped (its D[e] is not touched).
      const int pairs_m = ceil_div(ceil_div(params.m, kBlockM), kClusterM);
      const int tiles = pairs_m * kNumNBlocks;
      const int e = idx / tiles;
      if (e >= params.num_experts) return TileStatus::kDone;
      const int k_begin = __ldg(params.g_layout + e) / 128;
      const int k_end = __ldg(params.g_layout + e + 1) / 128;
      if (!kEmptyTiles && k_end <= k_begin) return TileStatus::kSkip;
      int pmb, nb;
      raster<kNumNBlocks, kGroupN>(idx - e * tiles, pairs_m, pmb, nb);
      t.m_row = (pmb * kClusterM + rank_m) * kBlockM;
      t.sa_m = t.m_row;
      t.sa_k = t.k_block0 = k_begin;
      t.num_k_blocks = kEmptyTiles ? max(k_end - k_begin, 0) : k_end - k_begin;
      t.rows_valid = params.m - t.m_row;
      t.expert = e;
      fill_n(t, nb, 0);
      return TileStatus::kReady;
    } else {
      const int pairs_m = ceil_div(ceil_div(params.m, kBlockM), kClusterM);
      if (idx >= pairs_m * kNumNUnits * kSplitK) return TileStatus::kDone;
      if constexpr (kSplitK > 1) {
        const int split = idx / (pairs_m * kNumNUnits);
        idx -= split * pairs_m * kNumNUnits;
        t.k_block0 = t.sa_k = split * kSplitKBlocks;
        t.num_k_blocks = kSplitKBlocks;
        t.expert = split;
      }
      int pmb, nu;
      raster<kNumNUnits, kGroupNUnits>(idx, pairs_m, pmb, nu);
      const int mb = pmb * kClusterM + rank_m;
      const int nb = nu * kClusterN + rank_n;
      int e = 0;
      bool phantom = false;  // kSplitPairs: a padding half that only loads B for its peer
      if constexpr (kLayout != kLayoutDense) {
        // m_indices is constant within every 128-row segment's leading block of kBlockM rows
        // (kBlockM divides 128; -1 only ever ends a segment): one read classifies the whole
        // tile; padding tiles issue no loads, no MMA and (skipping) no stores, or (zero padding)
        // store their zeros.
        if constexpr (kSplitPairs) {
          e = expert_of_block(mb);
          const int e_peer = expert_of_block(mb ^ 1);
          if (e < 0 && e_peer >= 0) {
            e = e_peer;
            phantom = true;
          }
          t.b_shared = e_peer < 0 || e_peer == e;
        } else if constexpr (is_m_indices_layout(kLayout)) {
          e = __ldg(params.g_layout + mb * kBlockM);
        } else {
          e = expert_of_row(mb * kBlockM);
        }
        if (e < 0 || (is_m_indices_layout(kLayout) && e >= params.num_experts)) {
          if constexpr (!kEmptyTiles) return TileStatus::kSkip;
          t.num_k_blocks = 0;
          e = 0;  // any expert's coordinates: nothing is loaded
        }
      }
      t.m_row = mb * kBlockM;
      t.sa_m = t.m_row;
      if constexpr (kSplitK == 1) t.sa_k = 0;
      t.rows_valid = params.m - t.m_row;  // TMA clips the tail; <= 0 for a pair's phantom half
      if (kLayout != kLayoutContiguousZeroPad && phantom) t.rows_valid = 0;
      fill_n(t, nb, e);
      return TileStatus::kReady;
    }
  }

  // Next tile of this CTA; false when it has none left.
  __device__ bool next(Tile& t) {
    while (true) {
      const TileStatus status = get(next_idx, t);
      next_idx += gridDim.x / kClusterSize;
      if (status == TileStatus::kReady) return true;
      if (status == TileStatus::kDone) return false;
    }
  }
};

}  // namespace moe_fp8
