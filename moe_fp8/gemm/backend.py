"""Backend choice (kernel or reference) and the ops' bodies, registered as torch custom ops.

Each body takes validated inputs and pre-allocated outputs, writes the outputs and returns
nothing. Eagerly the public ops call the bodies directly (no dispatcher overhead on the launch
path); under ``torch.compile`` they call the registered ``torch.ops.moe_fp8.*`` ops instead, whose
fake implementations only declare the mutation, so the layer traces without graph breaks.
"""
from __future__ import annotations

import contextvars
import functools
import importlib
import warnings
from typing import Optional

import torch

from . import reference as ref
from .jit.env import lookup
from .layout import to_mn_major

kBackends = ("auto", "kernel", "reference")
# a GEMM configuration pinned by the caller (tests), read by the GEMM bodies
_pinned_config: contextvars.ContextVar = contextvars.ContextVar("moe_fp8_gemm_config", default=None)


@functools.lru_cache(maxsize=None)
def _is_hopper(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) == (9, 0)


@functools.lru_cache(maxsize=None)
def _warn_missing_kernel(family: str, why: str) -> None:
    warnings.warn(f"moe_fp8: kernel family '{family}' unavailable ({why}); using the reference")


@functools.lru_cache(maxsize=None)
def _warn_unsupported_dtype(name: str, dtype: torch.dtype) -> None:
    warnings.warn(f"moe_fp8: the {name} kernel takes no {dtype} input; using the reference")


@functools.lru_cache(maxsize=None)
def _kernel_fn(family: str, name: str, dtype: Optional[torch.dtype], forced: bool):
    """The kernel host function ``moe_fp8.gemm.kernels.<family>.<name>`` for an input of
    ``dtype``, or None (absent, or not instantiated for that dtype: the module's
    ``kSupportedInputs`` says which). Memoised: it runs on every op call."""
    try:
        module = importlib.import_module(f"moe_fp8.gemm.kernels.{family}")
    except ImportError as error:
        _warn_missing_kernel(family, repr(error))
        return None
    supported = getattr(module, "kSupportedInputs", {}).get(name)
    if dtype is not None and supported is not None and dtype not in supported:
        if forced:
            raise TypeError(f"the {name} kernel takes inputs of dtype {supported}, got {dtype}")
        _warn_unsupported_dtype(name, dtype)
        return None
    return getattr(module, name, None)


def check_backend(backend: str) -> str:
    if backend not in kBackends:
        raise ValueError(f"backend must be one of {kBackends}, got {backend!r}")
    if backend == "auto":
        backend = lookup("MOE_FP8_BACKEND", "auto") or "auto"
        if backend not in kBackends:
            raise ValueError(f"MOE_FP8_BACKEND must be one of {kBackends}, got {backend!r}")
    return backend


def pick(backend: str, device: torch.device, family: str, name: str,
         dtype: Optional[torch.dtype] = None):
    """The kernel function to run for ``backend`` on ``device`` (input ``dtype``), or None for
    the reference."""
    backend = check_backend(backend)
    if backend == "reference":
        return None
    on_hopper = device.type == "cuda" and _is_hopper(
        device.index if device.index is not None else torch.cuda.current_device())
    if backend == "kernel":
        if not on_hopper:
            raise ValueError(f"backend='kernel' needs tensors on an sm_90 GPU, got device {device}")
        fn = _kernel_fn(family, name, dtype, forced=True)
        if fn is None:
            raise NotImplementedError(f"no kernel for {family}.{name} in this build")
        return fn
    if on_hopper and family in kUnverifiedFamilies and lookup(kUnverifiedEnv) != "1":
        return None  # auto: the reference until the kernel has run on a GPU (see below)
    return _kernel_fn(family, name, dtype, forced=False) if on_hopper else None


# Kernel families built and tested on the CPU (g++ emulation, bit-exact) but never yet run on a
# GPU: backend="auto" keeps their references until a GPU run has measured them
# (MOE_FP8_UNVERIFIED_KERNELS=1 opts in; backend="kernel" always runs them). Empty this set once
# tests/test_train_quant_gpu.py has passed on a Hopper GPU.
kUnverifiedFamilies: frozenset = frozenset()  # transpose_quant, silu_backward: bit-exact on an H100, 2026-12-05
kUnverifiedEnv = "MOE_FP8_UNVERIFIED_KERNELS"


# ----------------------------------------------------------------------------- op bodies

def _quant(name: str, reference, x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, size: int,
           pow2_scale: bool, backend: str) -> None:
    kernel = pick(backend, x.device, "quant", name, x.dtype)
    if kernel is not None:
        kernel(x, q, s, size, pow2_scale)
        return
    rq, rs = reference(x, size, pow2_scale)
    q.copy_(rq)
    s.copy_(rs)


def per_token_group_quant(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, group_size: int,
                          pow2_scale: bool, backend: str) -> None:
    _quant("per_token_group_quant", ref.per_token_group_quant, x, q, s, group_size, pow2_scale,
           backend)


def per_block_quant(w: torch.Tensor, q: torch.Tensor, s: torch.Tensor, block_size: int,
                    pow2_scale: bool, backend: str) -> None:
    _quant("per_block_quant", ref.per_block_quant, w, q, s, block_size, pow2_scale, backend)


def silu_and_mul_quant(h: torch.Tensor, q: torch.Tensor, s: torch.Tensor,
                       masked_m: Optional[torch.Tensor], group_size: int, pow2_scale: bool,
                       backend: str, expected_m: Optional[int] = None) -> None:
    kernel = pick(backend, h.device, "quant", "silu_and_mul_quant", h.dtype)
    if kernel is not None:
        kernel(h, q, s, masked_m, group_size, pow2_scale, expected_m=expected_m)
        return
    rq, rs = ref.silu_and_mul_quant(h, group_size, pow2_scale)
    if masked_m is None:
        q.copy_(rq)
        s.copy_(rs)
    else:
        rows = ref.masked_row_mask(h.shape[1], masked_m)
        q[rows] = rq[rows]
        s[rows] = rs[rows]


def per_block_quant_transpose(w: torch.Tensor, q: torch.Tensor, s: torch.Tensor,
                              q_t: torch.Tensor, s_t: torch.Tensor, block_size: int,
                              pow2_scale: bool, backend: str) -> None:
    kernel = pick(backend, w.device, "transpose_quant", "per_block_quant_transpose", w.dtype)
    if kernel is not None:
        kernel(w, q, s, q_t, s_t, block_size, pow2_scale)
        return
    (rq, rs), (rq_t, rs_t) = ref.per_block_quant_transpose(w, block_size, pow2_scale)
    for dst, src in ((q, rq), (s, rs), (q_t, rq_t), (s_t, rs_t)):
        dst.copy_(src)


def transpose_token_group_quant(x: torch.Tensor, m_indices: Optional[torch.Tensor],
                                q: torch.Tensor, s: torch.Tensor, group_size: int,
                                pow2_scale: bool, backend: str) -> None:
    kernel = pick(backend, x.device, "transpose_quant", "token_transpose_quant", x.dtype)
    if kernel is not None:
        kernel(x, q, s, group_size, pow2_scale, m_indices)
        return
    rq, rs = ref.transpose_token_group_quant(x, group_size, pow2_scale, m_indices)
    q.copy_(rq)
    s.copy_(rs)


def transpose_token_group_requant(qa: torch.Tensor, sa: torch.Tensor,
                                  m_indices: Optional[torch.Tensor], q: torch.Tensor,
                                  s: torch.Tensor, group_size: int, pow2_scale: bool,
                                  backend: str) -> None:
    kernel = pick(backend, qa.device, "transpose_quant", "token_transpose_requant", qa.dtype)
    if kernel is not None:
        kernel(qa, sa, m_indices, q, s, group_size, pow2_scale)
        return
    rq, rs = ref.transpose_token_group_requant(qa, sa, m_indices, group_size, pow2_scale)
    q.copy_(rq)
    s.copy_(rs)


def silu_and_mul_backward_quant(d_act: torch.Tensor, h: torch.Tensor, dh: torch.Tensor,
                                dh_s: torch.Tensor, dh_t: torch.Tensor, dh_t_s: torch.Tensor,
                                act_t: torch.Tensor, act_t_s: torch.Tensor, group_size: int,
                                pow2_scale: bool, backend: str) -> None:
    # the kernel reads both inputs as bf16: a pair with any other dtype in it takes the reference
    # (asked for by the dtype that is not bf16; a mixed pair once picked the kernel, which then
    # read an fp32 h as bf16)
    dtype = d_act.dtype if d_act.dtype != torch.bfloat16 else h.dtype
    kernel = pick(backend, h.device, "silu_backward", "silu_and_mul_backward_quant", dtype)
    if kernel is not None:
        kernel(d_act, h, dh, dh_s, dh_t, dh_t_s, act_t, act_t_s, group_size, pow2_scale)
        return
    outputs = ref.silu_and_mul_backward_quant(d_act, h, group_size, pow2_scale)
    for (q, s), (rq, rs) in zip(((dh, dh_s), (dh_t, dh_t_s), (act_t, act_t_s)), outputs):
        q.copy_(rq)
        s.copy_(rs)


def fp8_gemm_nt(qa: torch.Tensor, sa: torch.Tensor, qb: torch.Tensor, sb: torch.Tensor,
                out: torch.Tensor, backend: str) -> None:
    kernel = pick(backend, qa.device, "fp8_gemm", "fp8_gemm_nt")
    if kernel is not None:
        kernel(qa, to_mn_major(sa), qb, sb, out, config=_pinned_config.get())
    else:
        ref.fp8_gemm_nt(qa, sa, qb, sb, out)


def m_grouped_contiguous_offsets(qa: torch.Tensor, sa: torch.Tensor, qb: torch.Tensor,
                                 sb: torch.Tensor, offsets: torch.Tensor, out: torch.Tensor,
                                 backend: str, tile_counter: Optional[torch.Tensor] = None) -> None:
    kernel = pick(backend, qa.device, "fp8_gemm", "m_grouped_contiguous_offsets")
    if kernel is not None:
        kernel(qa, to_mn_major(sa), qb, sb, offsets, out, config=_pinned_config.get(),
               tile_counter=tile_counter)
    else:
        ref.m_grouped_contiguous_offsets(qa, sa, qb, sb, offsets, out)


def m_grouped_contiguous(qa: torch.Tensor, sa: torch.Tensor, qb: torch.Tensor, sb: torch.Tensor,
                         m_indices: torch.Tensor, out: torch.Tensor, backend: str,
                         zero_padding: bool = False,
                         tile_counter: Optional[torch.Tensor] = None) -> None:
    # tile_counter: the kernel's dynamic tiles (left at zero); the reference ignores it
    kernel = pick(backend, qa.device, "fp8_gemm", "m_grouped_contiguous")
    if kernel is not None:
        kernel(qa, to_mn_major(sa), qb, sb, m_indices, out, config=_pinned_config.get(),
               zero_padding=zero_padding, tile_counter=tile_counter)
    else:
        ref.m_grouped_contiguous(qa, sa, qb, sb, m_indices, out, zero_padding=zero_padding)


def m_grouped_masked(qa: torch.Tensor, sa: torch.Tensor, qb: torch.Tensor, sb: torch.Tensor,
                     masked_m: torch.Tensor, expected_m: int, out: torch.Tensor,
                     backend: str) -> None:
    kernel = pick(backend, qa.device, "fp8_gemm", "m_grouped_masked")
    if kernel is not None:
        kernel(qa, to_mn_major(sa), qb, sb, masked_m, expected_m, out, config=_pinned_config.get())
    else:
        ref.m_grouped_masked(qa, sa, qb, sb, masked_m, out)


def k_grouped_tn(qa: torch.Tensor, sa: torch.Tensor, qb: torch.Tensor, sb: torch.Tensor,
                 offsets: torch.Tensor, out: torch.Tensor, backend: str,
                 accumulate: bool = True) -> None:
    kernel = pick(backend, qa.device, "wgrad", "k_grouped_tn")
    if kernel is not None:
        kernel(qa, to_mn_major(sa), qb, to_mn_major(sb), offsets, out, accumulate=accumulate)
    else:
        ref.k_grouped_tn(qa, sa, qb, sb, offsets, out, accumulate=accumulate)


# ----------------------------------------------------------------------------- custom ops

_MUTATED = {
    "per_token_group_quant": ("q", "s"),
    "per_block_quant": ("q", "s"),
    "silu_and_mul_quant": ("q", "s"),
    "per_block_quant_transpose": ("q", "s", "q_t", "s_t"),
    "transpose_token_group_quant": ("q", "s"),
    "transpose_token_group_requant": ("q", "s"),
    "silu_and_mul_backward_quant": ("dh", "dh_s", "dh_t", "dh_t_s", "act_t", "act_t_s"),
    "fp8_gemm_nt": ("out",),
    "m_grouped_contiguous": ("out", "tile_counter"),
    "m_grouped_contiguous_offsets": ("out", "tile_counter"),
    "m_grouped_masked": ("out",),
    "k_grouped_tn": ("out",),
}


def _register():
    ops = {}
    for name, mutated in _MUTATED.items():
        op = torch.library.custom_op(f"moe_fp8::{name}", mutates_args=mutated)(globals()[name])
        op.register_fake(lambda *args, **kwargs: None)
        ops[name] = op
    return ops


_OPS = _register()
_BODIES = {name: globals()[name] for name in _MUTATED}


def run(name: str, *args, config=None) -> None:
    """Run op ``name``: eagerly the body itself, under torch.compile the registered custom op.

    ``config`` pins a GEMM kernel configuration (tests); it travels in a context variable
    because the custom-op schema has no place for it.
    """
    if torch.compiler.is_compiling():
        if config is not None:
            raise ValueError("config cannot be pinned under torch.compile")
        _OPS[name](*args)
        return
    # NOTE: the ops are not differentiable (training composes them in layers/autograd.py);
    # no_grad keeps a requires-grad input from attaching history to the outputs it fills.
    # (both only where needed: this runs on every op call, and each costs a few us of host time)
    token = _pinned_config.set(config) if config is not None or _pinned_config.get() is not None \
        else None
    try:
        if torch.is_grad_enabled():
            with torch.no_grad():
                _BODIES[name](*args)
        else:
            _BODIES[name](*args)
    finally:
        if token is not None:
            _pinned_config.reset(token)
