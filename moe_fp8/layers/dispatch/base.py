"""The dispatcher interface: move routed tokens to their experts' rank as an FP8 layout, and
bring the experts' outputs back, weighted and summed per token.

Sharding vocabulary (names say what they hold):

* ``num_experts_global`` (E): experts of the model; router ids are global, ``0 .. E - 1``.
* ``num_experts_local`` (E_loc): experts held by this rank, the global ids
  ``expert_offset .. expert_offset + E_loc - 1`` (contiguous blocks: rank r holds
  ``r * E_loc ..``). The layouts' expert axis is local (``0 .. E_loc - 1``).
* ``x_local`` ``[T_local, H]`` bf16: this rank's tokens (every rank routes its own tokens);
  ``topk_idx`` int64 ``[T_local, k]`` global expert ids, ``topk_weights`` fp32 ``[T_local, k]``.
* The layouts (``moe_fp8.layers.layouts``) hold rows *received* by this rank for its local
  experts, from every rank; the combine returns ``[T_local, H]`` for this rank's own tokens.

Two paths, each a (dispatch, combine) pair that shares an opaque ``handle``:

* contiguous (prefill, training): ``dispatch_contiguous(x_local, topk_idx, topk_weights)
  -> (ContiguousLayout, handle)``; the experts produce ``y_rows [M_sum, H]`` bf16 row for row;
  ``combine_contiguous(y_rows, handle, add=None) -> [T_local, H]``. ``M_sum`` depends on the
  routing, so sizing it may sync with the host once (say where in the backend's docstring).
* masked (decode, CUDA graphs): ``dispatch_masked(x_local, topk_idx, topk_weights,
  max_tokens_per_expert=M_max, num_valid_tokens=None, out=None) -> (MaskedLayout, handle)``;
  ``y_rows [E_loc, M_max, H]``; ``combine_masked(y_rows, handle, add=None, out=None)``. Every
  shape is fixed by ``(T_local, M_max)``; no host sync, no allocation that depends on values, so
  the pair can be captured in a CUDA graph. ``num_valid_tokens`` (int or device int tensor [])
  marks rows of a static ``x_local`` beyond the live batch: their pairs are skipped.
  ``out`` (MaskedBuffers) receives the layout in place (static buffers of a graph).
  ``dispatch_masked_routed(x_local, router, logits, ...)`` is the same from the gate's logits
  (a backend may fold the expert selection into its dispatch kernels).

Contract shared by all backends:

* ``x_local`` may be given pre-quantised as ``(fp8 [T, H], fp32 [T, H/128] MN-major)`` (the layer
  quantises once and reuses it for the shared experts); otherwise the dispatcher quantises it.
  Quantisation is per token per 128 channels (``moe_fp8.gemm.per_token_group_quant_fp8``) so it
  commutes with the permutation: the layout's rows are bit-identical whichever side quantises.
* The weighted sum is ``out[t] = add[t] + sum_j topk_weights[t, j] * y(t, j)`` accumulated in fp32
  and rounded to bf16 once; ``add`` is the shared experts' output (or None).
* Rows the GEMMs never write (padding, masked-out) are never read into a result.
* ``topk_idx`` holds global ids ``0 .. E - 1`` or ``-1`` for "no expert" (a masked slot, as
  DeepEP marks them); anything else raises (checked on CPU tensors, on GPU with MOE_FP8_CHECKS=1).
"""
from __future__ import annotations

import abc
from typing import Any, Optional, Tuple, Union

import torch

from ..layouts import ContiguousLayout, MaskedLayout

TokensIn = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]  # bf16 [T, H] or fp8 pair


class Dispatcher(abc.ABC):
    """One expert-parallel group's token exchange (the local backend: a group of one)."""

    num_experts_global: int
    num_experts_local: int
    expert_offset: int  # global id of local expert 0
    hidden_size: int
    top_k: int
    pow2_scale: bool = False

    # ------------------------------------------------------------------ shared checks
    def check_tokens(self, x_local: TokensIn) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Validate ``x_local`` (bf16 ``[T, H]`` or an fp8 pair) -> ``(data [T, H], scales or None)``."""
        if isinstance(x_local, (tuple, list)):
            if len(x_local) != 2 or not all(isinstance(t, torch.Tensor) for t in x_local):
                raise TypeError("x_local pair must be (fp8 tensor, fp32 scale tensor)")
            xq, xs = x_local
            if xq.dtype != torch.float8_e4m3fn or xs.dtype != torch.float32:
                raise TypeError(f"x_local pair must be (float8_e4m3fn, float32), got ({xq.dtype}, {xs.dtype})")
        elif isinstance(x_local, torch.Tensor):
            xq, xs = x_local, None
        else:
            raise TypeError(f"x_local must be a tensor or an (fp8, scales) pair, got {type(x_local).__name__}")
        if xq.dim() != 2 or xq.shape[1] != self.hidden_size:
            raise ValueError(f"x_local must be [T, {self.hidden_size}] (hidden_size), got {tuple(xq.shape)}")
        if xs is not None and tuple(xs.shape) != (xq.shape[0], self.hidden_size // 128):
            raise ValueError(f"x_local scales must be [T, {self.hidden_size // 128}], got {tuple(xs.shape)}")
        return xq, xs

    def tokens_in(self, x_local: TokensIn) -> Tuple[torch.Tensor, torch.Tensor]:
        """``x_local`` (bf16 ``[T, H]`` or an fp8 pair) -> the quantised pair ``(fp8 [T, H], fp32 [T, H/128])``."""
        xq, xs = self.check_tokens(x_local)
        if xs is None:
            from ..permute import quantize_tokens
            return quantize_tokens(xq, self.pow2_scale)
        return xq, xs

    def check_routing(self, num_tokens: int, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> None:
        """Shapes and dtypes always; id range on CPU tensors (and on GPU with MOE_FP8_CHECKS=1)."""
        expected = (num_tokens, self.top_k)
        if tuple(topk_idx.shape) != expected or tuple(topk_weights.shape) != expected:
            raise ValueError(f"topk_idx and topk_weights must be {list(expected)} ([T, top_k]), got "
                             f"{tuple(topk_idx.shape)} and {tuple(topk_weights.shape)}")
        if topk_idx.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"topk_idx must be int32/int64, got {topk_idx.dtype}")
        from ...gemm.validate import value_checks_enabled
        if value_checks_enabled(topk_idx) and topk_idx.numel():
            low, high = int(topk_idx.min()), int(topk_idx.max())
            if low < -1 or high >= self.num_experts_global:
                raise ValueError(f"topk_idx must hold expert ids in [0, {self.num_experts_global}) or -1, "
                                 f"got values in [{low}, {high}]")

    @staticmethod
    def check_max_tokens_per_expert(m_max) -> int:
        if isinstance(m_max, bool) or not isinstance(m_max, int) or m_max <= 0:
            raise ValueError(f"max_tokens_per_expert must be a positive int, got {m_max!r}")
        return m_max

    @abc.abstractmethod
    def dispatch_contiguous(self, x_local: TokensIn, topk_idx: torch.Tensor,
                            topk_weights: torch.Tensor) -> Tuple[ContiguousLayout, Any]:
        """Tokens -> contiguous layout of the rows for this rank's experts (+ handle)."""

    @abc.abstractmethod
    def combine_contiguous(self, y_rows: torch.Tensor, handle: Any, *,
                           add: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``y_rows [M_sum, H]`` bf16 -> ``[T_local, H]`` bf16 (weighted sum over each token's k)."""

    @abc.abstractmethod
    def dispatch_masked(self, x_local: TokensIn, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                        *, max_tokens_per_expert: int, num_valid_tokens=None,
                        out=None) -> Tuple[MaskedLayout, Any]:
        """Tokens -> masked layout ``[E_loc, M_max, H]`` (+ handle). CUDA-graph safe."""

    def dispatch_masked_routed(self, x_local: TokensIn, router, logits: torch.Tensor, *,
                               max_tokens_per_expert: int, num_valid_tokens=None,
                               out=None) -> Tuple[MaskedLayout, Any]:
        """``dispatch_masked`` of ``router.select(logits)`` (``router``: the layer's
        ``moe_fp8.layers.router.Router``). A backend may fold the selection into its dispatch;
        the result must be the same."""
        topk_idx, topk_weights = router.select(logits)
        return self.dispatch_masked(x_local, topk_idx, topk_weights,
                                    max_tokens_per_expert=max_tokens_per_expert,
                                    num_valid_tokens=num_valid_tokens, out=out)

    @abc.abstractmethod
    def combine_masked(self, y_rows: torch.Tensor, handle: Any, *, add: Optional[torch.Tensor] = None,
                       out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``y_rows [E_loc, M_max, H]`` bf16 -> ``[T_local, H]`` bf16. CUDA-graph safe."""

    def max_tokens_per_expert(self, max_tokens_local: int) -> int:
        """``M_max`` that can never overflow when each rank sends at most ``max_tokens_local``
        tokens (a token picks an expert at most once). EP backends multiply by the group size."""
        return max_tokens_local

    def expected_rows(self, num_tokens_local: int) -> float:
        """Mean rows per local expert for a batch this size (every rank sends that many tokens in
        the EP backends, which override this), unrounded."""
        return num_tokens_local * self.top_k / self.num_experts_global

    def expected_m(self, num_tokens_local: int) -> int:
        """The masked GEMM's tile hint: mean rows per local expert for a batch this size."""
        pairs = num_tokens_local * self.top_k * self.num_experts_local // self.num_experts_global
        return max(1, -(-pairs // self.num_experts_local))
