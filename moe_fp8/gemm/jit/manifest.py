"""A list of the kernel instances a run compiled, so a later run can compile them up front.

With ``MOE_FP8_JIT_MANIFEST=<file>`` every kernel ``compile_kernel`` hands out (compiled or read
from the cache) is appended to that file once per process, one JSON object per line. A fresh
machine then builds the whole list in parallel before the run
(``python -m moe_fp8.gemm.precompile --manifest <file>``), instead of compiling kernel after
kernel at first use. The device scripts record one and read the last one committed under
``benchmarks/``. Kernels from headers outside the package (tests' temporary headers) are not
recorded.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import List

from . import env
from .source import KernelSource

kManifestEnv = "MOE_FP8_JIT_MANIFEST"
_recorded: set = set()
_lock = threading.Lock()


def record(src: KernelSource) -> None:
    """Append ``src`` to the manifest named by ``MOE_FP8_JIT_MANIFEST`` (once per process)."""
    path = env.lookup(kManifestEnv)
    if not path or Path(src.header).is_absolute():
        return
    line = json.dumps({"header": src.header, "instance": src.instance,
                       "defines": [list(d) for d in src.defines]}, sort_keys=True)
    with _lock:
        if (path, line) in _recorded:
            return
        _recorded.add((path, line))
        # one short O_APPEND write per line: processes that record together do not interleave
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)


def read(path) -> List[KernelSource]:
    """The manifest's kernels in first-seen order, each once. Raises ``ValueError`` naming the
    file and line on a line that is not a kernel of this package."""
    sources, seen = [], set()
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            src = KernelSource(entry["header"], entry["instance"],
                               tuple(tuple(d) for d in entry.get("defines", ())))
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path}:{number}: not a kernel of this package ({error})") from None
        if src not in seen:
            seen.add(src)
            sources.append(src)
    return sources
