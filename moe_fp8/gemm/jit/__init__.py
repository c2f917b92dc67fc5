"""The moe_fp8 JIT: compile, cache, load and launch sm_90a kernels. It knows no particular kernel.

API
---
``KernelSource(header, instance, defines=())``
    ``header``: a file under ``moe_fp8/gemm/include``; ``instance``: the full template-id of one
    ``__global__`` kernel template, e.g. ``"moe_fp8::fp8_gemm_kernel<128, 128, 7168, 4, 2>"``;
    ``defines``: ``(name, value)`` pairs (or bare names) written as ``#define`` before the include.
    The JIT writes a tiny translation unit that includes the header and takes ``&instance``
    (instantiating exactly that kernel), and finds the one kernel symbol in the cubin itself.
    Headers must hold only template ``__global__`` functions (a plain one would always be emitted).

``compile_kernel(src) -> CompiledKernel``  (no GPU needed)
    Fields: ``cubin`` (bytes), ``cubin_path``, ``symbol`` (mangled), ``report`` (ptxas:
    ``registers``, ``stack_bytes``, ``spill_stores``, ``spill_loads``, ``static_smem``),
    ``registers``, ``spill_bytes``, ``compile_seconds``, ``compiler``, ``cache_hit``, ``key``.
    A source that fails to compile raises ``CompileError`` carrying the compiler log and the TU.

``get_kernel(src, device_index=None) -> Kernel``
    ``compile_kernel`` + ``cuModuleLoadData`` in the device's primary context, memoised per
    process. Raises ``RuntimeError`` when the kernel is not loaded yet and the current stream is
    capturing a CUDA graph: load kernels (run the op once, or ``precompile``) before capture.

``Kernel.launch(grid, block, smem_bytes, args, cluster=(1, 1, 1))``
    ``cuLaunchKernelEx`` on ``torch.cuda.current_stream()`` (so it is captured by
    ``torch.cuda.graph``); raises the dynamic shared-memory limit when ``smem_bytes`` needs it;
    sets the cluster-dimension attribute when ``cluster != (1, 1, 1)``. ``args`` items:
    ``torch.Tensor`` (passes ``data_ptr()``), ``None`` (null pointer), ``TensorMap`` (the
    128-byte CUtensorMap by value, for ``const __grid_constant__`` params) or typed scalars
    ``i32(v)``, ``u32(v)``, ``i64(v)``, ``u64(v)``, ``f32(v)``, or a ``ctypes.Structure`` for a
    by-value struct parameter (one pointer per *parameter*: never splat a struct's fields).
    The argument count and each argument's byte size are checked against the parameter list
    read from the cubin (``Kernel.param_sizes``); a mismatch raises ``TypeError``.

``make_tma_2d(tensor, box_inner, box_outer, swizzle_bytes=128, *, inner_dim=None, outer_dim=None, outer_stride=None) -> TensorMap``
``make_tma_3d(tensor, box_inner, box_middle, box_outer=1, swizzle_bytes=128, *, dims=None, strides=None) -> TensorMap``
    ``cuTensorMapEncodeTiled`` maps (dtypes fp8/uint8/int8, bf16, fp16, fp32, int32; swizzle
    0/32/64/128 bytes; out-of-bounds reads give zeros; L2 promotion 256 B). Validates the
    16-byte alignment of the base address and of every stride and the box limits, with errors
    that name the problem. Strides and dims are in elements, innermost first for ``dims``.
    Device code declares ``struct alignas(64) TmaDesc { unsigned long long v[16]; };``
    (NVRTC cannot include <cuda.h>).

Bundled variants: kernel host files call ``register_bundled(fn)`` at import, ``fn() ->
list[KernelSource]``; ``moe_fp8.gemm.precompile.precompile()`` compiles them all.

Compile paths (``MOE_FP8_COMPILER`` forces one; default: the fastest that the probe proved safe)
    ``nvrtc`` (in-process cubin, fastest), ``nvrtc-ptxas`` (NVRTC PTX + the toolkit's ptxas,
    versions matched), ``nvcc`` (``nvcc -cubin``). On CUDA 13.0 in-process SASS generation
    segfaults on wgmma kernels, so the probe compiles a wgmma kernel through each path in a child
    process; the verdict is cached per toolchain (``python -m moe_fp8.gemm.jit.probe`` prints it).

Environment
    ``MOE_FP8_CACHE_DIR`` (default ``~/.cache/moe_fp8``; an unwritable dir warns and falls back
    to a temp dir), ``MOE_FP8_COMPILER``, ``MOE_FP8_JIT_VERBOSE=1`` (compile times, cache hits,
    register/spill report on stderr), ``MOE_FP8_JIT_LINEINFO=1`` (``-lineinfo``),
    ``MOE_FP8_CUDA_HOME`` / ``CUDA_HOME`` (toolkit; default ``/usr/local/cuda``).

Cache: key = sha256 of every file under ``include/``, the generated TU, the flags and the
compiler path/versions; atomic writes; a damaged entry is rebuilt; concurrent processes compiling
one kernel serialise on a lock file and all end with one valid entry.
"""
from .compile import CompiledKernel, compile_kernel
from .compilers import CompileError, CompilerUnavailable
from .driver import CudaError
from .registry import bundled_sources, register_bundled
from .runtime import Kernel, f32, get_kernel, i32, i64, u32, u64
from .source import KernelSource, translation_unit
from .tma import TensorMap, make_tma_2d, make_tma_3d

__all__ = [
    "KernelSource", "CompiledKernel", "Kernel", "TensorMap", "compile_kernel", "get_kernel",
    "make_tma_2d", "make_tma_3d", "i32", "u32", "i64", "u64", "f32", "register_bundled",
    "bundled_sources", "translation_unit", "CompileError", "CompilerUnavailable", "CudaError",
]
