// Dynamic tiles: a persistent GEMM's clusters claim their tiles from a global counter at run time
// instead of walking a fixed stride (scheduler.cuh), so CTAs that start late (their SMs still
// held by a kernel on another stream, e.g. the layer's shared expert) take fewer tiles and the
// grid ends together instead of in a tail.
//
// Only the scale warp (gemm_core.cuh, producer warp 1) claims. Cluster c's first tile is c (no
// atomic at start); later ones are num_clusters + atomicAdd(counter[0], 1). The claim is taken
// once a tile-scale buffer is free, so a cluster holds at most the tile it computes and the next;
// the scale warp publishes each ready tile index beside its scales (or -1: no tile left) and the
// TMA producer and math warpgroups read it from there.
//
// In a 2-CTA cluster both CTAs must run the same tiles (B or A multicast): rank 0 claims and
// hands each index to rank 1 through a two-slot mailbox in rank 1's shared memory, written with
// st.async (the store completes the transaction bytes its mbarrier expects: no cluster-scope
// fence, whose MEMBAR.GPU cost the multicast ring 2x; ptx.cuh mbar_arrive_cluster); rank 1 hands
// each slot back with a remote arrive on rank 0's `mail_empty`.
//
// The counter's owner (the host) zeroes it once; every launch leaves it at zero: each cluster,
// after its last claim, counts itself done on counter[1], and the last one resets both. A launch
// whose claims would overlap another's on the same counter (two streams at once) is the caller's
// error: one counter per stream of launches.
#pragma once

#include "ptx.cuh"

namespace moe_fp8 {

template <int kClusterSize>
struct TileClaim {
  static_assert(kClusterSize == 1 || kClusterSize == 2, "clusters of 1 or 2 CTAs");
  int* counter;       // [2]: claims past the first round, clusters done (global)
  int* s_mail;        // [2] rank 1's mailbox (each CTA has one; rank 0's is unused)
  u64* mail_full;     // [2] rank 1: the index has landed (st.async's bytes)
  u64* mail_empty;    // [2] rank 0: rank 1 has read the slot
  u32 rank;
  int num_clusters;
  int first;          // the first round's index, -1 once used
  int slot = 0;
  u32 phase = 0;

  __device__ TileClaim(int* g_counter, int* mail, u64* full, u64* empty, u32 cta_rank)
      : counter(g_counter), s_mail(mail), mail_full(full), mail_empty(empty), rank(cta_rank),
        num_clusters(static_cast<int>(gridDim.x) / kClusterSize),
        first(static_cast<int>(blockIdx.x) / kClusterSize) {}

  // The next linear tile index of this cluster, the same in every lane of the calling warp (all
  // 32 lanes call it); past the last tile once the work is gone.
  __device__ __forceinline__ int next() {
    int idx = first;
    const int lane = threadIdx.x % 32;
    if (first >= 0) {
      first = -1;
      return idx;
    }
    if (lane == 0) {
      if (rank == 0) {
        idx = num_clusters + atomicAdd(counter, 1);
        if constexpr (kClusterSize > 1) {
          ptx::mbar_wait_idle(&mail_empty[slot], phase ^ 1);  // rank 1 read the slot's last index
          ptx::st_async_cluster(&s_mail[slot], idx, &mail_full[slot], 1);
        }
      } else {
        ptx::mbar_arrive_expect_tx(&mail_full[slot], 4);
        ptx::mbar_wait_idle(&mail_full[slot], phase);
        idx = s_mail[slot];
      }
    }
    idx = __shfl_sync(0xffffffffu, idx, 0);
    if (kClusterSize > 1 && rank == 1 && lane == 0) ptx::mbar_arrive_cluster(&mail_empty[slot], 0);
    if (++slot == 2) slot = 0, phase ^= 1;
    return idx;
  }

  // After the cluster's last claim (an index past the work), by one lane of rank 0: count the
  // cluster done; the last one resets the counter for the next launch.
  __device__ __forceinline__ void finish() {
    __threadfence();  // this cluster's claims before its count
    if (atomicAdd(counter + 1, 1) == num_clusters - 1) {
      atomicExch(counter, 0);
      atomicExch(counter + 1, 0);
    }
  }
};

}  // namespace moe_fp8
