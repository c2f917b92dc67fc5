// tile_trace.cuh — per-tile timestamps of the GEMM mainloop, for experiments only.
//
// Compiled in only when the instance is built with MOE_FP8_TILE_TRACE defined (its value: the
// tiles recorded per CTA; benchmarks/tile_trace.py); otherwise every MOE_FP8_TRACE(...) expands to
// nothing and the bundled instances keep their SASS. The host writes the address of a zeroed
// uint64 buffer [grid][kTiles][kFields] into the module global `moe_fp8_tile_trace`; each CTA then
// fills one record per tile (a zero field: not reached):
//   0  (smid << 32) | tile index in the CTA      4  math: the tile's last wgmma group retired
//   1  (m_row << 32) | n0 of the tile            5  math: the tile's epilogue issued
//   2  math: the tile became the next one        6  producer: slot of K block 0 acquired
//   3  math: K block 0's slot landed             7  producer: last K block's loads issued
// Times are %globaltimer (ns, one clock for every SM). Math times come from thread 0 of
// warpgroup 0 only.
#pragma once

#ifdef MOE_FP8_TILE_TRACE

extern "C" {
__device__ unsigned long long* moe_fp8_tile_trace;
}

namespace moe_fp8 {
namespace trace {

constexpr int kTiles = MOE_FP8_TILE_TRACE;
constexpr int kFields = 8;

__device__ __forceinline__ unsigned long long now() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ unsigned smid() {
  unsigned id;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(id));
  return id;
}

__device__ __forceinline__ void record(int tile, int field, unsigned long long value) {
  unsigned long long* buffer = moe_fp8_tile_trace;
  if (buffer == nullptr || tile >= kTiles) return;
  buffer[(static_cast<long>(blockIdx.x) * kTiles + tile) * kFields + field] = value;
}

// The tile's identity and the producer's / math warps' clock at `field`.
template <class Tile>
__device__ __forceinline__ void record_tile(int tile, const Tile& t) {
  record(tile, 0, (static_cast<unsigned long long>(smid()) << 32) | static_cast<unsigned>(tile));
  record(tile, 1, (static_cast<unsigned long long>(static_cast<unsigned>(t.m_row)) << 32) |
                      static_cast<unsigned>(t.n0));
}

}  // namespace trace
}  // namespace moe_fp8

#define MOE_FP8_TRACE(...) __VA_ARGS__
#else
#define MOE_FP8_TRACE(...)
#endif
