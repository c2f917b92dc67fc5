"""Plain-torch MoE references: one loop over experts, fp32 math (tests, the demo, benchmarks).

``reference_moe(..., simulate_fp8=False)`` is the unquantised layer (the accuracy yardstick);
``simulate_fp8=True`` rounds exactly where the FP8 pipeline rounds (1x128 activation quantisation
of x and of the SiLU-mul output, bf16 GEMM outputs), so with the layer's own dequantised weights
it reproduces ``MoE`` to fp32-summation-order noise: a check of the plumbing, not of the kernels.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..gemm import reference as gref


def _q(x: torch.Tensor) -> torch.Tensor:
    """Quantise-dequantise rows at 1x128 (what the activation quantiser does), fp32."""
    q, s = gref.per_token_group_quant(x.float())
    return gref.dequant_rows(q, s)


def _mlp(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, simulate_fp8: bool) -> torch.Tensor:
    """``x [n, H]`` fp32, ``w13 [2I, H]``, ``w2 [H, I]`` -> fp32 ``[n, H]``."""
    if simulate_fp8:
        h = (_q(x) @ w13.float().t()).bfloat16()
        gate, up = h.float().chunk(2, dim=-1)
        return (_q(F.silu(gate) * up) @ w2.float().t()).bfloat16().float()
    gate, up = (x @ w13.float().t()).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ w2.float().t()


def reference_moe(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                  w13: torch.Tensor, w2: torch.Tensor, shared_w13: Optional[torch.Tensor] = None,
                  shared_w2: Optional[torch.Tensor] = None, *, simulate_fp8: bool = False) -> torch.Tensor:
    """``x [T, H]``; ``topk_idx``/``topk_weights [T, k]`` (expert ids index ``w13 [E, 2I, H]``,
    ``w2 [E, H, I]``; ids outside ``[0, E)`` are ignored) -> fp32 ``[T, H]``."""
    x = x.float()
    out = torch.zeros_like(x)
    for e in torch.unique(topk_idx).tolist():
        if not 0 <= e < w13.shape[0]:
            continue
        token, slot = (topk_idx == e).nonzero(as_tuple=True)
        y = _mlp(x[token], w13[e], w2[e], simulate_fp8)
        out.index_add_(0, token, y * topk_weights[token, slot, None].float())
    if shared_w13 is not None:
        out += _mlp(x, shared_w13, shared_w2, simulate_fp8)
    return out


def dequantized_weights(moe) -> dict:
    """The layer's FP8 weights as fp32: ``w13 [E_loc, 2I, H]``, ``w2``, ``shared_w13``, ``shared_w2``."""
    ex = moe.experts
    out = dict(w13=gref.dequant_blocks(ex.w13, ex.w13_scale), w2=gref.dequant_blocks(ex.w2, ex.w2_scale),
               shared_w13=None, shared_w2=None)
    if moe.shared_experts is not None:
        sh = moe.shared_experts
        out["shared_w13"] = gref.dequant_blocks(sh.w13, sh.w13_scale)
        out["shared_w2"] = gref.dequant_blocks(sh.w2, sh.w2_scale)
    return out
