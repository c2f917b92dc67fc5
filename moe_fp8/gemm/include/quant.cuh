// quant.cuh — FP8 (e4m3) quantisation kernels: per token per group, per 128x128 block, and the
// fused SiLU(gate) * up + per-token-group quantisation (contiguous and masked layouts).
//
// Math (bit-exact with moe_fp8/gemm/reference.py, per group of values x):
//   amax  = max |x|                                   (fp32, NaN propagates)
//   scale = max(amax, 1e-10) / 448                    (IEEE fp32 division; optionally rounded up
//                                                      to a power of two by exponent arithmetic)
//   q     = e4m3(clamp(x / scale, -448, 448))         (IEEE division, round to nearest even)
// NOTE: "clamp then cast" equals one `cvt.rn.satfinite.e4m3x2.f32` (saturating, NaN kept).
//
// Work decomposition: a "unit" is one (row, group) pair. Each thread owns 16 consecutive values
// of a unit (16-byte fp8 stores; 16- or 32-byte bf16/fp32 loads), so kGroupSize / 16 adjacent
// lanes share a unit and reduce its amax with xor-shuffles. Units are numbered row-major, which
// makes unit u's values the u-th kGroupSize-run of the contiguous input: no division is needed
// to address them. Every CTA handles kUnroll passes, all loads issued before any math.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp8.h>

namespace moe_fp8 {
namespace quant {

constexpr int kThreads = 256;
constexpr int kValuesPerThread = 16;  // one 16-byte fp8 store
constexpr int kUnroll = 2;            // units per thread in flight
constexpr float kFp8Max = 448.0f;
constexpr float kAmaxFloor = 1e-10f;

// Units one CTA covers (the host computes the grid with the same formula).
template <int kGroupSize>
__host__ __device__ constexpr int units_per_cta() { return kThreads / (kGroupSize / kValuesPerThread) * kUnroll; }

// ---- small helpers -----------------------------------------------------------------------------

// NOTE: fmaxf drops NaN; the reference's amax keeps it, so use the NaN-propagating form.
__device__ __forceinline__ float max_nan(float a, float b) {
  float d;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
  return d;
}

__device__ __forceinline__ uint4 ld_stream(const void* gPtr) {
  // read-only, read once: bypass L1 allocation
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(gPtr));
  return r;
}

// Smallest power of two >= s for positive normal s; NaN/inf returned as they are.
__device__ __forceinline__ float ceil_pow2(float s) {
  unsigned bits = __float_as_uint(s);
  unsigned exponent = (bits >> 23) & 0xFFu;
  if (exponent == 0xFFu) return s;
  exponent += (bits & 0x7FFFFFu) != 0u;
  return __uint_as_float(exponent << 23);
}

template <bool kPow2>
__device__ __forceinline__ float scale_from_amax(float amax) {
  float scale = __fdiv_rn(max_nan(amax, kAmaxFloor), kFp8Max);
  return kPow2 ? ceil_pow2(scale) : scale;
}

// 16 values of T <-> raw 16-byte vectors
template <typename T> struct Raw;
template <> struct Raw<__nv_bfloat16> {
  static constexpr int kVectors = 2;  // 16 bf16 = 32 bytes
  __device__ static void to_float(const uint4 (&rRaw)[kVectors], float (&rV)[16]) {
#pragma unroll
    for (int i = 0; i < kVectors * 4; ++i) {
      unsigned word = reinterpret_cast<const unsigned*>(rRaw)[i];
      rV[2 * i] = __uint_as_float(word << 16);  // bf16 -> fp32 is exact: widen the bits
      rV[2 * i + 1] = __uint_as_float(word & 0xFFFF0000u);
    }
  }
};
template <> struct Raw<float> {
  static constexpr int kVectors = 4;  // 16 fp32 = 64 bytes
  __device__ static void to_float(const uint4 (&rRaw)[kVectors], float (&rV)[16]) {
#pragma unroll
    for (int i = 0; i < 16; ++i) rV[i] = reinterpret_cast<const float*>(rRaw)[i];
  }
};

template <typename T>
__device__ __forceinline__ void load_values(const T* gPtr, bool valid,
                                            uint4 (&rRaw)[Raw<T>::kVectors]) {
#pragma unroll
  for (int i = 0; i < Raw<T>::kVectors; ++i)
    rRaw[i] = valid ? ld_stream(reinterpret_cast<const uint4*>(gPtr) + i) : make_uint4(0, 0, 0, 0);
}

// q = satfinite_e4m3(v / scale) for 16 values, packed into one 16-byte vector.
__device__ __forceinline__ uint4 quantize16(const float (&rV)[16], float scale) {
  uint4 out;
  unsigned* words = reinterpret_cast<unsigned*>(&out);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    unsigned lo = __nv_cvt_float2_to_fp8x2(
        make_float2(__fdiv_rn(rV[4 * i], scale), __fdiv_rn(rV[4 * i + 1], scale)),
        __NV_SATFINITE, __NV_E4M3);
    unsigned hi = __nv_cvt_float2_to_fp8x2(
        make_float2(__fdiv_rn(rV[4 * i + 2], scale), __fdiv_rn(rV[4 * i + 3], scale)),
        __NV_SATFINITE, __NV_E4M3);
    words[i] = lo | (hi << 16);
  }
  return out;
}

// amax over the kLanes lanes that share a unit (they are aligned within the warp).
template <int kLanes>
__device__ __forceinline__ float group_amax(const float (&rV)[16]) {
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < 16; ++i) amax = max_nan(amax, fabsf(rV[i]));
#pragma unroll
  for (int offset = kLanes / 2; offset > 0; offset /= 2)
    amax = max_nan(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, offset));
  return amax;
}

// Where unit u's scale goes: s[e, m, g] = gS[e * sBatch + m * sRow + g * sGroup].
// NOTE: kernels take these as separate scalar parameters (the JIT passes one pointer per
// parameter) and build the struct inside.
struct ScaleLayout {
  int rowsPerBatch;   // M (M_max for batched inputs)
  int groupsPerRow;   // K / kGroupSize
  long long sBatch, sRow, sGroup;  // element strides of the scale tensor
  __device__ long long offset(long long unit, int& row_in_batch, int& batch) const {
    long long row = unit / groupsPerRow;
    int group = static_cast<int>(unit - row * groupsPerRow);
    batch = static_cast<int>(row / rowsPerBatch);
    row_in_batch = static_cast<int>(row - static_cast<long long>(batch) * rowsPerBatch);
    return batch * sBatch + row_in_batch * sRow + group * sGroup;
  }
};

// ---- kernels -----------------------------------------------------------------------------------

// x [rows, K] (rows = E * M, contiguous) -> q [rows, K] fp8 + scales in `layout`.
template <typename T, int kGroupSize, bool kPow2>
__global__ void __launch_bounds__(kThreads) per_token_group_quant_kernel(
    const T* __restrict__ gX, __nv_fp8_storage_t* __restrict__ gQ, float* __restrict__ gS,
    long long numUnits, int rowsPerBatch, int groupsPerRow, long long sBatch, long long sRow,
    long long sGroup) {
  static_assert(kGroupSize % kValuesPerThread == 0 && kGroupSize / kValuesPerThread <= 32 &&
                ((kGroupSize / kValuesPerThread) & (kGroupSize / kValuesPerThread - 1)) == 0,
                "a unit must be a power-of-two number of lanes within one warp");
  constexpr int kLanes = kGroupSize / kValuesPerThread;
  constexpr int kUnitsPerPass = kThreads / kLanes;
  const ScaleLayout layout{rowsPerBatch, groupsPerRow, sBatch, sRow, sGroup};
  const int lane = threadIdx.x % kLanes;
  const long long firstUnit = static_cast<long long>(blockIdx.x) * units_per_cta<kGroupSize>() +
                              threadIdx.x / kLanes;

  uint4 rRaw[kUnroll][Raw<T>::kVectors];
#pragma unroll
  for (int p = 0; p < kUnroll; ++p) {
    long long unit = firstUnit + p * kUnitsPerPass;
    load_values(gX + unit * kGroupSize + lane * kValuesPerThread, unit < numUnits, rRaw[p]);
  }
#pragma unroll
  for (int p = 0; p < kUnroll; ++p) {
    long long unit = firstUnit + p * kUnitsPerPass;
    float rV[16];
    Raw<T>::to_float(rRaw[p], rV);
    float scale = scale_from_amax<kPow2>(group_amax<kLanes>(rV));  // all lanes shuffle
    if (unit >= numUnits) continue;
    *reinterpret_cast<uint4*>(gQ + unit * kGroupSize + lane * kValuesPerThread) =
        quantize16(rV, scale);
    int m, e;
    long long sOffset = layout.offset(unit, m, e);
    if (lane == 0) gS[sOffset] = scale;
  }
}

// w [E, N, K] -> q [E, N, K] fp8 + s [E, ceil(N/kBlock), K/kBlock] (contiguous); one CTA per block.
// Rows past N (a partial last block) are skipped and do not count towards amax.
template <typename T, int kBlock, bool kPow2>
__global__ void __launch_bounds__(kThreads) per_block_quant_kernel(
    const T* __restrict__ gW, __nv_fp8_storage_t* __restrict__ gQ, float* __restrict__ gS,
    int N, int K) {
  constexpr int kLanesPerRow = kBlock / kValuesPerThread;
  constexpr int kRowsPerPass = kThreads / kLanesPerRow;
  constexpr int kPasses = kBlock / kRowsPerPass;
  static_assert(kBlock % kValuesPerThread == 0 && kThreads % kLanesPerRow == 0 &&
                kBlock % kRowsPerPass == 0, "unsupported block size");
  __shared__ float sWarpAmax[kThreads / 32];

  const int kb = blockIdx.x, nb = blockIdx.y, e = blockIdx.z;
  const int col = kb * kBlock + (threadIdx.x % kLanesPerRow) * kValuesPerThread;
  const int row0 = nb * kBlock + threadIdx.x / kLanesPerRow;
  const long long base = static_cast<long long>(e) * N * K;

  uint4 rRaw[kPasses][Raw<T>::kVectors];
#pragma unroll
  for (int p = 0; p < kPasses; ++p) {
    int row = row0 + p * kRowsPerPass;
    load_values(gW + base + static_cast<long long>(row) * K + col, row < N, rRaw[p]);
  }
  float amax = 0.0f;  // rows past N were loaded as zeros: they cannot raise amax
#pragma unroll
  for (int p = 0; p < kPasses; ++p) {
    float rV[16];
    Raw<T>::to_float(rRaw[p], rV);
#pragma unroll
    for (int i = 0; i < 16; ++i) amax = max_nan(amax, fabsf(rV[i]));
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2)
    amax = max_nan(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, offset));
  if (threadIdx.x % 32 == 0) sWarpAmax[threadIdx.x / 32] = amax;
  __syncthreads();
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) amax = max_nan(amax, sWarpAmax[w]);
  const float scale = scale_from_amax<kPow2>(amax);
  if (threadIdx.x == 0) {
    const int nBlocks = (N + kBlock - 1) / kBlock, kBlocks = K / kBlock;
    gS[(static_cast<long long>(e) * nBlocks + nb) * kBlocks + kb] = scale;
  }
#pragma unroll
  for (int p = 0; p < kPasses; ++p) {
    int row = row0 + p * kRowsPerPass;
    if (row >= N) continue;
    float rV[16];
    Raw<T>::to_float(rRaw[p], rV);
    *reinterpret_cast<uint4*>(gQ + base + static_cast<long long>(row) * K + col) =
        quantize16(rV, scale);
  }
}

// h [rows, 2I] bf16 (gate | up, rows = E * M_max) -> q [rows, I] fp8 + 1 x kGroupSize scales.
// y = silu(gate) * up with silu(g) = g / (1 + exp(-g)) in fp32, exactly as torch computes it.
// kMasked: rows m >= gMaskedM[e] are neither read nor written (fixed grid: graph-capturable).
template <int kGroupSize, bool kPow2, bool kMasked>
__global__ void __launch_bounds__(kThreads) silu_and_mul_quant_kernel(
    const __nv_bfloat16* __restrict__ gH, __nv_fp8_storage_t* __restrict__ gQ,
    float* __restrict__ gS, const int* __restrict__ gMaskedM, long long numUnits,
    int rowsPerBatch, int groupsPerRow, long long sBatch, long long sRow, long long sGroup) {
  static_assert(kGroupSize % kValuesPerThread == 0 && kGroupSize / kValuesPerThread <= 32 &&
                ((kGroupSize / kValuesPerThread) & (kGroupSize / kValuesPerThread - 1)) == 0,
                "a unit must be a power-of-two number of lanes within one warp");
  constexpr int kLanes = kGroupSize / kValuesPerThread;
  constexpr int kUnitsPerPass = kThreads / kLanes;
  const ScaleLayout layout{rowsPerBatch, groupsPerRow, sBatch, sRow, sGroup};
  const int lane = threadIdx.x % kLanes;
  const int intermediate = layout.groupsPerRow * kGroupSize;  // I
  const long long firstUnit = static_cast<long long>(blockIdx.x) * units_per_cta<kGroupSize>() +
                              threadIdx.x / kLanes;

  uint4 rGate[kUnroll][2], rUp[kUnroll][2];
  bool valid[kUnroll];
  long long sOffset[kUnroll];
#pragma unroll
  for (int p = 0; p < kUnroll; ++p) {
    long long unit = firstUnit + p * kUnitsPerPass;
    int m = 0, e = 0;
    sOffset[p] = unit < numUnits ? layout.offset(unit, m, e) : 0;
    valid[p] = unit < numUnits && (!kMasked || m < __ldg(gMaskedM + e));
    long long row = unit / layout.groupsPerRow;
    int col = static_cast<int>(unit - row * layout.groupsPerRow) * kGroupSize +
              lane * kValuesPerThread;
    const __nv_bfloat16* gRow = gH + row * 2 * intermediate;
    load_values(gRow + col, valid[p], rGate[p]);
    load_values(gRow + intermediate + col, valid[p], rUp[p]);
  }
#pragma unroll
  for (int p = 0; p < kUnroll; ++p) {
    float rGateF[16], rY[16];
    Raw<__nv_bfloat16>::to_float(rGate[p], rGateF);
    Raw<__nv_bfloat16>::to_float(rUp[p], rY);
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      float silu = __fdiv_rn(rGateF[i], 1.0f + expf(-rGateF[i]));
      rY[i] = __fmul_rn(silu, rY[i]);  // NOTE: _rn keeps it a separate rounding, as in torch
    }
    float scale = scale_from_amax<kPow2>(group_amax<kLanes>(rY));  // all lanes shuffle
    if (!valid[p]) continue;
    long long unit = firstUnit + p * kUnitsPerPass;
    *reinterpret_cast<uint4*>(gQ + unit * kGroupSize + lane * kValuesPerThread) =
        quantize16(rY, scale);
    if (lane == 0) gS[sOffset[p]] = scale;
  }
}

}  // namespace quant
}  // namespace moe_fp8
