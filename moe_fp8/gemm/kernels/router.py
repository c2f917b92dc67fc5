"""Host side of include/router.cuh: the gate's selection and the local-id mapping.

The layer wrappers (``moe_fp8.layers.router.route`` / ``moe_fp8.layers.layouts.local_expert_ids``)
decide when these run (tensors on an sm_90 GPU, ``MOE_FP8_FUSED_ROUTER=1``, limits met:
``supports_*``) and validate; these functions take checked tensors and only allocate and launch.

* ``route(scores, bias, num_groups, topk_group, top_k, fill_neg_inf, normalize, scaling,
  counts=None, from_logits=False)``: scores fp32 ``[T, E]`` (sigmoid of the logits, or with
  ``from_logits`` the logits themselves, the kernel taking torch's sigmoid; unit column
  stride), bias fp32 ``[E]`` contiguous -> ``(topk_idx int64 [T, k], topk_weights fp32
  [T, k])``, slots in descending order of the biased score; ``counts`` int64 ``[E]``
  contiguous: += 1 per selected (token, expert) (the caller zeroes it).
* ``local_ids(topk_idx, offset, num_local, num_valid)``: topk_idx int64 ``[T, k]`` contiguous;
  ``num_valid`` None, a host int or an int64 device scalar -> int64 ``[T, k]``.
* ``local_ids_shared(topk_idx, topk_weights, offset, num_local, num_valid)``: the same plus
  topk_weights fp32 ``[T, k]`` contiguous -> ``(int64 [T, k + 1], fp32 [T, k + 1])``: the shared
  expert as local expert ``num_local`` in the last slot (weight 1), skip sentinel ``num_local + 1``
  (``moe_fp8.layers.layouts.with_shared_expert``'s values).

Every launch is graph-capturable; grids depend only on T, k (host ints).
"""
from __future__ import annotations

import functools

import torch

from ..jit import KernelSource, f32, get_kernel, i32, i64, register_bundled

kHeader = "router.cuh"
# router.cuh constants (keep in sync)
kMaxPerLane = 8
kMaxExperts = 32 * kMaxPerLane
kRouteThreads = 256
kRouteWarps = kRouteThreads // 32
kLocalIdsThreads = 256
kMaxTopK = 32
kMaxGroups = 32


kPerLaneChoices = (1, 2, 4, 8)  # route_kernel's kPerLane instances (experts per lane)


def route_per_lane(num_experts: int) -> int:
    """The smallest kPerLane instance holding ``num_experts`` (<= kMaxExperts) in 32 lanes."""
    return next(p for p in kPerLaneChoices if 32 * p >= num_experts)


@functools.lru_cache(maxsize=None)
def route_source(per_lane: int = kMaxPerLane, from_logits: bool = False) -> KernelSource:
    tail = ", true" if from_logits else ""
    return KernelSource(kHeader,
                        f"moe_fp8::router::route_kernel<{kRouteThreads}, {per_lane}{tail}>")


@functools.lru_cache(maxsize=None)
def local_ids_source() -> KernelSource:
    return KernelSource(kHeader, f"moe_fp8::router::local_ids_kernel<{kLocalIdsThreads}>")


def local_ids_shared_source() -> KernelSource:
    return KernelSource(kHeader, f"moe_fp8::router::local_ids_shared_kernel<{kLocalIdsThreads}>")


@register_bundled
def bundled_sources() -> list[KernelSource]:
    """Every variant the layer can launch (10 kernels)."""
    return [*(route_source(p) for p in kPerLaneChoices),
            *(route_source(p, True) for p in kPerLaneChoices), local_ids_source(),
            local_ids_shared_source()]


def _kernel(src: KernelSource, like: torch.Tensor):
    return get_kernel(src, like.device.index if like.device.index is not None else None)


def _ceil_div(x: int, y: int) -> int:
    return -(-x // y)


# ----------------------------------------------------------------------------- applicability

def supports_route(scores: torch.Tensor, bias: torch.Tensor, num_groups: int, topk_group: int,
                   top_k: int) -> bool:
    """The kernel's limits: fp32, E <= 256 divisible into 1..32 groups of >= 2, 1 <= k <= 32."""
    if scores.dim() != 2 or scores.dtype != torch.float32 or scores.stride(1) != 1:
        return False
    tokens, experts = scores.shape
    return (bias.dtype == torch.float32 and bias.dim() == 1 and bias.shape[0] == experts
            and bias.is_contiguous() and 2 <= experts <= kMaxExperts
            and 1 <= num_groups <= kMaxGroups and experts % num_groups == 0
            and experts // num_groups >= 2 and 1 <= topk_group <= num_groups
            and 1 <= top_k <= min(kMaxTopK, experts) and tokens < 2 ** 31 - kRouteWarps
            and (tokens == 0 or scores.stride(0) >= experts))


def supports_local_ids(topk_idx: torch.Tensor) -> bool:
    return topk_idx.dtype == torch.int64 and topk_idx.dim() == 2 and topk_idx.is_contiguous() \
        and topk_idx.shape[1] >= 1


def supports_local_ids_shared(topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> bool:
    return supports_local_ids(topk_idx) and topk_weights.dtype == torch.float32 \
        and topk_weights.shape == topk_idx.shape and topk_weights.is_contiguous()


# ----------------------------------------------------------------------------- launches

def route(scores, bias, num_groups, topk_group, top_k, fill_neg_inf, normalize, scaling,
          counts=None, from_logits=False):
    """See the module docstring."""
    tokens, experts = scores.shape
    topk_idx = torch.empty(tokens, top_k, dtype=torch.int64, device=scores.device)
    topk_weights = torch.empty(tokens, top_k, dtype=torch.float32, device=scores.device)
    if tokens == 0:
        return topk_idx, topk_weights
    kernel = _kernel(route_source(route_per_lane(experts), bool(from_logits)), scores)
    kernel.launch(_ceil_div(tokens, kRouteWarps), kRouteThreads, 0, [
        scores, bias, i32(tokens), i64(scores.stride(0)), i32(experts), i32(num_groups),
        i32(topk_group), i32(top_k), i32(int(bool(fill_neg_inf))), i32(int(bool(normalize))),
        f32(float(scaling)), topk_idx, topk_weights, counts])
    return topk_idx, topk_weights


def local_ids(topk_idx, offset, num_local, num_valid=None):
    """See the module docstring."""
    out = torch.empty_like(topk_idx)
    pairs = topk_idx.numel()
    if pairs == 0:
        return out
    device_valid = num_valid if isinstance(num_valid, torch.Tensor) else None
    host_valid = -1 if num_valid is None or device_valid is not None else max(0, int(num_valid))
    _kernel(local_ids_source(), topk_idx).launch(_ceil_div(pairs, kLocalIdsThreads),
                                                 kLocalIdsThreads, 0, [
        topk_idx, i64(pairs), i32(topk_idx.shape[1]), i64(offset), i32(num_local), device_valid,
        i64(host_valid), out])
    return out


def local_ids_shared(topk_idx, topk_weights, offset, num_local, num_valid=None):
    """See the module docstring."""
    tokens, top_k = topk_idx.shape
    ids = torch.empty(tokens, top_k + 1, dtype=torch.int64, device=topk_idx.device)
    weights = torch.empty(tokens, top_k + 1, dtype=torch.float32, device=topk_idx.device)
    if tokens == 0:
        return ids, weights
    device_valid = num_valid if isinstance(num_valid, torch.Tensor) else None
    host_valid = -1 if num_valid is None or device_valid is not None else max(0, int(num_valid))
    _kernel(local_ids_shared_source(), topk_idx).launch(
        _ceil_div(ids.numel(), kLocalIdsThreads), kLocalIdsThreads, 0, [
            topk_idx, topk_weights, i64(tokens), i32(top_k), i64(offset), i32(num_local),
            device_valid, i64(host_valid), ids, weights])
    return ids, weights
