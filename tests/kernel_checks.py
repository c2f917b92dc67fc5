"""Shared by the kernel tests that run on two backends: a Hopper GPU, or the kernel's ``.cuh``
compiled with g++ and emulated on the CPU (one std::thread per CUDA thread, shared memory as
statics, warp primitives through per-warp barriers). Here: the generic emulation harness and its
build, a stand-in for ``jit.Kernel`` that launches into it, an environment-switch context, and the
permute combine's oracle (tests/test_permute_gpu.py and tests/fuzz_gpu.py both check against it).
"""
import contextlib
import ctypes
import os
import shutil
import subprocess

import torch

kHarness = r'''
#include <algorithm>
#include <array>
#include <barrier>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

struct uint4 { unsigned x, y, z, w; };
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
struct Dim3 { unsigned x = 0, y = 0, z = 0; };
thread_local Dim3 threadIdx, blockIdx;
Dim3 gridDim, blockDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static  // CTAs run one at a time: a static is one CTA's shared memory
using std::max;
using std::min;

struct Cta {
  std::unique_ptr<std::barrier<>> all;
  std::vector<std::unique_ptr<std::barrier<>>> warps, halves;  // halves: 16-lane shuffles
  std::vector<std::array<long long, 32>> scratch;
};
static Cta* gCta = nullptr;

inline void __syncthreads() { gCta->all->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xFFFFFFFFu) { gCta->warps[threadIdx.x / 32]->arrive_and_wait(); }
inline unsigned __match_any_sync(unsigned, int value) {
  auto& s = gCta->scratch[threadIdx.x / 32];
  s[threadIdx.x % 32] = value;
  __syncwarp();
  unsigned mask = 0;
  for (int lane = 0; lane < 32; ++lane) mask |= (s[lane] == value ? 1u : 0u) << lane;
  __syncwarp();
  return mask;
}
inline int __shfl_up_sync(unsigned, int value, int offset) {
  auto& s = gCta->scratch[threadIdx.x / 32];
  const int lane = threadIdx.x % 32;
  s[lane] = value;
  __syncwarp();
  const int result = lane >= offset ? static_cast<int>(s[lane - offset]) : value;
  __syncwarp();
  return result;
}
inline unsigned __ballot_sync(unsigned, bool predicate) {
  auto& s = gCta->scratch[threadIdx.x / 32];
  s[threadIdx.x % 32] = predicate ? 1 : 0;
  __syncwarp();
  unsigned mask = 0;
  for (int lane = 0; lane < 32; ++lane) mask |= (s[lane] ? 1u : 0u) << lane;
  __syncwarp();
  return mask;
}
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
template <typename T> inline T __ldg(const T* p) { return *p; }
template <typename T> inline T __ldcg(const T* p) { return *p; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __fadd_rn(float a, float b) { volatile float r = a + b; return r; }
inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
struct __nv_bfloat16 { unsigned short x; };
inline __nv_bfloat16 __float2bfloat16_rn(float f) {  // nearest even; NaN stays a (quiet) NaN
  unsigned u = __float_as_uint(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return {static_cast<unsigned short>((u >> 16) | 0x40u)};
  u += 0x7FFFu + ((u >> 16) & 1u);
  return {static_cast<unsigned short>(u >> 16)};
}
inline float __bfloat162float(__nv_bfloat16 b) { return __uint_as_float(unsigned(b.x) << 16); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.x; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
template <typename T> inline T __shfl_xor_sync(unsigned, T value, int mask) {
  static_assert(sizeof(T) <= sizeof(long long), "one scratch word per lane");
  auto& s = gCta->scratch[threadIdx.x / 32];
  const int lane = threadIdx.x % 32;
  long long word = 0;
  std::memcpy(&word, &value, sizeof(T));
  s[lane] = word;
  __syncwarp();
  T result;
  const long long other = s[lane ^ mask];
  std::memcpy(&result, &other, sizeof(T));
  __syncwarp();
  return result;
}

@INCLUDES@

@LAUNCH@
'''


# The prelude of the harnesses that emulate quant.cuh and the headers built on it (g++, with
# MOE_FP8_EMULATE: the toolkit types, warp primitives through per-warp or half-warp barriers, and
# plain C++ for quant.cuh's few inline-PTX helpers); a harness appends its includes and
# launch_code(). tests/test_train_quant_gpu.py, tests/test_swiglu_emulation.py.
kQuantPrelude = r'''
#include <algorithm>
#include <array>
#include <barrier>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#define MOE_FP8_EMULATE 1
struct uint4 { unsigned x, y, z, w; };
struct uint2 { unsigned x, y; };
struct float2 { float x, y; };
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
struct Dim3 { unsigned x = 0, y = 0, z = 0; };
thread_local Dim3 threadIdx, blockIdx;
Dim3 gridDim, blockDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static  // CTAs run one at a time: a static is one CTA's shared memory
#define __align__(n) __attribute__((aligned(n)))
using std::max;
using std::min;

struct __nv_bfloat16 { unsigned short x; };
typedef unsigned char __nv_fp8_storage_t;
enum __nv_saturation_t { __NV_NOSAT, __NV_SATFINITE };
enum __nv_fp8_interpretation_t { __NV_E4M3, __NV_E5M2 };

inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __fadd_rn(float a, float b) { volatile float r = a + b; return r; }
inline float __fsub_rn(float a, float b) { volatile float r = a - b; return r; }
inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
inline float __fdiv_rn(float a, float b) { volatile float r = a / b; return r; }
inline float __frcp_rn(float a) { volatile float r = 1.0f / a; return r; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
template <typename T> inline T __ldg(const T* p) { return *p; }
template <typename T> inline T __ldcg(const T* p) { return *p; }
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  unsigned char bytes[8];
  std::memcpy(bytes, &x, 4);
  std::memcpy(bytes + 4, &y, 4);
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= unsigned(bytes[(s >> (4 * i)) & 7]) << (8 * i);
  return r;
}

// e4m3fn, round to nearest even, saturating to +-448, NaN -> 0x7F
inline unsigned char to_e4m3(float x) {
  if (std::isnan(x)) return 0x7F;
  const unsigned char sign = std::signbit(x) ? 0x80 : 0;
  const double a = std::fabs(double(x));
  unsigned code;
  if (a >= 448.0) {
    code = 0x7E;
  } else if (a < std::ldexp(1.0, -6)) {
    code = unsigned(std::nearbyint(a * 512.0));  // subnormal steps of 2^-9 (8 -> min normal)
  } else {
    int e;
    const double m = std::frexp(a, &e);  // a = m 2^e, m in [0.5, 1)
    double q = std::nearbyint((m * 2.0 - 1.0) * 8.0);
    int exponent = e - 1 + 7;
    if (q == 8.0) { q = 0.0; ++exponent; }
    code = unsigned(exponent) << 3 | unsigned(q);
    if (code > 0x7E) code = 0x7E;
  }
  return static_cast<unsigned char>(sign | code);
}
inline unsigned short __nv_cvt_float2_to_fp8x2(float2 v, __nv_saturation_t, __nv_fp8_interpretation_t) {
  return static_cast<unsigned short>(to_e4m3(v.x) | (unsigned(to_e4m3(v.y)) << 8));
}

struct Cta {
  std::unique_ptr<std::barrier<>> all;
  std::vector<std::unique_ptr<std::barrier<>>> warps, halves;
  std::vector<std::array<unsigned, 32>> scratch;
};
static Cta* gCta = nullptr;

inline void __syncthreads() { gCta->all->arrive_and_wait(); }
inline std::barrier<>& barrier_of(unsigned mask) {
  const unsigned warp = threadIdx.x / 32;
  if (mask == 0xFFFFFFFFu) return *gCta->warps[warp];
  if (mask == 0x0000FFFFu) return *gCta->halves[2 * warp];
  if (mask == 0xFFFF0000u) return *gCta->halves[2 * warp + 1];
  std::abort();  // the kernels here use no other masks
}
inline float __shfl_xor_sync(unsigned mask, float value, int offset) {
  auto& s = gCta->scratch[threadIdx.x / 32];
  const unsigned lane = threadIdx.x % 32;
  auto& bar = barrier_of(mask);
  s[lane] = __float_as_uint(value);
  bar.arrive_and_wait();
  const float result = __uint_as_float(s[lane ^ offset]);
  bar.arrive_and_wait();
  return result;
}
inline int __shfl_up_sync(unsigned mask, int value, int offset) {
  auto& s = gCta->scratch[threadIdx.x / 32];
  const unsigned lane = threadIdx.x % 32;
  auto& bar = barrier_of(mask);
  s[lane] = static_cast<unsigned>(value);
  bar.arrive_and_wait();
  const int result = lane % 32 >= static_cast<unsigned>(offset) ? static_cast<int>(s[lane - offset]) : value;
  bar.arrive_and_wait();
  return result;
}
inline bool __any_sync(unsigned mask, bool predicate) {
  auto& s = gCta->scratch[threadIdx.x / 32];
  const unsigned lane = threadIdx.x % 32;
  auto& bar = barrier_of(mask);
  s[lane] = predicate;
  bar.arrive_and_wait();
  bool any = false;
  for (unsigned i = 0; i < 32; ++i) any = any || ((mask >> i & 1u) && s[i]);
  bar.arrive_and_wait();
  return any;
}

namespace moe_fp8 {
namespace quant {
inline float max_nan(float a, float b) {
  if (std::isnan(a)) return a;
  if (std::isnan(b)) return b;
  return a > b ? a : b;
}
inline uint4 ld_stream(const void* p) { uint4 r; std::memcpy(&r, p, 16); return r; }
inline float rcp_approx(float d) { volatile float r = 1.0f / d; return r; }  // within 1 ulp
inline void cp_async16(uint4* dst, const void* src) { std::memcpy(dst, src, 16); }
inline void cp_async_commit() {}
inline float fp8_to_float(unsigned byte) {  // e4m3fn -> fp32, exact
  const unsigned sign = (byte & 0x80u) << 24, exponent = (byte >> 3) & 0xFu, mantissa = byte & 7u;
  if (exponent == 0) return __uint_as_float(__float_as_uint(float(mantissa) * 0x1p-9f) | sign);
  if (exponent == 15 && mantissa == 7) return __uint_as_float(0x7FC00000u | sign);
  return __uint_as_float(sign | ((exponent + 120) << 23) | (mantissa << 20));
}
inline float2 fp8x2_to_float2(unsigned short pair) {
  return {fp8_to_float(pair & 0xFFu), fp8_to_float(pair >> 8)};
}
template <int kPending> inline void cp_async_wait() {}
}  // namespace quant
}  // namespace moe_fp8

'''


# The launcher every harness ends with: one std::thread per CUDA thread, one CTA at a time (a
# static is one CTA's shared memory), argument count and sizes checked; a harness defines Cta
# (all, warps, halves, scratch), gCta and the kernels' names before it, and lists its instances
# at @ENTRIES@.
kLaunchCode = r'''
template <typename... Ts, std::size_t... I>
void call_with(void (*kernel)(Ts...), void** args, std::index_sequence<I...>) {
  kernel(*reinterpret_cast<std::remove_cv_t<std::remove_reference_t<Ts>>*>(args[I])...);
}

template <typename... Ts>
int launch(void (*kernel)(Ts...), const unsigned* grid, unsigned threads, void** args,
           const int* sizes, int numArgs) {
  if (numArgs != static_cast<int>(sizeof...(Ts))) return 1000 + static_cast<int>(sizeof...(Ts));
  const std::size_t expected[] = {sizeof(Ts)...};
  for (int i = 0; i < numArgs; ++i)
    if (static_cast<std::size_t>(sizes[i]) != expected[i]) return 2000 + i;
  gridDim = {grid[0], grid[1], grid[2]};
  blockDim = {threads, 1, 1};
  for (unsigned z = 0; z < grid[2]; ++z)
    for (unsigned y = 0; y < grid[1]; ++y)
      for (unsigned x = 0; x < grid[0]; ++x) {
        Cta cta;
        cta.all = std::make_unique<std::barrier<>>(threads);
        for (unsigned w = 0; w < threads / 32; ++w) {
          cta.warps.push_back(std::make_unique<std::barrier<>>(32));
          cta.halves.push_back(std::make_unique<std::barrier<>>(16));
          cta.halves.push_back(std::make_unique<std::barrier<>>(16));
        }
        cta.scratch.resize(threads / 32);
        gCta = &cta;
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (unsigned t = 0; t < threads; ++t)
          pool.emplace_back([=] {
            threadIdx = {t, 0, 0};
            blockIdx = {x, y, z};
            call_with(kernel, args, std::index_sequence_for<Ts...>{});
          });
        for (auto& th : pool) th.join();
      }
  return 0;
}

struct Entry { const char* name; int (*run)(const unsigned*, unsigned, void**, const int*, int); };
#define MOE_EMU_KERNEL(...)                                                     \
  {#__VA_ARGS__, [](const unsigned* g, unsigned t, void** a, const int* s, int n) { \
     return launch(&__VA_ARGS__, g, t, a, s, n); }}
static const Entry kEntries[] = {
@ENTRIES@
};

// 0: done; -1: unknown instance; 1000 + n: the kernel takes n arguments; 2000 + i: size of arg i
extern "C" int moe_emu_launch(const char* instance, const unsigned* grid, unsigned threads,
                              void** args, const int* sizes, int numArgs) {
  auto squeeze = [](std::string s) { s.erase(std::remove(s.begin(), s.end(), ' '), s.end()); return s; };
  const std::string name = squeeze(instance);
  for (const Entry& e : kEntries)
    if (squeeze(e.name) == name) return e.run(grid, threads, args, sizes, numArgs);
  return -1;
}
'''


# permute.cuh's instances (tests/test_permute_gpu.py, tests/test_ep.py)
kPermuteInstances = [
    "moe_fp8::permute::count_experts_kernel<256>", "moe_fp8::permute::scan_experts_kernel<256>",
    "moe_fp8::permute::contiguous_rank_kernel<512>", "moe_fp8::permute::masked_index_kernel<512>",
    "moe_fp8::permute::permute_rows_kernel<false>", "moe_fp8::permute::permute_rows_kernel<true>",
    "moe_fp8::permute::masked_dispatch_small_kernel<256>",
    "moe_fp8::permute::stage_rows_kernel<256>",
    "moe_fp8::permute::combine_kernel<false>", "moe_fp8::permute::combine_kernel<true>",
]


# ep_send.cuh's instances (tests/test_ep.py)
kEpSendInstances = ["moe_fp8::ep_send::route_pack_kernel<256>", "moe_fp8::ep_send::send_order_kernel<256>",
                    "moe_fp8::ep_send::replicate_pack_kernel<256>"]


def build_ep_send_emulator(build_dir) -> str:
    """The emulation of permute.cuh + ep_send.cuh (every instance of both) -> the library's path
    (the EP tests load it in spawned processes too)."""
    build_emulator(build_dir, ["permute.cuh", "ep_send.cuh"], kPermuteInstances + kEpSendInstances,
                   "permute_ep")
    return str(build_dir / "libpermute_ep.so")


def launch_code(instances) -> str:
    """``kLaunchCode`` with the table of the emulated ``instances``."""
    return kLaunchCode.replace("@ENTRIES@", "\n".join(f"    MOE_EMU_KERNEL({name})," for name in instances))


def harness_source(headers, instances) -> str:
    """The harness for ``headers`` (files under moe_fp8/gemm/include) and kernel ``instances``."""
    includes = "\n".join(f'#include "{h}"' for h in headers)
    return kHarness.replace("@INCLUDES@", includes).replace("@LAUNCH@", launch_code(instances))


def build_emulator(build_dir, headers, instances, stem):
    """The generic harness for ``headers`` and ``instances``, built by ``compile_harness``."""
    return compile_harness(build_dir, harness_source(headers, instances), stem)


def compile_harness(build_dir, source: str, stem: str):
    """Compile a harness ``source`` with g++ (C++20) into ``build_dir``, load it with ctypes
    (skips the test when g++ or a C++20 library is missing)."""
    import pytest  # NOTE: lazy: tests/fuzz_gpu.py imports this module without pytest
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("the CPU emulation needs g++")
    from moe_fp8.gemm.jit import env
    build = build_dir
    (build / "harness.cpp").write_text(source)
    library = build / f"lib{stem}.so"
    result = subprocess.run([compiler, "-std=c++20", "-O1", "-ffp-contract=off", "-fPIC", "-shared",
                             "-pthread", f"-I{env.kIncludeDir}", str(build / "harness.cpp"), "-o",
                             str(library)], capture_output=True, text=True)
    if result.returncode and "barrier" in result.stderr and "No such file" in result.stderr:
        pytest.skip("the CPU emulation needs a C++20 standard library (<barrier>)")
    assert result.returncode == 0, result.stderr[-3000:]
    lib = ctypes.CDLL(str(library))
    lib.moe_emu_launch.restype = ctypes.c_int
    return lib


class RecordingKernel:
    """Wraps a kernel: logs each launch (instance, grid, block, arguments) before running it."""

    def __init__(self, kernel, src, log):
        self.kernel, self.src, self.log = kernel, src, log

    def launch(self, grid, block, smem_bytes, args, cluster=(1, 1, 1)):
        self.log.append((self.src.instance, grid, block, smem_bytes, list(args)))
        return self.kernel.launch(grid, block, smem_bytes, args, cluster)


def assert_bundled_compile_clean(module) -> None:
    """A kernel family's host module registers its variants for precompile() and none of them
    uses local memory (spills or a stack frame); skips without a CUDA compiler (no GPU needed)."""
    import pytest
    from moe_fp8.gemm import jit
    from moe_fp8.gemm.jit.registry import _providers
    assert module.bundled_sources in _providers
    for src in module.bundled_sources():
        try:
            compiled = jit.compile_kernel(src)
        except jit.CompilerUnavailable as error:
            pytest.skip(f"no CUDA compiler: {error}")
        assert not compiled.report.uses_local_memory, f"{src.instance}: {compiled.report}"


class EmulatedKernel:
    """Stands in for ``jit.Kernel``: same ``launch`` arguments, runs the emulated kernel."""

    def __init__(self, lib, src):
        self.lib, self.src = lib, src

    def launch(self, grid, block, smem_bytes, args, cluster=(1, 1, 1)):
        from moe_fp8.gemm.jit.runtime import _dim3
        grid, block = _dim3(grid, "grid"), _dim3(block, "block")
        assert block[1] == block[2] == 1 and cluster == (1, 1, 1)
        values = []
        for arg in args:
            if isinstance(arg, torch.Tensor):
                assert arg.device.type == "cpu"
                values.append(ctypes.c_uint64(arg.data_ptr()))
            elif arg is None:
                values.append(ctypes.c_uint64(0))
            else:
                values.append(arg)
        pointers = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
        sizes = (ctypes.c_int * len(values))(*[ctypes.sizeof(v) for v in values])
        code = self.lib.moe_emu_launch(self.src.instance.encode(), (ctypes.c_uint * 3)(*grid),
                                       block[0], pointers, sizes, len(values))
        assert code == 0, f"emulated {self.src.instance}: code {code} (see moe_emu_launch)"



def varied_rows(shape, dtype, seed, device="cuda"):
    """Random values of very different magnitude per row (10^-4 .. 10^4), plus an all-zero row,
    a row of extremes (dtype max / 2, -max / 3) and a row of tiny values (subnormal quotients):
    the inputs the quantisation tests compare bit for bit."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    rows = x.view(-1, shape[-1])
    rows *= torch.pow(10.0, torch.empty(rows.shape[0], 1).uniform_(-4, 4, generator=gen))
    if rows.shape[0] > 3:
        rows[0] = 0
        rows[1, ::3] = torch.finfo(dtype).max / 2
        rows[1, 1::3] = -torch.finfo(dtype).max / 3
        rows[2] *= 1e-30
    return x.to(dtype).to(device)


def poisoned_fp8(shape, device="cuda"):
    """Random fp8 bytes (NaN patterns included): outputs a kernel must overwrite."""
    return torch.randint(0, 256, shape, dtype=torch.uint8).view(torch.float8_e4m3fn).to(device)


@contextlib.contextmanager
def env_vars(**values: str):
    """The environment variables set inside the block, restored (or removed) after it."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


def env_switch(name: str, value: str):
    """``os.environ[name] = value`` inside the block, restored (or removed) after it."""
    return env_vars(**{name: value})


@contextlib.contextmanager
def emulated_permute_kernels(lib, log=None, ep_send: bool = False):
    """The layer's permute/index/combine kernels (``layouts.fused_enabled``) on CPU tensors, run
    by the g++ emulation ``lib`` (built with permute.cuh, and ep_send.cuh for ``ep_send``: then
    the EP prefill's send side runs its kernels too); each launch is appended to ``log``."""
    import moe_fp8.layers.dispatch.torch_dist as TD
    import moe_fp8.layers.layouts as L
    import moe_fp8.layers.permute as PM
    from moe_fp8.gemm.kernels import ep_send as send_kernels
    from moe_fp8.gemm.kernels import permute as kernels

    def make(src, like):
        kernel = EmulatedKernel(lib, src)
        return kernel if log is None else RecordingKernel(kernel, src, log)

    saved = (kernels._kernel, send_kernels._kernel, L.fused_enabled, PM.fused_enabled, TD.fused_ep_enabled)
    kernels._kernel = send_kernels._kernel = make
    L.fused_enabled = PM.fused_enabled = lambda t: True
    TD.fused_ep_enabled = lambda t: ep_send
    try:
        yield
    finally:
        (kernels._kernel, send_kernels._kernel, L.fused_enabled, PM.fused_enabled,
         TD.fused_ep_enabled) = saved


def combine_oracle(y_rows, index, add):
    """The documented order: fp32, acc = 0, acc += bf16(w_j) * y_j (j ascending), + add, bf16."""
    weights = index.slot_weight.to(torch.bfloat16).float()
    acc = torch.zeros(index.slot_row.shape[0], y_rows.shape[1], device=y_rows.device)
    # no rows (every pair skipped): the skipped pairs' (row 0, weight 0) has no row to read
    for j in range(index.slot_row.shape[1] if y_rows.shape[0] else 0):
        acc = acc + weights[:, j:j + 1] * y_rows.index_select(0, index.slot_row[:, j]).float()
    if add is not None:
        acc = acc + add.float()
    return acc.to(torch.bfloat16)
