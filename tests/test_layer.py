"""The MoE layer on the CPU references: parity with transformers, both layouts, edge batches.

Measured on the tiny config (H 256, I 128, 16 experts, top-4), against transformers'
``DeepseekV3MoE`` in fp32 with the same weights: calc_diff ~2.0e-3 over a batch (worst single
token ~3.4e-3); the unquantised bf16 layer gives ~1.5e-5. The bounds below leave 2x margin.
Against ``reference_moe(simulate_fp8=True)`` (same roundings, dequantised weights) it is ~1e-6.
"""
import pytest
import torch

from moe_fp8.gemm import calc_diff
from moe_fp8.layers import MoE, MoEConfig
from moe_fp8.layers.dispatch import LocalDispatcher
from moe_fp8.layers.layouts import local_expert_ids, masked_index
from moe_fp8.layers.reference import dequantized_weights, reference_moe

from test_layer_helpers import hf_moe, installed_transformers_fill, sorted_idx

kLayerVsFp32 = 4e-3  # calc_diff bound, FP8 layer vs the fp32 transformers layer (measured ~2.0e-3)
kTokenVsFp32 = 8e-3  # per token (measured worst ~3.4e-3)
kVsSimulated = 2e-5  # vs reference_moe(simulate_fp8=True): plumbing only (measured ~1e-6)


@pytest.fixture(scope="module")
def pair():
    pytest.importorskip("transformers")
    cfg = MoEConfig.tiny()
    theirs = hf_moe(cfg)
    ours = MoE.from_hf(theirs, group_mask_fill=installed_transformers_fill())
    return theirs, ours


def test_matches_transformers(pair, gen):
    theirs, ours = pair
    x = torch.randn(2, 48, ours.cfg.hidden_size, generator=gen)  # [B, S, H] like a model passes
    with torch.no_grad():
        expected = theirs(x)
        _, _, hf_idx = theirs.gate(x)
        y = ours(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.equal(sorted_idx(ours.gate(x.view(-1, x.shape[-1])).topk_idx), sorted_idx(hf_idx))
    assert calc_diff(y, expected) < kLayerVsFp32
    worst = max(calc_diff(y.view(-1, x.shape[-1])[t], expected.view(-1, x.shape[-1])[t])
                for t in range(96))
    assert worst < kTokenVsFp32


@torch.no_grad()
def check_against_simulation(moe, x, y):
    routing = moe.gate(x)
    w = dequantized_weights(moe)
    ref = reference_moe(x, routing.topk_idx, routing.topk_weights, w["w13"], w["w2"],
                        w["shared_w13"], w["shared_w2"], simulate_fp8=True)
    assert calc_diff(y, ref) < kVsSimulated
    unquantised = reference_moe(x, routing.topk_idx, routing.topk_weights, w["w13"], w["w2"],
                                w["shared_w13"], w["shared_w2"])
    assert calc_diff(y, unquantised) < kLayerVsFp32


@pytest.mark.parametrize("tokens", [1, 2, 37, 129])
def test_contiguous_and_masked_agree(gen, tokens):
    moe = MoE(MoEConfig.tiny(), seed=3)
    x = torch.randn(tokens, moe.cfg.hidden_size, generator=gen).bfloat16()
    with torch.no_grad():
        y = moe(x)
        y_masked = moe.forward_masked(x)
    assert not torch.isnan(y).any()
    check_against_simulation(moe, x, y)
    torch.testing.assert_close(y_masked, y, rtol=0, atol=0)  # same row math, same roundings


def test_empty_experts(gen):
    """A bias that starves half the experts: their segments are empty in both layouts."""
    moe = MoE(MoEConfig.tiny(), seed=4)
    with torch.no_grad():
        moe.gate.e_score_correction_bias[::2] = -10.0  # even experts never chosen
        x = torch.randn(50, moe.cfg.hidden_size, generator=gen).bfloat16()
        y = moe(x)
        assert int(moe.last_tokens_per_expert[::2].sum()) == 0
        check_against_simulation(moe, x, y)
        torch.testing.assert_close(moe.forward_masked(x), y, rtol=0, atol=0)


def test_no_shared_experts_and_zero_tokens(gen):
    moe = MoE(MoEConfig.tiny(n_shared_experts=0), seed=5)
    x = torch.randn(9, moe.cfg.hidden_size, generator=gen).bfloat16()
    with torch.no_grad():
        check_against_simulation(moe, x, moe(x))
        empty = moe(x[:0])
    assert empty.shape == (0, moe.cfg.hidden_size)


def test_upper_bound_rows_same_result(gen):
    cfg = MoEConfig.tiny()
    exact = MoE(cfg, seed=6)
    bound = MoE(cfg, seed=6, dispatcher=LocalDispatcher(cfg.num_experts, cfg.hidden_size, cfg.top_k,
                                                        contiguous_rows="upper_bound"))
    x = torch.randn(33, cfg.hidden_size, generator=gen).bfloat16()
    with torch.no_grad():
        torch.testing.assert_close(bound(x), exact(x), rtol=0, atol=0)


def test_expert_shard_sums_to_full_layer(gen):
    """Two dispatchers holding experts 0..7 and 8..15 (no shared experts) add up to the full layer."""
    cfg = MoEConfig.tiny(n_shared_experts=0)
    full = MoE(cfg, seed=7)
    halves = []
    for offset in (0, 8):
        d = LocalDispatcher(cfg.num_experts, cfg.hidden_size, cfg.top_k, num_experts_local=8,
                            expert_offset=offset)
        part = MoE(cfg, dispatcher=d, seed=None)
        part.gate.load_state_dict(full.gate.state_dict())
        sl = slice(offset, offset + 8)
        part.experts.load_fp8(full.experts.w13[sl], full.experts.w13_scale[sl],
                              full.experts.w2[sl], full.experts.w2_scale[sl])
        halves.append(part)
    x = torch.randn(21, cfg.hidden_size, generator=gen).bfloat16()
    with torch.no_grad():
        total = halves[0](x).float() + halves[1](x).float()
        total_masked = halves[0].forward_masked(x).float() + halves[1].forward_masked(x).float()
        y = full(x).float()
    assert calc_diff(total, y) < 1e-5
    assert calc_diff(total_masked, y) < 1e-5


def test_fused_swiglu_switch_falls_back_off_the_gpu(gen, monkeypatch):
    """MOE_FP8_FUSED_SWIGLU=1 where the masked GEMM has no kernel (CPU): the two-step path, the
    same outputs."""
    monkeypatch.setenv("MOE_FP8_FUSED_SWIGLU", "1")
    moe = MoE(MoEConfig.tiny(), seed=8)
    x = torch.randn(3, moe.cfg.hidden_size, generator=gen).bfloat16()
    with torch.no_grad():
        on = moe.forward_masked(x)
        monkeypatch.setenv("MOE_FP8_FUSED_SWIGLU", "0")
        off = moe.forward_masked(x)
    assert torch.equal(on, off)


def test_switches_fall_back_off_the_gpu(gen, monkeypatch):
    """MOE_FP8_PREFILL_SWIGLU on the CPU (no kernels): nothing launched, the same outputs."""
    moe = MoE(MoEConfig.tiny(), seed=8)
    x = torch.randn(40, moe.cfg.hidden_size, generator=gen).bfloat16()
    with torch.no_grad():
        base_masked, base = moe.forward_masked(x), moe(x)
        monkeypatch.setenv("MOE_FP8_PREFILL_SWIGLU", "1")
        assert torch.equal(moe.forward_masked(x), base_masked) and torch.equal(moe(x), base)


def test_dynamic_tiles_switch_off_the_gpu(gen, monkeypatch):
    """MOE_FP8_DYNAMIC_TILES=1 on the CPU: no counter handed out (no kernels), the same outputs;
    the counter is a buffer outside the state dict (checkpoints unchanged)."""
    moe = MoE(MoEConfig.tiny(), seed=8)
    x = torch.randn(40, moe.cfg.hidden_size, generator=gen).bfloat16()
    assert not any("tile_counter" in name for name in moe.state_dict())
    with torch.no_grad():
        base = moe(x)
        monkeypatch.setenv("MOE_FP8_DYNAMIC_TILES", "1")
        assert moe.experts._tile_counter(x) is None
        assert torch.equal(moe(x), base)


def test_decode_switches_by_expected_rows(monkeypatch):
    """MOE_FP8_DECODE_GATHER / MOE_FP8_SWAP_AB_DOWN unset: on up to their row limits (decode
    batches), off above (a graph runner at prefill sizes); 1 always, 0 never."""
    from moe_fp8.layers import experts, permute
    from moe_fp8.layers.switches import switch_up_to_rows
    for env, limit in (("MOE_FP8_DECODE_GATHER", permute.kDecodeGatherMaxRows),
                       ("MOE_FP8_SWAP_AB_DOWN", experts.kSwapAbDownMaxRows)):
        monkeypatch.delenv(env, raising=False)
        assert switch_up_to_rows(env, limit, limit) and switch_up_to_rows(env, 0.25, limit)
        assert not switch_up_to_rows(env, limit + 1, limit)
        monkeypatch.setenv(env, "1")
        assert switch_up_to_rows(env, 100 * limit, limit)
        monkeypatch.setenv(env, "0")
        assert not switch_up_to_rows(env, 0.25, limit)
    monkeypatch.delenv("MOE_FP8_SWAP_AB_DOWN")
    assert experts._swap_ab_down(64.0) and not experts._swap_ab_down(128.0)


def test_decode_runner_on_cpu(gen):
    moe = MoE(MoEConfig.tiny(), seed=8)
    run = moe.decode_runner(max_tokens=16)
    assert run.graph is None  # eager on CPU
    for n in (1, 16, 5, 3):
        x = torch.randn(n, moe.cfg.hidden_size, generator=gen).bfloat16()
        with torch.no_grad():
            expected = moe(x)
        torch.testing.assert_close(run(x), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="max_tokens=16"):
        run(torch.randn(17, moe.cfg.hidden_size).bfloat16())
    with pytest.raises(ValueError, match="max_tokens"):
        moe.decode_runner(0)


def test_decode_runner_batch_sizes(gen):
    """One graph per batch size (powers of two and max_tokens by default); a batch runs the
    smallest that holds it; bad sizes raise naming the argument. On the CPU the eager step runs
    on the same first rows, with the same outputs as the layer."""
    from moe_fp8.layers.decode import default_batch_sizes
    assert default_batch_sizes(1) == (1,)
    assert default_batch_sizes(5) == (1, 2, 4, 5)
    assert default_batch_sizes(256) == (1, 2, 4, 8, 16, 32, 64, 128, 256)
    moe = MoE(MoEConfig.tiny(), seed=8)
    run = moe.decode_runner(max_tokens=24)
    assert run.batch_sizes == (1, 2, 4, 8, 16, 24)
    assert [run.batch_size_for(n) for n in (1, 3, 8, 9, 17, 24)] == [1, 4, 8, 16, 24, 24]
    pinned = moe.decode_runner(max_tokens=24, batch_sizes=[6, 6, 2])
    assert pinned.batch_sizes == (2, 6, 24)
    for n in (24, 3, 7, 1):
        x = torch.randn(n, moe.cfg.hidden_size, generator=gen).bfloat16()
        with torch.no_grad():
            expected = moe(x)
        torch.testing.assert_close(run(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(pinned(x), expected, rtol=0, atol=0)
    for bad in ([0], [25], [True], [2.0]):
        with pytest.raises(ValueError, match="batch_sizes"):
            moe.decode_runner(max_tokens=24, batch_sizes=bad)
    with pytest.raises(TypeError, match="batch_sizes"):
        moe.decode_runner(max_tokens=24, batch_sizes=4)


def test_runner_takes_the_contiguous_layout_past_decode_sizes(gen, monkeypatch):
    """Buckets of more than kRunnerMaskedMaxRows expected rows per expert run the contiguous
    layout (sized by its upper bound, tokens past the batch routed nowhere), and the masked
    buffers hold only the largest masked bucket; the outputs equal the eager layer's, also for
    a batch smaller than the rows a previous batch left in the static input.
    MOE_FP8_RUNNER_MASKED=1 / 0: every bucket masked / contiguous."""
    from moe_fp8.layers.decode import kRunnerMaskedMaxRows, masked_batch_sizes
    monkeypatch.delenv("MOE_FP8_RUNNER_MASKED", raising=False)
    moe = MoE(MoEConfig.tiny(), seed=8)  # 16 experts, top-4: T / 4 rows per expert
    largest = int(kRunnerMaskedMaxRows) * 4
    run = moe.decode_runner(max_tokens=2 * largest, batch_sizes=[1, 7, largest])
    assert run.masked_sizes == (1, 7, largest) and run.m_max == largest
    assert run.buffers.a.shape[1] == largest
    for n in (2 * largest, 5, largest + 1, 1):
        x = torch.randn(n, moe.cfg.hidden_size, generator=gen).bfloat16()
        with torch.no_grad():
            expected = moe(x)
        torch.testing.assert_close(run(x), expected, rtol=0, atol=0)
    monkeypatch.setenv("MOE_FP8_RUNNER_MASKED", "0")
    assert masked_batch_sizes(moe, (1, 8)) == ()
    every = moe.decode_runner(max_tokens=12)
    assert every.masked_sizes == () and every.m_max == 0 and every.buffers is None
    assert every.buffer_bytes == 0
    for n in (12, 3, 8):
        x = torch.randn(n, moe.cfg.hidden_size, generator=gen).bfloat16()
        with torch.no_grad():
            expected = moe(x)
        torch.testing.assert_close(every(x), expected, rtol=0, atol=0)
    assert every(torch.empty(0, moe.cfg.hidden_size).bfloat16()).shape == (0, moe.cfg.hidden_size)
    with pytest.raises(ValueError, match="share_buffers_with"):
        MoE(MoEConfig.tiny(), seed=9).decode_runner(12, share_buffers_with=run)
    monkeypatch.setenv("MOE_FP8_RUNNER_MASKED", "1")
    assert masked_batch_sizes(moe, (1, 10 * largest)) == (1, 10 * largest)


def test_forward_contiguous_static_checks_its_arguments():
    moe = MoE(MoEConfig.tiny(), seed=8)
    x = torch.randn(4, moe.cfg.hidden_size).bfloat16()
    valid = torch.tensor(3)
    with pytest.raises(ValueError, match="num_valid_tokens"):
        moe.forward_contiguous_static(x, num_valid_tokens=3)
    with pytest.raises(ValueError, match="num_valid_tokens"):
        moe.forward_contiguous_static(x, num_valid_tokens=torch.tensor(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="out must be"):
        moe.forward_contiguous_static(x, num_valid_tokens=valid, out=torch.empty(3, moe.cfg.hidden_size))
    out = torch.full_like(x, float("nan"))
    y = moe.forward_contiguous_static(x, num_valid_tokens=valid, out=out)
    assert y.data_ptr() == out.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(out[:3], moe(x[:3]), rtol=0, atol=0)


def test_decode_runners_share_buffers_across_layers(gen):
    """Two layers (different weights) whose runners hold one set of step buffers: called in
    turns, each gives what its own unshared runner gives; the second allocates none of them.
    Mismatched shapes raise naming the argument."""
    cfg = MoEConfig.tiny()
    first, second = MoE(cfg, seed=8), MoE(cfg, seed=9)
    run_a = first.decode_runner(max_tokens=16)
    run_b = second.decode_runner(max_tokens=16, share_buffers_with=run_a)
    alone_a, alone_b = first.decode_runner(max_tokens=16), second.decode_runner(max_tokens=16)
    assert run_b.buffers is run_a.buffers and run_b.workspace is run_a.workspace
    assert alone_b.buffers.a.data_ptr() != run_a.buffers.a.data_ptr()
    assert run_a.buffer_bytes == alone_a.buffer_bytes > 0
    for n in (16, 3, 9, 1):  # a model's order: layer a, then layer b on a's output
        x = torch.randn(n, cfg.hidden_size, generator=gen).bfloat16()
        y_a = run_a(x).clone()
        torch.testing.assert_close(y_a, alone_a(x), rtol=0, atol=0)
        torch.testing.assert_close(run_b(y_a), alone_b(y_a), rtol=0, atol=0)
    with pytest.raises(ValueError, match="share_buffers_with"):
        second.decode_runner(max_tokens=8, share_buffers_with=run_a)  # M_max 8 != 16
    with pytest.raises(ValueError, match="share_buffers_with"):
        MoE(MoEConfig.tiny(num_experts=8), seed=1).decode_runner(16, share_buffers_with=run_a)
    with pytest.raises(TypeError, match="share_buffers_with"):
        second.decode_runner(max_tokens=16, share_buffers_with=first)


def test_attached_graph_runners_take_small_inference_batches(gen):
    """attach_graph_runners: every layer of a model replays its runner (one set of buffers) for
    inference batches it holds, with the runner's outputs, copied out of its static buffer; larger
    batches, batches with grad and other dtypes take the eager path. (On the CPU both paths give
    the same bits, so the runner's device count tells which one ran.)"""
    from moe_fp8.layers import attach_graph_runners
    cfg = MoEConfig.tiny()
    model = torch.nn.Sequential(MoE(cfg, seed=8), MoE(cfg, seed=9))
    eager = torch.nn.Sequential(MoE(cfg, seed=8), MoE(cfg, seed=9))
    runners = attach_graph_runners(model, 16)
    assert len(runners) == 2 and runners[1].buffers is runners[0].buffers
    with torch.no_grad():
        for n in (16, 3, 1):
            x = torch.randn(n, cfg.hidden_size, generator=gen).bfloat16()
            y = model(x)
            assert [int(r.num_valid) for r in runners] == [n, n]
            torch.testing.assert_close(y, eager(x), rtol=0, atol=0)
            assert y.data_ptr() != runners[1].out.data_ptr()  # a copy, not the static buffer
        kept = y.clone()
        model(torch.randn(5, cfg.hidden_size, generator=gen).bfloat16())
        assert torch.equal(y, kept)  # the next call does not overwrite a returned output
        big = torch.randn(2, 9, cfg.hidden_size, generator=gen).bfloat16()  # 18 tokens > 16
        torch.testing.assert_close(model(big), eager(big), rtol=0, atol=0)
        assert [int(r.num_valid) for r in runners] == [5, 5]  # eager: the runners untouched
        model(torch.randn(4, cfg.hidden_size, generator=gen))  # fp32 x: eager
        assert [int(r.num_valid) for r in runners] == [5, 5]
    x = torch.randn(4, cfg.hidden_size, generator=gen).bfloat16()
    assert model(x).requires_grad  # grad on: eager, differentiable through the router
    assert [int(r.num_valid) for r in runners] == [5, 5]
    model[0].attach_graph_runner(None)
    with torch.no_grad():
        model(x)
    assert [int(r.num_valid) for r in runners] == [5, 4]
    with pytest.raises(ValueError, match="this layer's decode runners"):
        model[0].attach_graph_runner(runners[1])
    with pytest.raises(TypeError, match="DecodeRunner"):
        model[0].attach_graph_runner(model[1])


def test_layout_metadata(gen):
    cfg = MoEConfig.tiny()
    d = LocalDispatcher(cfg.num_experts, cfg.hidden_size, cfg.top_k)
    tokens = 45
    x = torch.randn(tokens, cfg.hidden_size, generator=gen).bfloat16()
    rows = []
    for _ in range(tokens):  # distinct experts per token, expert 3 in every token, 0 and 1 in none
        others = torch.randperm(cfg.num_experts - 4, generator=gen)[:cfg.top_k - 1] + 4
        rows.append(torch.cat([torch.tensor([3]), others]))
    topk_idx = torch.stack(rows)
    weights = torch.rand(tokens, cfg.top_k, generator=gen)
    layout, handle = d.dispatch_contiguous(x, topk_idx, weights)
    counts = torch.bincount(topk_idx.flatten(), minlength=cfg.num_experts)
    assert counts[0] == 0 and counts[1] == 0 and counts[3] == tokens
    assert torch.equal(layout.tokens_per_expert, counts)
    assert layout.num_rows == int(((counts + 127) // 128 * 128).sum())
    blocks = layout.m_indices.view(-1, 128)
    for b in blocks:  # one expert per block, -1 only at the end
        real = b[b >= 0]
        assert real.numel() == 0 or (real == real[0]).all()
        assert (b[:real.numel()] >= 0).all()
    valid = layout.row_token >= 0
    assert int(valid.sum()) == tokens * cfg.top_k
    assert torch.equal(topk_idx[layout.row_token[valid], layout.row_slot[valid]].int(),
                       layout.m_indices[valid])
    xq, _ = d.tokens_in(x)
    assert torch.equal(layout.a[valid].view(torch.uint8), xq[layout.row_token[valid]].view(torch.uint8))
    # every pair's combine row holds that pair
    rows = handle.combine.slot_row
    assert torch.equal(layout.row_token[rows], torch.arange(tokens)[:, None].expand_as(rows))

    masked, _ = d.dispatch_masked(x, topk_idx, weights, max_tokens_per_expert=tokens)
    assert torch.equal(masked.masked_m.long(), counts)
    assert int(masked.num_overflow) == 0
    for e in range(cfg.num_experts):
        m = int(counts[e])
        assert (masked.row_token[e, m:] == -1).all()
        assert torch.equal(topk_idx[masked.row_token[e, :m], masked.row_slot[e, :m]], torch.full((m,), e))


def test_masked_overflow_is_counted():
    topk_idx = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 0]])
    index = masked_index(local_expert_ids(topk_idx, 0, 4), 4, m_max=2)
    assert index.masked_m.tolist() == [2, 2, 1, 1]
    assert int(index.num_overflow) == 2  # expert 0 got 4 pairs, holds 2


def test_skip_sentinel_for_invalid_tokens():
    topk_idx = torch.tensor([[0, 1], [2, 3], [1, 2]])
    local = local_expert_ids(topk_idx, expert_offset=1, num_experts_local=2, num_valid_tokens=2)
    assert local.tolist() == [[2, 0], [1, 2], [2, 2]]  # 2 = skip: expert 0 and 3 not local; token 2 invalid


def test_bad_inputs():
    moe = MoE(MoEConfig.tiny(), seed=None)
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., 256\]"):
        moe(torch.randn(3, 128))
    with pytest.raises(TypeError, match="x must be"):
        moe(torch.randint(0, 3, (3, 256)))
    with pytest.raises(TypeError, match="dtype"):
        MoE(MoEConfig.tiny(), dtype=torch.float32)
    d = moe.dispatcher
    with pytest.raises(ValueError, match="topk_idx"):
        d.dispatch_contiguous(torch.randn(3, 256), torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="expert_offset"):
        LocalDispatcher(16, 256, 4, num_experts_local=8, expert_offset=9)


def test_forward_masked_takes_x_fp8():
    """MoE.forward_masked(x, x_fp8=(q, s)): x already quantised 1x128 is used as it stands (the
    same output as quantising x inside), and its shapes, dtypes and device are checked."""
    from moe_fp8 import gemm as G
    moe = MoE(MoEConfig.tiny(), seed=3)
    x = torch.randn(5, moe.cfg.hidden_size).bfloat16()
    with torch.no_grad():
        q, s = G.per_token_group_quant_fp8(x, 128, pow2_scale=moe.cfg.pow2_scale)
        assert torch.equal(moe.forward_masked(x, x_fp8=(q, s)), moe.forward_masked(x))
        with pytest.raises(ValueError, match="x_fp8\\[0\\]"):
            moe.forward_masked(x, x_fp8=(q[:4], s))
        with pytest.raises(ValueError, match="x_fp8\\[1\\]"):
            moe.forward_masked(x, x_fp8=(q, s[:, :1]))
        with pytest.raises(TypeError, match="x_fp8"):
            moe.forward_masked(x, x_fp8=q)
        with pytest.raises(ValueError, match="device"):
            moe.forward_masked(x, x_fp8=(q.to("meta"), s))
