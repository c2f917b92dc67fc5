"""Kernel host files, one per kernel family (same stem as its ``include/*.cuh``).

Each takes validated tensors and pre-allocated outputs, picks the compile-time configuration,
builds the JIT ``KernelSource`` and launches it; each registers its bundled variants with
``moe_fp8.gemm.jit.register_bundled`` so that ``precompile()`` builds them.
"""
