"""Which compile path is safe here: each candidate compiles a tiny ``wgmma`` kernel in a child process.

A crash in NVRTC/ptxas kills only the child (a segfault cannot be caught in Python). Results are
kept in ``<cache>/toolchain/<fingerprint>.json``; the fingerprint covers the interpreter, CUDA
home, the nvcc/ptxas binaries and the loaded libnvrtc, so a toolchain change re-probes.
``MOE_FP8_COMPILER`` skips the probe and forces a path.
Run ``python -m moe_fp8.gemm.jit.probe`` to probe every path and print the verdicts and times.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import cache, compilers, elf, env

# A template kernel with FP8 wgmma: the instruction that crashed in-process SASS generation.
# NOTE: NVRTC 13.0 -> cubin segfaulted on the compile-time-constant descriptor form here (CPU
# machine) and on every wgmma kernel tried on the GPU machine; both forms are in the probe.
kProbeInstance = "moe_fp8_probe::wgmma_kernel<1>"
kProbeSource = r"""
namespace moe_fp8_probe {
__device__ __forceinline__ void wgmma_m64n8k32(float (&d)[4], unsigned long long a,
                                               unsigned long long b) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n8k32.f32.e4m3.e4m3 "
               "{%0, %1, %2, %3}, %4, %5, 0, 1, 1;\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "l"(a), "l"(b));
}
template <int kBias>
__global__ void __launch_bounds__(128, 1) wgmma_kernel(float* out, unsigned long long desc) {
  float d[4] = {0.f, 0.f, 0.f, 0.f};
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
  wgmma_m64n8k32(d, desc, desc);
  wgmma_m64n8k32(d, 0ull, 0ull);
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
  out[threadIdx.x] = d[0] + d[1] + d[2] + d[3] + kBias;
}
}  // namespace moe_fp8_probe
#ifndef __CUDACC_RTC__
__attribute__((used)) static void* moe_fp8_probe_instance() {
  return reinterpret_cast<void*>(&moe_fp8_probe::wgmma_kernel<1>);
}
#endif
"""
kProbeTimeoutSeconds = 300


def _child_main(path: str) -> None:
    """In the child: compile the probe kernel through ``path``; exit 0 on a valid cubin."""
    with tempfile.TemporaryDirectory(prefix="moe_fp8_probe_") as workdir:
        start = time.perf_counter()
        cubin, _ = compilers.kCompileFunctions[path](kProbeSource, kProbeInstance, Path(workdir))
        elf.single_kernel_symbol(cubin, "the probe cubin")
        print(f"{time.perf_counter() - start:.3f}")


def _child_env() -> dict:
    package_root = str(Path(__file__).resolve().parents[3])  # the folder holding moe_fp8/
    child = dict(os.environ)
    child["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, child.get("PYTHONPATH")]))
    child.pop("MOE_FP8_COMPILER", None)
    return child


def probe_path(path: str) -> dict:
    """``{"status": "ok"|"crash"|"error"|"unavailable", "identity", "detail", "seconds"}``."""
    try:
        identity = compilers.identity(path)
    except (compilers.CompilerUnavailable, OSError, subprocess.CalledProcessError) as error:
        return {"status": "unavailable", "identity": "", "detail": str(error), "seconds": None}
    result = run_child(f"from moe_fp8.gemm.jit.probe import _child_main; _child_main({path!r})")
    result["identity"] = identity
    return result


def run_child(code: str) -> dict:
    """Run ``python -c code`` with this package importable; classify how it ended."""
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env=_child_env(), timeout=kProbeTimeoutSeconds)
    except subprocess.TimeoutExpired:
        return {"status": "error", "detail": "timed out", "seconds": None}
    if done.returncode == 0:
        lines = done.stdout.strip().splitlines() or ["-"]
        try:
            seconds = float(lines[-1])
        except ValueError:
            seconds = None
        return {"status": "ok", "detail": "", "seconds": seconds}
    status = "crash" if done.returncode < 0 else "error"  # negative: killed by a signal
    detail = f"exit {done.returncode}: {(done.stderr or done.stdout).strip()[-2000:]}"
    return {"status": status, "detail": detail, "seconds": None}


def _stat(path: Path) -> list:
    try:
        stat = path.stat()
        return [str(path), stat.st_size, stat.st_mtime_ns]
    except OSError:
        return [str(path), None, None]


def _fingerprint() -> str:
    home = env.cuda_home()
    parts = [sys.executable, sys.prefix, str(home), os.environ.get("LD_LIBRARY_PATH", ""),
             _stat(home / "bin" / "nvcc"), _stat(home / "bin" / "ptxas")]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]


def _record_is_current(record: dict) -> bool:
    """The libnvrtc recorded at probe time is still the same file (cheap: no NVRTC import)."""
    library = record.get("nvrtc_library")
    return not library or _stat(Path(library)) == record.get("nvrtc_library_stat")


def toolchain_record(refresh: bool = False, every_path: bool = False) -> dict:
    """The probe verdicts ``{"paths": {path: result}, ...}``, read from the cache when current.

    Paths are probed fastest first, stopping at the first that works unless ``every_path``.
    """
    record_path = cache.root() / "toolchain" / f"{_fingerprint()}.json"
    if not refresh:
        try:
            record = json.loads(record_path.read_text())
            if _record_is_current(record):
                return record
        except (OSError, ValueError):
            pass
    env.log("probing compile paths (first use of this toolchain)")
    record = {"paths": {}, "nvrtc_library": "", "nvrtc_library_stat": None}
    for path in env.kCompilerPaths:
        if not every_path and any(r["status"] == "ok" for r in record["paths"].values()):
            record["paths"][path] = {"status": "unprobed", "identity": "", "detail": "",
                                     "seconds": None}
            continue
        record["paths"][path] = probe_path(path)
        env.log(f"probe {path}: {record['paths'][path]['status']} "
                f"{record['paths'][path]['detail'][:200]}")
    try:
        library = compilers.nvrtc_library()
        record["nvrtc_library"], record["nvrtc_library_stat"] = library, _stat(Path(library))
    except compilers.CompilerUnavailable:
        pass
    record_path.parent.mkdir(parents=True, exist_ok=True)
    cache.atomic_write(record_path, json.dumps(record, indent=1).encode())
    return record


@functools.lru_cache(maxsize=None)
def _select(forced, cache_root: str) -> tuple[str, str]:
    if forced is not None:
        return forced, compilers.identity(forced)
    record = toolchain_record()
    for path in env.kCompilerPaths:
        result = record["paths"].get(path, {})
        if result.get("status") == "ok":
            return path, result["identity"]
    details = {path: result.get("detail") for path, result in record["paths"].items()}
    raise compilers.CompilerUnavailable(f"no working sm_90a compile path: {details}")


def select_path() -> tuple[str, str]:
    """``(path, compiler identity)``: ``MOE_FP8_COMPILER`` or the fastest path proven safe."""
    return _select(env.forced_compiler(), str(cache.root()))


def main(argv: list[str]) -> int:
    record = toolchain_record(refresh=True, every_path=True)
    for path, result in record["paths"].items():
        seconds = f"{result['seconds']:.3f} s" if result["seconds"] is not None else "-"
        print(f"{path:12s} {result['status']:12s} {seconds:>9s}  {result['identity']}"
              f"  {result['detail'][:160]}")
    print("selected:", select_path()[0])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
