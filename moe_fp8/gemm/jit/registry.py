"""The list of bundled kernel variants that ``precompile()`` builds (CI, container images)."""
from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Iterable

_providers: list[Callable[[], Iterable]] = []


def register_bundled(provider: Callable[[], Iterable]) -> Callable:
    """Register ``provider() -> iterable of KernelSource`` (usable as a decorator).

    Kernel host files (``moe_fp8.gemm.kernels.*``) call this at import time.
    """
    if provider not in _providers:
        _providers.append(provider)
    return provider


def _import_kernel_modules() -> None:
    """Import every ``moe_fp8.gemm.kernels.*`` module so that its providers register."""
    package = importlib.import_module("moe_fp8.gemm.kernels")
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"moe_fp8.gemm.kernels.{module.name}")


def bundled_sources() -> list:
    """Every registered KernelSource, deduplicated, in registration order."""
    _import_kernel_modules()
    seen, sources = set(), []
    for provider in _providers:
        for src in provider():
            if src not in seen:
                seen.add(src)
                sources.append(src)
    return sources
