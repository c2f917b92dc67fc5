"""Training quantisation kernels (include/transpose_quant.cuh, include/silu_backward.cuh) against
their references, bit for bit.

Two backends run the same checks (as tests/test_permute_gpu.py does):

* ``cuda`` (marker ``gpu``): the kernels through the JIT on a Hopper GPU, DeepSeek-V3 widths
  included. SiLU backward's elementwise part (exp, reciprocal, products) is formed by torch on the
  GPU, exactly as ``reference.silu_mul_backward`` writes it (torch's exp is the device expf the
  kernel calls); every quantisation step of the oracle runs on CPU copies (IEEE division).
* ``emulated`` (CPU, no GPU): the same headers compiled with g++ (one std::thread per CUDA thread,
  shared memory as statics, shuffles through per-warp barriers, the few inline-PTX helpers of
  quant.cuh replaced by plain C++), launched through the same host files. It checks indexing,
  transposition, reductions and argument plumbing on small shapes; its expf is the C library's,
  so the SiLU oracle there is formed on the CPU and compared with a tolerance of a few values.

Outputs are poisoned before each launch (random fp8 bytes, NaN scales) so that any element the
kernel fails to write is caught.
"""
import pytest
import torch

import moe_fp8.gemm as G
from moe_fp8.gemm import reference as ref
from moe_fp8.gemm.layout import build_m_indices, ceil_div, empty_act_scales, segment_offsets

from kernel_checks import (EmulatedKernel, compile_harness, kQuantPrelude, launch_code, poisoned_fp8,
                           varied_rows)

FP8 = torch.float8_e4m3fn


def tq():
    from moe_fp8.gemm.kernels import transpose_quant as module
    return module


def sb():
    from moe_fp8.gemm.kernels import silu_backward as module
    return module


# ----------------------------------------------------------------------------- CPU emulation

kHarness = kQuantPrelude + r'''
#include "silu_backward.cuh"

''' + launch_code([
    "moe_fp8::quant::per_block_quant_transpose_kernel<__nv_bfloat16, false>",
    "moe_fp8::quant::per_block_quant_transpose_kernel<__nv_bfloat16, true>",
    "moe_fp8::quant::per_block_quant_transpose_kernel<float, false>",
    "moe_fp8::quant::per_block_quant_transpose_kernel<float, true>",
    "moe_fp8::quant::token_transpose_quant_kernel<__nv_bfloat16, false, false>",
    "moe_fp8::quant::token_transpose_quant_kernel<__nv_bfloat16, true, false>",
    "moe_fp8::quant::token_transpose_quant_kernel<float, false, false>",
    "moe_fp8::quant::token_transpose_quant_kernel<float, true, false>",
    "moe_fp8::quant::token_transpose_quant_kernel<__nv_fp8_storage_t, false, true>",
    "moe_fp8::quant::token_transpose_quant_kernel<__nv_fp8_storage_t, true, true>",
    "moe_fp8::quant::silu_and_mul_backward_quant_kernel<false>",
    "moe_fp8::quant::silu_and_mul_backward_quant_kernel<true>",
])


@pytest.fixture(scope="session")
def emulator(tmp_path_factory):
    """The harness above compiled with g++ (C++20), loaded with ctypes."""
    return compile_harness(tmp_path_factory.mktemp("train_quant_emulation"), kHarness,
                           "train_quant_emulation")


@pytest.fixture(params=[pytest.param("cuda", marks=pytest.mark.gpu), "emulated"])
def device(request, monkeypatch):
    """-> "cuda" (the real kernels) or "cpu" (the emulated kernels through the same host files)."""
    if request.param == "emulated":
        lib = request.getfixturevalue("emulator")
        for module in (tq(), sb()):
            monkeypatch.setattr(module, "get_kernel", lambda src, *a: EmulatedKernel(lib, src))
        return "cpu"
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs an sm_90 GPU")
    return "cuda"


def big(device):
    """Full DeepSeek-V3 widths only on the GPU (the emulation runs a thread per CUDA thread)."""
    return device == "cuda"


# ----------------------------------------------------------------------------- helpers

make_input = varied_rows


def nan_scales(rows, groups, device):
    s = empty_act_scales(rows, groups, device=device)
    s.fill_(float("nan"))
    return s


def assert_bits_equal(actual_q, expected_q, actual_s, expected_s, what=""):
    a_s, e_s = actual_s.cpu(), expected_s.cpu()
    assert torch.equal(a_s, e_s), \
        f"{what}: scales differ at {(a_s != e_s).nonzero()[:5].tolist()}"
    diff = actual_q.cpu().view(torch.uint8) != expected_q.cpu().view(torch.uint8)
    assert not diff.any(), f"{what}: {int(diff.sum())} fp8 bytes differ, e.g. {diff.nonzero()[:5].tolist()}"


# ----------------------------------------------------------------------------- 128x128 + transpose

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("shape", [(128, 128), (3, 256, 384), (1, 4096, 7168), (2, 7168, 2048)])
def test_per_block_quant_transpose(device, shape, dtype, pow2):
    if shape[-1] * shape[-2] > 256 * 384 and not big(device):
        pytest.skip("DeepSeek-V3 widths run on the GPU only")
    w = make_input(shape, dtype, seed=sum(shape) + pow2, device=device)
    n, k = shape[-2:]
    lead = shape[:-2]
    q, qt = poisoned_fp8(shape, device), poisoned_fp8((*lead, k, n), device)
    s = torch.full((*lead, n // 128, k // 128), float("nan"), device=device)
    st = torch.full((*lead, k // 128, n // 128), float("nan"), device=device)
    tq().per_block_quant_transpose(w, q, s, qt, st, 128, pow2)
    (eq, es), (eqt, est) = ref.per_block_quant_transpose(w.cpu(), 128, pow2)
    assert_bits_equal(q, eq, s, es, "copy")
    assert_bits_equal(qt, eqt, st, est, "transposed copy")
    # the composition the fused op replaces: quantising w^T gives the same bytes
    cq, cs = ref.per_block_quant(w.cpu().transpose(-2, -1).contiguous(), 128, pow2)
    assert_bits_equal(qt, cq, st, cs, "vs quantise(w^T)")


# ----------------------------------------------------------------------------- along tokens

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("tokens,channels", [(1, 128), (7, 256), (128, 128), (300, 384),
                                             (1000, 128), (4096, 7168), (16383, 2048)])
def test_token_transpose_quant(device, tokens, channels, dtype, pow2):
    if tokens * channels > 1000 * 384 and not big(device):
        pytest.skip("large shapes run on the GPU only")
    x = make_input((tokens, channels), dtype, seed=tokens + channels + pow2, device=device)
    groups = ceil_div(tokens, 128)
    q, s = poisoned_fp8((channels, tokens), device), nan_scales(channels, groups, device)
    tq().token_transpose_quant(x, q, s, 128, pow2)
    eq, es = ref.transpose_token_group_quant(x.cpu(), 128, pow2)
    assert_bits_equal(q, eq, s, es, f"T={tokens} C={channels}")


def test_token_transpose_quant_extreme_columns(device):
    """A zero channel, a NaN-free extreme channel and subnormal quotients, along tokens."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(200, 256, generator=gen)
    x[:, 0] = 0
    x[::2, 1] = 3e38
    x[1::2, 1] = -1e38
    x[:, 2] *= 1e-30
    x[:, 3] *= torch.pow(10.0, torch.empty(200).uniform_(-6, 6, generator=gen))
    x = x.to(device)
    q, s = poisoned_fp8((256, 200), device), nan_scales(256, 2, device)
    tq().token_transpose_quant(x, q, s, 128, False)
    eq, es = ref.transpose_token_group_quant(x.cpu(), 128, False)
    assert_bits_equal(q, eq, s, es)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("counts,channels", [([5, 0, 130], 256), ([0, 300, 7], 128),
                                             ([600, 0, 1234, 257], 7168)])
def test_token_transpose_quant_row_mask(device, counts, channels, dtype):
    """dY's padding rows (m_indices -1, here huge garbage) read as zero: no masked copy needed."""
    if sum(counts) * channels > 1000 * 384 and not big(device):
        pytest.skip("large shapes run on the GPU only")
    m_indices = build_m_indices(counts)
    tokens = m_indices.shape[0]
    x = make_input((tokens, channels), dtype, seed=tokens, device="cpu")
    x[m_indices < 0] = 1e30
    x, m_indices = x.to(device), m_indices.to(device)
    q, s = poisoned_fp8((channels, tokens), device), nan_scales(channels, ceil_div(tokens, 128), device)
    tq().token_transpose_quant(x, q, s, 128, False, m_indices)
    eq, es = ref.transpose_token_group_quant(x.cpu(), 128, False, m_indices.cpu())
    assert_bits_equal(q, eq, s, es, f"counts={counts}")


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("counts,channels", [([1], 128), ([5, 0, 130], 256), ([0, 300, 0], 384),
                                             ([600, 0, 1234, 257], 7168)])
def test_token_transpose_requant(device, counts, channels, pow2):
    """x' of the backward: the forward's fp8 rows (MN-major 1x128 scales) dequantised, padding
    rows zero, re-quantised along tokens; extreme row scales and NaN-free garbage in padding."""
    if sum(counts) * channels > 1000 * 384 and not big(device):
        pytest.skip("large shapes run on the GPU only")
    m_indices = build_m_indices(counts)
    tokens = m_indices.shape[0]
    x = make_input((tokens, channels), torch.float32, seed=tokens + channels, device="cpu")
    x[m_indices < 0] = 1e30  # padding garbage must not reach the scales
    q, s = G.per_token_group_quant_fp8(x.to(device), pow2_scale=pow2)
    m_indices = m_indices.to(device)
    qt = poisoned_fp8((channels, tokens), device)
    st = nan_scales(channels, ceil_div(tokens, 128), device)
    tq().token_transpose_requant(q, s, m_indices, qt, st, 128, pow2)
    eq, es = ref.transpose_token_group_requant(q.cpu(), s.cpu(), m_indices.cpu(), 128, pow2)
    assert_bits_equal(qt, eq, st, es, f"counts={counts}")
    # without a mask: every row counts
    tq().token_transpose_requant(q, s, None, qt, st, 128, pow2)
    eq, es = ref.transpose_token_group_requant(q.cpu(), s.cpu(), None, 128, pow2)
    assert_bits_equal(qt, eq, st, es, "no mask")


@pytest.mark.gpu
def test_token_transpose_feeds_wgrad_like_the_composition():
    """The op's output is exactly the operand the k-grouped GEMM read before (transposed copy +
    row quantiser), so the weight gradient is identical, empty experts included."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs an sm_90 GPU")
    gen = torch.Generator(device="cuda").manual_seed(1)
    counts = [300, 0, 129, 0, 1, 640]
    m_indices = build_m_indices(counts, device="cuda")
    tokens = m_indices.shape[0]
    offsets = segment_offsets(counts).cuda()
    dy = torch.randn(tokens, 512, generator=gen, device="cuda").to(torch.bfloat16)
    x = torch.randn(tokens, 384, generator=gen, device="cuda")
    dy[m_indices < 0] = 0
    x[m_indices < 0] = 0
    fused = (G.transpose_token_group_quant_fp8(dy), G.transpose_token_group_quant_fp8(x))
    plain = (G.per_token_group_quant_fp8(dy.t().contiguous()),
             G.per_token_group_quant_fp8(x.t().contiguous()))
    for (qf, sf), (qp, sp) in zip(fused, plain):
        assert_bits_equal(qf, qp, sf, sp)
    outs = []
    for a, b in (fused, plain):
        out = torch.zeros(len(counts), 512, 384, device="cuda")
        outs.append(G.k_grouped_fp8_gemm_tn_contiguous(a, b, offsets, out))
    # identical operands; the GEMM's fp32 reduce-add order is its own business
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)
    assert bool((outs[0][1] == 0).all()) and bool((outs[0][3] == 0).all())


# ----------------------------------------------------------------------------- SiLU backward

def silu_backward_oracle(d_act, h, pow2, device):
    """(dh rows, dh^T, act^T) pairs: the elementwise part on ``device`` (torch), the
    quantisations on the CPU."""
    d_h, act = ref.silu_mul_backward(d_act, h)
    d_h, act = d_h.cpu(), act.cpu()
    return (ref.per_token_group_quant(d_h, 128, pow2),
            ref.transpose_token_group_quant(d_h, 128, pow2),
            ref.transpose_token_group_quant(act, 128, pow2))


def silu_inputs(rows, inter, seed, device):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, 2 * inter, generator=gen) * 3
    d_act = torch.randn(rows, inter, generator=gen)
    d_act *= torch.pow(10.0, torch.empty(rows, 1).uniform_(-3, 3, generator=gen))
    if rows > 4:
        h[0] = 0  # a zero token
        h[1, :inter:7] = -100.0  # exp overflows: sig = 0, silu = -0
        h[2, :inter:5] = 60.0  # sig = 1
        d_act[3] = 0
    return d_act.to(torch.bfloat16).to(device), h.to(torch.bfloat16).to(device)


def run_silu_backward(d_act, h, pow2, device):
    rows, inter = d_act.shape
    groups = ceil_div(rows, 128)
    dh = (poisoned_fp8((rows, 2 * inter), device), nan_scales(rows, 2 * inter // 128, device))
    dh_t = (poisoned_fp8((2 * inter, rows), device), nan_scales(2 * inter, groups, device))
    act_t = (poisoned_fp8((inter, rows), device), nan_scales(inter, groups, device))
    sb().silu_and_mul_backward_quant(d_act, h, *dh, *dh_t, *act_t, 128, pow2)
    return dh, dh_t, act_t


def assert_close_fp8(actual, expected, what, max_bad_fraction):
    """The emulation's expf is the C library's: allow a few values one code apart."""
    (aq, a_s), (eq, e_s) = actual, expected
    assert not a_s.isnan().any(), f"{what}: unwritten scales"
    torch.testing.assert_close(a_s.cpu(), e_s, rtol=1e-5, atol=0, msg=what)
    diff = (aq.cpu().view(torch.uint8).int() - eq.view(torch.uint8).int()).abs()
    bad = (diff > 0).float().mean().item()
    assert bad <= max_bad_fraction and int((diff > 1).sum()) <= max(2, diff.numel() // 10000), \
        f"{what}: {bad:.2%} bytes differ"


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("rows,inter", [(1, 128), (5, 256), (128, 128), (300, 256), (1000, 128),
                                        (4096, 2048), (16384, 2048), (777, 1536)])
def test_silu_and_mul_backward_quant(device, rows, inter, pow2):
    if rows * inter > 300 * 256 and not big(device):
        pytest.skip("large shapes run on the GPU only")
    d_act, h = silu_inputs(rows, inter, seed=rows + inter + pow2, device=device)
    outputs = run_silu_backward(d_act, h, pow2, device)
    expected = silu_backward_oracle(d_act, h, pow2, device)
    names = ("dh rows", "dh^T", "act^T")
    for name, got, want in zip(names, outputs, expected):
        if device == "cuda":
            assert_bits_equal(got[0], want[0], got[1], want[1], f"{name} M={rows} I={inter}")
        else:
            assert_close_fp8(got, want, f"{name} M={rows} I={inter}", 0.01)


@pytest.mark.gpu
def test_silu_backward_public_op_and_layout():
    """Through the public op (MN-major scales, kernel picked on Hopper) vs backend='reference'."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs an sm_90 GPU")
    d_act, h = silu_inputs(640, 512, seed=5, device="cuda")
    got = G.silu_and_mul_backward_quant_fp8(d_act, h, backend="kernel")
    expected = silu_backward_oracle(d_act, h, False, "cuda")
    for (q, s), (eq, es) in zip(got, expected):
        assert s.stride(0) == 1  # MN-major, what the GEMMs read without a copy
        assert_bits_equal(q, eq, s, es)
