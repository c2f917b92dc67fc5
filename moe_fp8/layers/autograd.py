"""Training path of the routed experts: FP8 forward and backward over the contiguous layout.

One call, ``experts_forward_fp8(x_rows, m_indices, w13, w2, weight_cache)``, is a
``torch.autograd.Function`` that trains the experts the way DeepSeek-V3 did (fine-grained FP8,
fp32 master weights, bf16 activation gradients). Rows are the contiguous layout's rows
(``moe_fp8.gemm.layout``): ``m_indices[r]`` is row r's local expert, -1 for padding; every
expert's segment is padded to a multiple of 128 rows and segments come in expert order.

Forward (per row r of expert e = m_indices[r]; "q(.)" = FP8 quantisation, its scale granularity after):

    xq     = q(x_rows)                     1x128 (per row per 128 channels of H)
    h      = xq . q(W13[e])^T              GEMM1, 128x128 weight blocks   -> bf16 [M_sum, 2I]  (saved)
    act    = q(silu(h[:, :I]) * h[:, I:])  fused SiLU-mul + 1x128 quant  -> fp8 [M_sum, I]
    y      = act . q(W2[e])^T              GEMM2                          -> bf16 [M_sum, H]

Backward (dY = dL/dy, padding rows zeroed; W^T copies are the forward's FP8 blocks transposed):

    dA     = q(dY) . q(W2[e]^T)^T          dgrad of GEMM2 (dY . W2[e])    -> [M_sum, I]
    dH     = SiLU-mul backward(dA, h)      one fused op with the three quantisations it feeds:
                                           q(dH), q_t(dH), q_t(act')      (fp32 inside)
    dX     = q(dH) . q(W13[e]^T)^T         dgrad of GEMM1 (dH . W13[e])   -> [M_sum, H]
    dW2[e] = q_t(dY)^T . q_t(act')         k-grouped over e's tokens      -> fp32 [E, H, I]
    dW13[e]= q_t(dH)^T . q_t(x')           k-grouped                      -> fp32 [E, 2I, H]

``q_t`` quantises 1x128 *along tokens* (the transposed, token-contiguous tensor, one scale per
channel per 128 tokens; ``G.transpose_token_group_quant_fp8``, one pass); ``act'`` is recomputed from the saved h in fp32 (the DeepSeek-V3 report
caches the SwiGLU input and recomputes its output in backward), ``x'`` is the saved FP8 x
dequantised, transposed and re-quantised along tokens (the report's hardware suggestions describe
exactly this round trip for the backward pass).

Saved for backward: xq (fp8 [M_sum, H] + 1x128 scales), h (bf16 [M_sum, 2I]), m_indices, and the
FP8 weight copies (owned by the cache). The FP8 weight copies and their transposes live in a
``Fp8WeightCache`` keyed on the parameters' ``_version``: made once per optimizer step, copy and
transpose in one pass (``G.per_block_quant_transpose_fp8``) when a gradient will be needed.

The backward's quantisations (and the transposed weight copies) come from fused ops that read
each tensor once (``G.silu_and_mul_backward_quant_fp8``, ``G.transpose_token_group_quant_fp8``,
``G.transpose_token_group_requant_fp8``, ``G.per_block_quant_transpose_fp8``) or, bit for bit the
same, from the measured ops composed (transposed copies + the row quantiser, SiLU backward in
torch): ``MOE_FP8_FUSED_TRAIN`` (``fused_train_enabled``) picks; on CUDA the composition stays the
default until the fused kernels have run on a GPU.

``reference=True`` runs the same structure (same saved tensors, same backward formulas, same
offsets, same padding handling) with every quantise+GEMM replaced by an exact matmul in the
inputs' dtype, so float64 inputs pass ``torch.autograd.gradcheck``; sizes then need no 128-alignment.

The router's weight gets its gradient through the top-k weights of the combine (plain torch
autograd outside this function); the correction bias is updated from token counts by
``Router.update_bias`` (moe_fp8/layers/router.py, DeepSeek-V3's aux-loss-free rule).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .. import gemm as G
from ..gemm import validate as check
from ..gemm.reference import dequant_rows, silu_mul_backward
from .switches import switch_on

Fp8Pair = Tuple[torch.Tensor, torch.Tensor]
FP8 = torch.float8_e4m3fn
kBlock = 128  # scale granularity (1x128 activations, 128x128 weights) and segment alignment
kMasterDtypes = (torch.bfloat16, torch.float16, torch.float32, torch.float64)

__all__ = ["experts_forward_fp8", "experts_forward_torch", "expert_offsets", "Fp8WeightCache",
           "Fp8ExpertWeights", "fused_train_enabled", "kFusedTrainEnv", "rows_of_tokens"]

kFusedTrainEnv = "MOE_FP8_FUSED_TRAIN"
# The weight gradients written by the k-grouped GEMM with accumulate=False (no zeroing pass, no read
# of D) instead of accumulated into torch.zeros. On: H100, 2026-12-05, the same gradients, train
# step 11.37 -> 10.81 ms (8 experts x 4096 tokens; results/train_overwrite_h100_2026-12-05.md).
kWgradOverwriteEnv = "MOE_FP8_WGRAD_OVERWRITE"
kWgradOverwriteDefault = True
# The four grouped GEMMs of a step (h, y, d_act, dx) write their padding rows as zeros
# (``zero_padding``) into torch.empty instead of leaving them in torch.zeros: no 1.3 GB of
# memsets at 8 experts x 4096 tokens. On: H100, 2026-12-05, train step 11.26 -> 10.75 ms, forward
# 2877 -> 2634 us (bench_train; results/verify_h100_2026-12-05_s7.md).
kZeroPadEnv = "MOE_FP8_ZERO_PAD_GEMM"
kZeroPadDefault = True


def fused_train_enabled(t: torch.Tensor) -> bool:
    """Whether the training path uses the fused quantisation ops (``G.per_block_quant_transpose_fp8``,
    ``G.transpose_token_group_quant_fp8`` / ``_requant_fp8``, ``G.silu_and_mul_backward_quant_fp8``)
    for tensors like ``t``, or composes the same math from the measured ops (transposed copies +
    ``per_token_group_quant_fp8``, the SiLU backward in torch) — the same bytes either way.

    ``MOE_FP8_FUSED_TRAIN=1`` / ``0`` forces it; unset: on. The fused kernels are bit-exact
    against their references on an H100 (tests/test_train_quant_gpu.py, 2026-12-05) and made the
    train step 2.2x faster there (benchmarks/bench_train.py: 25.4 -> 11.4 ms, 8 experts x 4096
    tokens; 1.36x the bf16 layer).
    """
    return switch_on(kFusedTrainEnv, default=True)


# ----------------------------------------------------------------------------- layout helpers

def expert_offsets(m_indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Token offsets of the experts' segments: int32 ``[E + 1]``, expert e owns rows ``[o[e], o[e+1])``.

    ``m_indices`` int32 ``[M_sum]`` with experts in non-decreasing order along rows (-1 padding
    anywhere). A padding row belongs to the segment before it (leading padding to expert 0), so
    for the 128-aligned layout every offset is a multiple of 128. No host sync.
    """
    owner = torch.cummax(m_indices.long(), dim=0).values.clamp_min(0)  # [M_sum] int64
    counts = torch.zeros(num_experts, dtype=torch.int64, device=m_indices.device)
    counts.scatter_add_(0, owner, torch.ones_like(owner))  # [E] rows per segment (padding included)
    return torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]).to(torch.int32)


def _check_sorted(m_indices: torch.Tensor) -> None:
    """Segments must come in expert order (the k-grouped GEMM takes one offset range per expert).
    Reads values: always on CPU, on GPU only with MOE_FP8_CHECKS=1 (no host sync on the hot path)."""
    if not check.value_checks_enabled(m_indices) or m_indices.numel() == 0:
        return
    ids = m_indices[m_indices >= 0].cpu()
    if bool((ids[1:] < ids[:-1]).any()):
        raise ValueError("m_indices must list the experts' segments in non-decreasing expert order "
                         "(the weight-gradient GEMM reads one token range per expert)")


def _transpose_fp8_blocks(pair: Fp8Pair) -> Fp8Pair:
    """128x128-block-quantised ``[E, N, K]`` -> the same blocks transposed, ``[E, K, N]``.

    Bit-identical to ``per_block_quant_fp8(w.transpose(1, 2))`` when N and K are multiples of 128
    (the same 128x128 blocks, hence the same amax and scale).
    """
    # NOTE: only for entries built without their transposes (an inference forward at the same
    # weight version); training builds both in one pass (Fp8ExpertWeights.build).
    q, s = pair
    return q.transpose(1, 2).contiguous(), s.transpose(1, 2).contiguous()


# ----------------------------------------------------------------------------- weight cache

@dataclass
class Fp8ExpertWeights:
    """FP8 copies of one expert stack, made from the master weights at one version.

    ``w13``: (fp8 ``[E, 2I, H]``, fp32 ``[E, 2I/128, H/128]``) 128x128 blocks (forward, GEMM1).
    ``w2``:  (fp8 ``[E, H, I]``,  fp32 ``[E, H/128, I/128]``)  (forward, GEMM2).
    ``w13_t()``: (fp8 ``[E, H, 2I]``, fp32 ``[E, H/128, 2I/128]``) for dX = dH . W13[e];
    ``w2_t()``:  (fp8 ``[E, I, H]``,  fp32 ``[E, I/128, H/128]``) for dA = dY . W2[e]; built with
    the copies in one pass when ``transposed`` (training), else made on first use from the FP8
    copies (bit-identical), and kept with the copy.
    """
    w13: Fp8Pair
    w2: Fp8Pair
    _w13_t: Optional[Fp8Pair] = field(default=None, repr=False)
    _w2_t: Optional[Fp8Pair] = field(default=None, repr=False)

    @classmethod
    def build(cls, w13: torch.Tensor, w2: torch.Tensor, pow2_scale: bool = False,
              transposed: bool = False) -> "Fp8ExpertWeights":
        with torch.no_grad():
            if transposed:
                w13_pair, w13_t = G.per_block_quant_transpose_fp8(
                    w13.detach().contiguous(), kBlock, pow2_scale=pow2_scale)
                w2_pair, w2_t = G.per_block_quant_transpose_fp8(
                    w2.detach().contiguous(), kBlock, pow2_scale=pow2_scale)
                return cls(w13_pair, w2_pair, w13_t, w2_t)
            return cls(G.per_block_quant_fp8(w13.detach().contiguous(), kBlock, pow2_scale=pow2_scale),
                       G.per_block_quant_fp8(w2.detach().contiguous(), kBlock, pow2_scale=pow2_scale))

    @property
    def has_transposes(self) -> bool:
        return self._w13_t is not None and self._w2_t is not None

    def w13_t(self) -> Fp8Pair:
        if self._w13_t is None:
            self._w13_t = _transpose_fp8_blocks(self.w13)
        return self._w13_t

    def w2_t(self) -> Fp8Pair:
        if self._w2_t is None:
            self._w2_t = _transpose_fp8_blocks(self.w2)
        return self._w2_t


def _version_key(w: torch.Tensor):
    return (w.data_ptr(), w._version, tuple(w.shape), w.stride(), w.dtype, w.device)


class Fp8WeightCache:
    """FP8 copies (and transposed copies) of one layer's master expert weights.

    ``get(w13, w2)`` returns the cached ``Fp8ExpertWeights`` while both parameters are the same
    tensors at the same ``_version`` (every in-place update — ``optimizer.step()``, ``copy_``
    under ``no_grad`` — bumps it), and rebuilds them otherwise: one quantisation per optimizer
    step however many micro-batches run. Holds one entry; one cache per layer. ``builds`` counts
    rebuilds (tests, logging). ``transposed=True`` (a forward that will run backward) asks for the
    transposed copies too, made in the same pass as the copies. Entries are never mutated once handed out, so a backward that
    runs after the weights changed still sees the copies its forward used.
    """

    def __init__(self) -> None:
        self._refs = None  # (weakref w13, weakref w2)
        self._key = None
        self._entry: Optional[Fp8ExpertWeights] = None
        self.builds = 0

    def get(self, w13: torch.Tensor, w2: torch.Tensor, pow2_scale: bool = False,
            transposed: bool = False) -> Fp8ExpertWeights:
        key = (_version_key(w13), _version_key(w2), pow2_scale)
        same = (self._refs is not None and self._refs[0]() is w13 and self._refs[1]() is w2
                and self._key == key)
        if same and transposed and not self._entry.has_transposes:
            same = False  # built for inference at this version: rebuild with the transposes
        if not same:
            self._entry = Fp8ExpertWeights.build(w13, w2, pow2_scale, transposed)
            self._refs = (weakref.ref(w13), weakref.ref(w2))
            self._key = key
            self.builds += 1
        return self._entry

    def clear(self) -> None:
        self._refs = self._key = self._entry = None


# ----------------------------------------------------------------------------- the two maths

class _Fp8Math:
    """Quantise + FP8 GEMM through the public ops (kernels on Hopper, references elsewhere)."""
    exact = False

    def __init__(self, weights: Fp8ExpertWeights, pow2_scale: bool):
        self.weights, self.pow2_scale = weights, pow2_scale

    def rows(self, t: torch.Tensor):
        """``t [R, K]`` -> operand quantised 1x128 along K: (fp8 [R, K], fp32 [R, K/128] MN-major)."""
        return G.per_token_group_quant_fp8(t.contiguous(), kBlock, pow2_scale=self.pow2_scale)

    def cols(self, t: torch.Tensor, m_indices: Optional[torch.Tensor] = None):
        """``t [T, C]`` -> operand quantised 1x128 along tokens, transposed in the same pass:
        (fp8 [C, T], fp32 [C, T/128] MN-major), the weight-gradient GEMM's layout; rows with
        ``m_indices == -1`` read as zero."""
        return G.transpose_token_group_quant_fp8(t.contiguous(), kBlock, m_indices=m_indices,
                                                 pow2_scale=self.pow2_scale)

    def cols_from_rows(self, operand, m_indices: torch.Tensor):
        """A saved row operand (fp8 [T, C] + 1x128 scales) -> its dequantised values, padding rows
        zero, re-quantised along tokens: ``cols(x')`` in one pass (no fp32 copy of x')."""
        return G.transpose_token_group_requant_fp8(tuple(operand), m_indices=m_indices,
                                                   pow2_scale=self.pow2_scale)

    def silu_mul(self, h: torch.Tensor):
        """``h [M_sum, 2I]`` -> q(silu(gate) * up) fp8 [M_sum, I] + 1x128 scales, one fused op."""
        return G.silu_and_mul_quant_fp8(h, pow2_scale=self.pow2_scale)

    def silu_mul_backward(self, d_act: torch.Tensor, h: torch.Tensor):
        """``d_act [M_sum, I]``, ``h [M_sum, 2I]`` -> (q(dH) rows, q_t(dH) cols, q_t(act) cols),
        one fused op (dH and act formed in fp32, never stored)."""
        return G.silu_and_mul_backward_quant_fp8(d_act.to(torch.bfloat16), h,
                                                 pow2_scale=self.pow2_scale)

    def weight(self, name: str) -> Fp8Pair:
        w = self.weights  # NOTE: only the one asked for (the transposes may not exist yet)
        return {"w13": lambda: w.w13, "w2": lambda: w.w2, "w13_t": w.w13_t, "w2_t": w.w2_t}[name]()

    def grouped(self, a, name: str, m_indices: torch.Tensor) -> torch.Tensor:
        """``a [M_sum, K]`` operand . weight[e]^T -> bf16 ``[M_sum, N]``; padding rows are 0."""
        b = self.weight(name)
        zero_padding = switch_on(kZeroPadEnv, kZeroPadDefault)  # the GEMM writes their zeros
        out = (torch.empty if zero_padding else torch.zeros)(
            m_indices.shape[0], b[0].shape[1], dtype=torch.bfloat16, device=b[0].device)
        return G.m_grouped_fp8_gemm_nt_contiguous(a, b, m_indices, out=out,
                                                  zero_padding=zero_padding)

    def wgrad(self, a_t, b_t, offsets: torch.Tensor, num_experts: int,
              dtype: torch.dtype) -> torch.Tensor:
        """``out[e] = a[seg_e]^T . b[seg_e]``: ``[E, N, K]`` of the master weight's ``dtype`` from
        the along-token operands ``a_t = cols(a [T, N])`` and ``b_t = cols(b [T, K])`` (padding
        rows already zero). bf16 masters take the GEMM's bf16 output (the fp32 sum rounded once:
        no fp32 buffer, no conversion pass); others its fp32 output, converted."""
        # overwrite: every expert's block is written (zeros where it has no tokens), no zeroing
        overwrite = switch_on(kWgradOverwriteEnv, kWgradOverwriteDefault)
        bf16 = overwrite and dtype == torch.bfloat16  # (K = H or I: 128-aligned, _validate)
        out = (torch.empty if overwrite else torch.zeros)(
            num_experts, a_t[0].shape[0], b_t[0].shape[0],
            dtype=torch.bfloat16 if bf16 else torch.float32, device=a_t[0].device)
        return G.k_grouped_fp8_gemm_tn_contiguous(a_t, b_t, offsets, out,
                                                  accumulate=not overwrite).to(dtype)


class _Fp8ComposedMath(_Fp8Math):
    """The backward's quantisations composed from the measured ops (``fused_train_enabled`` off):
    transposed copies + the row quantiser, the SiLU backward in torch (fp32), x' dequantised and
    masked in torch. Bit-identical results to ``_Fp8Math`` (tests/test_autograd.py)."""

    def cols(self, t: torch.Tensor, m_indices: Optional[torch.Tensor] = None):
        if m_indices is not None:
            t = t.masked_fill((m_indices < 0).unsqueeze(1), 0)
        return self.rows(t.t())

    def cols_from_rows(self, operand, m_indices: torch.Tensor):
        x_val = dequant_rows(*operand).masked_fill((m_indices < 0).unsqueeze(1), 0)  # fp32 [T, C]
        return self.rows(x_val.t())

    def silu_mul_backward(self, d_act: torch.Tensor, h: torch.Tensor):
        dh, act = silu_mul_backward(d_act, h)  # fp32 [M, 2I], [M, I]
        return self.rows(dh), self.rows(dh.t()), self.rows(act.t())


class _ExactMath:
    """The same steps without quantisation, in the inputs' dtype (reference mode, gradcheck)."""
    exact = True

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor):
        self.w = {"w13": w13, "w2": w2, "w13_t": w13.transpose(1, 2), "w2_t": w2.transpose(1, 2)}

    def rows(self, t):
        return t

    def cols(self, t, m_indices=None):
        return t if m_indices is None else t.masked_fill((m_indices < 0).unsqueeze(1), 0)

    def cols_from_rows(self, operand, m_indices):
        return operand.masked_fill((m_indices < 0).unsqueeze(1), 0)

    def silu_mul(self, h):
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up

    def silu_mul_backward(self, d_act, h):
        dh, act = silu_mul_backward(d_act, h)
        return dh, dh, act

    def grouped(self, a, name, m_indices):
        b = self.w[name]  # [E, N, K]
        out = a.new_zeros(a.shape[0], b.shape[1])
        for e in torch.unique(m_indices).tolist():
            if e >= 0:
                rows = (m_indices == e).nonzero().squeeze(1)
                out[rows] = a[rows] @ b[e].t()
        return out

    def wgrad(self, a_rows, b_rows, offsets, num_experts, dtype):
        out = a_rows.new_zeros(num_experts, a_rows.shape[1], b_rows.shape[1])
        bounds = offsets.tolist()
        for e in range(num_experts):
            t0, t1 = bounds[e], bounds[e + 1]
            out[e] = a_rows[t0:t1].t() @ b_rows[t0:t1]
        return out.to(dtype)


# ----------------------------------------------------------------------------- autograd.Function

class _ExpertsFunction(torch.autograd.Function):
    """Inputs: x_rows [M_sum, H], m_indices int32 [M_sum], w13 [E, 2I, H], w2 [E, H, I], cache,
    reference, pow2_scale, x_fp8 (None or the rows pre-quantised), needs_backward (build the
    transposed weight copies with the copies). Output y_rows [M_sum, H]
    (bf16; x's dtype in reference mode)."""

    @staticmethod
    def forward(ctx, x_rows, m_indices, w13, w2, cache, reference, pow2_scale, x_fp8,
                needs_backward):
        if reference:
            math = _ExactMath(w13.detach(), w2.detach())
        else:
            fused = fused_train_enabled(x_rows)
            # a backward will need the transposed copies: with the fused ops, made in the same pass
            weights = (cache or Fp8WeightCache()).get(w13, w2, pow2_scale, needs_backward and fused)
            math = (_Fp8Math if fused else _Fp8ComposedMath)(weights, pow2_scale)
        # fp8 [M_sum, H] + 1x128 scales (exact: x itself); the dispatcher's payload when given
        x_op = tuple(x_fp8) if x_fp8 is not None else math.rows(x_rows.detach())
        h = math.grouped(x_op, "w13", m_indices)  # [M_sum, 2I] bf16, padding rows 0
        act = math.silu_mul(h)  # fp8 [M_sum, I] + 1x128 scales
        y = math.grouped(act, "w2", m_indices)  # [M_sum, H] bf16, padding rows 0
        ctx.math = math
        ctx.num_experts = w13.shape[0]
        ctx.x_dtype, ctx.w13_dtype, ctx.w2_dtype = x_rows.dtype, w13.dtype, w2.dtype
        x_saved = (x_op,) if reference else tuple(x_op)  # (values, scales) in fp8 mode
        ctx.num_x_saved = len(x_saved)
        ctx.save_for_backward(*x_saved, h, m_indices)
        return y

    @staticmethod
    def backward(ctx, dy):
        *x_saved, h, m_indices = ctx.saved_tensors
        x_op = x_saved[0] if ctx.num_x_saved == 1 else tuple(x_saved)
        math = ctx.math
        need_x, need_w13, need_w2 = ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        dx = dw13 = dw2 = None
        # NOTE: padding rows (m_indices -1) take and give no gradient: the grouped GEMMs skip
        # them, the along-token quantisations read them as zero (no masked copy of dY)
        num_experts = ctx.num_experts
        offsets = None
        if need_w13 or need_w2:
            offsets = expert_offsets(m_indices, num_experts)  # int32 [E + 1]

        d_act = math.grouped(math.rows(dy), "w2_t", m_indices)  # [M_sum, I] = dY . W2[e]
        # dH along channels (dX), along tokens (dW13), act along tokens (dW2): one fused op
        dh_rows, dh_cols, act_cols = math.silu_mul_backward(d_act, h)
        if need_w2:
            dy_cols = math.cols(dy, m_indices)  # dY^T along tokens, padding rows zero
            dw2 = math.wgrad(dy_cols, act_cols, offsets, num_experts, ctx.w2_dtype)  # [E, H, I]
        if need_x:
            dx = math.grouped(dh_rows, "w13_t", m_indices).to(ctx.x_dtype)  # [M_sum, H]
        if need_w13:
            # x' along tokens: the saved operand dequantised, padding rows zero (keeps the
            # along-token scales tight), transposed and re-quantised in one pass
            x_cols = math.cols_from_rows(x_op, m_indices)
            dw13 = math.wgrad(dh_cols, x_cols, offsets, num_experts, ctx.w13_dtype)  # [E, 2I, H]
        return dx, None, dw13, dw2, None, None, None, None, None


def _validate(x_rows, m_indices, w13, w2, reference: bool) -> None:
    align = 1 if reference else kBlock
    dtypes = kMasterDtypes if reference else check.kFloatInputs
    check.tensor("x_rows", x_rows, dtypes=dtypes, dims=(2,), contiguous=False)
    check.tensor("w13", w13, dtypes=kMasterDtypes, dims=(3,), contiguous=False)
    check.tensor("w2", w2, dtypes=kMasterDtypes, dims=(3,), contiguous=False)
    rows, hidden = x_rows.shape
    experts, two_inter, _ = w13.shape
    inter = two_inter // 2
    check.int32_vector("m_indices", m_indices, rows)
    check.multiple_of("M_sum (x_rows.shape[0])", rows, align)
    check.multiple_of("H (x_rows.shape[1])", hidden, align)
    check.multiple_of("2I (w13.shape[1])", two_inter, 2 * align)
    check.shape("w13", w13, (experts, two_inter, hidden))
    check.shape("w2", w2, (experts, hidden, inter))
    check.same_device(x_rows=x_rows, m_indices=m_indices, w13=w13, w2=w2)
    if check.value_checks_enabled(m_indices) and m_indices.numel():
        bad = (m_indices < -1) | (m_indices >= experts)
        if bool(bad.any()):
            raise ValueError(f"m_indices must hold -1 or 0..{experts - 1} (w13 has {experts} experts)")
    _check_sorted(m_indices)


class _RowsOfTokens(torch.autograd.Function):
    """x ``[T, H]`` -> a zero stand-in ``[M_sum, H]`` for the layout's rows of x; the backward sums
    each token's row gradients in fp32, in slot order (``unpermute_combine``: the combine kernel
    on Hopper), one rounding — deterministic, where a differentiable ``index_select`` would
    scatter-add in x's dtype with atomics, and without gathering the bf16 rows in the forward."""

    @staticmethod
    def forward(ctx, x, slot_row, pair_kept, num_rows):
        ctx.save_for_backward(slot_row, pair_kept)
        ctx.x_dtype = x.dtype
        return x.new_zeros(1, x.shape[1]).expand(num_rows, x.shape[1])

    @staticmethod
    def backward(ctx, grad_rows):
        from .layouts import CombineIndex
        from .permute import unpermute_combine
        slot_row, pair_kept = ctx.saved_tensors
        out = torch.empty(slot_row.shape[0], grad_rows.shape[1], dtype=ctx.x_dtype,
                          device=grad_rows.device)
        index = CombineIndex(slot_row, pair_kept.to(torch.float32))
        return unpermute_combine(grad_rows.contiguous(), index, out=out), None, None, None


def rows_of_tokens(x: torch.Tensor, slot_row: torch.Tensor, pair_kept: torch.Tensor,
                   num_rows: int) -> torch.Tensor:
    """The layout's rows of ``x [T, H]`` for ``experts_forward_fp8`` when the experts read the
    quantised layout (``x_fp8``): a zero-filled stand-in ``[M_sum, H]`` whose gradient reaches x
    summed per token (``slot_row [T, k]`` int64: the row of pair (t, j); ``pair_kept [T, k]``:
    whether it has one)."""
    return _RowsOfTokens.apply(x, slot_row, pair_kept, num_rows)


def experts_forward_fp8(x_rows: torch.Tensor, m_indices: torch.Tensor, w13: torch.Tensor,
                        w2: torch.Tensor, weight_cache: Optional[Fp8WeightCache] = None, *,
                        x_fp8: Optional[Fp8Pair] = None, reference: bool = False,
                        pow2_scale: bool = False) -> torch.Tensor:
    """The routed experts over the contiguous layout, differentiable, FP8 forward and backward.

    Args:
        x_rows: bf16 ``[M_sum, H]`` (fp16/fp32 accepted): the permuted tokens (row r goes to
            expert ``m_indices[r]``); padding rows may hold anything.
        m_indices: int32 ``[M_sum]``: local expert of each row, -1 for padding; segments of
            128-row multiples in non-decreasing expert order (``contiguous_index`` builds these).
        w13: master weights ``[E, 2I, H]`` (rows ``[gate; up]``), bf16 or fp32, usually a Parameter.
        w2: master weights ``[E, H, I]``.
        weight_cache: an ``Fp8WeightCache`` owned by the layer: FP8 copies (128x128 blocks) made
            once per parameter version. ``None`` quantises the weights on every call.
        x_fp8: optionally x_rows already quantised 1x128 (fp8 ``[M_sum, H]``, fp32 ``[M_sum, H/128]``),
            e.g. the dispatcher's payload ``(layout.a, layout.sa)``: skips quantising x_rows
            (bit-identical when it is ``q(x_rows)``); x_rows still receives the gradient.
        reference: run the same structure without quantisation in the inputs' dtype (tests,
            ``gradcheck`` in float64); sizes need not be multiples of 128 then.
        pow2_scale: power-of-two scales for every quantisation (UE8M0, DeepSeek-V3.1 style).

    Returns:
        ``y_rows [M_sum, H]`` bf16 (x's dtype in reference mode); padding rows are 0.
        Gradients: x_rows (bf16, padding rows 0), w13 and w2 (in the masters' dtype, from fp32
        accumulation); m_indices none.
    """
    _validate(x_rows, m_indices, w13, w2, reference)
    if weight_cache is not None and not isinstance(weight_cache, Fp8WeightCache):
        raise TypeError(f"weight_cache must be an Fp8WeightCache or None, got {type(weight_cache).__name__}")
    if x_fp8 is not None:
        if reference:
            raise ValueError("x_fp8 has no meaning with reference=True (nothing is quantised)")
        xq, xs = check.fp8_pair("x_fp8", x_fp8, dims=(2,))
        check.shape("x_fp8[0]", xq, x_rows.shape)
        check.act_scales("x_fp8[1]", xs, x_rows.shape[:1], x_rows.shape[1])
        check.same_device(x_rows=x_rows, **{"x_fp8[0]": xq, "x_fp8[1]": xs})
    # NOTE: grad mode is off inside Function.forward and needs_input_grad ignores it: decide here
    # whether a backward can follow (the weight cache then makes the transposed copies too)
    needs_backward = torch.is_grad_enabled() and any(t.requires_grad for t in (x_rows, w13, w2))
    return _ExpertsFunction.apply(x_rows, m_indices, w13, w2, weight_cache, bool(reference),
                                  bool(pow2_scale), x_fp8, needs_backward)


# ----------------------------------------------------------------------------- unquantised peer

def experts_forward_torch(x_rows: torch.Tensor, m_indices: torch.Tensor, w13: torch.Tensor,
                          w2: torch.Tensor, *, grouped_mm: Optional[bool] = None) -> torch.Tensor:
    """The same experts unquantised, in x's dtype, with plain torch autograd (the bf16 peer and
    the tests' oracle). ``[M_sum, H]`` -> ``[M_sum, H]``, padding rows 0 and without gradient.

    ``grouped_mm`` uses ``torch._grouped_mm`` (bf16 on sm_90; default: when x is on CUDA), else
    one matmul per expert segment (reads the offsets on the host).
    """
    num_experts = w13.shape[0]
    pad = (m_indices < 0).unsqueeze(1)  # [M_sum, 1]
    x = x_rows.masked_fill(pad, 0)  # zero padding rows: they add nothing to any weight gradient
    w13, w2 = w13.to(x.dtype), w2.to(x.dtype)
    offsets = expert_offsets(m_indices, num_experts)  # int32 [E + 1]
    if grouped_mm is None:
        grouped_mm = x.is_cuda
    if grouped_mm:
        ends = offsets[1:]  # int32 [E]: segment ends, what _grouped_mm reads
        h = torch._grouped_mm(x, w13.transpose(-2, -1), offs=ends)  # [M_sum, 2I]
        gate, up = h.chunk(2, dim=-1)
        return torch._grouped_mm(F.silu(gate) * up, w2.transpose(-2, -1), offs=ends)  # [M_sum, H]
    bounds = offsets.tolist()
    parts = []
    for e in range(num_experts):
        xe = x[bounds[e]:bounds[e + 1]]  # [m_e, H]
        gate, up = (xe @ w13[e].t()).chunk(2, dim=-1)  # [m_e, I] each
        parts.append((F.silu(gate) * up) @ w2[e].t())  # [m_e, H]
    y = torch.cat(parts) if parts else x[:0]
    return y.masked_fill(pad, 0)
