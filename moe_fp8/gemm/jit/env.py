"""Environment switches and paths of the JIT (every variable starts with ``MOE_FP8_``)."""
from __future__ import annotations

import contextlib
import contextvars
import os
import sys
from pathlib import Path
from typing import Optional

kIncludeDir = Path(__file__).resolve().parent.parent / "include"  # moe_fp8/gemm/include

# NOTE: os.environ.get of an unset name raises and catches a KeyError inside (2.3 us on the CPU
# machine), and the eager layer reads ~45 switches per forward. ``lookup`` reads the same backing
# dict that os.environ's setters and deleters keep (so monkeypatched and exported values are
# seen alike) without the exception: 0.2 us.
_environ_data = getattr(os.environ, "_data", None)
_encoded_names: dict = {}


def lookup(name: str, default: Optional[str] = None) -> Optional[str]:
    """``os.environ.get(name, default)``, without the exception cost of an unset name."""
    if _environ_data is None:  # an interpreter whose os.environ has no backing dict
        return os.environ.get(name, default)
    key = _encoded_names.get(name)
    if key is None:
        key = _encoded_names[name] = os.environ.encodekey(name)
    value = _environ_data.get(key)
    return default if value is None else os.environ.decodevalue(value)


kCompilerPaths = ("nvrtc", "nvrtc-ptxas", "nvcc")  # fastest first


def cuda_home() -> Path:
    """``MOE_FP8_CUDA_HOME``, else ``CUDA_HOME``, else ``/usr/local/cuda``."""
    for name in ("MOE_FP8_CUDA_HOME", "CUDA_HOME"):
        value = lookup(name)
        if value:
            return Path(value)
    return Path("/usr/local/cuda")


def include_dirs() -> list[Path]:
    return [kIncludeDir, cuda_home() / "include"]


def cache_root() -> Path:
    """``MOE_FP8_CACHE_DIR``, else ``$XDG_CACHE_HOME/moe_fp8`` (``~/.cache/moe_fp8``)."""
    value = lookup("MOE_FP8_CACHE_DIR")
    if value:
        return Path(value).expanduser()
    xdg = lookup("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "moe_fp8"


def forced_compiler() -> str | None:
    """``MOE_FP8_COMPILER`` (one of ``kCompilerPaths``) or None."""
    value = lookup("MOE_FP8_COMPILER", "").strip()
    if not value:
        return None
    if value not in kCompilerPaths:
        raise ValueError(f"MOE_FP8_COMPILER must be one of {kCompilerPaths}, got {value!r}")
    return value


def verbose() -> bool:
    return lookup("MOE_FP8_JIT_VERBOSE", "0") not in ("", "0")


def lineinfo() -> bool:
    """``MOE_FP8_JIT_LINEINFO=1`` adds ``-lineinfo`` (source lines in ncu / sanitizer reports)."""
    return lookup("MOE_FP8_JIT_LINEINFO", "0") not in ("", "0")


_pdl_scope: contextvars.ContextVar = contextvars.ContextVar("moe_fp8_pdl_scope", default=None)


def pdl() -> bool:
    """``MOE_FP8_PDL=1``: launch the bundled kernels with programmatic dependent launch (each may
    start while the previous kernel of its stream finishes; include/pdl.cuh). Off by default
    (measured, H100 2026-12-05: decode graph 1 token 1.08x, 32 / 128 tokens 1.00x, eager prefill
    0.92x). Inside ``pdl_scope(flag)`` the flag decides instead (the decode runner's capture)."""
    scoped = _pdl_scope.get()
    if scoped is not None:
        return scoped
    return lookup("MOE_FP8_PDL", "0") not in ("", "0")


@contextlib.contextmanager
def pdl_scope(flag: Optional[bool]):
    """Launches inside the block use PDL iff ``flag`` (None: the environment decides)."""
    token = _pdl_scope.set(flag)
    try:
        yield
    finally:
        _pdl_scope.reset(token)


def _switch(name: str, default: bool) -> bool:
    """A heuristics switch: ``0`` off, any other value on, unset ``default``."""
    value = lookup(name)
    return default if value is None else value.strip() != "0"


def wide_tiles(default: bool) -> bool:
    """``MOE_FP8_WIDE_TILES``: ``1`` lets the heuristics pick 128 x 256 tiles (with multicast) for
    large M (heuristics.py), ``0`` keeps them to 128 x 128 and narrower; unset: ``default``."""
    return _switch("MOE_FP8_WIDE_TILES", default)


def contiguous_multicast(default: bool) -> bool:
    """``MOE_FP8_CONTIGUOUS_MULTICAST``: ``1`` gives the contiguous layout's 128 x 256 tiles B
    multicast over 2-CTA clusters (heuristics.contiguous_config; on by default), ``0`` none;
    unset: ``default``."""
    return _switch("MOE_FP8_CONTIGUOUS_MULTICAST", default)


def swiglu_deep_ring(default: bool) -> bool:
    """``MOE_FP8_SWIGLU_DEEP_RING``: ``1`` gives the fused SwiGLU GEMMs the ring depth that fits
    without an output tile (their epilogue writes from registers: 4 stages at 128 rows, 5 at 64,
    K = 7168), ``0`` the depth they had beside an unused bf16 staging tile (3 / 4); unset:
    ``default``."""
    return _switch("MOE_FP8_SWIGLU_DEEP_RING", default)


def swap_ab_swiglu(default: bool) -> bool:
    """``MOE_FP8_SWAP_AB_SWIGLU``: ``1`` runs the masked fused SwiGLU GEMM as its swap-AB twin
    (tokens on the wgmma N side; heuristics.kSwapAbSwigluDefault), ``0`` never."""
    return _switch("MOE_FP8_SWAP_AB_SWIGLU", default)


def swap_ab_96(default: bool) -> bool:
    """``MOE_FP8_SWAP_AB_96``: ``1`` gives the swap-AB down GEMM 96-token tiles where the masked
    layout's spread fits them (heuristics.as_swap_ab; heuristics.kSwapAb96Default), ``0`` the
    masked config's 64 / 128; unset: ``default``."""
    return _switch("MOE_FP8_SWAP_AB_96", default)


def masked_row_chunks(default: bool) -> bool:
    """``MOE_FP8_MASKED_ROW_CHUNKS``: ``1`` lets the masked GEMM load A only in the 16 / 32-row
    chunks below each expert's masked_m (heuristics.masked_config), ``0`` whole tiles; unset:
    ``default``."""
    return _switch("MOE_FP8_MASKED_ROW_CHUNKS", default)


def masked_spread(default: float) -> float:
    """``MOE_FP8_MASKED_SPREAD``: the standard deviations above an expert's mean row count that
    the masked layout's block_m must hold (heuristics.masked_config; an A/B knob: 0 sizes the
    tiles for the mean); unset: ``default``. A negative or non-numeric value raises."""
    value = lookup("MOE_FP8_MASKED_SPREAD", "").strip()
    if not value:
        return default
    try:
        spread = float(value)
    except ValueError:
        raise ValueError(f"MOE_FP8_MASKED_SPREAD must be a number, got {value!r}") from None
    if not spread >= 0:
        raise ValueError(f"MOE_FP8_MASKED_SPREAD must be >= 0, got {value!r}")
    return spread


def masked_silu_variant() -> Optional[str]:
    """``MOE_FP8_MASKED_SILU``: ``oneshot`` or ``stream`` pins the masked SiLU-mul kernel where the
    caller did not (an A/B knob for decode); unset or empty: the ``expected_m`` rule."""
    value = lookup("MOE_FP8_MASKED_SILU", "").strip()
    return value or None


def log(message: str) -> None:
    if verbose():
        print(f"[moe_fp8.jit] {message}", file=sys.stderr, flush=True)
