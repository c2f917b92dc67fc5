"""NaN / Inf / zero-block policy of the quantisation ops and the GEMMs (docs/RELIABILITY.md).

Per group (1x128 activations, 128x128 weights), as moe_fp8/gemm/reference.py defines it:

* a NaN anywhere in the group -> scale NaN, every value of the group NaN (x / NaN);
* +-inf in the group (no NaN) -> scale +inf, the inf values NaN (inf / inf), the others 0,
  so the whole group dequantises to NaN (0 x inf);
* an all-zero group -> scale 1e-10 / 448 (pow2: its power-of-two ceiling), values 0;
  any group with amax below 1e-10 gets that same floor scale;
* finite inputs, even near the dtype's maximum, never give an inf scale or a non-finite value;
* a poisoned group never changes another group's scale or values;
* MOE_FP8_CHECKS=1: the quantisation ops raise ValueError naming the input instead.

Through the GEMMs: a non-finite activation group makes its whole output row non-finite, a
non-finite weight block makes its 128 output columns non-finite, for every row; every other
output stays finite and equal to the clean computation. Rows a masked GEMM does not read (beyond
``masked_m``) may hold anything, NaN included, without effect. Never a finite wrong answer.

Each test runs on the CPU (references) and, marked ``gpu``, on CUDA tensors (kernels), where the
same assertions hold; on the GPU non-finite groups compare by *which* values are non-finite, finite
ones bit for bit against the reference.
"""
import pytest
import torch

import moe_fp8.gemm as G
from moe_fp8.gemm import layout, reference as ref

FP8 = torch.float8_e4m3fn
NAN, INF = float("nan"), float("inf")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def floor_scale(pow2: bool) -> torch.Tensor:
    s = torch.tensor(ref.kAmaxFloor, dtype=torch.float32) / torch.tensor(ref.kFp8Max)
    return ref.ceil_pow2(s) if pow2 else s


def randn(*shape, seed=0, device="cpu", dtype=torch.float32, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)


def group_view(t: torch.Tensor) -> torch.Tensor:
    """``[.., K]`` -> ``[.., K/128, 128]``."""
    return t.unflatten(-1, (t.shape[-1] // 128, 128))


def block_view(t: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` (N padded to 128 with NaN-free zeros) -> ``[N/128, K/128, 128 * 128]``."""
    n, k = t.shape
    padded = torch.nn.functional.pad(t, (0, 0, 0, (-n) % 128))
    return padded.unflatten(0, (-1, 128)).unflatten(-1, (k // 128, 128)).permute(0, 2, 1, 3).flatten(2)


def check_groups(q, s, expected_q, expected_s, views, exact_nonfinite: bool):
    """Per group: non-finite scales exactly where the reference has them (and the same kind:
    NaN vs inf), then every value of such a group dequantises to non-finite; finite groups bit-equal."""
    qg, eqg = views(q.float()), views(expected_q.float())
    s, es = s.float(), expected_s.float()
    assert torch.equal(torch.isnan(s), torch.isnan(es)), "NaN scales differ from the policy"
    assert torch.equal(torch.isposinf(s), torch.isposinf(es)), "inf scales differ from the policy"
    bad = ~torch.isfinite(s)
    deq = qg * s.unsqueeze(-1)
    assert not torch.isfinite(deq[bad]).any(), "a non-finite group dequantised to a finite value"
    good = ~bad
    assert torch.equal(s[good], es[good])
    assert torch.equal(views(q.view(torch.uint8).float())[good],
                       views(expected_q.view(torch.uint8).float())[good])
    if exact_nonfinite:  # reference vs itself: also the NaN positions inside poisoned groups
        assert torch.equal(torch.isnan(qg[bad]), torch.isnan(eqg[bad]))


# ----------------------------------------------------------------------------- quantisation

def poisoned_activations(dtype, device):
    """x [6, 512]: one feature per row (NaN, +inf, -inf, zero group, below-floor group, huge)."""
    x = randn(6, 512, seed=1, dtype=torch.float32)
    x[0, 5] = NAN                     # group (0, 0)
    x[1, 300] = INF                   # group (1, 2)
    x[2, 130] = -INF                  # group (2, 1)
    x[3, 256:384] = 0.0               # group (3, 2): all zero
    x[4, 0:128] *= 1e-13              # group (4, 0): amax below the 1e-10 floor
    big = torch.finfo(dtype).max / 2
    x[5] = torch.where(x[5] > 0, big, -big) * torch.rand(512, generator=torch.Generator().manual_seed(2))
    return x.to(dtype).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("pow2", [False, True])
def test_per_token_group_quant_policy(device, dtype, pow2):
    x = poisoned_activations(dtype, device)
    q, s = G.per_token_group_quant_fp8(x, pow2_scale=pow2)
    eq, es = ref.per_token_group_quant(x.cpu(), 128, pow2)
    q, s = q.cpu(), s.cpu()
    assert torch.isnan(s[0, 0]) and torch.isnan(q[0, :128].float()).all()
    for row, group, col in ((1, 2, 300), (2, 1, 130)):
        assert s[row, group] == INF
        values = q[row, group * 128:(group + 1) * 128].float()
        assert torch.isnan(values[col - group * 128])
        assert (values[torch.arange(128) != col - group * 128] == 0).all()
    assert s[3, 2] == floor_scale(pow2) and (q[3, 256:384].view(torch.uint8) == 0).all()
    assert s[4, 0] == floor_scale(pow2)
    assert torch.isfinite(s[5]).all() and torch.isfinite(q[5].float()).all()
    deq, xf = ref.dequant_rows(q[5:6], s[5:6]), x[5:6].float().cpu()
    assert ((deq - xf).abs() <= xf.abs() * 2 ** -4 + s[5:6].repeat_interleave(128, 1) * 2 ** -9).all()
    check_groups(q, s, eq, es, group_view, exact_nonfinite=device == "cpu")
    # locality: replacing the poisoned groups by clean data changes no other group
    clean = x.clone()
    clean[0, :128], clean[1, 256:384], clean[2, 128:256] = 1.0, 1.0, 1.0
    cq, cs = G.per_token_group_quant_fp8(clean, pow2_scale=pow2)
    untouched = torch.ones(6, 4, dtype=torch.bool)
    untouched[0, 0] = untouched[1, 2] = untouched[2, 1] = False
    assert torch.equal(s[untouched], cs.cpu()[untouched])
    assert torch.equal(group_view(q.view(torch.uint8))[untouched], group_view(cq.cpu().view(torch.uint8))[untouched])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("pow2", [False, True])
def test_per_block_quant_policy(device, dtype, pow2):
    w = randn(200, 384, seed=3, scale=0.05)        # 2 x 3 blocks; the last row-block is partial
    w[5, 7] = NAN                                 # block (0, 0)
    w[150, 300] = -INF                            # block (1, 2), in the partial row-block
    w[0:128, 128:256] = 0.0                       # block (0, 1): all zero
    w[128:200, 0:128] = 0.0                       # block (1, 0): partial and all zero
    w = w.to(dtype).to(device)
    q, s = G.per_block_quant_fp8(w, pow2_scale=pow2)
    eq, es = ref.per_block_quant(w.cpu(), 128, pow2)
    q, s = q.cpu(), s.cpu()
    assert torch.isnan(s[0, 0]) and torch.isnan(q[:128, :128].float()).all()
    assert s[1, 2] == INF and torch.isnan(q[150, 300].float())
    assert (q[128:200, 256:384].float().nan_to_num(0.0) == 0).all()
    assert s[0, 1] == floor_scale(pow2) and s[1, 0] == floor_scale(pow2)
    assert (q[0:128, 128:256].view(torch.uint8) == 0).all() and (q[128:, :128].view(torch.uint8) == 0).all()
    assert torch.isfinite(s[0, 2]) and torch.isfinite(s[1, 1])
    check_groups(q, s, eq, es, block_view, exact_nonfinite=device == "cpu")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("pow2", [False, True])
def test_transpose_token_group_quant_policy(device, dtype, pow2):
    """Along tokens the groups are (channel, 128 tokens): the same policy, transposed."""
    x = poisoned_activations(dtype, device).t().contiguous()  # [512 tokens, 6 channels] -> pad C
    x = torch.nn.functional.pad(x, (0, 122))  # [512, 128]: channels 6.. all zero
    q, s = G.transpose_token_group_quant_fp8(x, pow2_scale=pow2)
    eq, es = ref.transpose_token_group_quant(x.cpu(), 128, pow2)
    q, s = q.cpu(), s.cpu()  # q [128 channels, 512 tokens], s [128, 4]: the row policy's layout
    assert torch.isnan(s[0, 0]) and s[1, 2] == INF and s[2, 1] == INF
    assert s[3, 2] == floor_scale(pow2) and s[4, 0] == floor_scale(pow2)
    assert (s[6:] == floor_scale(pow2)).all() and torch.isfinite(s[5]).all()
    check_groups(q, s, eq, es, group_view, exact_nonfinite=device == "cpu")
    # the fp8-rows form (x' of training) follows the same policy through the dequantisation
    a = G.per_token_group_quant_fp8(x.float())
    rq, rs = G.transpose_token_group_requant_fp8(a, pow2_scale=pow2)
    erq, ers = ref.transpose_token_group_requant(a[0].cpu(), a[1].cpu(), None, 128, pow2)
    assert torch.isnan(rs.cpu()[0, 0]) and not torch.isfinite(rs.cpu()[1, 2])
    check_groups(rq.cpu(), rs.cpu(), erq, ers, group_view, exact_nonfinite=device == "cpu")


@pytest.mark.parametrize("device", DEVICES)
def test_silu_backward_poisoned_token_stays_in_its_groups(device):
    """A NaN in one token's h spoils that token's dH row groups and the (channel, 128-token)
    groups of dH^T / act^T that contain it — nothing else."""
    gen = torch.Generator().manual_seed(8)
    h = torch.randn(300, 512, generator=gen).bfloat16().to(device)
    d_act = torch.randn(300, 256, generator=gen).bfloat16().to(device)
    (dq, ds), (tq, ts), (aq, a_s) = G.silu_and_mul_backward_quant_fp8(d_act, h)
    h[140, 3] = NAN  # gate channel 3 of token 140 (token group 1)
    (pq, ps), (ptq, pts), (paq, pas) = G.silu_and_mul_backward_quant_fp8(d_act, h)
    ds, ps, ts, pts, a_s, pas = (t.cpu() for t in (ds, ps, ts, pts, a_s, pas))
    bad_rows = torch.zeros_like(ps, dtype=torch.bool)
    bad_rows[140, 0] = bad_rows[140, 2] = True  # d_gate and d_up of channel 3 (up uses silu(g))
    assert torch.isnan(ps[bad_rows]).all() and torch.equal(ps[~bad_rows], ds[~bad_rows])
    bad_t = torch.zeros_like(pts, dtype=torch.bool)
    bad_t[3, 1] = bad_t[256 + 3, 1] = True
    assert torch.isnan(pts[bad_t]).all() and torch.equal(pts[~bad_t], ts[~bad_t])
    bad_a = torch.zeros_like(pas, dtype=torch.bool)
    bad_a[3, 1] = True
    assert torch.isnan(pas[bad_a]).all() and torch.equal(pas[~bad_a], a_s[~bad_a])


def silu_reference(h: torch.Tensor, pow2: bool = False):
    """silu(gate) * up in fp32 on h's device (the kernels match torch's device silu bit for bit;
    CPU and GPU exp differ in the last bit), quantised by the CPU reference."""
    gate, up = h.float().chunk(2, dim=-1)
    return ref.per_token_group_quant((torch.nn.functional.silu(gate) * up).cpu(), 128, pow2)


def poisoned_gate_up(device, batch=None):
    """h [M, 2I] bf16 (or [E, M, 2I]), I = 256 (2 groups per row) with non-finite inputs."""
    shape = (8, 512) if batch is None else (batch, 8, 512)
    h = randn(*shape, seed=4)
    rows = h.view(-1, 512)
    rows[0, 5] = NAN             # gate NaN -> group (0, 0)
    rows[1, 256 + 130] = INF     # up inf, gate finite and nonzero -> group (1, 1) inf
    rows[1, 130] = 1.0
    rows[2, 7], rows[2, 256 + 7] = 0.0, INF   # silu(0) * inf = NaN -> group (2, 0)
    rows[3, 200] = -INF          # gate -inf -> group (3, 1)
    rows[4, :128] = 0.0          # gate zero -> product zero: group (4, 0) zero
    rows[5, 128:256] = -200.0    # silu(-200) underflows: group (5, 1) below the floor
    return h.bfloat16().to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pow2", [False, True])
def test_silu_and_mul_quant_policy(device, pow2):
    h = poisoned_gate_up(device)
    q, s = G.silu_and_mul_quant_fp8(h, pow2_scale=pow2)
    eq, es = silu_reference(h, pow2)
    q, s = q.cpu(), s.cpu()
    bad = ~torch.isfinite(s)
    expected_bad = torch.zeros(8, 2, dtype=torch.bool)
    expected_bad[0, 0] = expected_bad[1, 1] = expected_bad[2, 0] = expected_bad[3, 1] = True
    assert torch.equal(bad, expected_bad)
    assert s[4, 0] == floor_scale(pow2) and (q[4, :128].float() == 0).all()  # +-0: silu(0) * up
    assert s[5, 1] == floor_scale(pow2)
    check_groups(q, s, eq, es, group_view, exact_nonfinite=device == "cpu")


@pytest.mark.parametrize("device", DEVICES)
def test_masked_silu_ignores_poison_beyond_masked_m(device):
    """NaN rows beyond masked_m are neither read into other rows nor written."""
    h = randn(3, 8, 512, seed=5).bfloat16().to(device)
    masked_m = torch.tensor([2, 0, 8], dtype=torch.int32, device=device)
    h[0, 2:] = NAN
    h[1] = INF
    q = torch.full((3, 8, 256), 0x3C, dtype=torch.uint8, device=device).view(FP8)  # 1.5, a sentinel
    s = layout.empty_act_scales(8, 2, 3, device=device)
    s.fill_(-7.0)
    G.silu_and_mul_quant_fp8(h, masked_m=masked_m, out=(q, s))
    q, s = q.cpu(), s.cpu()
    assert torch.isfinite(s[0, :2]).all() and torch.isfinite(s[2]).all()
    assert (s[0, 2:] == -7.0).all() and (s[1] == -7.0).all()
    assert (q[0, 2:].view(torch.uint8) == 0x3C).all() and (q[1].view(torch.uint8) == 0x3C).all()
    eq, es = silu_reference(h[2:])
    assert torch.equal(s[2], es[0]) and torch.equal(q[2].view(torch.uint8), eq[0].view(torch.uint8))


@pytest.mark.parametrize("op,name", [
    (lambda x: G.per_token_group_quant_fp8(x), "x"),
    (lambda x: G.per_block_quant_fp8(x), "w"),
    (lambda x: G.silu_and_mul_quant_fp8(x), "h"),
    (lambda x: G.silu_and_mul_quant_fp8(x.view(2, 4, 512), masked_m=torch.tensor([4, 4], dtype=torch.int32, device=x.device)), "h"),
])
@pytest.mark.parametrize("value", [NAN, INF, -INF])
@pytest.mark.parametrize("device", DEVICES)
def test_debug_mode_raises(op, name, value, device, monkeypatch):
    x = randn(8, 512, seed=6, device=device).bfloat16()
    op(x)  # clean input: fine with or without checks
    x[3, 77] = value
    op(x)  # non-finite input without checks: no error (the scale carries it)
    monkeypatch.setenv("MOE_FP8_CHECKS", "1")
    with pytest.raises(ValueError, match=rf"^{name} contains NaN or inf \(MOE_FP8_CHECKS=1\)"):
        op(x)
    x[3, 77] = 0.0
    x[:, :128] = 0.0  # zero groups are not an error
    op(x)


# ----------------------------------------------------------------------------- through the GEMMs

def same_values(x: torch.Tensor, y: torch.Tensor, exact: bool) -> bool:
    """Bit-equal on the CPU; on the GPU within 1e-7 (calc_diff): the clean and poisoned runs
    launch the same kernel, but a reduce-add epilogue need not sum in the same order."""
    return torch.equal(x, y) if exact else G.calc_diff(x, y) < 1e-7


def assert_rows_poisoned(out, bad_rows, clean_out):
    """Rows in ``bad_rows`` entirely non-finite, every other row finite and equal to ``clean_out``."""
    exact = out.device.type == "cpu"
    out, clean_out = out.float().cpu(), clean_out.float().cpu()
    mask = torch.zeros(out.shape[0], dtype=torch.bool)
    mask[list(bad_rows)] = True
    assert not torch.isfinite(out[mask]).any(), "a poisoned row has a finite output"
    assert torch.isfinite(out[~mask]).all(), "poison leaked into another row"
    assert same_values(out[~mask], clean_out[~mask], exact)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("value", [NAN, INF])
def test_dense_gemm_propagates_activation_poison(device, value):
    x = randn(37, 512, seed=7, device=device)
    w = randn(272, 512, seed=8, device=device, scale=0.05)
    b = G.per_block_quant_fp8(w)
    clean = G.fp8_gemm_nt(G.per_token_group_quant_fp8(x), b)
    x[4, 200] = value
    x[30, 511] = -value
    x[11] = 0.0  # a zero row gives exactly zero
    out = G.fp8_gemm_nt(G.per_token_group_quant_fp8(x), b)
    clean[11] = 0.0
    assert_rows_poisoned(out, [4, 30], clean)
    assert (out[11].float() == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_dense_gemm_propagates_weight_poison(device):
    x = randn(9, 384, seed=9, device=device)
    w = randn(272, 384, seed=10, device=device, scale=0.05)  # 3 column blocks, the last partial
    a = G.per_token_group_quant_fp8(x)
    clean = G.fp8_gemm_nt(a, G.per_block_quant_fp8(w)).float().cpu()
    w[140, 300] = NAN  # weight block (1, 2): output columns 128..255, every row
    out = G.fp8_gemm_nt(a, G.per_block_quant_fp8(w)).float().cpu()
    assert not torch.isfinite(out[:, 128:256]).any()
    keep = torch.cat([out[:, :128], out[:, 256:]], 1)
    assert torch.isfinite(keep).all()
    assert same_values(keep, torch.cat([clean[:, :128], clean[:, 256:]], 1), device == "cpu")


@pytest.mark.parametrize("device", DEVICES)
def test_contiguous_gemm_propagates_row_poison(device):
    m_indices = layout.build_m_indices([100, 0, 28], device=device)  # 256 rows, padding included
    x = randn(256, 256, seed=11, device=device)
    b = G.per_block_quant_fp8(randn(3, 144, 256, seed=12, device=device, scale=0.05))
    clean = G.m_grouped_fp8_gemm_nt_contiguous(G.per_token_group_quant_fp8(x), b, m_indices)
    x[3, 10] = NAN      # expert 0
    x[129, 200] = INF   # expert 2
    x[120] = NAN        # a padding row: its output is not written, nothing else changes
    sentinel = torch.full((256, 144), 3.0, dtype=torch.bfloat16, device=device)
    out = G.m_grouped_fp8_gemm_nt_contiguous(G.per_token_group_quant_fp8(x), b, m_indices, out=sentinel)
    real = (m_indices >= 0).cpu()
    assert (out.float().cpu()[~real] == 3.0).all(), "padding rows were written"
    rows = torch.arange(256)[real]
    assert_rows_poisoned(out[real.to(device)], [int((rows == 3).nonzero()), int((rows == 129).nonzero())],
                         clean[real.to(device)])


@pytest.mark.parametrize("device", DEVICES)
def test_masked_gemm_propagates_row_poison_and_ignores_unread_rows(device):
    a_x = randn(3, 16, 384, seed=13, device=device)
    b = G.per_block_quant_fp8(randn(3, 160, 384, seed=14, device=device, scale=0.05))
    masked_m = torch.tensor([5, 0, 16], dtype=torch.int32, device=device)
    clean = G.m_grouped_fp8_gemm_nt_masked(G.per_token_group_quant_fp8(a_x), b, masked_m, 8)
    a_x[0, 2, 5] = NAN       # read
    a_x[2, 15, 383] = -INF   # read
    a_x[0, 9] = NAN          # beyond masked_m[0]: never read
    a_x[1] = INF             # expert 1 has no rows
    out = torch.zeros(3, 16, 160, dtype=torch.bfloat16, device=device)
    G.m_grouped_fp8_gemm_nt_masked(G.per_token_group_quant_fp8(a_x), b, masked_m, 8, out=out)
    out = out.float().cpu()
    assert (out[0, 5:] == 0).all() and (out[1] == 0).all(), "unread rows were written"
    assert_rows_poisoned(out[0, :5], [2], clean[0, :5])
    assert_rows_poisoned(out[2], [15], clean[2])


@pytest.mark.parametrize("device", DEVICES)
def test_wgrad_propagates_token_poison_to_its_expert_only(device):
    tokens, n, k = 384, 144, 256
    offsets = torch.tensor([0, 128, 128, 384], dtype=torch.int32, device=device)  # expert 1 empty
    dy, x = randn(n, tokens, seed=15, device=device), randn(k, tokens, seed=16, device=device)
    b = G.per_token_group_quant_fp8(x)
    clean = G.k_grouped_fp8_gemm_tn_contiguous(G.per_token_group_quant_fp8(dy), b, offsets,
                                               torch.zeros(3, n, k, device=device)).cpu()
    dy[17, 300] = NAN  # row 17 of dY^T, token 300: expert 2
    out = G.k_grouped_fp8_gemm_tn_contiguous(G.per_token_group_quant_fp8(dy), b, offsets,
                                             torch.zeros(3, n, k, device=device)).cpu()
    assert not torch.isfinite(out[2, 17]).any()
    keep = torch.ones(3, n, dtype=torch.bool)
    keep[2, 17] = False
    assert torch.isfinite(out[keep]).all() and same_values(out[keep], clean[keep], device == "cpu")
    assert (out[1] == 0).all()


# ----------------------------------------------------------------------------- through the layer

@pytest.mark.parametrize("device", DEVICES)
def test_layer_poisoned_token_stays_in_its_row(device, monkeypatch):
    from moe_fp8.layers import MoE, MoEConfig
    moe = MoE(MoEConfig.tiny(), device=device, seed=0)
    x = randn(12, 256, seed=17, device=device).bfloat16()
    with torch.no_grad():
        clean, clean_masked = moe(x).float().cpu(), moe.forward_masked(x).float().cpu()
        x[5, 9] = NAN
        for y, reference in ((moe(x), clean), (moe.forward_masked(x), clean_masked)):
            y = y.float().cpu()
            assert not torch.isfinite(y[5]).any()
            others = torch.arange(12) != 5
            assert torch.isfinite(y[others]).all()
            assert G.calc_diff(y[others], reference[others]) < 1e-6
        monkeypatch.setenv("MOE_FP8_CHECKS", "1")
        with pytest.raises(ValueError, match="x contains NaN or inf"):
            moe(x)
