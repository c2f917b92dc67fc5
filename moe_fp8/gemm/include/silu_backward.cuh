// silu_backward.cuh — SiLU-and-mul backward fused with the three FP8 quantisations it feeds
// (training path, layers/autograd.py), reading dA and h once:
//
//   inputs   dA [M, I] bf16 (dL/d act, from the dgrad of GEMM2), h [M, 2I] bf16 (gate | up)
//   per element, in fp32 with one rounding per operation (bit-exact with
//   moe_fp8.gemm.reference.silu_mul_backward, i.e. with torch's elementwise kernels):
//     sig   = 1 / (1 + exp(-g))          silu = g * sig          act = silu * u
//     dUp   = dA * silu                  dGate = ((dA * u) * sig) * (1 + g * (1 - sig))
//   outputs  dH  = [dGate | dUp] quantised 1x128 along channels: fp8 [M, 2I] + scales [M, 2I/128]
//                  (dX = dH . W13, the grouped dgrad GEMM's A operand)
//            dH^T quantised 1x128 along tokens: fp8 [2I, M] + scales [2I, ceil(M/128)]
//                  (dW13, the k-grouped weight-gradient GEMM's A operand)
//            act^T quantised 1x128 along tokens: fp8 [I, M] + scales [I, ceil(M/128)] (dW2's B)
//   Scales are written through strides (the ops allocate them MN-major). Quantisation math:
//   quant.cuh's, bit for bit.
//
// One kernel: every scale group of the three outputs lies inside one [128 tokens x 128 channels
// of I] tile, so a CTA (256 threads, grid (I/128, ceil(M/128))) owns one tile and needs nothing
// from its neighbours. The tile's inputs (gate, up, dA: 3 x 32 KB bf16) are staged in shared
// memory with cp.async, then
//   phase 1 (row mapping: 16 lanes per token, 8 channels each): compute, reduce the row amax
//           over the 16 lanes, store dH's row-quantised bytes (8-byte stores, coalesced) and its
//           row scales; keep per-channel running maxima, reduced across warps through shared
//           memory into the 3 x 128 column scales;
//   phase 2 (column mapping: 2 channels x 32 tokens per thread): recompute the same values
//           from shared memory (identical code, identical bits), quantise with the column scales
//           and store 16 tokens per 16-byte store straight into the transposed outputs.
// NOTE: recomputing (exp + reciprocal, ~15 instructions per element) instead of keeping the 3
// fp32 results of the tile (192 KB) is what lets two CTAs share an SM (112 KB of shared memory
// each, <= 128 registers); a split into two kernels would write and re-read the fp32 dH/act
// (12 bytes per element of I) — more traffic than the kernel's inputs (6 bytes).
#pragma once

#include "transpose_quant.cuh"

namespace moe_fp8 {
namespace quant {

constexpr int kSiluBwdThreads = 256;
constexpr int kSiluBwdTile = 128;  // tokens and channels (of I) per CTA
constexpr int kSiluBwdWarps = kSiluBwdThreads / 32;
// dynamic shared memory: inputs [3][128][128] bf16 | column partials [8 warps][3][128] f32 |
// column scales [3][128] f32
constexpr int kSiluBwdInputBytes = 3 * kSiluBwdTile * kSiluBwdTile * 2;
constexpr int kSiluBwdPartBytes = kSiluBwdWarps * 3 * kSiluBwdTile * 4;
constexpr int kSiluBwdSmemBytes = kSiluBwdInputBytes + kSiluBwdPartBytes + 3 * kSiluBwdTile * 4;

// The backward of act = silu(g) * u for one element; every operation rounded as torch does it
// (no contraction into FMAs: the _rn intrinsics).
__device__ __forceinline__ void silu_mul_grad(float g, float u, float dA, float& dGate, float& dUp,
                                              float& act) {
  const float sig = __frcp_rn(__fadd_rn(1.0f, expf(-g)));
  const float silu = __fmul_rn(g, sig);
  act = __fmul_rn(silu, u);
  dUp = __fmul_rn(dA, silu);
  const float slope = __fadd_rn(1.0f, __fmul_rn(g, __fsub_rn(1.0f, sig)));
  dGate = __fmul_rn(__fmul_rn(__fmul_rn(dA, u), sig), slope);
}

// q = satfinite_e4m3(v / scale) for 8 values with one scale, packed into 8 bytes.
__device__ __forceinline__ uint2 quantize8(const float (&rV)[8], float scale) {
  float rQ[8];
  if (__builtin_expect(scale <= kFloatMax, 1)) {
    const Divisor divisor(scale);
#pragma unroll
    for (int i = 0; i < 8; ++i) rQ[i] = divisor.divide(rV[i]);
  } else {  // inf/NaN scale: as quantize16
    const float factor = scale == __int_as_float(0x7F800000) ? 0.0f : scale;
#pragma unroll
    for (int i = 0; i < 8; ++i) rQ[i] = __fmul_rn(rV[i], factor);
  }
  unsigned words[2];
  pack_fp8<2>(rQ, words);
  return make_uint2(words[0], words[1]);
}

__device__ __forceinline__ void bf16x8_to_float(uint4 raw, float (&rV)[8]) {
  const unsigned* words = reinterpret_cast<const unsigned*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    rV[2 * i] = __uint_as_float(words[i] << 16);
    rV[2 * i + 1] = __uint_as_float(words[i] & 0xFFFF0000u);
  }
}

// Output row `outRow` of a transposed [rows, M] fp8 tensor, 16 tokens from `firstToken`.
__device__ __forceinline__ void store_token_run(unsigned char* __restrict__ gOut, long long outRow,
                                                long long numTokens, long long firstToken,
                                                int count, const uint4& v) {
  unsigned char* gRow = gOut + outRow * numTokens + firstToken;
  if (count == 16 && numTokens % 16 == 0) {
    *reinterpret_cast<uint4*>(gRow) = v;
  } else {
    const unsigned char* bytes = reinterpret_cast<const unsigned char*>(&v);
    for (int i = 0; i < count; ++i) gRow[i] = bytes[i];
  }
}

// Scale strides: s[row, group] = gS[row * sRow + group * sGroup].
struct Strides2 {
  long long row, group;
  __device__ __forceinline__ long long at(long long r, long long g) const { return r * row + g * group; }
};

template <bool kPow2>
__global__ void __launch_bounds__(kSiluBwdThreads, 2) silu_and_mul_backward_quant_kernel(
    const __nv_bfloat16* __restrict__ gDA, const __nv_bfloat16* __restrict__ gH,
    __nv_fp8_storage_t* __restrict__ gDh, float* __restrict__ gDhS,
    __nv_fp8_storage_t* __restrict__ gDhT, float* __restrict__ gDhTS,
    __nv_fp8_storage_t* __restrict__ gActT, float* __restrict__ gActTS, int M, int I,
    long long dhSRow, long long dhSGroup, long long dhTSRow, long long dhTSGroup,
    long long actTSRow, long long actTSGroup) {
  pdl::begin();  // before any global access (pdl.cuh)
#ifndef MOE_FP8_EMULATE
  extern __shared__ __align__(16) unsigned char sRaw[];
#else
  static __attribute__((aligned(16))) unsigned char sRaw[kSiluBwdSmemBytes];  // CPU emulation: CTAs run in turn
#endif
  // sIn[q][row][col], q = 0 gate, 1 up, 2 dA: (3, 128 tokens, 128 channels) bf16
  __nv_bfloat16* sIn = reinterpret_cast<__nv_bfloat16*>(sRaw);
  float* sPart = reinterpret_cast<float*>(sRaw + kSiluBwdInputBytes);   // (8 warps, 3, 128)
  float* sColScale = sPart + kSiluBwdWarps * 3 * kSiluBwdTile;          // (3, 128)
  const Strides2 dhS{dhSRow, dhSGroup}, dhTS{dhTSRow, dhTSGroup}, actTS{actTSRow, actTSGroup};
  const int cb = blockIdx.x, tb = blockIdx.y;
  const long long tokenBase = static_cast<long long>(tb) * kSiluBwdTile;
  const int rowsValid = min(kSiluBwdTile, M - tb * kSiluBwdTile);
  const long long twoI = 2LL * I, chanBase = static_cast<long long>(cb) * kSiluBwdTile;

  // ---- stage the tile: 3 inputs x 128 rows x 16 chunks of 8 bf16 (rows past M: zeros)
  for (int idx = threadIdx.x; idx < 3 * kSiluBwdTile * 16; idx += kSiluBwdThreads) {
    const int q = idx / (kSiluBwdTile * 16), row = idx / 16 % kSiluBwdTile, chunk = idx % 16;
    uint4* sDst = reinterpret_cast<uint4*>(sIn + (q * kSiluBwdTile + row) * kSiluBwdTile + chunk * 8);
    if (row < rowsValid) {
      const long long token = tokenBase + row;
      const __nv_bfloat16* gSrc =
          q == 2 ? gDA + token * I + chanBase + chunk * 8
                 : gH + token * twoI + (q == 1 ? I : 0) + chanBase + chunk * 8;
      cp_async16(sDst, gSrc);
    } else {
      *sDst = make_uint4(0, 0, 0, 0);
    }
  }
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();

  // ---- phase 1: rows. Lanes 16k .. 16k+15 share a token; lane cc holds channels 8cc .. 8cc+7.
  const int cc = threadIdx.x % 16, rowSlot = threadIdx.x / 16, warp = threadIdx.x / 32;
  const unsigned rowMask = 0xFFFFu << (threadIdx.x % 32 & 16);
  float rColMax[3][8];
#pragma unroll
  for (int q = 0; q < 3; ++q)
#pragma unroll
    for (int i = 0; i < 8; ++i) rColMax[q][i] = 0.0f;
#pragma unroll 2
  for (int j = 0; j < kSiluBwdTile / 16; ++j) {
    const int row = rowSlot + 16 * j;
    if (row >= rowsValid) break;  // uniform over the 16 lanes of the token (rows only grow)
    const int offset = row * kSiluBwdTile + cc * 8;
    float rG[8], rU[8], rD[8];
    bf16x8_to_float(*reinterpret_cast<const uint4*>(sIn + offset), rG);
    bf16x8_to_float(*reinterpret_cast<const uint4*>(sIn + kSiluBwdTile * kSiluBwdTile + offset), rU);
    bf16x8_to_float(*reinterpret_cast<const uint4*>(sIn + 2 * kSiluBwdTile * kSiluBwdTile + offset), rD);
    float rDGate[8], rDUp[8];
    float amaxGate = 0.0f, amaxUp = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      float act;
      silu_mul_grad(rG[i], rU[i], rD[i], rDGate[i], rDUp[i], act);
      amaxGate = max_nan(amaxGate, fabsf(rDGate[i]));
      amaxUp = max_nan(amaxUp, fabsf(rDUp[i]));
      rColMax[0][i] = max_nan(rColMax[0][i], fabsf(rDGate[i]));
      rColMax[1][i] = max_nan(rColMax[1][i], fabsf(rDUp[i]));
      rColMax[2][i] = max_nan(rColMax[2][i], fabsf(act));
    }
#pragma unroll
    for (int off = 8; off > 0; off /= 2) {
      amaxGate = max_nan(amaxGate, __shfl_xor_sync(rowMask, amaxGate, off));
      amaxUp = max_nan(amaxUp, __shfl_xor_sync(rowMask, amaxUp, off));
    }
    const float scaleGate = scale_from_amax<kPow2>(amaxGate);
    const float scaleUp = scale_from_amax<kPow2>(amaxUp);
    const long long token = tokenBase + row;
    unsigned char* gRow = reinterpret_cast<unsigned char*>(gDh) + token * twoI + chanBase + cc * 8;
    *reinterpret_cast<uint2*>(gRow) = quantize8(rDGate, scaleGate);
    *reinterpret_cast<uint2*>(gRow + I) = quantize8(rDUp, scaleUp);
    if (cc == 0) {
      gDhS[dhS.at(token, cb)] = scaleGate;
      gDhS[dhS.at(token, I / kSiluBwdTile + cb)] = scaleUp;
    }
  }
  // lanes l and l ^ 16 hold the same channels; then 8 warps through shared memory
#pragma unroll
  for (int q = 0; q < 3; ++q)
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      rColMax[q][i] = max_nan(rColMax[q][i], __shfl_xor_sync(0xFFFFFFFFu, rColMax[q][i], 16));
      if (threadIdx.x % 32 < 16) sPart[(warp * 3 + q) * kSiluBwdTile + cc * 8 + i] = rColMax[q][i];
    }
  __syncthreads();
  for (int idx = threadIdx.x; idx < 3 * kSiluBwdTile; idx += kSiluBwdThreads) {
    const int q = idx / kSiluBwdTile, c = idx % kSiluBwdTile;
    float amax = sPart[q * kSiluBwdTile + c];
#pragma unroll
    for (int w = 1; w < kSiluBwdWarps; ++w) amax = max_nan(amax, sPart[(w * 3 + q) * kSiluBwdTile + c]);
    const float scale = scale_from_amax<kPow2>(amax);
    sColScale[idx] = scale;
    if (q == 0) gDhTS[dhTS.at(chanBase + c, tb)] = scale;
    else if (q == 1) gDhTS[dhTS.at(I + chanBase + c, tb)] = scale;
    else gActTS[actTS.at(chanBase + c, tb)] = scale;
  }
  __syncthreads();

  // ---- phase 2: columns. Thread: channels 2cp, 2cp+1; tile rows 32tq .. 32tq+31.
  const int cp = threadIdx.x % 64, tq = threadIdx.x / 64;
  const ScaleDivisor divGate0(sColScale[2 * cp]), divGate1(sColScale[2 * cp + 1]);
  const ScaleDivisor divUp0(sColScale[kSiluBwdTile + 2 * cp]),
      divUp1(sColScale[kSiluBwdTile + 2 * cp + 1]);
  const ScaleDivisor divAct0(sColScale[2 * kSiluBwdTile + 2 * cp]),
      divAct1(sColScale[2 * kSiluBwdTile + 2 * cp + 1]);
  const unsigned* sIn32 = reinterpret_cast<const unsigned*>(sIn);  // bf16 pairs
  constexpr int kPlane32 = kSiluBwdTile * kSiluBwdTile / 2;
#pragma unroll 1
  for (int h = 0; h < 2; ++h) {
    const int first = 32 * tq + 16 * h;
    if (first >= rowsValid) break;
    uint4 rOut[6];  // (gate c0, gate c1, up c0, up c1, act c0, act c1): 16 tokens each
#pragma unroll
    for (int m = 0; m < 4; ++m) {  // 4 tokens -> word m of each output
      float rQ[6][4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int word = (first + 4 * m + i) * (kSiluBwdTile / 2) + cp;
        const unsigned g2 = sIn32[word], u2 = sIn32[kPlane32 + word], d2 = sIn32[2 * kPlane32 + word];
        float dGate, dUp, act;
        silu_mul_grad(__uint_as_float(g2 << 16), __uint_as_float(u2 << 16),
                      __uint_as_float(d2 << 16), dGate, dUp, act);
        rQ[0][i] = divGate0.divide(dGate);
        rQ[2][i] = divUp0.divide(dUp);
        rQ[4][i] = divAct0.divide(act);
        silu_mul_grad(__uint_as_float(g2 & 0xFFFF0000u), __uint_as_float(u2 & 0xFFFF0000u),
                      __uint_as_float(d2 & 0xFFFF0000u), dGate, dUp, act);
        rQ[1][i] = divGate1.divide(dGate);
        rQ[3][i] = divUp1.divide(dUp);
        rQ[5][i] = divAct1.divide(act);
      }
#pragma unroll
      for (int o = 0; o < 6; ++o) {
        const unsigned lo = __nv_cvt_float2_to_fp8x2(make_float2(rQ[o][0], rQ[o][1]),
                                                     __NV_SATFINITE, __NV_E4M3);
        const unsigned hi = __nv_cvt_float2_to_fp8x2(make_float2(rQ[o][2], rQ[o][3]),
                                                     __NV_SATFINITE, __NV_E4M3);
        reinterpret_cast<unsigned*>(&rOut[o])[m] = lo | (hi << 16);
      }
    }
    const int count = min(16, rowsValid - first);
    const long long firstToken = tokenBase + first;
    unsigned char* gDhT8 = reinterpret_cast<unsigned char*>(gDhT);
    unsigned char* gActT8 = reinterpret_cast<unsigned char*>(gActT);
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const long long chan = chanBase + 2 * cp + k;
      store_token_run(gDhT8, chan, M, firstToken, count, rOut[k]);
      store_token_run(gDhT8, I + chan, M, firstToken, count, rOut[2 + k]);
      store_token_run(gActT8, chan, M, firstToken, count, rOut[4 + k]);
    }
  }
}

}  // namespace quant
}  // namespace moe_fp8
