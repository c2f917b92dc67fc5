"""DeepEP backend without DeepEP: the conversions on tensors shaped as DeepEP returns them, and the
dispatcher driven through ``FakeBuffer`` (the subset of ``deep_ep.Buffer`` it calls, written from
DeepEP's documented semantics) with one thread per rank in this process.

What the fake reproduces (DeepEP's docstrings and tests): normal dispatch returns received tokens
grouped by source rank, ``recv_topk_idx`` as local ids with -1 for other ranks' experts (the
weights there are arbitrary: the fake writes ``kGarbage``), counts per local expert as a host list;
normal combine sums rows back to their source **without weights**; low-latency dispatch returns
``[E_loc, R * T_max, H]`` fp8 + column-major scales + int32 counts, rows beyond the count
arbitrary; low-latency combine reduces **with** the source's ``topk_weights``.
"""
from __future__ import annotations

import threading

import pytest
import torch

from moe_fp8.gemm.layout import is_mn_major
from moe_fp8.layers.dispatch.deepep import (DeepEPDispatcher, contiguous_from_normal,
                                            masked_from_low_latency, normal_combine_input)
from moe_fp8.layers.dispatch.local import LocalDispatcher
from moe_fp8.layers.permute import quantize_tokens
from moe_fp8.layers.placement import ExpertPlacement
from test_ep import (assert_bf16_close, fake_experts_contiguous, fake_experts_masked, oracle,
                     random_routing, shard_rows, tiny_cfg)

kGarbage = 1.0e4  # what the fake leaves where DeepEP's values are unspecified
kThreadTimeoutS = 60


# ============================================================================ the fake Buffer

class FakeFabric:
    """What the R fake buffers of one in-process group share (one thread per rank)."""

    def __init__(self, world: int):
        self.world = world
        self.barrier = threading.Barrier(world, timeout=kThreadTimeoutS)
        self.board = [None] * world

    def all_gather(self, rank: int, value):
        self.board[rank] = value
        self.barrier.wait()
        values = list(self.board)
        self.barrier.wait()  # everyone has read before the next call overwrites the board
        return values


class FakeBuffer:
    def __init__(self, fabric: FakeFabric, rank: int, num_experts: int):
        self.fabric, self.rank, self.group_size = fabric, rank, fabric.world
        self.num_experts, self.experts_local = num_experts, num_experts // fabric.world

    def _local(self, idx):
        local = idx - self.rank * self.experts_local
        return (local >= 0) & (local < self.experts_local) & (idx >= 0), local

    def get_dispatch_layout(self, topk_idx, num_experts):
        rank_of = torch.where(topk_idx >= 0, topk_idx // self.experts_local, self.group_size)
        in_rank = torch.zeros(topk_idx.shape[0], self.group_size + 1, dtype=torch.bool)
        in_rank = in_rank.scatter_(1, rank_of, True)[:, :self.group_size]
        per_expert = torch.bincount(topk_idx[topk_idx >= 0], minlength=num_experts).int()
        return in_rank.sum(0).int(), None, per_expert, in_rank, None

    def dispatch(self, x, *, topk_idx, topk_weights, num_tokens_per_rank, num_tokens_per_rdma_rank,
                 is_token_in_rank, num_tokens_per_expert, **_):
        assert isinstance(x, tuple) and x[1].is_contiguous(), "DeepEP takes row-major scales"
        everyone = self.fabric.all_gather(self.rank, (*x, topk_idx, topk_weights, is_token_in_rank))
        qs, ss, idxs, ws, sources = [], [], [], [], []
        for src, (q, s, idx, w, in_rank) in enumerate(everyone):
            tokens = in_rank[:, self.rank].nonzero().flatten()
            mine, local = self._local(idx[tokens])
            qs.append(q[tokens]), ss.append(s[tokens]), sources.append((src, tokens))
            idxs.append(torch.where(mine, local, -1))
            ws.append(torch.where(mine, w[tokens], kGarbage))
        recv_idx = torch.cat(idxs)
        counts = [int((recv_idx == e).sum()) for e in range(self.experts_local)]
        handle = (sources, x[0].shape[0])
        return (torch.cat(qs), torch.cat(ss)), recv_idx, torch.cat(ws), counts, handle, None

    def combine(self, x, handle, topk_weights=None, **_):
        assert x.dtype == torch.bfloat16
        everyone = self.fabric.all_gather(self.rank, (x, handle[0]))
        out = torch.zeros(handle[1], x.shape[1])
        for x_dest, sources in everyone:  # unweighted: DeepEP's normal combine is a plain sum
            start = 0
            for src, tokens in sources:
                if src == self.rank:
                    out.index_add_(0, tokens, x_dest[start:start + len(tokens)].float())
                start += len(tokens)
        return out.bfloat16(), None, None

    def low_latency_dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
                             use_fp8=True, async_finish=False, return_recv_hook=False, **_):
        assert use_fp8 and x.dtype == torch.bfloat16 and x.shape[0] <= num_max_dispatch_tokens_per_rank
        xq, xs = quantize_tokens(x)  # DeepEP casts with its own kernel; ours stands in
        everyone = self.fabric.all_gather(self.rank, (xq, xs, topk_idx))
        m_max, hidden = self.group_size * num_max_dispatch_tokens_per_rank, x.shape[1]
        gen = torch.Generator().manual_seed(self.rank)
        packed_x = (torch.randn(self.experts_local, m_max, hidden, generator=gen) * 50).to(torch.float8_e4m3fn)
        packed_s = torch.rand(self.experts_local, hidden // 128, m_max, generator=gen).transpose(1, 2)
        count = torch.zeros(self.experts_local, dtype=torch.int32)
        src_info = torch.full((self.experts_local, m_max), -7, dtype=torch.int32)
        rows = {}  # (local expert, source rank, token) -> row
        for src, (q, s, idx) in enumerate(everyone):
            for t in range(idx.shape[0]):
                for g in idx[t].tolist():
                    mine, e = self._local(torch.tensor(g))
                    if mine:
                        e, row = int(e), int(count[int(e)])
                        packed_x[e, row], packed_s[e, row], src_info[e, row] = q[t], s[t], t
                        rows[(e, src, t)] = row
                        count[e] += 1
        handle = (src_info, rows, num_max_dispatch_tokens_per_rank, hidden, num_experts)
        return (packed_x, packed_s), count, handle, None, None

    def low_latency_combine(self, x, topk_idx, topk_weights, handle, **_):
        assert x.dtype == torch.bfloat16 and x.is_contiguous()
        everyone = self.fabric.all_gather(self.rank, (x, handle[1]))
        out = torch.zeros(topk_idx.shape[0], x.shape[2])
        for t in range(topk_idx.shape[0]):  # weighted: DeepEP's low-latency combine
            for j, g in enumerate(topk_idx[t].tolist()):
                if g >= 0:
                    x_dest, rows = everyone[g // self.experts_local]
                    e = g % self.experts_local
                    out[t] += topk_weights[t, j] * x_dest[e, rows[(e, self.rank, t)]].float()
        return out.bfloat16(), None, None


def run_threads(world: int, fn):
    """``fn(rank, fake_buffer)`` on ``world`` threads sharing one fabric; re-raise the first error."""
    cfg = tiny_cfg()
    fabric = FakeFabric(world)
    results, errors = [None] * world, []

    def body(rank):
        try:
            with torch.no_grad():
                results[rank] = fn(rank, FakeBuffer(fabric, rank, cfg.num_experts))
        except BaseException as error:  # noqa: BLE001 (reported below)
            errors.append(error)
            fabric.barrier.abort()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(kThreadTimeoutS)
    assert not any(t.is_alive() for t in threads), "fake DeepEP ranks hung"
    if errors:
        raise errors[0]
    return results


def shared_inputs(cfg, counts, seed, invalid_every=0):
    gen = torch.Generator().manual_seed(seed)
    total = sum(counts)
    x_all = torch.randn(total, cfg.hidden_size, generator=gen).bfloat16()
    idx_all, w_all = random_routing(total, cfg, gen, invalid_every=invalid_every)
    add_all = torch.randn(total, cfg.hidden_size, generator=gen).bfloat16()
    return x_all, idx_all, w_all, add_all


# ============================================================================ conversions alone

@pytest.mark.parametrize("world", [2, 4])
def test_normal_layout_matches_local(world):
    """contiguous_from_normal == the local dispatcher's layout over every rank's tokens."""
    cfg = tiny_cfg()
    counts = [19, 0, 33, 2][:world]
    x_all, idx_all, w_all, _ = shared_inputs(cfg, counts, seed=1, invalid_every=6)
    xq_all, xs_all = quantize_tokens(x_all)

    def rank_fn(rank, buffer):
        sl = slice(sum(counts[:rank]), sum(counts[:rank + 1]))
        layout_args = buffer.get_dispatch_layout(idx_all[sl], cfg.num_experts)
        recv_x, recv_idx, recv_w, per_expert, _, _ = buffer.dispatch(
            (xq_all[sl], xs_all[sl].contiguous()), topk_idx=idx_all[sl], topk_weights=w_all[sl],
            num_tokens_per_rank=layout_args[0], num_tokens_per_rdma_rank=None,
            is_token_in_rank=layout_args[3], num_tokens_per_expert=layout_args[2])
        aligned = [-(-c // 128) * 128 for c in per_expert]  # as with expert_alignment=128
        return contiguous_from_normal(recv_x, recv_idx, recv_w, per_expert), \
            contiguous_from_normal(recv_x, recv_idx, recv_w, aligned)[0].num_rows

    for rank, ((layout, combine), aligned_rows) in enumerate(run_threads(world, rank_fn)):
        placement = ExpertPlacement(cfg.num_experts, world, rank)
        local = LocalDispatcher(cfg.num_experts, cfg.hidden_size, cfg.top_k,
                                num_experts_local=placement.num_experts_local,
                                expert_offset=placement.expert_offset)
        ref, _ = local.dispatch_contiguous((xq_all, xs_all), idx_all, w_all)
        assert layout.num_rows == ref.num_rows == aligned_rows
        assert torch.equal(layout.m_indices, ref.m_indices)
        real = ref.m_indices >= 0
        assert torch.equal(layout.a.view(torch.uint8)[real], ref.a.view(torch.uint8)[real])
        assert torch.equal(layout.sa[real], ref.sa[real])
        assert (combine.slot_weight.abs() < kGarbage).all(), "weights of other ranks' experts leaked"


@pytest.mark.parametrize("m_max", [16, 18])
def test_masked_from_low_latency(m_max):
    """DeepEP's column-major scales are our MN-major layout (no copy) when M_max % 4 == 0."""
    experts, hidden = 3, 256
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(experts, m_max, hidden, generator=gen).to(torch.float8_e4m3fn)
    sa = torch.rand(experts, hidden // 128, m_max, generator=gen).transpose(1, 2)  # DeepEP's layout
    count = torch.tensor([0, 5, m_max], dtype=torch.int32)
    src_info = torch.arange(experts * m_max, dtype=torch.int32).view(experts, m_max)
    layout = masked_from_low_latency((a, sa), count, expected_m=4, packed_recv_src_info=src_info)
    assert layout.a is a and torch.equal(layout.sa, sa) and is_mn_major(layout.sa)
    assert (layout.sa.data_ptr() == sa.data_ptr()) == (m_max % 4 == 0)
    assert layout.masked_m.dtype == torch.int32 and layout.masked_m.tolist() == [0, 5, m_max]
    assert layout.row_token[1, :5].tolist() == src_info[1, :5].tolist()
    assert (layout.row_token[1, 5:] == -1).all() and (layout.row_token[0] == -1).all()
    assert int(layout.num_overflow) == 0


def test_normal_combine_input_applies_weights():
    """DeepEP's normal combine adds without weights: the received rows must carry them already."""
    cfg = tiny_cfg()
    gen = torch.Generator().manual_seed(3)
    xq, xs = quantize_tokens(torch.randn(6, cfg.hidden_size, generator=gen).bfloat16())
    recv_idx = torch.tensor([[0, -1, 2, -1], [1, 3, -1, -1], [-1, -1, -1, 0],
                             [2, 1, 0, 3], [-1, 2, -1, -1], [3, -1, 1, -1]])
    recv_w = torch.where(recv_idx >= 0, torch.rand(6, 4, generator=gen), kGarbage)
    counts = [int((recv_idx == e).sum()) for e in range(4)]
    layout, combine = contiguous_from_normal((xq, xs), recv_idx, recv_w, counts)
    partial = normal_combine_input(fake_experts_contiguous(layout, 0), combine)
    expected = oracle(xq, xs, torch.where(recv_idx >= 0, recv_idx, -1), torch.where(recv_idx >= 0, recv_w, 0.0))
    assert partial.dtype == torch.bfloat16
    assert_bf16_close(partial, expected, "weighted local reduce", 1.0)


# ============================================================================ the dispatcher on fakes

@pytest.mark.parametrize("world", [2, 4])
def test_dispatcher_contiguous_oracle(world):
    cfg = tiny_cfg()
    counts = [11, 1, 0, 27][:world]
    x_all, idx_all, w_all, add_all = shared_inputs(cfg, counts, seed=4, invalid_every=9)

    def rank_fn(rank, buffer):
        disp = DeepEPDispatcher(cfg, buffer=buffer, low_latency_buffer=buffer, max_tokens_per_rank=8)
        x, idx, w, add = (shard_rows(t, counts, rank) for t in (x_all, idx_all, w_all, add_all))
        layout, handle = disp.dispatch_contiguous(x, idx, w)
        y = disp.combine_contiguous(fake_experts_contiguous(layout, disp.expert_offset), handle, add=add)
        return y, quantize_tokens(x), idx, w, add

    for y, (xq, xs), idx, w, add in run_threads(world, rank_fn):
        assert_bf16_close(y, oracle(xq, xs, idx, w, add), "deepep normal", 4.0)


@pytest.mark.parametrize("world", [2, 4])
def test_dispatcher_masked_oracle(world):
    cfg = tiny_cfg()
    tokens, valid = 8, [8, 3, 0, 6][:world]
    x_all, idx_all, w_all, add_all = shared_inputs(cfg, [tokens] * world, seed=5)

    def rank_fn(rank, buffer):
        disp = DeepEPDispatcher(cfg, buffer=buffer, low_latency_buffer=buffer, max_tokens_per_rank=tokens)
        x, idx, w, add = (shard_rows(t, [tokens] * world, rank) for t in (x_all, idx_all, w_all, add_all))
        m_max = disp.max_tokens_per_expert(tokens)
        assert m_max == world * tokens
        layout, handle = disp.dispatch_masked(x, idx, w, max_tokens_per_expert=m_max,
                                              num_valid_tokens=torch.tensor(valid[rank]))
        out = torch.empty(tokens, cfg.hidden_size, dtype=torch.bfloat16)
        y = disp.combine_masked(fake_experts_masked(layout, disp.expert_offset), handle, add=add, out=out)
        assert y.data_ptr() == out.data_ptr()
        return y, quantize_tokens(x), idx, w, add, valid[rank]

    for y, (xq, xs), idx, w, add, live in run_threads(world, rank_fn):
        assert_bf16_close(y[:live], oracle(xq, xs, idx, w, add)[:live], "deepep low-latency", 4.0)
        assert_bf16_close(y[live:], add[live:], "deepep low-latency, invalid tokens", 0.0)


@pytest.mark.parametrize("world", [2])
def test_dispatcher_in_layer(world):
    """The MoE layer on the DeepEP dispatcher (fakes) == the single-process layer."""
    from moe_fp8.gemm import calc_diff
    from moe_fp8.layers import MoE
    cfg = tiny_cfg()
    ref = MoE(cfg, seed=0)
    counts, decode_counts = [23, 5], [8, 2]
    gen = torch.Generator().manual_seed(6)
    x_all = torch.randn(sum(counts), cfg.hidden_size, generator=gen).bfloat16()
    xd_all = torch.randn(sum(decode_counts), cfg.hidden_size, generator=gen).bfloat16()
    with torch.no_grad():
        y_ref, yd_ref = ref(x_all), ref(xd_all)

    def rank_fn(rank, buffer):
        disp = DeepEPDispatcher(cfg, buffer=buffer, low_latency_buffer=buffer, max_tokens_per_rank=8)
        ep = MoE(cfg, dispatcher=disp, seed=None)
        local = disp.placement.local_slice
        ep.gate.load_state_dict(ref.gate.state_dict())
        ep.shared_experts.load_state_dict(ref.shared_experts.state_dict())
        ep.experts.load_fp8(ref.experts.w13[local], ref.experts.w13_scale[local],
                            ref.experts.w2[local], ref.experts.w2_scale[local])
        return ep(shard_rows(x_all, counts, rank)), ep.decode_runner(8)(shard_rows(xd_all, decode_counts, rank))

    for rank, (y, yd) in enumerate(run_threads(world, rank_fn)):
        assert_bf16_close(y, shard_rows(y_ref, counts, rank), "deepep layer prefill")
        # decode: DeepEP re-quantises bf16 tokens itself: within FP8 tolerance, not bf16 ulps
        assert calc_diff(yd, shard_rows(yd_ref, decode_counts, rank)) < 1e-4


def test_dispatcher_errors():
    cfg = tiny_cfg()
    fabric = FakeFabric(1)
    disp = DeepEPDispatcher(cfg, buffer=FakeBuffer(fabric, 0, cfg.num_experts), max_tokens_per_rank=4)
    x = torch.randn(6, cfg.hidden_size).bfloat16()
    idx, w = random_routing(6, cfg, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="max_tokens_per_rank"):
        disp.max_tokens_per_expert(6)
    with pytest.raises(ValueError, match="max_tokens_per_expert"):
        disp.dispatch_masked(x[:4], idx[:4], w[:4], max_tokens_per_expert=5)
    with pytest.raises(ValueError, match="topk_idx"):
        disp.dispatch_contiguous(x, idx[:, :2], w)
    with pytest.raises(ValueError, match="max_tokens_per_rank"):
        DeepEPDispatcher(cfg, buffer=FakeBuffer(fabric, 0, cfg.num_experts), max_tokens_per_rank=0)
