"""The decode step's expert selection + masked dispatch in one kernel (include/route_dispatch.cuh,
``MOE_FP8_ROUTE_DISPATCH``) against the kernels it folds together: the route kernel from the
logits, then the global-id masked index and the masked permute. Every output must be identical:
top-k weights, the masked index and its combine index, the rows and scales outside the trash
bucket, the row maps (written whole).

Two backends, as tests/test_permute_gpu.py: ``cuda`` (marker ``gpu``, the JIT on a Hopper GPU)
and ``emulated`` (the headers compiled with g++, kernel_checks.py's harness; small shapes).
"""
import pytest
import torch

from moe_fp8.gemm.reference import masked_row_mask
from moe_fp8.layers import MoE, MoEConfig
from moe_fp8.layers import layouts as L
from moe_fp8.layers import permute as PM
from moe_fp8.layers import router as R
from moe_fp8.layers.dispatch.local import LocalDispatcher

from kernel_checks import (EmulatedKernel, assert_bundled_compile_clean, build_emulator,
                           kPermuteInstances)

FP8 = torch.float8_e4m3fn
kRouteInstances = [f"moe_fp8::router::route_kernel<256, {p}, true>" for p in (1, 2, 4, 8)]
kFusedInstances = [f"moe_fp8::route_dispatch::route_dispatch_small_kernel<256, {p}>"
                   for p in (1, 2, 4, 8)]


def modules():
    from moe_fp8.gemm.kernels import permute, route_dispatch, router
    return permute, router, route_dispatch


@pytest.fixture(scope="session")
def emulator(tmp_path_factory):
    return build_emulator(tmp_path_factory.mktemp("route_dispatch_emulation"), ["route_dispatch.cuh"],
                          kPermuteInstances + kRouteInstances + kFusedInstances,
                          "route_dispatch_emulation")


@pytest.fixture(params=[pytest.param("cuda", marks=pytest.mark.gpu), "emulated"])
def backend(request, monkeypatch):
    """-> device string; every kernel path on (fused permute, router kernels, decode index)."""
    for name in ("MOE_FP8_FUSED_PERMUTE", "MOE_FP8_FUSED_ROUTER", "MOE_FP8_ROUTE_SIGMOID",
                 "MOE_FP8_FUSED_DECODE_INDEX"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("MOE_FP8_ROUTE_DISPATCH", "0")
    monkeypatch.setenv("MOE_FP8_SMALL_DISPATCH", "0")
    if request.param == "emulated":
        lib = request.getfixturevalue("emulator")
        for module in modules():
            monkeypatch.setattr(module, "_kernel", lambda src, like: EmulatedKernel(lib, src))
        monkeypatch.setattr(L, "fused_enabled", lambda t: L.fused_switch_on())
        monkeypatch.setattr(PM, "fused_enabled", lambda t: L.fused_switch_on())
        monkeypatch.setattr(R, "fused_router_enabled", lambda t: R.fused_router_switch_on())
        return "cpu"
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs an sm_90 GPU")
    return "cuda"


def assert_same(actual, expected, what):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    a, e = actual.cpu(), expected.cpu()
    if a.dtype in (FP8, torch.float32):
        a, e = a.view(torch.uint8 if a.dtype == FP8 else torch.int32), \
            e.view(torch.uint8 if e.dtype == FP8 else torch.int32)
    diff = a != e
    assert not diff.any(), f"{what}: {int(diff.sum())} differ, e.g. at {diff.nonzero()[:4].tolist()}"


def make_router(experts, groups, topk_group, top_k, fill, device, seed):
    cfg = MoEConfig.tiny(num_experts=experts, top_k=top_k, n_group=groups, topk_group=topk_group,
                         group_mask_fill=fill)
    router = R.Router(cfg, device=device)
    gen = torch.Generator().manual_seed(seed)
    router.e_score_correction_bias.copy_((torch.randn(experts, generator=gen) * 0.1).to(device))
    return router, gen


def quantized_tokens(tokens, hidden, gen, device):
    xq = torch.randint(0, 256, (tokens, hidden), dtype=torch.uint8, generator=gen).view(FP8)
    xs = torch.randn(tokens, hidden // 128, generator=gen).exp()
    xs_mn = torch.empty(hidden // 128, tokens).t()
    xs_mn.copy_(xs)
    out = torch.empty(hidden // 128, tokens, device=device).t()
    out.copy_(xs_mn)
    return xq.to(device), out


kCases = [  # (tokens, top_k, experts_global, groups, topk_group, offset, local, hidden, m_max, fill)
    (1, 8, 64, 8, 4, 16, 16, 128, 1, "zero"), (3, 8, 256, 8, 4, 224, 32, 256, 3, "neg_inf"),
    (8, 4, 32, 4, 2, 0, 32, 384, 2, "zero"), (32, 8, 64, 8, 4, 0, 64, 128, 32, "neg_inf"),
]


@pytest.mark.parametrize("case", kCases, ids=[f"T{c[0]}k{c[1]}E{c[2]}" for c in kCases])
def test_route_dispatch_equals_route_then_dispatch(backend, case, monkeypatch):
    tokens, top_k, experts, groups, topk_group, offset, local, hidden, m_max, fill = case
    router, gen = make_router(experts, groups, topk_group, top_k, fill, backend, seed=tokens)
    logits = (torch.randn(tokens, experts, generator=gen) * 2.0).to(backend)
    logits[0, :3] = logits[0, 3]  # ties
    xq, xs = quantized_tokens(tokens, hidden, gen, backend)
    for valid in (0, 1, tokens, tokens + 3):
        num_valid = torch.tensor(valid, dtype=torch.int64, device=backend)
        what = f"{case} valid={valid}"
        # the kernels it folds: route (from the logits), then the global-id index and the permute
        topk_idx, topk_weights = router.select(logits)
        index = L.masked_index_from_global(topk_idx, offset, local, m_max, topk_weights, num_valid)
        bufs = L.MaskedBuffers.allocate(local, m_max, hidden, backend)
        bufs.a.view(torch.uint8).copy_(torch.randint(0, 256, bufs.a.shape, dtype=torch.uint8, generator=gen))
        bufs.sa.fill_(float("nan"))
        mine = L.MaskedBuffers(bufs.a.clone(), bufs.sa.clone())
        rows = PM.permute_masked(xq, xs, index, top_k, bufs.a, bufs.sa)
        monkeypatch.setenv("MOE_FP8_ROUTE_DISPATCH", "1")
        fused = PM.route_dispatch_masked_small(xq, xs, router, logits, offset, local, m_max, num_valid,
                                               mine.a, mine.sa)
        monkeypatch.setenv("MOE_FP8_ROUTE_DISPATCH", "0")
        assert fused is not None, what
        weights, got, token, slot = fused
        assert_same(weights, topk_weights, f"topk_weights {what}")
        for name in ("masked_m", "pair_expert", "pair_rank", "pair_kept", "num_overflow", "slot_row",
                     "slot_weight"):
            assert_same(getattr(got, name), getattr(index, name), f"{name} {what}")
        assert_same(mine.a[:local], bufs.a[:local], f"a {what}")
        assert_same(mine.sa[:local], bufs.sa[:local], f"sa {what}")
        assert_same(token, rows[0], f"row_token {what}")
        assert_same(slot, rows[1], f"row_slot {what}")


def test_route_dispatch_limits_and_switch(backend, monkeypatch):
    """None (the caller routes, then dispatches) with the switch off, beyond 256 pairs, with the
    route kernel's sigmoid off, or with a host-int valid count."""
    router, gen = make_router(64, 8, 4, 8, "zero", backend, seed=1)
    xq, xs = quantized_tokens(33, 128, gen, backend)
    bufs = L.MaskedBuffers.allocate(64, 33, 128, backend)
    logits = torch.randn(33, 64, generator=gen).to(backend)

    def fused(n, valid=None):
        return PM.route_dispatch_masked_small(xq[:n], xs[:n], router, logits[:n], 0, 64, 33, valid,
                                              bufs.a, bufs.sa)

    assert fused(32) is None  # switched off
    monkeypatch.setenv("MOE_FP8_ROUTE_DISPATCH", "1")
    assert fused(32) is not None
    assert fused(33) is None  # 264 pairs
    assert fused(32, valid=3) is None  # a host int
    monkeypatch.setenv("MOE_FP8_ROUTE_SIGMOID", "0")
    assert fused(32) is None


@torch.no_grad()
def test_decode_layer_with_route_dispatch(backend, monkeypatch):
    """The layer's decode step with MOE_FP8_ROUTE_DISPATCH on and off: the same output bits (the
    dispatcher hands the same layout and combine index to the same GEMMs and combine), also for
    batches below the runner's size. Emulated: a small layer, its GEMMs the CPU references, its
    router, index, permute and combine the emulated kernels; on the GPU: DeepSeek-V3 widths and
    the captured graphs."""
    cfg = MoEConfig.deepseek_v3(num_experts=32) if backend == "cuda" else \
        MoEConfig.tiny(num_experts=32, top_k=8, n_group=8, topk_group=4)
    moe = MoE(cfg, device=backend, seed=0)
    gen = torch.Generator().manual_seed(4)
    for n in (1, 7, 32):
        runners = []
        for on in ("0", "1"):
            monkeypatch.setenv("MOE_FP8_ROUTE_DISPATCH", on)
            runners.append(moe.decode_runner(n))
        for m in (n, 1):
            x = torch.randn(m, cfg.hidden_size, generator=gen).bfloat16().to(backend)
            monkeypatch.setenv("MOE_FP8_ROUTE_DISPATCH", "0")  # eager runners read it per step
            off = runners[0](x).clone()
            monkeypatch.setenv("MOE_FP8_ROUTE_DISPATCH", "1")
            on = runners[1](x).clone()
            assert torch.equal(off.view(torch.int16), on.view(torch.int16)), (n, m)


def test_dispatcher_routed_path_equals_select_then_dispatch(backend, monkeypatch):
    """LocalDispatcher.dispatch_masked_routed: the fused kernel's layout and combine index equal
    router.select + dispatch_masked's (both copying the rows: the decode gather, which leaves them
    to the gate-up, is pinned off; test_permute_gpu covers the dispatch without rows)."""
    monkeypatch.setenv("MOE_FP8_DECODE_GATHER", "0")
    router, gen = make_router(64, 8, 4, 8, "zero", backend, seed=2)
    hidden, tokens, m_max = 256, 5, 5
    dispatcher = LocalDispatcher(64, hidden, 8, num_experts_local=32, expert_offset=32)
    xq, xs = quantized_tokens(tokens, hidden, gen, backend)
    logits = torch.randn(tokens, 64, generator=gen).to(backend)
    results = []
    for on in ("0", "1"):
        monkeypatch.setenv("MOE_FP8_ROUTE_DISPATCH", on)
        results.append(dispatcher.dispatch_masked_routed((xq, xs), router, logits,
                                                         max_tokens_per_expert=m_max))
    (layout0, handle0), (layout1, handle1) = results
    for name in ("masked_m", "row_token", "row_slot", "num_overflow"):
        assert_same(getattr(layout1, name), getattr(layout0, name), name)
    valid = masked_row_mask(m_max, layout0.masked_m.cpu())  # rows past masked_m: never read
    assert_same(layout1.a.cpu()[valid], layout0.a.cpu()[valid], "a rows")
    assert_same(layout1.sa.cpu()[valid], layout0.sa.cpu()[valid], "sa rows")
    assert_same(handle1.combine.slot_row, handle0.combine.slot_row, "slot_row")
    assert_same(handle1.combine.slot_weight, handle0.combine.slot_weight, "slot_weight")


def test_bundled_kernels_compile_spill_free():
    assert_bundled_compile_clean(modules()[2])
