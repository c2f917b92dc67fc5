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
                 "m_grouped_contiguous", "m_grouped_contiguous_offsets", "m_grouped_masked",
                 "k_grouped_tn", "per_block_quant_transpose", "transpose_token_group_quant",
                 "transpose_token_group_requant", "silu_and_mul_backward_quant"):
        assert hasattr(torch.ops.moe_fp8, name)


def training_quant_chain(w, x, d_act, h, m_indices):
    """The training path's quantisation ops and the offsets-form GEMM, as one traced function."""
    (wq, ws), (wtq, wts) = G.per_block_quant_transpose_fp8(w)
    xt = G.transpose_token_group_quant_fp8(x, m_indices=m_indices)
    xr = G.transpose_token_group_requant_fp8(G.per_token_group_quant_fp8(x), m_indices=m_indices)
    dh, dh_t, act_t = G.silu_and_mul_backward_quant_fp8(d_act, h)
    offsets = torch.tensor([0, 128, 256], dtype=torch.int32)
    y = G.m_grouped_fp8_gemm_nt_contiguous_offsets(G.per_token_group_quant_fp8(x), (wq, ws), offsets)
    return wq, ws, wtq, wts, *xt, *xr, *dh, *dh_t, *act_t, y


def test_training_ops_compile_fullgraph():
    gen = torch.Generator().manual_seed(1)
    m_indices = layout.build_m_indices([100, 128])  # 256 rows, 28 padding
    x = torch.randn(256, 256, generator=gen).bfloat16()
    w = torch.randn(2, 384, 256, generator=gen) * 0.1
    d_act = torch.randn(200, 128, generator=gen).bfloat16()
    h = torch.randn(200, 256, generator=gen).bfloat16()
    eager = training_quant_chain(w, x, d_act, h, m_indices)
    compiled = torch.compile(training_quant_chain, backend="aot_eager", fullgraph=True)(
        w, x, d_act, h, m_indices)
    assert len(eager) == len(compiled) == 15
    for i, (a, b) in enumerate(zip(eager, compiled)):
        assert a.shape == b.shape and a.dtype == b.dtype, i
        same = torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.dtype == torch.float8_e4m3fn \
            else torch.equal(a, b)
        assert same, f"output {i} differs under torch.compile"
