"""The JIT cache under stress (CPU only; tests/test_jit.py covers the single-fault cases).

* 8 processes released at the same instant compile the same 2 kernels into an empty cache:
  every process ends with a valid entry per kernel, all 8 hold identical cubin bytes, each
  kernel compiled exactly once, one sidecar + one cubin per key, no temp files left.
  Also with the compile-path probe racing from an empty cache (slow).
* a cache entry truncated in place (cubin, then sidecar) again and again while other processes
  keep reading it: readers never crash and never get bytes other than the right cubin.
* the cache directory deleted between compile and load, during a compile (before the store),
  and (slow) by another process in a loop while 3 processes compile.

The kernels are a tiny header written under tmp, compiled through the fastest path available
(nvrtc-ptxas when its versions match, else nvcc) so the whole file stays well under 60 s on 2 cores.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from moe_fp8.gemm import jit
from moe_fp8.gemm.jit import cache, compilers

kRepo = Path(__file__).resolve().parents[1]
kNvcc = (Path(os.environ.get("MOE_FP8_CUDA_HOME") or os.environ.get("CUDA_HOME")
              or "/usr/local/cuda") / "bin" / "nvcc")
pytestmark = pytest.mark.skipif(not kNvcc.is_file() and shutil.which("nvcc") is None,
                                reason="needs the CUDA toolkit (nvcc)")

kHeader = """
namespace jit_stress {
template <int kAdd>
__global__ void add_kernel(float* out, const float* in, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = in[i] + kAdd;
}
template <int kScale>
__global__ void scale_kernel(float* out, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] *= kScale;
}
}  // namespace jit_stress
"""
kInstances = ("jit_stress::add_kernel<3>", "jit_stress::scale_kernel<5>")

# A child: import, wait for the start signal, compile the kernels (in the given order), check
# each entry from the cache itself, print one JSON line.
kChild = textwrap.dedent("""
    import hashlib, json, os, sys, time
    from pathlib import Path
    from moe_fp8.gemm import jit
    from moe_fp8.gemm.jit import cache
    args = json.loads(sys.argv[1])
    go = Path(args["go"])
    Path(f"{go}.ready.{os.getpid()}").touch()  # imported: ready to start
    while not go.exists():
        time.sleep(0.002)
    results, deadline = [], time.time() + args.get("seconds", 0)
    while True:
        for instance in args["instances"]:
            c = jit.compile_kernel(jit.KernelSource(args["header"], instance))
            entry = cache.load(c.key)
            results.append({"instance": instance, "key": c.key, "hit": c.cache_hit,
                            "sha": hashlib.sha256(c.cubin).hexdigest(), "symbol": c.symbol,
                            "entry_valid": entry is not None and entry[0] == c.cubin,
                            "compiler": c.compiler})
        if time.time() >= deadline:
            break
    print(json.dumps(results))
""")


def fast_compiler() -> str:
    try:
        compilers.identity("nvrtc-ptxas")
        return "nvrtc-ptxas"
    except (compilers.CompilerUnavailable, OSError, subprocess.CalledProcessError):
        return "nvcc"


@pytest.fixture
def slow(request):
    """Slow tests run only when asked for (``-m slow``): the default suite stays < 60 s on 2 cores."""
    if "slow" not in (request.config.getoption("markexpr", "") or ""):
        pytest.skip("slow (~15-90 s on 2 cores): run with -m slow")


@pytest.fixture
def header(tmp_path):
    path = tmp_path / "jit_stress.cuh"
    path.write_text(kHeader)
    return str(path)


def child_env(cache_dir: Path, compiler) -> dict:
    env = dict(os.environ, MOE_FP8_CACHE_DIR=str(cache_dir),
               PYTHONPATH=os.pathsep.join(filter(None, [str(kRepo), os.environ.get("PYTHONPATH")])))
    env.pop("MOE_FP8_COMPILER", None)
    if compiler is not None:
        env["MOE_FP8_COMPILER"] = compiler
    return env


def start_children(tmp_path, count, header, cache_dir, compiler, *, seconds=0.0, orders=None):
    """``count`` children, all blocked on a start file; returns (processes, go-file)."""
    go = tmp_path / f"go-{time.monotonic_ns()}"
    children = []
    for index in range(count):
        instances = list(orders[index % len(orders)]) if orders else list(kInstances)
        args = json.dumps({"go": str(go), "header": header, "instances": instances,
                           "seconds": seconds})
        children.append(subprocess.Popen([sys.executable, "-c", kChild, args],
                                         env=child_env(cache_dir, compiler), stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True))
    return children, go


def finish(children, timeout=240):
    outputs = []
    for child in children:
        out, err = child.communicate(timeout=timeout)
        assert child.returncode == 0, f"child crashed (exit {child.returncode}):\n{err[-3000:]}"
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    return outputs


def release(go: Path, children, timeout=90):
    """Wait until every child has imported (torch takes ~2 s of CPU each), then start them together."""
    deadline = time.time() + timeout
    while len(list(go.parent.glob(f"{go.name}.ready.*"))) < len(children) and time.time() < deadline:
        if any(c.poll() is not None for c in children):
            break  # one died early: finish() reports it
        time.sleep(0.01)
    go.touch()


def check_one_entry_per_kernel(cache_dir: Path, outputs, compiled_once: bool = True):
    records = [r for out in outputs for r in out]
    for instance in kInstances:
        mine = [r for r in records if r["instance"] == instance]
        assert len({r["sha"] for r in mine}) == 1, f"{instance}: processes got different cubins"
        assert len({r["key"] for r in mine}) == 1, f"{instance}: processes used different keys"
        assert all(r["entry_valid"] for r in mine), f"{instance}: a process ended without a valid entry"
        if compiled_once:
            assert sum(not r["hit"] for r in mine) == 1, f"{instance}: compiled {sum(not r['hit'] for r in mine)} times"
    assert len(list(cache_dir.glob("kernels/*/*.json"))) == len(kInstances)
    assert len(list(cache_dir.glob("kernels/*/*.cubin"))) == len(kInstances)
    leftovers = [p for p in cache_dir.rglob(".*") if not p.name.startswith(".write-test")]
    assert not leftovers, f"temp files left behind: {leftovers}"
    for sidecar in cache_dir.glob("kernels/*/*.json"):
        meta = json.loads(sidecar.read_text())
        cubin = (sidecar.parent / meta["cubin_file"]).read_bytes()
        assert hashlib.sha256(cubin).hexdigest() == meta["cubin_sha256"]


# ----------------------------------------------------------------------------- 8 processes

def test_eight_processes_compile_two_kernels_into_an_empty_cache(tmp_path, header):
    cache_dir = tmp_path / "cache"
    orders = [kInstances, kInstances[::-1]]  # half take the locks in the other order
    children, go = start_children(tmp_path, 8, header, cache_dir, fast_compiler(), orders=orders)
    release(go, children)
    outputs = finish(children)
    check_one_entry_per_kernel(cache_dir, outputs)


@pytest.mark.slow
def test_eight_processes_with_the_probe_racing_from_an_empty_cache(tmp_path, header, slow):
    """No MOE_FP8_COMPILER: all 8 probe the compile paths at once (no toolchain record yet)."""
    cache_dir = tmp_path / "cache"
    children, go = start_children(tmp_path, 8, header, cache_dir, None)
    release(go, children)
    outputs = finish(children, timeout=400)
    compilers_used = {r["compiler"] for out in outputs for r in out}
    assert len(compilers_used) == 1, f"processes chose different compile paths: {compilers_used}"
    check_one_entry_per_kernel(cache_dir, outputs)
    assert len(list(cache_dir.glob("toolchain/*.json"))) == 1


# ----------------------------------------------------------------------------- damage while reading

def test_entry_truncated_in_place_while_other_processes_read(tmp_path, header, monkeypatch):
    cache_dir = tmp_path / "cache"
    compiler = fast_compiler()
    monkeypatch.setenv("MOE_FP8_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("MOE_FP8_COMPILER", compiler)
    expected = {i: hashlib.sha256(jit.compile_kernel(jit.KernelSource(header, i)).cubin).hexdigest()
                for i in kInstances}
    children, go = start_children(tmp_path, 2, header, cache_dir, compiler, seconds=4.0)
    release(go, children)
    damages, end = 0, time.time() + 4.0
    while time.time() < end:
        for path in list(cache_dir.glob("kernels/*/*.cubin")) + list(cache_dir.glob("kernels/*/*.json")):
            try:
                with open(path, "r+b") as file:  # in place (not atomic): a torn or damaged file
                    size = file.seek(0, os.SEEK_END)
                    file.truncate(size // 2)
                damages += 1
            except OSError:
                pass  # replaced or removed under us
            time.sleep(0.01)
    outputs = finish(children)
    records = [r for out in outputs for r in out]
    # each reader finished at least one pass over both kernels, against repeated damage
    assert damages > 20 and len(records) >= 2 * len(kInstances), (damages, len(records))
    wrong = [r for r in records if r["sha"] != expected[r["instance"]]]
    assert not wrong, f"a reader got a wrong cubin: {wrong[:3]}"
    # the cache heals: one more call gives a valid entry with the right bytes
    for instance in kInstances:
        c = jit.compile_kernel(jit.KernelSource(header, instance))
        assert hashlib.sha256(c.cubin).hexdigest() == expected[instance]
        assert cache.load(c.key) is not None


# ----------------------------------------------------------------------------- cache dir deleted

def test_cache_dir_deleted_between_compile_and_load(tmp_path, header, monkeypatch):
    cache_dir = tmp_path / "cache"
    monkeypatch.setenv("MOE_FP8_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("MOE_FP8_COMPILER", fast_compiler())
    src = jit.KernelSource(header, kInstances[0])
    first = jit.compile_kernel(src)
    shutil.rmtree(cache_dir)
    assert not first.cubin_path.exists()
    again = jit.compile_kernel(src)
    assert not again.cache_hit and again.cubin == first.cubin and again.cubin_path.is_file()
    assert jit.compile_kernel(src).cache_hit


def test_cache_dir_deleted_during_a_compile(tmp_path, header, monkeypatch):
    """Another process wipes the cache after our compiler ran but before we store: the store
    recreates the directories; the entry is valid afterwards."""
    cache_dir = tmp_path / "cache"
    path = fast_compiler()
    monkeypatch.setenv("MOE_FP8_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("MOE_FP8_COMPILER", path)
    original = compilers.kCompileFunctions[path]

    def compile_then_wipe(*args):
        result = original(*args)
        shutil.rmtree(cache_dir, ignore_errors=True)
        return result

    monkeypatch.setitem(compilers.kCompileFunctions, path, compile_then_wipe)
    compiled = jit.compile_kernel(jit.KernelSource(header, kInstances[1]))
    assert cache.load(compiled.key)[0] == compiled.cubin


def test_cache_dir_deleted_between_temp_write_and_rename(tmp_path, header, monkeypatch):
    """The cache vanishing mid-write costs the cache entry, never the compile (warns, returns the cubin)."""
    cache_dir = tmp_path / "cache"
    monkeypatch.setenv("MOE_FP8_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("MOE_FP8_COMPILER", fast_compiler())
    real_replace = os.replace

    def wipe_then_replace(src, dst):  # another process empties the cache at the worst moment
        shutil.rmtree(cache_dir / "kernels", ignore_errors=True)
        return real_replace(src, dst)

    monkeypatch.setattr(cache.os, "replace", wipe_then_replace)
    compiled = jit.compile_kernel(jit.KernelSource(header, kInstances[0]))
    monkeypatch.setattr(cache.os, "replace", real_replace)
    assert compiled.cubin and jit.compile_kernel(jit.KernelSource(header, kInstances[0])).cubin == compiled.cubin


@pytest.mark.slow
def test_cache_dir_deleted_in_a_loop_while_three_processes_compile(tmp_path, header, slow):
    cache_dir = tmp_path / "cache"
    children, go = start_children(tmp_path, 3, header, cache_dir, fast_compiler(), seconds=5.0)
    release(go, children)
    wipes, end = 0, time.time() + 5.0
    while time.time() < end:
        shutil.rmtree(cache_dir / "kernels", ignore_errors=True)
        wipes += 1
        time.sleep(0.05)
    outputs = finish(children)
    records = [r for out in outputs for r in out]
    assert wipes > 20 and records
    for instance in kInstances:
        assert len({r["sha"] for r in records if r["instance"] == instance}) == 1
