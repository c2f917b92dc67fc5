"""The public ops trace under torch.compile as custom ops (no graph breaks) and match eager."""
import torch

import moe_fp8.gemm as G
from moe_fp8.gemm import layout


def expert_mlp(x, w13, w2, m_indices):
    """GEMM1 -> SiLU-and-mul + quant -> GEMM2 over the contiguous layout."""
    h = G.m_grouped_fp8_gemm_nt_contiguous(G.per_token_group_quant_fp8(x), w13, m_indices)
    return G.m_grouped_fp8_gemm_nt_contiguous(G.silu_and_mul_quant_fp8(h), w2, m_indices)


def test_expert_mlp_compiles_fullgraph():
    gen = torch.Generator().manual_seed(0)
    m_indices = layout.build_m_indices([130, 0, 126])
    x = torch.randn(m_indices.numel(), 256, generator=gen).bfloat16()
    w13 = G.per_block_quant_fp8(torch.randn(3, 512, 256, generator=gen) * 0.1)
    w2 = G.per_block_quant_fp8(torch.randn(3, 256, 256, generator=gen) * 0.1)
    eager = expert_mlp(x, w13, w2, m_indices)
    compiled = torch.compile(expert_mlp, backend="aot_eager", fullgraph=True)(x, w13, w2, m_indices)
    rows = m_indices >= 0
    assert torch.equal(compiled[rows], eager[rows])


def test_custom_ops_registered():
    for name in ("per_token_group_quant", "per_block_quant", "silu_and_mul_quant", "fp8_gemm_nt",
                 "m_grouped_contiguous", "m_grouped_masked", "k_grouped_tn"):
        assert hasattr(torch.ops.moe_fp8, name)
