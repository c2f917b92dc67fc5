// Epilogue of the FP8 GEMM family: fp32 accumulators -> bf16 -> shared memory -> global.
//
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

namespace moe_fp8 {

template <int kN, int kBlockN>
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
  // rows whose g_row_expert entry (contiguous layout's m_indices; may be null) is negative.
  __device__ __forceinline__ static void predicated_store(const char* s_d, unsigned short* g_d,
                                                          const int* g_row_expert, int n0,
                                                          long row0, int rows, int tid) {
    constexpr int kPieces = kBlockN / 8;  // 16-byte pieces per row
    for (int p = tid; p < rows * kPieces; p += 128) {
      const int row = p / kPieces;
      const int piece = p - row * kPieces;
      if (n0 + piece * 8 >= kN) continue;
      if (g_row_expert != nullptr && __ldg(g_row_expert + row0 + row) < 0) continue;
      const uint4 v = *reinterpret_cast<const uint4*>(s_d + swizzled(piece >> 1, row, piece & 1));
      *reinterpret_cast<uint4*>(g_d + (row0 + row) * kN + n0 + piece * 8) = v;
    }
  }
};

}  // namespace moe_fp8
