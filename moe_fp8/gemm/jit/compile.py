"""``compile_kernel``: KernelSource -> cached sm_90a cubin + its kernel symbol and ptxas report."""
from __future__ import annotations

import dataclasses
import hashlib
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import cache, compilers, elf, env, manifest
from .report import ResourceReport, parse_ptxas_log
from .source import KernelSource, translation_unit

kKeyVersion = "moe_fp8-jit-1"  # bump when the entry format or the TU generator changes


@dataclass(frozen=True)
class CompiledKernel:
    """A compiled kernel (no GPU involved). ``cubin_path`` stays valid while the cache entry does
    (None when it could not be stored)."""
    source: KernelSource
    key: str
    cubin: bytes
    cubin_path: Optional[Path]
    symbol: str  # mangled name of the single __global__ entry point
    report: ResourceReport
    compile_seconds: float  # of the original compile (also reported on cache hits)
    compiler: str  # the compile path: "nvcc" | "nvrtc-ptxas" | "nvrtc"
    cache_hit: bool

    @property
    def registers(self) -> int:
        return self.report.registers

    @property
    def spill_bytes(self) -> int:
        return max(self.report.spill_stores, 0) + max(self.report.spill_loads, 0)


def include_digest(root=None) -> str:
    """sha256 over the headers a kernel can include (names and contents): every file under
    moe_fp8/gemm/include, or the ``.cuh``/``.h`` files directly in ``root``."""
    files = (env.kIncludeDir.rglob("*") if root is None else
             [p for p in root.iterdir() if p.suffix in (".cuh", ".h")])
    root = env.kIncludeDir if root is None else root
    digest = hashlib.sha256()
    for path in sorted(p for p in files if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def cache_key(src: KernelSource, path: str, identity: str) -> str:
    tu = translation_unit(src)
    extra = compilers.ptxas_flags() if path == "nvrtc-ptxas" else []
    # An absolute header (tests, experiments) hashes its whole folder: a copy of the include tree
    # that differs only in a header it includes must not hit another copy's cache entry.
    header = env.kIncludeDir / src.header
    outside = "" if header.parent == env.kIncludeDir else include_digest(header.parent)
    parts = [kKeyVersion, include_digest(), outside, tu, src.instance, path, identity,
             *compilers.flags(path), *extra]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _from_entry(src, key, cubin, meta, cubin_path, hit) -> CompiledKernel:
    return CompiledKernel(source=src, key=key, cubin=cubin, cubin_path=cubin_path,
                          symbol=meta["symbol"], report=ResourceReport(**meta["report"]),
                          compile_seconds=meta["compile_seconds"], compiler=meta["compiler"],
                          cache_hit=hit)


def compile_kernel(src: KernelSource) -> CompiledKernel:
    """Compile ``src`` for sm_90a (or read it from the disk cache). Needs no GPU.

    Raises ``CompileError`` (with the compiler log) when the source does not compile.
    """
    from .probe import select_path  # NOTE: lazy, so `python -m ...jit.probe` runs cleanly

    manifest.record(src)
    path, identity = select_path()
    key = cache_key(src, path, identity)
    entry = cache.load(key)
    if entry is None:
        with cache.compile_lock(key):
            entry = cache.load(key)  # another process may have finished it while we waited
            if entry is None:
                return _compile_and_store(src, key, path)
    compiled = _from_entry(src, key, *entry, hit=True)
    env.log(f"cache hit {src.name} ({compiled.compiler}): {compiled.report}")
    return compiled


def _compile_and_store(src: KernelSource, key: str, path: str) -> CompiledKernel:
    tu = translation_unit(src)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="moe_fp8_jit_") as workdir:
        try:
            cubin, log = compilers.kCompileFunctions[path](tu, src.instance, Path(workdir))
        except compilers.CompileError as error:
            raise compilers.CompileError(f"compiling {src.instance} from {src.header} via {path}:"
                                         f"\n{error}\n--- generated translation unit ---\n{tu}"
                                         ) from None
    seconds = time.perf_counter() - start
    symbol = elf.single_kernel_symbol(cubin, f"the cubin of {src.instance}")
    report = parse_ptxas_log(log, symbol)
    meta = {"symbol": symbol, "report": dataclasses.asdict(report), "compile_seconds": seconds,
            "compiler": path, "instance": src.instance, "header": src.header, "log": log}
    try:
        cubin_path = cache.store(key, cubin, meta)
    except OSError as error:  # e.g. the cache dir removed mid-write by another process
        # NOTE: the cache only saves time; the compiled cubin in memory is as good
        warnings.warn(f"moe_fp8: could not store {src.name} in the kernel cache ({error}); "
                      "using it uncached")
        cubin_path = None
    env.log(f"compiled {src.name} via {path} in {seconds:.3f} s: {report}")
    return _from_entry(src, key, cubin, meta, cubin_path, hit=False)

