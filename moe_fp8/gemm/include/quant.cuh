// quant.cuh — FP8 (e4m3) quantisation kernels (v2): per token per group, per 128x128 block, and
// the fused SiLU(gate) * up + per-token-group quantisation (contiguous and masked layouts).
//
// Math (bit-exact with moe_fp8/gemm/reference.py, per group of values x):
//   amax  = max |x|                                   (fp32, NaN propagates)
//   scale = max(amax, 1e-10) / 448                    (IEEE fp32 division; optionally rounded up
//                                                      to a power of two by exponent arithmetic)
//   q     = e4m3(clamp(x / scale, -448, 448))         (IEEE division, round to nearest even)
// NOTE: "clamp then cast" equals one `cvt.rn.satfinite.e4m3x2.f32` (saturating, NaN kept).
//
// Division: every quotient is the correctly rounded IEEE one, as in v1, but the reciprocal of a
// group's scale is formed once (`Divisor`) instead of once per value inside each `div.rn.f32`.
// v1's SASS spent ~11 issue slots per division (MUFU.RCP, 5 FFMA, FCHK, a branch around the
// slow-path call) and two divisions + expf per SiLU value, ~38 slots per value in all: at M=16384
// I=2048 that is ~40 us of issue against a 56 us byte floor (v1: 82 % of copy). The hoisted
// form costs 3 slots per quantised value; in per_block_quant it alone took 86 -> 94 % of copy.
//
// Work decomposition: 16 consecutive values of one row inside one group per thread (16-byte fp8
// store; 16/32-byte loads); kGroupSize / 16 adjacent lanes hold one group and reduce its amax
// with xor-shuffles. Two structures, chosen by the host (kernels/quant.py) from measurements:
// * stream kernels (per-token, SiLU, masked SiLU): a grid-stride loop over the row-major chunk
//   list on at most one resident grid, the next chunk staged by cp.async. Best where a thread
//   has at most one chunk (decode) and for masked SiLU (work proportional to the valid rows);
// * one-shot kernels (v1's structure: all loads of a CTA up front, many CTAs) for large
//   contiguous inputs, where the looping stream kernels measured 30-45 % slower than v1.
// per_block_quant_kernel keeps v1's structure with the hoisted division (86 -> 94 % of copy).
#pragma once

#include "pdl.cuh"

// NOTE: MOE_FP8_EMULATE (tests/test_train_quant_gpu.py's CPU emulation, g++) supplies the toolkit
// types and the few inline-PTX helpers below itself.
#ifndef MOE_FP8_EMULATE
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#endif

namespace moe_fp8 {
namespace quant {

constexpr int kValuesPerThread = 16;  // one 16-byte fp8 store
constexpr float kFp8Max = 448.0f;
constexpr float kAmaxFloor = 1e-10f;
constexpr float kFloatMax = 3.40282347e38f;

// Streaming kernels (per-token, SiLU): 128-thread CTAs spread a small problem (decode, M=128)
// over more SMs than v1's 256-thread CTAs; 8 of them per SM (64 registers a thread, enforced by
// __launch_bounds__) keep 1024 threads x 64 bytes = 64 KB in flight per SM, about twice what
// 3 TB/s at ~1.5 us loaded latency needs (~34 KB per SM).
constexpr int kStreamThreads = 128;
constexpr int kStreamBlocksPerSm = 8;
constexpr int kBlockThreads = 256;  // per-block kernel: one 128x128 block per CTA
constexpr int kPreloadTiles = 4;    // masked_m values loaded before the first scan step

// ---- small helpers -----------------------------------------------------------------------------

#ifndef MOE_FP8_EMULATE
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

// MUFU.RCP: |error| < 1 ulp; refined below.
__device__ __forceinline__ float rcp_approx(float d) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(d));
  return r;
}
#endif  // MOE_FP8_EMULATE

// Correctly rounded x / d for a finite d in [2^-126, 2^126) (the reciprocal must be normal).
// It is the instruction sequence of the div.rn.f32 fast path with the reciprocal (one Newton
// step on MUFU.RCP) hoisted: q0 = x*r, then one Markstein correction with the exact residual.
// The residual is negated (d*q0 - x) so that x = -0 gives -0 (x - d*q0 would give +0, and the
// sign of a zero survives into the fp8 byte). Where div.rn would leave its fast path:
// |x| < 2^-100 (the residual may round) gives |x/d| < 2^-56 for every d this file divides by
// (scales >= 2^-43; 448; SiLU divisors are exactly 2 for tiny x), i.e. fp8 zero of the right
// sign either way; inf/NaN operands are never passed (callers handle them without dividing).
// An exact-rational emulation with the MUFU seed off by -1/0/+1 ulp matched RN(x/d) on 36k
// cases, fp8 rounding midpoints included, except |x| < 2^-100 as stated.
struct Divisor {
  float d, r;
  __device__ __forceinline__ explicit Divisor(float divisor) : d(divisor) {
    const float r0 = rcp_approx(divisor);
    r = __fmaf_rn(r0, __fmaf_rn(-divisor, r0, 1.0f), r0);
  }
  __device__ __forceinline__ float divide(float x) const {
    const float q0 = __fmul_rn(x, r);
    const float negResidual = __fmaf_rn(d, q0, -x);  // exact
    return __fmaf_rn(-negResidual, r, q0);
  }
};

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
  const float floored = max_nan(amax, kAmaxFloor);  // >= 1e-10: in Divisor's range when finite
  // inf / 448 = inf and NaN stay as they are (Divisor would turn inf into NaN)
  const float scale = floored <= kFloatMax ? Divisor(kFp8Max).divide(floored) : floored;
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

// Packs 4 * kWords quotients into as many e4m3 bytes (saturating, NaN kept), 4 per word.
template <int kWords>
__device__ __forceinline__ void pack_fp8(const float (&rQ)[4 * kWords], unsigned (&words)[kWords]) {
#pragma unroll
  for (int i = 0; i < kWords; ++i) {
    unsigned lo = __nv_cvt_float2_to_fp8x2(make_float2(rQ[4 * i], rQ[4 * i + 1]),
                                           __NV_SATFINITE, __NV_E4M3);
    unsigned hi = __nv_cvt_float2_to_fp8x2(make_float2(rQ[4 * i + 2], rQ[4 * i + 3]),
                                           __NV_SATFINITE, __NV_E4M3);
    words[i] = lo | (hi << 16);
  }
}

__device__ __forceinline__ uint4 pack_fp8x16(const float (&rQ)[16]) {
  uint4 out;  // NOTE: packed in place (a words[4] + make_uint4 reallocated the per-block kernel)
  pack_fp8<4>(rQ, *reinterpret_cast<unsigned(*)[4]>(&out));
  return out;
}

// inf/NaN scale (inf/NaN inputs): x / inf = x * 0 (+-0 for finite x, NaN for +-inf) and
// x / NaN = x * NaN = NaN, exactly; no division (and no slow-path call) is needed
__device__ __forceinline__ float nonfinite_scale_factor(float scale) {
  return scale == __int_as_float(0x7F800000) ? 0.0f : scale;
}

// q = satfinite_e4m3(v / scale) for 16 values, packed into one 16-byte vector.
__device__ __forceinline__ uint4 quantize16(const float (&rV)[16], float scale) {
  float rQ[16];
  if (__builtin_expect(scale <= kFloatMax, 1)) {  // finite (scale > 0 always; NaN fails)
    const Divisor divisor(scale);
#pragma unroll
    for (int i = 0; i < 16; ++i) rQ[i] = divisor.divide(rV[i]);
  } else {
    const float factor = nonfinite_scale_factor(scale);
#pragma unroll
    for (int i = 0; i < 16; ++i) rQ[i] = __fmul_rn(rV[i], factor);
  }
  return pack_fp8x16(rQ);
}

// quantize16's v / scale for one value (before the e4m3 conversion).
__device__ __forceinline__ float quotient(float v, float scale) {
  return scale <= kFloatMax ? Divisor(scale).divide(v) : __fmul_rn(v, nonfinite_scale_factor(scale));
}

// The lanes of this thread's group (kLanes aligned lanes of one warp). Shuffles name only them:
// at the end of a grid-stride loop other groups of the warp may have left already.
template <int kLanes>
__device__ __forceinline__ unsigned group_mask() {
  if constexpr (kLanes == 32) {
    return 0xFFFFFFFFu;
  } else {
    return ((1u << kLanes) - 1u) << ((threadIdx.x % 32) & ~(kLanes - 1));
  }
}

// amax over the kLanes lanes that share a group.
template <int kLanes>
__device__ __forceinline__ float group_amax(const float (&rV)[16], unsigned mask) {
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < 16; ++i) amax = max_nan(amax, fabsf(rV[i]));
#pragma unroll
  for (int offset = kLanes / 2; offset > 0; offset /= 2)
    amax = max_nan(amax, __shfl_xor_sync(mask, amax, offset));
  return amax;
}

template <int kGroupSize>
__device__ __forceinline__ constexpr int lanes_per_group() {
  static_assert(kGroupSize % kValuesPerThread == 0 && kGroupSize / kValuesPerThread <= 32 &&
                ((kGroupSize / kValuesPerThread) & (kGroupSize / kValuesPerThread - 1)) == 0,
                "a group must be a power-of-two number of lanes within one warp");
  return kGroupSize / kValuesPerThread;
}

// Position in the row-major chunk list; a grid-stride step adds (rowStep, colStep) with a carry
// (no division per step).
struct ChunkCursor {
  int row, col;
  __device__ __forceinline__ ChunkCursor(int index, int chunksPerRow)
      : row(index / chunksPerRow), col(index - index / chunksPerRow * chunksPerRow) {}
  __device__ __forceinline__ void advance(int rowStep, int colStep, int chunksPerRow) {
    col += colStep;
    row += rowStep;
    if (col >= chunksPerRow) {
      col -= chunksPerRow;
      ++row;
    }
  }
};

// Scale offset of (batch e, row m, group g): s[e, m, g] = gS[e * sBatch + m * sRow + g * sGroup].
struct ScaleLayout {
  long long sBatch, sRow, sGroup;
  __device__ __forceinline__ long long offset(int e, int m, int g) const {
    return e * sBatch + m * sRow + g * sGroup;
  }
};

// Row `row` of a [batches * rowsPerBatch] stack -> (batch, row in batch); 2-D inputs (one batch)
// skip the integer division.
__device__ __forceinline__ void split_row(int row, int rowsPerBatch, int& e, int& m) {
  e = row >= rowsPerBatch ? row / rowsPerBatch : 0;
  m = row - e * rowsPerBatch;
}

// ---- shared-memory staging of the next chunk ---------------------------------------------------
// A thread's next chunk is copied global -> shared with cp.async while it computes the current
// one. v2 first prefetched into registers, but at the 64-register cap ptxas sank those loads
// below the SiLU arithmetic (seen in the SASS), which undid the prefetch; bytes in flight in
// shared memory cost no registers and cannot be reordered by the compiler (they did not make the
// loop fast at large sizes either: see the one-shot kernels). Layout
// [slot][vector][thread] of 16-byte vectors: a warp's accesses to one vector are 512 contiguous
// bytes (no bank conflicts), and each thread reads back only what it copied itself (no barrier).
constexpr int kStages = 2;  // chunk j in slot j % 2: one chunk in flight per thread during math

#ifndef MOE_FP8_EMULATE
__device__ __forceinline__ void cp_async16(uint4* sDst, const void* gSrc) {
  const unsigned sAddr = static_cast<unsigned>(__cvta_generic_to_shared(sDst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(sAddr), "l"(gSrc) : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;" ::: "memory");
}
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(kPending) : "memory");
}
#endif  // MOE_FP8_EMULATE

// kVectors 16-byte vectors per chunk: the first kVectors / kParts from gPart0, the rest from
// gPart1 (SiLU: gate and up halves of a row).
template <int kVectors, int kParts>
struct StagingRing {
  uint4 (*sSlots)[kVectors][kStreamThreads];
  __device__ __forceinline__ void issue(int slot, const void* gPart0, const void* gPart1) const {
    constexpr int kPerPart = kVectors / kParts;
#pragma unroll
    for (int v = 0; v < kVectors; ++v) {
      const void* gPart = (kParts == 2 && v >= kPerPart) ? gPart1 : gPart0;
      cp_async16(&sSlots[slot][v][threadIdx.x], static_cast<const uint4*>(gPart) + v % kPerPart);
    }
  }
  __device__ __forceinline__ void read(int slot, uint4 (&rRaw)[kVectors]) const {
#pragma unroll
    for (int v = 0; v < kVectors; ++v) rRaw[v] = sSlots[slot][v][threadIdx.x];
  }
};

// ---- per token per group ------------------------------------------------------------------------

// x [rows, K] (rows = E * M, contiguous) -> q [rows, K] fp8 + scales through the strides.
template <typename T, int kGroupSize, bool kPow2>
__global__ void __launch_bounds__(kStreamThreads, kStreamBlocksPerSm) per_token_group_quant_kernel(
    const T* __restrict__ gX, __nv_fp8_storage_t* __restrict__ gQ, float* __restrict__ gS,
    int numRows, int chunksPerRow, int rowsPerBatch, long long sBatch, long long sRow,
    long long sGroup) {
  pdl::begin();  // before any global access (pdl.cuh)
  constexpr int kLanes = lanes_per_group<kGroupSize>();
  constexpr int kVectors = Raw<T>::kVectors;
  __shared__ uint4 sSlots[kStages][kVectors][kStreamThreads];
  const StagingRing<kVectors, 1> ring{sSlots};
  const unsigned mask = group_mask<kLanes>();
  const ScaleLayout layout{sBatch, sRow, sGroup};
  const long long rowLength = static_cast<long long>(chunksPerRow) * kValuesPerThread;  // K
  const int numThreads = gridDim.x * kStreamThreads;
  const int rowStep = numThreads / chunksPerRow, colStep = numThreads - rowStep * chunksPerRow;
  ChunkCursor at(blockIdx.x * kStreamThreads + threadIdx.x, chunksPerRow);
  auto x_ptr = [&](const ChunkCursor& c) { return gX + c.row * rowLength + c.col * kValuesPerThread; };

  if (at.row < numRows) ring.issue(0, x_ptr(at), nullptr);
  cp_async_commit();
  for (int slot = 0; at.row < numRows; slot ^= 1) {
    ChunkCursor next = at;
    next.advance(rowStep, colStep, chunksPerRow);
    if (next.row < numRows) ring.issue(slot ^ 1, x_ptr(next), nullptr);
    cp_async_commit();  // (possibly empty) group per step keeps the wait count uniform
    cp_async_wait<1>();  // this step's chunk has landed
    uint4 rRaw[kVectors];
    ring.read(slot, rRaw);

    float rV[16];
    Raw<T>::to_float(rRaw, rV);
    const float scale = scale_from_amax<kPow2>(group_amax<kLanes>(rV, mask));
    *reinterpret_cast<uint4*>(gQ + at.row * rowLength + at.col * kValuesPerThread) =
        quantize16(rV, scale);
    if (at.col % kLanes == 0) {
      int e, m;
      split_row(at.row, rowsPerBatch, e, m);
      gS[layout.offset(e, m, at.col / kLanes)] = scale;
    }
    at = next;
  }
  cp_async_wait<0>();
}

// ---- per 128x128 block --------------------------------------------------------------------------

// max |v| (NaN-propagating) over the values every thread of the CTA holds as kPasses raw vectors;
// every thread gets the result. s_warp_amax: kThreads / 32 floats of shared memory.
template <typename T, int kPasses, int kThreads>
__device__ __forceinline__ float cta_amax(const uint4 (&raw)[kPasses][Raw<T>::kVectors],
                                          float* s_warp_amax) {
  float amax = 0.0f;
#pragma unroll
  for (int p = 0; p < kPasses; ++p) {
    float rV[16];
    Raw<T>::to_float(raw[p], rV);
#pragma unroll
    for (int i = 0; i < 16; ++i) amax = max_nan(amax, fabsf(rV[i]));
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2)
    amax = max_nan(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, offset));
  if (threadIdx.x % 32 == 0) s_warp_amax[threadIdx.x / 32] = amax;
  __syncthreads();
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) amax = max_nan(amax, s_warp_amax[w]);
  return amax;
}

// w [E, N, K] -> q [E, N, K] fp8 + s [E, ceil(N/kBlock), K/kBlock] (contiguous); one CTA per block.
// Rows past N (a partial last block) are skipped and do not count towards amax.
template <typename T, int kBlock, bool kPow2>
__global__ void __launch_bounds__(kBlockThreads) per_block_quant_kernel(
    const T* __restrict__ gW, __nv_fp8_storage_t* __restrict__ gQ, float* __restrict__ gS,
    int N, int K) {
  pdl::begin();  // before any global access (pdl.cuh)
  constexpr int kLanesPerRow = kBlock / kValuesPerThread;
  constexpr int kRowsPerPass = kBlockThreads / kLanesPerRow;
  constexpr int kPasses = kBlock / kRowsPerPass;
  static_assert(kBlock % kValuesPerThread == 0 && kBlockThreads % kLanesPerRow == 0 &&
                kBlock % kRowsPerPass == 0, "unsupported block size");
  __shared__ float sWarpAmax[kBlockThreads / 32];

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
  // rows past N were loaded as zeros: they cannot raise amax
  const float amax = cta_amax<T, kPasses, kBlockThreads>(rRaw, sWarpAmax);
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

// ---- fused SiLU-and-mul + quantisation ----------------------------------------------------------

// y = silu(g) * u = (g / (1 + exp(-g))) * u in fp32, exactly as torch forms it. The division by
// d = 1 + exp(-g) uses the hoisted-reciprocal form per value (no FCHK, no branch); it is exact
// while d < 2^126 and g is finite. Returns false when some d is out of range (g < ~-87.3 or NaN);
// g = +inf yields NaN here and is caught by the caller's non-finite amax test.
__device__ __forceinline__ bool silu_mul16(const uint4 (&rGate)[2], const uint4 (&rUp)[2],
                                           float (&rY)[16]) {
  float rG[16];
  Raw<__nv_bfloat16>::to_float(rGate, rG);
  Raw<__nv_bfloat16>::to_float(rUp, rY);
  bool inRange = true;
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    const float d = 1.0f + expf(-rG[i]);  // NOTE: keep this form: nvcc fuses the +1 as torch's does
    inRange &= d < 0x1p126f;
    rY[i] = __fmul_rn(Divisor(d).divide(rG[i]), rY[i]);  // _rn: a separate rounding, as in torch
  }
  return inRange;
}

// Every case of g / d, for the rare groups silu_mul16 refuses (no div.rn slow-path calls):
//   g = +inf: d = 1, g / d = +inf;   d = inf (g < -88.7 or -inf) or NaN: g * 0 = -0 or NaN;
//   d in [2^126, FLT_MAX] (g in [-88.8, -87.3]): numerator and divisor scaled by 2^-8 (exact),
//   which brings the reciprocal back into the normal range.
// For every other g it equals silu_mul16's value (the same operations), so the fused SwiGLU
// epilogue (fused_swiglu.cuh), which holds the raw vectors in registers, takes it for all values.
__device__ __forceinline__ void silu_mul16_special_values(const uint4 (&rGate)[2],
                                                       const uint4 (&rUp)[2], float (&rY)[16]) {
  float rG[16];
  Raw<__nv_bfloat16>::to_float(rGate, rG);
  Raw<__nv_bfloat16>::to_float(rUp, rY);
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    const float g = rG[i], d = 1.0f + expf(-g);
    const float rescale = d >= 0x1p126f ? 0x1p-8f : 1.0f;
    float silu = Divisor(__fmul_rn(d, rescale)).divide(__fmul_rn(g, rescale));
    if (!(d <= kFloatMax)) silu = __fmul_rn(g, 0.0f);
    if (g == __int_as_float(0x7F800000)) silu = g;
    rY[i] = __fmul_rn(silu, rY[i]);
  }
}

// The same for one value, silu(g) * u (g, u: bf16 values widened): the swap-AB fused SwiGLU's
// form (swap_ab_swiglu.cuh). NOTE: the loop above is kept as it was measured: written as a call of
// this function it compiled to the same instructions in another register order in the one-shot
// SiLU kernels (SASS, 2026-12-06).
__device__ __forceinline__ float silu_mul_special(float g, float u) {
  const float d = 1.0f + expf(-g);
  const float rescale = d >= 0x1p126f ? 0x1p-8f : 1.0f;
  float silu = Divisor(__fmul_rn(d, rescale)).divide(__fmul_rn(g, rescale));
  if (!(d <= kFloatMax)) silu = __fmul_rn(g, 0.0f);
  if (g == __int_as_float(0x7F800000)) silu = g;
  return __fmul_rn(silu, u);
}

// The SiLU kernels' form: it reloads its inputs (L2 hits): keeping the raw registers alive for it
// past silu_mul16 cost 64-register spills.
__device__ __forceinline__ void silu_mul16_special(const __nv_bfloat16* gGate, int intermediate,
                                                float (&rY)[16]) {
  uint4 rGate[2], rUp[2];
  load_values(gGate, true, rGate);
  load_values(gGate + intermediate, true, rUp);
  silu_mul16_special_values(rGate, rUp, rY);
}

// Adds one tile of clamped masked_m counts to the running exclusive prefix sPrefix[1..].
template <int kThreads>
__device__ __forceinline__ int scan_tile(int count, int e, int numBatches, int carry,
                                         int* sPrefix, int* sWarpTotals) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int offset = 1; offset < 32; offset *= 2) {
    const int below = __shfl_up_sync(0xFFFFFFFFu, count, offset);
    if (lane >= offset) count += below;
  }
  if (lane == 31) sWarpTotals[warp] = count;
  __syncthreads();
  int before = carry, total = 0;
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) {
    const int warpTotal = sWarpTotals[w];
    before += w < warp ? warpTotal : 0;
    total += warpTotal;
  }
  if (e < numBatches) sPrefix[e + 1] = before + count;
  __syncthreads();  // sWarpTotals is rewritten by the next tile
  return carry + total;
}

// sPrefix[e] = sum over j < e of clamp(masked_m[j], 0, rowsPerBatch), e = 0..numBatches; returns
// the number of valid rows. Every CTA computes it (E ints from L2; a fixed grid needs no
// separate pass). The first kPreloadTiles tiles are loaded together: one latency, not one per tile.
// NOTE: the clamp keeps a masked_m > M_max from addressing past the tensors.
template <int kThreads>
__device__ int masked_prefix(const int* __restrict__ gMaskedM, int numBatches, int rowsPerBatch,
                             int* sPrefix) {
  __shared__ int sWarpTotals[kThreads / 32];
  int rCount[kPreloadTiles];
#pragma unroll
  for (int t = 0; t < kPreloadTiles; ++t) {
    const int e = t * kThreads + threadIdx.x;
    rCount[t] = e < numBatches ? min(max(__ldg(gMaskedM + e), 0), rowsPerBatch) : 0;
  }
  int carry = 0;
#pragma unroll
  for (int t = 0; t < kPreloadTiles; ++t) {
    if (t * kThreads >= numBatches) break;  // uniform over the CTA
    carry = scan_tile<kThreads>(rCount[t], t * kThreads + threadIdx.x, numBatches, carry,
                                sPrefix, sWarpTotals);
  }
  for (int base = kPreloadTiles * kThreads; base < numBatches; base += kThreads) {
    const int e = base + threadIdx.x;
    const int count = e < numBatches ? min(max(__ldg(gMaskedM + e), 0), rowsPerBatch) : 0;
    carry = scan_tile<kThreads>(count, e, numBatches, carry, sPrefix, sWarpTotals);
  }
  if (threadIdx.x == 0) sPrefix[0] = 0;
  __syncthreads();
  return carry;
}

// Batch e with sPrefix[e] <= v < sPrefix[e + 1], searching from `low` (v only grows per thread).
__device__ __forceinline__ int find_batch(const int* sPrefix, int low, int numBatches, int v) {
  int high = numBatches;  // invariant: sPrefix[low] <= v < sPrefix[high]
  while (high - low > 1) {
    const int mid = (low + high) / 2;
    if (sPrefix[mid] <= v) low = mid; else high = mid;
  }
  return low;
}

// h [rows, 2I] bf16 (gate | up, rows = E * M_max) -> q [rows, I] fp8 + 1 x kGroupSize scales.
// Contiguous: every row. kMasked: only rows m < masked_m[e]: the chunk list is the valid rows of
// all experts back to back (prefix sums in shared memory, dynamic size 4 * (E + 1) bytes), so the
// work is proportional to the valid rows while the grid stays fixed (graph-capturable, no host
// sync). v1 ran the full E * M_max grid and did the arithmetic (slow-path divisions of zeros)
// for every masked-out row: 47 us for 1135 of 8192 rows.
template <int kGroupSize, bool kPow2, bool kMasked>
__global__ void __launch_bounds__(kStreamThreads, kStreamBlocksPerSm) silu_and_mul_quant_kernel(
    const __nv_bfloat16* __restrict__ gH, __nv_fp8_storage_t* __restrict__ gQ,
    float* __restrict__ gS, const int* __restrict__ gMaskedM, int numRows, int chunksPerRow,
    int rowsPerBatch, int numBatches, long long sBatch, long long sRow, long long sGroup) {
  pdl::begin();  // before any global access (pdl.cuh)
  constexpr int kLanes = lanes_per_group<kGroupSize>();
#ifndef MOE_FP8_EMULATE
  extern __shared__ int sPrefix[];
#else
  int* sPrefix = nullptr;  // the CPU emulation does not run this kernel
#endif
  __shared__ uint4 sSlots[kStages][4][kStreamThreads];  // 16 KB: gate (2 vectors) | up (2)
  const StagingRing<4, 2> ring{sSlots};
  const unsigned mask = group_mask<kLanes>();
  const ScaleLayout layout{sBatch, sRow, sGroup};
  const int intermediate = chunksPerRow * kValuesPerThread;  // I
  int validRows = numRows;
  if constexpr (kMasked) validRows = masked_prefix<kStreamThreads>(gMaskedM, numBatches,
                                                                   rowsPerBatch, sPrefix);
  const int numThreads = gridDim.x * kStreamThreads;
  const int rowStep = numThreads / chunksPerRow, colStep = numThreads - rowStep * chunksPerRow;
  ChunkCursor at(blockIdx.x * kStreamThreads + threadIdx.x, chunksPerRow);

  // chunk position -> batch e and physical row (masked: valid-row index -> e * M_max + m)
  auto physical_row = [&](int row, int& e) -> int {
    if constexpr (kMasked) {
      e = find_batch(sPrefix, e, numBatches, row);
      return e * rowsPerBatch + (row - sPrefix[e]);
    } else {
      return row;
    }
  };
  auto gate_ptr = [&](int physRow, int col) {
    return gH + static_cast<long long>(physRow) * 2 * intermediate + col * kValuesPerThread;
  };

  int batch = 0;  // batch of `at` (masked); the thread's rows only grow, so searches start here
  int physRow = at.row < validRows ? physical_row(at.row, batch) : 0;
  if (at.row < validRows) {
    const __nv_bfloat16* gGate = gate_ptr(physRow, at.col);
    ring.issue(0, gGate, gGate + intermediate);
  }
  cp_async_commit();
  for (int slot = 0; at.row < validRows; slot ^= 1) {
    ChunkCursor next = at;
    next.advance(rowStep, colStep, chunksPerRow);
    int nextBatch = batch;
    const int nextPhysRow = next.row < validRows ? physical_row(next.row, nextBatch) : 0;
    if (next.row < validRows) {
      const __nv_bfloat16* gGate = gate_ptr(nextPhysRow, next.col);
      ring.issue(slot ^ 1, gGate, gGate + intermediate);
    }
    cp_async_commit();  // (possibly empty) group per step keeps the wait count uniform
    cp_async_wait<1>();  // this step's chunk has landed
    uint4 rRaw[4];
    ring.read(slot, rRaw);
    const uint4 rGate[2] = {rRaw[0], rRaw[1]}, rUp[2] = {rRaw[2], rRaw[3]};

    float rY[16];
    const bool inRange = silu_mul16(rGate, rUp, rY);
    float amax = group_amax<kLanes>(rY, mask);
    // group-uniform: some divisor out of range, or inf/NaN somewhere -> redo the group with
    // every special case handled
    if (__builtin_expect(__any_sync(mask, !inRange) || !(amax <= kFloatMax), 0)) {
      silu_mul16_special(gate_ptr(physRow, at.col), intermediate, rY);
      amax = group_amax<kLanes>(rY, mask);
    }
    const float scale = scale_from_amax<kPow2>(amax);
    *reinterpret_cast<uint4*>(gQ + static_cast<long long>(physRow) * intermediate +
                              at.col * kValuesPerThread) = quantize16(rY, scale);
    if (at.col % kLanes == 0) {
      int e, m;
      if constexpr (kMasked) {
        e = batch;
        m = physRow - batch * rowsPerBatch;
      } else {
        split_row(physRow, rowsPerBatch, e, m);
      }
      gS[layout.offset(e, m, at.col / kLanes)] = scale;
    }
    at = next;
    batch = nextBatch;
    physRow = nextPhysRow;
  }
  cp_async_wait<0>();
}

// ---- one-shot kernels (v1 structure) for large contiguous inputs ------------------------------
// Measured on an H100 SXM (2026-11-25, commit 2982c47): the streaming kernels above win where a
// thread has at most one chunk (M=128: per-token 7.3 -> 6.2 us, SiLU 8.4 -> 5.9 us; masked 1135
// rows 47 -> 13 us) but plateau at ~1.9 TB/s once they loop (per-token M=16384: 183 us vs v1's
// 131; SiLU: 99 vs 68), for a reason not yet pinned down (not occupancy: 8 CTAs/SM resident).
// So large inputs keep v1's structure: 256-thread CTAs, kOneShotUnroll (row, group) units per
// thread, every load issued before any math, one CTA per 64 units, with the hoisted division
// (H100, 2026-12-05, 73a610f: SiLU M=16384 75 -> 66 us = 85 % of copy, per-token 131 vs 132 us;
// v1's div.rn per value was dropped).
constexpr int kOneShotThreads = 256;
constexpr int kOneShotUnroll = 2;

// Where unit u (row-major (row, group) number) lives, and its scale offset.
struct UnitLayout {
  int rowsPerBatch;   // M (M_max for batched inputs)
  int groupsPerRow;   // K / kGroupSize
  long long sBatch, sRow, sGroup;  // element strides of the scale tensor
  __device__ __forceinline__ long long scale_offset(long long unit) const {
    const long long row = unit / groupsPerRow;
    const int group = static_cast<int>(unit - row * groupsPerRow);
    const int batch = static_cast<int>(row / rowsPerBatch);
    const int rowInBatch = static_cast<int>(row - static_cast<long long>(batch) * rowsPerBatch);
    return batch * sBatch + rowInBatch * sRow + group * sGroup;
  }
};

// The one-shot per-token body: each group of kLanes lanes quantises kOneShotUnroll units of
// kGroupSize values.
template <typename T, int kGroupSize, bool kPow2>
__device__ __forceinline__ void quantize_units_oneshot(const T* __restrict__ gX,
                                                       __nv_fp8_storage_t* __restrict__ gQ,
                                                       float* __restrict__ gS, long long numUnits,
                                                       const UnitLayout& layout) {
  constexpr int kLanes = lanes_per_group<kGroupSize>();
  constexpr int kUnitsPerPass = kOneShotThreads / kLanes;
  const int lane = threadIdx.x % kLanes;
  const long long firstUnit = static_cast<long long>(blockIdx.x) * kUnitsPerPass * kOneShotUnroll +
                              threadIdx.x / kLanes;

  uint4 rRaw[kOneShotUnroll][Raw<T>::kVectors];
#pragma unroll
  for (int p = 0; p < kOneShotUnroll; ++p) {
    const long long unit = firstUnit + p * kUnitsPerPass;
    load_values(gX + unit * kGroupSize + lane * kValuesPerThread, unit < numUnits, rRaw[p]);
  }
#pragma unroll
  for (int p = 0; p < kOneShotUnroll; ++p) {
    const long long unit = firstUnit + p * kUnitsPerPass;
    float rV[16];
    Raw<T>::to_float(rRaw[p], rV);
    const float amax = group_amax<kLanes>(rV, 0xFFFFFFFFu);  // every lane shuffles
    const float scale = scale_from_amax<kPow2>(amax);
    if (unit >= numUnits) continue;
    const long long offset = unit * kGroupSize + lane * kValuesPerThread;
    *reinterpret_cast<uint4*>(gQ + offset) = quantize16(rV, scale);
    if (lane == 0) gS[layout.scale_offset(unit)] = scale;
  }
}

template <typename T, int kGroupSize, bool kPow2>
__global__ void __launch_bounds__(kOneShotThreads) per_token_group_quant_oneshot_kernel(
    const T* __restrict__ gX, __nv_fp8_storage_t* __restrict__ gQ, float* __restrict__ gS,
    long long numUnits, int rowsPerBatch, int groupsPerRow, long long sBatch, long long sRow,
    long long sGroup) {
  pdl::begin();  // before any global access (pdl.cuh)
  const UnitLayout layout{rowsPerBatch, groupsPerRow, sBatch, sRow, sGroup};
  quantize_units_oneshot<T, kGroupSize, kPow2>(gX, gQ, gS, numUnits, layout);
}

// h [rows, 2I] bf16 (gate | up) -> q [rows, I] + scales; v1's SiLU kernel. kMasked: units of
// rows m >= masked_m[e] (clamped to [0, M_max]) are skipped; the grid still covers all E * M_max
// rows (graph-capturable), and a warp whose units are all masked out leaves after reading
// masked_m, so the work follows the valid rows without the stream kernel's prefix scan and loop.
template <int kGroupSize, bool kPow2, bool kMasked = false>
__global__ void __launch_bounds__(kOneShotThreads) silu_and_mul_quant_oneshot_kernel(
    const __nv_bfloat16* __restrict__ gH, __nv_fp8_storage_t* __restrict__ gQ,
    float* __restrict__ gS, const int* __restrict__ gMaskedM, long long numUnits,
    int rowsPerBatch, int groupsPerRow, long long sBatch, long long sRow, long long sGroup) {
  pdl::begin();  // before any global access (pdl.cuh)
  constexpr int kLanes = lanes_per_group<kGroupSize>();
  constexpr int kUnitsPerPass = kOneShotThreads / kLanes;
  const UnitLayout layout{rowsPerBatch, groupsPerRow, sBatch, sRow, sGroup};
  const int lane = threadIdx.x % kLanes;
  const int intermediate = groupsPerRow * kGroupSize;  // I
  const long long firstUnit = static_cast<long long>(blockIdx.x) * kUnitsPerPass * kOneShotUnroll +
                              threadIdx.x / kLanes;
  auto gate_ptr = [&](long long unit) {
    const long long row = unit / groupsPerRow;
    const int col = static_cast<int>(unit - row * groupsPerRow) * kGroupSize + lane * kValuesPerThread;
    return gH + row * 2 * intermediate + col;
  };
  // Unit u exists and (kMasked) its row is below its batch's clamped masked_m.
  auto unit_valid = [&](long long unit) {
    if (unit >= numUnits) return false;
    if constexpr (kMasked) {
      const long long row = unit / groupsPerRow;
      const int batch = static_cast<int>(row / rowsPerBatch);
      const int m = static_cast<int>(row - static_cast<long long>(batch) * rowsPerBatch);
      return m < min(max(__ldg(gMaskedM + batch), 0), rowsPerBatch);
    }
    return true;
  };

  bool rValid[kOneShotUnroll], anyValid = false;
#pragma unroll
  for (int p = 0; p < kOneShotUnroll; ++p) {
    rValid[p] = unit_valid(firstUnit + p * kUnitsPerPass);
    anyValid = anyValid || rValid[p];
  }
  // kMasked: nothing to do for this warp (warp-uniform exit: the shuffles below need every lane)
  if (kMasked && !__any_sync(0xFFFFFFFFu, anyValid)) return;
  uint4 rGate[kOneShotUnroll][2], rUp[kOneShotUnroll][2];
#pragma unroll
  for (int p = 0; p < kOneShotUnroll; ++p) {
    const long long unit = firstUnit + p * kUnitsPerPass;
    const bool valid = rValid[p];
    const __nv_bfloat16* gGate = gate_ptr(valid ? unit : 0);
    load_values(gGate, valid, rGate[p]);
    load_values(gGate + intermediate, valid, rUp[p]);
  }
#pragma unroll
  for (int p = 0; p < kOneShotUnroll; ++p) {
    const long long unit = firstUnit + p * kUnitsPerPass;
    const bool valid = rValid[p];
    float rY[16];
    const bool inRange = silu_mul16(rGate[p], rUp[p], rY);
    float amax = group_amax<kLanes>(rY, 0xFFFFFFFFu);
    // warp-uniform; invalid units (zeros) never need it, and must not reload
    if (__builtin_expect(__any_sync(0xFFFFFFFFu, !inRange || !(amax <= kFloatMax)), 0)) {
      if (valid) silu_mul16_special(gate_ptr(unit), intermediate, rY);
      amax = group_amax<kLanes>(rY, 0xFFFFFFFFu);
    }
    const float scale = scale_from_amax<kPow2>(amax);
    if (!valid) continue;
    *reinterpret_cast<uint4*>(gQ + unit * kGroupSize + lane * kValuesPerThread) =
        quantize16(rY, scale);
    if (lane == 0) gS[layout.scale_offset(unit)] = scale;
  }
}

}  // namespace quant
}  // namespace moe_fp8
