"""Expert parallelism on CPU: gloo process groups of 2, 4 and 8 ranks, spawned by this file.

Process start-up dominates on a small machine, so each world size runs ONE spawned job that
executes every case on every rank (collectives keep the ranks in step; a barrier after each case)
and reports per-case tracebacks; the pytest functions below each report one (case, world size).
Every job has a timeout (``kJobTimeoutS``) and gloo a collective timeout, so a hang fails.

Oracles: (1) the single-process layer (``MoE`` with the local dispatcher) with the same weights
on the concatenation of every rank's tokens; (2) fake experts with a closed form
(``y = dequant(row) * (global expert + 1)``) for the dispatcher alone; (3) the local dispatcher's
layout over the concatenated tokens, which EP must reproduce bit for bit (rows arrive ordered by
(source rank, token), which is the concatenation's order).
"""
from __future__ import annotations

import datetime
import functools
import json
import os
import tempfile
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_fp8.layers.placement import ExpertPlacement

kJobTimeoutS = 150  # one spawned job (all cases of one world size)
kCollectiveTimeoutS = 45  # gloo: a rank stuck in a collective raises instead of hanging
kPoison = 1.0e4  # fake-expert rows the GEMMs would not write: any read with weight != 0 shows
kWorlds = (2, 4, 8)  # 8: EP = 8 (issue 9) on gloo; the GPU run needs an 8-GPU machine


# ============================================================================ spawning

def run_spawned(worker, world: int, *args, timeout_s: float = kJobTimeoutS):
    """Run ``worker(rank, world, store_path, result_dir, *args)`` in ``world`` spawned processes.

    Returns ``(results, job_error)``: ``results[r]`` is rank r's JSON (``result_dir/rank{r}.json``,
    ``{}`` if it wrote none) and ``job_error`` a message if a process failed or the job timed
    out (the processes this call started are then terminated), else None. Never raises: one
    failing case must not make every later test re-run the job.
    """
    job_error = None
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        ctx = mp.start_processes(worker, args=(world, store, tmp, *args), nprocs=world,
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
                if time.monotonic() > deadline:
                    job_error = f"job with {world} ranks exceeded {timeout_s} s"
                    break
        except Exception as error:  # a rank raised or exited non-zero
            job_error = f"{type(error).__name__}: {error}"
        finally:
            for process in ctx.processes:
                if process.is_alive():
                    process.terminate()
        results = []
        for rank in range(world):
            path = os.path.join(tmp, f"rank{rank}.json")
            results.append(json.load(open(path)) if os.path.exists(path) else {})
        return results, job_error


def init_group(backend: str, rank: int, world: int, store: str, device_id=None) -> None:
    os.environ["NCCL_NVLS_ENABLE"] = "0"  # DEVICE_FACTS: keep NVLink SHARP off on the lent machines
    kwargs = {"device_id": device_id} if device_id is not None else {}
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=kCollectiveTimeoutS), **kwargs)


# ============================================================================ shared helpers

def tiny_cfg():
    from moe_fp8.layers import MoEConfig
    return MoEConfig.tiny()  # H 256, I 128, 16 experts, top-4, 4 groups / top-2


def build_pair(cfg, group, device="cpu", seed: int = 0, skew: bool = False):
    """(single-process reference layer, this rank's EP layer) with the same weights."""
    from moe_fp8.layers import MoE
    ref = MoE(cfg, device=device, seed=seed)
    ep = MoE(cfg, ep_group=group, device=device, seed=None)
    if skew:  # every token picks experts of groups 0 and 1 (0 .. E/2 - 1): the rest are empty
        ref.gate.e_score_correction_bias[:cfg.num_experts // 2] += 10.0
    ep.gate.load_state_dict(ref.gate.state_dict())
    if ref.shared_experts is not None:
        ep.shared_experts.load_state_dict(ref.shared_experts.state_dict())
    local = ExpertPlacement.from_group(cfg.num_experts, group).local_slice
    ep.experts.load_fp8(ref.experts.w13[local], ref.experts.w13_scale[local],
                        ref.experts.w2[local], ref.experts.w2_scale[local])
    return ref, ep


def per_rank(values, world: int) -> list:
    """A case's per-rank values (written for 4 ranks) repeated over ``world`` ranks."""
    return [values[r % len(values)] for r in range(world)]


def shard_rows(x_all: torch.Tensor, counts, rank: int) -> torch.Tensor:
    start = sum(counts[:rank])
    return x_all[start:start + counts[rank]]


def dequant(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return q.float() * s.float().repeat_interleave(128, dim=-1)


def random_routing(tokens: int, cfg, gen: torch.Generator, *, invalid_every: int = 0):
    """Distinct experts per token (random), fp32 weights; every ``invalid_every``-th slot -1."""
    scores = torch.rand(tokens, cfg.num_experts, generator=gen)
    topk_idx = scores.topk(cfg.top_k, dim=1).indices  # [T, k] int64, distinct per row
    if invalid_every:
        topk_idx.view(-1)[::invalid_every] = -1
    return topk_idx, torch.rand(tokens, cfg.top_k, generator=gen) + 0.1


def oracle(xq, xs, topk_idx, topk_weights, add=None):
    """``out[t] = add[t] + sum_j w[t, j] * bf16(dequant(x_t) * (g + 1))`` for valid ids g."""
    deq = dequant(xq, xs)  # [T, H]
    acc = add.float().clone() if add is not None else torch.zeros_like(deq)
    for j in range(topk_idx.shape[1]):
        g = topk_idx[:, j]
        y = (deq * (g.clamp(min=0) + 1).float()[:, None]).bfloat16().float()
        acc += torch.where((g >= 0)[:, None], y * topk_weights[:, j, None], 0.0)
    return acc


def fake_experts_contiguous(layout, expert_offset: int) -> torch.Tensor:
    scale = (layout.m_indices.long() + expert_offset + 1).float()
    y = (dequant(layout.a, layout.sa) * scale[:, None]).bfloat16()
    y[layout.m_indices < 0] = kPoison
    return y


def fake_experts_masked(layout, expert_offset: int) -> torch.Tensor:
    experts, m_max = layout.a.shape[:2]
    device = layout.a.device
    scale = torch.arange(experts, dtype=torch.float32, device=device) + expert_offset + 1
    y = (dequant(layout.a, layout.sa) * scale[:, None, None]).bfloat16()
    unused = torch.arange(m_max, device=device)[None, :] >= layout.masked_m.long()[:, None]  # [E_loc, M_max]
    y[unused] = kPoison
    return y


def assert_bf16_close(actual, expected, what: str, ulps: float = 2.0):
    """Within ``ulps`` bf16 ulps of the largest |expected| per row (sum-order/rounding only)."""
    actual, expected = actual.float(), expected.float()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = expected.abs().amax(dim=-1, keepdim=True).clamp(min=1e-6)
    err = ((actual - expected).abs() / scale).max().item() if actual.numel() else 0.0
    assert err <= ulps * 2.0 ** -8, f"{what}: max error {err:.3g} of the row max (> {ulps} bf16 ulps)"


# ============================================================================ cases (run on every rank)

def case_layer_prefill(rank, world, group):
    """EP layer == single-process layer; uneven batches, T = 1 on rank 1."""
    cfg = tiny_cfg()
    ref, ep = build_pair(cfg, group)
    counts = per_rank([37, 1, 64, 11], world)
    x_all = torch.randn(sum(counts), cfg.hidden_size, generator=torch.Generator().manual_seed(1)).bfloat16()
    y = ep(shard_rows(x_all, counts, rank))
    assert_bf16_close(y, shard_rows(ref(x_all), counts, rank), "prefill")


def case_layer_prefill_skewed(rank, world, group):
    """Half the experts (all of the upper ranks') receive nothing; T = 0 on rank 1."""
    cfg = tiny_cfg()
    ref, ep = build_pair(cfg, group, skew=True)
    counts = per_rank([29, 0, 1, 7], world)
    x_all = torch.randn(sum(counts), cfg.hidden_size, generator=torch.Generator().manual_seed(2)).bfloat16()
    y = ep(shard_rows(x_all, counts, rank))
    assert y.shape == (counts[rank], cfg.hidden_size)
    assert_bf16_close(y, shard_rows(ref(x_all), counts, rank), "prefill skewed")


def case_layer_decode(rank, world, group):
    """The masked path (decode runner, eager on CPU): two steps of different batch sizes."""
    cfg = tiny_cfg()
    ref, ep = build_pair(cfg, group)
    runner = ep.decode_runner(8)
    assert runner.m_max == world * 8  # capacity: one row per (source rank, token)
    # forward cannot replay it: every rank would have to take the same path
    from moe_fp8.layers import attach_graph_runners
    with pytest.raises(ValueError, match="expert-parallel"):
        ep.attach_graph_runner(runner)
    assert attach_graph_runners(ep, 8) == []
    gen = torch.Generator().manual_seed(3)
    for counts in (per_rank([8, 1, 5, 3], world), per_rank([2, 8, 0, 7], world)):
        x_all = torch.randn(sum(counts), cfg.hidden_size, generator=gen).bfloat16()
        y = runner(shard_rows(x_all, counts, rank))
        assert_bf16_close(y, shard_rows(ref(x_all), counts, rank), f"decode {counts}")


def case_layer_decode_skewed(rank, world, group):
    cfg = tiny_cfg()
    ref, ep = build_pair(cfg, group, skew=True)
    runner = ep.decode_runner(6)
    counts = per_rank([6, 1, 0, 4], world)
    x_all = torch.randn(sum(counts), cfg.hidden_size, generator=torch.Generator().manual_seed(4)).bfloat16()
    y = runner(shard_rows(x_all, counts, rank))
    assert_bf16_close(y, shard_rows(ref(x_all), counts, rank), "decode skewed")


def _dispatcher(cfg, group, **kwargs):
    from moe_fp8.layers.dispatch.torch_dist import TorchDistDispatcher
    return TorchDistDispatcher(cfg, group, **kwargs)


def _oracle_inputs(cfg, counts, rank, seed, invalid_every=0):
    from moe_fp8.layers.permute import quantize_tokens
    gen = torch.Generator().manual_seed(seed)
    x_all = torch.randn(sum(counts), cfg.hidden_size, generator=gen).bfloat16()
    idx_all, w_all = random_routing(sum(counts), cfg, gen, invalid_every=invalid_every)
    add_all = torch.randn(sum(counts), cfg.hidden_size, generator=gen).bfloat16()
    xq, xs = quantize_tokens(shard_rows(x_all, counts, rank))
    return (xq, xs), shard_rows(idx_all, counts, rank), shard_rows(w_all, counts, rank), \
        shard_rows(add_all, counts, rank)


def case_dispatch_contiguous_oracle(rank, world, group):
    """Dispatcher alone, fake experts: -1 ids, T = 0 on rank 1, both combine dtypes, add."""
    cfg = tiny_cfg()
    counts = per_rank([13, 0, 40, 1], world)
    (xq, xs), idx, w, add = _oracle_inputs(cfg, counts, rank, seed=5, invalid_every=7)
    expected = oracle(xq, xs, idx, w, add)
    for combine_dtype, ulps in ((torch.float32, 1.0), (None, 4.0)):
        disp = _dispatcher(cfg, group, combine_dtype=combine_dtype)
        layout, handle = disp.dispatch_contiguous((xq, xs), idx, w)
        assert layout.num_rows % 128 == 0
        blocks = layout.m_indices.view(-1, 128)  # one expert per 128-row block (+ -1 padding)
        assert ((blocks == blocks[:, :1]) | (blocks == -1)).all() and (blocks[:, 0] >= 0).all()
        y = disp.combine_contiguous(fake_experts_contiguous(layout, disp.expert_offset), handle, add=add)
        assert y.dtype == torch.bfloat16 and y.shape == (counts[rank], cfg.hidden_size)
        assert_bf16_close(y, expected, f"contiguous combine_dtype={combine_dtype}", ulps)


def case_combine_pipelined(rank, world, group):
    """The pipelined combine (MOE_FP8_EP_PIPELINE=1: per peer, in chunks, rows to itself without
    a transfer) == the one all-to-all, bit for bit: uneven batches, a rank with no tokens, a rank
    whose experts receive nothing, both combine dtypes, add or not."""
    from kernel_checks import env_switch
    cfg = tiny_cfg()
    for seed, counts in enumerate(([13, 0, 40, 1], [3, 70, 9, 130])):
        (xq, xs), idx, w, add = _oracle_inputs(cfg, per_rank(counts, world), rank, seed=40 + seed, invalid_every=6)
        if seed == 0:  # distinct experts of the lower half: the upper half of the ranks receive nothing
            gen = torch.Generator().manual_seed(rank)
            idx = torch.stack([torch.randperm(cfg.num_experts // 2, generator=gen)[:cfg.top_k]
                               for _ in range(idx.shape[0])]) if idx.shape[0] else idx
        for combine_dtype in (None, torch.float32):
            disp = _dispatcher(cfg, group, combine_dtype=combine_dtype)
            layout, handle = disp.dispatch_contiguous((xq, xs), idx, w)
            y_rows = fake_experts_contiguous(layout, disp.expert_offset)
            with env_switch("MOE_FP8_EP_PIPELINE", "0"):
                want = disp.combine_contiguous(y_rows, handle, add=add if seed else None)
            with env_switch("MOE_FP8_EP_PIPELINE", "1"):
                got = disp.combine_contiguous(y_rows, handle, add=add if seed else None)
            assert torch.equal(got, want), (seed, combine_dtype)


def nccl_groups_complete(groups_per_rank) -> bool:
    """Replays every rank's ``batch_isend_irecv`` groups as NCCL runs them: one group after
    another per rank (like a collective on one stream), a group done once each of its ops meets
    its counterpart (the k-th send a -> b meets the k-th receive at b from a, same size) in the
    partner's current group. True when every group completes; False on a deadlock."""
    ranks = len(groups_per_rank)
    position = [0] * ranks
    issued = [dict() for _ in range(ranks)]  # (kind, peer) -> ops of that kind done so far

    def labelled(r):  # the current group's ops with their per-(kind, peer) sequence numbers
        seen, out = dict(issued[r]), []
        for kind, peer, size in groups_per_rank[r][position[r]]:
            k = seen.get((kind, peer), 0)
            seen[(kind, peer)] = k + 1
            out.append((kind, peer, k, size))
        return out

    while any(position[r] < len(groups_per_rank[r]) for r in range(ranks)):
        active = {r: labelled(r) for r in range(ranks) if position[r] < len(groups_per_rank[r])}
        done = [r for r, ops in active.items()
                if all(p in active and (("recv" if kind == "send" else "send"), r, k, size) in active[p]
                       for kind, p, k, size in ops)]
        if not done:
            return False
        for r in done:
            for kind, peer, _, _ in active[r]:
                issued[r][(kind, peer)] = issued[r].get((kind, peer), 0) + 1
            position[r] += 1
    return True


def test_nccl_replay_finds_the_classic_deadlock():
    """The replay itself: pairing the send and the receive with the same peer per step deadlocks
    at 3 ranks (the bug the pipelined combine had); shifting them (send to me + s, receive from
    me - s) completes."""
    def same_peer(r, ranks=3):
        return [[("send", (r + s) % ranks, 1), ("recv", (r + s) % ranks, 1)] for s in (1, 2)]

    def shifted(r, ranks=3):
        return [[("send", (r + s) % ranks, 1), ("recv", (r - s) % ranks, 1)] for s in (1, 2)]

    assert not nccl_groups_complete([same_peer(r) for r in range(3)])
    assert nccl_groups_complete([shifted(r) for r in range(3)])


def case_pipelined_groups_cannot_deadlock(rank, world, group):
    """Every rank's point-to-point groups of a pipelined combine (uneven batches, a rank without
    tokens), gathered and replayed under NCCL's in-order rule: they all complete. gloo itself
    would not hang on a bad order, so the order is checked, not just the values."""
    import torch.distributed as D
    from kernel_checks import env_switch
    cfg = tiny_cfg()
    (xq, xs), idx, w, add = _oracle_inputs(cfg, per_rank([13, 0, 40, 1, 7], world), rank, seed=44)
    disp = _dispatcher(cfg, group)
    layout, handle = disp.dispatch_contiguous((xq, xs), idx, w)
    y_rows = fake_experts_contiguous(layout, disp.expert_offset)
    log, real = [], D.batch_isend_irecv

    def recording(ops):
        log.append([("send" if op.op is D.isend else "recv", op.peer, op.tensor.numel()) for op in ops])
        return real(ops)

    D.batch_isend_irecv = recording
    try:
        with env_switch("MOE_FP8_EP_PIPELINE", "1"):
            disp.combine_contiguous(y_rows, handle, add=add)
    finally:
        D.batch_isend_irecv = real
    logs = [None] * world
    dist.all_gather_object(logs, log, group=group)
    assert nccl_groups_complete(logs), logs


def case_subgroup_pipelined_combine(rank, world, group):
    """An EP group that is not the world (the odd ranks: EP inside data parallelism): dispatch and
    the pipelined combine (point-to-point ops name peers by global rank) equal the plain one."""
    from kernel_checks import env_switch
    members = list(range(1, world, 2))
    sub = dist.new_group(members)  # collective over every rank of the world
    if rank not in members:
        return
    cfg = tiny_cfg()
    me = members.index(rank)
    (xq, xs), idx, w, add = _oracle_inputs(cfg, per_rank([9, 30, 0, 4], len(members)), me, seed=45)
    disp = _dispatcher(cfg, sub)
    assert disp.global_ranks == members
    layout, handle = disp.dispatch_contiguous((xq, xs), idx, w)
    y_rows = fake_experts_contiguous(layout, disp.expert_offset)
    with env_switch("MOE_FP8_EP_PIPELINE", "0"):
        want = disp.combine_contiguous(y_rows, handle, add=add)
    with env_switch("MOE_FP8_EP_PIPELINE", "1"):
        got = disp.combine_contiguous(y_rows, handle, add=add)
    assert torch.equal(got, want)
    assert_bf16_close(want, oracle(xq, xs, idx, w, add), "subgroup combine", 4.0)


def case_dispatch_masked_oracle(rank, world, group):
    """Masked pair: num_valid_tokens as a device scalar, static out buffers reused, overflow count."""
    from moe_fp8.layers.layouts import MaskedBuffers
    cfg = tiny_cfg()
    tokens = 9
    disp = _dispatcher(cfg, group)
    m_max = disp.max_tokens_per_expert(tokens)
    buffers = MaskedBuffers.allocate(disp.num_experts_local, m_max, cfg.hidden_size, "cpu")
    out = torch.full((tokens, cfg.hidden_size), float("nan"), dtype=torch.bfloat16)
    for step, valid in enumerate((per_rank([9, 1, 4, 0], world), per_rank([0, 9, 2, 5], world))):
        (xq, xs), idx, w, add = _oracle_inputs(cfg, [tokens] * world, rank, seed=6 + step, invalid_every=5)
        num_valid = torch.tensor(valid[rank])
        layout, handle = disp.dispatch_masked((xq, xs), idx, w, max_tokens_per_expert=m_max,
                                              num_valid_tokens=num_valid, out=buffers)
        assert layout.a.data_ptr() == buffers.a.data_ptr() and int(layout.num_overflow) == 0
        y = disp.combine_masked(fake_experts_masked(layout, disp.expert_offset), handle, add=add, out=out)
        assert y.data_ptr() == out.data_ptr()
        live = valid[rank]
        assert_bf16_close(y[:live], oracle(xq, xs, idx, w, add)[:live], f"masked step {step}", 4.0)
        assert_bf16_close(y[live:], add[live:], f"masked step {step} (invalid tokens: add only)", 0.0)
    # too small an M_max: pairs beyond it are dropped and counted (never silently)
    (xq, xs), idx, w, _ = _oracle_inputs(cfg, [tokens] * world, rank, seed=9)
    layout, _ = disp.dispatch_masked((xq, xs), idx, w, max_tokens_per_expert=1)
    assert int(layout.num_overflow) == _expected_overflow(disp, group, idx, 1) > 0


def _expected_overflow(disp, group, idx_local, m_max):
    """Pairs for this rank's experts from every rank, minus at most m_max per expert."""
    gathered = [torch.empty_like(idx_local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, idx_local, group=group)
    ids = torch.cat(gathered).reshape(-1)
    local = ids - disp.expert_offset
    counts = torch.bincount(local[(local >= 0) & (local < disp.num_experts_local)],
                            minlength=disp.num_experts_local)
    return int((counts - m_max).clamp(min=0).sum())


def case_layout_matches_local(rank, world, group):
    """EP layouts == the local dispatcher's for this rank's experts over all ranks' tokens."""
    from moe_fp8.layers.dispatch.local import LocalDispatcher
    cfg = tiny_cfg()
    counts = per_rank([21, 3, 0, 50], world)
    disp = _dispatcher(cfg, group)
    local = LocalDispatcher(cfg.num_experts, cfg.hidden_size, cfg.top_k,
                            num_experts_local=disp.num_experts_local, expert_offset=disp.expert_offset)
    all_inputs = [_oracle_inputs(cfg, counts, r, seed=10) for r in range(world)]
    (xq, xs), idx, w, _ = all_inputs[rank]
    cat = lambda i: torch.cat([inp[i] for inp in all_inputs])  # noqa: E731
    xq_all = torch.cat([inp[0][0] for inp in all_inputs])
    xs_all = torch.cat([inp[0][1] for inp in all_inputs])
    ep_layout, _ = disp.dispatch_contiguous((xq, xs), idx, w)
    ref_layout, _ = local.dispatch_contiguous((xq_all, xs_all), cat(1), cat(2))
    assert ep_layout.num_rows == ref_layout.num_rows
    assert torch.equal(ep_layout.m_indices, ref_layout.m_indices)
    assert torch.equal(ep_layout.tokens_per_expert, ref_layout.tokens_per_expert)
    real = ref_layout.m_indices >= 0
    assert torch.equal(ep_layout.a.view(torch.uint8)[real], ref_layout.a.view(torch.uint8)[real])
    assert torch.equal(ep_layout.sa[real], ref_layout.sa[real])
    # masked: static T = 8 everywhere, a different number of live tokens per rank
    tokens, valid = 8, per_rank([8, 2, 0, 5], world)
    all_inputs = [_oracle_inputs(cfg, [tokens] * world, r, seed=11) for r in range(world)]
    live = lambda i: torch.cat([inp[i][:valid[r]] for r, inp in enumerate(all_inputs)])  # noqa: E731
    m_max = disp.max_tokens_per_expert(tokens)
    (xq, xs), idx, w, _ = all_inputs[rank]
    ep_masked, _ = disp.dispatch_masked((xq, xs), idx, w, max_tokens_per_expert=m_max,
                                        num_valid_tokens=valid[rank])
    xq_live = torch.cat([inp[0][0][:valid[r]] for r, inp in enumerate(all_inputs)])
    xs_live = torch.cat([inp[0][1][:valid[r]] for r, inp in enumerate(all_inputs)])
    ref_masked, _ = local.dispatch_masked((xq_live, xs_live), live(1), live(2), max_tokens_per_expert=m_max)
    assert torch.equal(ep_masked.masked_m, ref_masked.masked_m)
    for e, m in enumerate(ref_masked.masked_m.tolist()):
        assert torch.equal(ep_masked.a[e, :m].view(torch.uint8), ref_masked.a[e, :m].view(torch.uint8))
        assert torch.equal(ep_masked.sa[e, :m], ref_masked.sa[e, :m])


def case_dispatch_contiguous_edges(rank, world, group):
    """bf16 input == the fp8 pair (quantised inside, while the counts travel); a rank whose every
    id is -1 sends nothing yet gets add back exactly; the combine is deterministic."""
    from moe_fp8.layers.permute import quantize_tokens
    cfg = tiny_cfg()
    counts = per_rank([19, 6, 33, 2], world)
    gen = torch.Generator().manual_seed(13)
    x_all = torch.randn(sum(counts), cfg.hidden_size, generator=gen).bfloat16()
    idx_all, w_all = random_routing(sum(counts), cfg, gen)
    add_all = torch.randn(sum(counts), cfg.hidden_size, generator=gen).bfloat16()
    x, idx, w, add = (shard_rows(t, counts, rank) for t in (x_all, idx_all, w_all, add_all))
    if rank % 2:  # odd ranks route nothing: S_send = 0 with T > 0
        idx = torch.full_like(idx, -1)
    disp = _dispatcher(cfg, group)
    xq, xs = quantize_tokens(x)
    from_pair, handle = disp.dispatch_contiguous((xq, xs), idx, w)
    from_bf16, _ = disp.dispatch_contiguous(x, idx, w)
    assert torch.equal(from_pair.a.view(torch.uint8), from_bf16.a.view(torch.uint8))
    assert torch.equal(from_pair.sa, from_bf16.sa) and torch.equal(from_pair.m_indices, from_bf16.m_indices)
    y_rows = fake_experts_contiguous(from_pair, disp.expert_offset)
    y = disp.combine_contiguous(y_rows, handle, add=add)
    assert torch.equal(y, disp.combine_contiguous(y_rows, handle, add=add)), "combine not deterministic"
    assert_bf16_close(y, oracle(xq, xs, idx, w, add), "edges", 4.0)
    plain = disp.combine_contiguous(y_rows, handle)
    assert_bf16_close(plain, oracle(xq, xs, idx, w), "edges, no add", 4.0)
    if rank % 2:
        assert torch.equal(y, add) and (plain == 0).all() and handle.num_send == 0


def case_no_silent_gradients(rank, world, group):
    """The EP layer's exchanges carry no autograd graph: asking for gradients (a parameter or the
    input requiring grad, grad mode on) raises instead of returning an output without them;
    enable_fp8_training raises too. Rank-local checks: no collective is entered."""
    cfg = tiny_cfg()
    from moe_fp8.layers import MoE
    ep = MoE(cfg, ep_group=group, seed=0)
    x = torch.randn(5, cfg.hidden_size).bfloat16()
    with torch.enable_grad():
        for call in (lambda: ep(x), lambda: ep.forward_masked(x), lambda: ep(x.requires_grad_(True))):
            with pytest.raises(NotImplementedError, match="no backward"):
                call()
    with pytest.raises(NotImplementedError, match="no backward"):
        ep.enable_fp8_training()


def case_errors(rank, world, group):
    """Bad arguments raise before any collective (rank-local, so no rank can hang)."""
    from moe_fp8.layers.dispatch.torch_dist import make_dispatcher
    cfg = tiny_cfg()
    disp = _dispatcher(cfg, group)
    x = torch.randn(4, cfg.hidden_size).bfloat16()
    idx, w = random_routing(4, cfg, torch.Generator().manual_seed(0))
    layout, handle = disp.dispatch_contiguous(x, idx, w)  # every rank: a collective
    y_rows = torch.zeros(layout.num_rows, cfg.hidden_size, dtype=torch.bfloat16)
    checks = [
        (ValueError, lambda: disp.dispatch_contiguous(x[:, :128], idx, w)),
        (ValueError, lambda: disp.dispatch_contiguous(x, idx[:, :2], w)),
        (TypeError, lambda: disp.dispatch_contiguous(x, idx.float(), w)),
        (ValueError, lambda: disp.dispatch_masked(x, idx, w, max_tokens_per_expert=0)),
        (TypeError, lambda: disp.dispatch_masked((x, x), idx, w, max_tokens_per_expert=8)),
        (ValueError, lambda: make_dispatcher(cfg, group, backend="mpi")),
        (TypeError, lambda: _dispatcher(cfg, group, combine_dtype=torch.int8)),
        (ValueError, lambda: disp.dispatch_contiguous(x, idx + cfg.num_experts, w)),  # ids >= E (CPU check)
        (ValueError, lambda: disp.combine_contiguous(y_rows, handle, add=x[:3])),
        (ValueError, lambda: disp.combine_contiguous(y_rows[1:], handle)),
    ]
    for error, call in checks:
        with pytest.raises(error):
            call()


CASES = {name[len("case_"):]: fn for name, fn in globals().items() if name.startswith("case_")}


# ============================================================================ the spawned job

def run_cases(cases, rank: int, result_dir: str, group, *args) -> None:
    """Run ``case(rank, world, group, *args)`` for every case; write ``rank{r}.json`` after each.
    A case may return a dict of figures (kept as "info"). After a failing case the process
    exits (code 1): its peers may be blocked in a collective, and the parent terminates them."""
    world = dist.get_world_size(group)
    results = {}
    for name, case in cases.items():
        start = time.perf_counter()
        info = None
        try:
            with torch.no_grad():
                info = case(rank, world, group, *args)
            results[name] = {"error": None}
        except Exception:  # reported by the pytest function of this case
            results[name] = {"error": traceback.format_exc()}
        results[name]["seconds"] = round(time.perf_counter() - start, 2)
        if isinstance(info, dict):
            results[name]["info"] = info
        path = os.path.join(result_dir, f"rank{rank}.json")
        with open(path + ".tmp", "w") as f:  # whole or not at all: the parent may kill this
            json.dump(results, f)             # process while a peer's failure ends the job
        os.replace(path + ".tmp", path)
        if results[name]["error"]:
            os._exit(1)
        dist.barrier(group=group)


def _worker(rank, world, store, result_dir):
    torch.set_num_threads(1)
    init_group("gloo", rank, world, store)
    run_cases(CASES, rank, result_dir, dist.group.WORLD)
    dist.destroy_process_group()


@functools.lru_cache(maxsize=None)
def _job(world: int):
    return run_spawned(_worker, world)


@pytest.mark.parametrize("world", kWorlds)
@pytest.mark.parametrize("case", sorted(CASES))
def test_ep_gloo(case, world):
    check_case(_job(world), case)


def _emulator(lib_path):
    import ctypes
    lib = ctypes.CDLL(lib_path)
    lib.moe_emu_launch.restype = ctypes.c_int
    return lib


def fused_case_receive_vs_torch(rank, world, group, lib_path):
    """The receiver's layout through the layer's index and permute kernels (emulated on the CPU),
    reading the packed received rows in place (16-byte rows), equals the torch path bit for bit."""
    from kernel_checks import emulated_permute_kernels
    cfg = tiny_cfg()
    disp = _dispatcher(cfg, group)
    (xq, xs), idx, w, _ = _oracle_inputs(cfg, per_rank([21, 3, 0, 50], world), rank, seed=16)
    want, _ = disp.dispatch_contiguous((xq, xs), idx, w)
    log = []
    with emulated_permute_kernels(_emulator(lib_path), log):
        got, _ = disp.dispatch_contiguous((xq, xs), idx, w)
    launched = [launch[0] for launch in log]
    if want.num_rows:  # no silent fallback
        assert any("permute_rows_kernel<false>" in name for name in launched), launched
        assert any("contiguous_rank_kernel" in name for name in launched), launched
    assert torch.equal(got.a.view(torch.uint8), want.a.view(torch.uint8))
    assert torch.equal(got.sa, want.sa) and got.sa.stride() == want.sa.stride()
    for name in ("m_indices", "row_token", "row_slot", "tokens_per_expert"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name


def fused_case_oracles(rank, world, group, lib_path):
    """The dispatcher oracles (contiguous and masked: poisoned unwritten rows, -1 ids, T = 0,
    both combine dtypes, static buffers) with every index, permute and combine step of both
    exchanges on the layer's kernels (emulated), as on Hopper."""
    from kernel_checks import emulated_permute_kernels
    lib = _emulator(lib_path)
    for ep_send in (False, True):
        log = []
        with emulated_permute_kernels(lib, log, ep_send=ep_send):
            case_dispatch_contiguous_oracle(rank, world, group)
            case_dispatch_masked_oracle(rank, world, group)
        launched = {launch[0].split("::")[-1] for launch in log}
        assert {"combine_kernel<false>", "combine_kernel<true>", "masked_index_kernel<512>",
                "contiguous_rank_kernel<512>"} <= launched, launched
        has_tokens = per_rank([13, 0, 40, 1], world)[rank] > 0  # case_dispatch_contiguous_oracle's
        assert ("send_order_kernel<256>" in launched) == (ep_send and has_tokens), launched
        assert ("replicate_pack_kernel<256>" in launched) == ep_send, launched  # decode: T = 9


def fused_case_sync_and_op_budget(rank, world, group, lib_path):
    """The CPU proxy as a contract (``OpCounter``), with the layer's kernels emulated so that the
    count is Hopper's: torch ops + kernel launches. Prefill dispatch = ONE host read-back, the
    counts exchange + ONE payload transfer, nothing but the send gather between the read-back
    and the payload; combines and the masked dispatch never read back. Budgets sit just above
    today's counts (prefill dispatch as on Hopper: 52 ops in v2, 35 in v3, 18 with ep_send)."""
    from kernel_checks import emulated_permute_kernels, env_switch
    from moe_fp8.gemm.validate import debug_mode
    from moe_fp8.layers.dispatch.op_counter import OpCounter
    from moe_fp8.layers.layouts import MaskedBuffers
    if debug_mode():  # MOE_FP8_CHECKS=1 reads back on purpose
        return {"skipped": "debug mode"}
    lib = _emulator(lib_path)
    cfg = tiny_cfg()
    disp = _dispatcher(cfg, group)
    figures = {}

    def counted(name, budget, fn, ep_send=False):
        log = []
        with emulated_permute_kernels(lib, log, ep_send=ep_send), OpCounter() as c:
            result = fn()
        ops = c.kernels + len(log)
        assert ops <= budget, (ops, c.ops, [launch[0] for launch in log])
        figures[name] = {**c.summary(), "launches": len(log)}
        return c, result

    counts = per_rank([13, 0, 40, 1], world)
    (xq, xs), idx, w, add = _oracle_inputs(cfg, counts, rank, seed=14, invalid_every=7)
    c, (layout, handle) = counted("prefill_dispatch", 36,
                                  lambda: disp.dispatch_contiguous((xq, xs), idx, w))
    assert (c.syncs, c.collectives, c.pre_xfer_kernels) == (1, 2, 1), c.ops
    # the send side on its kernels (a rank without tokens keeps the torch path: no launch)
    c, _ = counted("prefill_dispatch_ep_send", 20 if counts[rank] else 36, ep_send=True,
                   fn=lambda: disp.dispatch_contiguous((xq, xs), idx, w))
    assert (c.syncs, c.collectives, c.pre_xfer_kernels) == (1, 2, 1), c.ops
    y_rows = fake_experts_contiguous(layout, disp.expert_offset)
    c, _ = counted("prefill_combine", 3, lambda: disp.combine_contiguous(y_rows, handle, add=add))
    assert (c.syncs, c.collectives) == (0, 1), c.ops
    tokens = 6
    (xq, xs), idx, w, add = _oracle_inputs(cfg, [tokens] * world, rank, seed=15)
    m_max = disp.max_tokens_per_expert(tokens)
    buffers = MaskedBuffers.allocate(disp.num_experts_local, m_max, cfg.hidden_size, "cpu")
    num_valid = torch.tensor(tokens - rank % 2)

    def decode_dispatch():  # as the decode runner calls it: static buffers, a device scalar
        return disp.dispatch_masked((xq, xs), idx, w, max_tokens_per_expert=m_max,
                                    num_valid_tokens=num_valid, out=buffers)

    decode_dispatch()  # the runner's warm-up (builds the static source-sum index once)
    # the combine index from the masked index kernel rides on the router switch (off: 4 ops more)
    c, (masked, mhandle) = counted("decode_dispatch", 19, decode_dispatch)
    assert (c.syncs, c.collectives) == (0, 1), c.ops
    with env_switch("MOE_FP8_FUSED_ROUTER", "1"):
        counted("decode_dispatch_router_switch", 15, decode_dispatch)
        counted("decode_dispatch_router_switch_ep_send", 9, decode_dispatch, ep_send=True)
    y_rows = fake_experts_masked(masked, disp.expert_offset)
    c, _ = counted("decode_combine", 2, lambda: disp.combine_masked(y_rows, mhandle, add=add))
    assert (c.syncs, c.collectives) == (0, 1), c.ops
    return figures


def fused_case_send_side_kernels_vs_torch(rank, world, group, lib_path):
    """The prefill's step 1 on the ep_send kernels == its torch ops, through the dispatcher (the
    counts every rank receives, records, send order, source index): -1 ids, T = 0 .. 300."""
    from kernel_checks import emulated_permute_kernels
    lib = _emulator(lib_path)
    cfg = tiny_cfg()
    disp = _dispatcher(cfg, group)
    fmt = disp.row_format
    for seed, counts in enumerate(([13, 0, 40, 1], [300, 257, 1, 256])):
        (xq, xs), idx, w, _ = _oracle_inputs(cfg, per_rank(counts, world), rank, seed=30 + seed, invalid_every=5)
        want = disp._send_side_torch((xq, xs), idx, w)
        log = []
        with emulated_permute_kernels(lib, log, ep_send=True):
            fused, _ = disp._fused_send_inputs((xq, xs), idx, w)
            assert (fused is not None) == (idx.shape[0] > 0)  # T = 0: the torch path, no launch
            got = disp._send_side_fused(*fused) if fused is not None else \
                disp._send_side_torch((xq, xs), idx, w)  # every rank exchanges its counts
        for side in (want, got):
            side[1].wait()
        assert torch.equal(got[0], want[0]), "counts received"
        sends = int(want[0][rank, cfg.num_experts + 1:].sum())
        assert torch.equal(got[4][:sends], want[4][:sends]), "send order"
        assert torch.equal(got[5].slot_row, want[5].slot_row) and torch.equal(got[5].slot_weight,
                                                                               want[5].slot_weight)
        payload = fmt.payload_bytes
        assert torch.equal(got[3][:, :payload], want[3][:, :payload]), "records"
        assert (got[3][:, payload:] == 0).all(), "record padding"
        assert [launch[0].split("::")[-1] for launch in log] == (
            ["route_pack_kernel<256>", "send_order_kernel<256>"] if fused is not None else [])


FUSED_CASES = {name[len("fused_case_"):]: fn for name, fn in globals().items()
               if name.startswith("fused_case_")}


def _worker_fused(rank, world, store, result_dir, lib_path):
    torch.set_num_threads(1)
    init_group("gloo", rank, world, store)
    run_cases(FUSED_CASES, rank, result_dir, dist.group.WORLD, lib_path)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ep_emulator(tmp_path_factory):
    """-> path of the g++ emulation of permute.cuh + ep_send.cuh (tests/kernel_checks.py)."""
    from kernel_checks import build_ep_send_emulator
    return build_ep_send_emulator(tmp_path_factory.mktemp("permute_ep"))


@functools.lru_cache(maxsize=None)
def _fused_job(lib_path: str):
    return run_spawned(_worker_fused, 2, lib_path)


@pytest.fixture(scope="module")
def fused_job(ep_emulator):
    return _fused_job(ep_emulator)


@pytest.mark.parametrize("case", sorted(FUSED_CASES))
def test_ep_through_the_layer_kernels(case, fused_job):
    """EP = 2 (gloo) with the layer's permute/index/combine kernels emulated on the CPU."""
    check_case(fused_job, case)


def check_case(job, case: str) -> None:
    results, job_error = job
    errors = [f"rank {r}:\n{res[case]['error']}" for r, res in enumerate(results)
              if case in res and res[case]["error"]]
    assert not errors, "\n".join(errors)
    missing = [r for r, res in enumerate(results) if case not in res]
    assert not missing, f"case not run on ranks {missing}: the job stopped early ({job_error})"


# ============================================================================ no process group needed

def test_placement_blocks():
    p = ExpertPlacement(num_experts_global=16, ep_size=4, ep_rank=2)
    assert (p.num_experts_local, p.expert_offset, p.local_slice) == (4, 8, slice(8, 12))
    ids = torch.tensor([[0, 7, 8, 11], [12, 15, -1, 16]])
    assert p.expert_rank(ids).tolist() == [[0, 1, 2, 2], [3, 3, 4, 4]]
    assert p.to_local(ids).tolist() == [[4, 4, 0, 3], [4, 4, 4, 4]]
    assert list(p.experts_of(3)) == [12, 13, 14, 15]
    assert p.shard(torch.arange(16)).tolist() == [8, 9, 10, 11]


@pytest.mark.parametrize("kwargs", [dict(num_experts_global=10, ep_size=4, ep_rank=0),
                                    dict(num_experts_global=16, ep_size=4, ep_rank=4),
                                    dict(num_experts_global=16, ep_size=0, ep_rank=0)])
def test_placement_errors(kwargs):
    with pytest.raises(ValueError):
        ExpertPlacement(**kwargs)


def test_meta_roundtrip():
    from moe_fp8.layers.dispatch.torch_dist import RowFormat, encode_meta
    idx = torch.tensor([[3, 1], [0, 2], [5, 4]])
    w = torch.tensor([[0.5, -1.25], [3.0, 1e-8], [2.0, 7.0]])
    fmt = RowFormat(128, 2)
    rows = torch.zeros(3, fmt.nbytes, dtype=torch.uint8)
    fmt.views(rows)[2].copy_(encode_meta(idx, w, num_valid_tokens=torch.tensor(2)))
    meta = fmt.views(rows)[2]
    assert meta[:, :2].tolist() == [[3, 1], [0, 2], [-1, -1]]
    assert torch.equal(meta[:, 2:].contiguous().view(torch.float32), w)


def test_row_format():
    from moe_fp8.layers.dispatch.torch_dist import RowFormat
    fmt = RowFormat(7168, 8)  # DeepSeek-V3: fp8 | 56 scales | 8 ids | 8 weights
    assert fmt.nbytes == 7168 + 224 + 64 and fmt.word_dtype == torch.int64  # 7456 = 16 x 466
    assert RowFormat(384, 8).nbytes == 464  # 384 + 12 + 64 = 460, padded to 16 bytes
    assert RowFormat(256, 6).nbytes == 320  # top-6: 256 + 8 + 48 = 312, padded
    rows = torch.randint(0, 255, (3, fmt.nbytes), dtype=torch.uint8)
    x, s, meta = fmt.views(rows)
    assert x.shape == (3, 7168) and s.shape == (3, 56) and meta.shape == (3, 16)
    padded = RowFormat(384, 8)
    _, _, meta = padded.views(torch.zeros(2, padded.nbytes, dtype=torch.uint8))
    assert meta.shape == (2, 16) and meta.stride(0) == padded.nbytes // 4  # the padding is not metadata
    assert torch.equal(rows.view(fmt.word_dtype).view(torch.uint8), rows)


def test_op_counter():
    """What the proxy counts: compute ops (not views, allocations or Python scalars), read-backs
    (Python-level and the ops that read back inside on CUDA), collectives."""
    from moe_fp8.layers.dispatch.op_counter import OpCounter
    x = torch.arange(6.0)
    with OpCounter() as c:
        y = x.view(2, 3).t() + 1  # one kernel
        torch.empty(4)
        z = torch.where(y > 2, y, 0)  # gt, where (the scalar operand is no kernel)
        z.tolist()
        x[x > 3]  # boolean mask: syncs on CUDA
    assert (c.kernels, c.syncs, c.collectives) == (5, 2, 0), c.ops
    assert c.bytes_written == y.nbytes + y.numel() + z.nbytes + x.numel() + 2 * x.element_size()
