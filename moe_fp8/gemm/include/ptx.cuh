// Inline-PTX wrappers for sm_90a: mbarrier, TMA (cp.async.bulk.tensor, multicast, reduce-add),
// clusters, wgmma (FP8, QGMMA in SASS), stmatrix, setmaxnreg, named barriers, elect.sync.
//
// Header-only and free of toolkit includes so that it compiles under NVRTC as well as nvcc
// (NVRTC cannot include <cuda.h>; a tensor map is passed as an opaque 128-byte struct).
// NOTE: every wrapper is a single PTX instruction (or a spin loop around one); ordering between
// the generic proxy (ld/st/stmatrix) and the async proxy (TMA, wgmma) is the caller's job.
#pragma once

namespace moe_fp8 {

using u32 = unsigned int;
using u64 = unsigned long long;

namespace ptx {

// cuTensorMapEncodeTiled's CUtensorMap: 128 bytes, 64-byte aligned, passed by value as a
// `const __grid_constant__` kernel parameter so its address is a valid TMA operand.
struct alignas(64) TmaDesc {
  u64 v[16];
};

__device__ __forceinline__ u32 smem_addr(const void* p) {
  return static_cast<u32>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ u32 dynamic_smem_bytes() {
  u32 bytes;
  asm volatile("mov.u32 %0, %%dynamic_smem_size;" : "=r"(bytes));
  return bytes;
}

// ------------------------------------------------------------------ warp / warpgroup control

// One lane of the (converged) warp gets true.
__device__ __forceinline__ bool elect_one() {
  u32 pred;
  asm volatile(
      "{\n.reg .b32 r;\n.reg .pred p;\n"
      "elect.sync r|p, 0xffffffff;\n"
      "selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(pred));
  return pred != 0;
}

// Register reallocation between warpgroups; every thread of the warpgroup must execute it.
template <u32 kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
template <u32 kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

// Barrier among `count` threads (a multiple of 32) on hardware barrier `id` (1..15; 0 is
// __syncthreads).
__device__ __forceinline__ void named_barrier(u32 id, u32 count) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}

// ------------------------------------------------------------------ mbarrier

__device__ __forceinline__ void mbar_init(u64* bar, u32 arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(arrivals));
}

// Makes barrier initialisation visible to the async proxy (TMA complete_tx) and other threads.
__device__ __forceinline__ void fence_barrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

__device__ __forceinline__ void mbar_arrive(u64* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}

// Arrive and add `bytes` to the transaction count the current phase waits for.
__device__ __forceinline__ void mbar_arrive_expect_tx(u64* bar, u32 bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)),
               "r"(bytes)
               : "memory");
}

// Spin until the phase of parity `parity` has completed. A freshly initialised barrier is in
// phase 0, so waiting on parity 1 returns at once (used for the first pass over empty slots).
__device__ __forceinline__ void mbar_wait(u64* bar, u32 parity) {
  const u32 addr = smem_addr(bar);
  u32 done;
  do {
    asm volatile(
        "{\n.reg .pred p;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(addr), "r"(parity)
        : "memory");
  } while (!done);
}

// The same wait for threads with nothing else to do (TMA producer, scale loader): the hint lets
// the hardware suspend the thread until the phase completes (or ~0.1 ms pass) instead of
// re-polling, which took issue slots from the math warps sharing its SM sub-partition.
__device__ __forceinline__ void mbar_wait_idle(u64* bar, u32 parity) {
  const u32 addr = smem_addr(bar);
  u32 done;
  do {
    asm volatile(
        "{\n.reg .pred p;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2, %3;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(addr), "r"(parity), "n"(100000)
        : "memory");
  } while (!done);
}

// ------------------------------------------------------------------ TMA

__device__ __forceinline__ void prefetch_tma_desc(const TmaDesc* desc) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<u64>(desc)) : "memory");
}

// Generic-proxy shared-memory writes (st.shared, stmatrix) become visible to the async proxy
// (TMA store, wgmma) only after this fence in each writing thread.
__device__ __forceinline__ void fence_proxy_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// 16 bytes global -> shared without registers (cp.async, L2 only: .cg): a generic-proxy write
// whose completion the thread observes through cp_async_mbar_arrive_noinc.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(dst)),
               "l"(reinterpret_cast<u64>(src))
               : "memory");
}
// An arrive on `bar` once every cp.async this thread issued before has completed; .noinc: the
// barrier's expected count includes this arrival.
__device__ __forceinline__ void cp_async_mbar_arrive_noinc(u64* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(smem_addr(bar))
               : "memory");
}

// Global -> shared tile load; completes on `bar` (adds the box's bytes to its transaction count).
// Coordinates are element indices, innermost first; out-of-bounds elements are zero-filled.
__device__ __forceinline__ void tma_load_2d(void* s_dst, const TmaDesc* desc, u64* bar, int c0,
                                            int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4}], [%2];\n" ::"r"(smem_addr(s_dst)),
      "l"(reinterpret_cast<u64>(desc)), "r"(smem_addr(bar)), "r"(c0), "r"(c1)
      : "memory");
}

__device__ __forceinline__ void tma_load_3d(void* s_dst, const TmaDesc* desc, u64* bar, int c0,
                                            int c1, int c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4, %5}], [%2];\n" ::"r"(smem_addr(s_dst)),
      "l"(reinterpret_cast<u64>(desc)), "r"(smem_addr(bar)), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
}

// Same load delivered to the same shared-memory offset (and barrier offset) of every CTA of the
// cluster whose bit is set in `cta_mask`.
__device__ __forceinline__ void tma_load_2d_multicast(void* s_dst, const TmaDesc* desc, u64* bar,
                                                      int c0, int c1, unsigned short cta_mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      ".multicast::cluster [%0], [%1, {%3, %4}], [%2], %5;\n" ::"r"(smem_addr(s_dst)),
      "l"(reinterpret_cast<u64>(desc)), "r"(smem_addr(bar)), "r"(c0), "r"(c1), "h"(cta_mask)
      : "memory");
}

// Shared -> global tile store (clipped at the tensor's bounds), tracked by bulk groups.
__device__ __forceinline__ void tma_store_2d(const TmaDesc* desc, const void* s_src, int c0,
                                             int c1) {
  asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];\n" ::"l"(
                   reinterpret_cast<u64>(desc)),
               "r"(smem_addr(s_src)), "r"(c0), "r"(c1)
               : "memory");
}

__device__ __forceinline__ void tma_store_commit() {
  asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
}

// Wait until at most kPending store groups still read shared memory (the source may be reused).
template <int kPending>
__device__ __forceinline__ void tma_store_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(kPending) : "memory");
}

// Wait until all committed stores have completed (before the CTA exits).
__device__ __forceinline__ void tma_store_wait_all() {
  asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
}

__device__ __forceinline__ void tma_store_3d(const TmaDesc* desc, const void* s_src, int c0,
                                             int c1, int c2) {
  asm volatile("cp.async.bulk.tensor.3d.global.shared::cta.bulk_group [%0, {%2, %3, %4}], [%1];\n" ::"l"(
                   reinterpret_cast<u64>(desc)),
               "r"(smem_addr(s_src)), "r"(c0), "r"(c1), "r"(c2)
               : "memory");
}

// An L2 cache policy under which the lines an access brings in are evicted first.
__device__ __forceinline__ u64 l2_evict_first_policy() {
  u64 policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
  return policy;
}

// tma_store_3d whose lines leave L2 first (`policy`: l2_evict_first_policy): an output written
// once and not read again, so the lines the kernel still reads stay.
__device__ __forceinline__ void tma_store_3d_hint(const TmaDesc* desc, const void* s_src, int c0,
                                                  int c1, int c2, u64 policy) {
  asm volatile("cp.async.bulk.tensor.3d.global.shared::cta.bulk_group.L2::cache_hint"
               " [%0, {%2, %3, %4}], [%1], %5;\n" ::"l"(reinterpret_cast<u64>(desc)),
               "r"(smem_addr(s_src)), "r"(c0), "r"(c1), "r"(c2), "l"(policy)
               : "memory");
}

// Shared -> global element-wise fp32 add (performed at L2, atomic per element), tracked by bulk
// groups like a store: out[e, rows, cols] += tile. Clipped at the tensor's bounds.
__device__ __forceinline__ void tma_reduce_add_3d(const TmaDesc* desc, const void* s_src, int c0,
                                                  int c1, int c2) {
  asm volatile(
      "cp.reduce.async.bulk.tensor.3d.global.shared::cta.add.tile.bulk_group"
      " [%0, {%2, %3, %4}], [%1];\n" ::"l"(reinterpret_cast<u64>(desc)),
      "r"(smem_addr(s_src)), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
}

__device__ __forceinline__ void st_shared_v2(u32 s_addr, float x, float y) {
  asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(s_addr), "f"(x), "f"(y) : "memory");
}

// ------------------------------------------------------------------ clusters

__device__ __forceinline__ u32 cluster_ctarank() {
  u32 rank;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(rank));
  return rank;
}

// Every thread of every CTA of the cluster; release/acquire at cluster scope. Also orders
// mbarrier initialisation before any peer multicasts into (or arrives on) this CTA's barriers.
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;\n" ::: "memory");
}

// Arrive on the barrier at the same shared-memory offset as `bar` in CTA `cta` of the cluster
// (`cta` may be this CTA). Default (release.cta) semantics: it only hands a consumed ring slot
// back (the slot's readers were wgmma, already retired).
// NOTE: ".release.cluster" compiled to MEMBAR.ALL.GPU + ERRBAR before every arrive (SASS); once
// per K block per warp that made the 2-CTA multicast kernel 2x slower (H100, 2026-11-25).
__device__ __forceinline__ void mbar_arrive_cluster(u64* bar, u32 cta) {
  asm volatile(
      "{\n.reg .b32 remote;\n"
      "mapa.shared::cluster.u32 remote, %0, %1;\n"
      "mbarrier.arrive.shared::cluster.b64 _, [remote];\n}\n" ::"r"(smem_addr(bar)),
      "r"(cta)
      : "memory");
}

// Store `value` into the int at `p`'s shared-memory offset in CTA `cta` of the cluster; the
// store completes 4 transaction bytes on the barrier at `bar`'s offset there, whose phase must
// expect them (mbar_arrive_expect_tx). No cluster-scope fence: the barrier orders the data.
__device__ __forceinline__ void st_async_cluster(int* p, int value, u64* bar, u32 cta) {
  asm volatile(
      "{\n.reg .b32 rp, rb;\n"
      "mapa.shared::cluster.u32 rp, %0, %2;\n"
      "mapa.shared::cluster.u32 rb, %1, %2;\n"
      "st.async.shared::cluster.mbarrier::complete_tx::bytes.b32 [rp], %3, [rb];\n}\n" ::"r"(
          smem_addr(p)),
      "r"(smem_addr(bar)), "r"(cta), "r"(value)
      : "memory");
}

// ------------------------------------------------------------------ wgmma (FP8)

// Shared-memory matrix descriptor of a K-major tile whose rows are 128 bytes (one 128-channel
// FP8 K block) in the TMA 128-byte swizzle: 8-row x 128-byte atoms, atoms 1024 bytes apart
// (stride-dimension offset); the leading-dimension offset is unused because one wgmma's K extent
// (32 bytes) stays inside a swizzle row. The tile must start 1024-byte aligned (base offset 0).
// Bits: [0,14) start>>4, [16,30) LBO>>4, [32,46) SBO>>4, [62,64) swizzle (1 = 128 B).
__device__ __forceinline__ u64 make_desc_k128_sw128(const void* s_tile) {
  const u64 start = (smem_addr(s_tile) & 0x3FFFF) >> 4;
  return start | (u64(1) << 16) | (u64(1024 >> 4) << 32) | (u64(1) << 62);
}
// The same descriptor split in two 32-bit words: `lo` (start address >> 4, leading byte offset)
// is all that changes between slots and K steps; `hi` (stride 1024 B, 128B swizzle) is constant.
__device__ __forceinline__ u32 desc_k128_sw128_lo(const void* s_tile) {
  return static_cast<u32>(make_desc_k128_sw128(s_tile));
}
constexpr u64 kDescK128Sw128Hi64 = (u64(1024 >> 4) << 32) | (u64(1) << 62);

// Advancing the descriptor by 32 bytes along K (one k32 step) adds 2 to the start field; the
// hardware applies the swizzle to the computed addresses, so no other field changes.
constexpr u32 kDescKStep = 32 >> 4;

__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}

// The same value, opaque to the optimiser: keeps loop-invariant comparisons against it from being
// hoisted into many long-lived predicate registers (which spilled at kBlockN = 112).
__device__ __forceinline__ int opaque(int x) {
  int r;
  asm volatile("mov.b32 %0, %1;\n" : "=r"(r) : "r"(x));
  return r;
}

// Keeps the compiler from moving accesses of accumulator registers across wgmma fences/waits.
template <int kCount>
__device__ __forceinline__ void fence_regs(float (&r)[kCount]) {
#pragma unroll
  for (int i = 0; i < kCount; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

// D[64 x kN] (fp32, kN/2 registers per thread) (+)= A[64 x 32] * B[kN x 32]^T, both e4m3 in
// shared memory, described by the low words of K-major 128B-swizzle descriptors (the high word is
// kDescK128Sw128Hi64). The accumulators are operands %0 .. %(kN/2 - 1); the descriptor words and
// the accumulate flag follow as read-only inputs. NOTE: 64-bit read-write ("+l") descriptors made
// ptxas copy and re-add both words (IMAD.MOV + IADD3 + IMAD.X) before every wgmma (SASS,
// 2026-12-05: about a third of the math warps' instructions).
template <int kN>
struct WgmmaFp8;

#define MOE_WG_R0 "%0, %1, %2, %3, %4, %5, %6, %7"
#define MOE_WG_R1 "%8, %9, %10, %11, %12, %13, %14, %15"
#define MOE_WG_R2 "%16, %17, %18, %19, %20, %21, %22, %23"
#define MOE_WG_R3 "%24, %25, %26, %27, %28, %29, %30, %31"
#define MOE_WG_R4 "%32, %33, %34, %35, %36, %37, %38, %39"
#define MOE_WG_R5 "%40, %41, %42, %43, %44, %45, %46, %47"
#define MOE_WG_R6 "%48, %49, %50, %51, %52, %53, %54, %55"
#define MOE_WG_R7 "%56, %57, %58, %59, %60, %61, %62, %63"
#define MOE_WG_R8 "%64, %65, %66, %67, %68, %69, %70, %71"
#define MOE_WG_R9 "%72, %73, %74, %75, %76, %77, %78, %79"
#define MOE_WG_R10 "%80, %81, %82, %83, %84, %85, %86, %87"
#define MOE_WG_R11 "%88, %89, %90, %91, %92, %93, %94, %95"
#define MOE_WG_R12 "%96, %97, %98, %99, %100, %101, %102, %103"
#define MOE_WG_R13 "%104, %105, %106, %107, %108, %109, %110, %111"
#define MOE_WG_R14 "%112, %113, %114, %115, %116, %117, %118, %119"
#define MOE_WG_R15 "%120, %121, %122, %123, %124, %125, %126, %127"
#define MOE_WG_D(b)                                                                            \
  "+f"(d[b + 0]), "+f"(d[b + 1]), "+f"(d[b + 2]), "+f"(d[b + 3]), "+f"(d[b + 4]),              \
      "+f"(d[b + 5]), "+f"(d[b + 6]), "+f"(d[b + 7])

// kDescA, kDescB, kFlag: the operand numbers of the inputs, "%<kN/2>" .. "%<kN/2 + 2>"; the
// constant high word (kDescK128Sw128Hi64, an immediate) is operand %<kN/2 + 3>, named by kHi.
#define MOE_WG_CASE(kN, kRegList, kDescA, kDescB, kFlag, kHi, ...)                              \
  template <>                                                                                  \
  struct WgmmaFp8<kN> {                                                                        \
    static constexpr int kRegs = kN / 2;                                                       \
    __device__ __forceinline__ static void mma(u32 desc_a_lo, u32 desc_b_lo,                   \
                                               float (&d)[kN / 2], u32 accumulate) {           \
      asm volatile(                                                                            \
          "{\n.reg .pred p;\n.reg .b64 da, db;\nsetp.ne.b32 p, " kFlag ", 0;\n"                 \
          "cvt.u64.u32 da, " kDescA ";\nor.b64 da, da, " kHi ";\n"                                \
          "cvt.u64.u32 db, " kDescB ";\nor.b64 db, db, " kHi ";\n"                                \
          "wgmma.mma_async.sync.aligned.m64n" #kN "k32.f32.e4m3.e4m3 {" kRegList "}, da, db, "  \
          "p, 1, 1;\n}\n"                                                                       \
          : __VA_ARGS__                                                                        \
          : "r"(desc_a_lo), "r"(desc_b_lo), "r"(accumulate), "n"(kDescK128Sw128Hi64));      \
    }                                                                                          \
  };

MOE_WG_CASE(16, MOE_WG_R0, "%8", "%9", "%10", "%11",
            MOE_WG_D(0))
MOE_WG_CASE(32, MOE_WG_R0 ", " MOE_WG_R1, "%16", "%17", "%18", "%19",
            MOE_WG_D(0), MOE_WG_D(8))
MOE_WG_CASE(48, MOE_WG_R0 ", " MOE_WG_R1 ", " MOE_WG_R2, "%24", "%25", "%26", "%27",
            MOE_WG_D(0), MOE_WG_D(8), MOE_WG_D(16))
MOE_WG_CASE(64, MOE_WG_R0 ", " MOE_WG_R1 ", " MOE_WG_R2 ", " MOE_WG_R3, "%32", "%33", "%34", "%35",
            MOE_WG_D(0), MOE_WG_D(8), MOE_WG_D(16), MOE_WG_D(24))
MOE_WG_CASE(80,
            MOE_WG_R0 ", " MOE_WG_R1 ", " MOE_WG_R2 ", " MOE_WG_R3 ", " MOE_WG_R4,
            "%40", "%41", "%42", "%43",
            MOE_WG_D(0), MOE_WG_D(8), MOE_WG_D(16), MOE_WG_D(24), MOE_WG_D(32))
MOE_WG_CASE(96,
            MOE_WG_R0 ", " MOE_WG_R1 ", " MOE_WG_R2 ", " MOE_WG_R3 ", " MOE_WG_R4 ", " MOE_WG_R5,
            "%48", "%49", "%50", "%51",
            MOE_WG_D(0), MOE_WG_D(8), MOE_WG_D(16), MOE_WG_D(24), MOE_WG_D(32), MOE_WG_D(40))
MOE_WG_CASE(112,
            MOE_WG_R0 ", " MOE_WG_R1 ", " MOE_WG_R2 ", " MOE_WG_R3 ", " MOE_WG_R4 ", "
                MOE_WG_R5 ", " MOE_WG_R6,
            "%56", "%57", "%58", "%59",
            MOE_WG_D(0), MOE_WG_D(8), MOE_WG_D(16), MOE_WG_D(24), MOE_WG_D(32), MOE_WG_D(40),
            MOE_WG_D(48))
MOE_WG_CASE(128,
            MOE_WG_R0 ", " MOE_WG_R1 ", " MOE_WG_R2 ", " MOE_WG_R3 ", " MOE_WG_R4 ", "
                MOE_WG_R5 ", " MOE_WG_R6 ", " MOE_WG_R7,
            "%64", "%65", "%66", "%67",
            MOE_WG_D(0), MOE_WG_D(8), MOE_WG_D(16), MOE_WG_D(24), MOE_WG_D(32), MOE_WG_D(40),
            MOE_WG_D(48), MOE_WG_D(56))
MOE_WG_CASE(144,
            MOE_WG_R0 ", " MOE_WG_R1 ", " MOE_WG_R2 ", " MOE_WG_R3 ", " MOE_WG_R4 ", "
                MOE_WG_R5 ", " MOE_WG_R6 ", " MOE_WG_R7 ", " MOE_WG_R8,
            "%72", "%73", "%74", "%75",
            MOE_WG_D(0), MOE_WG_D(8), MOE_WG_D(16), MOE_WG_D(24), MOE_WG_D(32), MOE_WG_D(40),
            MOE_WG_D(48), MOE_WG_D(56), MOE_WG_D(64))
MOE_WG_CASE(160,
            MOE_WG_R0 ", " MOE_WG_R1 ", " MOE_WG_R2 ", " MOE_WG_R3 ", " MOE_WG_R4 ", "
                MOE_WG_R5 ", " MOE_WG_R6 ", " MOE_WG_R7 ", " MOE_WG_R8 ", " MOE_WG_R9,
            "%80", "%81", "%82", "%83",
            MOE_WG_D(0), MOE_WG_D(8), MOE_WG_D(16), MOE_WG_D(24), MOE_WG_D(32), MOE_WG_D(40),
            MOE_WG_D(48), MOE_WG_D(56), MOE_WG_D(64), MOE_WG_D(72))
MOE_WG_CASE(192,
            MOE_WG_R0 ", " MOE_WG_R1 ", " MOE_WG_R2 ", " MOE_WG_R3 ", " MOE_WG_R4 ", "
                MOE_WG_R5 ", " MOE_WG_R6 ", " MOE_WG_R7 ", " MOE_WG_R8 ", " MOE_WG_R9 ", "
                MOE_WG_R10 ", " MOE_WG_R11,
            "%96", "%97", "%98", "%99",
            MOE_WG_D(0), MOE_WG_D(8), MOE_WG_D(16), MOE_WG_D(24), MOE_WG_D(32), MOE_WG_D(40),
            MOE_WG_D(48), MOE_WG_D(56), MOE_WG_D(64), MOE_WG_D(72), MOE_WG_D(80), MOE_WG_D(88))
MOE_WG_CASE(256,
            MOE_WG_R0 ", " MOE_WG_R1 ", " MOE_WG_R2 ", " MOE_WG_R3 ", " MOE_WG_R4 ", "
                MOE_WG_R5 ", " MOE_WG_R6 ", " MOE_WG_R7 ", " MOE_WG_R8 ", " MOE_WG_R9 ", "
                MOE_WG_R10 ", " MOE_WG_R11 ", " MOE_WG_R12 ", " MOE_WG_R13 ", " MOE_WG_R14 ", "
                MOE_WG_R15,
            "%128", "%129", "%130", "%131",
            MOE_WG_D(0), MOE_WG_D(8), MOE_WG_D(16), MOE_WG_D(24), MOE_WG_D(32), MOE_WG_D(40),
            MOE_WG_D(48), MOE_WG_D(56), MOE_WG_D(64), MOE_WG_D(72), MOE_WG_D(80), MOE_WG_D(88),
            MOE_WG_D(96), MOE_WG_D(104), MOE_WG_D(112), MOE_WG_D(120))

#undef MOE_WG_CASE
#undef MOE_WG_D

// ------------------------------------------------------------------ epilogue helpers

// Two fp32 -> one bf16x2 register, round to nearest even; `lo` lands at the lower address.
__device__ __forceinline__ u32 pack_bf16x2(float lo, float hi) {
  u32 r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

// Four 8x8 b16 matrices from registers to shared memory; lane l supplies the address of row
// l % 8 of matrix l / 8, and register i of every lane holds its two elements of matrix i.
__device__ __forceinline__ void stmatrix_x4(u32 s_addr, u32 r0, u32 r1, u32 r2, u32 r3) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(s_addr),
               "r"(r0), "r"(r1), "r"(r2), "r"(r3)
               : "memory");
}

// The same with each 8x8 matrix transposed on its way: lane l still addresses row l % 8 of
// matrix l / 8, which receives column l % 8 of the matrix as the registers hold it.
__device__ __forceinline__ void stmatrix_x4_trans(u32 s_addr, u32 r0, u32 r1, u32 r2, u32 r3) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n"
               ::"r"(s_addr), "r"(r0), "r"(r1), "r"(r2), "r"(r3)
               : "memory");
}

}  // namespace ptx
}  // namespace moe_fp8
