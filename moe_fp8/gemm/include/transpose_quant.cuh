// transpose_quant.cuh — FP8 (e4m3) quantisation that also writes the transposed copy, for the
// training path (layers/autograd.py), in one pass over the input:
//
//   per_block_quant_transpose_kernel   w [E, N, K] -> q [E, N, K] + s [E, N/128, K/128]   (128x128)
//                                                   qT [E, K, N] + sT [E, K/128, N/128]  (the same
//                                                   blocks transposed: dgrad's W^T operand)
//   token_transpose_quant_kernel       x [T, C]    -> qT [C, T] + sT [C, ceil(T/128)]    (1x128
//                                                   along tokens, MN-major scales: the k-grouped
//                                                   weight-gradient GEMM's operand layout)
//     Rows whose m_indices entry is -1 (optional) read as zero (padding rows of the contiguous
//     layout must not reach the along-token scales). kDequant: x is itself fp8 [T, C] with 1x128
//     scales along channels (the forward's saved operand); each value is dequantised (fp8 * scale,
//     one fp32 rounding) before the along-token quantisation (the backward's x').
//
// Math: quant.cuh's, bit for bit (amax with NaN propagating, scale = max(amax, 1e-10) / 448 by
// IEEE division, optional power-of-two rounding, q = e4m3 satfinite(x / scale) with the
// hoisted-reciprocal exact division). A 128x128 weight block and its transpose have the same
// amax, so the transposed copy is the same bytes moved; a token group of a channel is a column
// of the [128 tokens x 128 channels] tile the kernel loads.
//
// Both kernels: one CTA of 256 threads per 128x128 tile. Thread t loads 16 consecutive values
// of tile rows t/8 + 32p (p = 0..3), columns 16 (t % 8) .. +15 (coalesced 32/64-byte loads),
// quantises them, stores them row-major (the plain copy) and into a 16 KB fp8 shared tile; the
// transposed copy is then read back 4 columns x 16 rows per thread with 32-bit loads and
// 4x4 byte transposes (prmt), and stored as 16-byte rows of the output.
// NOTE: shared tile layout: row r's 16-byte chunk c sits at chunk position c ^ (r / 16 % 8). The
// writes (8 lanes = one row) and the transposed 32-bit reads (a warp = 8 row groups x 4 columns)
// are then both free of bank conflicts; an unswizzled tile makes the reads 8-way conflicted.
#pragma once

#include "quant.cuh"

namespace moe_fp8 {
namespace quant {

constexpr int kTileThreads = 256;
constexpr int kTile = 128;                                   // rows and columns of one tile
constexpr int kTileLanesPerRow = kTile / kValuesPerThread;   // 8
constexpr int kTileRowsPerPass = kTileThreads / kTileLanesPerRow;  // 32
constexpr int kTilePasses = kTile / kTileRowsPerPass;        // 4

// ---- the fp8 shared tile and its transposed read-back -------------------------------------------

__device__ __forceinline__ int tile_offset(int row, int chunk) {
  return row * kTile + ((chunk ^ ((row >> 4) & 7)) << 4);
}

// Stores 16 fp8 values (row `row`, columns 16 chunk .. +15) into the swizzled tile.
__device__ __forceinline__ void tile_store16(unsigned char* sTile, int row, int chunk, uint4 v) {
  *reinterpret_cast<uint4*>(sTile + tile_offset(row, chunk)) = v;
}

// 4x4 byte transpose: in a..d = 4 rows x 4 columns; out[k] = column k (rows a..d in bytes 0..3).
__device__ __forceinline__ void transpose4x4(unsigned a, unsigned b, unsigned c, unsigned d,
                                             unsigned (&rOut)[4]) {
  const unsigned ab01 = __byte_perm(a, b, 0x5140), ab23 = __byte_perm(a, b, 0x7362);
  const unsigned cd01 = __byte_perm(c, d, 0x5140), cd23 = __byte_perm(c, d, 0x7362);
  rOut[0] = __byte_perm(ab01, cd01, 0x5410);
  rOut[1] = __byte_perm(ab01, cd01, 0x7632);
  rOut[2] = __byte_perm(ab23, cd23, 0x5410);
  rOut[3] = __byte_perm(ab23, cd23, 0x7632);
}

// Thread t reads tile columns 4 (t / 8) .. +3 over tile rows 16 (t % 8) .. +15 and returns them
// as 4 transposed 16-byte rows: rCol[k] = tile[16 (t % 8) + 0..15][4 (t / 8) + k].
__device__ __forceinline__ void tile_load_transposed(const unsigned char* sTile, uint4 (&rCol)[4]) {
  const int rowGroup = threadIdx.x % 8, col = 4 * (threadIdx.x / 8);
  unsigned rWords[16];
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    const int row = 16 * rowGroup + i;
    rWords[i] = *reinterpret_cast<const unsigned*>(sTile + tile_offset(row, col / 16) + col % 16);
  }
#pragma unroll
  for (int m = 0; m < 4; ++m) {  // rows 4m .. 4m+3 of the group -> word m of each column
    unsigned rOut[4];
    transpose4x4(rWords[4 * m], rWords[4 * m + 1], rWords[4 * m + 2], rWords[4 * m + 3], rOut);
    reinterpret_cast<unsigned*>(&rCol[0])[m] = rOut[0];
    reinterpret_cast<unsigned*>(&rCol[1])[m] = rOut[1];
    reinterpret_cast<unsigned*>(&rCol[2])[m] = rOut[2];
    reinterpret_cast<unsigned*>(&rCol[3])[m] = rOut[3];
  }
}

// Writes the transposed tile: output row (colBase + column) holds tile rows as bytes
// [rowBase, rowBase + rowsValid). 16-byte stores when the output rows are 16-byte aligned
// (`vectorOk`) and the chunk is whole; byte stores otherwise (odd token counts, the last tile).
__device__ __forceinline__ void store_transposed(const uint4 (&rCol)[4],
                                                 unsigned char* __restrict__ gOut, long long ldOut,
                                                 long long colBase, long long rowBase,
                                                 int rowsValid, bool vectorOk) {
  const int rowGroup = threadIdx.x % 8, col = 4 * (threadIdx.x / 8);
  const int first = 16 * rowGroup;
  if (first >= rowsValid) return;
  const int count = min(16, rowsValid - first);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    unsigned char* gRow = gOut + (colBase + col + k) * ldOut + rowBase + first;
    if (vectorOk && count == 16) {
      *reinterpret_cast<uint4*>(gRow) = rCol[k];
    } else {
      const unsigned char* bytes = reinterpret_cast<const unsigned char*>(&rCol[k]);
      for (int i = 0; i < count; ++i) gRow[i] = bytes[i];
    }
  }
}

// Division by a per-value scale (scales differ along a thread's 16 channels). The finite case is
// quant.cuh's exact hoisted division; inf/NaN scales multiply as quantize16 does.
struct ScaleDivisor {
  Divisor divisor;
  float factor;
  bool finite;
  __device__ __forceinline__ explicit ScaleDivisor(float scale)
      : divisor(scale <= kFloatMax ? scale : 1.0f),
        factor(scale == __int_as_float(0x7F800000) ? 0.0f : scale),
        finite(scale <= kFloatMax) {}
  __device__ __forceinline__ float divide(float x) const {
    return finite ? divisor.divide(x) : __fmul_rn(x, factor);
  }
};


// ---- 128x128 blocks, plain and transposed ---------------------------------------------------------

// w [E, N, K] (N, K multiples of 128) -> q [E, N, K], s [E, N/128, K/128], qT [E, K, N],
// sT [E, K/128, N/128]; grid (K/128, N/128, E).
template <typename T, bool kPow2>
__global__ void __launch_bounds__(kTileThreads) per_block_quant_transpose_kernel(
    const T* __restrict__ gW, __nv_fp8_storage_t* __restrict__ gQ, float* __restrict__ gS,
    __nv_fp8_storage_t* __restrict__ gQt, float* __restrict__ gSt, int N, int K) {
  pdl::begin();  // before any global access (pdl.cuh)
  __shared__ __align__(16) unsigned char sTile[kTile * kTile];  // (128 n, 128 k) fp8, swizzled
  __shared__ float sWarpAmax[kTileThreads / 32];
  const int kb = blockIdx.x, nb = blockIdx.y, e = blockIdx.z;
  const int chunk = threadIdx.x % kTileLanesPerRow, row0 = threadIdx.x / kTileLanesPerRow;
  const long long base = static_cast<long long>(e) * N * K;
  const long long col = static_cast<long long>(kb) * kTile + chunk * kValuesPerThread;

  uint4 rRaw[kTilePasses][Raw<T>::kVectors];  // (pass, 16 values)
#pragma unroll
  for (int p = 0; p < kTilePasses; ++p) {
    const long long row = static_cast<long long>(nb) * kTile + row0 + p * kTileRowsPerPass;
    load_values(gW + base + row * K + col, true, rRaw[p]);
  }
  const float amax = cta_amax<T, kTilePasses, kTileThreads>(rRaw, sWarpAmax);
  const float scale = scale_from_amax<kPow2>(amax);
  const int nBlocks = N / kTile, kBlocks = K / kTile;
  if (threadIdx.x == 0) {
    gS[(static_cast<long long>(e) * nBlocks + nb) * kBlocks + kb] = scale;
    gSt[(static_cast<long long>(e) * kBlocks + kb) * nBlocks + nb] = scale;
  }
#pragma unroll
  for (int p = 0; p < kTilePasses; ++p) {
    const int tileRow = row0 + p * kTileRowsPerPass;
    float rV[16];
    Raw<T>::to_float(rRaw[p], rV);
    const uint4 q = quantize16(rV, scale);
    *reinterpret_cast<uint4*>(gQ + base + (static_cast<long long>(nb) * kTile + tileRow) * K + col) = q;
    tile_store16(sTile, tileRow, chunk, q);
  }
  __syncthreads();
  uint4 rCol[4];
  tile_load_transposed(sTile, rCol);
  // qT[e] is [K, N]: output row kb*128 + column, bytes nb*128 + tile row
  store_transposed(rCol, reinterpret_cast<unsigned char*>(gQt + base), N,
                   static_cast<long long>(kb) * kTile, static_cast<long long>(nb) * kTile, kTile,
                   true);
}

// ---- 1x128 along tokens, transposed ---------------------------------------------------------------

#ifndef MOE_FP8_EMULATE
// e4m3 pair -> fp32 pair, exactly (every e4m3 value, NaN included, is an fp16 value):
// one cvt.rn.f16x2.e4m3x2 and two f16 -> f32 conversions. NOTE: a branchy bit-level decode
// here took the requantising kernel to 255 registers (one CTA per SM).
__device__ __forceinline__ float2 fp8x2_to_float2(unsigned short pair) {
  const __half2_raw raw = __nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3);
  return __half22float2(*reinterpret_cast<const __half2*>(&raw));
}
#endif

template <> struct Raw<__nv_fp8_storage_t> {
  static constexpr int kVectors = 1;  // 16 fp8 = 16 bytes
  __device__ static void to_float(const uint4 (&rRaw)[kVectors], float (&rV)[16]) {
    const unsigned* words = reinterpret_cast<const unsigned*>(rRaw);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float2 v = fp8x2_to_float2(static_cast<unsigned short>(words[i / 2] >> (16 * (i % 2))));
      rV[2 * i] = v.x;
      rV[2 * i + 1] = v.y;
    }
  }
};

// Channels i, i + 1 (i even) of a thread's 16 raw values, in fp32.
template <typename T>
__device__ __forceinline__ float2 raw_pair(const uint4 (&rRaw)[Raw<T>::kVectors], int i);
template <>
__device__ __forceinline__ float2 raw_pair<__nv_bfloat16>(const uint4 (&rRaw)[2], int i) {
  const unsigned word = reinterpret_cast<const unsigned*>(rRaw)[i / 2];
  return make_float2(__uint_as_float(word << 16), __uint_as_float(word & 0xFFFF0000u));
}
template <>
__device__ __forceinline__ float2 raw_pair<float>(const uint4 (&rRaw)[4], int i) {
  const float* values = reinterpret_cast<const float*>(rRaw);
  return make_float2(values[i], values[i + 1]);
}
template <>
__device__ __forceinline__ float2 raw_pair<__nv_fp8_storage_t>(const uint4 (&rRaw)[1], int i) {
  const unsigned word = reinterpret_cast<const unsigned*>(rRaw)[i / 4];
  return fp8x2_to_float2(static_cast<unsigned short>(word >> (8 * (i % 4))));
}

// Per-row inputs: the optional row mask (m_indices, -1 = the row reads as zero; null = none) and,
// for the requantising variant only, the fp8 input's 1x128 row scales
// (gRowScale[t * rsRow + (c / 128) * rsGroup]).
struct RowInput {
  const float* gRowScale;
  const int* gRowMask;
  long long rsRow, rsGroup;
};

// x [T, C] (C a multiple of 128, any T) -> qT [C, T] fp8 and sT [C, ceil(T/128)] written through
// strides (sT[c, g] = gSt[c * sRow + g * sGroup]; MN-major: sRow 1, sGroup align(C, 4)).
// Grid (C/128, ceil(T/128)); tokens past T load as zeros (no effect on amax) and are not stored.
template <typename T, bool kPow2, bool kDequant>
__global__ void __launch_bounds__(kTileThreads) token_transpose_quant_kernel(
    const T* __restrict__ gX, __nv_fp8_storage_t* __restrict__ gQt, float* __restrict__ gSt,
    int numTokens, int C, long long sRow, long long sGroup, const RowInput rowIn) {
  pdl::begin();  // before any global access (pdl.cuh)
  static_assert(!kDequant || sizeof(T) == 1, "the requantising variant reads fp8 input");
  __shared__ __align__(16) unsigned char sTile[kTile * kTile];  // (128 tokens, 128 channels) fp8
  __shared__ float sPart[kTileThreads / 32][kTile];           // per-warp column amax
  __shared__ float sScale[kTile];
  const int cb = blockIdx.x, tb = blockIdx.y;
  const int chunk = threadIdx.x % kTileLanesPerRow, row0 = threadIdx.x / kTileLanesPerRow;
  const long long col = static_cast<long long>(cb) * kTile + chunk * kValuesPerThread;
  const int rowsValid = min(kTile, numTokens - tb * kTile);

  uint4 rRaw[kTilePasses][Raw<T>::kVectors];  // (pass, 16 channels of one token)
  float rRowScale[kTilePasses];                // kDequant: the row's scale of these 16 channels
#pragma unroll
  for (int p = 0; p < kTilePasses; ++p) {
    const int tileRow = row0 + p * kTileRowsPerPass;
    const long long token = static_cast<long long>(tb) * kTile + tileRow;
    bool valid = tileRow < rowsValid;
    if (valid && rowIn.gRowMask != nullptr) valid = rowIn.gRowMask[token] >= 0;
    if constexpr (kDequant) {
      rRowScale[p] = valid ? rowIn.gRowScale[token * rowIn.rsRow + (col / kTile) * rowIn.rsGroup]
                           : 0.0f;
    }
    load_values(gX + token * C + col, valid, rRaw[p]);
  }
  // the pass's 16 values in fp32 (kDequant: fp8 * row scale, as moe_fp8.gemm.reference.dequant_rows)
  auto values = [&](int p, float (&rV)[16]) {
    Raw<T>::to_float(rRaw[p], rV);
    if constexpr (kDequant) {
#pragma unroll
      for (int i = 0; i < 16; ++i) rV[i] = __fmul_rn(rV[i], rRowScale[p]);
    }
  };
  float rAmax[16];  // per channel, over this thread's 4 tokens
#pragma unroll
  for (int i = 0; i < 16; ++i) rAmax[i] = 0.0f;
#pragma unroll
  for (int p = 0; p < kTilePasses; ++p) {
    float rV[16];
    values(p, rV);
#pragma unroll
    for (int i = 0; i < 16; ++i) rAmax[i] = max_nan(rAmax[i], fabsf(rV[i]));
  }
  // lanes l, l^8, l^16, l^24 hold the same channels (tokens 4 apart)
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    rAmax[i] = max_nan(rAmax[i], __shfl_xor_sync(0xFFFFFFFFu, rAmax[i], 8));
    rAmax[i] = max_nan(rAmax[i], __shfl_xor_sync(0xFFFFFFFFu, rAmax[i], 16));
  }
  if (threadIdx.x % 32 < kTileLanesPerRow) {
#pragma unroll
    for (int i = 0; i < 16; ++i) sPart[threadIdx.x / 32][chunk * kValuesPerThread + i] = rAmax[i];
  }
  __syncthreads();
  if (threadIdx.x < kTile) {
    float amax = sPart[0][threadIdx.x];
#pragma unroll
    for (int w = 1; w < kTileThreads / 32; ++w) amax = max_nan(amax, sPart[w][threadIdx.x]);
    const float scale = scale_from_amax<kPow2>(amax);
    sScale[threadIdx.x] = scale;
    gSt[(static_cast<long long>(cb) * kTile + threadIdx.x) * sRow + tb * sGroup] = scale;
  }
  __syncthreads();
  // NOTE: channel pairs outer, passes inner: two divisors live at a time (16 live divisors are
  // 64 registers, which cost a resident CTA per SM).
  unsigned rPacked[kTilePasses][4];  // (pass, 4 words = 16 fp8 values)
#pragma unroll
  for (int i = 0; i < 16; i += 2) {
    const ScaleDivisor div0(sScale[chunk * 16 + i]), div1(sScale[chunk * 16 + i + 1]);
#pragma unroll
    for (int p = 0; p < kTilePasses; ++p) {
      float2 v = raw_pair<T>(rRaw[p], i);
      if constexpr (kDequant) v = make_float2(__fmul_rn(v.x, rRowScale[p]), __fmul_rn(v.y, rRowScale[p]));
      const unsigned bits = __nv_cvt_float2_to_fp8x2(make_float2(div0.divide(v.x), div1.divide(v.y)),
                                                     __NV_SATFINITE, __NV_E4M3);
      if (i % 4 == 0) rPacked[p][i / 4] = bits;
      else rPacked[p][i / 4] |= bits << 16;
    }
  }
#pragma unroll
  for (int p = 0; p < kTilePasses; ++p)
    tile_store16(sTile, row0 + p * kTileRowsPerPass, chunk,
                 make_uint4(rPacked[p][0], rPacked[p][1], rPacked[p][2], rPacked[p][3]));
  __syncthreads();
  uint4 rCol[4];
  tile_load_transposed(sTile, rCol);
  // qT is [C, T]: output row cb*128 + column, bytes tb*128 + tile row
  store_transposed(rCol, reinterpret_cast<unsigned char*>(gQt), numTokens,
                   static_cast<long long>(cb) * kTile, static_cast<long long>(tb) * kTile,
                   rowsValid, numTokens % 16 == 0);
}

}  // namespace quant
}  // namespace moe_fp8
