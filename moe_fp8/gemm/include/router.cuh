// router.cuh — the DeepSeek-V3 gate's selection after the fp32 gate GEMM and the sigmoid (v1):
//   * route_kernel: one warp per token. For scores s = sigmoid(logits) fp32 [T, E] (computed by
//     torch, so the bits are torch's) and the correction bias b [E]:
//       c = s + b                                   selection only
//       g[j] = the 2 largest c of group j, summed    E / G experts per group
//       keep the topk_group best groups; c of the others := fill (-inf or 0.0)
//       idx = the top_k experts of c, in descending order (ties: lower expert id first)
//       w_j = s[idx_j] / (sum_j s[idx_j] + 1e-20) * routed_scaling_factor   (sum in slot order)
//     and, optionally, counts[idx_j] += 1 (the tokens-per-expert statistic for the bias update).
//     Replaces the ~15 torch ops of moe_fp8.layers.router.route (topk x3, scatter, masked_fill,
//     gather, sum, div, mul, ...). Same selection as torch: every comparison is exact; the one
//     documented difference is the order of the k slots (torch's unsorted topk order is its
//     own) and hence the order of the k-term sum of the weights (at most an ulp or two).
//   * local_ids_kernel: global expert ids [T, k] -> local ids of one rank's experts, the skip
//     sentinel E_loc for others and for tokens at or beyond num_valid (a device scalar in the
//     decode graph): replaces the 6-9 torch ops of layouts.local_expert_ids.
//   * local_ids_shared_kernel: the same with the shared expert as one more local expert (a
//     (k + 1)-th slot at weight 1), ids and combine weights [T, k + 1].
//
// Ordering: NaN sorts above everything (as torch.topk does), then +inf ... -inf.
// Limits (the host falls back to torch beyond them): E <= 32 * kMaxPerLane, 1 <= G <= 32,
// E / G >= 2, topk_group <= G, 1 <= top_k <= 32.
//
// Host emulation: tests/test_router.py compiles this file with g++ through the harness of
// tests/test_permute_gpu.py (a std::thread per CUDA thread); keep device code to the CUDA names
// that harness defines.
#pragma once

#include "pdl.cuh"

#ifdef __CUDACC__  // the g++ emulation harness defines __nv_bfloat16 itself
#include <cuda_bf16.h>
#endif

namespace moe_fp8 {
namespace router {

constexpr int kMaxPerLane = 8;                  // experts per lane: E <= 256
constexpr int kMaxExperts = 32 * kMaxPerLane;
constexpr int kRouteThreads = 256;              // 8 warps = 8 tokens per CTA
constexpr int kRouteWarps = kRouteThreads / 32;
constexpr int kLocalIdsThreads = 256;

__device__ __forceinline__ bool is_nan(float v) { return v != v; }

// a ranks above b: NaN above every number, otherwise the usual order (ties: neither)
__device__ __forceinline__ bool ranks_above(float a, float b) {
  if (is_nan(a)) return !is_nan(b);
  if (is_nan(b)) return false;
  return a > b;
}

// A candidate of a warp-wide argmax packed into one integer whose unsigned order is the ranking:
// high word an order-preserving key of the value (NaN above +inf, -0 equal to +0), low word
// 0xFFFFFFFF - id (ties: the lower id ranks above); 0 is "no candidate" (every real key is >= 1).
// One 64-bit compare per step instead of the branchy NaN-aware comparison chain: the top-k rounds
// of one token are a serial chain of warp reductions (11 us for one token, H100 2026-12-05).
using Packed = unsigned long long;

__device__ __forceinline__ unsigned order_key(float v) {
  if (is_nan(v)) return 0xFFFFFFFFu;
  const unsigned u = __float_as_uint(v + 0.0f);  // -0 + 0 = +0: the two zeros tie
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ Packed pack(float value, int id) {
  return (static_cast<Packed>(order_key(value)) << 32) | (0xFFFFFFFFu - static_cast<unsigned>(id));
}

__device__ __forceinline__ int packed_id(Packed p) {
  return static_cast<int>(0xFFFFFFFFu - static_cast<unsigned>(p & 0xFFFFFFFFu));
}

// Every lane gets the warp's best candidate (a total order, so all lanes agree).
__device__ __forceinline__ Packed warp_best(Packed mine) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    const Packed other = __shfl_xor_sync(0xFFFFFFFFu, mine, offset);
    mine = other > mine ? other : mine;
  }
  return mine;
}

// torch's fp32 sigmoid, 1 / (1 + exp(-l)) with expf and an IEEE division (no fast math in the
// JIT): the same bits as logits.sigmoid() on the GPU (tests/test_router_gpu.py checks it).
__device__ __forceinline__ float sigmoid_like_torch(float logit) {
  return 1.0f / (1.0f + expf(-logit));
}

// One warp selects one token's experts: gRow = the token's scores (or logits, kFromLogits: their
// sigmoid taken here), gBias [E]; sChoice / sScore: this warp's E floats of shared memory each.
// Lane j < topK returns slot j's expert (idx) and unbiased score (weight); every lane returns the
// sum of the k scores in slot order.
struct RouteParams {
  int numExperts, numGroups, topkGroup, topK, fillNegInf;
};

template <int kPerLane, bool kFromLogits>
__device__ __forceinline__ void route_token(const float* __restrict__ gRow,
                                            const float* __restrict__ gBias, const RouteParams& rp,
                                            float* sChoice, float* sScore, long long& myIdx,
                                            float& myWeight, float& sum) {
  const int lane = threadIdx.x % 32;
  const int numExperts = rp.numExperts, numGroups = rp.numGroups;
  // (1) scores and biased choices into shared memory: experts lane, lane + 32, ...
  for (int e = lane; e < numExperts; e += 32) {
    const float s = kFromLogits ? sigmoid_like_torch(__ldg(gRow + e)) : __ldg(gRow + e);
    sScore[e] = s;
    sChoice[e] = s + __ldg(gBias + e);
  }
  __syncwarp();

  // (2) group scores: lane j < G sums the two largest choices of group j
  const int perGroup = numExperts / numGroups;
  Packed group = 0;
  if (lane < numGroups) {
    const float* sGroup = &sChoice[lane * perGroup];
    float first = sGroup[0], second = sGroup[1];
    if (ranks_above(second, first)) {
      const float t = first;
      first = second;
      second = t;
    }
    for (int i = 2; i < perGroup; ++i) {
      const float v = sGroup[i];
      if (ranks_above(v, first)) {
        second = first;
        first = v;
      } else if (ranks_above(v, second)) {
        second = v;
      }
    }
    group = pack(first + second, lane);
  }

  // (3) the topk_group best groups -> keptGroups bit mask (same on every lane)
  unsigned keptGroups = 0u;
  for (int round = 0; round < rp.topkGroup; ++round) {
    const int best = packed_id(warp_best(group));
    keptGroups |= 1u << best;
    if (lane == best) group = 0;
  }

  // (4) this lane's experts (lane + 32 i), dropped groups filled
  const float fill = rp.fillNegInf ? __int_as_float(static_cast<int>(0xFF800000u)) : 0.0f;  // -inf / 0
  float value[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int e = lane + 32 * i;
    value[i] = 0.0f;
    if (e < numExperts) value[i] = (keptGroups >> (e / perGroup)) & 1u ? sChoice[e] : fill;
  }
  unsigned taken = 0u;  // bit i: expert lane + 32 i already selected

  // (5) top_k rounds of a warp argmax; lane j keeps slot j; every lane sums the weights in order
  myIdx = 0;
  myWeight = 0.0f;
  sum = 0.0f;
  for (int slot = 0; slot < rp.topK; ++slot) {
    Packed mine = 0;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int e = lane + 32 * i;
      const Packed c = (e < numExperts && !((taken >> i) & 1u)) ? pack(value[i], e) : 0;
      mine = c > mine ? c : mine;
    }
    const int best = packed_id(warp_best(mine));
    if (lane == best % 32) taken |= 1u << (best / 32);
    const float w = sScore[best];
    sum = sum + w;
    if (lane == slot) {
      myIdx = best;
      myWeight = w;
    }
  }
}

// A slot's routing weight: w / (sum + 1e-20) (normalize) times the scaling factor.
__device__ __forceinline__ float route_weight(float w, float sum, int normalize, float scaling) {
  if (normalize) w = w / (sum + 1e-20f);
  return w * scaling;
}

// gScores fp32 [T, E] (row stride scoreStride), gBias fp32 [E]; gTopkIdx int64 [T, K],
// gTopkWeights fp32 [T, K]; gCounts int64 [E] or null (accumulated, the caller zeroes it).
// kPerLane: experts per lane, ceil(E / 32) up to a power of two (the host picks the smallest).
// kFromLogits: gScores holds the logits and the kernel takes their sigmoid itself (one kernel
// fewer on the decode graph's router branch, where each costs a few microseconds of latency).
template <int kThreads, int kPerLane = kMaxPerLane, bool kFromLogits = false>
__global__ void __launch_bounds__(kThreads) route_kernel(
    const float* __restrict__ gScores, const float* __restrict__ gBias, int numTokens,
    long long scoreStride, int numExperts, int numGroups, int topkGroup, int topK, int fillNegInf,
    int normalize, float scaling, long long* __restrict__ gTopkIdx,
    float* __restrict__ gTopkWeights, unsigned long long* __restrict__ gCounts) {
  pdl::begin();  // before any global access (pdl.cuh)
  constexpr int kWarps = kThreads / 32;
  __shared__ float sChoice[kWarps][kMaxExperts];  // c = s + b of this warp's token
  __shared__ float sScore[kWarps][kMaxExperts];   // s of this warp's token
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int token = blockIdx.x * kWarps + warp;
  if (token >= numTokens) return;  // whole warps leave; no CTA barrier below
  const RouteParams rp{numExperts, numGroups, topkGroup, topK, fillNegInf};
  long long myIdx;
  float myWeight, sum;
  route_token<kPerLane, kFromLogits>(gScores + token * scoreStride, gBias, rp, sChoice[warp],
                                     sScore[warp], myIdx, myWeight, sum);
  if (lane < topK) {
    gTopkIdx[static_cast<long long>(token) * topK + lane] = myIdx;
    gTopkWeights[static_cast<long long>(token) * topK + lane] =
        route_weight(myWeight, sum, normalize, scaling);
    if (gCounts != nullptr) atomicAdd(gCounts + myIdx, 1ull);
  }
}

// gIdx int64 [P] global ids (P = T * K) -> gLocal int64 [P]: id - offset when that lies in
// [0, numLocal) and the token (p / K) is below the valid count, else numLocal (skip).
// Valid count: *gNumValid when given (decode's device scalar), else numValidHost (< 0: no limit).
template <int kThreads>
__global__ void __launch_bounds__(kThreads) local_ids_kernel(
    const long long* __restrict__ gIdx, long long numPairs, int topK, long long offset,
    int numLocal, const long long* __restrict__ gNumValid, long long numValidHost,
    long long* __restrict__ gLocal) {
  pdl::begin();  // before any global access (pdl.cuh)
  const long long p = static_cast<long long>(blockIdx.x) * kThreads + threadIdx.x;
  if (p >= numPairs) return;
  const bool limited = gNumValid != nullptr || numValidHost >= 0;
  const long long valid = gNumValid != nullptr ? __ldg(gNumValid) : numValidHost;
  const long long local = __ldg(gIdx + p) - offset;
  const bool skip = local < 0 || local >= numLocal || (limited && p / topK >= valid);
  gLocal[p] = skip ? numLocal : local;
}

// The same with the shared expert folded in as local expert numLocal (MoE's fold): gIdx [T, K]
// global ids and gWeights fp32 [T, K] -> gLocal int64 [T, K + 1] and gLocalWeights fp32 [T, K + 1].
// Slot j < K: local_ids_kernel's id with the skip sentinel numLocal + 1, its weight copied; slot
// K: numLocal at weight 1 (numLocal + 1 for a token at or past the valid count). One thread per
// output slot; replaces local_ids_kernel and the 5-7 torch ops of layouts.with_shared_expert.
template <int kThreads>
__global__ void __launch_bounds__(kThreads) local_ids_shared_kernel(
    const long long* __restrict__ gIdx, const float* __restrict__ gWeights, long long numTokens,
    int topK, long long offset, int numLocal, const long long* __restrict__ gNumValid,
    long long numValidHost, long long* __restrict__ gLocal, float* __restrict__ gLocalWeights) {
  pdl::begin();  // before any global access (pdl.cuh)
  const long long p = static_cast<long long>(blockIdx.x) * kThreads + threadIdx.x;
  const int width = topK + 1;
  if (p >= numTokens * width) return;
  const long long token = p / width;
  const int slot = static_cast<int>(p - token * width);
  const bool limited = gNumValid != nullptr || numValidHost >= 0;
  const long long valid = gNumValid != nullptr ? __ldg(gNumValid) : numValidHost;
  const bool past = limited && token >= valid;
  long long local;
  float weight;
  if (slot == topK) {
    local = past ? numLocal + 1 : numLocal;
    weight = 1.0f;
  } else {
    const long long q = token * topK + slot;
    local = __ldg(gIdx + q) - offset;
    if (local < 0 || local >= numLocal || past) local = numLocal + 1;
    weight = __ldg(gWeights + q);
  }
  gLocal[p] = local;
  gLocalWeights[p] = weight;
}

}  // namespace router
}  // namespace moe_fp8
