"""A thin ctypes binding of the few CUDA driver calls the JIT needs (loaded on first use).

NOTE: ctypes on libcuda directly, not cuda.bindings: one launch costs a few microseconds of
Python instead of ~15 us (shared/DEVICE_FACTS.md), and the package keeps importing on machines
without a GPU or without cuda-bindings. Struct layouts follow cuda.h (CUDA 12/13 ABI).
"""
from __future__ import annotations

import ctypes
import functools

kFuncAttrMaxDynamicSmem = 8  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
kFuncAttrNonPortableCluster = 14  # CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED
kLaunchAttrClusterDimension = 4  # CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
kLaunchAttrProgrammaticSerialization = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
kTensorMapBytes = 128  # CUtensorMap: 16 x uint64, 64-byte aligned


class CudaError(RuntimeError):
    """A CUDA driver call failed."""


class LaunchAttribute(ctypes.Structure):
    # CUlaunchAttribute: id (4 bytes) + pad to 8 + a 64-byte value union
    _fields_ = [("id", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("value", ctypes.c_uint32 * 16)]


class LaunchConfig(ctypes.Structure):
    # CUlaunchConfig
    _fields_ = [("gridDimX", ctypes.c_uint32), ("gridDimY", ctypes.c_uint32),
                ("gridDimZ", ctypes.c_uint32), ("blockDimX", ctypes.c_uint32),
                ("blockDimY", ctypes.c_uint32), ("blockDimZ", ctypes.c_uint32),
                ("sharedMemBytes", ctypes.c_uint32), ("hStream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(LaunchAttribute)), ("numAttrs", ctypes.c_uint32)]


class TensorMapStorage(ctypes.Structure):
    _fields_ = [("opaque", ctypes.c_uint64 * 16)]


_kSignatures = {
    "cuInit": [ctypes.c_uint],
    "cuGetErrorString": [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)],
    "cuCtxGetCurrent": [ctypes.POINTER(ctypes.c_void_p)],
    "cuCtxSetCurrent": [ctypes.c_void_p],
    "cuDeviceGet": [ctypes.POINTER(ctypes.c_int), ctypes.c_int],
    "cuDevicePrimaryCtxRetain": [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int],
    "cuModuleLoadData": [ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p],
    "cuModuleGetFunction": [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p, ctypes.c_char_p],
    "cuFuncSetAttribute": [ctypes.c_void_p, ctypes.c_int, ctypes.c_int],
    "cuModuleGetGlobal_v2": [ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_size_t),
                             ctypes.c_void_p, ctypes.c_char_p],
    "cuMemcpyHtoD_v2": [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t],
    "cuLaunchKernelEx": [ctypes.POINTER(LaunchConfig), ctypes.c_void_p, ctypes.c_void_p,
                         ctypes.c_void_p],
    "cuTensorMapEncodeTiled": [ctypes.POINTER(TensorMapStorage), ctypes.c_int, ctypes.c_uint32,
                               ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint64),
                               ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint32),
                               ctypes.POINTER(ctypes.c_uint32), ctypes.c_int, ctypes.c_int,
                               ctypes.c_int, ctypes.c_int],
}


class _Driver:
    def __init__(self):
        try:
            self.lib = ctypes.CDLL("libcuda.so.1")
        except OSError as error:
            raise CudaError(f"cannot load the CUDA driver libcuda.so.1 ({error})") from None
        for name, argtypes in _kSignatures.items():
            function = getattr(self.lib, name)
            function.argtypes, function.restype = argtypes, ctypes.c_int
            setattr(self, name, function)
        check(self.cuInit(0), "cuInit")


@functools.lru_cache(maxsize=None)
def lib() -> _Driver:
    return _Driver()


def error_string(code: int) -> str:
    text = ctypes.c_char_p()
    try:
        lib().cuGetErrorString(code, ctypes.byref(text))
    except CudaError:
        return f"CUDA error {code}"
    return f"{text.value.decode() if text.value else 'unknown'} ({code})"


def check(code: int, what: str) -> None:
    if code != 0:
        raise CudaError(f"{what} failed: {error_string(code)}")


def ensure_context(device_index: int) -> None:
    """Make the device's primary context (the one torch uses) current on this thread."""
    driver = lib()
    current = ctypes.c_void_p()
    check(driver.cuCtxGetCurrent(ctypes.byref(current)), "cuCtxGetCurrent")
    device = ctypes.c_int()
    check(driver.cuDeviceGet(ctypes.byref(device), device_index), "cuDeviceGet")
    primary = ctypes.c_void_p()
    # NOTE: retaining an already-active primary context only bumps its refcount (torch's own)
    check(driver.cuDevicePrimaryCtxRetain(ctypes.byref(primary), device.value),
          "cuDevicePrimaryCtxRetain")
    if current.value != primary.value:
        check(driver.cuCtxSetCurrent(primary), "cuCtxSetCurrent")


def load_function(cubin: bytes, symbol: str) -> tuple[int, int]:
    """``(module, function)`` handles for ``symbol`` in ``cubin``, in the current context."""
    driver = lib()
    module, function = ctypes.c_void_p(), ctypes.c_void_p()
    check(driver.cuModuleLoadData(ctypes.byref(module), cubin), "cuModuleLoadData")
    check(driver.cuModuleGetFunction(ctypes.byref(function), module, symbol.encode()),
          f"cuModuleGetFunction({symbol})")
    return module.value, function.value


def module_global(module: int, name: str) -> tuple[int, int]:
    """``(device address, bytes)`` of the ``__device__`` variable ``name`` (extern "C") of a module."""
    address, size = ctypes.c_uint64(), ctypes.c_size_t()
    check(lib().cuModuleGetGlobal_v2(ctypes.byref(address), ctypes.byref(size), module,
                                     name.encode()), f"cuModuleGetGlobal({name})")
    return address.value, size.value


def write_global(module: int, name: str, value: ctypes._SimpleCData) -> None:
    """Set the module's ``__device__`` variable ``name`` to ``value`` (synchronous copy)."""
    address, size = module_global(module, name)
    if size != ctypes.sizeof(value):
        raise ValueError(f"{name} has {size} bytes, the value {ctypes.sizeof(value)}")
    check(lib().cuMemcpyHtoD_v2(address, ctypes.byref(value), size), f"cuMemcpyHtoD({name})")


def set_function_attribute(function: int, attribute: int, value: int) -> None:
    check(lib().cuFuncSetAttribute(function, attribute, value), "cuFuncSetAttribute")
