"""The decode runner's staging kernel with the x-quant folded in (``quant.cuh``
stage_quant_kernel, ``MOE_FP8_STAGE_QUANT``), emulated on the CPU: the staged rows are the batch's
bytes, the fp8 values and scales are the one-shot per-token kernel's bytes on the same rows, the
count is set, and rows past the batch keep what they held. The GPU side (the runner's replays keep
their bits) is ``tests/test_layer_gpu.py::test_decode_stage_quant_keeps_bits``."""
from __future__ import annotations

import pytest
import torch

from moe_fp8.gemm.jit import env
from moe_fp8.gemm.kernels import quant as quant_kernels
from moe_fp8.gemm.layout import empty_act_scales

from kernel_checks import EmulatedKernel, compile_harness, kQuantPrelude, launch_code

kHidden, kCapacity = 512, 24


def _instances():
    return ([quant_kernels.stage_quant_source(128, p).instance for p in (False, True)] +
            [quant_kernels.per_token_oneshot_source(torch.bfloat16, 128, p).instance
             for p in (False, True)])


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    source = (kQuantPrelude + '#define __host__\n#include "quant.cuh"\n' + launch_code(_instances()))
    assert (env.kIncludeDir / "quant.cuh").exists()
    return compile_harness(tmp_path_factory.mktemp("stage_quant_emulation"), source,
                           "stage_quant_emulation")


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("n", [1, 7, kCapacity])
def test_stage_quant_is_copy_then_quant(emulator, monkeypatch, pow2, n):
    monkeypatch.setattr(quant_kernels, "get_kernel", lambda src, *a: EmulatedKernel(emulator, src))
    gen = torch.Generator().manual_seed(n + 10 * pow2)
    x = (torch.randn(n, kHidden, generator=gen) *
         torch.exp(torch.randn(n, 1, generator=gen) * 3)).bfloat16()
    x[0, 5] = float("inf") if n > 1 else x[0, 5]  # a non-finite value: the same policy either way
    staged = torch.full((kCapacity, kHidden), -3.0, dtype=torch.bfloat16)
    q = torch.full((kCapacity, kHidden), 0x5A, dtype=torch.uint8)
    s = empty_act_scales(kCapacity, kHidden // 128)
    s.fill_(-7.0)
    count = torch.zeros((), dtype=torch.int64)
    quant_kernels.stage_quant(x, staged, q.view(torch.float8_e4m3fn), s, count, pow2_scale=pow2)
    want_q = torch.full((n, kHidden), 0x5A, dtype=torch.uint8)
    want_s = empty_act_scales(n, kHidden // 128)
    quant_kernels.per_token_group_quant(x, want_q.view(torch.float8_e4m3fn), want_s, 128, pow2,
                                        variant="oneshot")
    assert int(count) == n
    assert torch.equal(staged[:n].view(torch.int16), x.view(torch.int16))
    assert torch.equal(q[:n], want_q), "fp8 values differ from the per-token kernel's"
    assert torch.equal(s[:n].view(torch.int32), want_s.view(torch.int32)), "scales differ"
    # rows past the batch: untouched
    assert (staged[n:] == -3.0).all() and (q[n:] == 0x5A).all() and (s[n:] == -7.0).all()


def test_x_fp8_is_checked():
    from moe_fp8.layers import MoE, MoEConfig
    moe = MoE(MoEConfig.tiny(), seed=3)
    x = torch.randn(5, moe.cfg.hidden_size).bfloat16()
    with torch.no_grad():
        q = torch.zeros(5, moe.cfg.hidden_size, dtype=torch.float8_e4m3fn)
        s = torch.ones(5, moe.cfg.hidden_size // 128)
        moe.forward_masked(x, x_fp8=(q, s))  # the right shapes run
        with pytest.raises(ValueError, match="x_fp8\\[0\\]"):
            moe.forward_masked(x, x_fp8=(q[:4], s))
        with pytest.raises(ValueError, match="x_fp8\\[1\\]"):
            moe.forward_masked(x, x_fp8=(q, s[:, :1]))
        with pytest.raises(TypeError, match="x_fp8"):
            moe.forward_masked(x, x_fp8=q)
        with pytest.raises(ValueError, match="device"):
            moe.forward_masked(x, x_fp8=(q.to("meta"), s))
