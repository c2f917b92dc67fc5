"""Programmatic dependent launch (include/pdl.cuh, ``MOE_FP8_PDL``): with the launch attribute a
kernel may start while the previous kernel of its stream is still running, so every bundled
kernel must wait for its prerequisites before it touches global memory. These checks run on the
CPU: the source contract, and the launch attributes the runtime builds."""
import re

import pytest

from moe_fp8.gemm.jit import driver, env, runtime
from moe_fp8.gemm.jit.source import KernelSource

kBegin = "pdl::begin();"


def _kernel_bodies(text: str):
    """(name, body) of every ``__global__`` function: the body from its opening brace to the
    matching closing one."""
    for match in re.finditer(r"^__global__[^{]*?\b(\w+_kernel)\s*\(", text, flags=re.M | re.S):
        start = text.index("{", match.end())
        depth, i = 0, start
        while True:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                break
            i += 1
        yield match.group(1), text[start + 1:i]


def _first_statement(body: str) -> str:
    code = "\n".join(line.split("//")[0] for line in body.splitlines())
    return code.strip().split(";")[0] + ";"


def test_every_bundled_kernel_waits_for_its_prerequisites_first():
    checked = 0
    for path in sorted(env.kIncludeDir.glob("*.cuh")):
        for name, body in _kernel_bodies(path.read_text()):
            checked += 1
            if "gemm_body<" in body:  # the GEMM kernels: pdl::begin() after the shared-memory prologue
                continue
            assert _first_statement(body) == kBegin, \
                f"{path.name}: {name} must start with {kBegin} (include/pdl.cuh)"
    core = (env.kIncludeDir / "gemm_core.cuh").read_text()
    prologue, _, rest = core.partition(kBegin)
    assert rest, "gemm_body must call pdl::begin()"
    # before it: only parameters and shared memory (no scheduler, no loads, no stores)
    for forbidden in ("Scheduler scheduler", "tma_load", "__ldg", "tma_store", "params.g_"):
        assert forbidden not in prologue.split("gemm_body(")[-1], forbidden
    assert checked == 31, checked  # every kernel (update when one is added or removed)
    # the one exception, kEarlyB (host contract: the previous kernel writes neither B nor the
    # layout): before its wait the producer touches only the layout (scheduler) and B
    early = core.split("if constexpr (P::kEarlyB) {\n        // The first kStages")[1]
    early = early.split("pdl::begin();")[0]
    assert "tma_load_2d(s_b" in early
    for forbidden in ("s_a", "tma_sa", "tma_sb", "s_sa", "tma_store", "__ldg"):
        assert forbidden not in early, forbidden


def _bare_kernel(source: KernelSource) -> runtime.Kernel:
    """A Kernel without a GPU: only what launch_attributes reads, set as __init__ sets it."""
    kernel = runtime.Kernel.__new__(runtime.Kernel)
    kernel._attrs = {}
    kernel.pdl_capable = runtime.pdl_capable(source)
    return kernel


kBundled = KernelSource("fp8_gemm.cuh", "moe_fp8::fp8_gemm_kernel<128, 128, 128, 128, 5, 16, 0>")


@pytest.mark.parametrize("cluster", [(1, 1, 1), (2, 1, 1)])
@pytest.mark.parametrize("pdl", [False, True])
def test_launch_attributes(cluster, pdl):
    kernel = _bare_kernel(kBundled)
    array, count = kernel.launch_attributes(cluster, pdl)
    ids = [array[i].id for i in range(count)]
    expected = ([driver.kLaunchAttrClusterDimension] if cluster != (1, 1, 1) else []) + \
        ([driver.kLaunchAttrProgrammaticSerialization] if pdl else [])
    assert ids == expected
    for i in range(count):
        if array[i].id == driver.kLaunchAttrClusterDimension:
            assert tuple(array[i].value[:3]) == cluster
        else:
            assert array[i].value[0] == 1
    assert kernel.launch_attributes(cluster, pdl)[0] is array  # built once per key


def test_headers_outside_the_bundle_never_get_pdl(tmp_path):
    outside = tmp_path / "fp8_gemm.cuh"  # e.g. gemm_ab.py's copies of the include tree
    outside.write_text("// a copy\n")
    kernel = _bare_kernel(KernelSource(str(outside), "moe_fp8::fp8_gemm_kernel<1>"))
    assert not kernel.pdl_capable
    assert kernel.launch_attributes((1, 1, 1), True)[1] == 0
    assert kernel.launch_attributes((2, 1, 1), True)[1] == 1  # the cluster shape only


def test_launch_attribute_layout_matches_cuda_h():
    # CUlaunchAttribute: 4-byte id, padding, a 64-byte value union (8-byte aligned)
    assert driver.LaunchAttribute.value.offset == 8
    assert driver.ctypes.sizeof(driver.LaunchAttribute) == 72


def test_pdl_switch(monkeypatch):
    monkeypatch.delenv("MOE_FP8_PDL", raising=False)
    assert not env.pdl()
    monkeypatch.setenv("MOE_FP8_PDL", "1")
    assert env.pdl()
    monkeypatch.setenv("MOE_FP8_PDL", "0")
    assert not env.pdl()



def test_pdl_scope_overrides_the_environment(monkeypatch):
    """pdl_scope(flag) decides inside its block (the decode runner's capture), None defers to
    MOE_FP8_PDL; the environment rules again after the block."""
    monkeypatch.setenv("MOE_FP8_PDL", "0")
    with env.pdl_scope(True):
        assert env.pdl()
        with env.pdl_scope(None):
            assert not env.pdl()
        assert env.pdl()
    assert not env.pdl()
    monkeypatch.setenv("MOE_FP8_PDL", "1")
    with env.pdl_scope(False):
        assert not env.pdl()
    assert env.pdl()
