"""Compile kernels ahead of time, so that serving and CUDA-graph capture never compile.

``precompile()`` builds every bundled variant (what the kernel host files register) for sm_90a;
no GPU is needed. ``python -m moe_fp8.gemm.precompile`` does the same and exits non-zero on any
compile error, any kernel that uses local memory (register spills or a stack frame), or one whose
wgmma ptxas serialised (C7514/C7518) — the CI step.
A second run is all cache hits. ``--manifest FILE`` compiles the kernels a run recorded instead
(``jit/manifest.py``: what a test suite or benchmark compiled, for a fresh machine).
"""
from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Iterable, Optional

from .jit import CompiledKernel, KernelSource, bundled_sources, compile_kernel


class PrecompileError(RuntimeError):
    """Some kernels failed to compile or spill; ``results`` holds what did compile."""

    def __init__(self, message: str, results: list):
        super().__init__(message)
        self.results = results


def _progress(done: int, total: int, name: str) -> None:
    """A one-line bar on a terminal; one line per kernel in logs (CI)."""
    if not sys.stderr.isatty():
        print(f"[{done}/{total}] {name}", file=sys.stderr, flush=True)
        return
    width = 24
    filled = width * done // max(total, 1)
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {name[:70]:70s}")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def precompile(configs: Optional[Iterable[KernelSource]] = None, *, verbose: bool = True,
               workers: Optional[int] = None) -> list[CompiledKernel]:
    """Compile ``configs`` (default: every bundled variant), a few at a time.

    Returns the CompiledKernels in input order. Raises PrecompileError when a kernel fails to
    compile or its ptxas report shows local memory (spills or stack).
    """
    sources = list(bundled_sources() if configs is None else configs)
    workers = workers or min(8, os.cpu_count() or 1, max(len(sources), 1))
    results: list = [None] * len(sources)
    failures = []
    start = time.perf_counter()
    # NOTE: threads suffice: nvcc/ptxas run as subprocesses and NVRTC releases the GIL
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(compile_kernel, src): index for index, src in enumerate(sources)}
        for count, future in enumerate(as_completed(futures), 1):
            index = futures[future]
            try:
                results[index] = future.result()
            except Exception as error:  # report every failure, not only the first
                failures.append(f"{sources[index].instance}: {error}")
            if verbose:
                _progress(count, len(sources), sources[index].name)
    compiled = [r for r in results if r is not None]
    spilling = [c for c in compiled if c.report.uses_local_memory]
    failures += [f"{c.source.instance}: uses local memory ({c.report})" for c in spilling]
    failures += [f"{c.source.instance}: ptxas serialised its wgmma ({c.report})"
                 for c in compiled if c.report.wgmma_serialized]
    if verbose:
        hits = sum(c.cache_hit for c in compiled)
        for c in compiled:
            print(f"  {c.source.name:90s} {c.report.registers:4d} regs  "
                  f"{c.report.spill_stores + c.report.spill_loads:4d} B spill  "
                  f"{c.report.stack_bytes:4d} B stack  {c.compile_seconds:6.2f} s"
                  f"{'  (cached)' if c.cache_hit else ''}  [{c.compiler}]", file=sys.stderr)
        print(f"moe_fp8.precompile: {len(compiled)}/{len(sources)} kernels ready ({hits} cached) "
              f"in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    if failures:
        raise PrecompileError(f"{len(failures)} kernel(s) failed:\n" + "\n".join(failures),
                              compiled)
    return results


def main(argv: Optional[list] = None) -> int:
    import argparse
    from .jit import manifest
    parser = argparse.ArgumentParser(prog="python -m moe_fp8.gemm.precompile",
                                     description="Compile kernels ahead of time (no GPU needed).")
    parser.add_argument("--manifest", action="append", default=[], metavar="FILE",
                        help="compile the kernels a run recorded (MOE_FP8_JIT_MANIFEST) instead "
                             "of the bundled variants; repeatable")
    parser.add_argument("--workers", type=int, default=None, help="parallel compiles (default: "
                        "up to 8)")
    args = parser.parse_args(argv)
    sources = None
    if args.manifest:
        sources = list(dict.fromkeys(src for path in args.manifest for src in manifest.read(path)))
    try:
        precompile(sources, workers=args.workers)
    except PrecompileError as error:
        print(f"moe_fp8.precompile: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
