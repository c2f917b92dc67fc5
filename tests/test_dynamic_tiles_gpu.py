"""GPU tests of dynamic tiles (include/tile_claim.cuh): the contiguous GEMMs with a tile counter.

A dynamic launch computes the tiles of the fixed-stride launch, only in another order across the
persistent CTAs, so every test asks for the same bits as the static kernel (whose accuracy
test_gemm_gpu.py checks against the unquantised product), poison where nothing may be written,
and the counter back at zero after every launch. The cases are the ones that stress the claim:
few SMs (every cluster claims many tiles), B-multicast pairs (rank 0 hands each index to rank 1),
padding pairs that are skipped, a CUDA graph replayed with new layouts, and a kernel holding
most SMs on another stream while the dynamic one starts.
"""
from __future__ import annotations

import pytest
import torch

import moe_fp8.gemm as G
from moe_fp8.gemm.heuristics import GemmConfig
from moe_fp8.gemm.kernels import fp8_gemm as K
from moe_fp8.gemm.layout import build_m_indices, empty_act_scales, segment_offsets

from test_gemm_gpu import _check, _cuda_gen, _nan_equal, _poisoned, _quant_act, _quant_weight, \
    _rows, _weights

pytestmark = pytest.mark.gpu

FP8 = torch.float8_e4m3fn
kConfigs = [None, GemmConfig(128, 256, cluster_m=2, num_sms=4), GemmConfig(128, 128, num_sms=3),
            GemmConfig(128, 128, cluster_m=2, num_sms=6), GemmConfig(64, 112),
            GemmConfig(128, 144, cluster_m=2, group_n=2)]
kCases = [([0, 130, 5, 0, 257, 64], 0), ([0, 130, 5, 0, 257, 64], 384), ([1], 0),
          ([300, 0, 0, 1, 250], 256), ([128] * 3, 128)]


def _config_id(c) -> str:
    return "auto" if c is None else f"{c.block_m}x{c.block_n}c{c.cluster_m}p{c.num_sms}"


def _layout(counts, trailing):
    m_indices = build_m_indices(counts, device="cuda")
    return torch.cat([m_indices, torch.full((trailing,), -1, dtype=torch.int32, device="cuda")])


@pytest.mark.parametrize("config", kConfigs, ids=_config_id)
def test_contiguous_dynamic_matches_static(config):
    """All three contiguous forms (padding skipped, zeroed; offsets), several layouts, three
    dynamic launches in a row on one counter: the static kernel's bits, padding rows untouched
    (or zero), the counter zero after each launch."""
    n, k = 1024 + 128, 1536
    counter = G.new_tile_counter("cuda")
    for counts, trailing in kCases:
        gen = _cuda_gen(sum(counts) + trailing)
        m_indices = _layout(counts, trailing)
        offsets = segment_offsets(counts).cuda()
        m_sum = m_indices.shape[0]
        x, w = _rows((m_sum, k), gen), _weights((len(counts), n, k), gen)
        (qa, sa), (qb, sb) = _quant_act(x), _quant_weight(w)
        what = f"{_config_id(config)} counts={counts} trailing={trailing}"
        for form in ("skip", "zero", "offsets"):
            outs = [_poisoned((m_sum, n)) for _ in range(4)]
            for i, out in enumerate(outs):
                tiles = counter if i > 0 else None
                if form == "offsets":
                    K.m_grouped_contiguous_offsets(qa, sa, qb, sb, offsets, out, config,
                                                   tile_counter=tiles)
                else:
                    K.m_grouped_contiguous(qa, sa, qb, sb, m_indices, out, config,
                                           zero_padding=form == "zero", tile_counter=tiles)
                torch.cuda.synchronize()
                assert counter.tolist()[:2] == [0, 0], f"{what} {form}: counter left {counter}"
            for i in (1, 2, 3):
                assert _nan_equal(outs[i], outs[0]), f"{what} {form}: launch {i} differs"
            valid = m_indices >= 0
            if form == "skip":
                assert torch.isnan(outs[1][~valid]).all(), f"{what}: padding rows were written"
            if form == "zero":
                assert (outs[1][~valid] == 0).all(), f"{what}: padding rows not zero"
        reference = G.m_grouped_fp8_gemm_nt_contiguous((qa, sa), (qb, sb), m_indices,
                                                       backend="reference")
        exact = torch.zeros(m_sum, n, device="cuda")
        for e in range(len(counts)):
            rows = m_indices == e
            exact[rows] = x[rows].float() @ w[e].float().t()
        got = _poisoned((m_sum, n))
        G.m_grouped_fp8_gemm_nt_contiguous((qa, sa), (qb, sb), m_indices, out=got,
                                           backend="kernel", config=config, tile_counter=counter)
        _check(got[valid], exact[valid], reference[valid], what)


def _swiglu(a, b, m_indices, config, counter):
    rows, inter = a[0].shape[0], b[0].shape[1] // 2
    q = torch.full((rows, inter), 0x7F, dtype=torch.uint8, device="cuda").view(FP8)  # NaN bytes
    s = empty_act_scales(rows, inter // 128, device="cuda")
    s.fill_(float("nan"))
    K.m_grouped_contiguous_swiglu(a[0], a[1], b[0], b[1], m_indices, q, s, config=config,
                                  tile_counter=counter)
    return q, s


@pytest.mark.parametrize("config", [None, GemmConfig(128, 256, cluster_m=2, num_sms=4),
                                    GemmConfig(128, 256, num_sms=3)], ids=_config_id)
def test_contiguous_swiglu_dynamic_matches_static(config):
    """The fused SwiGLU gate-up GEMM on the contiguous layout: act bytes and scales of the static
    kernel, padding rows untouched, the counter zero after each launch."""
    inter, k = 512, 1024
    counter = G.new_tile_counter("cuda")
    for counts, trailing in kCases:
        gen = _cuda_gen(7 + sum(counts) + trailing)
        m_indices = _layout(counts, trailing)
        m_sum = m_indices.shape[0]
        x, w = _rows((m_sum, k), gen), _weights((len(counts), 2 * inter, k), gen)
        a, b = _quant_act(x), _quant_weight(w)
        q0, s0 = _swiglu(a, b, m_indices, config, None)
        for _ in range(2):
            q1, s1 = _swiglu(a, b, m_indices, config, counter)
            torch.cuda.synchronize()
            assert counter.tolist()[:2] == [0, 0]
            assert torch.equal(q1.view(torch.uint8), q0.view(torch.uint8)), (counts, trailing)
            assert torch.equal(s1.view(torch.int32), s0.view(torch.int32)), (counts, trailing)
        padding = m_indices < 0
        assert (q1.view(torch.uint8)[padding] == 0x7F).all(), "padding rows of act written"


def test_dynamic_in_a_cuda_graph():
    """Captured once, replayed with three different layouts of the same row count: each replay
    gives the static kernel's bits and leaves the counter at zero (the reset is in the kernel)."""
    n, k, experts, rows = 1024, 1024, 6, 1024
    gen = _cuda_gen(5)
    x, w = _rows((rows, k), gen), _weights((experts, n, k), gen)
    (qa, sa), (qb, sb) = _quant_act(x), _quant_weight(w)
    counter = G.new_tile_counter("cuda")
    layouts = [[128, 0, 300, 1, 200, 5], [0, 0, 0, 0, 0, 700], [100] * 6]
    m_indices = torch.empty(rows, dtype=torch.int32, device="cuda")
    out = _poisoned((rows, n))

    def fill(counts):
        ids = build_m_indices(counts, device="cuda")
        m_indices.fill_(-1)
        m_indices[: ids.shape[0]] = ids

    fill(layouts[0])
    K.m_grouped_contiguous(qa, sa, qb, sb, m_indices, out, None, tile_counter=counter)  # load
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        K.m_grouped_contiguous(qa, sa, qb, sb, m_indices, out, None, tile_counter=counter)
    for counts in layouts:
        fill(counts)
        out.fill_(float("nan"))
        graph.replay()
        want = _poisoned((rows, n))
        K.m_grouped_contiguous(qa, sa, qb, sb, m_indices, want, None)
        torch.cuda.synchronize()
        assert _nan_equal(out, want), f"replay with {counts}"
        assert counter.tolist()[:2] == [0, 0]


def test_dynamic_beside_a_kernel_holding_the_sms():
    """A long dense GEMM on another stream holds most SMs when the dynamic grouped GEMM starts
    (its late CTAs claim fewer tiles): the same bits as the static kernel, counter zero."""
    n, k = 2048, 2048
    counts = [700, 0, 513, 129, 1000, 64, 300, 2]
    m_indices = _layout(counts, 256)
    m_sum = m_indices.shape[0]
    gen = _cuda_gen(9)
    x, w = _rows((m_sum, k), gen), _weights((len(counts), n, k), gen)
    (qa, sa), (qb, sb) = _quant_act(x), _quant_weight(w)
    big_a = _quant_act(_rows((8192, 4096), gen))
    big_b = _quant_weight(_weights((8192, 4096), gen))
    big_out = torch.empty(8192, 8192, dtype=torch.bfloat16, device="cuda")
    want = _poisoned((m_sum, n))
    K.m_grouped_contiguous(qa, sa, qb, sb, m_indices, want, None)
    counter = G.new_tile_counter("cuda")
    side = torch.cuda.Stream()
    for _ in range(3):
        got = _poisoned((m_sum, n))
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            G.fp8_gemm_nt(big_a, big_b, out=big_out, backend="kernel")
        K.m_grouped_contiguous(qa, sa, qb, sb, m_indices, got, None, tile_counter=counter)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        assert _nan_equal(got, want)
        assert counter.tolist()[:2] == [0, 0]


def test_layer_dynamic_tiles_keep_bits(monkeypatch):
    """MOE_FP8_DYNAMIC_TILES=1: the layer's prefill output keeps its bits (fused SwiGLU and the
    down GEMM on the layer's counter; the unfused gate-up GEMM too)."""
    from moe_fp8.layers import MoE, MoEConfig
    moe = MoE(MoEConfig.deepseek_v3(num_experts=16, hidden_size=1024, moe_intermediate_size=512),
              device="cuda", seed=3)
    x = torch.randn(1500, 1024, device="cuda", generator=_cuda_gen(1)).bfloat16()
    with torch.no_grad():
        for swiglu in ("1", "0"):
            monkeypatch.setenv("MOE_FP8_PREFILL_SWIGLU", swiglu)
            monkeypatch.setenv("MOE_FP8_DYNAMIC_TILES", "0")
            expected = moe(x)
            monkeypatch.setenv("MOE_FP8_DYNAMIC_TILES", "1")
            got = moe(x)
            torch.cuda.synchronize()
            assert torch.equal(got, expected), f"prefill swiglu={swiglu}"
            assert moe.experts.tile_counter.tolist() == [0, 0]
