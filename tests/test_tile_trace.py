"""The tile trace (include/tile_trace.cuh, benchmarks/tile_trace.py) on the CPU: a traced GEMM
instance compiles for sm_90a without spills, exports the buffer pointer the host writes, and keeps
the launch parameters of its untraced twin; without the macro the source carries no define."""
import pytest

from moe_fp8.gemm import heuristics as H
from moe_fp8.gemm import jit
from moe_fp8.gemm.jit import elf
from moe_fp8.gemm.kernels import fp8_gemm as K


@pytest.fixture
def traced():
    saved = K.extra_defines
    K.extra_defines = (("MOE_FP8_TILE_TRACE", 32),)
    yield
    K.extra_defines = saved


def _compile(src):
    try:
        return jit.compile_kernel(src)
    except jit.CompilerUnavailable as error:
        pytest.skip(f"no CUDA compiler: {error}")


def test_untraced_source_has_no_define():
    c = H.masked_config(32, 1, 7168, 2048, 132).resolved(2048)
    assert K.kernel_source(7168, 2048, c, K.kLayoutMasked).defines == ()


@pytest.mark.parametrize("n,k", [(7168, 2048), (4096, 7168)])
def test_traced_instance_compiles(traced, n, k):
    c = H.masked_config(32, 1, n, k, 132).resolved(k)
    src = K.kernel_source(n, k, c, K.kLayoutMasked)
    assert ("MOE_FP8_TILE_TRACE", "32") in src.defines
    compiled = _compile(src)
    K.extra_defines = ()
    plain = _compile(K.kernel_source(n, k, c, K.kLayoutMasked))
    assert compiled.cubin != plain.cubin
    assert b"moe_fp8_tile_trace" in compiled.cubin and b"moe_fp8_tile_trace" not in plain.cubin
    assert elf.kernel_param_sizes(compiled.cubin, compiled.symbol) == \
        elf.kernel_param_sizes(plain.cubin, plain.symbol)
    # the trace must not perturb what it measures into spills or a serialised wgmma pipeline
    assert compiled.report.spill_stores <= 0 and compiled.report.stack_bytes <= 0
    assert not compiled.report.wgmma_serialized
