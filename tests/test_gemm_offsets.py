"""The contiguous grouped GEMM's offsets form on the CPU (references): it equals the m_indices
form on every real row, writes every row of each segment and nothing past offsets[E], and rejects
bad offsets with a ValueError/TypeError naming the argument. The kernel is tested against the
same reference in tests/test_gemm_gpu.py."""
from __future__ import annotations

import pytest
import torch

import moe_fp8.gemm as G
from moe_fp8.gemm.layout import build_m_indices, segment_offsets


def _operands(counts, n=384, k=256, extra_rows=128, seed=0):
    gen = torch.Generator().manual_seed(seed)
    offsets = segment_offsets(counts)
    m_sum = int(offsets[-1]) + extra_rows
    x = torch.randn(m_sum, k, generator=gen)
    w = torch.randn(len(counts), n, k, generator=gen)
    return offsets, G.per_token_group_quant_fp8(x), G.per_block_quant_fp8(w), m_sum


@pytest.mark.parametrize("counts", [[130, 0, 5], [0, 0, 1], [256, 128], [1]], ids=str)
def test_offsets_form_matches_m_indices_form(counts):
    offsets, a, b, m_sum = _operands(counts)
    out = torch.full((m_sum, b[0].shape[1]), float("nan"), dtype=torch.bfloat16)
    G.m_grouped_fp8_gemm_nt_contiguous_offsets(a, b, offsets, out=out)
    m_indices = build_m_indices(counts)
    want = G.m_grouped_fp8_gemm_nt_contiguous(a, b, torch.cat(
        [m_indices, torch.full((m_sum - m_indices.shape[0],), -1, dtype=torch.int32)]))
    end = int(offsets[-1])
    real = m_indices >= 0
    assert torch.equal(out[:end][real], want[:end][real])
    assert not torch.isnan(out[:end]).any(), "every row of a segment is written"
    assert torch.isnan(out[end:]).all(), "rows past offsets[E] are not written"


@pytest.mark.parametrize("offsets,error,match", [
    ([0, 100, 256, 256], ValueError, "multiples of 128"),
    ([0, 256, 128, 256], ValueError, "non-decreasing"),
    ([128, 256, 256, 384], ValueError, "start at 0"),
    ([0, 128, 256, 4096], ValueError, "M_sum"),
    ([0, 128, 256], ValueError, "offsets must have shape"),
], ids=["unaligned", "decreasing", "not-from-0", "past-M_sum", "wrong-length"])
def test_offsets_form_rejects_bad_offsets(offsets, error, match):
    _, a, b, _ = _operands([130, 0, 5])
    with pytest.raises(error, match=match):
        G.m_grouped_fp8_gemm_nt_contiguous_offsets(a, b, torch.tensor(offsets, dtype=torch.int32))


def test_offsets_form_rejects_int64():
    offsets, a, b, _ = _operands([130, 0, 5])
    with pytest.raises(TypeError, match="offsets"):
        G.m_grouped_fp8_gemm_nt_contiguous_offsets(a, b, offsets.long())
