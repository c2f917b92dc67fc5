"""``MoE``: the DeepSeek-V3 MoE layer with FP8 experts.

    x [T, H] ──gate──> topk_idx, topk_weights                (fp32 router, replicated)
      └─quantise once (1x128)──┬─ dispatch ─> layout ─> experts (grouped FP8 GEMMs) ─┐
                               └─ shared experts (dense FP8 GEMMs) ── add ───── combine ─> y [T, H]

``forward`` runs the contiguous layout (prefill, any batch); ``decode_runner(max_tokens)`` the
masked layout in one CUDA graph (decode). Both give the same result to bf16 rounding.

On one GPU, small eager batches fold the shared expert into the routed GEMMs instead
(``MOE_FP8_FOLD_SHARED``): its weights are stored as local expert E_loc after the routed ones
(``folded_weights``), every token is routed to it at weight 1, and the combine sums k + 1 rows.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..gemm import heuristics as H
from ..gemm.validate import value_checks_enabled
from .config import MoEConfig
from .dispatch import Dispatcher, LocalDispatcher, make_dispatcher
from .experts import MaskedWorkspace, RoutedExperts, SharedExperts
from .layouts import MaskedBuffers
from .permute import quantize_tokens
from .router import Router
from .switches import int_setting, switch_on


kOverlapSharedEnv = "MOE_FP8_OVERLAP_SHARED"  # 1: the shared experts run on a side stream
kOverlapSharedDefault = True  # verified and measured with the router kernels, H100 2026-12-05
# 1: the contiguous step's routed experts wait for the shared experts (the side stream then
# overlaps only the router branch and the dispatch). In a graph replay of 1024 tokens the shared
# down GEMM (100 SMs) still ran when the persistent fused SwiGLU started, which then took 631 us
# against 527 eagerly (H100, session 33). Measured with it on (session 33, H100, same bits): that
# SwiGLU 545 us but starting 38 us later; the runner at 768 / 1024 / 2048 tokens -0.5 / -7 / -46 us
# (the last within the rounds' spread), the eager layer at 1024-8192 tokens +-5 us: left off.
kSharedBeforeRoutedEnv = "MOE_FP8_SHARED_BEFORE_ROUTED"
kSharedBeforeRoutedDefault = False
kNoEpBackward = ("an expert-parallel MoE layer has no backward yet (its all-to-alls carry no "
                 "autograd graph, so gradients would be silently missing): run it under "
                 "torch.no_grad() or torch.inference_mode(); FP8 training runs on a one-GPU layer "
                 "(ep_group=None, enable_fp8_training)")
# SMs the decode step leaves to its router branch while the shared experts' GEMMs run beside it
# (0: none reserved, the GEMMs take every SM). A runner of 128 tokens replayed with one saw its
# router kernels wait ~15 us for SMs behind the shared gate-up GEMM. 32 (H100, 2026-12-05,
# session 9, two rounds each): decode 1 / 32 / 128 tokens 179 -> 171-173 / 535 -> 531-532 /
# 577 -> 564-565 us, a 128-token runner at one token 191 -> 182; 48 and 64 no better, 16 half.
kDecodeRouterSmsEnv = "MOE_FP8_DECODE_ROUTER_SMS"
kDecodeRouterSmsDefault = 32
kSharedStreams: dict = {}  # device -> the side stream the shared experts use (prefill and decode)
# The shared expert as local expert E_loc of the routed grouped GEMMs (its weights stored after the
# routed ones, every token routed to it at weight 1) instead of dense GEMMs on a side stream
# (MOE_FP8_FOLD_SHARED: 1 in every contiguous step, 0 never; unset: the eager forward on the GPU
# below kFoldSharedMaxTokens tokens). Needs a one-GPU layer whose shared width equals the routed one
# (DeepSeek-V3: 1 x 2048), and inference (the FP8 training path keeps the shared experts apart).
# Measured (H100, session 34, in turns, bits equal): the eager layer -95 / -31 / -75 / -25 us at
# 256 / 512 / 1024 / 1536 tokens (host-bound: fewer launches, no stream fork), but +10 / +38 / +68 /
# +209 us at 2048 / 4096 / 8192 / 16384 (the side stream hides the shared GEMMs behind the router,
# index and permute kernels, which the fold serialises); the graph runner's contiguous buckets
# +36 / +29 / -73 us at 768 / 1024 / 2048 (mixed): graphs keep the side branch.
kFoldSharedEnv = "MOE_FP8_FOLD_SHARED"
kFoldSharedMaxTokens = 2048
kFoldedBuffers = ("w13", "w13_scale", "w2", "w2_scale")


def _side_stream(streams: dict, device: torch.device) -> "torch.cuda.Stream":
    """The stream ``streams`` keeps for ``device`` (one per device, shared by layers), made on
    first use."""
    side = streams.get(device)
    if side is None:
        side = streams[device] = torch.cuda.Stream(device=device)
    return side


class MoE(nn.Module):
    """One MoE layer. ``ep_group=None``: this device holds all ``cfg.num_experts`` experts.

    Parameters mirror the checkpoint names: ``gate`` (router), ``experts`` (FP8 ``w13``/``w2`` with
    128x128 scales, local experts only), ``shared_experts``. Weights start random (``seed``)
    unless loaded with ``load_safetensors`` / built with ``from_hf``.
    """

    def __init__(self, cfg: MoEConfig, ep_group=None, device=None, dtype: torch.dtype = torch.bfloat16,
                 *, dispatcher: Optional[Dispatcher] = None, seed: Optional[int] = 0):
        super().__init__()
        if dtype != torch.bfloat16:  # the FP8 GEMMs write bf16
            raise TypeError(f"dtype must be torch.bfloat16 (the GEMMs' output), got {dtype}")
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.cfg, self.dtype = cfg, dtype
        self.dispatcher = dispatcher if dispatcher is not None else make_dispatcher(cfg, ep_group)
        self.gate = Router(cfg, device=device)
        self.experts = RoutedExperts(self.dispatcher.num_experts_local, cfg.hidden_size,
                                     cfg.moe_intermediate_size, device, dtype, cfg.pow2_scale)
        self.shared_experts = None
        if cfg.n_shared_experts:
            self.shared_experts = SharedExperts(cfg.hidden_size, cfg.shared_intermediate_size,
                                                device, dtype, cfg.pow2_scale)
        # int64 [E_global]: pairs per expert in the last forward (for Router.update_bias)
        self.register_buffer("last_tokens_per_expert",
                             torch.zeros(cfg.num_experts, dtype=torch.int64, device=device),
                             persistent=False)
        self._graph_runner = None  # attach_graph_runner
        self._tie_shared_weights()
        if seed is not None:
            self.random_init(seed)

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def random_init(self, seed: int = 0) -> None:
        device = self.gate.weight.device
        generator = torch.Generator(device=device).manual_seed(seed)
        self.gate.weight.normal_(std=0.02, generator=generator)
        # bf16 values, as checkpoints store the gate (Router.refresh_bf16_gate)
        self.gate.weight.copy_(self.gate.weight.bfloat16())
        self.gate.e_score_correction_bias.zero_()
        self.experts.random_init(generator)
        if self.shared_experts is not None:
            self.shared_experts.random_init(generator)
        self.gate.refresh_bf16_gate_if_enabled()

    def _shared_foldable(self) -> bool:
        """A one-GPU layer whose shared expert has the routed experts' width and storage kind."""
        sh, ex = self.shared_experts, self.experts
        return (sh is not None and isinstance(self.dispatcher, LocalDispatcher)
                and sh.inter == ex.inter and sh.hidden == ex.hidden
                and all(getattr(sh, n).dtype == getattr(ex, n).dtype
                        and getattr(sh, n).device == getattr(ex, n).device for n in kFoldedBuffers))

    @torch.no_grad()
    def _tie_shared_weights(self) -> None:
        """Store the shared expert's FP8 weights and scales as slice E_loc of ``[E_loc + 1, ...]``
        tensors whose first E_loc slices are the routed experts' buffers (both modules keep their
        buffer names and shapes: views; loads copy into them in place), so that ``folded_weights``
        can hand the grouped GEMMs one stack without a copy. Made at construction and again
        after ``.to()`` / ``.cuda()`` (which move each buffer alone)."""
        if not self._shared_foldable():
            return
        ex, sh, e = self.experts, self.shared_experts, self.num_experts_local
        for name in kFoldedBuffers:
            routed, shared = getattr(ex, name), getattr(sh, name)
            stack = torch.empty((e + 1,) + tuple(routed.shape[1:]), dtype=routed.dtype,
                                device=routed.device)
            stack[:e].copy_(routed)
            stack[e].copy_(shared)
            setattr(ex, name, stack[:e])
            setattr(sh, name, stack[e])

    def folded_weights(self) -> Optional[tuple]:
        """``(w13, w13_scale, w2, w2_scale)`` of ``E_loc + 1`` experts, the last the shared one:
        views of the tied storage (``_tie_shared_weights``), or None where they are not tied."""
        if self.shared_experts is None or torch.compiler.is_compiling():
            return None
        ex, sh, e = self.experts, self.shared_experts, self.num_experts_local
        stacks = []
        for name in kFoldedBuffers:
            routed, shared = getattr(ex, name), getattr(sh, name)
            if (not routed.is_contiguous() or shared.shape != routed.shape[1:]
                    or routed.untyped_storage().data_ptr() != shared.untyped_storage().data_ptr()
                    or shared.storage_offset() != routed.storage_offset() + e * routed.stride(0)):
                return None
            stacks.append(routed.as_strided((e + 1,) + tuple(routed.shape[1:]), routed.stride(),
                                            routed.storage_offset()))
        return tuple(stacks)

    def _apply(self, fn, *args, **kwargs):
        tied = self.folded_weights() is not None
        result = super()._apply(fn, *args, **kwargs)
        if tied and self.folded_weights() is None:  # moved buffer by buffer: tie them again
            self._tie_shared_weights()
        return result

    def _fold_shared(self, xq: torch.Tensor, eager: bool = True) -> Optional[tuple]:
        """The folded weights where this contiguous step (``eager``: ``forward``, else the static
        step of a graph) runs the shared expert as a routed one (``MOE_FP8_FOLD_SHARED``; not with
        FP8 training: its routed experts use master weights), else None."""
        default = eager and xq.is_cuda and xq.shape[0] < kFoldSharedMaxTokens
        if self.fp8_training or not switch_on(kFoldSharedEnv, default):
            return None
        return self.folded_weights()

    @property
    def num_experts_local(self) -> int:
        return self.dispatcher.num_experts_local

    @property
    def expert_offset(self) -> int:
        return self.dispatcher.expert_offset

    @property
    def device(self) -> torch.device:
        return self.gate.weight.device

    def load_safetensors(self, files, prefix: str = "") -> "MoE":
        """Load weights from safetensors ``files`` (paths, or a directory), keys ``prefix + name``:
        DeepSeek-V3 FP8 per-expert names, transformers v5 fused names, or bf16 (quantised here).
        See ``moe_fp8.layers.checkpoint``."""
        from .checkpoint import load_moe_weights, SafetensorsSource
        with SafetensorsSource(files) as source:
            load_moe_weights(self, source, prefix)
        return self

    @classmethod
    def from_hf(cls, module, *, device=None, dtype: torch.dtype = torch.bfloat16, **cfg_changes) -> "MoE":
        """Build from one transformers ``DeepseekV3MoE`` (weights copied and quantised)."""
        from .checkpoint import moe_from_hf
        return moe_from_hf(cls, module, device=device, dtype=dtype, **cfg_changes)

    # ------------------------------------------------------------------ forward
    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., H]`` -> ``[T, H]`` contiguous, in x's own float dtype (the router reads it in
        fp32 and the quantiser accepts bf16/fp16/fp32, so no rounding to bf16 happens first)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise TypeError(f"x must be bf16, fp16 or fp32, got {x.dtype}")
        if x.dim() < 1 or x.shape[-1] != self.cfg.hidden_size:
            raise ValueError(f"x must be [..., {self.cfg.hidden_size}], got {tuple(x.shape)}")
        if x.device != self.device:
            raise ValueError(f"x is on {x.device} but the layer is on {self.device}")
        return x.reshape(-1, x.shape[-1]).contiguous()

    # ------------------------------------------------------------------ training
    def enable_fp8_training(self, master_dtype: torch.dtype = torch.float32) -> "MoE":
        """Train the routed experts in FP8 (DeepSeek-V3 style): master Parameters
        ``experts.w13_master [E_loc, 2I, H]`` / ``experts.w2_master [E_loc, H, I]`` start from the
        dequantised FP8 weights; ``forward`` then runs ``experts_forward_fp8`` (FP8 forward and
        backward, copies cached per parameter version). The router weight trains through the
        combine; the shared experts stay frozen FP8. Call ``sync_fp8_weights`` after optimizer
        steps before using ``decode_runner`` (it reads the FP8 buffers)."""
        from .autograd import Fp8WeightCache
        if self._expert_parallel:
            raise NotImplementedError(kNoEpBackward)
        if master_dtype not in (torch.float32, torch.bfloat16):
            raise TypeError(f"master_dtype must be torch.float32 or torch.bfloat16, got {master_dtype}")
        w13, w2 = self.experts.dequantized()
        self.experts.w13_master = nn.Parameter(w13.to(master_dtype))
        self.experts.w2_master = nn.Parameter(w2.to(master_dtype))
        self.experts.fp8_cache = Fp8WeightCache()
        return self

    @property
    def fp8_training(self) -> bool:
        return hasattr(self.experts, "w13_master")

    @torch.no_grad()
    def sync_fp8_weights(self) -> None:
        """Re-quantise the master weights into the FP8 buffers the inference paths read."""
        from .experts import quantize_stack
        if not self.fp8_training:
            raise RuntimeError("sync_fp8_weights needs enable_fp8_training() first")
        self.experts.load_fp8(*quantize_stack(self.experts.w13_master, self.cfg.pow2_scale),
                              *quantize_stack(self.experts.w2_master, self.cfg.pow2_scale))

    def _routed_rows(self, x2: torch.Tensor, layout, handle, folded=None) -> torch.Tensor:
        """The routed experts over the contiguous layout -> ``y_rows [M_sum, H]``; ``folded``:
        ``folded_weights()`` where the layout carries the shared expert too (inference only)."""
        if not self.fp8_training:
            return self.experts.forward_contiguous(layout, folded)
        from .autograd import experts_forward_fp8, rows_of_tokens
        # the experts read the fp8 layout; x_rows carries the gradient back to the tokens
        x_rows = rows_of_tokens(x2, handle.combine.slot_row, handle.pair_kept, layout.num_rows)
        return experts_forward_fp8(x_rows, layout.m_indices, self.experts.w13_master,
                                   self.experts.w2_master, self.experts.fp8_cache,
                                   x_fp8=(layout.a, layout.sa), pow2_scale=self.cfg.pow2_scale)

    # ------------------------------------------------------------------ forward
    def _overlap_shared(self, xq: torch.Tensor) -> bool:
        """Run the shared experts on a side stream? With ``MOE_FP8_OVERLAP_SHARED=1`` (off by
        default until measured on a GPU), for CUDA inference outside ``torch.compile``. Inside a
        CUDA-graph capture (the decode runner) the fork and join become two parallel branches
        of the graph."""
        return (self.shared_experts is not None and xq.is_cuda and not torch.is_grad_enabled()
                and switch_on(kOverlapSharedEnv, kOverlapSharedDefault)
                and not torch.compiler.is_compiling())

    def _start_shared(self, xq: torch.Tensor, xs: torch.Tensor, num_sms: Optional[int] = None):
        """-> ``(shared [T, H] or None, side stream or None)``. NOTE: the shared experts do not
        depend on the routing, so on the GPU they run on a side stream while the main stream
        routes, builds the layout and (prefill) reads ``M_sum`` back — the host-bound part of the
        prefill where the GPU otherwise idles between small kernels, and the chain of small
        kernels of the decode graph; the main stream waits for the side stream before the
        combine. Tensors cross streams only at the fork (xq, xs: made before it) and the join
        (the result: recorded on the main stream)."""
        if self.shared_experts is None:
            return None, None
        if not self._overlap_shared(xq):
            return self.shared_experts(xq, xs, num_sms), None
        main = torch.cuda.current_stream(xq.device)
        side = _side_stream(kSharedStreams, xq.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            shared = self.shared_experts(xq, xs, num_sms)
        if not torch.cuda.is_current_stream_capturing():  # a graph's pool outlives its replays
            xq.record_stream(side)
            xs.record_stream(side)
        return shared, side

    @staticmethod
    def _decode_shared_sms(xq: torch.Tensor) -> Optional[int]:
        """The SM budget of the shared experts in the masked (decode) step, None for all."""
        reserve = int_setting(kDecodeRouterSmsEnv, kDecodeRouterSmsDefault)
        if not reserve or not xq.is_cuda:
            return None
        return max(1, H.num_sms(xq.device.index if xq.device.index is not None
                                           else torch.cuda.current_device()) - reserve)

    def _join_shared_early(self, shared: Optional[torch.Tensor], side):
        """``(shared, side)`` joined now where ``MOE_FP8_SHARED_BEFORE_ROUTED`` asks (then
        ``side`` is None and the later join is a no-op), else unchanged."""
        if side is None or not switch_on(kSharedBeforeRoutedEnv, kSharedBeforeRoutedDefault):
            return shared, side
        return self._join_shared(shared, side), None

    @staticmethod
    def _join_shared(shared: Optional[torch.Tensor], side) -> Optional[torch.Tensor]:
        if side is not None:
            main = torch.cuda.current_stream(shared.device)
            main.wait_stream(side)
            if not torch.cuda.is_current_stream_capturing():
                shared.record_stream(main)
        return shared

    @property
    def _expert_parallel(self) -> bool:
        return not isinstance(self.dispatcher, LocalDispatcher)

    def _check_differentiable(self, x: torch.Tensor) -> None:
        """The exchanges of an expert-parallel layer carry no autograd graph (the all-to-alls
        move bytes): with gradients wanted, the output would silently have none (or a residual
        would carry only its own). Raise instead."""
        if self._expert_parallel and torch.is_grad_enabled() and (
                x.requires_grad or any(p.requires_grad for p in self.parameters())):
            raise NotImplementedError(kNoEpBackward)

    def attach_graph_runner(self, runner) -> None:
        """Let ``forward`` replay ``runner`` (one of this layer's ``decode_runner``s) for batches
        it holds: inference (no grad), x of the layer's dtype on its device, at most
        ``runner.max_tokens`` tokens, not while compiling or capturing. Such a batch then costs
        one graph replay and a copy of its output instead of the eager path's host time
        (H100, 2026-12-07: 256 tokens 570 us replayed against 1440 us eager). The masked layout's
        bits differ from the contiguous path's (within 2e-4, the GPU tests' bound), and
        ``last_tokens_per_expert`` is not filled by a replay. ``None`` detaches. Not for an
        expert-parallel layer: every rank would have to take the same path."""
        if runner is not None:
            from .decode import DecodeRunner
            if not isinstance(runner, DecodeRunner):
                raise TypeError(f"runner must be a DecodeRunner or None, got {type(runner).__name__}")
            if runner.moe is not self:
                raise ValueError("runner must be one of this layer's decode runners")
            if self._expert_parallel:
                raise ValueError("attach_graph_runner needs a one-GPU layer: the ranks of an expert-"
                                 "parallel layer must all replay or all run eagerly; call the "
                                 "runner directly")
        self._graph_runner = runner

    def _replays(self, runner, x2: torch.Tensor) -> bool:
        return (not torch.compiler.is_compiling() and not torch.is_grad_enabled()
                and 0 < x2.shape[0] <= runner.max_tokens
                and x2.dtype == runner.x.dtype and x2.device == runner.x.device
                and not (x2.is_cuda and torch.cuda.is_current_stream_capturing()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., H]`` -> ``[..., H]`` (x's dtype), contiguous layout (or an attached graph
        runner's replay: ``attach_graph_runner``)."""
        x2 = self._tokens(x)
        runner = self._graph_runner
        if runner is not None and self._replays(runner, x2):
            return runner(x2).clone().view(x.shape)
        self._check_differentiable(x2)
        xq, xs = quantize_tokens(x2, self.cfg.pow2_scale)
        folded = self._fold_shared(xq)
        shared, side = (None, None) if folded else self._start_shared(xq, xs)  # side stream
        routing = self.gate(x2, counts_out=self.last_tokens_per_expert)
        fold = {"shared_expert": True} if folded else {}  # only a LocalDispatcher folds
        layout, handle = self.dispatcher.dispatch_contiguous(
            (xq, xs), routing.topk_idx, routing.topk_weights, **fold)
        shared, side = self._join_shared_early(shared, side)
        y_rows = self._routed_rows(x2, layout, handle, folded)  # [M_sum, H]
        shared = self._join_shared(shared, side)
        y = self.dispatcher.combine_contiguous(y_rows, handle, add=shared)  # [T, H]
        return y.view(x.shape).to(x.dtype)

    @torch.no_grad()
    def forward_contiguous_static(self, x: torch.Tensor, *, num_valid_tokens: torch.Tensor,
                                  out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x [T, H]`` -> ``[T, H]`` through the contiguous layout with every shape fixed by T:
        the layout sized by its upper bound (``T k + E_loc x 127`` rows, padding the GEMMs skip),
        so nothing syncs and the step can be captured in a CUDA graph (the graph runner's
        prefill-sized batches). Tokens at or past ``num_valid_tokens`` (an int64 device scalar)
        are routed nowhere; the combine kernel leaves their output rows as they were (the CPU
        path writes them: nobody reads them). Inference only: the
        experts' FP8 buffers are read (as the masked path does), ``last_tokens_per_expert`` is
        not filled. One-GPU layers only (an expert-parallel layer's layout size is the
        exchange's)."""
        x2 = self._tokens(x)
        if self._expert_parallel:
            raise ValueError("forward_contiguous_static needs a one-GPU layer (LocalDispatcher)")
        if not (isinstance(num_valid_tokens, torch.Tensor) and num_valid_tokens.dim() == 0
                and num_valid_tokens.dtype == torch.int64 and num_valid_tokens.device == x2.device):
            raise ValueError(f"num_valid_tokens must be an int64 scalar tensor on {x2.device}")
        if out is not None and (not isinstance(out, torch.Tensor) or out.dtype != self.dtype
                                or tuple(out.shape) != tuple(x2.shape) or out.device != x2.device):
            raise ValueError(f"out must be {self.dtype} {tuple(x2.shape)} on {x2.device}")
        xq, xs = quantize_tokens(x2, self.cfg.pow2_scale)
        folded = self._fold_shared(xq, eager=False)
        shared, side = None, None
        if not folded:
            # as in the decode step, SMs left to the router branch: in a graph the shared gate-up
            # otherwise takes every SM and the routed chain waits (session 33, H100, 1024 tokens:
            # the fused SwiGLU started 177 us after the x-quant)
            shared, side = self._start_shared(xq, xs, self._decode_shared_sms(xq))
        routing = self.gate(x2)
        layout, handle = self.dispatcher.dispatch_contiguous(
            (xq, xs), routing.topk_idx, routing.topk_weights, num_valid_tokens=num_valid_tokens,
            shared_expert=folded is not None)  # a LocalDispatcher (checked above)
        shared, side = self._join_shared_early(shared, side)
        y_rows = self.experts.forward_contiguous(layout, folded)  # [rows bound, H]
        shared = self._join_shared(shared, side)
        return self.dispatcher.combine_contiguous(y_rows, handle, add=shared, out=out)

    def forward_masked(self, x: torch.Tensor, *, max_tokens_per_expert: Optional[int] = None,
                       num_valid_tokens=None, buffers: Optional[MaskedBuffers] = None,
                       workspace: Optional[MaskedWorkspace] = None,
                       out: Optional[torch.Tensor] = None,
                       x_fp8: Optional[tuple] = None) -> torch.Tensor:
        """``x [T, H]`` -> ``[T, H]`` through the masked layout (the decode step). With the static
        arguments (what ``decode_runner`` passes) it neither syncs nor allocates by value.
        ``x_fp8``: x already quantised 1x128 (fp8 ``[T, H]``, fp32 ``[T, H/128]``), used instead
        of quantising it here."""
        x2 = self._tokens(x)
        self._check_differentiable(x2)
        m_max = max_tokens_per_expert or self.dispatcher.max_tokens_per_expert(x2.shape[0])
        if x_fp8 is None:
            xq, xs = quantize_tokens(x2, self.cfg.pow2_scale)
        else:
            xq, xs = self._check_x_fp8(x2, x_fp8)
        shared, side = self._start_shared(xq, xs, self._decode_shared_sms(xq))  # graph branch
        layout, handle = self.dispatcher.dispatch_masked_routed(
            (xq, xs), self.gate, self.gate.logits(x2), max_tokens_per_expert=m_max,
            num_valid_tokens=num_valid_tokens, out=buffers)
        if value_checks_enabled(layout.num_overflow) and int(layout.num_overflow):
            raise ValueError(f"{int(layout.num_overflow)} (token, expert) pairs exceed "
                             f"max_tokens_per_expert={m_max}: raise it (T tokens need at most T)")
        y_rows = self.experts.forward_masked(layout, workspace)  # [E_loc, M_max, H]
        shared = self._join_shared(shared, side)
        return self.dispatcher.combine_masked(y_rows, handle, add=shared, out=out)

    def _check_x_fp8(self, x2: torch.Tensor, x_fp8) -> tuple:
        """``x_fp8 = (fp8 [T, H], fp32 [T, H/128])``: x2 already quantised 1x128; its shapes and
        dtypes checked."""
        if not isinstance(x_fp8, (tuple, list)) or len(x_fp8) != 2:
            raise TypeError(f"x_fp8 must be a pair (fp8 values, fp32 scales), got {type(x_fp8).__name__}")
        q, s = x_fp8
        groups = x2.shape[1] // 128
        if (not isinstance(q, torch.Tensor) or q.dtype != torch.float8_e4m3fn
                or tuple(q.shape) != tuple(x2.shape)):
            raise ValueError(f"x_fp8[0] must be float8_e4m3fn of x's shape {tuple(x2.shape)}")
        if (not isinstance(s, torch.Tensor) or s.dtype != torch.float32
                or tuple(s.shape) != (x2.shape[0], groups)):
            raise ValueError(f"x_fp8[1] must be float32 of shape {(x2.shape[0], groups)}")
        if q.device != x2.device or s.device != x2.device:
            raise ValueError(f"x_fp8 must be on x's device {x2.device}, got {q.device} / {s.device}")
        return q, s

    def decode_runner(self, max_tokens: int, *, use_graph: Optional[bool] = None,
                      batch_sizes=None, share_buffers_with=None):
        """A callable ``run(x [n, H]) -> [n, H]`` for any ``n <= max_tokens``: one CUDA-graph
        replay on a GPU (eager on CPU), the graph of the smallest of ``batch_sizes`` (default:
        powers of two, and ``max_tokens``) that holds n. ``share_buffers_with``: another layer's
        runner of the same shapes, whose step buffers this one reuses (a model's layers run one
        at a time). See ``moe_fp8.layers.decode.DecodeRunner``."""
        from .decode import DecodeRunner
        return DecodeRunner(self, max_tokens, use_graph=use_graph, batch_sizes=batch_sizes,
                            share_buffers_with=share_buffers_with)

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"hidden={c.hidden_size}, inter={c.moe_intermediate_size}, experts={c.num_experts} "
                f"(local {self.num_experts_local} from {self.expert_offset}), top_k={c.top_k}, "
                f"groups={c.n_group}/{c.topk_group}, shared={c.n_shared_experts}")
