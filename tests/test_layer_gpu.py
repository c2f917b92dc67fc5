"""The MoE layer on a Hopper GPU with the kernels: DeepSeek-V3 shapes, CUDA-graph decode.

Run: ``PYTHONPATH=$PWD python3 -m pytest -q -m gpu tests/test_layer_gpu.py``. Bounds (calc_diff):

* kernels vs the references on the same layer, and graph decode vs prefill: < 2e-4. Same math;
  the tensor cores' accumulation order can move a bf16 GEMM output by one ulp, which can flip
  one fp8 rounding of the re-quantised activation: still 10x below the FP8 error itself.
* vs the unquantised layer (fp32 math, dequantised weights): < 4e-3 (CPU: ~1e-3).
* vs transformers' fp32 DeepseekV3MoE with the original weights: < 4e-3 (CPU: ~2.0e-3).
"""
import pytest
import torch

from moe_fp8.gemm import calc_diff
from moe_fp8.layers import MoE, MoEConfig, Router
from moe_fp8.layers.reference import dequantized_weights, reference_moe

pytestmark = pytest.mark.gpu

kKernelVsReference = 2e-4
kVsUnquantised = 4e-3


@pytest.fixture(scope="module")
def moe():
    # one GPU's share of DeepSeek-V3 (32 experts, 8 groups of 4, top-4 groups, top-8, 1 shared)
    return MoE(MoEConfig.deepseek_v3(num_experts=32), device="cuda", seed=0)


def rand_x(tokens, hidden, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(tokens, hidden, generator=gen, device="cuda").bfloat16()


@pytest.mark.parametrize("tokens", [1, 129, 4096])
@torch.no_grad()
def test_deepseek_v3_shapes_parity(moe, tokens, monkeypatch):
    x = rand_x(tokens, moe.cfg.hidden_size, tokens)
    y = moe(x)
    y_masked = moe.forward_masked(x)
    assert torch.isfinite(y).all()
    assert calc_diff(y_masked, y) < kKernelVsReference
    routing = moe.gate(x)
    w = dequantized_weights(moe)
    unquantised = reference_moe(x, routing.topk_idx, routing.topk_weights, w["w13"], w["w2"],
                                w["shared_w13"], w["shared_w2"])
    assert calc_diff(y, unquantised) < kVsUnquantised
    monkeypatch.setenv("MOE_FP8_BACKEND", "reference")
    y_ref = moe(x)
    assert calc_diff(y, y_ref) < kKernelVsReference


@torch.no_grad()
def test_graph_decode_replays_with_different_batches(moe):
    run = moe.decode_runner(max_tokens=64)
    assert run.graph is not None
    for i, n in enumerate([1, 7, 64, 33, 1, 2]):
        x = rand_x(n, moe.cfg.hidden_size, 100 + i)
        expected = moe(x)
        torch.cuda.synchronize()
        allocated = torch.cuda.memory_allocated()
        torch.cuda.set_sync_debug_mode("error")  # a host sync inside the call raises
        try:
            y = run(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == allocated  # replay allocates nothing
        assert y.shape == (n, moe.cfg.hidden_size)
        assert calc_diff(y, expected) < kKernelVsReference
    with pytest.raises(ValueError, match="max_tokens=64"):
        run(rand_x(65, moe.cfg.hidden_size, 0))


@torch.no_grad()
def test_router_matches_transformers_at_deepseek_v3_shapes():
    pytest.importorskip("transformers")
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf
    from test_layer_helpers import installed_transformers_fill
    hf_cfg = DeepseekV3Config()  # 256 experts, 8 groups / top-4, top-8
    theirs = hf.DeepseekV3TopkRouter(hf_cfg).cuda()
    gen = torch.Generator(device="cuda").manual_seed(0)
    theirs.weight.copy_(torch.randn(theirs.weight.shape, generator=gen, device="cuda") * 0.02)
    theirs.e_score_correction_bias.copy_(torch.rand(256, generator=gen, device="cuda") * 0.2 - 0.1)
    ours = Router(MoEConfig.from_hf(hf_cfg, group_mask_fill=installed_transformers_fill()), device="cuda")
    ours.load_state_dict(theirs.state_dict())
    x = rand_x(2048, 7168, 1)
    _, _, hf_idx = theirs(x)
    assert torch.equal(ours(x).topk_idx.sort(1).values, hf_idx.sort(1).values)


@torch.no_grad()
def test_matches_transformers_moe_on_gpu():
    pytest.importorskip("transformers")
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf
    from test_layer_helpers import hf_config, installed_transformers_fill
    cfg = MoEConfig.deepseek_v3(num_experts=32)
    hf_cfg = hf_config(cfg)
    if hasattr(hf_cfg, "_experts_implementation"):
        hf_cfg._experts_implementation = "eager"  # fp32 reference loop
    theirs = hf.DeepseekV3MoE(hf_cfg).cuda().eval()
    gen = torch.Generator(device="cuda").manual_seed(2)
    for p in theirs.parameters():
        p.copy_(torch.randn(p.shape, generator=gen, device="cuda") * 0.02)
    ours = MoE.from_hf(theirs, group_mask_fill=installed_transformers_fill())
    x = torch.randn(256, cfg.hidden_size, generator=gen, device="cuda")
    assert calc_diff(ours(x), theirs(x)) < kVsUnquantised


@pytest.mark.parametrize("tokens", [1, 333, 4096])
@torch.no_grad()
def test_fused_defaults_vs_torch_paths(moe, tokens, monkeypatch):
    """Every layer kernel on (fused router + fused permute/index/combine) against both switched
    off (MOE_FP8_FUSED_ROUTER=0, MOE_FP8_FUSED_PERMUTE=0): the same routing, so the outputs agree
    to bf16 rounding (the combines sum the k slots in other orders); the router statistic too."""
    x = rand_x(tokens, moe.cfg.hidden_size, 500 + tokens)
    monkeypatch.setenv("MOE_FP8_FUSED_ROUTER", "1")
    monkeypatch.setenv("MOE_FP8_FUSED_PERMUTE", "1")
    fused, fused_masked = moe(x), moe.forward_masked(x)
    counts = moe.last_tokens_per_expert.clone()
    monkeypatch.setenv("MOE_FP8_FUSED_ROUTER", "0")
    monkeypatch.setenv("MOE_FP8_FUSED_PERMUTE", "0")
    plain, plain_masked = moe(x), moe.forward_masked(x)
    assert torch.equal(moe.last_tokens_per_expert, counts)
    assert int(counts.sum()) == tokens * moe.cfg.top_k
    assert calc_diff(fused, plain) < 1e-5
    assert calc_diff(fused_masked, plain_masked) < 1e-5


@torch.no_grad()
def test_shared_experts_overlap_is_exact(moe, monkeypatch):
    """The shared experts on the side stream (MOE_FP8_OVERLAP_SHARED=1) give the same bits as on
    the main stream (=0): same kernels, only the streams differ; repeated calls too (the
    side stream's buffers are recycled across calls); the decode graph likewise."""
    xs = [rand_x(t, moe.cfg.hidden_size, 700 + t) for t in (4096, 1, 777)]
    monkeypatch.setenv("MOE_FP8_OVERLAP_SHARED", "0")
    expected = [moe(x) for x in xs]
    monkeypatch.setenv("MOE_FP8_OVERLAP_SHARED", "1")
    for _ in range(2):
        for x, e in zip(xs, expected):
            assert torch.equal(moe(x), e)
    # decode: the side stream becomes a parallel branch of the captured graph
    assert_decode_switch_keeps_bits(moe, monkeypatch, "MOE_FP8_OVERLAP_SHARED", (32, 5, 1, 32), 800)


@torch.no_grad()
def test_decode_batch_size_graphs_match_runners_of_that_size(moe):
    """A runner's batch of n replays the graph of the smallest batch size holding n (tiles,
    dispatch and every row-wise kernel sized for it, on the first rows of the full-size buffers):
    the same bits as a runner built for that size, and close to the one-graph runner."""
    run = moe.decode_runner(max_tokens=64)
    single = moe.decode_runner(max_tokens=64, batch_sizes=[64])
    assert run.batch_sizes == (1, 2, 4, 8, 16, 32, 64) and single.batch_sizes == (64,)
    exact = {b: moe.decode_runner(max_tokens=b) for b in (1, 4, 64)}
    for i, (n, b) in enumerate([(1, 1), (3, 4), (64, 64), (4, 4), (1, 1)]):
        assert run.batch_size_for(n) == b
        x = rand_x(n, moe.cfg.hidden_size, 1200 + i)
        y = run(x).clone()
        assert torch.equal(y, exact[b](x).clone()), f"n={n}: graph {b} vs a {b}-token runner"
        assert calc_diff(y, single(x).clone()) < kKernelVsReference, f"n={n} vs one graph"


@torch.no_grad()
def test_decode_runners_of_two_layers_share_buffers(moe):
    """Two DeepSeek-V3-shaped layers whose graph runners hold one set of step buffers, replayed
    in a model's order (layer b on layer a's output): the bits of unshared runners, and the
    second runner allocates the buffers' bytes less."""
    other = MoE(moe.cfg, device="cuda", seed=1)
    alone_a, alone_b = moe.decode_runner(max_tokens=32), other.decode_runner(max_tokens=32)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    run_a = moe.decode_runner(max_tokens=32)
    torch.cuda.synchronize()
    middle = torch.cuda.memory_allocated()
    run_b = other.decode_runner(max_tokens=32, share_buffers_with=run_a)
    torch.cuda.synchronize()
    after = torch.cuda.memory_allocated()
    assert run_b.workspace is run_a.workspace and run_b.graph is not None
    assert after - middle < middle - before - 0.9 * run_a.buffer_bytes, \
        (middle - before, after - middle, run_a.buffer_bytes)
    for i, n in enumerate([32, 1, 7, 32, 3]):
        x = rand_x(n, moe.cfg.hidden_size, 1300 + i)
        y_a = run_a(x).clone()
        y_b = run_b(y_a).clone()
        assert torch.equal(y_a, alone_a(x).clone()), f"n={n}: layer a"
        assert torch.equal(y_b, alone_b(y_a).clone()), f"n={n}: layer b"


@torch.no_grad()
def test_attached_graph_runners_replay_small_batches(moe):
    """Two DeepSeek-V3-shaped layers with attached graph runners (one set of buffers): small
    inference batches replay the graphs (the runners' counts say so) without a host sync, close to
    the eager contiguous path; a batch past max_tokens runs eagerly with the eager path's bits."""
    from moe_fp8.layers import attach_graph_runners
    model = torch.nn.Sequential(MoE(moe.cfg, device="cuda", seed=2), MoE(moe.cfg, device="cuda", seed=3))
    eager = torch.nn.Sequential(MoE(moe.cfg, device="cuda", seed=2), MoE(moe.cfg, device="cuda", seed=3))
    runners = attach_graph_runners(model, 64)
    assert all(r.graph is not None for r in runners) and runners[1].workspace is runners[0].workspace
    for i, n in enumerate([1, 64, 7]):
        x = rand_x(n, moe.cfg.hidden_size, 1400 + i)
        expected = eager(x)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # a host sync inside the replayed forward raises
        try:
            y = model(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert [int(r.num_valid) for r in runners] == [n, n]
        assert calc_diff(y, expected) < kKernelVsReference, f"n={n}"
    x = rand_x(65, moe.cfg.hidden_size, 1450)
    assert torch.equal(model(x), eager(x))  # past max_tokens: the eager path
    assert [int(r.num_valid) for r in runners] == [7, 7]


@torch.no_grad()
def test_runner_contiguous_buckets_replay_prefill_sizes(moe, monkeypatch):
    """A runner of 1024 tokens on 32 experts: the 1024-token bucket (256 rows per expert) is the
    contiguous layout captured (sized by its upper bound, tokens past the batch routed nowhere),
    the masked buffers hold 512 rows per expert. Replays of several sizes without a host sync
    (output poisoned first): each contiguous replay gives the bits of the same step run eagerly
    on the bucket's rows, and every replay is close to the eager layer. With
    MOE_FP8_RUNNER_MASKED=0 a one-token bucket runs contiguous too."""
    monkeypatch.delenv("MOE_FP8_RUNNER_MASKED", raising=False)
    run = moe.decode_runner(max_tokens=1024)
    assert run.masked_sizes == (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) and run.m_max == 512
    assert run.graph is not None and run.buffers.a.shape[1] == 512
    valid = torch.zeros((), dtype=torch.int64, device="cuda")
    for i, n in enumerate([1024, 600, 7, 1024, 513]):
        x = rand_x(n, moe.cfg.hidden_size, 1500 + i)
        expected = moe(x)
        b = run.batch_size_for(n)
        if b not in run.masked_sizes:  # the same step eagerly, on the bucket's rows
            rows = torch.cat([x, run.x[n:b]])  # the static rows past the batch, as the graph sees them
            valid.fill_(n)
            static = moe.forward_contiguous_static(rows, num_valid_tokens=valid)[:n].clone()
        run.out.fill_(float("nan"))
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # a host sync inside the replay raises
        try:
            y = run(x).clone()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.isfinite(y).all(), f"n={n}"
        assert calc_diff(y, expected) < kKernelVsReference, f"n={n}"
        if b not in run.masked_sizes:
            assert torch.equal(y, static), f"n={n}: replay vs the eager static step"
    monkeypatch.setenv("MOE_FP8_RUNNER_MASKED", "0")
    every = moe.decode_runner(max_tokens=4)
    assert every.masked_sizes == () and every.buffers is None and every.graph is not None
    for i, n in enumerate([4, 1, 3]):
        x = rand_x(n, moe.cfg.hidden_size, 1550 + i)
        assert calc_diff(every(x).clone(), moe(x)) < kKernelVsReference, f"n={n}"


@torch.no_grad()
def test_runners_sharing_buffers_share_the_graph_pool(moe, monkeypatch):
    """A second layer's runner of 1024 tokens (a contiguous bucket, whose intermediates live in
    the graphs' pool) built with share_buffers_with captures into the first runner's pool: the
    memory it reserves is a small part of what the first one took, and both replay the bits of
    unshared runners."""
    monkeypatch.delenv("MOE_FP8_RUNNER_MASKED", raising=False)
    other = MoE(moe.cfg, device="cuda", seed=1)
    alone_a, alone_b = moe.decode_runner(max_tokens=1024), other.decode_runner(max_tokens=1024)
    torch.cuda.synchronize()
    before = torch.cuda.memory_reserved()
    run_a = moe.decode_runner(max_tokens=1024)
    torch.cuda.synchronize()
    middle = torch.cuda.memory_reserved()
    run_b = other.decode_runner(max_tokens=1024, share_buffers_with=run_a)
    torch.cuda.synchronize()
    after = torch.cuda.memory_reserved()
    assert run_b.pool == run_a.pool and run_b.buffers is run_a.buffers
    assert after - middle < 0.25 * (middle - before), (middle - before, after - middle)
    for i, n in enumerate([1024, 100, 700]):
        x = rand_x(n, moe.cfg.hidden_size, 1600 + i)
        y_a = run_a(x).clone()
        y_b = run_b(y_a).clone()
        assert torch.equal(y_a, alone_a(x).clone()), f"n={n}: layer a"
        assert torch.equal(y_b, alone_b(y_a).clone()), f"n={n}: layer b"


def shrinking_sizes(max_tokens: int) -> tuple:
    """Replays of a runner: full, a quarter, one token, full again (masked_m changing between)."""
    return tuple(sorted({max_tokens, max(1, max_tokens // 4), 1}, reverse=True)) + (max_tokens,)


def assert_decode_switch_keeps_bits(moe, monkeypatch, switch, sizes, seed, on_value="1",
                                    max_tokens=32):
    """Decode runners captured with ``switch`` 0 and ``on_value`` replay batches of ``sizes``
    tokens to the same bits."""
    monkeypatch.setenv(switch, "0")
    off = moe.decode_runner(max_tokens=max_tokens)
    monkeypatch.setenv(switch, on_value)
    on = moe.decode_runner(max_tokens=max_tokens)
    for i, n in enumerate(sizes):
        x = rand_x(n, moe.cfg.hidden_size, seed + i)
        assert torch.equal(on(x).clone(), off(x).clone()), f"{switch} decode n={n}"


@torch.no_grad()
def test_decode_runner_with_pdl_is_bit_identical(moe, monkeypatch):
    """MOE_FP8_DECODE_PDL=1 captures the decode graph with programmatic dependent launch: the
    same kernels, only their start overlaps the previous one's tail, so the same bits."""
    assert_decode_switch_keeps_bits(moe, monkeypatch, "MOE_FP8_DECODE_PDL", (32, 7, 1, 32), 850)


@pytest.mark.parametrize("switch", ["MOE_FP8_ROUTE_SIGMOID", "MOE_FP8_FUSED_DECODE_INDEX"])
@torch.no_grad()
def test_decode_router_branch_switches_are_bit_identical(moe, monkeypatch, switch):
    """The decode router branch with fewer kernels: the route kernel's own sigmoid (torch's bits)
    and the masked index from global ids with the row maps pre-set (the same integers): the same
    outputs as the separate kernels, including batches below the runner's size (num_valid)."""
    assert_decode_switch_keeps_bits(moe, monkeypatch, switch, (32, 7, 1, 32), 870)


@torch.no_grad()
def test_decode_fused_swiglu_keeps_bits(moe, monkeypatch):
    """MOE_FP8_FUSED_SWIGLU=1: the decode step's gate-up GEMM with SiLU-and-mul + quantisation in
    its epilogue writes the same act bytes, so the same outputs, also below the runner's size."""
    assert_decode_switch_keeps_bits(moe, monkeypatch, "MOE_FP8_FUSED_SWIGLU", (32, 7, 1, 32), 895)


@pytest.mark.parametrize("switch", ["MOE_FP8_SMALL_DISPATCH", "MOE_FP8_STAGE_KERNEL"])
@torch.no_grad()
def test_decode_session11_switches_keep_bits(moe, monkeypatch, switch):
    """The decode-step switches built in session 11 (index + permute in one kernel, the runner's
    input staged by one kernel) merge launches only: the same outputs, also below the runner's
    size."""
    assert_decode_switch_keeps_bits(moe, monkeypatch, switch, (32, 7, 1, 32), 905)


@pytest.mark.parametrize("max_tokens", [1, 32, 256])
@torch.no_grad()
def test_decode_early_weights_keep_bits(moe, monkeypatch, max_tokens):
    """MOE_FP8_EARLY_WEIGHTS=1: the down GEMM reads masked_m and loads its first weight slots
    before its PDL wait (the decode graph captures with PDL): the same tiles and sums, so the
    same bits — also when masked_m changes between replays (batches below the runner's size)."""
    assert_decode_switch_keeps_bits(moe, monkeypatch, "MOE_FP8_EARLY_WEIGHTS",
                                    shrinking_sizes(max_tokens), 990 + max_tokens,
                                    max_tokens=max_tokens)


@pytest.mark.parametrize("max_tokens", [1, 32, 256])
@torch.no_grad()
def test_decode_swap_ab_down_keeps_bits(moe, monkeypatch, max_tokens):
    """MOE_FP8_SWAP_AB_DOWN=1: the down GEMM with tokens on the wgmma N side (GemmConfig.swap_ab)
    forms each output from the same K-block products and promotions: the same bits, also when
    masked_m changes between replays."""
    assert_decode_switch_keeps_bits(moe, monkeypatch, "MOE_FP8_SWAP_AB_DOWN",
                                    shrinking_sizes(max_tokens), 1010 + max_tokens,
                                    max_tokens=max_tokens)


@torch.no_grad()
def test_decode_swap_ab_96_keeps_bits(moe, monkeypatch):
    """MOE_FP8_SWAP_AB_96=1: the swap-AB down GEMM on 96-token tiles (the 256-token graph of a
    256-token runner: 64 rows per expert) sums the same K-block products in the same order: the
    same bits, also when masked_m changes between replays."""
    assert_decode_switch_keeps_bits(moe, monkeypatch, "MOE_FP8_SWAP_AB_96", shrinking_sizes(256),
                                    1326, max_tokens=256)


@pytest.mark.parametrize("max_tokens", [1, 32, 256])
@torch.no_grad()
def test_decode_swap_ab_swiglu_keeps_bits(moe, monkeypatch, max_tokens):
    """MOE_FP8_SWAP_AB_SWIGLU=1: the fused gate-up with tokens on the wgmma N side forms h from the
    same K-block products and promotions, and act from the same per-value SiLU, amax and scale:
    the same bits, also when masked_m changes between replays."""
    assert_decode_switch_keeps_bits(moe, monkeypatch, "MOE_FP8_SWAP_AB_SWIGLU",
                                    shrinking_sizes(max_tokens), 1050 + max_tokens,
                                    max_tokens=max_tokens)


@pytest.mark.parametrize("max_tokens", [1, 32, 256])
@torch.no_grad()
def test_decode_gather_keeps_bits(moe, monkeypatch, max_tokens):
    """MOE_FP8_DECODE_GATHER=1: the dispatch copies no row and the fused gate-up reads each row
    from the unpermuted tokens: the same products, so the same bits — also when masked_m changes
    between replays (the small dispatch at 1 / 32 tokens, index + permute at 256)."""
    assert_decode_switch_keeps_bits(moe, monkeypatch, "MOE_FP8_DECODE_GATHER",
                                    shrinking_sizes(max_tokens), 1030 + max_tokens,
                                    max_tokens=max_tokens)


@torch.no_grad()
def test_decode_gather_by_expected_rows(moe, monkeypatch):
    """MOE_FP8_DECODE_GATHER unset: the masked dispatch leaves the rows for the gate-up to gather
    up to kDecodeGatherMaxRows expected rows per expert (256 tokens of 32 experts at top-8: 64),
    and copies them above (512 tokens: 128); both graph runners (masked at every size) match the
    eager path."""
    from moe_fp8.layers import permute
    monkeypatch.delenv("MOE_FP8_DECODE_GATHER", raising=False)
    monkeypatch.setenv("MOE_FP8_RUNNER_MASKED", "1")
    for n, gathers in ((256, True), (512, False)):
        rows = moe.dispatcher.expected_rows(n)
        assert (rows <= permute.kDecodeGatherMaxRows) is gathers
        x = rand_x(n, moe.cfg.hidden_size, 1480 + n)
        xq, xs = permute.quantize_tokens(x, moe.cfg.pow2_scale)
        route = moe.gate(x)
        layout, _ = moe.dispatcher.dispatch_masked((xq, xs), route.topk_idx, route.topk_weights,
                                                   max_tokens_per_expert=n)
        assert (layout.token_source is not None) is gathers, f"n={n}"
        y = moe.decode_runner(max_tokens=n)(x).clone()
        assert calc_diff(y, moe(x)) < kKernelVsReference, f"n={n}"


@pytest.mark.parametrize("router_sms", ["16", "40"])
@torch.no_grad()
def test_decode_shared_experts_on_fewer_sms_keep_bits(moe, monkeypatch, router_sms):
    """MOE_FP8_DECODE_ROUTER_SMS: the shared experts' GEMMs of the decode graph on fewer SMs (other
    tiles, a capped persistent grid): each output element still sums the same K blocks in the
    same order, so the same bits."""
    assert_decode_switch_keeps_bits(moe, monkeypatch, "MOE_FP8_DECODE_ROUTER_SMS", (32, 7, 1, 32),
                                    880, on_value=router_sms)


@pytest.mark.parametrize("tokens", [1, 4096])
@torch.no_grad()
def test_upper_bound_rows_is_exact(moe, tokens):
    """The prefill with its layout sized by an upper bound of M_sum (no host read-back: the
    dispatcher's contiguous_rows="upper_bound") gives the exact size's result: the extra rows are
    padding, skipped by both grouped GEMMs and never read by the combine (same bits unless the
    GEMM heuristic picks another tile for the larger M: then within one bf16 rounding)."""
    x = rand_x(tokens, moe.cfg.hidden_size, 900 + tokens)
    saved = moe.dispatcher.contiguous_rows
    try:
        moe.dispatcher.contiguous_rows = "exact"
        expected = moe(x)
        moe.dispatcher.contiguous_rows = "upper_bound"
        got = moe(x)
    finally:
        moe.dispatcher.contiguous_rows = saved
    assert torch.isfinite(got).all() and calc_diff(got, expected) < 1e-5


@pytest.mark.parametrize("tokens", [1, 333, 4096])
@torch.no_grad()
def test_prefill_swiglu_keeps_bits(moe, tokens, monkeypatch):
    """MOE_FP8_PREFILL_SWIGLU=1: the prefill's gate-up GEMM with SiLU-and-mul + quantisation in
    its epilogue writes the act bytes of the GEMM + SiLU pair, so the layer's output keeps its
    bits (both row-count modes of the layout: exact, and the upper bound's extra padding)."""
    x = rand_x(tokens, moe.cfg.hidden_size, 960 + tokens)
    saved = moe.dispatcher.contiguous_rows
    try:
        for rows in ("exact", "upper_bound"):
            moe.dispatcher.contiguous_rows = rows
            monkeypatch.setenv("MOE_FP8_PREFILL_SWIGLU", "0")
            expected = moe(x)
            monkeypatch.setenv("MOE_FP8_PREFILL_SWIGLU", "1")
            got = moe(x)
            assert torch.equal(got, expected), f"prefill swiglu T={tokens} rows={rows}"
    finally:
        moe.dispatcher.contiguous_rows = saved
