"""CPU tests of the pure-torch references and the public ops on CPU (they run the references)."""
import pytest
import torch

import moe_fp8.gemm as G
from moe_fp8.gemm import layout, reference as ref
from moe_fp8.shapes import DENSE_EDGE_SHAPES, UNEVEN_EXPERT_COUNTS

FP8 = torch.float8_e4m3fn


def randn(*shape, gen, dtype=torch.bfloat16, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


def float64_blockscaled(qa, sa, qb, sb_rows):
    """Independent oracle: dequantise in float64, then one matmul."""
    a = qa.double() * sa.double().repeat_interleave(128, dim=1)
    b = qb.double() * sb_rows.double().repeat_interleave(128, dim=1)
    return a @ b.t()


# ----------------------------------------------------------------------------- quantisation

@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("m,k", [(1, 128), (7, 384), (33, 1024)])
def test_token_group_quant_round_trip(gen, m, k, pow2):
    x = randn(m, k, gen=gen, scale=3.0)
    q, s = G.per_token_group_quant_fp8(x, pow2_scale=pow2)
    assert q.dtype == FP8 and s.shape == (m, k // 128) and layout.is_mn_major(s)
    xf = x.float()
    amax = xf.view(m, -1, 128).abs().amax(-1)
    if pow2:
        log2 = torch.log2(s)
        assert torch.equal(log2, log2.round()), "scales must be powers of two"
        assert (s >= amax / 448).all() and (s < 2 * amax / 448).all()
    else:
        assert torch.equal(s, amax / 448)
        # the group's amax lands exactly on the fp8 maximum
        assert torch.equal(q.float().view(m, -1, 128).abs().amax(-1), torch.full_like(amax, 448.0))
    err = (ref.dequant_rows(q, s) - xf).abs()
    scale_rows = s.repeat_interleave(128, dim=1)
    # e4m3: 3 mantissa bits -> relative rounding error <= 2^-4; subnormal step 2^-9 (x scale)
    assert (err <= xf.abs() * 2 ** -4 + scale_rows * 2 ** -10).all()


def test_token_group_quant_zero_and_extreme_rows(gen):
    x = randn(4, 256, gen=gen)
    x[1] = 0
    x[2, :128] = 1e30
    x[3, 5] = -3e38
    q, s = G.per_token_group_quant_fp8(x.float())
    floor_scale = torch.tensor(ref.kAmaxFloor, dtype=torch.float32) / 448
    assert torch.equal(s[1], floor_scale.expand(2)) and (q[1].float() == 0).all()
    assert s[2, 0] == x[2, 0].float() / 448  # x is bf16: compare with its rounded value
    assert q[3, 5].float().item() == -448.0
    assert torch.isfinite(q.float()).all()


def test_token_group_quant_nan_is_visible(gen, monkeypatch):
    x = randn(2, 256, gen=gen)
    x[0, 3] = float("nan")
    x[1, 200] = float("inf")
    _, s = G.per_token_group_quant_fp8(x)
    assert torch.isnan(s[0, 0]) and torch.isinf(s[1, 1]), "non-finite input must not give a finite scale"
    assert torch.isfinite(s[0, 1]) and torch.isfinite(s[1, 0])
    monkeypatch.setenv("MOE_FP8_CHECKS", "1")
    with pytest.raises(ValueError, match="x contains NaN"):
        G.per_token_group_quant_fp8(x)


def test_token_group_quant_batched(gen):
    x = randn(3, 5, 256, gen=gen)
    q, s = G.per_token_group_quant_fp8(x)
    assert s.shape == (3, 5, 2) and layout.is_mn_major(s)
    for e in range(3):
        qe, se = G.per_token_group_quant_fp8(x[e])
        assert torch.equal(q[e].view(torch.uint8), qe.view(torch.uint8)) and torch.equal(s[e], se)


@pytest.mark.parametrize("shape", [(128, 128), (200, 384), (3, 130, 256)])
def test_block_quant(gen, shape):
    w = randn(*shape, gen=gen, scale=0.05)
    q, s = G.per_block_quant_fp8(w)
    n, k = shape[-2:]
    assert s.shape == (*shape[:-2], -(-n // 128), k // 128)
    wf = w.float()
    padded = torch.nn.functional.pad(wf, (0, 0, 0, -n % 128))
    blocks = padded.unflatten(-1, (k // 128, 128)).unflatten(-3, (-1, 128))
    assert torch.equal(s, blocks.abs().amax(dim=(-3, -1)) / 448)
    err = (ref.dequant_blocks(q, s) - wf).abs()
    s_full = s.repeat_interleave(128, -2)[..., :n, :].repeat_interleave(128, -1)
    assert (err <= wf.abs() * 2 ** -4 + s_full * 2 ** -10).all()


def test_ceil_pow2_exact():
    values = torch.tensor([1.0, 0.75, 2.0 ** -20, 3.0, 448.0, 1e-10 / 448])
    expected = torch.tensor([1.0, 1.0, 2.0 ** -20, 4.0, 512.0, 2.0 ** -42])
    assert torch.equal(ref.ceil_pow2(values), expected)


@pytest.mark.parametrize("masked", [False, True])
def test_silu_and_mul_quant(gen, masked):
    inter = 256
    h = randn(3, 9, 2 * inter, gen=gen, scale=2.0)
    masked_m = torch.tensor([0, 9, 4], dtype=torch.int32) if masked else None
    poison = (torch.full((3, 9, inter), float("nan")).to(FP8), layout.empty_act_scales(9, 2, 3).fill_(-1))
    q, s = G.silu_and_mul_quant_fp8(h, masked_m=masked_m, out=poison)
    expected = torch.nn.functional.silu(h[..., :inter].float()) * h[..., inter:].float()
    rq, rs = ref.per_token_group_quant(expected)
    rows = ref.masked_row_mask(9, masked_m) if masked else torch.ones(3, 9, dtype=torch.bool)
    assert torch.equal(q[rows].view(torch.uint8), rq[rows].view(torch.uint8))
    assert torch.equal(s[rows], rs[rows])
    assert torch.isnan(q[~rows].float()).all() and (s[~rows] == -1).all(), "masked rows were written"


# ----------------------------------------------------------------------------- GEMMs

@pytest.mark.parametrize("m,n,k", DENSE_EDGE_SHAPES)
def test_dense_gemm_matches_float64_and_unquantised(gen, m, n, k):
    x, w = randn(m, k, gen=gen), randn(n, k, gen=gen, scale=0.1)
    a, b = G.per_token_group_quant_fp8(x), G.per_block_quant_fp8(w)
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16)
    G.fp8_gemm_nt(a, b, out=out)
    assert not torch.isnan(out).any()
    exact = float64_blockscaled(a[0], a[1], b[0], ref._expand_block_scales(b[1], n))
    # the only rounding left is fp32 accumulation and the final bf16 cast
    assert ((out.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-4).all()
    assert G.calc_diff(out, x.float() @ w.float().t()) < 1e-3


def test_dense_gemm_m0():
    a = G.per_token_group_quant_fp8(torch.randn(0, 128))
    b = G.per_block_quant_fp8(torch.randn(16, 128))
    assert G.fp8_gemm_nt(a, b).shape == (0, 16)


def test_grouped_contiguous(gen):
    counts = UNEVEN_EXPERT_COUNTS
    num_experts, n, k = len(counts), 144, 256
    m_indices = layout.build_m_indices(counts)
    x = randn(m_indices.numel(), k, gen=gen)
    w = randn(num_experts, n, k, gen=gen, scale=0.1)
    a, b = G.per_token_group_quant_fp8(x), G.per_block_quant_fp8(w)
    out = torch.full((m_indices.numel(), n), float("nan"), dtype=torch.bfloat16)
    G.m_grouped_fp8_gemm_nt_contiguous(a, b, m_indices, out=out)
    valid = m_indices >= 0
    assert torch.isnan(out[~valid].float()).all(), "padding rows must stay untouched"
    assert not torch.isnan(out[valid].float()).any()
    for e in range(num_experts):
        rows = m_indices == e
        if rows.any():
            dense = G.fp8_gemm_nt((a[0][rows], a[1][rows]), (b[0][e], b[1][e]))
            assert torch.equal(out[rows], dense)
            assert G.calc_diff(out[rows], x[rows].float() @ w[e].float().t()) < 1e-3


def test_grouped_contiguous_zero_padding(gen):
    """zero_padding=True: the padding rows of a NaN-poisoned out become zeros, the rest as
    without it."""
    counts = UNEVEN_EXPERT_COUNTS
    m_indices = layout.build_m_indices(counts)
    x = randn(m_indices.numel(), 256, gen=gen)
    w = randn(len(counts), 144, 256, gen=gen, scale=0.1)
    a, b = G.per_token_group_quant_fp8(x), G.per_block_quant_fp8(w)
    skipped = G.m_grouped_fp8_gemm_nt_contiguous(a, b, m_indices)
    out = torch.full((m_indices.numel(), 144), float("nan"), dtype=torch.bfloat16)
    G.m_grouped_fp8_gemm_nt_contiguous(a, b, m_indices, out=out, zero_padding=True)
    valid = m_indices >= 0
    assert (out[~valid] == 0).all()
    assert torch.equal(out[valid], skipped[valid])


def test_grouped_masked(gen):
    num_experts, m_max, n, k = 4, 37, 160, 384  # M_max deliberately not a multiple of 64
    masked_m = torch.tensor([0, 37, 1, 20], dtype=torch.int32)
    x = randn(num_experts, m_max, k, gen=gen)
    w = randn(num_experts, n, k, gen=gen, scale=0.1)
    a, b = G.per_token_group_quant_fp8(x), G.per_block_quant_fp8(w)
    out = torch.full((num_experts, m_max, n), float("nan"), dtype=torch.bfloat16)
    G.m_grouped_fp8_gemm_nt_masked(a, b, masked_m, expected_m=16, out=out)
    rows = ref.masked_row_mask(m_max, masked_m)
    assert torch.isnan(out[~rows].float()).all() and not torch.isnan(out[rows].float()).any()
    for e, m in enumerate(masked_m.tolist()):
        if m:
            assert G.calc_diff(out[e, :m], x[e, :m].float() @ w[e].float().t()) < 1e-3


def test_k_grouped_weight_gradient(gen):
    counts = [128, 0, 384, 256]
    offsets = layout.segment_offsets(counts)
    tokens, n, k = int(offsets[-1]), 144, 256
    dy, x = randn(tokens, n, gen=gen), randn(tokens, k, gen=gen)
    a = G.per_token_group_quant_fp8(dy.t().contiguous())  # 1x128 along tokens
    b = G.per_token_group_quant_fp8(x.t().contiguous())
    start = torch.randn(len(counts), n, k, generator=gen)
    out = start.clone()
    G.k_grouped_fp8_gemm_tn_contiguous(a, b, offsets, out)
    for e in range(len(counts)):
        t0, t1 = int(offsets[e]), int(offsets[e + 1])
        grad = out[e] - start[e]
        if t1 == t0:
            assert torch.equal(out[e], start[e]), "an empty expert must leave its gradient unchanged"
            continue
        exact = float64_blockscaled(a[0][:, t0:t1], a[1][:, t0 // 128:t1 // 128],
                                    b[0][:, t0:t1], b[1][:, t0 // 128:t1 // 128])
        assert G.calc_diff(grad, exact) < 1e-6
        assert G.calc_diff(grad, dy[t0:t1].float().t() @ x[t0:t1].float()) < 1e-3
    # accumulate=False: the same products over whatever was there, zeros for the empty expert
    fresh = torch.full_like(start, float("nan"))
    G.k_grouped_fp8_gemm_tn_contiguous(a, b, offsets, fresh, accumulate=False)
    assert torch.equal(fresh[1], torch.zeros_like(fresh[1]))
    for e in (0, 2, 3):
        assert torch.allclose(fresh[e], out[e] - start[e], rtol=1e-5, atol=1e-4)
    # bf16 out (overwritten): the fp32 products rounded once, zeros for the empty expert
    half = torch.full(start.shape, float("nan"), dtype=torch.bfloat16)
    G.k_grouped_fp8_gemm_tn_contiguous(a, b, offsets, half, accumulate=False)
    assert torch.equal(half, fresh.bfloat16())


# ----------------------------------------------------------------------------- helpers

def test_calc_diff_properties(gen):
    x = torch.randn(100, generator=gen)
    assert G.calc_diff(x, x) == pytest.approx(0.0, abs=1e-12)
    assert G.calc_diff(x, -x) == pytest.approx(2.0)
    assert G.calc_diff(torch.zeros(3), torch.zeros(3)) == 0.0


def test_layout_helpers_exact():
    m_indices = layout.build_m_indices([2, 0, 129])
    expected = [0, 0] + [-1] * 126 + [2] * 129 + [-1] * 127
    assert m_indices.dtype == torch.int32 and m_indices.tolist() == expected
    assert layout.segment_offsets([2, 0, 129]).tolist() == [0, 128, 128, 384]
    s = layout.empty_act_scales(6, 3)
    assert s.shape == (6, 3) and s.stride() == (1, 8) and layout.is_mn_major(s)
    sb = layout.empty_act_scales(5, 2, batch=3)
    assert sb.shape == (3, 5, 2) and sb.stride() == (16, 1, 8) and layout.is_mn_major(sb)
    dense = torch.arange(12.0).view(6, 2)
    assert not layout.is_mn_major(dense)
    converted = layout.to_mn_major(dense)
    assert layout.is_mn_major(converted) and torch.equal(converted, dense)


# ----------------------------------------------------------------------------- training quantisation

@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("shape", [(128, 128), (256, 384), (3, 384, 256)])
def test_per_block_quant_transpose_equals_quantising_the_transpose(gen, shape, pow2):
    w = randn(*shape, gen=gen, scale=0.1, dtype=torch.float32)
    (q, s), (q_t, s_t) = G.per_block_quant_transpose_fp8(w, pow2_scale=pow2)
    pq, ps = G.per_block_quant_fp8(w, pow2_scale=pow2)
    tq, ts = G.per_block_quant_fp8(w.transpose(-2, -1).contiguous(), pow2_scale=pow2)
    assert torch.equal(q.view(torch.uint8), pq.view(torch.uint8)) and torch.equal(s, ps)
    assert torch.equal(q_t.view(torch.uint8), tq.view(torch.uint8)) and torch.equal(s_t, ts)
    assert q_t.is_contiguous() and s_t.is_contiguous()


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("tokens", [0, 1, 127, 128, 129, 300, 512])
def test_transpose_token_group_quant_equals_row_quant_of_the_transpose(gen, tokens, pow2):
    """Along tokens = the row quantiser on x^T (zero-padded to whole 128-token groups)."""
    x = randn(tokens, 256, gen=gen, scale=2.0)
    q, s = G.transpose_token_group_quant_fp8(x, pow2_scale=pow2)
    groups = layout.ceil_div(tokens, 128)
    assert q.shape == (256, tokens) and s.shape == (256, groups) and layout.is_mn_major(s)
    padded = torch.zeros(groups * 128, 256, dtype=x.dtype)
    padded[:tokens] = x
    pq, ps = G.per_token_group_quant_fp8(padded.t().contiguous(), pow2_scale=pow2)
    assert torch.equal(q.view(torch.uint8), pq[:, :tokens].view(torch.uint8))
    assert torch.equal(s, ps)
    if tokens:  # dequantised back within fp8 rounding of x^T
        back = q.float() * s.repeat_interleave(128, dim=1)[:, :tokens]
        torch.testing.assert_close(back, x.float().t(), rtol=0.07, atol=1e-4)  # fp8 subnormal steps


def test_transpose_token_group_quant_groups_stay_inside_aligned_segments(gen):
    """With the contiguous layout's 128-aligned segments, each scale sees one expert's tokens."""
    counts = [5, 0, 130]
    m_indices = layout.build_m_indices(counts)
    x = randn(m_indices.shape[0], 128, gen=gen)
    x[m_indices < 0] = 0
    x[: 128] *= 1000  # expert 0 is large: its scale must not leak into expert 2's groups
    _, s = G.transpose_token_group_quant_fp8(x)
    offsets = layout.segment_offsets(counts).tolist()
    for e in range(len(counts)):
        for g in range(offsets[e] // 128, offsets[e + 1] // 128):
            seg = x[g * 128:(g + 1) * 128].float().abs().amax(0)
            assert torch.equal(s[:, g], seg.clamp_min(1e-10) / torch.full_like(seg, 448.0))


def test_silu_mul_backward_matches_autograd():
    gen = torch.Generator().manual_seed(11)
    h = torch.randn(37, 256, generator=gen, dtype=torch.float64, requires_grad=True)
    d_act = torch.randn(37, 128, generator=gen, dtype=torch.float64)
    gate, up = h.chunk(2, dim=-1)
    act = torch.nn.functional.silu(gate) * up
    act.backward(d_act)
    d_h, act_ref = ref.silu_mul_backward(d_act, h.detach())
    assert d_h.dtype == torch.float64
    torch.testing.assert_close(d_h, h.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(act_ref, act.detach(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("rows", [1, 5, 128, 300])
def test_silu_and_mul_backward_quant_equals_the_composition(gen, rows, pow2):
    """The fused op = the SiLU backward in fp32, then the row quantiser and the along-token
    quantiser of dH and act (what layers/autograd.py composed before the fused op)."""
    h = randn(rows, 512, gen=gen, scale=3.0)
    d_act = randn(rows, 256, gen=gen)
    (dq, ds), (dtq, dts), (atq, ats) = G.silu_and_mul_backward_quant_fp8(d_act, h, pow2_scale=pow2)
    d_h, act = ref.silu_mul_backward(d_act, h)
    assert d_h.dtype == torch.float32 and act.shape == (rows, 256)
    pq, ps = G.per_token_group_quant_fp8(d_h, pow2_scale=pow2)
    assert torch.equal(dq.view(torch.uint8), pq.view(torch.uint8)) and torch.equal(ds, ps)
    assert layout.is_mn_major(ds) and layout.is_mn_major(dts) and layout.is_mn_major(ats)
    for (q, s), value in (((dtq, dts), d_h), ((atq, ats), act)):
        eq, es = G.transpose_token_group_quant_fp8(value, pow2_scale=pow2)
        assert torch.equal(q.view(torch.uint8), eq.view(torch.uint8)) and torch.equal(s, es)
        assert q.shape == (value.shape[1], rows)


@pytest.mark.parametrize("pow2", [False, True])
def test_transpose_token_group_requant_equals_dequant_mask_then_quant(gen, pow2):
    counts = [3, 0, 140]
    m_indices = layout.build_m_indices(counts)
    x = randn(m_indices.shape[0], 256, gen=gen, scale=4.0)
    x[m_indices < 0] = 1e4  # padding garbage
    a = G.per_token_group_quant_fp8(x)
    q, s = G.transpose_token_group_requant_fp8(a, m_indices=m_indices, pow2_scale=pow2)
    x_val = ref.dequant_rows(*a).masked_fill((m_indices < 0).unsqueeze(1), 0)
    eq, es = G.transpose_token_group_quant_fp8(x_val, pow2_scale=pow2)
    assert torch.equal(q.view(torch.uint8), eq.view(torch.uint8)) and torch.equal(s, es)
    q2, s2 = G.transpose_token_group_requant_fp8(a)  # no mask: garbage rows count
    assert s2.max() > s.max()


def test_transpose_token_group_quant_row_mask(gen):
    m_indices = layout.build_m_indices([3, 0, 140])
    x = randn(m_indices.shape[0], 128, gen=gen)
    masked = x.masked_fill((m_indices < 0).unsqueeze(1), 0)
    x[m_indices < 0] = 1e4
    q, s = G.transpose_token_group_quant_fp8(x, m_indices=m_indices)
    eq, es = G.transpose_token_group_quant_fp8(masked)
    assert torch.equal(q.view(torch.uint8), eq.view(torch.uint8)) and torch.equal(s, es)
