"""Host-side TMA descriptors (``cuTensorMapEncodeTiled``), passed to kernels by value.

A kernel declares the parameter as ``const __grid_constant__ TmaDesc`` (a 64-byte aligned
128-byte struct, since NVRTC cannot include <cuda.h>). Out-of-bounds boxes read as zeros.
The descriptor holds the raw address: keep the tensor alive while the map is in use.
"""
from __future__ import annotations

import ctypes

from . import driver

kSwizzleModes = {0: 0, 32: 1, 64: 2, 128: 3}  # bytes -> CUtensorMapSwizzle
kL2Promotion256 = 3  # CU_TENSOR_MAP_L2_PROMOTION_L2_256B
kInterleaveNone = 0
kOobFillZero = 0  # CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE: out-of-bounds elements read as zero
kMaxBox = 256


def _dtype_codes():
    import torch
    return {torch.float8_e4m3fn: 0, torch.uint8: 0, torch.int8: 0,  # UINT8 (raw bytes)
            torch.bfloat16: 9, torch.float16: 6, torch.float32: 7, torch.int32: 3}


class TensorMap:
    """A 128-byte CUtensorMap in host memory; ``address`` is 64-byte aligned."""

    def __init__(self, dims: tuple, strides_bytes: tuple, box: tuple, swizzle_bytes: int,
                 dtype):
        self._buffer = ctypes.create_string_buffer(driver.kTensorMapBytes + 64)
        base = ctypes.addressof(self._buffer)
        self.address = base + (-base % 64)
        self.dims, self.strides_bytes, self.box = dims, strides_bytes, box
        self.swizzle_bytes, self.dtype = swizzle_bytes, dtype

    def __repr__(self) -> str:
        return (f"TensorMap(dims={self.dims}, strides_bytes={self.strides_bytes}, box={self.box}, "
                f"swizzle={self.swizzle_bytes}, dtype={self.dtype})")

    def raw(self) -> bytes:
        return ctypes.string_at(self.address, driver.kTensorMapBytes)


def _encode(tensor, dims: list, strides: list, box: list, swizzle_bytes: int) -> TensorMap:
    """dims/box innermost first; strides (in elements) for dims[1:]."""
    import torch

    codes = _dtype_codes()
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"TMA tensor must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in codes:
        raise TypeError(f"TMA tensor dtype {tensor.dtype} unsupported; use one of {list(codes)}")
    if swizzle_bytes not in kSwizzleModes:
        raise ValueError(f"swizzle_bytes must be one of {list(kSwizzleModes)}, got {swizzle_bytes}")
    if tensor.stride(-1) != 1 and tensor.numel() > 1:
        raise ValueError(f"TMA tensor must be contiguous in its last dim, got strides "
                         f"{tuple(tensor.stride())}")
    element = tensor.element_size()
    if tensor.data_ptr() % 16:
        raise ValueError(f"TMA base address {tensor.data_ptr():#x} is not 16-byte aligned "
                         "(a slice that starts mid-row? TMA needs 16-byte aligned bases)")
    for what, values, low in (("dims", dims, 1), ("box", box, 1)):
        if any(not isinstance(v, int) or v < low for v in values):
            raise ValueError(f"TMA {what} must be positive ints, got {values}")
    if any(d >= 2 ** 32 for d in dims):
        raise ValueError(f"TMA dims must be < 2^32, got {dims}")
    if any(b > kMaxBox for b in box):
        raise ValueError(f"TMA box dims must be <= {kMaxBox}, got {box}")
    if box[0] * element % 16:
        raise ValueError(f"TMA inner box of {box[0]} x {element} B is not a multiple of 16 bytes")
    if swizzle_bytes and box[0] * element > swizzle_bytes:
        raise ValueError(f"TMA inner box of {box[0] * element} B exceeds the {swizzle_bytes}-byte "
                         "swizzle span; use a wider swizzle or a narrower box")
    strides_bytes = [s * element for s in strides]
    for index, stride in enumerate(strides_bytes):
        if stride % 16 or stride <= 0 or stride >= 2 ** 40:
            raise ValueError(f"TMA stride of dim {index + 1} (innermost = 0) is {stride} bytes; "
                             "it must be a positive multiple of 16 below 2^40 (pad the rows, "
                             "e.g. M_pad = align(M, 4) for fp32 scales)")
    if not tensor.is_cuda:
        raise ValueError(f"TMA tensor must be on a CUDA device, got {tensor.device}")
    tensor_map = TensorMap(tuple(dims), tuple(strides_bytes), tuple(box), swizzle_bytes,
                           tensor.dtype)
    rank = len(dims)
    storage = driver.TensorMapStorage.from_address(tensor_map.address)
    code = driver.lib().cuTensorMapEncodeTiled(
        ctypes.byref(storage), codes[tensor.dtype], rank, ctypes.c_void_p(tensor.data_ptr()),
        (ctypes.c_uint64 * rank)(*dims), (ctypes.c_uint64 * max(rank - 1, 1))(*strides_bytes),
        (ctypes.c_uint32 * rank)(*box), (ctypes.c_uint32 * rank)(*([1] * rank)), kInterleaveNone,
        kSwizzleModes[swizzle_bytes], kL2Promotion256, kOobFillZero)
    driver.check(code, f"cuTensorMapEncodeTiled({tensor_map})")
    return tensor_map


def make_tma_2d(tensor, box_inner: int, box_outer: int, swizzle_bytes: int = 128, *,
                inner_dim: int | None = None, outer_dim: int | None = None,
                outer_stride: int | None = None) -> TensorMap:
    """A 2-D map over ``tensor`` ``[outer, inner]`` (inner contiguous), box ``[box_outer, box_inner]``.

    inner_dim / outer_dim / outer_stride (elements) default to the tensor's last two dims and
    its row stride; override them to view a sub-matrix or a flattened batch.
    """
    inner = tensor.shape[-1] if inner_dim is None else inner_dim
    outer = (tensor.shape[-2] if tensor.dim() >= 2 else 1) if outer_dim is None else outer_dim
    stride = (tensor.stride(-2) if tensor.dim() >= 2 else inner) if outer_stride is None \
        else outer_stride
    return _encode(tensor, [inner, outer], [stride], [box_inner, box_outer], swizzle_bytes)


def make_tma_3d(tensor, box_inner: int, box_middle: int, box_outer: int = 1,
                swizzle_bytes: int = 128, *, dims: tuple | None = None,
                strides: tuple | None = None) -> TensorMap:
    """A 3-D map over ``tensor`` ``[outer, middle, inner]`` (e.g. ``[E, M, K]``).

    dims = (inner, middle, outer) and strides = (middle_stride, outer_stride) in elements
    default to the tensor's own.
    """
    if dims is None:
        if tensor.dim() != 3:
            raise ValueError(f"make_tma_3d needs a 3-D tensor or dims=, got shape "
                             f"{tuple(tensor.shape)}")
        dims = (tensor.shape[2], tensor.shape[1], tensor.shape[0])
    if strides is None:
        strides = (tensor.stride(-2), tensor.stride(-3))
    return _encode(tensor, list(dims), list(strides), [box_inner, box_middle, box_outer],
                   swizzle_bytes)
