// ep_send.cuh — the send side of the expert-parallel prefill exchange (layers/dispatch/torch_dist):
// two launches replace ~18 torch ops between the router and the counts all-to-all.
//
//   route_pack_kernel  one thread per token: the routing table (pairs per global expert, "no
//                      expert" at E, tokens per destination rank) through shared-memory counters,
//                      each CTA's tokens per rank (for the send order), and the token's packed
//                      record [H fp8 | H/128 fp32 scales | k int32 ids (E = none) | k fp32 weights
//                      | zero padding to 16 bytes] (one warp per record).
//   send_order_kernel  same CTAs: the send order (the tokens hitting rank r, ascending, rank-major)
//                      and the combine's source index [T, R] (row 1 + send position, weight 1; row
//                      0, weight 0 for ranks the token skips).
//   replicate_pack_kernel  decode (fixed splits): token t's record into slot t of every
//                      destination's block of [R, T] rows, ids -1 at or beyond num_valid (a device
//                      scalar read by the kernel: graph-safe), in one launch instead of ~8 ops.
//
// A token goes to a rank once however many of its k experts the rank holds; ranks hold
// contiguous blocks of expertsPerRank experts (moe_fp8/layers/placement.py). Counts are sums of
// integers (atomics in any order give the same table) and positions come from scans in token
// order, so every output is deterministic and equals the torch path's bit for bit.
//
// Host emulation: tests/test_ep.py compiles this file with g++ (tests/kernel_checks.py): device
// code keeps to the names that harness defines.
#pragma once

#include "permute.cuh"

namespace moe_fp8 {
namespace ep_send {

constexpr int kThreads = 256;               // both kernels: one thread per token (the instances)
constexpr int kMaxRanks = 64;               // a token's destinations are one 64-bit mask
constexpr int kMaxTable = 1024 + 1 + kMaxRanks;  // E + 1 + R counters in shared memory

// Global expert id -> [0, E), or E for "no expert" (-1, or anything out of range).
__device__ __forceinline__ int expert_or_none(long long id, int numExperts) {
  return (id >= 0 && id < numExperts) ? static_cast<int>(id) : numExperts;
}

// Bit r set: the token has an expert on rank r.
__device__ __forceinline__ unsigned long long rank_mask(const long long* __restrict__ gIds,
                                                        long long token, int topK, int numExperts,
                                                        int expertsPerRank) {
  unsigned long long mask = 0;
  for (int j = 0; j < topK; ++j) {
    const int e = expert_or_none(__ldg(gIds + token * topK + j), numExperts);
    if (e < numExperts) mask |= 1ull << (e / expertsPerRank);
  }
  return mask;
}

// gTable [E + 1 + R] (zeroed by the caller) += this CTA's counts; gCtaRankCounts [ctas, R] = this
// CTA's tokens per rank; gRecords [T, recordVectors] = the packed records.
// (Kernels are templates on the CTA size: a JIT translation unit instantiates exactly one.)
template <int kCtaThreads>
__global__ void __launch_bounds__(kCtaThreads) route_pack_kernel(
    const long long* __restrict__ gIds,      // [T, k] global expert ids
    const float* __restrict__ gWeights,      // [T, k]
    const uint4* __restrict__ gX,            // [T, H / 16] fp8 rows, row stride xRowVectors
    const float* __restrict__ gXs,           // scales: [t, g] at t * xsToken + g * xsGroup
    uint4* __restrict__ gRecords,            // [T, recordVectors]
    unsigned long long* __restrict__ gTable,  // int64 [E + 1 + R]
    int* __restrict__ gCtaRankCounts,         // [gridDim.x, R]
    int numTokens, int topK, int numExperts, int expertsPerRank, int numRanks, int vectorsPerRow,
    long long xRowVectors, int groups, long long xsToken, long long xsGroup, int recordVectors) {
  pdl::begin();  // before any global access (pdl.cuh)
  __shared__ int sCount[kMaxTable];
  const int tableSize = numExperts + 1 + numRanks;
  for (int i = threadIdx.x; i < tableSize; i += kCtaThreads) sCount[i] = 0;
  __syncthreads();
  const long long first = static_cast<long long>(blockIdx.x) * kCtaThreads;
  const long long token = first + threadIdx.x;
  if (token < numTokens) {
    unsigned long long mask = 0;
    for (int j = 0; j < topK; ++j) {
      const int e = expert_or_none(__ldg(gIds + token * topK + j), numExperts);
      atomicAdd(&sCount[e], 1);
      if (e < numExperts) mask |= 1ull << (e / expertsPerRank);
    }
    for (int r = 0; r < numRanks; ++r)
      if ((mask >> r) & 1ull) atomicAdd(&sCount[numExperts + 1 + r], 1);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < tableSize; i += kCtaThreads) {
    const int count = sCount[i];
    if (count) atomicAdd(gTable + i, static_cast<unsigned long long>(count));
    if (i > numExperts) gCtaRankCounts[blockIdx.x * numRanks + (i - numExperts - 1)] = count;
  }
  // the records: one warp per token; the fp8 row in 16-byte vectors, then the 32-bit words after
  // it (scales | ids | weights | zero padding)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int tailWords = recordVectors * 4 - vectorsPerRow * 4;
  const int last = static_cast<int>(min(static_cast<long long>(kCtaThreads), numTokens - first));
  for (int i = warp; i < last; i += kCtaThreads / 32) {
    const long long t = first + i;
    uint4* gRecord = gRecords + t * recordVectors;
    permute::copy_row(gX + t * xRowVectors, gRecord, vectorsPerRow);
    unsigned* gTail = reinterpret_cast<unsigned*>(gRecord + vectorsPerRow);
    for (int w = lane; w < tailWords; w += 32) {
      unsigned word = 0;
      if (w < groups) {
        word = __float_as_uint(__ldg(gXs + t * xsToken + w * xsGroup));
      } else if (w < groups + topK) {
        word = static_cast<unsigned>(expert_or_none(__ldg(gIds + t * topK + (w - groups)), numExperts));
      } else if (w < groups + 2 * topK) {
        word = __float_as_uint(__ldg(gWeights + t * topK + (w - groups - topK)));
      }
      gTail[w] = word;
    }
  }
}

// gSendToken [R * T] (rows >= the number of sends are left unwritten), gSourceRow [T, R] int64,
// gSourceWeight [T, R] fp32. Needs route_pack_kernel's gTable and gCtaRankCounts (same grid).
template <int kCtaThreads>
__global__ void __launch_bounds__(kCtaThreads) send_order_kernel(
    const long long* __restrict__ gIds,          // [T, k]
    const long long* __restrict__ gTable,        // [E + 1 + R]: tokens per rank at E + 1 + r
    const int* __restrict__ gCtaRankCounts,      // [gridDim.x, R]
    long long* __restrict__ gSendToken, long long* __restrict__ gSourceRow,
    float* __restrict__ gSourceWeight,
    int numTokens, int topK, int numExperts, int expertsPerRank, int numRanks) {
  pdl::begin();  // before any global access (pdl.cuh)
  __shared__ long long sBase[kMaxRanks];       // first send row of this CTA's tokens for rank r
  __shared__ int sWarpCount[kMaxRanks][kCtaThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int r = threadIdx.x; r < numRanks; r += kCtaThreads) {
    long long base = 0;
    for (int q = 0; q < r; ++q) base += __ldg(gTable + numExperts + 1 + q);  // earlier ranks' rows
    for (unsigned c = 0; c < blockIdx.x; ++c) base += __ldg(gCtaRankCounts + c * numRanks + r);
    sBase[r] = base;
  }
  const long long token = static_cast<long long>(blockIdx.x) * kCtaThreads + threadIdx.x;
  const unsigned long long mask =
      token < numTokens ? rank_mask(gIds, token, topK, numExperts, expertsPerRank) : 0ull;
  for (int r = 0; r < numRanks; ++r) {
    const unsigned hits = __ballot_sync(0xFFFFFFFFu, (mask >> r) & 1ull);
    if (lane == 0) sWarpCount[r][warp] = __popc(hits);
  }
  __syncthreads();
  for (int r = 0; r < numRanks; ++r) {
    const bool hit = (mask >> r) & 1ull;
    const unsigned hits = __ballot_sync(0xFFFFFFFFu, hit);
    long long row = sBase[r] + __popc(hits & permute::lanemask_lt());
    for (int w = 0; w < warp; ++w) row += sWarpCount[r][w];
    if (token < numTokens) {
      if (hit) gSendToken[row] = token;
      gSourceRow[token * numRanks + r] = hit ? row + 1 : 0;
      gSourceWeight[token * numRanks + r] = hit ? 1.0f : 0.0f;
    }
  }
}

// gSend [R, T, recordVectors]: row (r, t) = token t's record [fp8 | scales | k int32 ids (-1 from
// num_valid on) | k fp32 weights | zero padding]. One warp per token: each 16-byte vector of the
// row is loaded once and stored R times. num_valid = *gNumValid if given, else numValidHost.
template <int kCtaThreads>
__global__ void __launch_bounds__(kCtaThreads) replicate_pack_kernel(
    const long long* __restrict__ gIds,      // [T, k] global expert ids (-1 = none)
    const float* __restrict__ gWeights,      // [T, k]
    const uint4* __restrict__ gX,            // [T, H / 16] fp8 rows, row stride xRowVectors
    const float* __restrict__ gXs,           // scales: [t, g] at t * xsToken + g * xsGroup
    const long long* __restrict__ gNumValid,  // device scalar, or null
    uint4* __restrict__ gSend,               // [R, T, recordVectors]
    int numTokens, int topK, int numRanks, int vectorsPerRow, long long xRowVectors, int groups,
    long long xsToken, long long xsGroup, int recordVectors, long long numValidHost) {
  pdl::begin();  // before any global access (pdl.cuh)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const long long t = static_cast<long long>(blockIdx.x) * (kCtaThreads / 32) + warp;
  if (t >= numTokens) return;
  const long long numValid = gNumValid != nullptr ? __ldg(gNumValid) : numValidHost;
  const long long rankStride = static_cast<long long>(numTokens) * recordVectors;
  uint4* gRow = gSend + t * recordVectors;
  const uint4* gSrc = gX + t * xRowVectors;
  for (int v = lane; v < vectorsPerRow; v += 32) {
    const uint4 value = permute::ld_stream(gSrc + v);
    for (int r = 0; r < numRanks; ++r) gRow[r * rankStride + v] = value;
  }
  const int tailWords = recordVectors * 4 - vectorsPerRow * 4;
  const bool valid = t < numValid;
  for (int w = lane; w < tailWords; w += 32) {
    unsigned word = 0;
    if (w < groups) {
      word = __float_as_uint(__ldg(gXs + t * xsToken + w * xsGroup));
    } else if (w < groups + topK) {
      word = valid ? static_cast<unsigned>(static_cast<int>(__ldg(gIds + t * topK + (w - groups))))
                   : 0xFFFFFFFFu;
    } else if (w < groups + 2 * topK) {
      word = __float_as_uint(__ldg(gWeights + t * topK + (w - groups - topK)));
    }
    for (int r = 0; r < numRanks; ++r)
      reinterpret_cast<unsigned*>(gRow + r * rankStride + vectorsPerRow)[w] = word;
  }
}

}  // namespace ep_send
}  // namespace moe_fp8
