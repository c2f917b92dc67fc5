"""The JIT: compile paths, the disk cache (hits, damage, read-only dirs, concurrency), the probe,
compile errors, TMA validation, precompile; launches and graph capture on a Hopper GPU."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from moe_fp8.gemm import jit
from moe_fp8.gemm.jit import cache, compilers, elf, probe
from moe_fp8.gemm.precompile import PrecompileError, precompile

kRepo = Path(__file__).resolve().parents[1]
kNvcc = (Path(os.environ.get("MOE_FP8_CUDA_HOME") or os.environ.get("CUDA_HOME")
              or "/usr/local/cuda") / "bin" / "nvcc")
needs_nvcc = pytest.mark.skipif(not kNvcc.is_file() and shutil.which("nvcc") is None,
                                reason="needs nvcc")

kAddHeader = """
namespace jit_test {
template <int kAdd>
__global__ void add_kernel(float* out, const float* in, int n, float scale) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = in[i] * scale + kAdd;
}
// copies its by-value 128-byte parameter out, to check TensorMap passing
struct alignas(64) TmaDesc { unsigned long long v[16]; };
template <int kUnused>
__global__ void echo_desc_kernel(const __grid_constant__ TmaDesc desc, unsigned long long* out) {
  out[threadIdx.x] = desc.v[threadIdx.x];
}
template <int kUnused>
__global__ void cluster_rank_kernel(unsigned* out) {
  unsigned rank;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
  out[blockIdx.x] = rank;
}
// dynamic indexing of a local array: forces a stack frame (precompile must reject it)
template <int kN>
__global__ void local_memory_kernel(float* out, int i) {
  float local[kN];
  for (int j = 0; j < kN; ++j) local[(j * 7 + i) % kN] = out[j];
  for (int j = 0; j < kN; ++j) out[j] = local[(j * i) % kN];
}
template <int kUnused>
__global__ void broken_kernel(float* out) { out[0] = undefined_identifier_xyz; }
}  // namespace jit_test
"""


@pytest.fixture
def header(tmp_path):
    path = tmp_path / "jit_test.cuh"
    path.write_text(kAddHeader)
    return str(path)


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("MOE_FP8_CACHE_DIR", str(root))
    return root


@pytest.fixture
def use_nvcc(monkeypatch):
    monkeypatch.setenv("MOE_FP8_COMPILER", "nvcc")


def add_source(header, add=3):
    return jit.KernelSource(header, f"jit_test::add_kernel<{add}>")


@needs_nvcc
def test_nvcc_compile_and_cache_hit(header, fresh_cache, use_nvcc):
    first = jit.compile_kernel(add_source(header))
    assert not first.cache_hit and first.compiler == "nvcc"
    assert first.symbol == "_ZN8jit_test10add_kernelILi3EEEvPfPKfif"
    assert first.registers > 0 and first.spill_bytes == 0 and first.compile_seconds > 0
    assert first.cubin_path.read_bytes() == first.cubin
    second = jit.compile_kernel(add_source(header))
    assert second.cache_hit and second.cubin == first.cubin and second.report == first.report
    other = jit.compile_kernel(add_source(header, add=4))  # new template argument, new key
    assert not other.cache_hit and other.key != first.key


def _damage_and_recompile(header, damage):
    first = jit.compile_kernel(add_source(header))
    damage(first.cubin_path, first.cubin_path.parent / f"{first.key}.json")
    again = jit.compile_kernel(add_source(header))
    assert not again.cache_hit, "a damaged entry must be rebuilt"
    assert again.cubin == first.cubin and elf.kernel_symbols(again.cubin) == [first.symbol]
    assert jit.compile_kernel(add_source(header)).cache_hit


@needs_nvcc
def test_corrupted_cubin_is_rebuilt(header, fresh_cache, use_nvcc):
    def flip(cubin, sidecar):
        data = bytearray(cubin.read_bytes())
        data[len(data) // 2] ^= 0xFF
        cubin.write_bytes(bytes(data))
    _damage_and_recompile(header, flip)


@needs_nvcc
def test_truncated_cubin_is_rebuilt(header, fresh_cache, use_nvcc):
    _damage_and_recompile(header, lambda cubin, sidecar: cubin.write_bytes(
        cubin.read_bytes()[:100]))


@needs_nvcc
def test_truncated_sidecar_is_rebuilt(header, fresh_cache, use_nvcc):
    _damage_and_recompile(header, lambda cubin, sidecar: sidecar.write_text(
        sidecar.read_text()[:20]))


@needs_nvcc
def test_missing_cubin_is_rebuilt(header, fresh_cache, use_nvcc):
    _damage_and_recompile(header, lambda cubin, sidecar: cubin.unlink())


@needs_nvcc
def test_unwritable_cache_dir_falls_back(header, tmp_path, monkeypatch, use_nvcc):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("MOE_FP8_CACHE_DIR", str(blocker / "cache"))  # cannot be created
    with pytest.warns(UserWarning, match="not writable"):
        compiled = jit.compile_kernel(add_source(header))
    assert compiled.cubin_path.is_file()
    assert not str(compiled.cubin_path).startswith(str(blocker))


@needs_nvcc
def test_concurrent_processes_share_one_entry(header, fresh_cache):
    code = textwrap.dedent(f"""
        from moe_fp8.gemm import jit
        c = jit.compile_kernel(jit.KernelSource({header!r}, "jit_test::add_kernel<7>"))
        print(c.symbol, c.cache_hit)
    """)
    env = dict(os.environ, MOE_FP8_CACHE_DIR=str(fresh_cache), MOE_FP8_COMPILER="nvcc",
               PYTHONPATH=os.pathsep.join(filter(None, [str(kRepo), os.environ.get("PYTHONPATH")])))
    children = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outputs = [child.communicate(timeout=300) for child in children]
    assert all(child.returncode == 0 for child in children), outputs
    symbols = {out.split()[0] for out, _ in outputs}
    assert symbols == {"_ZN8jit_test10add_kernelILi7EEEvPfPKfif"}
    sidecars = list(fresh_cache.glob("kernels/*/*.json"))
    cubins = list(fresh_cache.glob("kernels/*/*.cubin"))
    assert len(sidecars) == 1 and len(cubins) == 1
    assert not list(fresh_cache.glob("kernels/*/.*"))  # no temp files left behind
    meta = json.loads(sidecars[0].read_text())
    assert cache.load(sidecars[0].stem) is not None and meta["cubin_size"] > 0
    assert sum(out.split()[1] == "False" for out, _ in outputs) == 1  # compiled once


@needs_nvcc
def test_compile_error_carries_the_log(header, fresh_cache, use_nvcc):
    with pytest.raises(jit.CompileError, match="undefined_identifier_xyz") as error:
        jit.compile_kernel(jit.KernelSource(header, "jit_test::broken_kernel<0>"))
    assert "generated translation unit" in str(error.value)


@needs_nvcc
def test_precompile_list_and_local_memory_rejection(header, fresh_cache, use_nvcc):
    sources = [add_source(header, 1), add_source(header, 2)]
    first = precompile(sources, verbose=False)
    assert [c.source for c in first] == sources and not any(c.cache_hit for c in first)
    assert all(c.cache_hit for c in precompile(sources, verbose=False))
    with pytest.raises(PrecompileError, match="local memory"):
        precompile([jit.KernelSource(header, "jit_test::local_memory_kernel<64>")], verbose=False)
    with pytest.raises(PrecompileError, match="undefined_identifier_xyz"):
        precompile([jit.KernelSource(header, "jit_test::broken_kernel<1>")], verbose=False)


@needs_nvcc
def test_bundled_variants_compile_without_spills(fresh_cache):
    """What CI runs (``python -m moe_fp8.gemm.precompile``), on the quantisation variants."""
    from moe_fp8.gemm.kernels import quant
    compiled = precompile(quant.bundled_sources(), verbose=False)
    assert len(compiled) == 12 and all(not c.report.uses_local_memory for c in compiled)
    assert set(quant.bundled_sources()) <= set(jit.bundled_sources())


def test_probe_classifies_crashes_and_errors():
    assert probe.run_child("print(0.5)")["status"] == "ok"
    assert probe.run_child("import ctypes; ctypes.string_at(0)")["status"] == "crash"
    assert probe.run_child("raise SystemExit(3)")["status"] == "error"


@needs_nvcc
def test_probe_selects_a_safe_path_and_caches_it(fresh_cache, monkeypatch):
    monkeypatch.delenv("MOE_FP8_COMPILER", raising=False)
    assert probe.probe_path("nvcc")["status"] == "ok"
    record = probe.toolchain_record()
    statuses = {path: result["status"] for path, result in record["paths"].items()}
    assert "ok" in statuses.values()
    path, identity = probe.select_path()
    assert statuses[path] == "ok" and identity
    assert all(statuses[p] in ("crash", "error", "unavailable") for p in
               jit.env.kCompilerPaths[:jit.env.kCompilerPaths.index(path)])
    files = list((fresh_cache / "toolchain").glob("*.json"))
    assert len(files) == 1
    start = time.perf_counter()
    assert probe.toolchain_record() == record  # read back, not re-probed
    assert time.perf_counter() - start < 0.5
    monkeypatch.setenv("MOE_FP8_COMPILER", "nvcc")
    assert probe.select_path()[0] == "nvcc"
    monkeypatch.setenv("MOE_FP8_COMPILER", "gcc")
    with pytest.raises(ValueError, match="MOE_FP8_COMPILER"):
        probe.select_path()


def test_nvrtc_ptxas_path_when_available(header, fresh_cache, monkeypatch):
    try:
        compilers.identity("nvrtc-ptxas")
    except (compilers.CompilerUnavailable, OSError) as error:
        pytest.skip(f"nvrtc-ptxas unavailable: {error}")
    monkeypatch.setenv("MOE_FP8_COMPILER", "nvrtc-ptxas")
    compiled = jit.compile_kernel(add_source(header))
    assert compiled.compiler == "nvrtc-ptxas" and compiled.registers > 0
    assert compiled.symbol == "_ZN8jit_test10add_kernelILi3EEEvPfPKfif"


@needs_nvcc
def test_parameter_sizes_read_from_the_cubin(header, fresh_cache, use_nvcc):
    compiled = jit.compile_kernel(add_source(header))
    assert elf.kernel_param_sizes(compiled.cubin, compiled.symbol) == [8, 8, 4, 4]
    echo = jit.compile_kernel(jit.KernelSource(header, "jit_test::echo_desc_kernel<0>"))
    assert elf.kernel_param_sizes(echo.cubin, echo.symbol) == [128, 8]
    assert elf.kernel_param_sizes(compiled.cubin, "no_such_symbol") is None


def test_truncated_cubin_is_rejected_by_the_elf_reader(tmp_path):
    with pytest.raises(elf.CubinError):
        elf.kernel_symbols(b"\x7fELF" + b"\0" * 10)
    with pytest.raises(elf.CubinError):
        elf.kernel_symbols(b"garbage" * 20)


def test_kernel_source_validation(header):
    with pytest.raises(ValueError, match="header"):
        jit.KernelSource("no_such_file.cuh", "x<1>")
    with pytest.raises(ValueError, match="instance"):
        jit.KernelSource(header, "x<1>; int y")
    src = jit.KernelSource(header, "jit_test::add_kernel<1>", defines=[("kFoo", 3), "kBar"])
    tu = jit.translation_unit(src)
    assert "#define kFoo 3" in tu and "#define kBar" in tu and "&jit_test::add_kernel<1>" in tu


def test_tma_validation_names_the_problem():
    x = torch.zeros(64, 72, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="stride of dim 1"):
        jit.make_tma_2d(x[:, :65], 64, 64, inner_dim=65, outer_stride=65)
    with pytest.raises(ValueError, match="16-byte aligned"):
        jit.make_tma_2d(x.view(-1)[1:65 * 64 + 1].view(64, 65)[:, :64], 64, 8, outer_stride=72)
    with pytest.raises(ValueError, match="swizzle"):
        jit.make_tma_2d(x, 64, 8, swizzle_bytes=96)
    with pytest.raises(ValueError, match="exceeds the 64-byte"):
        jit.make_tma_2d(x, 64, 8, swizzle_bytes=64)
    with pytest.raises(ValueError, match="box dims"):
        jit.make_tma_2d(x, 64, 300)
    with pytest.raises(TypeError, match="dtype"):
        jit.make_tma_2d(x.to(torch.float64), 16, 8)
    with pytest.raises(ValueError, match="CUDA device"):
        jit.make_tma_2d(x, 64, 8)


# ---- on a Hopper GPU ------------------------------------------------------------------------

@pytest.mark.gpu
def test_launch_scalars_and_graph_replay(header):
    kernel = jit.get_kernel(add_source(header, 5))
    assert jit.get_kernel(add_source(header, 5)) is kernel
    x = torch.randn(1000, device="cuda")
    out = torch.full_like(x, float("nan"))
    kernel.launch((1000 + 127) // 128, 128, 0, [out, x, jit.i32(1000), jit.f32(2.0)])
    torch.testing.assert_close(out, x * 2 + 5, rtol=0, atol=0)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph, stream=stream):
            kernel.launch(8, 128, 0, [out, x, jit.i32(1000), jit.f32(4.0)])  # exact: no FMA doubt
        with pytest.raises(RuntimeError, match="graph is being captured"):
            with torch.cuda.graph(torch.cuda.CUDAGraph(), stream=stream):
                jit.get_kernel(add_source(header, 6))  # not loaded yet: refuse
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, x * 4 + 5, rtol=0, atol=0)
    with pytest.raises(TypeError, match="typed scalar"):
        kernel.launch(1, 128, 0, [out, x, 1000, jit.f32(2.0)])
    with pytest.raises(TypeError, match="4 parameters"):
        kernel.launch(1, 128, 0, [out, x, jit.i32(1000)])
    with pytest.raises(TypeError, match="8 bytes"):
        kernel.launch(1, 128, 0, [out, x, jit.i64(1000), jit.f32(2.0)])


@pytest.mark.gpu
def test_tensor_map_passes_by_value_and_cluster_launch(header):
    a = torch.randn(256, 512, device="cuda").to(torch.float8_e4m3fn)
    tmap = jit.make_tma_2d(a, 128, 64, 128)
    raw = torch.frombuffer(bytearray(tmap.raw()), dtype=torch.int64)
    assert raw.abs().sum() > 0
    out = torch.zeros(16, dtype=torch.int64, device="cuda")
    jit.get_kernel(jit.KernelSource(header, "jit_test::echo_desc_kernel<0>")).launch(
        1, 16, 0, [tmap, out])
    assert torch.equal(out.cpu(), raw)
    for tensor in (torch.randn(4, 64, 256, device="cuda", dtype=torch.bfloat16),):
        jit.make_tma_3d(tensor, 64, 32, 1, 128)
    ranks = torch.full((8,), 99, dtype=torch.int32, device="cuda")
    jit.get_kernel(jit.KernelSource(header, "jit_test::cluster_rank_kernel<0>")).launch(
        8, 32, 0, [ranks], cluster=(2, 1, 1))
    assert ranks.tolist() == [0, 1] * 4


@pytest.mark.gpu
def test_launch_overhead_and_warm_start(header, capsys):
    kernel = jit.get_kernel(add_source(header, 9))
    x = torch.randn(128, device="cuda")
    args = [x, x, jit.i32(0), jit.f32(1.0)]
    kernel.launch(1, 128, 0, args)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(2000):
        kernel.launch(1, 128, 0, args)
    host_us = (time.perf_counter() - start) / 2000 * 1e6
    torch.cuda.synchronize()
    code = textwrap.dedent(f"""
        import time, torch
        torch.zeros(1, device="cuda")
        from moe_fp8.gemm import jit
        t = time.perf_counter()
        jit.get_kernel(jit.KernelSource({header!r}, "jit_test::add_kernel<9>"))
        print(time.perf_counter() - t)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(kRepo), os.environ.get("PYTHONPATH")])))
    warm = float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                text=True, check=True).stdout.split()[-1])
    with capsys.disabled():
        print(f"\n[jit] host cost of one launch: {host_us:.1f} us; warm-cache get_kernel in a "
              f"fresh process: {warm * 1e3:.1f} ms")
    assert host_us < 50 and warm < 0.5


@pytest.mark.parametrize("value", [None, "", "0", "1", " on ", "x=y"])
def test_env_lookup_reads_what_os_environ_reads(monkeypatch, value):
    """jit.env.lookup (the switches' fast read) sees every value os.environ.get does: unset,
    empty, set through os.environ (monkeypatch), and deleted again."""
    from moe_fp8.gemm.jit.env import lookup
    name = "MOE_FP8_TEST_LOOKUP"
    if value is None:
        monkeypatch.delenv(name, raising=False)
    else:
        monkeypatch.setenv(name, value)
    assert lookup(name) == os.environ.get(name)
    assert lookup(name, "fallback") == os.environ.get(name, "fallback")
    monkeypatch.setenv(name, "changed")
    assert lookup(name) == "changed"
    monkeypatch.delenv(name)
    assert lookup(name) is None and lookup(name, "d") == "d"


@needs_nvcc
def test_gemm_without_ring_stages_is_a_compile_error(fresh_cache, use_nvcc):
    """A GEMM instance built from a config whose stages were never resolved (0) stops at compile
    time instead of launching a kernel without a ring (session 36: an illegal access)."""
    from moe_fp8.gemm.heuristics import GemmConfig
    from moe_fp8.gemm.kernels import fp8_gemm as K
    src = K.kernel_source(1024, 1024, GemmConfig(128, 128, stages=0), K.kLayoutContiguous)
    with pytest.raises(jit.CompileError, match="ring stages"):
        jit.compile_kernel(src)


def test_manifest_records_package_kernels_once_and_reads_back(tmp_path, monkeypatch, header):
    """MOE_FP8_JIT_MANIFEST: each package kernel once per process, in first-seen order; kernels
    of headers outside the package are not recorded; a line that is no kernel is an error."""
    from moe_fp8.gemm.jit import manifest
    from moe_fp8.gemm.kernels import quant
    path = tmp_path / "manifest.jsonl"
    monkeypatch.setenv("MOE_FP8_JIT_MANIFEST", str(path))
    monkeypatch.setattr(manifest, "_recorded", set())
    kernels = quant.bundled_sources()[:3]
    for src in kernels + kernels[:1] + [add_source(header)]:
        manifest.record(src)
    assert len(path.read_text().splitlines()) == 3
    assert manifest.read(path) == kernels
    path.write_text(path.read_text() + "\n" + path.read_text())  # two processes' records
    assert manifest.read(path) == kernels
    (tmp_path / "bad.jsonl").write_text('{"header": "no_such.cuh", "instance": "x<1>"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        manifest.read(tmp_path / "bad.jsonl")


@needs_nvcc
def test_precompile_from_a_manifest(tmp_path, fresh_cache, use_nvcc, monkeypatch, capsys):
    """``python -m moe_fp8.gemm.precompile --manifest FILE`` builds what a run recorded: after it,
    the run's own compile_kernel calls are cache hits."""
    from moe_fp8.gemm import precompile as P
    from moe_fp8.gemm.jit import manifest
    from moe_fp8.gemm.kernels import quant
    path = tmp_path / "manifest.jsonl"
    monkeypatch.setenv("MOE_FP8_JIT_MANIFEST", str(path))
    monkeypatch.setattr(manifest, "_recorded", set())
    kernels = quant.bundled_sources()[:2]
    for src in kernels:
        manifest.record(src)
    monkeypatch.delenv("MOE_FP8_JIT_MANIFEST")
    assert P.main(["--manifest", str(path), "--workers", "2"]) == 0
    assert "2/2 kernels ready (0 cached)" in capsys.readouterr().err
    assert all(jit.compile_kernel(src).cache_hit for src in kernels)
