// permute.cuh — the memory-bound passes around the MoE layer's grouped GEMMs (v1):
//   * routing metadata: a stable counting sort of the (token, slot) pairs by local expert
//     (contiguous layout: count -> scan -> rank; masked layout: one CTA), replacing ~35 torch ops;
//   * permute: gather quantised token rows (fp8, 16-byte vectors) and their 1x128 scales into the
//     contiguous layout (scales written MN-major, sector-complete) or scatter them into the
//     masked buffers;
//   * combine: y[t] = add[t] + sum_j bf16(w[t, j]) * y_rows[row[t, j]] in fp32, one rounding;
//   * decode helpers: the masked index and permute of a few pairs in one kernel (every CTA
//     ranks them itself), and a decode runner's input rows + count staged in one kernel.
//
// Vocabulary (moe_fp8/layers/layouts.py): a *pair* p = t * k + j is one (token, top-k slot); its
// local expert id is ids[p] in [0, E) or anything else for "skip" (E is the layer's sentinel).
// A *row* is a pair's place in the layout; rows of one expert are ordered by pair id (stable).
//
// Every kernel here is graph-capturable (no host interaction) and none uses the routing values
// to size its grid: contiguous grids depend on P and M_sum (host ints the caller already has),
// masked/combine grids on the static buffer shapes.
//
// Host emulation: tests/test_permute_gpu.py also compiles this file with g++ (one std::thread per
// CUDA thread, its own definitions of the few CUDA names used here), so that the index, permute
// and combine logic is checked on machines without a GPU. Hence the two `#ifdef`s below; keep
// device code to those names (see the harness) or extend the harness.
#pragma once

#include "pdl.cuh"

#ifdef __CUDACC__
#include <cuda_bf16.h>
#endif

namespace moe_fp8 {
namespace permute {

constexpr int kSegmentAlign = 128;  // rows per expert segment multiple (moe_fp8.gemm.layout)
constexpr int kMaxExperts = 256;    // smem tables below; the host falls back to torch beyond it
constexpr int kPairsPerCta = 2048;  // contiguous index kernels: pairs of one CTA's chunk
constexpr int kCountThreads = 256;  // count + scan kernels (scan: one thread per expert)
constexpr int kRankThreads = 512;   // rank kernels: 16 warps, each ranks a contiguous sub-chunk
constexpr int kRankWarps = kRankThreads / 32;
constexpr int kPermuteThreads = 256;  // permute: one warp per row, 8 rows per CTA
constexpr int kRowsPerCta = kPermuteThreads / 32;
constexpr int kCopyUnroll = 8;        // 16-byte loads in flight per lane before the stores
constexpr int kCombineThreads = 128;  // combine: one 8-value chunk of one token per thread
constexpr int kCombineBatch = 8;      // rows (slots) loaded before the first accumulate
constexpr int kBf16PerVector = 8;

static_assert(kCountThreads >= kMaxExperts && kRankThreads >= kMaxExperts,
              "the scans give each expert its own thread");

// ---- small helpers -----------------------------------------------------------------------------

// Read-once streaming load (L1 no-allocate); the source may be re-read by other CTAs through L2.
__device__ __forceinline__ uint4 ld_stream(const uint4* gPtr) {
#ifdef __CUDA_ARCH__
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(gPtr));
  return r;
#else
  return *gPtr;  // host emulation
#endif
}

__device__ __forceinline__ unsigned lanemask_lt() {
#ifdef __CUDA_ARCH__
  unsigned mask;
  asm("mov.u32 %0, %%lanemask_lt;" : "=r"(mask));
  return mask;
#else
  return (1u << (threadIdx.x % 32)) - 1u;  // host emulation
#endif
}

// Local expert id of a pair, or -1 when the pair is skipped (sentinel or out of range).
__device__ __forceinline__ int expert_of(const long long* __restrict__ gIds, int p, int numExperts) {
  const long long e = __ldg(gIds + p);
  return (e >= 0 && e < numExperts) ? static_cast<int>(e) : -1;
}

// The pair -> local expert maps of the ranking passes below. LocalIds: ids already local (the
// sentinel E skips). GlobalIds: global ids of [T, k] pairs, mapped as router.cuh's
// local_ids_kernel maps them (this rank's experts [offset, offset + E); other experts and pairs
// of tokens at or beyond the valid count skip), so the decode graph needs no local-id kernel.
struct LocalIds {
  const long long* __restrict__ ids;
  int numExperts;
  __device__ __forceinline__ int operator()(int p) const { return expert_of(ids, p, numExperts); }
};

struct GlobalIds {
  const long long* __restrict__ ids;
  long long offset;
  int numExperts;
  long long validPairs;  // pairs of the valid tokens: valid count x k
  __device__ __forceinline__ int operator()(int p) const {
    if (p >= validPairs) return -1;
    const long long e = __ldg(ids + p) - offset;
    return (e >= 0 && e < numExperts) ? static_cast<int>(e) : -1;
  }
};

// Exclusive prefix sum of one int per thread over a CTA of kThreads; *total gets the sum.
template <int kThreads>
__device__ __forceinline__ int cta_exclusive_scan(int value, int* total) {
  __shared__ int sWarpSums[kThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int inclusive = value;
#pragma unroll
  for (int offset = 1; offset < 32; offset *= 2) {
    const int below = __shfl_up_sync(0xFFFFFFFFu, inclusive, offset);
    if (lane >= offset) inclusive += below;
  }
  if (lane == 31) sWarpSums[warp] = inclusive;
  __syncthreads();
  int before = 0, sum = 0;
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) {
    before += w < warp ? sWarpSums[w] : 0;
    sum += sWarpSums[w];
  }
  *total = sum;
  return before + inclusive - value;
}

// ---- stable ranking inside one CTA -------------------------------------------------------------
// The CTA's pairs [begin, end) are split into kRankWarps contiguous sub-chunks, one per warp, so
// that "earlier pair" = "earlier warp, or same warp and earlier step, or same step and lower
// lane". Pass 1 counts each warp's pairs per expert; a scan over the warps (one thread per
// expert) turns the counts into each warp's first rank; pass 2 walks every sub-chunk 32 pairs at
// a time and ranks equal experts among the lanes with __match_any_sync.
// NOTE: sCursor is [warp][expert] ints (16 KB): per-warp cursors need no CTA barrier in pass 2.
struct SubChunk {
  int begin, end;
  __device__ __forceinline__ SubChunk(int ctaBegin, int ctaEnd) {
    const int perWarp = (ctaEnd - ctaBegin + kRankWarps - 1) / kRankWarps;
    const int warp = threadIdx.x / 32;
    begin = min(ctaEnd, ctaBegin + warp * perWarp);
    end = min(ctaEnd, begin + perWarp);
  }
};

// Pass 1: sCursor[w][e] = pairs of expert e in warp w's sub-chunk.
template <typename ExpertOf>
__device__ __forceinline__ void count_sub_chunks(ExpertOf expert_of_pair, SubChunk chunk,
                                                 int (*sCursor)[kMaxExperts]) {
  for (int i = threadIdx.x; i < kRankWarps * kMaxExperts; i += kRankThreads)
    (&sCursor[0][0])[i] = 0;
  __syncthreads();
  const int warp = threadIdx.x / 32;
#pragma unroll 4
  for (int p = chunk.begin + threadIdx.x % 32; p < chunk.end; p += 32) {
    const int e = expert_of_pair(p);
    if (e >= 0) atomicAdd(&sCursor[warp][e], 1);
  }
  __syncthreads();
}

// Scan over the warps for expert e = threadIdx.x: sCursor[w][e] becomes base + the pairs of e in
// warps < w. Returns base + all pairs of e in this CTA (threads >= numExperts return base).
__device__ __forceinline__ int scan_sub_chunks(int base, int numExperts,
                                               int (*sCursor)[kMaxExperts]) {
  const int e = threadIdx.x;
  int running = base;
  if (e < numExperts) {
#pragma unroll
    for (int w = 0; w < kRankWarps; ++w) {
      const int count = sCursor[w][e];
      sCursor[w][e] = running;
      running += count;
    }
  }
  __syncthreads();
  return running;
}

// Pass 2: calls visit(p, e, rank) for every pair of this warp's sub-chunk in order (e = -1 and
// rank = -1 for skipped pairs). The loop bounds are warp-uniform, as __match_any_sync needs.
template <typename ExpertOf, typename Visit>
__device__ __forceinline__ void rank_sub_chunk(ExpertOf expert_of_pair, SubChunk chunk,
                                               int (*sCursor)[kMaxExperts], Visit visit) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int eNext = chunk.begin + lane < chunk.end ? expert_of_pair(chunk.begin + lane) : -1;
  for (int p0 = chunk.begin; p0 < chunk.end; p0 += 32) {
    const int p = p0 + lane, e = eNext;
    // prefetch the next step's ids: the step's own work is shared-memory only
    eNext = p + 32 < chunk.end ? expert_of_pair(p + 32) : -1;
    const unsigned peers = __match_any_sync(0xFFFFFFFFu, e);  // lanes past `end` have e = -1
    int rank = -1;
    if (e >= 0) rank = sCursor[warp][e] + __popc(peers & lanemask_lt());
    __syncwarp();  // every lane has read its cursor before the group leaders advance them
    if (e >= 0 && (peers & lanemask_lt()) == 0) sCursor[warp][e] += __popc(peers);
    __syncwarp();
    if (p < chunk.end) visit(p, e, rank);
  }
}

// ---- contiguous layout index: count -> scan -> (host reads M_sum) -> rank ----------------------

// gCtaCounts[b][e] = pairs of expert e among pairs [b * kPairsPerCta, (b + 1) * kPairsPerCta).
template <int kThreads>
__global__ void __launch_bounds__(kThreads) count_experts_kernel(
    const long long* __restrict__ gIds, int numPairs, int numExperts,
    int* __restrict__ gCtaCounts) {  // [gridDim.x, numExperts]
  pdl::begin();  // before any global access (pdl.cuh)
  __shared__ int sCount[kMaxExperts];
  for (int e = threadIdx.x; e < numExperts; e += kThreads) sCount[e] = 0;
  __syncthreads();
  const int begin = blockIdx.x * kPairsPerCta, end = min(numPairs, begin + kPairsPerCta);
#pragma unroll 4
  for (int p = begin + threadIdx.x; p < end; p += kThreads) {
    const int e = expert_of(gIds, p, numExperts);
    if (e >= 0) atomicAdd(&sCount[e], 1);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < numExperts; e += kThreads)
    gCtaCounts[blockIdx.x * numExperts + e] = sCount[e];
}

// One CTA, one thread per expert: tokens per expert, 128-aligned segment starts (exclusive scan),
// M_sum, and gCtaCounts rewritten in place into each chunk's first row per expert.
template <int kThreads>
__global__ void __launch_bounds__(kThreads) scan_experts_kernel(
    int* __restrict__ gCtaCounts, int numCtas, int numExperts,
    long long* __restrict__ gTokensPerExpert,  // [numExperts]
    int* __restrict__ gSegmentStart,           // [numExperts + 1]; [numExperts] = M_sum
    long long* __restrict__ gNumRows) {        // [1] = M_sum (read by the host in exact mode)
  pdl::begin();  // before any global access (pdl.cuh)
  const int e = threadIdx.x;
  int total = 0;
  if (e < numExperts) {
#pragma unroll 8
    for (int b = 0; b < numCtas; ++b) total += gCtaCounts[b * numExperts + e];
  }
  const int segment = (total + kSegmentAlign - 1) / kSegmentAlign * kSegmentAlign;
  int numRows;
  const int start = cta_exclusive_scan<kThreads>(e < numExperts ? segment : 0, &numRows);
  if (e < numExperts) {
    gTokensPerExpert[e] = total;
    gSegmentStart[e] = start;
    int running = start;
    for (int b = 0; b < numCtas; ++b) {
      const int count = gCtaCounts[b * numExperts + e];
      gCtaCounts[b * numExperts + e] = running;
      running += count;
    }
  }
  if (e == 0) {
    gSegmentStart[numExperts] = numRows;
    *gNumRows = numRows;
  }
}

// Rows of every kept pair (stable by pair id), the inverse map, m_indices, and the padding rows
// (m_indices = -1, row_pair = -1): CTA b pads experts b, b + gridDim.x, ... and the tail
// [M_sum, numRows) (numRows > M_sum when the caller passed an upper bound) goes with e = E.
// Rows >= numRows are never written (a too-small upper bound drops pairs instead of corrupting).
template <int kThreads>
__global__ void __launch_bounds__(kThreads) contiguous_rank_kernel(
    const long long* __restrict__ gIds, int numPairs, int numExperts,
    const int* __restrict__ gCtaBase,          // [gridDim.x, numExperts] (scan_experts_kernel)
    const int* __restrict__ gSegmentStart,     // [numExperts + 1]
    const long long* __restrict__ gTokensPerExpert, int numRows,
    int* __restrict__ gMIndices,               // [numRows] int32
    long long* __restrict__ gRowPair,          // [numRows]
    long long* __restrict__ gPairRow,          // [numPairs]
    bool* __restrict__ gPairKept) {            // [numPairs]
  pdl::begin();  // before any global access (pdl.cuh)
  static_assert(kThreads == kRankThreads, "SubChunk assumes kRankThreads");
  __shared__ int sCursor[kRankWarps][kMaxExperts];
  const int begin = blockIdx.x * kPairsPerCta, end = min(numPairs, begin + kPairsPerCta);
  const SubChunk chunk(begin, end);
  const LocalIds ids{gIds, numExperts};
  count_sub_chunks(ids, chunk, sCursor);
  const int e = threadIdx.x;
  scan_sub_chunks(e < numExperts ? gCtaBase[blockIdx.x * numExperts + e] : 0, numExperts, sCursor);
  rank_sub_chunk(ids, chunk, sCursor, [&](int p, int expert, int row) {
    const bool kept = expert >= 0;
    gPairRow[p] = kept ? row : 0;
    gPairKept[p] = kept;
    if (kept && row < numRows) {
      gRowPair[row] = p;
      gMIndices[row] = expert;
    }
  });
  for (int pad = blockIdx.x; pad <= numExperts; pad += gridDim.x) {
    const int first = pad < numExperts
                          ? gSegmentStart[pad] + static_cast<int>(gTokensPerExpert[pad])
                          : gSegmentStart[numExperts];
    const int last = min(numRows, pad < numExperts ? gSegmentStart[pad + 1] : numRows);
    for (int row = first + threadIdx.x; row < last; row += kThreads) {
      gRowPair[row] = -1;
      gMIndices[row] = -1;
    }
  }
}

// ---- masked layout index (decode): one CTA, no host sync ---------------------------------------

// The masked index's outputs for pair p of local expert `expert` (-1: skipped) at `rank`: pairs
// past maxRows and skipped ones go to the trash bucket (expert numExperts, rank 0); with a combine
// index (gSlotRow), its row e * maxRows + rank and weight (0 for the trash).
__device__ __forceinline__ void write_masked_pair(int p, int expert, int rank, int numExperts,
                                                  int maxRows, long long* gPairExpert,
                                                  long long* gPairRank, bool* gPairKept,
                                                  const float* gWeights, long long* gSlotRow,
                                                  float* gSlotWeight) {
  const bool kept = expert >= 0 && rank < maxRows;
  gPairExpert[p] = kept ? expert : numExperts;
  gPairRank[p] = kept ? rank : 0;
  gPairKept[p] = kept;
  if (gSlotRow != nullptr) {  // the combine index too (layers.permute.combine_index_masked)
    gSlotRow[p] = kept ? static_cast<long long>(expert) * maxRows + rank : 0;
    gSlotWeight[p] = kept ? __ldg(gWeights + p) : 0.0f;
  }
}

// The row maps' -1 entries (rows at or past masked_m = sRows[e], and the trash bucket's), written
// by every thread of a grid of kThreads-thread CTAs over rows r = its global index, + the grid's
// threads, ...
template <int kThreads>
__device__ __forceinline__ void fill_unused_row_maps(long long* gRowToken, long long* gRowSlot,
                                                     int numExperts, int maxRows,
                                                     const int* sRows) {
  const int numRows = (numExperts + 1) * maxRows;
  for (int r = blockIdx.x * kThreads + threadIdx.x; r < numRows; r += gridDim.x * kThreads) {
    const int e = r / maxRows;
    if (e == numExperts || r - e * maxRows >= sRows[e]) {
      gRowToken[r] = -1;
      gRowSlot[r] = -1;
    }
  }
}

// pair_expert / pair_rank / pair_kept of every pair, masked_m = min(count, M_max) per expert and
// the number of pairs dropped because their expert already had M_max rows. Skipped and dropped
// pairs go to the trash bucket (expert numExperts, rank 0).
// gIds: local ids (idOffset 0, sentinel numExperts), or global ids [T, topK] of which this rank
// holds [idOffset, idOffset + numExperts), tokens at or beyond *gNumValid (if given) skipped: the
// GlobalIds map, local_ids_kernel folded in.
template <int kThreads>
__global__ void __launch_bounds__(kThreads) masked_index_kernel(
    const long long* __restrict__ gIds, int numPairs, int numExperts, int maxRows,
    long long idOffset, int topK, const long long* __restrict__ gNumValid,
    int* __restrict__ gMaskedM,           // [numExperts] int32
    long long* __restrict__ gPairExpert,  // [numPairs]
    long long* __restrict__ gPairRank,    // [numPairs]
    bool* __restrict__ gPairKept,         // [numPairs]
    long long* __restrict__ gNumOverflow,  // [] int64
    const float* __restrict__ gWeights,   // [numPairs] top-k weights, or null (no combine index)
    long long* __restrict__ gSlotRow,     // [numPairs] combine row e * maxRows + rank, 0 if dropped
    float* __restrict__ gSlotWeight) {    // [numPairs] combine weight, 0 if dropped
  pdl::begin();  // before any global access (pdl.cuh)
  static_assert(kThreads == kRankThreads, "SubChunk assumes kRankThreads");
  __shared__ int sCursor[kRankWarps][kMaxExperts];
  __shared__ int sOverflow;
  const SubChunk chunk(0, numPairs);
  long long validPairs = numPairs;
  if (gNumValid != nullptr)
    validPairs = min(static_cast<long long>(numPairs), max(__ldg(gNumValid), 0ll) * topK);
  const GlobalIds ids{gIds, idOffset, numExperts, validPairs};
  if (threadIdx.x == 0) sOverflow = 0;
  count_sub_chunks(ids, chunk, sCursor);  // its barriers publish sOverflow = 0
  const int e = threadIdx.x;
  const int total = scan_sub_chunks(0, numExperts, sCursor);
  if (e < numExperts) {
    gMaskedM[e] = min(total, maxRows);
    if (total > maxRows) atomicAdd(&sOverflow, total - maxRows);
  }
  rank_sub_chunk(ids, chunk, sCursor, [&](int p, int expert, int rank) {
    write_masked_pair(p, expert, rank, numExperts, maxRows, gPairExpert, gPairRank, gPairKept,
                      gWeights, gSlotRow, gSlotWeight);
  });
  __syncthreads();
  if (threadIdx.x == 0) *gNumOverflow = sOverflow;
}

// ---- permute: fp8 rows + 1x128 scales ----------------------------------------------------------

// One warp copies one row (vectorsPerRow 16-byte vectors, kCopyUnroll loads in flight per lane).
__device__ __forceinline__ void copy_row(const uint4* __restrict__ gSrc, uint4* __restrict__ gDst,
                                         int vectorsPerRow) {
  const int lane = threadIdx.x % 32;
  for (int v0 = lane; v0 < vectorsPerRow; v0 += 32 * kCopyUnroll) {
    uint4 rVec[kCopyUnroll];
#pragma unroll
    for (int u = 0; u < kCopyUnroll; ++u)
      if (v0 + u * 32 < vectorsPerRow) rVec[u] = ld_stream(gSrc + v0 + u * 32);
#pragma unroll
    for (int u = 0; u < kCopyUnroll; ++u)
      if (v0 + u * 32 < vectorsPerRow) gDst[v0 + u * 32] = rVec[u];
  }
}

// After each warp of the CTA has set its row's scale source and destination (source -1: no
// row): the CTA's kRowsPerCta rows of scales, group-major (see permute_rows_kernel).
__device__ __forceinline__ void copy_scales_group_major(const long long* sScaleSrc,
                                                        const long long* sScaleDst, int groups,
                                                        const float* __restrict__ gXs,
                                                        long long xsGroup, float* __restrict__ gSa,
                                                        long long saGroup) {
  __syncthreads();
  for (int i = threadIdx.x; i < kRowsPerCta * groups; i += kPermuteThreads) {
    const int r = i % kRowsPerCta, g = i / kRowsPerCta;
    const long long src = sScaleSrc[r];
    if (src >= 0) gSa[sScaleDst[r] + g * saGroup] = __ldg(gXs + src + g * xsGroup);
  }
}

// Contiguous (kMasked = false): item i is destination row i of a [numItems = M_sum, H]; its
//   source token is row_pair[i] / topK (padding rows, row_pair = -1, copy token 0 so that every
//   row the GEMM reads is finite); row_token/row_slot [M_sum] get token/slot or -1. The padding
//   rows of a 128-row block without a kept row (segments start aligned with their kept rows, so
//   the block's first row tells) are not copied: the grouped GEMMs load no such block, and the
//   layout's upper bound leaves up to E_loc x 127 of them (a graph bucket replayed with half its
//   tokens: ~70 MB at 2048 tokens).
// Masked (kMasked = true): item i is pair i; it goes to (e, m) = (pair_expert[i], pair_rank[i])
//   of a_buf [E + 1, M_max, H] (row e * M_max + m); row_token/row_slot [E + 1, M_max] get i / k,
//   i % k there and -1 on every other row; pairs in the trash bucket E = trashBatch (skipped
//   pairs) are not copied and leave its rows as they were (contiguous: trashBatch = -1).
//   The -1 rows are those at or past masked_m[e] (gMaskedM, the index kernel's: the kept pairs
//   of e hold ranks 0 .. masked_m[e] - 1) and the trash bucket's, written by the whole grid: a
//   fill before the launch took one CTA ~7 us at 256 tokens (2 x 33 x 256 int64), on the
//   decode step's critical branch (H100, 2026-12-05).
// Scales: s[e, m, g] lives at gSa[e * saBatch + m * saRow + g * saGroup]; the CTA's 8 items are
//   written group-major, so in the contiguous (MN-major) layout each group's 8 scales are one
//   aligned 32-byte sector (M_sum % 8 == 0) instead of 8 partial ones.
// A CTA per pair instead of a warp (fewer dependent round trips for a decode step's few rows)
// measured no gain (H100, session 10: 175 -> 174 us at one token, 607 -> 614 at 256); removed in
// session 19.
template <bool kMasked>
__global__ void __launch_bounds__(kPermuteThreads) permute_rows_kernel(
    const uint4* __restrict__ gX,        // [T, H / 16] fp8 rows as 16-byte vectors, row stride
                                         // xRowVectors (a packed receive buffer has > H / 16)
    const float* __restrict__ gXs,       // scales of x: [t, g] at t * xsToken + g * xsGroup
    const long long* __restrict__ gIndex0,  // contiguous: row_pair [M_sum]; masked: pair_expert [P]
    const long long* __restrict__ gIndex1,  // masked: pair_rank [P]; contiguous: unused (null)
    uint4* __restrict__ gA, float* __restrict__ gSa,
    long long* __restrict__ gRowToken, long long* __restrict__ gRowSlot,
    const int* __restrict__ gMaskedM,    // masked: [E] rows per expert; contiguous: unused (null)
    int numItems, int topK, int vectorsPerRow, long long xRowVectors, int groups,
    int rowsPerBatch, int trashBatch, long long xsToken, long long xsGroup, long long saBatch,
    long long saRow, long long saGroup) {
  pdl::begin();  // before any global access (pdl.cuh)
  if constexpr (kMasked) {
    const int numRows = (trashBatch + 1) * rowsPerBatch;
    for (int r = blockIdx.x * kPermuteThreads + threadIdx.x; r < numRows;
         r += gridDim.x * kPermuteThreads) {
      const int e = r / rowsPerBatch;
      if (e == trashBatch ||
          r - e * rowsPerBatch >= min(max(__ldg(gMaskedM + e), 0), rowsPerBatch)) {
        gRowToken[r] = -1;
        gRowSlot[r] = -1;
      }
    }
  }
  __shared__ long long sScaleSrc[kRowsPerCta];  // -1: item past numItems
  __shared__ long long sScaleDst[kRowsPerCta];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int item = blockIdx.x * kRowsPerCta + warp;
  if (item < numItems) {
    long long token, slot, batch, row;  // row: within the batch (masked) or of a (contiguous)
    long long tokenOut;
    bool unreadRow = false;  // contiguous: a padding row of a block with no kept row
    if constexpr (kMasked) {
      token = item / topK;
      slot = item - token * topK;
      batch = __ldg(gIndex0 + item);
      row = __ldg(gIndex1 + item);
      tokenOut = token;
    } else {
      const long long pair = __ldg(gIndex0 + item);
      token = pair >= 0 ? pair / topK : 0;
      slot = pair >= 0 ? pair - token * topK : -1;
      tokenOut = pair >= 0 ? token : -1;
      batch = 0;
      row = item;
      unreadRow = pair < 0 && __ldg(gIndex0 + (item & ~(kSegmentAlign - 1))) < 0;
    }
    const long long dstRow = batch * rowsPerBatch + row;
    if (unreadRow) {
      if (lane == 0) {
        gRowToken[dstRow] = -1;
        gRowSlot[dstRow] = -1;
        sScaleSrc[warp] = -1;
      }
    } else if (batch == trashBatch) {
      // A skipped pair (a token past the valid count, another rank's expert, an overflow): no
      // one reads the trash bucket, so nothing is copied (a runner of 128 tokens replayed with
      // one otherwise copied 1016 rows there: 16 us, H100 2026-12-05).
      if (lane == 0) sScaleSrc[warp] = -1;
    } else {
      copy_row(gX + token * xRowVectors, gA + dstRow * vectorsPerRow, vectorsPerRow);
      if (lane == 0) {
        gRowToken[dstRow] = tokenOut;
        gRowSlot[dstRow] = slot;
        sScaleSrc[warp] = token * xsToken;
        sScaleDst[warp] = batch * saBatch + row * saRow;
      }
    }
  } else if (lane == 0) {
    sScaleSrc[warp] = -1;
  }
  copy_scales_group_major(sScaleSrc, sScaleDst, groups, gXs, xsGroup, gSa, saGroup);
}

// ---- masked dispatch of a few pairs (decode): the index and the permute in one kernel ---------

// A decode step of a few tokens ran masked_index_kernel (one CTA) and then permute_rows_kernel
// <true> on the router branch, the critical one at one token: two launches and their dependent
// round trips between the route kernel and the routed gate-up GEMM (index to permute end ~12 us
// at one token, H100 2026-12-05). Here every CTA ranks all numPairs <= kSmallPairs pairs itself
// in shared memory (a pair's rank = the earlier pairs of its expert: masked_index_kernel's stable
// order), then its warps copy one pair each (row and scales as permute_rows_kernel<true> places
// them, with fewer round trips); CTA 0 writes the index outputs. Every output is the two kernels'
// value, bit for bit. Grid: permute.py small_dispatch_grid (>= ceil(P / 8), more for the -1 fill).
constexpr int kSmallPairs = kPermuteThreads;  // one thread per pair while ranking

// The outputs and copy arguments of one small dispatch (masked_index_kernel's outputs,
// permute_rows_kernel<true>'s arguments with rowsPerBatch = maxRows, trashBatch = numExperts).
struct SmallDispatch {
  int numPairs, numExperts, maxRows, topK;
  int* gMaskedM;
  long long *gPairExpert, *gPairRank;
  bool* gPairKept;
  long long *gNumOverflow, *gSlotRow;  // gSlotRow null: no combine index
  float* gSlotWeight;
  const uint4* gX;
  const float* gXs;
  uint4* gA;
  float* gSa;
  long long *gRowToken, *gRowSlot;
  int vectorsPerRow;
  long long xRowVectors;
  int groups;
  long long xsToken, xsGroup, saBatch, saRow, saGroup;
};

// The dispatch once thread p knows its pair's local expert (-1: skipped) and, in CTA 0 with a
// combine index, its weight. Every thread of the CTA calls it (one thread per pair).
__device__ __forceinline__ void masked_dispatch_small_body(const SmallDispatch& d, int expert,
                                                           float weight) {
  static_assert(kSmallPairs == kPermuteThreads && kMaxExperts <= kPermuteThreads,
                "one thread per pair and per expert, one warp per copied pair");
  __shared__ int sExpert[kSmallPairs];  // local expert of pair p, -1: skipped
  __shared__ int sRank[kSmallPairs];
  __shared__ int sRows[kMaxExperts];    // masked_m
  __shared__ int sOverflow;
  const int p = threadIdx.x, numPairs = d.numPairs, numExperts = d.numExperts;
  const int maxRows = d.maxRows;
  sExpert[p] = expert;
  if (p == 0) sOverflow = 0;
  __syncthreads();
  // the threads of a warp read the same entry per step (a broadcast): at most P steps each
  int rank = 0;
  if (expert >= 0)
    for (int q = 0; q < p; ++q) rank += sExpert[q] == expert;
  const bool kept = expert >= 0 && rank < maxRows;
  sRank[p] = kept ? rank : -1;
  if (p < numExperts) {
    int count = 0;
    for (int q = 0; q < numPairs; ++q) count += sExpert[q] == p;
    sRows[p] = min(count, maxRows);
    if (count > maxRows) atomicAdd(&sOverflow, count - maxRows);
  }
  __syncthreads();
  if (blockIdx.x == 0) {
    if (p < numExperts) d.gMaskedM[p] = sRows[p];
    if (p < numPairs) {
      d.gPairExpert[p] = kept ? expert : numExperts;
      d.gPairRank[p] = kept ? rank : 0;
      d.gPairKept[p] = kept;
      if (d.gSlotRow != nullptr) {
        d.gSlotRow[p] = kept ? static_cast<long long>(expert) * maxRows + rank : 0;
        d.gSlotWeight[p] = kept ? weight : 0.0f;
      }
    }
    if (p == 0) *d.gNumOverflow = sOverflow;
  }
  fill_unused_row_maps<kPermuteThreads>(d.gRowToken, d.gRowSlot, numExperts, maxRows, sRows);
  // One pair per warp: its scales (lanes g and g + 32) requested with the row's first batch, not
  // after a CTA barrier as in permute_rows_kernel. NOTE: ptxas interleaves a batch's loads and
  // stores (each store then waits for its load) whether the stores are plain or volatile asm and
  // the loads predicated or clamped (SASS, 2026-12-05); xq was just written by the x
  // quantisation, so these are L2 round trips.
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int item = blockIdx.x * kRowsPerCta + warp;
  const int row = item < numPairs ? sRank[item] : -1;
  if (row < 0) return;  // whole warps; no barrier below
  const long long batch = sExpert[item], token = item / d.topK;
  const long long dstRow = batch * maxRows + row;
  const float* xsToken0 = d.gXs + token * d.xsToken;
  float* saRow0 = d.gSa + batch * d.saBatch + row * d.saRow;
  float rScale[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int g = lane + 32 * i;
    rScale[i] = g < d.groups ? __ldg(xsToken0 + g * d.xsGroup) : 0.0f;
  }
  copy_row(d.gX + token * d.xRowVectors, d.gA + dstRow * d.vectorsPerRow, d.vectorsPerRow);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int g = lane + 32 * i;
    if (g < d.groups) saRow0[g * d.saGroup] = rScale[i];
  }
  for (int g = lane + 64; g < d.groups; g += 32)
    saRow0[g * d.saGroup] = __ldg(xsToken0 + g * d.xsGroup);
  if (lane == 0) {
    d.gRowToken[dstRow] = token;
    d.gRowSlot[dstRow] = item - token * d.topK;
  }
}

// (a template, kThreads = kPermuteThreads: a header's non-template __global__ would be emitted in
// every JIT translation unit that includes it)
template <int kThreads>
__global__ void __launch_bounds__(kThreads) masked_dispatch_small_kernel(
    // masked_index_kernel's inputs and outputs
    const long long* __restrict__ gIds, int numPairs, int numExperts, int maxRows,
    long long idOffset, int topK, const long long* __restrict__ gNumValid,
    int* __restrict__ gMaskedM, long long* __restrict__ gPairExpert,
    long long* __restrict__ gPairRank, bool* __restrict__ gPairKept,
    long long* __restrict__ gNumOverflow, const float* __restrict__ gWeights,
    long long* __restrict__ gSlotRow, float* __restrict__ gSlotWeight,
    // permute_rows_kernel<true>'s (its rowsPerBatch = maxRows, trashBatch = numExperts)
    const uint4* __restrict__ gX, const float* __restrict__ gXs, uint4* __restrict__ gA,
    float* __restrict__ gSa, long long* __restrict__ gRowToken, long long* __restrict__ gRowSlot,
    int vectorsPerRow, long long xRowVectors, int groups, long long xsToken, long long xsGroup,
    long long saBatch, long long saRow, long long saGroup) {
  pdl::begin();  // before any global access (pdl.cuh)
  static_assert(kThreads == kPermuteThreads, "one thread per pair");
  long long validPairs = numPairs;
  if (gNumValid != nullptr)
    validPairs = min(static_cast<long long>(numPairs), max(__ldg(gNumValid), 0ll) * topK);
  const GlobalIds ids{gIds, idOffset, numExperts, validPairs};
  const int p = threadIdx.x;
  const int expert = p < numPairs ? ids(p) : -1;
  // CTA 0's combine weights, requested with the ids (one round trip before the copies)
  const float weight =
      blockIdx.x == 0 && p < numPairs && gSlotRow != nullptr ? __ldg(gWeights + p) : 0.0f;
  const SmallDispatch d{numPairs, numExperts, maxRows, topK, gMaskedM, gPairExpert, gPairRank,
                        gPairKept, gNumOverflow, gSlotRow, gSlotWeight, gX, gXs, gA, gSa,
                        gRowToken, gRowSlot, vectorsPerRow, xRowVectors, groups, xsToken,
                        xsGroup, saBatch, saRow, saGroup};
  masked_dispatch_small_body(d, expert, weight);
}

// ---- combine: weighted sum of each token's k expert rows ---------------------------------------

__device__ __forceinline__ float bf16_bits_to_float(unsigned short bits) {
  return __uint_as_float(static_cast<unsigned>(bits) << 16);  // exact
}

__device__ __forceinline__ void accumulate8(float (&rAcc)[kBf16PerVector], float weight,
                                            const uint4& rRow) {
  const unsigned* words = reinterpret_cast<const unsigned*>(&rRow);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    // NOTE: mul and add rounded separately (no FMA), exactly the torch oracle's two ops; the
    // product of two bf16 values is exact in fp32 anyway (8 x 8 significand bits), so this also
    // equals one FMA except on fp32 overflow/underflow of the product.
    rAcc[2 * i] = __fadd_rn(rAcc[2 * i], __fmul_rn(weight, __uint_as_float(words[i] << 16)));
    rAcc[2 * i + 1] =
        __fadd_rn(rAcc[2 * i + 1], __fmul_rn(weight, __uint_as_float(words[i] & 0xFFFF0000u)));
  }
}

// out[t] = bf16((sum_j bf16(w[t, j]) * y[row[t, j]]) + add[t]), fp32, j ascending, then the add:
// the order and roundings of unpermute_combine's bf16 branch (baddbmm: weights cast to bf16,
// fp32 accumulation, beta * add after the sum, one rounding). Skipped slots (weight 0, row 0)
// are summed like the others (0 * finite = 0), so signed zeros match too.
// Grid (T, ceil(H / 8 / kCombineThreads)): x = token (no 65535 limit), y = chunk block.
// gNumValid (decode runners): rows of tokens at or past the device count are left as they were.
template <bool kHasAdd>
__global__ void __launch_bounds__(kCombineThreads) combine_kernel(
    const uint4* __restrict__ gY,            // [R, H / 8] bf16 expert-output rows
    const long long* __restrict__ gSlotRow,  // [T, k]
    const float* __restrict__ gSlotWeight,   // [T, k]
    const uint4* __restrict__ gAdd,          // [T, H / 8] bf16 (kHasAdd)
    uint4* __restrict__ gOut,                // [T, H / 8] bf16
    const long long* __restrict__ gNumValid, // null, or tokens >= *gNumValid are not written
    int topK, int vectorsPerRow) {
  pdl::begin();  // before any global access (pdl.cuh)
  const long long token = blockIdx.x;
  // a decode runner replayed with fewer tokens than it holds: their rows are never read
  if (gNumValid != nullptr && token >= __ldg(gNumValid)) return;
  const int v = blockIdx.y * kCombineThreads + threadIdx.x;
  if (v >= vectorsPerRow) return;
  float rAcc[kBf16PerVector];
#pragma unroll
  for (int i = 0; i < kBf16PerVector; ++i) rAcc[i] = 0.0f;
  const long long* gRow = gSlotRow + token * topK;
  const float* gWeight = gSlotWeight + token * topK;
  uint4 rAdd = make_uint4(0, 0, 0, 0);
  if constexpr (kHasAdd) rAdd = ld_stream(gAdd + token * vectorsPerRow + v);  // in flight early
  for (int j0 = 0; j0 < topK; j0 += kCombineBatch) {
    uint4 rRows[kCombineBatch];
    float rWeight[kCombineBatch];
#pragma unroll
    for (int u = 0; u < kCombineBatch; ++u) {
      if (j0 + u < topK) {
        const long long row = __ldg(gRow + j0 + u);
        // the weight as torch's .to(bfloat16) rounds it (nearest even)
        rWeight[u] = __bfloat162float(__float2bfloat16_rn(__ldg(gWeight + j0 + u)));
        rRows[u] = ld_stream(gY + row * vectorsPerRow + v);
      }
    }
#pragma unroll
    for (int u = 0; u < kCombineBatch; ++u)
      if (j0 + u < topK) accumulate8(rAcc, rWeight[u], rRows[u]);
  }
  if constexpr (kHasAdd) {
    const unsigned* words = reinterpret_cast<const unsigned*>(&rAdd);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      rAcc[2 * i] = __fadd_rn(rAcc[2 * i], __uint_as_float(words[i] << 16));
      rAcc[2 * i + 1] = __fadd_rn(rAcc[2 * i + 1], __uint_as_float(words[i] & 0xFFFF0000u));
    }
  }
  uint4 rOut;
  unsigned* outWords = reinterpret_cast<unsigned*>(&rOut);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const unsigned lo = __bfloat16_as_ushort(__float2bfloat16_rn(rAcc[2 * i]));
    const unsigned hi = __bfloat16_as_ushort(__float2bfloat16_rn(rAcc[2 * i + 1]));
    outWords[i] = lo | (hi << 16);
  }
  gOut[token * vectorsPerRow + v] = rOut;
}

// ---- decode runner input: the batch's rows into the static buffer, and its count -------------

// DecodeRunner's two stream operations before its graph (x[:n].copy_(batch) and
// num_valid.fill_(n)) as one launch: gDst[0 .. numVectors) = gSrc[..], *gCount = count.
template <int kThreads>
__global__ void __launch_bounds__(kThreads) stage_rows_kernel(
    const uint4* __restrict__ gSrc, uint4* __restrict__ gDst, long long numVectors,
    long long* __restrict__ gCount, long long count) {
  pdl::begin();  // before any global access (pdl.cuh)
  if (blockIdx.x == 0 && threadIdx.x == 0) *gCount = count;
  for (long long v = static_cast<long long>(blockIdx.x) * kThreads + threadIdx.x; v < numVectors;
       v += static_cast<long long>(gridDim.x) * kThreads)
    gDst[v] = ld_stream(gSrc + v);
}

}  // namespace permute
}  // namespace moe_fp8
