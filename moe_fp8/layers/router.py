"""The DeepSeek-V3 gate: sigmoid scores, group-limited top-k, aux-loss-free bias.

For one token with logits ``l [E]`` (fp32):

    s      = sigmoid(l)                              routing weights come from these
    c      = s + e_score_correction_bias             selection only ("aux-loss-free" balancing)
    g[j]   = sum of the 2 largest c in group j       n_group groups of E / n_group experts
    keep the topk_group best groups; c of the other groups := -inf (or 0.0, config option)
    idx    = top_k(c)                                the chosen experts (unordered)
    w      = s[idx] / (sum s[idx] + 1e-20) * routed_scaling_factor   (normalised if norm_topk_prob)

Everything runs in fp32 as transformers' ``DeepseekV3TopkRouter`` does, so the expert indices are
identical to it for the same inputs. No host sync anywhere (CUDA-graph safe).

With ``MOE_FP8_FUSED_ROUTER=1`` on an sm_90 GPU the selection after the sigmoid (bias, group
top-2 sums, group and expert top-k, weights, and the tokens-per-expert counts) is one kernel
(``moe_fp8/gemm/include/router.cuh``, one warp per token) instead of ~15 torch ops, the local-id
mapping is one kernel, and the local dispatcher's masked index kernel writes the combine index in
the same pass. On by default (verified and measured on an H100, 2026-12-05: tests/test_router_gpu.py,
tests/test_permute_gpu.py, tests/fuzz_gpu.py); ``0`` keeps the torch code (and the separate
combine index).
The gate GEMM and the sigmoid stay torch's (fp32 ``F.linear`` on an fp32 copy of x, or with
checkpoint-style bf16-valued gate weights one bf16 tensor-core GEMM with fp32 output: see
``gate_logits``; then ``sigmoid``), so the scores are the same bits on both paths and the kernel's
comparisons are exact: same expert set per token. The kernel's slots come in descending order of the biased
score (torch's unsorted top-k has its own order) and it sums the k weights in slot order, so a
weight may differ from the torch path's by an ulp or two. With ``MOE_FP8_ROUTE_SIGMOID=1`` (the
default) the route kernel takes the logits and computes torch's formula for the sigmoid itself (expf, IEEE
division: the same bits), one kernel fewer per call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import MoEConfig
from .switches import kernels_enabled, switch_on


kFusedRouterEnv = "MOE_FP8_FUSED_ROUTER"


# Router.refresh_bf16_gate after loads and random init (the bf16 gate GEMM, gate_logits). On: H100,
# 2026-12-05, prefill 4096 tokens 4028 -> 3788 us, decode graph 128 tokens 605 -> 589 us
# (results/layer_gate_h100_2026-12-05.md); refresh_bf16_gate() itself always works when called.
kBf16GateEnv = "MOE_FP8_BF16_GATE"
kBf16GateDefault = True

kFusedRouterDefault = True  # verified and measured on an H100, 2026-12-05 (NOTES "First GPU run of session 4")

# The route kernel takes the sigmoid of the logits itself (torch's formula, the same bits) instead
# of a separate torch sigmoid kernel: one kernel fewer on the decode graph's router branch (8
# kernels, ~31 us before the routed GEMMs at one token, H100 2026-12-05). On: the same bits
# (tests/test_router_gpu.py), with the fused decode index 183 -> 179 us at one token (H100,
# 2026-12-05, session 9).
kRouteSigmoidEnv = "MOE_FP8_ROUTE_SIGMOID"
kRouteSigmoidDefault = True


def fused_router_switch_on() -> bool:
    """The environment switch alone (``MOE_FP8_FUSED_ROUTER``: 1 on, 0 off, unset: off)."""
    return switch_on(kFusedRouterEnv, kFusedRouterDefault)


def fused_router_enabled(t: torch.Tensor) -> bool:
    """True when the router kernels (route, local ids) should run for tensors like ``t``: on an
    sm_90 GPU, ``MOE_FP8_FUSED_ROUTER=1``, not inside ``torch.compile`` tracing."""
    return kernels_enabled(t, kFusedRouterEnv, kFusedRouterDefault)


def kernels():
    """The router kernels' host module (imported on first use)."""
    from ..gemm.kernels import router as module
    return module


@dataclass
class Routing:
    topk_idx: torch.Tensor  # int64 [T, k]: global expert ids of each token, unordered
    topk_weights: torch.Tensor  # fp32 [T, k]: combine weights (normalised, scaled)
    logits: torch.Tensor  # fp32 [T, E]: router logits (before the sigmoid)


def group_limited_topk(scores: torch.Tensor, bias: torch.Tensor, cfg: MoEConfig) -> torch.Tensor:
    """Expert selection: ``scores`` fp32 ``[T, E]`` (sigmoid), ``bias`` fp32 ``[E]`` -> int64 ``[T, k]``."""
    tokens = scores.shape[0]
    choice = scores + bias  # [T, E]
    grouped = choice.view(tokens, cfg.n_group, cfg.experts_per_group)  # [T, G, E/G]
    group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
    kept_groups = group_scores.topk(cfg.topk_group, dim=-1, sorted=False).indices  # [T, topk_group]
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept_groups, True)  # [T, G]
    fill = float("-inf") if cfg.group_mask_fill == "neg_inf" else 0.0
    choice = grouped.masked_fill(~keep.unsqueeze(-1), fill).view(tokens, cfg.num_experts)  # [T, E]
    return choice.topk(cfg.top_k, dim=-1, sorted=False).indices


def route(logits: torch.Tensor, bias: torch.Tensor, cfg: MoEConfig, *,
          counts_out: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits`` fp32 ``[T, E]`` -> ``(topk_idx int64 [T, k], topk_weights fp32 [T, k])``.

    ``counts_out`` int64 ``[E]`` (optional) receives the tokens-per-expert counts of this call
    (overwritten). Fused kernel or torch: see the module docstring.
    """
    if logits.dim() != 2 or logits.shape[-1] != cfg.num_experts:
        raise ValueError(f"logits must be [T, {cfg.num_experts}] (num_experts), got {tuple(logits.shape)}")
    if counts_out is not None and (counts_out.dtype != torch.int64
                                   or tuple(counts_out.shape) != (cfg.num_experts,)):
        raise ValueError(f"counts_out must be int64 [{cfg.num_experts}], got "
                         f"{counts_out.dtype} {tuple(counts_out.shape)}")
    if fused_router_enabled(logits) and not (torch.is_grad_enabled() and logits.requires_grad):
        module = kernels()
        bias32 = bias.to(device=logits.device, dtype=torch.float32).contiguous()
        if module.supports_route(logits, bias32, cfg.n_group, cfg.topk_group, cfg.top_k):
            # the kernel's input: the logits (it takes their sigmoid) or torch's sigmoid of them
            from_logits = switch_on(kRouteSigmoidEnv, kRouteSigmoidDefault)
            scores = logits if from_logits else logits.sigmoid()
            counts = None
            if counts_out is not None and counts_out.is_contiguous() and \
                    counts_out.device == scores.device:
                counts = counts_out.zero_()
            topk_idx, weights = module.route(scores, bias32, cfg.n_group, cfg.topk_group,
                                             cfg.top_k, cfg.group_mask_fill == "neg_inf",
                                             cfg.norm_topk_prob, cfg.routed_scaling_factor,
                                             counts, from_logits=from_logits)
            if counts_out is not None and counts is None:
                counts_out.copy_(tokens_per_expert(topk_idx, cfg.num_experts))
            return topk_idx, weights
    scores = logits.sigmoid()
    topk_idx = group_limited_topk(scores, bias, cfg)
    weights = scores.gather(1, topk_idx)  # [T, k] from the unbiased scores
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    if counts_out is not None:
        counts_out.copy_(tokens_per_expert(topk_idx, cfg.num_experts))
    return topk_idx, weights * cfg.routed_scaling_factor


_mm_out_dtype = [hasattr(torch.ops.aten.mm, "dtype")]  # mm(bf16, bf16) -> fp32 on CUDA


def gate_logits(x: torch.Tensor, weight: torch.Tensor,
                weight_bf16: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x [T, H]`` (any float dtype), ``weight`` fp32 ``[E, H]`` -> fp32 logits ``[T, E]``:
    torch's fp32 GEMM on an fp32 copy of x (transformers' numerics).

    ``weight_bf16``: the same weights in bf16 where every value is a bf16 value exactly (as
    DeepSeek-V3 checkpoints store the gate; ``Router.refresh_bf16_gate``). Then, for bf16 x on
    CUDA, one tensor-core GEMM with fp32 accumulation and output: the same products (a bf16 x bf16
    product is exact in fp32), summed in another order, without the fp32 copy of x and the fp32
    SIMT GEMM (~0.16 ms at 4096 tokens x 32 experts on an H100, 8x that at 256 experts).

    A gate kernel of our own for decode batches (a CTA per expert) was slower than cuBLAS's
    split-K GEMM and reduction in every measurement (H100, sessions 7-11); removed in session 19."""
    if (weight_bf16 is not None and x.is_cuda and x.dtype == torch.bfloat16 and _mm_out_dtype[0]
            and weight_bf16.device == x.device):
        try:
            return torch.mm(x, weight_bf16.t(), out_dtype=torch.float32)
        except (RuntimeError, TypeError, NotImplementedError):
            _mm_out_dtype[0] = False  # this build lacks the CUDA kernel: the fp32 path from now on
    return F.linear(x.float(), weight.float())


def tokens_per_expert(topk_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int64 ``[num_experts]``: how many (token, slot) pairs chose each expert (no host sync)."""
    flat = topk_idx.reshape(-1)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=topk_idx.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat))


class Router(nn.Module):
    """The gate of one MoE layer (replicated on every rank; experts are global ids)."""

    def __init__(self, cfg: MoEConfig, device=None):
        super().__init__()
        self.cfg = cfg
        # fp32 like the checkpoint's mlp.gate.weight; [E_global, H]
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size,
                                               dtype=torch.float32, device=device))
        # fp32 [E_global]: e_score_correction_bias, selection only
        self.register_buffer("e_score_correction_bias",
                             torch.zeros(cfg.num_experts, dtype=torch.float32, device=device))
        nn.init.normal_(self.weight, std=0.02)
        self._weight_bf16: Optional[torch.Tensor] = None  # refresh_bf16_gate
        self._weight_bf16_version = -1

    def refresh_bf16_gate_if_enabled(self) -> bool:
        """``refresh_bf16_gate`` where ``MOE_FP8_BF16_GATE`` (default ``kBf16GateDefault``) is on."""
        if not switch_on(kBf16GateEnv, kBf16GateDefault):
            self._weight_bf16 = None
            return False
        return self.refresh_bf16_gate()

    @torch.no_grad()
    def refresh_bf16_gate(self) -> bool:
        """Keep a bf16 copy of the gate weight if all its values are bf16 values exactly (as in
        DeepSeek-V3 checkpoints): inference then computes the logits with one bf16 tensor-core
        GEMM (``gate_logits``). One host sync (the comparison): call it after loading weights,
        outside CUDA-graph capture. The copy is dropped as soon as the weight changes in place
        (optimizer steps, loads) and is not used while the weight takes gradients. Returns
        whether the copy is in use."""
        weight = self.weight.detach()
        w16 = weight.to(torch.bfloat16)
        exact = bool(torch.equal(w16.float(), weight))
        self._weight_bf16 = w16 if exact else None
        self._weight_bf16_version = self.weight._version
        return exact

    def _bf16_gate(self) -> Optional[torch.Tensor]:
        if self._weight_bf16 is None or torch.compiler.is_compiling():
            return None  # NOTE: dynamo cannot guard on a tensor's version counter
        if self.weight._version != self._weight_bf16_version:
            return None
        if self.weight.requires_grad and torch.is_grad_enabled():
            return None  # training: the fp32 GEMM carries the weight's gradient
        return self._weight_bf16

    def _apply(self, fn, *args, **kwargs):
        self._weight_bf16 = None  # .to() / .cuda(): a stale device or dtype; refresh again
        return super()._apply(fn, *args, **kwargs)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``x [T, H]`` (any float dtype) -> the gate's fp32 logits ``[T, E]`` (``gate_logits``)."""
        if x.dim() != 2 or x.shape[-1] != self.cfg.hidden_size:
            raise ValueError(f"x must be [T, {self.cfg.hidden_size}] (hidden_size), got {tuple(x.shape)}")
        return gate_logits(x, self.weight, self._bf16_gate())

    def select(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``logits [T, E]`` -> ``(topk_idx, topk_weights)`` (``route`` with this gate's bias)."""
        return route(logits, self.e_score_correction_bias, self.cfg)

    def forward(self, x: torch.Tensor, *, counts_out: Optional[torch.Tensor] = None) -> Routing:
        """``x [T, H]`` (any float dtype) -> Routing; ``counts_out`` int64 ``[E]`` (optional)
        gets this batch's tokens-per-expert counts (see ``route``)."""
        logits = self.logits(x)  # [T, E] fp32
        topk_idx, topk_weights = route(logits, self.e_score_correction_bias, self.cfg,
                                       counts_out=counts_out)
        return Routing(topk_idx, topk_weights, logits)

    @torch.no_grad()
    def update_bias(self, tokens_per_expert: torch.Tensor, rate: float = 1e-3) -> None:
        """Aux-loss-free balancing (DeepSeek-V3 §2.1.2): after a step, lower the bias of experts
        that got more than the mean load and raise it for those below, by ``rate``.

        ``tokens_per_expert`` ``[E_global]`` counts summed over the step (all-reduce it across
        data/expert-parallel ranks first so every replica applies the same update).
        """
        if tokens_per_expert.shape != self.e_score_correction_bias.shape:
            raise ValueError(f"tokens_per_expert must have shape {tuple(self.e_score_correction_bias.shape)}, "
                             f"got {tuple(tokens_per_expert.shape)}")
        load = tokens_per_expert.to(torch.float32)
        self.e_score_correction_bias += rate * torch.sign(load.mean() - load)
