"""Quantisation kernels (include/quant.cuh) vs the reference, bit for bit, on a Hopper GPU.

NOTE on the oracle: the reference divides amax by the Python scalar 448, which torch's CUDA
backend computes as a multiplication by fp32(1/448) (its "CPU scalar divisor" fast path) while
the CPU backend divides; the two disagree in the last bit for about half of all amax values.
The kernels implement the documented math (IEEE division), so the quantisation step of the
reference runs on CPU copies here. SiLU(gate) * up is formed by torch on the GPU, exactly as the
reference does it (its expf is the device one), and then quantised by the CPU reference.
"""
import pytest
import torch
import torch.nn.functional as F

from moe_fp8.gemm import reference as ref
from moe_fp8.gemm.layout import empty_act_scales

from kernel_checks import poisoned_fp8, varied_rows

pytestmark = pytest.mark.gpu
FP8 = torch.float8_e4m3fn


def quant():
    from moe_fp8.gemm.kernels import quant as module
    return module


VARIANTS = ("stream", "oneshot")  # kernels.quant.kVariants


make_input = varied_rows  # on the GPU


def fp8_nan(q):
    """e4m3fn has two NaN codes (0x7F, 0xFF): compare NaN-ness, not the sign bit of a NaN."""
    return (q.view(torch.uint8).cpu() & 0x7F) == 0x7F


def assert_bits_equal_nan(actual_q, expected_q, actual_s, expected_s):
    """assert_bits_equal for inputs with inf/NaN: NaN positions must agree, all else bit for bit."""
    a_s, e_s = actual_s.cpu(), expected_s.cpu()
    assert torch.equal(a_s.isnan(), e_s.isnan()), "NaN scales differ"
    keep = ~e_s.isnan()
    assert torch.equal(a_s[keep], e_s[keep]), \
        f"scales differ at {((a_s != e_s) & keep).nonzero()[:5].tolist()}"
    a_nan, e_nan = fp8_nan(actual_q), fp8_nan(expected_q)
    assert torch.equal(a_nan, e_nan), f"{int((a_nan != e_nan).sum())} fp8 NaN positions differ"
    a_q, e_q = actual_q.view(torch.uint8).cpu(), expected_q.view(torch.uint8).cpu()
    diff = (a_q != e_q) & ~e_nan
    assert not diff.any(), f"{int(diff.sum())} fp8 bytes differ, e.g. {diff.nonzero()[:5].tolist()}"


def assert_bits_equal(actual_q, expected_q, actual_s, expected_s):
    assert torch.equal(actual_s.cpu(), expected_s.cpu()), \
        f"scales differ at {(actual_s.cpu() != expected_s.cpu()).nonzero()[:5].tolist()}"
    q_diff = actual_q.view(torch.uint8).cpu() != expected_q.view(torch.uint8).cpu()
    assert not q_diff.any(), f"{int(q_diff.sum())} fp8 bytes differ, e.g. {q_diff.nonzero()[:5].tolist()}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("shape", [(1, 128), (7, 384), (129, 7168), (1000, 2048), (3, 17, 256),
                                   (4096, 1024), (5, 3001, 512)])
def test_per_token_group_quant(shape, dtype, pow2):
    x = make_input(shape, dtype, seed=hash((shape, pow2)) % 1000)
    m, k = shape[-2], shape[-1]
    batch = shape[0] if len(shape) == 3 else None
    q = poisoned_fp8(shape)
    s = empty_act_scales(m, k // 128, batch, device="cuda")
    s.fill_(float("nan"))
    quant().per_token_group_quant(x, q, s, 128, pow2)
    expected_q, expected_s = ref.per_token_group_quant(x.cpu(), 128, pow2)
    assert_bits_equal(q, expected_q, s, expected_s)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("shape", [(7, 384), (3, 17, 256), (4096, 1024), (5, 3001, 512)])
def test_per_token_group_quant_variants(shape, dtype, pow2, variant):
    """Each kernel variant forced (the stream kernel loops on the two larger shapes)."""
    x = make_input(shape, dtype, seed=hash((shape, variant)) % 1000)
    m, k = shape[-2], shape[-1]
    batch = shape[0] if len(shape) == 3 else None
    q = poisoned_fp8(shape)
    s = empty_act_scales(m, k // 128, batch, device="cuda")
    s.fill_(float("nan"))
    quant().per_token_group_quant(x, q, s, 128, pow2, variant=variant)
    expected_q, expected_s = ref.per_token_group_quant(x.cpu(), 128, pow2)
    assert_bits_equal(q, expected_q, s, expected_s)


def e4m3_midpoints():
    """Midpoints between adjacent positive finite e4m3 values below 440 (exact in fp32)."""
    values = torch.arange(0, 127, dtype=torch.uint8).view(FP8).float()
    values = values[values < 440]
    return (values[1:] + values[:-1]) / 2


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("pow2", [False, True])
def test_per_token_division_midpoints_zeros_subnormals(pow2, variant):
    """x / scale within a few ulps of an fp8 rounding midpoint (ties to even), -0, subnormals."""
    gen = torch.Generator().manual_seed(21)
    rows, groups = 512, 8
    amax = torch.pow(10.0, torch.empty(rows, groups, 1).uniform_(-6, 6, generator=gen))
    scale = amax / torch.full_like(amax, 448.0)  # IEEE, as the kernels form it
    mids = e4m3_midpoints()
    picks = mids[torch.randint(len(mids), (rows, groups, 128), generator=gen)]
    x = picks * scale  # fp32-rounded: the quotient lands within ~1 ulp of the midpoint
    for _ in range(2):  # then nudge by -2..+2 ulps
        step = torch.randint(-1, 2, x.shape, generator=gen)
        x = torch.where(step > 0, torch.nextafter(x, torch.full_like(x, float("inf"))), x)
        x = torch.where(step < 0, torch.nextafter(x, torch.zeros_like(x)), x)
    x = x * torch.where(torch.rand(x.shape, generator=gen) < 0.5, -1.0, 1.0)
    x[..., 0] = amax[..., 0]  # fixes the group's amax
    x[:, :, 1] = -0.0
    x[:, :, 2] = 1e-40  # fp32 subnormal
    x[:, :, 3] = -3e-45
    x = x.reshape(rows, groups * 128).cuda()
    q = poisoned_fp8(x.shape)
    s = empty_act_scales(rows, groups, device="cuda")
    quant().per_token_group_quant(x, q, s, 128, pow2, variant=variant)
    expected_q, expected_s = ref.per_token_group_quant(x.cpu(), 128, pow2)
    assert_bits_equal(q, expected_q, s, expected_s)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("pow2", [False, True])
def test_per_token_inf_nan(dtype, pow2, variant):
    """inf/NaN groups: scale inf or NaN, values x / inf and x / NaN as IEEE division gives them."""
    x = make_input((6, 512), dtype, seed=4).cpu()
    x[0, 5] = float("inf")
    x[1, 300] = -float("inf")
    x[2, 7] = float("nan")
    x[3, 0:128:2] = float("inf")
    x[3, 1:128:2] = -float("inf")
    x = x.cuda()
    q = poisoned_fp8(x.shape)
    s = empty_act_scales(6, 4, device="cuda")
    quant().per_token_group_quant(x, q, s, 128, pow2, variant=variant)
    expected_q, expected_s = ref.per_token_group_quant(x.cpu(), 128, pow2)
    assert_bits_equal_nan(q, expected_q, s, expected_s)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("shape", [(128, 128), (200, 384), (1, 256), (3, 300, 256), (4096, 1024)])
def test_per_block_quant(shape, dtype, pow2):
    w = make_input(shape, dtype, seed=len(shape) + shape[-2])
    n, k = shape[-2], shape[-1]
    q = poisoned_fp8(shape)
    s = torch.full((*shape[:-2], -(-n // 128), k // 128), float("nan"), device="cuda")
    quant().per_block_quant(w, q, s, 128, pow2)
    expected_q, expected_s = ref.per_block_quant(w.cpu(), 128, pow2)
    assert_bits_equal(q, expected_q, s, expected_s)


def silu_reference(h, pow2):
    gate, up = h.float().chunk(2, dim=-1)
    y = F.silu(gate) * up  # on the GPU, as the reference computes it
    return ref.per_token_group_quant(y.cpu(), 128, pow2)


def make_h(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(shape, generator=gen) * 4
    flat = h.view(-1, shape[-1])
    if flat.shape[0] > 3:
        flat[0] = 0
        flat[1, ::2] = 80.0  # exp(-g) underflows; silu(g) = g
        flat[2, ::2] = -120.0  # exp(-g) overflows; silu(g) = -0
    return h.to(torch.bfloat16).cuda()


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("shape", [(1, 256), (5, 512), (333, 4096), (2048, 4096)])
def test_silu_and_mul_quant_contiguous(shape, pow2):
    h = make_h(shape, seed=shape[0])
    m, i = shape[0], shape[1] // 2
    q = poisoned_fp8((m, i))
    s = empty_act_scales(m, i // 128, device="cuda")
    s.fill_(float("nan"))
    quant().silu_and_mul_quant(h, q, s, None, 128, pow2)
    expected_q, expected_s = silu_reference(h, pow2)
    assert_bits_equal(q, expected_q, s, expected_s)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("shape", [(5, 512), (2048, 4096), (3, 700, 1024)])
def test_silu_and_mul_quant_contiguous_variants(shape, pow2, variant):
    """Each kernel variant forced (the stream kernel loops on the two larger shapes)."""
    h = make_h(shape, seed=shape[-2] + 1)
    i = shape[-1] // 2
    q = poisoned_fp8((*shape[:-1], i))
    s = empty_act_scales(shape[-2], i // 128, shape[0] if len(shape) == 3 else None, device="cuda")
    s.fill_(float("nan"))
    quant().silu_and_mul_quant(h, q, s, None, 128, pow2, variant=variant)
    expected_q, expected_s = silu_reference(h, pow2)
    assert_bits_equal(q, expected_q, s, expected_s)


def make_h_special(m, i, seed):
    """SiLU inputs at the edges of the fast division: d = 1 + exp(-g) near and above 2^126
    (g in [-89, -80], multiplied by a huge up so the tiny silu matters), tiny and subnormal g,
    signed zeros, and (row 6 on) +-inf / NaN."""
    gen = torch.Generator().manual_seed(seed)
    gate = torch.randn(m, i, generator=gen) * 4
    up = torch.randn(m, i, generator=gen) * 4
    gate[0] = -torch.linspace(80, 89, i)  # crosses d = 2^126 at g ~ -87.34 and d = inf at -88.72
    up[0] = 3e36
    gate[1] = -torch.linspace(80, 87.3, i)  # fast path up to d just below 2^126
    up[1] = -2e36
    gate[2] = torch.pow(10.0, -torch.linspace(30, 38, i)) * torch.sign(torch.randn(i, generator=gen))
    up[2] = 1e30
    gate[3, ::4] = 9e-41  # bf16 subnormals
    up[3] = 1e36
    gate[4, ::2] = -0.0
    gate[5] = -0.0
    up[5, ::3] = -0.0
    if m > 8:
        gate[6, 3] = float("inf")
        gate[7, 200] = -float("inf")
        gate[8, 0] = float("nan")
        up[8, 300] = float("inf")
    return torch.cat([gate, up], dim=-1).to(torch.bfloat16).cuda()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("pow2", [False, True])
def test_silu_and_mul_quant_special_values(pow2, variant):
    m, i = 12, 512
    h = make_h_special(m, i, seed=9)
    q = poisoned_fp8((m, i))
    s = empty_act_scales(m, i // 128, device="cuda")
    quant().silu_and_mul_quant(h, q, s, None, 128, pow2, variant=variant)
    expected_q, expected_s = silu_reference(h, pow2)
    assert_bits_equal_nan(q, expected_q, s, expected_s)
    # the finite rows must match bit for bit without NaN leniency
    assert_bits_equal(q[:6], expected_q[:6], s[:6], expected_s[:6])


def check_masked(h, q, s, q_before, s_before, masked_m, pow2):
    expected_q, expected_s = silu_reference(h, pow2)
    for e, rows in enumerate(masked_m.tolist()):
        assert_bits_equal(q[e, :rows], expected_q[e, :rows], s[e, :rows], expected_s[e, :rows])
        # rows past masked_m[e] untouched
        assert torch.equal(q[e, rows:].view(torch.uint8), q_before[e, rows:].view(torch.uint8))
        assert torch.equal(s[e, rows:].isnan(), s_before[e, rows:].isnan())


MASKED_VARIANTS = (None, "stream", "oneshot")  # None: the op's own choice


@pytest.mark.parametrize("variant", MASKED_VARIANTS)
@pytest.mark.parametrize("pow2", [False, True])
def test_silu_and_mul_quant_masked(pow2, variant):
    experts, m_max, i = 6, 37, 512
    h = make_h((experts, m_max, 2 * i), seed=7)
    masked_m = torch.tensor([0, m_max, 1, 20, 36, 5], dtype=torch.int32, device="cuda")
    q = poisoned_fp8((experts, m_max, i))
    s = empty_act_scales(m_max, i // 128, experts, device="cuda")
    s.fill_(float("nan"))
    q_before, s_before = q.clone(), s.clone()
    quant().silu_and_mul_quant(h, q, s, masked_m, 128, pow2, variant=variant)
    check_masked(h, q, s, q_before, s_before, masked_m, pow2)


@pytest.mark.parametrize("variant", MASKED_VARIANTS)
def test_silu_and_mul_quant_masked_many_experts_and_clamping(variant):
    """600 experts (prefix sums over 5 tiles of 128: 4 preloaded + the loop), counts outside
    [0, M_max] clamped (the kernel must never address past the tensors)."""
    experts, m_max, i = 600, 3, 256
    h = make_h((experts, m_max, 2 * i), seed=13)
    gen = torch.Generator().manual_seed(5)
    counts = torch.randint(0, m_max + 1, (experts,), generator=gen)
    counts[7], counts[500], counts[599] = m_max + 9, -4, 2**30
    masked_m = counts.to(torch.int32).cuda()
    q = poisoned_fp8((experts, m_max, i))
    s = empty_act_scales(m_max, i // 128, experts, device="cuda")
    s.fill_(float("nan"))
    q_before, s_before = q.clone(), s.clone()
    quant().silu_and_mul_quant(h, q, s, masked_m, 128, False, variant=variant)
    check_masked(h, q, s, q_before, s_before, masked_m.clamp(0, m_max), False)


@pytest.mark.parametrize("variant", MASKED_VARIANTS)
def test_silu_and_mul_quant_masked_full_load(variant):
    """Every row valid and more chunks than one machine of threads: the grid-stride loop wraps
    across experts several times."""
    experts, m_max, i = 8, 2048, 1024
    h = make_h((experts, m_max, 2 * i), seed=17)
    masked_m = torch.tensor([m_max, 0, 1, m_max, m_max - 1, 5, m_max, 100], dtype=torch.int32,
                            device="cuda")
    q = poisoned_fp8((experts, m_max, i))
    s = empty_act_scales(m_max, i // 128, experts, device="cuda")
    s.fill_(float("nan"))
    q_before, s_before = q.clone(), s.clone()
    quant().silu_and_mul_quant(h, q, s, masked_m, 128, True, variant=variant)
    check_masked(h, q, s, q_before, s_before, masked_m, True)


@pytest.mark.parametrize("variant", MASKED_VARIANTS)
def test_silu_and_mul_quant_masked_graph_replay(variant):
    experts, m_max, i = 4, 64, 2048
    h = make_h((experts, m_max, 2 * i), seed=11)
    masked_m = torch.tensor([3, 0, 64, 17], dtype=torch.int32, device="cuda")
    q = poisoned_fp8((experts, m_max, i))
    s = empty_act_scales(m_max, i // 128, experts, device="cuda")
    quant().silu_and_mul_quant(h, q, s, masked_m, 128, False, variant=variant)  # load first
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        quant().silu_and_mul_quant(h, q, s, masked_m, 128, False, variant=variant)
    gen = torch.Generator().manual_seed(3)
    for counts in ([0, 0, 0, 0], [64, 1, 2, 63], [5, 64, 0, 31]):
        h.copy_(make_h((experts, m_max, 2 * i), seed=int(torch.randint(99, (1,), generator=gen))))
        masked_m.copy_(torch.tensor(counts, dtype=torch.int32))
        q.view(torch.uint8).random_(0, 256)
        s.fill_(float("nan"))
        q_before, s_before = q.clone(), s.clone()
        graph.replay()
        torch.cuda.synchronize()
        check_masked(h, q, s, q_before, s_before, masked_m, False)


@pytest.mark.parametrize("expected_m", [None, 1, 16, 64])
def test_public_masked_silu_expected_m_hint(expected_m):
    """The public op with the expected_m hint (a quarter of M_max or more: the one-shot kernel)
    writes the same bits as the reference on the valid rows and leaves the others alone."""
    import moe_fp8.gemm as G
    experts, m_max, i = 5, 64, 512
    h = make_h((experts, m_max, 2 * i), seed=21)
    masked_m = torch.tensor([0, 64, 17, 1, 40], dtype=torch.int32, device="cuda")
    q = poisoned_fp8((experts, m_max, i))
    s = empty_act_scales(m_max, i // 128, experts, device="cuda")
    s.fill_(float("nan"))
    q_before, s_before = q.clone(), s.clone()
    G.silu_and_mul_quant_fp8(h, masked_m=masked_m, out=(q, s), backend="kernel", expected_m=expected_m)
    check_masked(h, q, s, q_before, s_before, masked_m, False)


def test_public_ops_route_to_the_kernels():
    """The lead's public ops, backend='kernel', agree with the direct host calls."""
    import moe_fp8.gemm as G
    x = make_input((300, 1024), torch.bfloat16, seed=5)
    q, s = G.per_token_group_quant_fp8(x, backend="kernel")
    q2 = poisoned_fp8(x.shape)
    s2 = empty_act_scales(300, 8, device="cuda")
    quant().per_token_group_quant(x, q2, s2, 128, False)
    assert_bits_equal(q, q2, s, s2)
