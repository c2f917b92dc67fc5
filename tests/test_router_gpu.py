"""The router kernels (include/router.cuh) against the torch router.

Two backends, as tests/test_permute_gpu.py: ``cuda`` (marker ``gpu``: the real kernels through the
JIT on a Hopper GPU) and ``emulated`` (the same .cuh compiled with g++ by that file's harness, one
std::thread per CUDA thread, launched through the same host file). Each test pins
``MOE_FP8_FUSED_ROUTER=0`` for its torch expectation and ``=1`` for the kernel.

Expected: the same expert SET per token as the torch path (the scores are torch's sigmoid bits on
both paths and every comparison is exact), slots in descending order of the biased score, weights
within a few fp32 ulps (the k-term sum runs in slot order), counts equal to a bincount, local ids
identical (integers).
"""
import pytest
import torch

from moe_fp8.gemm import calc_diff
from moe_fp8.layers import MoE, MoEConfig
from moe_fp8.layers import layouts as L
from moe_fp8.layers import router as R

from kernel_checks import EmulatedKernel, assert_bundled_compile_clean, build_emulator, env_switch

kEnv = "MOE_FP8_FUSED_ROUTER"
kInstances = [*(f"moe_fp8::router::route_kernel<256, {p}>" for p in (1, 2, 4, 8)),
              *(f"moe_fp8::router::route_kernel<256, {p}, true>" for p in (1, 2, 4, 8)),
              "moe_fp8::router::local_ids_kernel<256>",
              "moe_fp8::router::local_ids_shared_kernel<256>"]


def kernels():
    from moe_fp8.gemm.kernels import router as module
    return module


@pytest.fixture(scope="session")
def router_emulator(tmp_path_factory):
    return build_emulator(tmp_path_factory.mktemp("router_emulation"), ["router.cuh"], kInstances,
                          "router_emulation")


@pytest.fixture(params=[pytest.param("cuda", marks=pytest.mark.gpu), "emulated"])
def backend(request, monkeypatch):
    """-> device string; the kernels run inside ``fused()``, torch otherwise."""
    monkeypatch.setenv(kEnv, "0")
    if request.param == "emulated":
        lib = request.getfixturevalue("router_emulator")
        assert [s.instance for s in kernels().bundled_sources()] == kInstances
        monkeypatch.setattr(kernels(), "_kernel", lambda src, like: EmulatedKernel(lib, src))
        monkeypatch.setattr(R, "fused_router_enabled", lambda t: R.fused_router_switch_on())
        return "cpu"
    return "cuda"


def fused():
    return env_switch(kEnv, "1")


def test_router_switch(monkeypatch):
    """MOE_FP8_FUSED_ROUTER: unset = on (verified and measured on an H100, 2026-12-05), 1 on, 0
    off; CPU tensors never take the kernels."""
    monkeypatch.delenv(kEnv, raising=False)
    assert R.kFusedRouterDefault is True and R.fused_router_switch_on()
    for value, on in (("1", True), ("0", False), (" 0", False), ("yes", True)):
        monkeypatch.setenv(kEnv, value)
        assert R.fused_router_switch_on() is on, value
    assert not R.fused_router_enabled(torch.zeros(1))


# ----------------------------------------------------------------------------- route

kConfigs = [  # (num_experts, n_group, topk_group, top_k)
    (16, 4, 2, 4),     # MoEConfig.tiny
    (32, 8, 4, 8),     # the benchmarks' one-GPU share (4 experts per group)
    (256, 8, 4, 8),    # DeepSeek-V3
    (64, 1, 1, 6),     # one group
    (96, 32, 11, 32),  # 32 groups of 3, k = 32
    (250, 5, 2, 3),    # odd sizes (E not a multiple of 32)
]


def route_case(backend, experts, groups, topk_group, top_k, tokens, fill, bias_scale, seed,
               norm=True):
    cfg = MoEConfig.tiny(num_experts=experts, n_group=groups, topk_group=topk_group, top_k=top_k,
                         group_mask_fill=fill, norm_topk_prob=norm)
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(tokens, experts, generator=gen) * 2).to(backend)
    bias = ((torch.rand(experts, generator=gen) - 0.5) * 2 * bias_scale).to(backend)
    return cfg, logits, bias


def masked_choice(logits, bias, cfg):
    """The torch path's biased scores with the dropped groups filled ``[T, E]``."""
    scores = logits.float().sigmoid()
    tokens = scores.shape[0]
    grouped = (scores + bias).view(tokens, cfg.n_group, -1)
    group_scores = grouped.topk(2, dim=-1).values.sum(-1)
    kept = group_scores.topk(cfg.topk_group, dim=-1).indices
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
    fill = float("-inf") if cfg.group_mask_fill == "neg_inf" else 0.0
    return grouped.masked_fill(~keep.unsqueeze(-1), fill).view(tokens, -1)


def boundary_ties(logits, bias, cfg):
    """bool ``[T]``: the k-th and (k+1)-th masked score tie, or the topk_group-th and next group
    score tie: the selected set is not unique."""
    tokens = logits.shape[0]
    masked = masked_choice(logits, bias, cfg)
    ambiguous = torch.zeros(tokens, dtype=torch.bool, device=logits.device)
    if cfg.top_k < cfg.num_experts:
        top = masked.topk(cfg.top_k + 1, dim=-1).values
        ambiguous |= top[:, -1] == top[:, -2]
    if cfg.topk_group < cfg.n_group:
        grouped = (logits.float().sigmoid() + bias).view(tokens, cfg.n_group, -1)
        top = grouped.topk(2, dim=-1).values.sum(-1).topk(cfg.topk_group + 1, dim=-1).values
        ambiguous |= top[:, -1] == top[:, -2]
    return ambiguous


def check_route(cfg, logits, bias, what):
    counts_torch = torch.full((cfg.num_experts,), 7, dtype=torch.int64, device=logits.device)
    counts_fused = counts_torch.clone()
    idx_t, w_t = R.route(logits, bias, cfg, counts_out=counts_torch)
    with fused():
        idx_f, w_f = R.route(logits, bias, cfg, counts_out=counts_fused)
    assert idx_f.dtype == torch.int64 and w_f.dtype == torch.float32
    assert idx_f.shape == idx_t.shape == (logits.shape[0], cfg.top_k)
    # same set per token, except where a tie at the top-k boundary makes the set ambiguous
    # (there torch's top-k keeps whichever it meets first): then the kernel's pick must still
    # be a valid top-k of the same masked scores
    order_t, order_f = idx_t.argsort(1), idx_f.argsort(1)
    sorted_t, sorted_f = idx_t.gather(1, order_t), idx_f.gather(1, order_f)
    ambiguous = boundary_ties(logits, bias, cfg)
    bad = (sorted_t != sorted_f).any(1) & ~ambiguous
    assert not bad.any(), f"{what}: {int(bad.sum())} tokens pick other experts, e.g. " \
                          f"{sorted_f[bad][:2].tolist()} vs {sorted_t[bad][:2].tolist()}"
    if ambiguous.any():
        masked = masked_choice(logits, bias, cfg)[ambiguous]
        chosen = torch.zeros_like(masked, dtype=torch.bool).scatter_(1, idx_f[ambiguous], True)
        low = masked.masked_fill(~chosen, float("inf")).min(1).values
        high = masked.masked_fill(chosen, float("-inf")).max(1).values
        assert (low >= high).all(), f"{what}: not a top-k on a tied token"
    # weights: a few ulps (the k-term sum runs in another order)
    same = ~(sorted_t != sorted_f).any(1)
    torch.testing.assert_close(w_f.gather(1, order_f)[same], w_t.gather(1, order_t)[same],
                               rtol=2e-6, atol=1e-30, msg=lambda m: f"{what}: {m}")
    # slots in descending order of the biased score (dropped groups filled)
    choice = masked_choice(logits, bias, cfg).gather(1, idx_f)
    assert (choice[:, :-1] >= choice[:, 1:]).all(), f"{what}: slots not in descending order"
    if not ambiguous.any():
        assert torch.equal(counts_fused, counts_torch), f"{what}: counts"
    assert torch.equal(counts_fused, torch.bincount(idx_f.flatten(), minlength=cfg.num_experts))


@pytest.mark.parametrize("fill", ["neg_inf", "zero"])
def test_route_matches_torch(backend, fill):
    cases = kConfigs if backend == "cuda" else kConfigs[:3] + kConfigs[4:5]
    for case, (experts, groups, topk_group, top_k) in enumerate(cases):
        for tokens, bias_scale in ((1, 0.0), (37, 0.1), (9, 1.5)):  # 1.5: biased scores < 0
            cfg, logits, bias = route_case(backend, experts, groups, topk_group, top_k, tokens,
                                           fill, bias_scale, seed=case * 10 + tokens)
            check_route(cfg, logits, bias, f"{fill} E={experts} G={groups}/{topk_group} "
                                           f"k={top_k} T={tokens} bias={bias_scale}")


@pytest.mark.gpu
def test_route_matches_torch_large():
    """DeepSeek-V3 routing of 16384 tokens (and the one-GPU share) on the GPU."""
    for experts, groups, topk_group, top_k in ((256, 8, 4, 8), (32, 8, 4, 8)):
        cfg, logits, bias = route_case("cuda", experts, groups, topk_group, top_k, 16384,
                                       "neg_inf", 0.1, seed=experts)
        check_route(cfg, logits, bias, f"E={experts} T=16384")


@pytest.mark.parametrize("experts", [32, 256])
def test_route_sigmoid_in_the_kernel(backend, experts, monkeypatch):
    """MOE_FP8_ROUTE_SIGMOID=1: the route kernel takes the logits and their sigmoid itself. On
    the GPU the outputs are the bits of the kernel fed torch's sigmoid (the same formula, expf and
    an IEEE division), across magnitudes up to exp overflow and +-inf / NaN logits; emulated (g++,
    glibc's expf against torch's CPU sigmoid) the same experts and weights within a few ulps."""
    cfg = MoEConfig.tiny(num_experts=experts, n_group=8, topk_group=4, top_k=8)
    gen = torch.Generator().manual_seed(experts)
    logits = torch.randn(67, experts, generator=gen) * torch.tensor([0.1, 1.0, 8.0, 40.0]).repeat(
        17)[:67, None]
    logits[3, :4] = torch.tensor([float("inf"), float("-inf"), float("nan"), 89.0])
    logits[4, 5] = -104.0  # sigmoid underflows to a denormal / zero
    bias = (torch.rand(experts, generator=gen) - 0.5) * 0.2
    logits, bias = logits.to(backend), bias.to(backend)
    with fused():
        monkeypatch.setenv("MOE_FP8_ROUTE_SIGMOID", "0")
        idx_torch_sigmoid, w_torch_sigmoid = R.route(logits, bias, cfg)
        monkeypatch.setenv("MOE_FP8_ROUTE_SIGMOID", "1")
        idx, w = R.route(logits, bias, cfg)
    if backend == "cuda":
        assert torch.equal(idx, idx_torch_sigmoid), "expert choice differs"
        assert torch.equal(w.view(torch.int32), w_torch_sigmoid.view(torch.int32)), \
            "weights are not torch's sigmoid bits"  # bit patterns: row 3 holds NaN weights
    else:
        assert torch.equal(idx.sort(1).values, idx_torch_sigmoid.sort(1).values)
        torch.testing.assert_close(w, w_torch_sigmoid, rtol=4 * 2 ** -23, atol=0, equal_nan=True)


def test_route_unnormalised_and_ties(backend):
    """norm_topk_prob=False; exact ties (quantised logits) go to the lower expert id on both paths
    when torch's top-k does so too (checked as sets, so only the set matters)."""
    cfg, logits, bias = route_case(backend, 32, 8, 4, 8, 17, "neg_inf", 0.0, seed=3, norm=False)
    check_route(cfg, logits, bias, "unnormalised")
    with fused():
        idx, weights = R.route(logits, bias, cfg)
    # exact on the GPU; emulated, the kernel's sigmoid is glibc's expf (a few ulps from torch's)
    rtol = 0 if backend == "cuda" else 4 * 2 ** -23
    torch.testing.assert_close(weights, logits.sigmoid().gather(1, idx) * cfg.routed_scaling_factor,
                               rtol=rtol, atol=0)


@pytest.mark.parametrize("experts", [32, 64, 96, 256])  # kPerLane 1, 2, 4, 8
def test_route_slot_order_with_nan_inf_and_ties(backend, experts):
    """The kernel's total order: NaN above +inf above every number, equal values to the lower
    expert id; slots in that order (one group, so only the expert ranking acts)."""
    import math
    cfg = MoEConfig.tiny(num_experts=experts, n_group=1, topk_group=1, top_k=8)
    gen = torch.Generator().manual_seed(experts)
    logits = torch.randn(3, experts, generator=gen)
    logits[0, [5, 17]] = float("nan")
    logits[0, [3, experts - 1]] = float("inf")
    logits[1, :] = logits[1, 7]  # every expert ties: ids 0..7
    logits[2, ::3] = float("-inf")
    logits[2, [1, experts - 2]] = 2.5  # a tie above the rest
    bias = torch.zeros(experts)
    scores = logits.sigmoid()
    with fused():
        idx, _ = R.route(logits.to(backend), bias.to(backend), cfg)

    def rank(e, row):  # larger ranks first: NaN, then the value, then the lower id
        v = scores[row, e].item()
        return (1 if math.isnan(v) else 0, 0.0 if math.isnan(v) else v, -e)
    for row in range(3):
        want = sorted(range(experts), key=lambda e: rank(e, row), reverse=True)[:8]
        assert idx[row].tolist() == want, (row, idx[row].tolist(), want)


def test_route_empty_and_fallbacks(backend):
    cfg, logits, bias = route_case(backend, 16, 4, 2, 4, 0, "neg_inf", 0.0, seed=1)
    with fused():
        idx, weights = R.route(logits, bias, cfg)
    assert idx.shape == (0, 4) and weights.shape == (0, 4)
    # beyond the kernel's limit (E > 256): the torch path, same results
    for experts, groups in ((512, 8),):
        cfg, logits, bias = route_case(backend, experts, groups, 2, 2, 5, "neg_inf", 0.1, seed=2)
        assert not kernels().supports_route(logits, bias.float(), groups, 2, 2)
        idx_t, _ = R.route(logits, bias, cfg)
        with fused():
            idx_f, _ = R.route(logits, bias, cfg)
        assert torch.equal(idx_f, idx_t)


# ----------------------------------------------------------------------------- local ids

kLocalIdCases = ((1, 8, 256, 0, 256), (37, 8, 256, 32, 32), (129, 4, 16, 12, 4), (0, 8, 32, 0, 32))


def local_id_cases(backend, seed, valids):
    """-> (case, global ids [T, k], weights [T, k], num_valid) over kLocalIdCases x ``valids``
    ("tensor": a device scalar T - 2)."""
    gen = torch.Generator().manual_seed(seed)
    for case in kLocalIdCases:
        tokens, top_k, experts_global = case[:3]
        idx = torch.stack([torch.randperm(experts_global, generator=gen)[:top_k]
                           for _ in range(tokens)]) if tokens else torch.empty(0, top_k, dtype=torch.int64)
        weights = torch.rand(tokens, top_k, generator=gen)
        for valid in valids:
            num_valid = torch.tensor(max(tokens - 2, 0), device=backend) if valid == "tensor" else valid
            yield (*case, valid), idx.to(backend), weights.to(backend), num_valid


def test_local_ids_match_torch(backend):
    for case, idx, _, num_valid in local_id_cases(backend, 4, (None, 0, 1, 40, -1, "tensor")):
        offset, local = case[3:5]
        expected = L.local_expert_ids(idx, offset, local, num_valid)
        with fused():
            actual = L.local_expert_ids(idx, offset, local, num_valid)
        assert torch.equal(actual, expected), case


def test_local_ids_with_shared_match_torch(backend):
    """The shared expert's slot (MoE's fold): ids and weights equal to the torch path."""
    for case, idx, weights, num_valid in local_id_cases(backend, 5, (None, 0, 1, 40, "tensor")):
        offset, local = case[3:5]
        expected = L.local_expert_ids_with_shared(idx, weights, offset, local, num_valid)
        with fused():
            actual = L.local_expert_ids_with_shared(idx, weights, offset, local, num_valid)
        for a, e in zip(actual, expected):
            assert a.dtype == e.dtype and torch.equal(a, e), case


# ----------------------------------------------------------------------------- the layer

@torch.no_grad()
def test_layer_fused_router_vs_torch(backend):
    """The whole layer with the router kernels vs the torch router: same routing, outputs equal
    to bf16 rounding (the combine sums the slots in another order)."""
    if backend == "cuda":
        moe = MoE(MoEConfig.deepseek_v3(num_experts=32), device="cuda", seed=0)
        sizes = (1, 129, 4096)
    else:
        moe = MoE(MoEConfig.tiny(num_experts=32, top_k=8, n_group=8, topk_group=4), seed=0)
        sizes = (1, 19)
    gen = torch.Generator().manual_seed(8)
    for tokens in sizes:
        x = torch.randn(tokens, moe.cfg.hidden_size, generator=gen).bfloat16().to(backend)
        expected = moe(x)
        counts = moe.last_tokens_per_expert.clone()
        expected_masked = moe.forward_masked(x)
        with fused():
            actual = moe(x)
            assert torch.equal(moe.last_tokens_per_expert, counts)
            actual_masked = moe.forward_masked(x)
        for what, a, e in (("forward", actual, expected), ("forward_masked", actual_masked, expected_masked)):
            diff = calc_diff(a, e)
            assert diff < 1e-5, f"{what} T={tokens}: calc_diff {diff:.2e}"


@pytest.mark.gpu
@torch.no_grad()
def test_decode_graph_with_router_kernels():
    """The decode runner captured with the router kernels replays new batches like the runner
    without them (the same routing)."""
    moe = MoE(MoEConfig.deepseek_v3(num_experts=32), device="cuda", seed=0)
    with env_switch(kEnv, "0"):
        plain = moe.decode_runner(max_tokens=32)
    with env_switch(kEnv, "1"):
        run = moe.decode_runner(max_tokens=32)
    gen = torch.Generator(device="cuda").manual_seed(9)
    for n in (32, 3, 1, 32):
        x = torch.randn(n, moe.cfg.hidden_size, generator=gen, device="cuda").bfloat16()
        diff = calc_diff(run(x).clone(), plain(x).clone())
        assert diff < 1e-5, f"{kEnv} decode n={n}: calc_diff {diff:.2e}"


def test_bundled_kernels_compile_spill_free():
    assert_bundled_compile_clean(kernels())
