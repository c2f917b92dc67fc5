"""The on-disk kernel cache: one content-named cubin plus a JSON sidecar per key.

Layout under the cache root: ``kernels/<key[:2]>/<key>.json`` (metadata: size and sha256 of the
cubin, its kernel symbol, the ptxas report) and ``kernels/<key[:2]>/<key>.<sha[:16]>.cubin``.
Every file is written to a temp name and ``os.replace``d, and the cubin's name carries its hash,
so concurrent writers can only ever leave a sidecar that points at a complete, matching cubin.
A sidecar whose cubin is missing, short or hashes differently is treated as a miss and rebuilt.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

from . import env

try:
    import fcntl
except ImportError:  # not POSIX: concurrent compiles are still safe, merely duplicated
    fcntl = None


@functools.lru_cache(maxsize=None)
def _usable_root(configured: str) -> Path:
    root = Path(configured)
    try:
        (root / "kernels").mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=root / "kernels", prefix=".write-test-")
        os.close(handle)
        os.unlink(probe)
        return root
    except OSError as error:
        fallback = Path(tempfile.gettempdir()) / f"moe_fp8-cache-{os.getuid()}"
        warnings.warn(f"moe_fp8: kernel cache dir {root} is not writable ({error}); "
                      f"using {fallback} instead (set MOE_FP8_CACHE_DIR)")
        (fallback / "kernels").mkdir(parents=True, exist_ok=True)
        return fallback


def root() -> Path:
    """The cache root in use: ``MOE_FP8_CACHE_DIR`` (or the default), else a temp fallback."""
    return _usable_root(str(env.cache_root()))


def atomic_write(path: Path, data: bytes) -> None:
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def _sidecar(key: str) -> Path:
    return root() / "kernels" / key[:2] / f"{key}.json"


def load(key: str):
    """``(cubin bytes, metadata dict, cubin path)`` or None (missing or damaged entry)."""
    sidecar = _sidecar(key)
    try:
        meta = json.loads(sidecar.read_text())
        cubin_path = sidecar.parent / meta["cubin_file"]
        cubin = cubin_path.read_bytes()
    except (OSError, ValueError, KeyError, TypeError):
        if sidecar.exists():
            env.log(f"cache entry {key[:16]} unreadable: rebuilding")
        return None
    if len(cubin) != meta.get("cubin_size") or hashlib.sha256(cubin).hexdigest() != meta.get(
            "cubin_sha256"):
        env.log(f"cache entry {key[:16]} corrupt (size/hash mismatch): rebuilding")
        return None
    return cubin, meta, cubin_path


def store(key: str, cubin: bytes, meta: dict) -> Path:
    """Write the cubin, then the sidecar that vouches for it; returns the cubin's path."""
    digest = hashlib.sha256(cubin).hexdigest()
    sidecar = _sidecar(key)
    sidecar.parent.mkdir(parents=True, exist_ok=True)
    cubin_path = sidecar.parent / f"{key}.{digest[:16]}.cubin"
    atomic_write(cubin_path, cubin)
    meta = dict(meta, cubin_file=cubin_path.name, cubin_size=len(cubin), cubin_sha256=digest)
    atomic_write(sidecar, json.dumps(meta, indent=1, sort_keys=True).encode())
    return cubin_path


@contextlib.contextmanager
def compile_lock(key: str):
    """Serialise compiles of one key across processes (others wait, then hit the cache)."""
    if fcntl is None:
        yield
        return
    path = _sidecar(key).with_suffix(".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield
        return
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)  # closing drops the lock
