// masked_split.cuh — split K for the masked layout's decode GEMMs: work units claimed at run
// time, and the last split of a tile to finish sums the others before the epilogue.
//
// Why: a decode GEMM streams its weights in a few long tiles per SM (one token: the down GEMM's
// 448 tiles of 64 x 128 on 132 SMs, the fused gate-up's 256), and SMs stream at unequal rates,
// so the CTAs' last epilogues spread over 5-10 us while the card's bandwidth idles (tile trace,
// H200 2026-12-06). Splitting K makes the units kSplitK times shorter, and claiming them from a
// global counter lets the SMs that run ahead take more of them.
//
// Units (scheduler.cuh kDynamicUnits): index u = tile * kSplitK + split. A CTA's first unit is
// blockIdx.x, every later one gridDim.x + atomicAdd(claim counter). The producer's loading thread
// claims each index and publishes it in a small shared ring (UnitRing); every other warp of the
// CTA (math, scale, gather) takes it from there, so all roles walk the same sequence.
//
// Partials: each math warpgroup writes its valid rows' accumulators (fp32, promoted) to
// g_partials[split][ws_row + r][column] ([kSplitK][partial_rows][kN]: the launch's rows numbered
// expert by expert, sum of masked_m in all), then counts itself on the tile's flag. The one that
// brings the count to kSplitK is the last: it adds the kSplitK partials in split order (its own
// from registers: the same bits whichever split is last), resets the flag and runs the epilogue.
//
// g_sync (int, zeroed once by the host): [0] the claim counter, [1] CTAs done claiming (the last
// resets both, so the next launch — a graph replay — starts from zero), [2 + tile_id *
// warpgroups + w] the flags (reset by their last split). One g_sync per call site of a graph.
#pragma once

#include "ptx.cuh"
#include "scheduler.cuh"

namespace moe_fp8 {

struct SplitArgs {
  int* g_sync = nullptr;
  float* g_partials = nullptr;
  int partial_rows = 0;  // rows of each split's partials: at least the launch's sum of masked_m
};

constexpr int kUnitRing = 8;  // claimed unit indices in flight between the producer and the rest
constexpr int kFixRing = 8;   // units whose partials wait for the fix-up warp (kHelperFixup)

// The shared ring of claimed unit indices. Slots are used in order; `j` counts a role's units.
struct UnitRing {
  int* s_idx;
  u64* full;   // [kUnitRing], one arrival: the claimer's
  u64* empty;  // [kUnitRing], one arrival per lane of the consuming warps

  // The claiming thread: index `idx` as unit j of this CTA.
  __device__ __forceinline__ void publish(int j, int idx) const {
    const int slot = j % kUnitRing;
    ptx::mbar_wait_idle(&empty[slot], ((j / kUnitRing) & 1) ^ 1);
    s_idx[slot] = idx;
    ptx::mbar_arrive(&full[slot]);  // release: the index before the phase
  }

  // Every lane of a consuming warp: unit j of this CTA.
  __device__ __forceinline__ int take(int j, int lane) const {
    const int slot = j % kUnitRing;
    ptx::mbar_wait(&full[slot], (j / kUnitRing) & 1);
    const int idx = s_idx[slot];
    // every lane arrives (not lane 0 after a __syncwarp): the order racecheck can see
    ptx::mbar_arrive(&empty[slot]);
    return idx;
  }
};

// Unit j of this CTA for the claiming thread: its first is blockIdx.x, the others are claimed.
__device__ __forceinline__ int claim_unit(const SplitArgs& args, int j) {
  return j == 0 ? static_cast<int>(blockIdx.x) : static_cast<int>(gridDim.x) + atomicAdd(args.g_sync, 1);
}

// After the claiming thread's last claim (an index past the last unit): the CTA that finishes
// claiming last resets the counters for the next launch (every claim of this one is done).
__device__ __forceinline__ void finish_claims(const SplitArgs& args) {
  if (atomicAdd(args.g_sync + 1, 1) == static_cast<int>(gridDim.x) - 1) {
    atomicExch(args.g_sync, 0);
    atomicExch(args.g_sync + 1, 0);
  }
}

// A masked kernel's policy with each tile's K blocks in kSplits slices, claimed at run time.
template <class Base, int kSplits>
struct MaskedSplitPolicy : Base {
  static_assert(kSplits >= 2 && Base::kTileKBlocks % kSplits == 0 && !Base::kColumnScales,
                "masked split K: at least two slices of the K blocks, block scales");
  static constexpr int kTileKBlocks = Base::kTileKBlocks / kSplits;
  using Scheduler = typename Base::Scheduler::template WithSplitK<kSplits>;
  static_assert(Scheduler::kDynamicUnits, "masked split K: the masked layout");
};

// All 128 threads of a math warpgroup after a unit's mainloop (every wgmma group retired): this
// split's valid rows of the tile to the partials. False: the warpgroup has no row of the tile.
// r_acc is the m64nNk32 fragment (epilogue.cuh): register 4 j + 2 h + c holds row lane / 4 + 8 h
// of the warp's 16-row slab, column 8 j + 2 (lane % 4) + c of the tile; kPaired (fused SwiGLU):
// the tile's 256 columns are gate block n0 / 128 then its up block, at partial columns 2 n0 + ...
template <int kN, bool kPaired, int kAcc>
__device__ __forceinline__ bool store_partials(const float (&r_acc)[kAcc], const Tile& tile,
                                               const SplitArgs& args, int warpgroup, int tid) {
  const int rows = min(tile.rows_valid - warpgroup * 64, 64);
  if (rows <= 0) return false;  // warpgroup-uniform
  const int warp = tid / 32, lane = tid % 32;
  const int r_lo = warp * 16 + lane / 4;
  const long row0 = tile.ws_row + warpgroup * 64;
  // The host sizes the partials for the launch's rows (the layer: its tokens x top-k); counts
  // beyond them would write past the buffer.
  if (row0 + rows > args.partial_rows) __trap();
  constexpr int kTileCols = 2 * kAcc;  // kBlockN: from column n0 (paired: 2 n0, gate then up)
  const int col0 = (kPaired ? 2 * tile.n0 : tile.n0) + 2 * (lane % 4);
  float* own = args.g_partials + (long(tile.split) * args.partial_rows + row0) * kN + col0;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = r_lo + 8 * h;
    if (r >= rows) continue;
#pragma unroll
    for (int j = 0; j < kAcc / 4; ++j) {
      // a last column block may end past N (a pair of columns lies wholly on one side)
      if (kN % kTileCols != 0 && col0 + 8 * j >= kN) continue;
      *reinterpret_cast<float2*>(own + long(r) * kN + 8 * j) =
          make_float2(r_acc[4 * j + 2 * h], r_acc[4 * j + 2 * h + 1]);
    }
  }
  return true;
}

// The fix-up on the math warpgroup itself (the fused SwiGLU's epilogue needs the sum in its
// registers): store, count, and if this is the tile's last split, sum all splits in order into
// r_acc. True: this warpgroup runs the tile's epilogue.
// NOTE: the count's round trip stalls the warpgroup: ~3.6 us per unit with fix-up and epilogue
// (tile trace, H100 2026-12-06), more than the tail it removes (kHelperFixup moves it off).
template <int kSplits, int kN, int kNumMathWG, bool kPaired, int kAcc>
__device__ __forceinline__ bool split_fixup(float (&r_acc)[kAcc], const Tile& tile,
                                            const SplitArgs& args, int warpgroup, int tid,
                                            int bar_id) {
  if (!store_partials<kN, kPaired>(r_acc, tile, args, warpgroup, tid)) return false;
  const int rows = min(tile.rows_valid - warpgroup * 64, 64);
  const int warp = tid / 32, lane = tid % 32;
  const int r_lo = warp * 16 + lane / 4;
  const long row0 = tile.ws_row + warpgroup * 64;
  constexpr int kTileCols = 2 * kAcc;
  const int col0 = (kPaired ? 2 * tile.n0 : tile.n0) + 2 * (lane % 4);
  // Release the warpgroup's partials (barrier, then the count with release semantics), acquire
  // the others' in the last (the same count's acquire, then the barrier).
  ptx::named_barrier(bar_id, 128);
  bool last = false;
  if (tid == 0) {
    int* flag = args.g_sync + 2 + tile.tile_id * kNumMathWG + warpgroup;
    last = ptx::atomic_add_acq_rel_gpu(flag, 1) == kSplits - 1;
    if (last) atomicExch(flag, 0);
  }
  if (!ptx::named_barrier_or(bar_id, 128, last)) return false;
  // Every split's partials from L2, this one's included (in split order: the same sum whichever
  // split is last); a thread's rows past the valid ones read the last valid row (never written).
  const long split_stride = long(args.partial_rows) * kN;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float* src = args.g_partials + (row0 + min(r_lo + 8 * h, rows - 1)) * kN + col0;
#pragma unroll
    for (int j = 0; j < kAcc / 4; ++j) {
      if (kN % kTileCols != 0 && col0 + 8 * j >= kN) continue;
      float2 sum = __ldcg(reinterpret_cast<const float2*>(src + 8 * j));
#pragma unroll
      for (int s = 1; s < kSplits; ++s) {
        const float2 p = __ldcg(reinterpret_cast<const float2*>(src + s * split_stride + 8 * j));
        sum.x += p.x;
        sum.y += p.y;
      }
      r_acc[4 * j + 2 * h] = sum.x;
      r_acc[4 * j + 2 * h + 1] = sum.y;
    }
  }
  return true;
}

// The fix-up warp (kHelperFixup: the bf16 NT epilogue; producer warp 2, otherwise idle), once the
// math warps have stored a unit's partials (`done` barrier): count the unit on its tile's flag
// and, if it is the tile's last split, sum the splits' partials in order and store the valid rows
// as bf16 (g_d [E * M_max, kN], rows m_row + r), 4 columns per lane. The math warps go on to the
// next unit meanwhile.
template <int kSplits, int kN, int kBlockN>
__device__ __forceinline__ void finish_split_unit(const Tile& tile, const SplitArgs& args,
                                                  void* g_d, int lane) {
  int last = 0;
  if (lane == 0) {
    // release: the math warps' partials (ordered before this by the `done` barrier); acquire:
    // the other splits' (released by their counts)
    last = ptx::atomic_add_acq_rel_gpu(args.g_sync + 2 + tile.tile_id, 1) == kSplits - 1;
    if (last) atomicExch(args.g_sync + 2 + tile.tile_id, 0);
  }
  if (!__shfl_sync(0xffffffffu, last, 0)) return;
  const int rows = min(tile.rows_valid, 64);
  const long split_stride = long(args.partial_rows) * kN;
  const float* src = args.g_partials + long(tile.ws_row) * kN + tile.n0;
  unsigned short* dst = static_cast<unsigned short*>(g_d) + long(tile.m_row) * kN + tile.n0;
  for (int i = lane; i < rows * (kBlockN / 4); i += 32) {
    const int r = i / (kBlockN / 4), c = (i - r * (kBlockN / 4)) * 4;
    if (tile.n0 + c >= kN) continue;  // a last column block past N (4 columns on one side)
    float4 sum = __ldcg(reinterpret_cast<const float4*>(src + long(r) * kN + c));
#pragma unroll
    for (int s = 1; s < kSplits; ++s) {
      const float4 p = __ldcg(reinterpret_cast<const float4*>(src + s * split_stride +
                                                              long(r) * kN + c));
      sum.x += p.x;
      sum.y += p.y;
      sum.z += p.z;
      sum.w += p.w;
    }
    *reinterpret_cast<uint2*>(dst + long(r) * kN + c) =
        make_uint2(ptx::pack_bf16x2(sum.x, sum.y), ptx::pack_bf16x2(sum.z, sum.w));
  }
}

}  // namespace moe_fp8
