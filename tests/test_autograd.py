"""Training path of the routed experts (moe_fp8/layers/autograd.py).

CPU tests run the public ops' references; the `gpu` test runs the kernels on DeepSeek-V3-ish
shapes. Accuracy rule (issue 7): every gradient's relative error against an fp32 autograd
reference of the same unquantised computation is at most 2x the forward's relative error.
"""
import pytest
import torch
import torch.nn.functional as F

import moe_fp8.gemm as G
from moe_fp8.gemm.layout import build_m_indices
from moe_fp8.layers.autograd import (Fp8WeightCache, expert_offsets, experts_forward_fp8,
                                     experts_forward_torch, fused_train_enabled, kFusedTrainEnv,
                                     kWgradOverwriteEnv, kZeroPadEnv)

kGradToForward = 2.0  # gradient error budget, in units of the forward's error


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in float64 (Frobenius)."""
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm())


def make_problem(counts, hidden, inter, gen, *, master=torch.float32, pad_value=None):
    """Rows of ``len(counts)`` experts (``counts[e]`` real rows each, segments 128-aligned).

    Returns x_rows bf16 [M_sum, H] (padding rows random or ``pad_value``), m_indices int32,
    w13 [E, 2I, H] / w2 [E, H, I] masters (leaf tensors requiring grad), dy bf16 [M_sum, H].
    """
    experts = len(counts)
    m_indices = build_m_indices(counts)
    rows = m_indices.shape[0]
    x = torch.randn(rows, hidden, generator=gen)
    if pad_value is not None:
        x[m_indices < 0] = pad_value
    w13 = torch.randn(experts, 2 * inter, hidden, generator=gen) * hidden ** -0.5
    w2 = torch.randn(experts, hidden, inter, generator=gen) * inter ** -0.5
    dy = torch.randn(rows, hidden, generator=gen).to(torch.bfloat16)
    return (x.to(torch.bfloat16).requires_grad_(), m_indices, w13.to(master).requires_grad_(),
            w2.to(master).requires_grad_(), dy)


def fp8_and_reference(x, m_indices, w13, w2, dy, **kwargs):
    """Forward + backward of the FP8 function and of the fp32 unquantised reference.

    Returns {name: (fp8 value, reference value)} for y, dx (real rows), dw13, dw2.
    """
    y = experts_forward_fp8(x, m_indices, w13, w2, **kwargs)
    y.backward(dy)
    got = {"y": y.detach(), "dx": x.grad, "dw13": w13.grad, "dw2": w2.grad}
    xr, w13r, w2r = (t.detach().float().requires_grad_() for t in (x, w13, w2))
    yr = experts_forward_torch(xr, m_indices, w13r, w2r, grouped_mm=False)
    yr.backward(dy.float())
    want = {"y": yr.detach(), "dx": xr.grad, "dw13": w13r.grad, "dw2": w2r.grad}
    real = m_indices >= 0
    got["dx"], want["dx"] = got["dx"][real], want["dx"][real]
    got["y"], want["y"] = got["y"][real], want["y"][real]
    return {k: (got[k], want[k]) for k in got}


# ----------------------------------------------------------------------------- accuracy

@pytest.mark.parametrize("counts,master", [
    ([130, 0, 5, 300], torch.float32),  # an empty expert, odd counts
    ([1, 127, 128, 129], torch.bfloat16),  # segment-boundary counts, bf16 masters
    ([0, 0, 77, 0], torch.float32),  # one busy expert among empty ones
])
def test_gradients_within_twice_forward_error(gen, counts, master):
    x, m_indices, w13, w2, dy = make_problem(counts, 256, 128, gen, master=master)
    results = fp8_and_reference(x, m_indices, w13, w2, dy)
    errors = {k: rel_err(*v) for k, v in results.items()}
    print("relative errors:", {k: f"{v:.4f}" for k, v in errors.items()})
    assert 0 < errors["y"] < 0.1, errors  # FP8 e4m3 through two GEMMs: a few percent
    assert G.calc_diff(*results["y"]) < 5e-3
    for name in ("dx", "dw13", "dw2"):
        assert errors[name] <= kGradToForward * errors["y"], (name, errors)
    assert results["dw13"][0].dtype == master and results["dw2"][0].dtype == master
    assert x.grad.dtype == torch.bfloat16


def test_pow2_scales_within_budget(gen):
    x, m_indices, w13, w2, dy = make_problem([100, 56], 128, 256, gen)
    errors = {k: rel_err(*v) for k, v in fp8_and_reference(x, m_indices, w13, w2, dy,
                                                             pow2_scale=True).items()}
    assert errors["y"] < 0.1
    for name in ("dx", "dw13", "dw2"):
        assert errors[name] <= kGradToForward * errors["y"], (name, errors)


def test_empty_experts_get_zero_weight_gradient(gen):
    counts = [0, 40, 0, 200, 0]
    x, m_indices, w13, w2, dy = make_problem(counts, 128, 128, gen)
    experts_forward_fp8(x, m_indices, w13, w2).backward(dy)
    for e, c in enumerate(counts):
        assert bool((w13.grad[e] == 0).all()) == (c == 0)
        assert bool((w2.grad[e] == 0).all()) == (c == 0)


# ----------------------------------------------------------------------------- padding rows

def test_padding_rows_give_and_take_no_gradient(gen):
    x, m_indices, w13, w2, dy = make_problem([5, 130, 0, 60], 256, 128, gen)
    pad = m_indices < 0
    y = experts_forward_fp8(x, m_indices, w13, w2)
    assert bool((y[pad] == 0).all())
    y.backward(dy)
    assert bool((x.grad[pad] == 0).all())
    grads = (x.grad.clone(), w13.grad.clone(), w2.grad.clone())

    # large garbage in the padding rows of x and of dY changes nothing (in particular the
    # along-token scales of the weight gradient do not see it)
    x2 = x.detach().clone()
    x2[pad] = 1e4 * torch.randn(int(pad.sum()), x.shape[1], generator=gen).to(x2.dtype)
    x2.requires_grad_()
    dy2 = dy.clone()
    dy2[pad] = 1e4
    for t in (w13, w2):
        t.grad = None
    experts_forward_fp8(x2, m_indices, w13, w2).backward(dy2)
    for got, want in zip((x2.grad, w13.grad, w2.grad), grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# ----------------------------------------------------------------------------- reference mode

def test_reference_mode_passes_gradcheck():
    gen = torch.Generator().manual_seed(7)
    # tiny, unaligned: 3 experts (expert 1 empty), padding rows first, inside and at the end
    m_indices = torch.tensor([-1, 0, 0, -1, 2, 2, 2, -1], dtype=torch.int32)
    x = torch.randn(8, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    w13 = torch.randn(3, 6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(3, 4, 3, generator=gen, dtype=torch.float64, requires_grad=True)

    def fn(x, w13, w2):
        return experts_forward_fp8(x, m_indices, w13, w2, reference=True)

    assert torch.autograd.gradcheck(fn, (x, w13, w2), eps=1e-6, atol=1e-8)


def test_reference_mode_equals_plain_autograd(gen):
    """The structure gradcheck verified is the one the FP8 path runs (same Function, same saved
    tensors, offsets and padding handling); at 128-aligned sizes it equals torch autograd."""
    x, m_indices, w13, w2, dy = make_problem([130, 0, 5, 300], 256, 128, gen)
    x = x.detach().float().requires_grad_()
    y = experts_forward_fp8(x, m_indices, w13, w2, reference=True)
    y.backward(dy.float())
    got = (y.detach(), x.grad, w13.grad, w2.grad)
    xr, w13r, w2r = (t.detach().requires_grad_() for t in (x, w13, w2))
    yr = experts_forward_torch(xr, m_indices, w13r, w2r, grouped_mm=False)
    yr.backward(dy.float())
    for a, b in zip(got, (yr.detach(), xr.grad, w13r.grad, w2r.grad)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- weight cache

def test_weight_cache_reused_until_a_parameter_changes(gen):
    x, m_indices, w13, w2, dy = make_problem([100, 20], 128, 128, gen)
    w13p, w2p = torch.nn.Parameter(w13.detach()), torch.nn.Parameter(w2.detach())
    cache = Fp8WeightCache()
    opt = torch.optim.SGD([w13p, w2p], lr=0.1)
    y0 = experts_forward_fp8(x, m_indices, w13p, w2p, cache)
    y0.backward(dy)
    first = cache.get(w13p, w2p)
    assert cache.builds == 1
    y1 = experts_forward_fp8(x, m_indices, w13p, w2p, cache)  # micro-batch 2: same copies
    y1.backward(dy)
    assert cache.builds == 1 and cache.get(w13p, w2p) is first
    torch.testing.assert_close(y0, y1, rtol=0, atol=0)
    t13 = first.w13_t()
    assert first.w13_t() is t13  # transposed copies made once, kept with the entry

    opt.step()  # in-place update bumps _version
    experts_forward_fp8(x, m_indices, w13p, w2p, cache)
    assert cache.builds == 2 and cache.get(w13p, w2p) is not first
    with torch.no_grad():
        w2p.mul_(1.0)  # any in-place write counts as a change
    cache.get(w13p, w2p)
    assert cache.builds == 3
    other = torch.nn.Parameter(w13p.detach().clone())
    cache.get(other, w2p)  # a different tensor
    assert cache.builds == 4


def test_cached_copies_match_fresh_quantisation(gen):
    _, _, w13, w2, _ = make_problem([1], 256, 128, gen)
    entry = Fp8WeightCache().get(w13, w2)
    for pair, w in ((entry.w13, w13), (entry.w2, w2)):
        q, s = G.per_block_quant_fp8(w.detach())
        assert torch.equal(pair[0].view(torch.uint8), q.view(torch.uint8)) and torch.equal(pair[1], s)
    # the transposed copies are exactly the quantisation of the transposed masters
    for pair, w in ((entry.w13_t(), w13), (entry.w2_t(), w2)):
        q, s = G.per_block_quant_fp8(w.detach().transpose(1, 2).contiguous())
        assert torch.equal(pair[0].view(torch.uint8), q.view(torch.uint8)) and torch.equal(pair[1], s)


def test_training_builds_transposes_with_the_copies_inference_does_not(gen, monkeypatch):
    monkeypatch.setenv(kFusedTrainEnv, "1")
    x, m_indices, w13, w2, dy = make_problem([100, 20], 128, 128, gen)
    cache = Fp8WeightCache()
    with torch.no_grad():
        experts_forward_fp8(x, m_indices, w13, w2, cache)
    assert cache.builds == 1 and not cache.get(w13, w2).has_transposes  # inference: copies only
    experts_forward_fp8(x, m_indices, w13, w2, cache).backward(dy)
    entry = cache.get(w13, w2)
    assert cache.builds == 2 and entry.has_transposes  # rebuilt once, copy + transpose together
    experts_forward_fp8(x, m_indices, w13, w2, cache).backward(dy)
    assert cache.builds == 2 and cache.get(w13, w2) is entry
    for pair, w in ((entry.w13_t(), w13), (entry.w2_t(), w2)):
        q, s = G.per_block_quant_fp8(w.detach().transpose(1, 2).contiguous())
        assert torch.equal(pair[0].view(torch.uint8), q.view(torch.uint8)) and torch.equal(pair[1], s)


@pytest.mark.parametrize("pow2", [False, True])
def test_fused_backward_ops_equal_the_unfused_composition(gen, monkeypatch, pow2):
    """MOE_FP8_FUSED_TRAIN=1 (the fused training ops) and =0 (the same math composed from the
    measured ops: SiLU backward in fp32, row quantiser on transposed copies; x' dequantised,
    padding zeroed, transposed, quantised) give the same gradients, bit for bit on the CPU."""
    x, m_indices, w13, w2, dy = make_problem([130, 0, 5, 300], 256, 128, gen)
    dy[m_indices < 0] = 1e4  # garbage in dY's padding rows: masked by either path
    grads = {}
    for flag in ("1", "0"):
        monkeypatch.setenv(kFusedTrainEnv, flag)
        for t in (x, w13, w2):
            t.grad = None
        cache = Fp8WeightCache()
        y = experts_forward_fp8(x, m_indices, w13, w2, cache, pow2_scale=pow2)
        # fused: the transposes are built with the copies (composed: from them, in the backward)
        assert cache.get(w13, w2, pow2).has_transposes == (flag == "1")
        y.backward(dy)
        grads[flag] = (x.grad.clone(), w13.grad.clone(), w2.grad.clone())
    for got, want in zip(grads["1"], grads["0"]):
        assert torch.equal(got, want)


def test_fused_train_switch(monkeypatch):
    monkeypatch.delenv(kFusedTrainEnv, raising=False)
    assert fused_train_enabled(torch.zeros(1))  # CPU: on (references either way)
    monkeypatch.setenv(kFusedTrainEnv, "0")
    assert not fused_train_enabled(torch.zeros(1))
    monkeypatch.setenv(kFusedTrainEnv, "1")
    assert fused_train_enabled(torch.zeros(1))


# ----------------------------------------------------------------------------- a tiny layer

def route_and_permute(x, router_w, num_experts, top_k):
    """Sigmoid top-k router + contiguous layout in plain torch.

    Returns x_rows [M_sum, H], m_indices int32 [M_sum], pair_row int64 [T, k] (row of each
    (token, slot)), topk_w fp32 [T, k] (differentiable w.r.t. router_w), counts int64 [E].
    """
    tokens = x.shape[0]
    scores = torch.sigmoid(x.float() @ router_w.t())  # [T, E]
    topk_idx = scores.topk(top_k, dim=-1).indices  # [T, k]
    topk_w = scores.gather(1, topk_idx)
    topk_w = topk_w / topk_w.sum(-1, keepdim=True)
    flat = topk_idx.reshape(-1)  # [T*k]
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)  # [E]
    m_indices = build_m_indices(counts)
    seg_start = torch.cat([counts.new_zeros(1), torch.cumsum((counts + 127) // 128 * 128, 0)])[:-1]
    first = torch.cumsum(counts, 0) - counts
    sorted_e = flat[order]
    row_sorted = seg_start[sorted_e] + torch.arange(flat.numel()) - first[sorted_e]
    pair_row = torch.empty_like(flat)
    pair_row[order] = row_sorted
    row_token = torch.zeros(m_indices.shape[0], dtype=torch.int64)
    row_token[pair_row] = torch.arange(flat.numel()) // top_k
    x_rows = x.index_select(0, row_token)  # [M_sum, H]; padding rows copy token 0
    return x_rows, m_indices, pair_row.view(tokens, top_k), topk_w, counts


def tiny_layer(x, router_w, w13, w2, top_k, experts_fn):
    x_rows, m_indices, pair_row, topk_w, _ = route_and_permute(x, router_w, w13.shape[0], top_k)
    y_rows = experts_fn(x_rows, m_indices, w13, w2)  # [M_sum, H]
    picked = y_rows.float()[pair_row]  # [T, k, H]
    return (picked * topk_w.unsqueeze(-1)).sum(1)  # [T, H] weighted combine


def test_router_weight_gets_gradient_through_the_combine(gen):
    tokens, hidden, inter, experts, top_k = 96, 256, 128, 6, 2
    x = torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16)
    router_w = (torch.randn(experts, hidden, generator=gen) * 0.05).requires_grad_()
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=gen) * hidden ** -0.5).requires_grad_()
    w2 = (torch.randn(experts, hidden, inter, generator=gen) * inter ** -0.5).requires_grad_()
    target = torch.randn(tokens, hidden, generator=gen)

    def run(fn, xin):
        for t in (router_w, w13, w2):
            t.grad = None
        xin = xin.detach().requires_grad_()
        out = tiny_layer(xin, router_w, w13, w2, top_k, fn)
        F.mse_loss(out, target).backward()
        return out.detach(), xin.grad.clone(), router_w.grad.clone(), w13.grad.clone()

    fp8 = run(lambda *a: experts_forward_fp8(*a), x)
    ref = run(lambda xr, m, a, b: experts_forward_torch(xr.float(), m, a, b, grouped_mm=False), x.float())
    fwd = rel_err(fp8[0], ref[0])
    assert fp8[2].abs().sum() > 0
    for name, got, want in zip(("x", "router", "w13"), fp8[1:], ref[1:]):
        assert rel_err(got, want) <= kGradToForward * fwd, (name, rel_err(got, want), fwd)


def test_pre_quantised_rows_give_identical_results(gen):
    x, m_indices, w13, w2, dy = make_problem([70, 140], 128, 128, gen)
    experts_forward_fp8(x, m_indices, w13, w2).backward(dy)
    grads = (x.grad.clone(), w13.grad.clone(), w2.grad.clone())
    x2 = x.detach().clone().requires_grad_()
    w13.grad = w2.grad = None
    xq = G.per_token_group_quant_fp8(x2.detach())
    experts_forward_fp8(x2, m_indices, w13, w2, x_fp8=xq).backward(dy)
    for got, want in zip((x2.grad, w13.grad, w2.grad), grads):
        assert torch.equal(got, want)


def test_only_requested_gradients(gen):
    x, m_indices, w13, w2, dy = make_problem([64, 64], 128, 128, gen)
    w13.requires_grad_(False)
    experts_forward_fp8(x, m_indices, w13, w2).backward(dy)
    assert w13.grad is None and w2.grad is not None and x.grad is not None
    with torch.no_grad():  # inference with master weights works too
        assert experts_forward_fp8(x, m_indices, w13, w2).shape == x.shape


def test_expert_offsets():
    m_indices = build_m_indices([0, 3, 0, 130, 1])
    assert expert_offsets(m_indices, 5).tolist() == [0, 0, 128, 128, 384, 512]
    # a trailing all-padding block belongs to the last expert
    padded = torch.cat([m_indices, torch.full((128,), -1, dtype=torch.int32)])
    assert expert_offsets(padded, 5).tolist() == [0, 0, 128, 128, 384, 640]


# ----------------------------------------------------------------------------- bad input

def test_bad_input_names_the_argument(gen):
    x, m_indices, w13, w2, _ = make_problem([64, 64], 128, 128, gen)
    with pytest.raises(TypeError, match="m_indices"):
        experts_forward_fp8(x, m_indices.long(), w13, w2)
    with pytest.raises(ValueError, match="M_sum"):
        experts_forward_fp8(x[:100], m_indices[:100], w13, w2)
    with pytest.raises(ValueError, match="w2"):
        experts_forward_fp8(x, m_indices, w13, w2[:, :, :64])
    with pytest.raises(ValueError, match="non-decreasing"):
        experts_forward_fp8(x, m_indices.flip(0).contiguous(), w13, w2)
    with pytest.raises(ValueError, match="m_indices"):
        experts_forward_fp8(x, torch.full_like(m_indices, 5), w13, w2)
    with pytest.raises(TypeError, match="weight_cache"):
        experts_forward_fp8(x, m_indices, w13, w2, weight_cache={})


# ----------------------------------------------------------------------------- Hopper

def _gpu_problem(counts, hidden: int, inter: int, seed: int):
    """The contiguous layout of ``counts`` on the GPU: x and dY (bf16), fp32 master weights."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    m_indices = build_m_indices(counts, device="cuda")
    rows, experts = m_indices.shape[0], len(counts)
    x = torch.randn(rows, hidden, generator=gen, device="cuda").to(torch.bfloat16).requires_grad_()
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=gen, device="cuda") * hidden ** -0.5).requires_grad_()
    w2 = (torch.randn(experts, hidden, inter, generator=gen, device="cuda") * inter ** -0.5).requires_grad_()
    dy = torch.randn(rows, hidden, generator=gen, device="cuda").to(torch.bfloat16)
    return x, m_indices, w13, w2, dy


@pytest.mark.gpu
@pytest.mark.parametrize("fused", ["0", "1"])
def test_gpu_deepseek_v3_shapes(monkeypatch, fused):
    """H 7168, I 2048, 8 local experts with uneven (one empty) token counts, kernels where built;
    the backward's quantisations composed (the GPU default until measured) and fused."""
    monkeypatch.setenv(kFusedTrainEnv, fused)
    x, m_indices, w13, w2, dy = _gpu_problem([600, 0, 1234, 257, 900, 31, 2048, 511], 7168, 2048,
                                             seed=0)
    results = fp8_and_reference(x, m_indices, w13, w2, dy, weight_cache=Fp8WeightCache())
    errors = {k: rel_err(*v) for k, v in results.items()}
    print("relative errors (H100):", {k: f"{v:.4f}" for k, v in errors.items()})
    assert errors["y"] < 0.1
    for name in ("dx", "dw13", "dw2"):
        assert errors[name] <= kGradToForward * errors["y"], (name, errors)
    assert bool((w13.grad[1] == 0).all()) and bool((w2.grad[1] == 0).all())


@pytest.mark.gpu
def test_gpu_fused_and_composed_backward_agree(monkeypatch):
    """The fused training kernels against the composition of measured ops on the GPU: the
    quantised operands are bit-identical (tests/test_train_quant_gpu.py), so the gradients agree
    up to the GEMMs' own (fp32 reduce-add) ordering."""
    x, m_indices, w13, w2, dy = _gpu_problem([300, 0, 129, 700], 1024, 512, seed=2)
    grads = {}
    for flag in ("0", "1"):
        monkeypatch.setenv(kFusedTrainEnv, flag)
        for t in (x, w13, w2):
            t.grad = None
        experts_forward_fp8(x, m_indices, w13, w2, Fp8WeightCache()).backward(dy)
        grads[flag] = (x.grad.clone(), w13.grad.clone(), w2.grad.clone())
    for name, got, want in zip(("dx", "dw13", "dw2"), grads["1"], grads["0"]):
        assert G.calc_diff(got, want) < 1e-7, name


def _switch_problem(device: str, cpu_counts, seed: int):
    """A small problem for a switch's A/B: ``cpu_counts`` on the CPU (reference ops), a larger
    uneven one with empty experts on the GPU (the kernels)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    if device == "cuda":
        return _gpu_problem([300, 0, 129, 700, 0], 1024, 512, seed=seed)
    return make_problem(cpu_counts, 128, 128, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("master", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_wgrad_overwrite_switch_gives_the_same_gradients(monkeypatch, device, master):
    """MOE_FP8_WGRAD_OVERWRITE=1 (weight gradients stored by the k-grouped GEMM into torch.empty,
    zeros for empty experts; bf16 master weights: stored as bf16 by the GEMM itself) against
    accumulating into torch.zeros in fp32 (then rounded to the master's dtype): the same values
    bit for bit (0 + x = x, rounded once either way), empty experts exactly zero."""
    x, m_indices, w13, w2, dy = _switch_problem(device, [0, 40, 0, 200, 0], seed=5)
    w13 = w13.detach().to(master).requires_grad_()
    w2 = w2.detach().to(master).requires_grad_()
    grads = {}
    for flag in ("0", "1"):
        monkeypatch.setenv(kWgradOverwriteEnv, flag)
        for t in (x, w13, w2):
            t.grad = None
        experts_forward_fp8(x, m_indices, w13, w2, Fp8WeightCache()).backward(dy)
        grads[flag] = (w13.grad.clone(), w2.grad.clone())
    for got, want in zip(grads["1"], grads["0"]):
        assert got.dtype == master and bool(torch.isfinite(got).all())
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for e in range(w13.shape[0]):
        if int((m_indices == e).sum()) == 0:
            assert bool((grads["1"][0][e] == 0).all()) and bool((grads["1"][1][e] == 0).all())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_zero_pad_switch_gives_the_same_step(monkeypatch, device):
    """MOE_FP8_ZERO_PAD_GEMM=1 (the grouped GEMMs write their padding rows as zeros into
    torch.empty) against the default (torch.zeros, padding rows skipped): the same output and
    gradients bit for bit; the output's and dx's padding rows exactly zero."""
    x, m_indices, w13, w2, dy = _switch_problem(device, [0, 40, 0, 200, 1], seed=6)
    # two trailing all-padding row blocks (tiles with no K block); padding rows of x and dY hold
    # garbage, not zeros
    tail = 256
    m_indices = torch.cat([m_indices, m_indices.new_full((tail,), -1)])
    x = torch.cat([x.detach(), x.new_full((tail, x.shape[1]), 7.0)])
    dy = torch.cat([dy, dy.new_full((tail, dy.shape[1]), 3.0)])
    x[m_indices < 0] = 7.0
    x.requires_grad_(True)
    results = {}
    for flag in ("0", "1"):
        monkeypatch.setenv(kZeroPadEnv, flag)
        for t in (x, w13, w2):
            t.grad = None
        y = experts_forward_fp8(x, m_indices, w13, w2, Fp8WeightCache())
        y.backward(dy)
        results[flag] = (y.detach().clone(), x.grad.clone(), w13.grad.clone(), w2.grad.clone())
    for got, want in zip(results["1"], results["0"]):
        assert torch.equal(got, want)
    padding = m_indices < 0
    assert bool((results["1"][0][padding] == 0).all()) and bool((results["1"][1][padding] == 0).all())
