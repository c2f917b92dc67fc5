// Epilogues of the FP8 GEMM family (one per output kind, chosen by the kernel's policy):
//   Epilogue        fp32 accumulators -> bf16 -> shared memory -> TMA store (or predicated rows)
//   EpilogueAddF32  fp32 accumulators -> shared memory -> TMA reduce-add into fp32 D (D += tile),
//                   or (kAdd = false, split K) a TMA store into D's slice `tile.expert`
//   EpilogueSliceBf16  fp32 accumulators -> bf16 -> shared memory (Epilogue's layout) -> TMA store
//                   into bf16 D's slice `tile.expert` (k-grouped weight gradients for bf16
//                   master weights: half the bytes of fp32 and no conversion pass after)
// Both are called by all 128 threads of a math warpgroup with its 64-row share of the tile and
// keep at most one bulk group in flight per warpgroup (waited for before the buffer is rewritten).
//
// Epilogue (bf16):
// Each math warpgroup owns 64 rows of the tile and stages them in its own shared buffer
//   s_d: [kBlockN / 16 chunks][64 rows][32 bytes]   (16 bf16 columns per chunk)
// in the TMA 32-byte swizzle (16-byte half h of row r sits at h ^ ((r >> 2) & 1)), which keeps
// stmatrix free of bank conflicts for any kBlockN that is a multiple of 16 (a 128-byte swizzle
// would need 64-column chunks, which non-power-of-two block widths such as 112 do not split
// into). Full tiles leave through TMA stores of 16 x 64 boxes (clipped at the tensor's M and N);
// tiles cut by masked_m leave through predicated 16-byte stores so rows >= masked_m are never
// written.
#pragma once

#include "ptx.cuh"
#include "scheduler.cuh"

namespace moe_fp8 {

template <int kN, int kBlockN, int kLayout>
struct Epilogue {
  static constexpr int kRows = 64;                  // rows per math warpgroup
  static constexpr int kChunks = kBlockN / 16;      // 16-column chunks
  static constexpr int kChunkBytes = kRows * 32;    // one chunk of 64 rows x 32 bytes
  static constexpr int kBytes = kChunks * kChunkBytes;  // per warpgroup
  static_assert(kBlockN % 16 == 0, "stmatrix x4 writes 16 columns at a time");

  __device__ __forceinline__ static u32 swizzled(int chunk, int row, int half) {
    return chunk * kChunkBytes + row * 32 + ((half ^ ((row >> 2) & 1)) << 4);
  }

  // r_acc is the m64nNk32 accumulator fragment: for 8-column group j, registers 4j, 4j+1 hold
  // row lane/4 (columns 2*(lane%4) + {0,1}) and 4j+2, 4j+3 hold row lane/4 + 8, in 16-row slab
  // `warp`. One stmatrix x4 covers 16 rows x 16 columns: matrices (rows 0-7 | 8-15) x (j | j+1).
  __device__ __forceinline__ static void to_smem(const float (&r_acc)[kBlockN / 2], u32 s_d,
                                                 int warp, int lane) {
    const int mat = lane >> 3;
    const int row = warp * 16 + (mat & 1) * 8 + (lane & 7);
    const int half = mat >> 1;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const float* r = r_acc + c * 8;
      ptx::stmatrix_x4(s_d + swizzled(c, row, half), ptx::pack_bf16x2(r[0], r[1]),
                       ptx::pack_bf16x2(r[2], r[3]), ptx::pack_bf16x2(r[4], r[5]),
                       ptx::pack_bf16x2(r[6], r[7]));
    }
  }

  // Issued by one thread after the whole warpgroup has written s_d and fenced.
  __device__ __forceinline__ static void tma_store(const ptx::TmaDesc* tma_d, const void* s_d,
                                                   int n0, int row0) {
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      if (n0 + c * 16 < kN)
        ptx::tma_store_2d(tma_d, static_cast<const char*>(s_d) + c * kChunkBytes, n0 + c * 16,
                          row0);
    }
    ptx::tma_store_commit();
  }

  // All 128 threads of the warpgroup: rows [0, rows) of s_d to g_d[row0 + r, n0 + ...], except
  // rows whose g_row_expert entry (m_indices; may be null) is negative: skipped, or with
  // kLayoutContiguousZeroPad written as zeros.
  __device__ __forceinline__ static void predicated_store(const char* s_d, unsigned short* g_d,
                                                          const int* g_row_expert, int n0,
                                                          long row0, int rows, int tid) {
    constexpr int kPieces = kBlockN / 8;  // 16-byte pieces per row
    for (int p = tid; p < rows * kPieces; p += 128) {
      const int row = p / kPieces;
      const int piece = p - row * kPieces;
      if (n0 + piece * 8 >= kN) continue;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (g_row_expert == nullptr || __ldg(g_row_expert + row0 + row) >= 0)
        v = *reinterpret_cast<const uint4*>(s_d + swizzled(piece >> 1, row, piece & 1));
      else if constexpr (kLayout != kLayoutContiguousZeroPad)
        continue;
      *reinterpret_cast<uint4*>(g_d + (row0 + row) * kN + n0 + piece * 8) = v;
    }
  }

  // The warpgroup's 64 rows into s_d, visible to TMA stores (all 128 threads). The previous
  // tile's TMA store must have finished reading s_d before it is rewritten.
  __device__ __forceinline__ static void stage(const float (&r_acc)[kBlockN / 2],
                                               unsigned char* s_d, int tid, int bar_id) {
    if (tid == 0) ptx::tma_store_wait_read<0>();
    ptx::named_barrier(bar_id, 128);
    to_smem(r_acc, ptx::smem_addr(s_d), tid / 32, tid % 32);
    ptx::fence_proxy_async_smem();
    ptx::named_barrier(bar_id, 128);
  }

  // The whole epilogue of one warpgroup: rows [64 * warpgroup, +64) of the tile.
  __device__ __forceinline__ static void write_tile(const float (&r_acc)[kBlockN / 2],
                                                    unsigned char* s_d, const ptx::TmaDesc* tma_d,
                                                    const Tile& tile, const GemmParams& params,
                                                    int warpgroup, int tid, int bar_id) {
    stage(r_acc, s_d, tid, bar_id);
    const int rows = tile.rows_valid - warpgroup * 64;  // rows of this warpgroup to write
    const int row0 = tile.m_row + warpgroup * 64;
    if (rows <= 0) return;
    // Whole 64-row slabs leave through TMA; a slab cut by masked_m, or ending in
    // contiguous-layout padding rows (m_indices == -1 only ever ends a 128-row segment),
    // takes the per-row predicated path so those rows are never written.
    bool whole = true;
    if constexpr (kLayout == kLayoutMasked) whole = rows >= 64;
    if constexpr (is_m_indices_layout(kLayout)) whole = __ldg(params.g_layout + row0 + 63) >= 0;
    // zero padding: an all-padding tile (no K block) holds zeros throughout and leaves by TMA
    if constexpr (kLayout == kLayoutContiguousZeroPad) whole = whole || tile.num_k_blocks == 0;
    if (whole) {
      if (tid == 0) tma_store(tma_d, s_d, tile.n0, row0);
    } else {
      predicated_store(reinterpret_cast<const char*>(s_d), static_cast<unsigned short*>(params.g_d),
                       is_m_indices_layout(kLayout) ? params.g_layout : nullptr, tile.n0, row0,
                       min(rows, 64), tid);
    }
  }
};

// fp32 accumulate epilogue (k-grouped weight gradients): D[e][rows, cols] += tile.
// Each warpgroup stages its 64 rows as kBlockN / 32 chunks of [64 rows][32 fp32] = 128-byte rows
// in the TMA 128-byte swizzle (16-byte unit u of row r at u ^ (r % 8)); a warp's 8-byte stores
// (8 rows x 4 column pairs) then spread over all 32 banks: 2 wavefronts for 256 bytes, the
// minimum (unswizzled 512-byte rows would put all 8 rows in the same banks: 8-way conflicts).
// One TMA reduce-add per chunk adds it into D at L2, so tiles of one expert that share outputs
// need no ordering and D is read and written once per tile, asynchronously. kEvictFirst (stores
// only): D's lines leave L2 before the operands' (the weight gradient's overwrite: 32 experts
// with uneven tokens write 1.9-3.8 GB of D, which otherwise evicted the operands, read 2.7x from
// DRAM; H100 2026-12-06, 3 interleaved rounds: 941 -> 895 us at 7168 x 2048 and 1790 -> 1669 us
// at 4096 x 7168; the record rows and the reduce-add within the spread).
// A 256-wide tile is staged and sent in two passes of 128 columns through one 32 KB buffer per
// warpgroup (the second waits for TMA to have read the first): its whole fp32 tile (128 KB) would
// leave room for one ring stage, the halves leave room for three.
template <int kN, int kBlockN, bool kAdd = true, bool kEvictFirst = false>
struct EpilogueAddF32 {
  static_assert(!(kAdd && kEvictFirst), "the hint is for stores");
  static constexpr int kPasses = kBlockN == 256 ? 2 : 1;
  static constexpr int kChunks = kBlockN / 32 / kPasses;  // staged per pass
  static constexpr int kChunkBytes = 64 * 128;
  static constexpr int kBytes = kChunks * kChunkBytes;  // per warpgroup
  static_assert(kBlockN % 32 == 0, "128-byte chunks of 32 fp32 columns");

  __device__ __forceinline__ static void write_tile(const float (&r_acc)[kBlockN / 2],
                                                    unsigned char* s_d, const ptx::TmaDesc* tma_d,
                                                    const Tile& tile, const GemmParams& params,
                                                    int warpgroup, int tid, int bar_id) {
    const int warp = tid / 32, lane = tid % 32;
    const u32 s_base = ptx::smem_addr(s_d);
#pragma unroll
    for (int pass = 0; pass < kPasses; ++pass) {
      if (tid == 0) ptx::tma_store_wait_read<0>();
      ptx::named_barrier(bar_id, 128);
#pragma unroll
      for (int j = 0; j < kChunks * 4; ++j) {  // 8-column groups of this pass
        const int byte = (j % 4) * 32 + (lane % 4) * 8;  // inside the chunk's 128-byte row
        const float* r = r_acc + 4 * (pass * kChunks * 4 + j);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = warp * 16 + h * 8 + lane / 4;
          const u32 addr = s_base + (j / 4) * kChunkBytes + row * 128 +
                           (((byte >> 4) ^ (row % 8)) << 4) + (byte & 15);
          ptx::st_shared_v2(addr, r[2 * h], r[2 * h + 1]);
        }
      }
      ptx::fence_proxy_async_smem();
      ptx::named_barrier(bar_id, 128);
      if (tid == 0 && tile.rows_valid > warpgroup * 64) {
        u64 policy = 0;
        if constexpr (kEvictFirst) policy = ptx::l2_evict_first_policy();
#pragma unroll
        for (int c = 0; c < kChunks; ++c) {
          const int n0 = tile.n0 + (pass * kChunks + c) * 32;
          if (n0 >= kN) continue;
          if constexpr (kAdd)
            ptx::tma_reduce_add_3d(tma_d, s_d + c * kChunkBytes, n0, tile.m_row + warpgroup * 64,
                                   tile.expert);
          else if constexpr (kEvictFirst)
            ptx::tma_store_3d_hint(tma_d, s_d + c * kChunkBytes, n0, tile.m_row + warpgroup * 64,
                                   tile.expert, policy);
          else
            ptx::tma_store_3d(tma_d, s_d + c * kChunkBytes, n0, tile.m_row + warpgroup * 64,
                              tile.expert);
        }
        ptx::tma_store_commit();
      }
    }
  }
};

// bf16 store into slice tile.expert of a 3-D D [E, M, N] (k-grouped, overwriting): staged as
// the bf16 Epilogue stages (16-column chunks of 64 rows, 32-byte swizzle), one 16 x 64 x 1 TMA box
// per chunk, clipped at D's M and N.
template <int kN, int kBlockN>
struct EpilogueSliceBf16 {
  using Staging = Epilogue<kN, kBlockN, kLayoutDense>;
  static constexpr int kBytes = Staging::kBytes;  // per warpgroup

  __device__ __forceinline__ static void write_tile(const float (&r_acc)[kBlockN / 2],
                                                    unsigned char* s_d, const ptx::TmaDesc* tma_d,
                                                    const Tile& tile, const GemmParams& params,
                                                    int warpgroup, int tid, int bar_id) {
    Staging::stage(r_acc, s_d, tid, bar_id);
    if (tid == 0 && tile.rows_valid > warpgroup * 64) {
#pragma unroll
      for (int c = 0; c < Staging::kChunks; ++c) {
        if (tile.n0 + c * 16 < kN)
          ptx::tma_store_3d(tma_d, s_d + c * Staging::kChunkBytes, tile.n0 + c * 16,
                            tile.m_row + warpgroup * 64, tile.expert);
      }
      ptx::tma_store_commit();
    }
  }
};

}  // namespace moe_fp8
