"""Host side of include/route_dispatch.cuh: a decode step's expert selection and masked dispatch
in one launch (``router.route`` from the logits, then ``permute.masked_dispatch_small``).

* ``supports(logits, bias, num_groups, topk_group, top_k)``: the route kernel's limits
  (``router.supports_route``) and at most ``permute.kSmallPairs`` (token, slot) pairs.
* ``route_dispatch_small(logits, bias, num_groups, topk_group, top_k, fill_neg_inf, normalize,
  scaling, num_experts, m_max, id_offset, num_valid, xq, xs, a_buf, sa_buf, row_token, row_slot)``:
  logits fp32 ``[T, E]`` (unit column stride) and bias as ``router.route`` takes them with
  ``from_logits=True``; the rest as ``permute.masked_dispatch_small`` takes them (global ids of
  this rank's experts at ``[id_offset, id_offset + num_experts)``, ``num_valid`` an int64 device
  scalar or None) -> ``(topk_idx int64 [T, k], topk_weights fp32 [T, k], masked index fields)``,
  the masked index with its combine index (``slot_row`` / ``slot_weight``).

The layer wrapper (``moe_fp8.layers.dispatch.local``) decides when this runs and validates.
"""
from __future__ import annotations

import functools

import torch

from ..jit import KernelSource, f32, get_kernel, i32, i64, register_bundled
from . import permute, router

kHeader = "route_dispatch.cuh"
kThreads = permute.kPermuteThreads


@functools.lru_cache(maxsize=None)
def source(per_lane: int) -> KernelSource:
    return KernelSource(kHeader, f"moe_fp8::route_dispatch::route_dispatch_small_kernel"
                                 f"<{kThreads}, {per_lane}>")


@register_bundled
def bundled_sources() -> list[KernelSource]:
    """One instance per route_kernel experts-per-lane choice (4 kernels)."""
    return [source(p) for p in router.kPerLaneChoices]


def _kernel(src: KernelSource, like: torch.Tensor):
    return get_kernel(src, like.device.index if like.device.index is not None else None)


def supports(logits: torch.Tensor, bias: torch.Tensor, num_groups: int, topk_group: int,
             top_k: int) -> bool:
    return (router.supports_route(logits, bias, num_groups, topk_group, top_k)
            and 0 < logits.shape[0] * top_k <= permute.kSmallPairs)


def route_dispatch_small(logits, bias, num_groups, topk_group, top_k, fill_neg_inf, normalize,
                         scaling, num_experts, m_max, id_offset, num_valid, xq, xs, a_buf, sa_buf,
                         row_token, row_slot):
    """See the module docstring."""
    tokens, experts_global = logits.shape
    num_pairs = tokens * top_k
    topk_idx = torch.empty(tokens, top_k, dtype=torch.int64, device=logits.device)
    topk_weights = torch.empty(tokens, top_k, dtype=torch.float32, device=logits.device)
    fields = permute._masked_index_outputs(num_pairs, num_experts, True, logits.device)
    masked_m, pair_expert, pair_rank, pair_kept, num_overflow, slot_row, slot_weight = fields
    kernel = _kernel(source(router.route_per_lane(experts_global)), logits)
    kernel.launch(permute.small_dispatch_grid(num_pairs, num_experts, m_max), kThreads, 0, [
        logits, bias, i32(tokens), i64(logits.stride(0)), i32(experts_global), i32(num_groups),
        i32(topk_group), i32(top_k), i32(int(bool(fill_neg_inf))), i32(int(bool(normalize))),
        f32(float(scaling)), topk_idx, topk_weights,
        i32(num_experts), i32(m_max), i64(id_offset), num_valid, masked_m, pair_expert, pair_rank,
        pair_kept, num_overflow, slot_row, slot_weight,
        *permute.small_dispatch_copy_args(xq, xs, a_buf, sa_buf, row_token, row_slot)])
    return topk_idx, topk_weights, fields
