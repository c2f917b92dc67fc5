"""Host side of include/ep_send.cuh: the send side of the expert-parallel prefill exchange.

``moe_fp8.layers.dispatch.torch_dist`` decides when these run (tensors on an sm_90 GPU,
``MOE_FP8_FUSED_EP=1``, ``supports``) and validates; these functions take checked tensors and
pre-allocated outputs and only launch.

* ``route_pack(ids, weights, xq, xs, records, table, experts_per_rank, ranks)``: ids int64
  ``[T, k]`` global expert ids (anything outside ``[0, E)`` = none), weights fp32 ``[T, k]``, xq fp8
  ``[T, H]`` (16-byte rows, any 16-byte row stride), xs fp32 ``[T, H/128]`` any strides, records
  uint8 ``[T, row]`` contiguous (row: ``RowFormat.nbytes``), table int64 ``[E + 1 + R]`` zeroed.
  Adds the routing table, writes the records; returns the per-CTA tokens per rank (int32) that
  ``send_order`` needs.
* ``send_order(ids, table, cta_counts, experts_per_rank, ranks, send_token, source_row,
  source_weight)``: send_token int64 ``[R * T]`` (the first ``sum(table[E + 1:])`` rows written),
  source_row int64 ``[T, R]``, source_weight fp32 ``[T, R]``, contiguous.

* ``replicate_pack(ids, weights, xq, xs, num_valid, send)``: decode's fixed-split send buffer
  uint8 ``[R, T, row]`` contiguous: row (r, t) = token t's record, ids -1 for tokens at or beyond
  ``num_valid`` (None: every token; an int; or an int64 device scalar, read by the kernel).

Every launch is graph-capturable; grids depend on T only.
"""
from __future__ import annotations

import functools

import torch

from ..jit import KernelSource, get_kernel, i32, i64, register_bundled

kHeader = "ep_send.cuh"
# ep_send.cuh constants (keep in sync)
kThreads = 256
kMaxRanks = 64
kMaxExperts = 1024
kVectorBytes = 16


@functools.lru_cache(maxsize=None)
def route_pack_source() -> KernelSource:
    return KernelSource(kHeader, f"moe_fp8::ep_send::route_pack_kernel<{kThreads}>")


@functools.lru_cache(maxsize=None)
def send_order_source() -> KernelSource:
    return KernelSource(kHeader, f"moe_fp8::ep_send::send_order_kernel<{kThreads}>")


@functools.lru_cache(maxsize=None)
def replicate_pack_source() -> KernelSource:
    return KernelSource(kHeader, f"moe_fp8::ep_send::replicate_pack_kernel<{kThreads}>")


@register_bundled
def bundled_sources() -> list[KernelSource]:
    """Every variant the dispatcher can launch (3 kernels)."""
    return [route_pack_source(), send_order_source(), replicate_pack_source()]


def _kernel(src: KernelSource, like: torch.Tensor):
    return get_kernel(src, like.device.index if like.device.index is not None else None)


def _supports_tokens(ids: torch.Tensor, weights: torch.Tensor, xq: torch.Tensor,
                     xs: torch.Tensor) -> bool:
    """Every kernel's token inputs: int64 ids and fp32 weights contiguous, fp8 rows of 16-byte
    multiples (16-byte aligned rows), fp32 scales of any strides, T >= 1."""
    return (ids.dtype == torch.int64 and ids.is_contiguous() and ids.dim() == 2
            and weights.dtype == torch.float32 and weights.is_contiguous()
            and tuple(weights.shape) == tuple(ids.shape)
            and xq.dim() == 2 and xq.element_size() == 1 and xq.shape[0] == ids.shape[0] >= 1
            and xq.shape[1] % kVectorBytes == 0 and xq.stride(1) == 1
            and xq.stride(0) % kVectorBytes == 0 and xq.data_ptr() % kVectorBytes == 0
            and xs.dtype == torch.float32 and xs.dim() == 2 and xs.shape[0] == xq.shape[0])


def supports(ids: torch.Tensor, weights: torch.Tensor, xq: torch.Tensor, xs: torch.Tensor,
             num_experts: int, ranks: int) -> bool:
    """The prefill kernels' limits: the token inputs, E <= 1024 and R <= 64 (shared-memory
    counters, a 64-bit rank mask), R * T < 2^31 send rows."""
    return (1 <= num_experts <= kMaxExperts and 1 <= ranks <= kMaxRanks
            and _supports_tokens(ids, weights, xq, xs) and ids.shape[0] * ranks < 2 ** 31)


def _ctas(tokens: int) -> int:
    return -(-tokens // kThreads)


def route_pack(ids, weights, xq, xs, records, table, experts_per_rank: int, ranks: int) -> torch.Tensor:
    tokens, top_k = ids.shape
    num_experts = table.shape[0] - 1 - ranks
    ctas = _ctas(tokens)
    cta_counts = torch.empty(ctas, ranks, dtype=torch.int32, device=ids.device)
    _kernel(route_pack_source(), ids).launch(ctas, kThreads, 0, [
        ids, weights, xq, xs, records, table, cta_counts, i32(tokens), i32(top_k), i32(num_experts),
        i32(experts_per_rank), i32(ranks), i32(xq.shape[1] // kVectorBytes),
        i64(xq.stride(0) // kVectorBytes), i32(xs.shape[1]), i64(xs.stride(0)), i64(xs.stride(1)),
        i32(records.shape[1] // kVectorBytes)])
    return cta_counts


def send_order(ids, table, cta_counts, experts_per_rank: int, ranks: int, send_token, source_row,
               source_weight) -> None:
    tokens, top_k = ids.shape
    num_experts = table.shape[0] - 1 - ranks
    _kernel(send_order_source(), ids).launch(_ctas(tokens), kThreads, 0, [
        ids, table, cta_counts, send_token, source_row, source_weight, i32(tokens), i32(top_k),
        i32(num_experts), i32(experts_per_rank), i32(ranks)])


def supports_replicate(ids: torch.Tensor, weights: torch.Tensor, xq: torch.Tensor, xs: torch.Tensor,
                       num_valid) -> bool:
    """The token inputs (any E, any R: no table), plus a usable ``num_valid``."""
    ok_valid = num_valid is None or isinstance(num_valid, int) or (
        isinstance(num_valid, torch.Tensor) and num_valid.dtype == torch.int64
        and num_valid.numel() == 1 and num_valid.device == ids.device)
    return ok_valid and _supports_tokens(ids, weights, xq, xs)


def replicate_pack(ids, weights, xq, xs, num_valid, send) -> None:
    ranks, tokens = send.shape[0], send.shape[1]
    device_valid = num_valid if isinstance(num_valid, torch.Tensor) else None
    host_valid = tokens if num_valid is None or device_valid is not None else int(num_valid)
    warps = kThreads // 32
    _kernel(replicate_pack_source(), ids).launch(-(-tokens // warps), kThreads, 0, [
        ids, weights, xq, xs, device_valid, send, i32(tokens), i32(ids.shape[1]), i32(ranks),
        i32(xq.shape[1] // kVectorBytes), i64(xq.stride(0) // kVectorBytes), i32(xs.shape[1]),
        i64(xs.stride(0)), i64(xs.stride(1)), i32(send.shape[2] // kVectorBytes), i64(host_valid)])
