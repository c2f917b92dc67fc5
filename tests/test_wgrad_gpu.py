"""GPU tests of the k-grouped FP8 weight-gradient GEMM (``out[e] += a[:, seg_e] . b[:, seg_e]^T``).

Fresh random data every test (rows of very different magnitudes, so a wrong scale shows); the
output starts from random values (it accumulates), and each test checks
* accuracy: the added part, ``out - out_before``, has calc_diff < 1e-3 against the unquantised
  fp32 product of each expert's tokens,
* agreement with the FP8 reference (same block-by-block scale math) to rounding,
* experts without tokens keep their values bit for bit (nothing is added to them, not even 0);
with ``accumulate=False`` the output starts as NaN, every element must be written, and experts
without tokens become zeros; likewise for a bf16 output (overwritten only), within one bf16
rounding of the reference.
"""
from __future__ import annotations

import pytest
import torch

import moe_fp8.gemm as G
from moe_fp8.gemm.heuristics import GemmConfig
from moe_fp8.gemm.kernels import wgrad as W
from moe_fp8.gemm import reference as ref
from moe_fp8.gemm.layout import empty_act_scales, to_mn_major

pytestmark = pytest.mark.gpu


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(seed)


def _token_major(rows: int, tokens: int, gen) -> torch.Tensor:
    """bf16 [rows, tokens], one magnitude per row (a transposed activation / gradient).

    NOTE: rows spanning ~4 decades on both operands let one row pair carry most of calc_diff's
    energy, which made the quantisation error of the data alone noisy (0.4-3.7e-3 over seeds,
    CPU reference, 2026-11-25); e^(0.5 randn) keeps distinct per-row scales at ~6.6e-4."""
    x = torch.randn(rows, tokens, device="cuda", generator=gen)
    mag = torch.exp(torch.randn(rows, 1, device="cuda", generator=gen) * 0.5)
    return (x * mag).to(torch.bfloat16)


def _quant(x: torch.Tensor):
    q, s = ref.per_token_group_quant(x)  # 1 x 128 along tokens
    s_mn = empty_act_scales(x.shape[0], s.shape[1], device="cuda")
    s_mn.copy_(s)
    return q, s_mn


def _offsets(counts) -> torch.Tensor:
    return torch.tensor([0] + list(torch.tensor(counts).cumsum(0).tolist()), dtype=torch.int32,
                        device="cuda")


def _case(m, n, counts, seed, config=None, accumulate=True):
    """``accumulate=False``: out starts as NaN and must be overwritten everywhere (zeros for the
    experts without tokens); else it starts random and gets the products added."""
    gen = _gen(seed)
    tokens = sum(counts)
    x_a, x_b = _token_major(m, tokens, gen), _token_major(n, tokens, gen)
    a, b = _quant(x_a), _quant(x_b)
    offsets = _offsets(counts)
    num_experts = len(counts)
    before = torch.randn(num_experts, m, n, device="cuda", generator=gen)
    out = before.clone() if accumulate else torch.full_like(before, float("nan"))
    if config is None:
        G.k_grouped_fp8_gemm_tn_contiguous(a, b, offsets, out, accumulate=accumulate,
                                           backend="kernel")
    else:
        W.k_grouped_tn(a[0], to_mn_major(a[1]), b[0], to_mn_major(b[1]), offsets, out, config,
                       accumulate=accumulate)
    torch.cuda.synchronize()
    if not accumulate:
        before.zero_()  # the products are compared as added to zero
    reference = before.clone()
    G.k_grouped_fp8_gemm_tn_contiguous(a, b, offsets, reference, backend="reference")
    what = f"wgrad m={m} n={n} counts={counts[:6]} {config} accumulate={accumulate}"
    assert torch.isfinite(out).all(), f"{what}: non-finite or unwritten (NaN) outputs"
    t0 = 0
    for e, count in enumerate(counts):
        if count == 0:
            assert torch.equal(out[e], before[e]), f"{what}: expert {e} has no tokens but changed"
            continue
        want = x_a[:, t0:t0 + count].float() @ x_b[:, t0:t0 + count].float().t()
        added, ref_added = out[e] - before[e], reference[e] - before[e]
        diff = G.calc_diff(added, want)
        limit = 1e-3 if added.numel() >= 65536 else 1.5e-3
        assert diff < limit, f"{what}: expert {e}: calc_diff vs unquantised = {diff:.2e}"
        agree = G.calc_diff(added, ref_added)
        assert agree < 1e-6, f"{what}: expert {e}: calc_diff vs FP8 reference = {agree:.2e}"
        # NOTE: the tensor cores accumulate a K block of FP8 products with fewer mantissa bits
        # than fp32 (the reason for the promotion): ~5e-5 of the largest output was seen.
        err = (added - ref_added).abs()
        tol = 2 ** -7 * ref_added.abs() + 2e-3 * ref_added.abs().amax(dim=-1, keepdim=True)
        assert (err <= tol + 1e-6 * before[e].abs()).all(), \
            f"{what}: expert {e}: max |out - ref| {err.max():.3e}"
        t0 += count


def test_wgrad_deepseek_shape():
    """GEMM2's weight gradient at DeepSeek-V3 sizes (H 7168, I 2048), 2 experts x 4096 tokens."""
    _case(7168, 2048, [4096, 4096], seed=1)


@pytest.mark.parametrize("m,n", [(4096, 7168), (256, 384), (200, 160), (64, 96), (333, 1024)])
def test_wgrad_uneven_experts(m, n):
    # empty experts (first, middle, last), odd and even K-block counts, one 128-token expert
    counts = [0, 384, 128, 0, 1024, 256, 0]
    _case(m, n, counts, seed=m + n)


kPinned = [GemmConfig(128, 128, cluster_m=1), GemmConfig(128, 128, cluster_m=2),
           GemmConfig(64, 128), GemmConfig(128, 64, cluster_m=2),
           GemmConfig(128, 128, double_buffer=False, stages=2),
           GemmConfig(128, 96, num_sms=5, group_n=2), GemmConfig(128, 128, double_buffer=2),
           GemmConfig(128, 128, cluster_m=2, double_buffer=2),
           GemmConfig(128, 192, cluster_m=2), GemmConfig(128, 192, num_sms=3),
           # fp32 staged in two 128-column passes (EpilogueAddF32); N = 800 ends mid-pass
           GemmConfig(128, 256, cluster_m=2), GemmConfig(128, 256, num_sms=3)]


@pytest.mark.parametrize("config", kPinned, ids=lambda c: f"{c.block_m}x{c.block_n}s{c.stages}"
                         f"c{c.cluster_m}d{int(c.double_buffer)}p{c.num_sms}")
def test_wgrad_pinned_configs(config):
    # M = 333: three row blocks, so a multicast pair has a phantom half
    _case(333, 800, [256, 0, 640, 128], seed=config.block_n + config.cluster_m, config=config)


@pytest.mark.parametrize("config", [None] + kPinned[:6] + kPinned[-2:], ids=lambda c: "auto" if c is None else
                         f"{c.block_m}x{c.block_n}s{c.stages}c{c.cluster_m}d{int(c.double_buffer)}")
def test_wgrad_overwrites(config):
    """accumulate=False: every expert's block written, zeros for the experts without tokens
    (first, middle, last), whatever was there (NaN) before."""
    _case(333, 800, [0, 256, 0, 640, 128, 0], seed=17 + (config.block_n if config else 0),
          config=config, accumulate=False)


def test_wgrad_overwrites_deepseek_shape():
    _case(4096, 7168, [1024, 0, 2048, 128], seed=19, accumulate=False)


def _case_bf16(m, n, counts, seed, config=None):
    """bf16 out (overwritten): starts as NaN, every element written, zeros for the experts
    without tokens; each expert within bf16 rounding of the fp32 FP8 reference and calc_diff
    < 1e-3 against the unquantised product."""
    gen = _gen(seed)
    tokens = sum(counts)
    x_a, x_b = _token_major(m, tokens, gen), _token_major(n, tokens, gen)
    a, b = _quant(x_a), _quant(x_b)
    offsets = _offsets(counts)
    out = torch.full((len(counts), m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    if config is None:
        G.k_grouped_fp8_gemm_tn_contiguous(a, b, offsets, out, accumulate=False, backend="kernel")
    else:
        W.k_grouped_tn(a[0], to_mn_major(a[1]), b[0], to_mn_major(b[1]), offsets, out, config,
                       accumulate=False)
    torch.cuda.synchronize()
    reference = torch.empty(len(counts), m, n, device="cuda")
    G.k_grouped_fp8_gemm_tn_contiguous(a, b, offsets, reference, accumulate=False,
                                       backend="reference")
    what = f"wgrad bf16 m={m} n={n} counts={counts[:6]} {config}"
    assert torch.isfinite(out).all(), f"{what}: non-finite or unwritten (NaN) outputs"
    t0 = 0
    for e, count in enumerate(counts):
        got = out[e].float()
        if count == 0:
            assert bool((got == 0).all()), f"{what}: expert {e} has no tokens but is not zero"
            continue
        want = x_a[:, t0:t0 + count].float() @ x_b[:, t0:t0 + count].float().t()
        diff = G.calc_diff(got, want)
        assert diff < (1e-3 if got.numel() >= 65536 else 1.5e-3), \
            f"{what}: expert {e}: calc_diff vs unquantised = {diff:.2e}"
        # one bf16 rounding (2^-9 relative) of a sum that may differ from the reference's by the
        # tensor cores' K-block accumulation (see _case)
        err = (got - reference[e]).abs()
        tol = 2 ** -8 * reference[e].abs() + 2e-3 * reference[e].abs().amax(dim=-1, keepdim=True)
        assert (err <= tol).all(), f"{what}: expert {e}: max |out - ref| {err.max():.3e}"
        t0 += count


def test_wgrad_bf16_out_deepseek_shapes():
    _case_bf16(7168, 2048, [2048, 0, 1024, 128], seed=21)
    _case_bf16(4096, 7168, [1024, 0, 384], seed=22)


@pytest.mark.parametrize("config", [None, GemmConfig(128, 128, cluster_m=2),
                                    GemmConfig(128, 192, cluster_m=2, stages=3),
                                    GemmConfig(64, 128), GemmConfig(128, 96, num_sms=5, group_n=2),
                                    GemmConfig(128, 256, cluster_m=2),
                                    GemmConfig(128, 256, num_sms=3)],
                         ids=lambda c: "auto" if c is None else
                         f"{c.block_m}x{c.block_n}s{c.stages}c{c.cluster_m}p{c.num_sms}")
def test_wgrad_bf16_out(config):
    # M = 333: a multicast pair's phantom half; N = 808: a partial last column block, N % 8 == 0
    _case_bf16(333, 808, [0, 256, 0, 640, 128, 0], seed=23, config=config)


def test_wgrad_bf16_out_rejects_accumulate():
    gen = _gen(6)
    a, b = _quant(_token_major(128, 256, gen)), _quant(_token_major(128, 256, gen))
    out = torch.empty(1, 128, 128, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="accumulate=False"):
        G.k_grouped_fp8_gemm_tn_contiguous(a, b, _offsets([256]), out, backend="kernel")


def test_wgrad_accumulates_and_skips_empty_experts():
    """All tokens in expert 1, run twice: experts 0 and 2 untouched, expert 1 gets 2 products."""
    gen = _gen(3)
    m, n, tokens = 256, 256, 512
    a, b = _quant(_token_major(m, tokens, gen)), _quant(_token_major(n, tokens, gen))
    out = torch.randn(3, m, n, device="cuda", generator=gen)
    before = out.clone()
    offsets = _offsets([0, tokens, 0])
    reference = before.clone()
    for _ in range(2):
        G.k_grouped_fp8_gemm_tn_contiguous(a, b, offsets, out, backend="kernel")
        G.k_grouped_fp8_gemm_tn_contiguous(a, b, offsets, reference, backend="reference")
    torch.cuda.synchronize()
    assert torch.equal(out[0], before[0]) and torch.equal(out[2], before[2])
    assert G.calc_diff(out[1] - before[1], reference[1] - before[1]) < 1e-6


def test_wgrad_graph_replays_with_new_offsets():
    """Captured once; offsets change between replays (device-side, no host sync in the op)."""
    gen = _gen(4)
    m, n, tokens = 256, 384, 1024
    x_a, x_b = _token_major(m, tokens, gen), _token_major(n, tokens, gen)
    a, b = _quant(x_a), _quant(x_b)
    offsets = _offsets([512, 512, 0])
    out = torch.zeros(3, m, n, device="cuda")
    G.k_grouped_fp8_gemm_tn_contiguous(a, b, offsets, out, backend="kernel")  # load first
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        W.k_grouped_tn(a[0], a[1], b[0], b[1], offsets, out)
    torch.cuda.current_stream().wait_stream(stream)
    for counts in ([0, 256, 768], [1024, 0, 0], [128, 640, 256]):
        offsets.copy_(_offsets(counts))
        out.zero_()
        graph.replay()
        reference = torch.zeros_like(out)
        G.k_grouped_fp8_gemm_tn_contiguous(a, b, offsets, reference, backend="reference")
        torch.cuda.synchronize()
        for e, count in enumerate(counts):
            if count == 0:
                assert (out[e] == 0).all(), f"replay {counts}: expert {e} written"
            else:
                assert G.calc_diff(out[e], reference[e]) < 1e-6, f"replay {counts}: expert {e}"
