"""Load compiled kernels into the current CUDA context and launch them on torch's current stream."""
from __future__ import annotations

import ctypes
import threading
from pathlib import Path

from torch import Tensor as _Tensor

from . import driver, elf, env
from .compile import CompiledKernel, compile_kernel
from .source import KernelSource
from .tma import TensorMap

# Typed scalar kernel arguments: jit.i32(7), jit.f32(0.5), ... (plain ctypes values).
i32, u32, i64, u64, f32 = (ctypes.c_int32, ctypes.c_uint32, ctypes.c_int64, ctypes.c_uint64,
                           ctypes.c_float)
_kScalarTypes = (ctypes.c_int32, ctypes.c_uint32, ctypes.c_int64, ctypes.c_uint64, ctypes.c_float)
kInvalidContext = 201  # CUDA_ERROR_INVALID_CONTEXT: this thread has no current context yet


def _dim3(value, what: str) -> tuple:
    # the common cases first: this runs three times per launch
    if type(value) is int and value >= 1:
        return value, 1, 1
    if type(value) is tuple and len(value) == 3:
        x, y, z = value
        if type(x) is int and type(y) is int and type(z) is int and min(x, y, z) >= 1:
            return value
    dims = (value,) if isinstance(value, int) else tuple(value)
    if not 1 <= len(dims) <= 3 or any(not isinstance(d, int) or d < 1 for d in dims):
        raise ValueError(f"{what} must be 1 to 3 positive ints, got {value!r}")
    return dims + (1,) * (3 - len(dims))


def pdl_capable(source: KernelSource) -> bool:
    """Whether ``source`` may be launched with programmatic dependent launch: only the bundled
    headers, whose every kernel waits for its prerequisites before touching global memory
    (include/pdl.cuh; tests/test_pdl.py checks the sources). A header outside the bundle (an
    absolute path: tests, experiments) keeps plain stream order."""
    return not Path(source.header).is_absolute()


_kScalarBytes = {t: ctypes.sizeof(t) for t in _kScalarTypes}
_kPointerArrays = {}  # argument count -> the ctypes array types of pack_args (made once)


def _arrays(count: int):
    arrays = _kPointerArrays.get(count)
    if arrays is None:
        arrays = _kPointerArrays[count] = (ctypes.c_uint64 * max(count, 1),
                                           ctypes.c_void_p * max(count, 1))
    return arrays


def pack_args(instance: str, sizes, args):
    """Kernel arguments -> ``(void* array, the values it points to)`` for cuLaunchKernelEx. Count
    and byte size of each argument are checked against ``sizes`` (the kernel's parameter sizes
    from its cubin; None: no check): a mismatch is a TypeError, not a misread parameter.

    NOTE: this runs once per launch, so it allocates two ctypes arrays in all: tensors and null
    pointers go into one 8-byte slot each of ``slots``, typed scalars and structs are pointed at
    where they are (the caller's objects outlive the launch, which copies the parameters). With
    the launch's other changes: 29-32 -> 19-22 us of host time per launch on the device machine
    (experiments/launch_overhead.py, session 30). The exact types (torch.Tensor, TensorMap) are
    tested first, before the isinstance chain: a GEMM launch passes four tensor maps.
    """
    count = len(args)
    if sizes is not None and count != len(sizes):
        raise TypeError(f"{instance} takes {len(sizes)} parameters (bytes {sizes}), got "
                        f"{count} arguments")
    slot_array, pointer_array = _arrays(count)
    slots, pointers = slot_array(), pointer_array()
    base = ctypes.addressof(slots)
    for index, arg in enumerate(args):
        kind = type(arg)
        size = _kScalarBytes.get(kind)
        if size is not None:
            pointers[index] = ctypes.addressof(arg)
        elif kind is _Tensor or isinstance(arg, _Tensor):
            slots[index] = arg.data_ptr()
            pointers[index] = base + 8 * index
            size = 8
        elif kind is TensorMap:
            pointers[index] = arg.address
            size = driver.kTensorMapBytes
        elif arg is None:
            pointers[index] = base + 8 * index  # the slot holds 0
            size = 8
        elif isinstance(arg, (_kScalarTypes, ctypes.Structure)):  # a struct, or a subclass
            pointers[index] = ctypes.addressof(arg)
            size = ctypes.sizeof(arg)
        elif hasattr(arg, "address"):  # a stand-in with a tensor map's interface (tests)
            pointers[index] = arg.address
            size = driver.kTensorMapBytes
        else:
            raise TypeError(f"kernel argument {index} of {instance}: {kind.__name__} is not a "
                            "Tensor, TensorMap or typed scalar (wrap Python numbers: jit.i32(v), "
                            "jit.f32(v), ...)")
        if sizes is not None and sizes[index] != size:
            raise TypeError(f"kernel argument {index} of {instance} is {kind.__name__} "
                            f"({size} bytes) but the parameter has {sizes[index]} bytes "
                            f"(parameter sizes {sizes})")
    return pointers, (slots, args)


def _current_stream_handle(device_index: int) -> int:
    """torch's current stream on ``device_index`` as a CUstream handle. NOTE: torch's raw-stream
    hook (what its own generated launchers call) skips building a ``torch.cuda.Stream`` object
    per launch; builds without it take the public path."""
    import torch

    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return raw(device_index)
    return torch.cuda.current_stream(device_index).cuda_stream


class Kernel:
    """A loaded kernel. ``launch`` is safe inside ``torch.cuda.graph`` capture."""

    def __init__(self, compiled: CompiledKernel, device_index: int):
        self.compiled = compiled
        self.device_index = device_index
        driver.ensure_context(device_index)
        self._module, self._function = driver.load_function(compiled.cubin, compiled.symbol)
        # parameter sizes from the cubin: a wrong argument count or width is a TypeError, not a
        # silently misread parameter (None: unreadable metadata, no check)
        self.param_sizes = elf.kernel_param_sizes(compiled.cubin, compiled.symbol)
        self._smem_limit = 48 * 1024  # the default dynamic limit needs no attribute
        self._attrs = {}  # (cluster, pdl) -> (LaunchAttribute array, count)
        self.pdl_capable = pdl_capable(compiled.source)

    def __repr__(self) -> str:
        return f"Kernel({self.compiled.source.instance}, device={self.device_index})"

    def set_global(self, name: str, value) -> None:
        """Set the module's ``extern "C" __device__`` variable ``name`` (a ctypes value)."""
        driver.write_global(self._module, name, value)

    def launch_attributes(self, cluster: tuple, pdl: bool):
        """``(pointer to the array, count)`` of the launch attributes: the cluster shape when it is
        not 1x1x1, programmatic stream serialisation when ``pdl`` (``MOE_FP8_PDL``) and the kernel
        is capable. Cached per kernel (the array is kept alive beside its pointer)."""
        key = (cluster, pdl and self.pdl_capable)
        cached = self._attrs.get(key)
        if cached is None:
            attributes = []
            if cluster != (1, 1, 1):
                attribute = driver.LaunchAttribute(id=driver.kLaunchAttrClusterDimension)
                attribute.value[0], attribute.value[1], attribute.value[2] = cluster
                attributes.append(attribute)
            if key[1]:
                attribute = driver.LaunchAttribute(id=driver.kLaunchAttrProgrammaticSerialization)
                attribute.value[0] = 1  # programmaticStreamSerializationAllowed
                attributes.append(attribute)
            array = (driver.LaunchAttribute * max(len(attributes), 1))(*attributes)
            pointer = ctypes.cast(array, ctypes.POINTER(driver.LaunchAttribute))
            cached = self._attrs[key] = (pointer, len(attributes), array)
        return cached[0], cached[1]

    def launch(self, grid, block, smem_bytes: int, args, cluster=(1, 1, 1)) -> None:
        """Launch on ``torch.cuda.current_stream()``.

        args: ``torch.Tensor`` (its data pointer), ``None`` (a null pointer), ``jit.TensorMap``
        (the 128-byte CUtensorMap, by value), typed scalars ``jit.i32/u32/i64/u64/f32``, or a
        ``ctypes.Structure`` (a by-value struct parameter; its layout must match the C++ one).
        Count and byte size of each argument are checked against the kernel's parameters.
        """
        grid, block, cluster = _dim3(grid, "grid"), _dim3(block, "block"), _dim3(cluster, "cluster")
        if smem_bytes > self._smem_limit:
            driver.set_function_attribute(self._function, driver.kFuncAttrMaxDynamicSmem,
                                          smem_bytes)
            self._smem_limit = smem_bytes
        pointers, keep_alive = pack_args(self.compiled.source.instance, self.param_sizes, args)
        stream = _current_stream_handle(self.device_index)
        config = driver.LaunchConfig(*grid, *block, smem_bytes, stream)
        attributes, count = self.launch_attributes(cluster, env.pdl())
        if count:
            config.attrs, config.numAttrs = attributes, count
        code = driver.lib().cuLaunchKernelEx(ctypes.byref(config), self._function, pointers, None)
        if code == kInvalidContext:  # a thread on which torch never made the context current
            driver.ensure_context(self.device_index)
            code = driver.lib().cuLaunchKernelEx(ctypes.byref(config), self._function, pointers,
                                                 None)
        driver.check(code, f"launching {self.compiled.source.instance} grid={grid} "
                           f"block={block} smem={smem_bytes}")


_kernels: dict = {}
_lock = threading.Lock()


def get_kernel(src: KernelSource, device_index: int | None = None) -> Kernel:
    """Compile (disk-cached) and load ``src`` for the current device; memoised per process.

    Raises RuntimeError when the kernel is not loaded yet and the current stream is capturing a
    CUDA graph (compiling or loading modules there would break or stall the capture).
    """
    import torch

    if device_index is None:
        device_index = torch.cuda.current_device()
    kernel = _kernels.get((src, device_index))
    if kernel is not None:
        return kernel
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"moe_fp8: kernel {src.instance} is not loaded yet and a CUDA graph is being captured; "
            "run the op once before capturing (or call moe_fp8.gemm.precompile / jit.get_kernel)")
    with _lock:
        kernel = _kernels.get((src, device_index))
        if kernel is None:
            kernel = Kernel(compile_kernel(src), device_index)
            _kernels[(src, device_index)] = kernel
    return kernel
