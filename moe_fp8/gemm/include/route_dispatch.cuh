// route_dispatch.cuh — the decode step's expert selection and masked dispatch in one kernel, for
// a few tokens (T * top_k <= 256 pairs): router.cuh's route_kernel (from the gate logits, its own
// sigmoid) followed by permute.cuh's masked_dispatch_small_kernel, without the launch and the
// global round trip of the top-k ids between them. Every CTA selects the experts of all T tokens
// itself (warp w takes tokens w, w + 8, ...; the same per-token code as route_kernel) into shared
// memory, then runs the small dispatch on them; CTA 0 also writes topk_idx / topk_weights. Every
// output is the two kernels' value, bit for bit. Grid: permute.py small_dispatch_grid
// (>= ceil(T * top_k / 8)).
#pragma once

#include "permute.cuh"
#include "router.cuh"

namespace moe_fp8 {
namespace route_dispatch {

// kThreads = permute::kPermuteThreads (one thread per pair in the dispatch); kPerLane as
// route_kernel's (ceil(E / 32) up to a power of two).
template <int kThreads, int kPerLane>
__global__ void __launch_bounds__(kThreads) route_dispatch_small_kernel(
    // route_kernel's (logits; no counts)
    const float* __restrict__ gLogits, const float* __restrict__ gBias, int numTokens,
    long long logitStride, int numExpertsGlobal, int numGroups, int topkGroup, int topK,
    int fillNegInf, int normalize, float scaling, long long* __restrict__ gTopkIdx,
    float* __restrict__ gTopkWeights,
    // masked_dispatch_small_kernel's, its ids and weights being the selection above
    int numExperts, int maxRows, long long idOffset, const long long* __restrict__ gNumValid,
    int* __restrict__ gMaskedM, long long* __restrict__ gPairExpert,
    long long* __restrict__ gPairRank, bool* __restrict__ gPairKept,
    long long* __restrict__ gNumOverflow, long long* __restrict__ gSlotRow,
    float* __restrict__ gSlotWeight, const uint4* __restrict__ gX, const float* __restrict__ gXs,
    uint4* __restrict__ gA, float* __restrict__ gSa, long long* __restrict__ gRowToken,
    long long* __restrict__ gRowSlot, int vectorsPerRow, long long xRowVectors, int groups,
    long long xsToken, long long xsGroup, long long saBatch, long long saRow, long long saGroup) {
  pdl::begin();  // before any global access (pdl.cuh)
  static_assert(kThreads == permute::kPermuteThreads, "one thread per pair in the dispatch");
  constexpr int kWarps = kThreads / 32;
  __shared__ float sChoice[kWarps][router::kMaxExperts];
  __shared__ float sScore[kWarps][router::kMaxExperts];
  __shared__ long long sIdx[permute::kSmallPairs];
  __shared__ float sWeight[permute::kSmallPairs];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const router::RouteParams rp{numExpertsGlobal, numGroups, topkGroup, topK, fillNegInf};
  for (int token = warp; token < numTokens; token += kWarps) {  // warp-uniform
    long long myIdx;
    float myWeight, sum;
    router::route_token<kPerLane, true>(gLogits + token * logitStride, gBias, rp, sChoice[warp],
                                        sScore[warp], myIdx, myWeight, sum);
    if (lane < topK) {
      const int p = token * topK + lane;
      const float w = router::route_weight(myWeight, sum, normalize, scaling);
      sIdx[p] = myIdx;
      sWeight[p] = w;
      if (blockIdx.x == 0) {
        gTopkIdx[p] = myIdx;
        gTopkWeights[p] = w;
      }
    }
    __syncwarp();  // the warp's next token rewrites sChoice / sScore
  }
  __syncthreads();
  // the pairs' local experts as masked_dispatch_small_kernel maps global ids (permute::GlobalIds)
  const int numPairs = numTokens * topK;
  long long validPairs = numPairs;
  if (gNumValid != nullptr)
    validPairs = min(static_cast<long long>(numPairs), max(__ldg(gNumValid), 0ll) * topK);
  const int p = threadIdx.x;
  int expert = -1;
  if (p < numPairs && p < validPairs) {
    const long long e = sIdx[p] - idOffset;
    expert = e >= 0 && e < numExperts ? static_cast<int>(e) : -1;
  }
  const float weight = p < numPairs ? sWeight[p] : 0.0f;
  const permute::SmallDispatch d{numPairs, numExperts, maxRows, topK, gMaskedM, gPairExpert,
                                 gPairRank, gPairKept, gNumOverflow, gSlotRow, gSlotWeight, gX,
                                 gXs, gA, gSa, gRowToken, gRowSlot, vectorsPerRow, xRowVectors,
                                 groups, xsToken, xsGroup, saBatch, saRow, saGroup};
  permute::masked_dispatch_small_body(d, expert, weight);
}

}  // namespace route_dispatch
}  // namespace moe_fp8
