"""The error catalogue: every bad input raises ValueError/TypeError naming the argument (CPU)."""
import pytest
import torch

import moe_fp8.gemm as G
from moe_fp8.gemm import layout

FP8 = torch.float8_e4m3fn


def act(m, k, batch=None):
    """Quantised random activations [m, k] (or [batch, m, k]); k a multiple of 128."""
    shape = (m, k) if batch is None else (batch, m, k)
    return G.per_token_group_quant_fp8(torch.randn(shape))


def wgt(n, k, experts=None):
    shape = (n, k) if experts is None else (experts, n, k)
    return G.per_block_quant_fp8(torch.randn(shape) * 0.1)


A, B = act(4, 256), wgt(32, 256)
A_CONT, B_GROUP = act(256, 256), wgt(32, 256, experts=3)
M_IDX = layout.build_m_indices([100, 0, 28])
A_MASKED, MASKED_M = act(8, 256, batch=3), torch.tensor([1, 0, 8], dtype=torch.int32)
WG_A, WG_B = act(32, 256), act(48, 256)  # dY^T [N, T], X^T [K, T]
OFFSETS = torch.tensor([0, 128, 256], dtype=torch.int32)
WG_OUT = torch.zeros(2, 32, 48)

CASES = [
    # (id, callable, error type, text the message must contain)
    ("quant-x-not-tensor", lambda: G.per_token_group_quant_fp8([1.0]), TypeError, "x must be a torch.Tensor"),
    ("quant-x-int", lambda: G.per_token_group_quant_fp8(torch.ones(2, 128, dtype=torch.int32)), TypeError, "x must have dtype"),
    ("quant-x-1d", lambda: G.per_token_group_quant_fp8(torch.randn(128)), ValueError, "x must be 2-D or 3-D"),
    ("quant-k-misaligned", lambda: G.per_token_group_quant_fp8(torch.randn(2, 100)), ValueError, "x.shape[-1] must be a multiple of 128"),
    ("quant-group-size", lambda: G.per_token_group_quant_fp8(torch.randn(2, 128), 64), ValueError, "group_size must be 128"),
    ("quant-noncontiguous", lambda: G.per_token_group_quant_fp8(torch.randn(256, 4).t()), ValueError, "x must be contiguous"),
    ("quant-out-shape", lambda: G.per_token_group_quant_fp8(torch.randn(2, 128), out=act(3, 128)), ValueError, "out[0] must have shape"),
    ("quant-out-scale-layout", lambda: G.per_token_group_quant_fp8(torch.randn(8, 256), out=(torch.empty(8, 256, dtype=FP8), torch.empty(8, 2))), ValueError, "out[1] must be MN-major"),
    ("quant-out-dtype", lambda: G.per_token_group_quant_fp8(torch.randn(2, 128), out=(torch.empty(2, 128), layout.empty_act_scales(2, 1))), TypeError, "out[0] must have dtype"),
    ("block-quant-1d", lambda: G.per_block_quant_fp8(torch.randn(128)), ValueError, "w must be 2-D or 3-D"),
    ("block-quant-k", lambda: G.per_block_quant_fp8(torch.randn(128, 96)), ValueError, "w.shape[-1] must be a multiple of 128"),
    ("block-quant-fp8-input", lambda: G.per_block_quant_fp8(torch.randn(128, 128).to(FP8)), TypeError, "w must have dtype"),
    ("silu-odd-width", lambda: G.silu_and_mul_quant_fp8(torch.randn(2, 384)), ValueError, "h.shape[-1] must be a multiple of 256"),
    ("silu-masked-2d", lambda: G.silu_and_mul_quant_fp8(torch.randn(2, 256), masked_m=torch.tensor([1], dtype=torch.int32)), ValueError, "masked_m needs h of shape"),
    ("silu-masked-dtype", lambda: G.silu_and_mul_quant_fp8(torch.randn(2, 3, 256), masked_m=torch.tensor([1, 1])), TypeError, "masked_m must have dtype torch.int32"),
    ("silu-masked-len", lambda: G.silu_and_mul_quant_fp8(torch.randn(2, 3, 256), masked_m=torch.tensor([1], dtype=torch.int32)), ValueError, "masked_m must have shape (2,)"),
    ("silu-masked-range", lambda: G.silu_and_mul_quant_fp8(torch.randn(2, 3, 256), masked_m=torch.tensor([4, 0], dtype=torch.int32)), ValueError, "masked_m must lie in [0, M_max=3]"),
    ("silu-expected-m-zero", lambda: G.silu_and_mul_quant_fp8(torch.randn(2, 3, 256), masked_m=torch.tensor([1, 0], dtype=torch.int32), expected_m=0), ValueError, "expected_m must be a positive host int"),
    ("silu-expected-m-tensor", lambda: G.silu_and_mul_quant_fp8(torch.randn(2, 3, 256), masked_m=torch.tensor([1, 0], dtype=torch.int32), expected_m=torch.tensor(2)), ValueError, "expected_m must be a positive host int"),
    ("gemm-a-not-pair", lambda: G.fp8_gemm_nt(A[0], B), TypeError, "a must be a pair"),
    ("gemm-a-bf16", lambda: G.fp8_gemm_nt((A[0].bfloat16(), A[1]), B), TypeError, "a[0] must have dtype torch.float8_e4m3fn"),
    ("gemm-scale-dtype", lambda: G.fp8_gemm_nt((A[0], A[1].half()), B), TypeError, "a[1] must have dtype torch.float32"),
    ("gemm-k-mismatch", lambda: G.fp8_gemm_nt(A, wgt(32, 128)), ValueError, "b[0].shape[-1] must equal K"),
    ("gemm-k-misaligned", lambda: G.fp8_gemm_nt((torch.zeros(4, 96, dtype=FP8), torch.ones(4, 1)), B), ValueError, "K (a[0].shape[-1]) must be a multiple of 128"),
    ("gemm-n-misaligned", lambda: G.fp8_gemm_nt(A, (torch.zeros(24, 256, dtype=FP8), torch.ones(1, 2))), ValueError, "N (b[0].shape[-2]) must be a multiple of 16"),
    ("gemm-sa-shape", lambda: G.fp8_gemm_nt((A[0], torch.ones(4, 3)), B), ValueError, "a[1] must have shape (4, 2)"),
    ("gemm-sb-shape", lambda: G.fp8_gemm_nt(A, (B[0], torch.ones(2, 2))), ValueError, "b[1] must have shape (1, 2)"),
    ("gemm-a-noncontiguous", lambda: G.fp8_gemm_nt((act(256, 256)[0][:, :128], act(256, 128)[1]), wgt(32, 128)), ValueError, "a[0] must be contiguous"),
    ("gemm-out-dtype", lambda: G.fp8_gemm_nt(A, B, out=torch.empty(4, 32)), TypeError, "out must have dtype torch.bfloat16"),
    ("gemm-out-shape", lambda: G.fp8_gemm_nt(A, B, out=torch.empty(4, 16, dtype=torch.bfloat16)), ValueError, "out must have shape (4, 32)"),
    ("gemm-backend", lambda: G.fp8_gemm_nt(A, B, backend="cuda"), ValueError, "backend must be one of"),
    ("gemm-kernel-on-cpu", lambda: G.fp8_gemm_nt(A, B, backend="kernel"), ValueError, "backend='kernel' needs tensors on an sm_90 GPU"),
    ("contig-b-2d", lambda: G.m_grouped_fp8_gemm_nt_contiguous(A_CONT, B, M_IDX), ValueError, "b[0] must be 3-D"),
    ("contig-m-sum", lambda: G.m_grouped_fp8_gemm_nt_contiguous(act(100, 256), B_GROUP, M_IDX[:100]), ValueError, "M_sum (a[0].shape[0]) must be a multiple of 128"),
    ("contig-m-indices-dtype", lambda: G.m_grouped_fp8_gemm_nt_contiguous(A_CONT, B_GROUP, M_IDX.long()), TypeError, "m_indices must have dtype torch.int32"),
    ("contig-m-indices-len", lambda: G.m_grouped_fp8_gemm_nt_contiguous(A_CONT, B_GROUP, M_IDX[:128]), ValueError, "m_indices must have shape (256,)"),
    ("contig-missing-expert", lambda: G.m_grouped_fp8_gemm_nt_contiguous(A_CONT, B_GROUP, torch.full((256,), 3, dtype=torch.int32)), ValueError, "m_indices[0] = 3 names no expert"),
    ("contig-mixed-block", lambda: G.m_grouped_fp8_gemm_nt_contiguous(A_CONT, B_GROUP, torch.tensor([0] * 64 + [1] * 192, dtype=torch.int32)), ValueError, "one expert per 128-row block"),
    ("contig-pad-then-real", lambda: G.m_grouped_fp8_gemm_nt_contiguous(A_CONT, B_GROUP, torch.tensor([0] * 64 + [-1] * 32 + [0] * 32 + [1] * 128, dtype=torch.int32)), ValueError, "padding -1 only at the block's end"),
    ("masked-expert-count", lambda: G.m_grouped_fp8_gemm_nt_masked(A_MASKED, wgt(32, 256, experts=2), MASKED_M, 4), ValueError, "a[0] has 3 experts but b[0] has 2"),
    ("masked-m-device-dtype", lambda: G.m_grouped_fp8_gemm_nt_masked(A_MASKED, B_GROUP, MASKED_M.float(), 4), TypeError, "masked_m must have dtype torch.int32"),
    ("masked-m-too-large", lambda: G.m_grouped_fp8_gemm_nt_masked(A_MASKED, B_GROUP, torch.tensor([9, 0, 0], dtype=torch.int32), 4), ValueError, "masked_m must lie in [0, M_max=8]"),
    ("masked-m-negative", lambda: G.m_grouped_fp8_gemm_nt_masked(A_MASKED, B_GROUP, torch.tensor([-1, 0, 0], dtype=torch.int32), 4), ValueError, "masked_m must lie in"),
    ("masked-expected-m-zero", lambda: G.m_grouped_fp8_gemm_nt_masked(A_MASKED, B_GROUP, MASKED_M, 0), ValueError, "expected_m must be > 0"),
    ("masked-expected-m-tensor", lambda: G.m_grouped_fp8_gemm_nt_masked(A_MASKED, B_GROUP, MASKED_M, torch.tensor(4)), TypeError, "expected_m must be a Python int"),
    ("masked-a-2d", lambda: G.m_grouped_fp8_gemm_nt_masked(A, B_GROUP, MASKED_M, 4), ValueError, "a[0] must be 3-D"),
    ("wgrad-t-mismatch", lambda: G.k_grouped_fp8_gemm_tn_contiguous(WG_A, act(48, 128), OFFSETS, WG_OUT), ValueError, "b[0].shape[1] must equal T"),
    ("wgrad-offsets-dtype", lambda: G.k_grouped_fp8_gemm_tn_contiguous(WG_A, WG_B, OFFSETS.long(), WG_OUT), TypeError, "offsets must have dtype torch.int32"),
    ("wgrad-offsets-end", lambda: G.k_grouped_fp8_gemm_tn_contiguous(WG_A, WG_B, torch.tensor([0, 128, 128], dtype=torch.int32), WG_OUT), ValueError, "offsets must start at 0 and end at the token count 256"),
    ("wgrad-offsets-aligned", lambda: G.k_grouped_fp8_gemm_tn_contiguous(WG_A, WG_B, torch.tensor([0, 100, 256], dtype=torch.int32), WG_OUT), ValueError, "offsets must be multiples of 128"),
    ("wgrad-offsets-decreasing", lambda: G.k_grouped_fp8_gemm_tn_contiguous(WG_A, WG_B, torch.tensor([0, 256, 128, 256], dtype=torch.int32), torch.zeros(3, 32, 48)), ValueError, "offsets must be non-decreasing"),
    ("wgrad-out-dtype", lambda: G.k_grouped_fp8_gemm_tn_contiguous(WG_A, WG_B, OFFSETS, WG_OUT.half()), TypeError, "out must have dtype torch.float32 or torch.bfloat16"),
    ("wgrad-bf16-accumulate", lambda: G.k_grouped_fp8_gemm_tn_contiguous(WG_A, WG_B, OFFSETS, WG_OUT.bfloat16()), ValueError, "accumulate=False"),
    ("wgrad-out-shape", lambda: G.k_grouped_fp8_gemm_tn_contiguous(WG_A, WG_B, OFFSETS, torch.zeros(3, 32, 48)), ValueError, "out must have shape (2, 32, 48)"),
    ("wgrad-accumulate-type", lambda: G.k_grouped_fp8_gemm_tn_contiguous(WG_A, WG_B, OFFSETS, WG_OUT, accumulate=1), TypeError, "accumulate must be a bool"),
    ("block-t-n-misaligned", lambda: G.per_block_quant_transpose_fp8(torch.randn(100, 128)), ValueError, "w.shape[-2] must be a multiple of 128"),
    ("block-t-k-misaligned", lambda: G.per_block_quant_transpose_fp8(torch.randn(128, 96)), ValueError, "w.shape[-1] must be a multiple of 128"),
    ("block-t-4d", lambda: G.per_block_quant_transpose_fp8(torch.randn(1, 1, 128, 128)), ValueError, "w must be 2-D or 3-D"),
    ("block-t-int", lambda: G.per_block_quant_transpose_fp8(torch.ones(128, 128, dtype=torch.int32)), TypeError, "w must have dtype"),
    ("block-t-block-size", lambda: G.per_block_quant_transpose_fp8(torch.randn(128, 128), 64), ValueError, "group_size must be 128"),
    ("tok-t-3d", lambda: G.transpose_token_group_quant_fp8(torch.randn(2, 3, 128)), ValueError, "x must be 2-D"),
    ("tok-t-channels", lambda: G.transpose_token_group_quant_fp8(torch.randn(5, 100)), ValueError, "x.shape[1] must be a multiple of 128"),
    ("tok-t-noncontiguous", lambda: G.transpose_token_group_quant_fp8(torch.randn(128, 256).t()), ValueError, "x must be contiguous"),
    ("tok-t-fp8-input", lambda: G.transpose_token_group_quant_fp8(torch.zeros(4, 128, dtype=FP8)), TypeError, "x must have dtype"),
    ("tok-t-out-shape", lambda: G.transpose_token_group_quant_fp8(torch.randn(5, 128), out=act(5, 128)), ValueError, "out[0] must have shape (128, 5)"),
    ("tok-t-out-layout", lambda: G.transpose_token_group_quant_fp8(torch.randn(300, 128), out=(torch.empty(128, 300, dtype=FP8), torch.empty(128, 3))), ValueError, "out[1] must be MN-major"),
    ("requant-a-not-pair", lambda: G.transpose_token_group_requant_fp8(A[0]), TypeError, "a must be a pair"),
    ("requant-a-bf16", lambda: G.transpose_token_group_requant_fp8((A[0].bfloat16(), A[1])), TypeError, "a[0] must have dtype torch.float8_e4m3fn"),
    ("requant-scale-shape", lambda: G.transpose_token_group_requant_fp8((A[0], torch.ones(4, 3))), ValueError, "a[1] must have shape (4, 2)"),
    ("requant-m-indices-len", lambda: G.transpose_token_group_requant_fp8(A, m_indices=torch.zeros(3, dtype=torch.int32)), ValueError, "m_indices must have shape (4,)"),
    ("requant-m-indices-dtype", lambda: G.transpose_token_group_requant_fp8(A, m_indices=torch.zeros(4)), TypeError, "m_indices must have dtype torch.int32"),
    ("tok-t-m-indices-len", lambda: G.transpose_token_group_quant_fp8(torch.randn(5, 128), m_indices=torch.zeros(4, dtype=torch.int32)), ValueError, "m_indices must have shape (5,)"),
    ("silu-bwd-width", lambda: G.silu_and_mul_backward_quant_fp8(torch.randn(4, 64), torch.randn(4, 128)), ValueError, "h.shape[1] must be a multiple of 256"),
    ("silu-bwd-d-act-shape", lambda: G.silu_and_mul_backward_quant_fp8(torch.randn(4, 256), torch.randn(4, 256)), ValueError, "d_act must have shape (4, 128)"),
    ("silu-bwd-d-act-dtype", lambda: G.silu_and_mul_backward_quant_fp8(torch.ones(4, 128, dtype=torch.int32), torch.randn(4, 256)), TypeError, "d_act must have dtype"),
    ("silu-bwd-h-3d", lambda: G.silu_and_mul_backward_quant_fp8(torch.randn(4, 128), torch.randn(1, 4, 256)), ValueError, "h must be 2-D"),
    ("silu-bwd-noncontiguous", lambda: G.silu_and_mul_backward_quant_fp8(torch.randn(128, 4).t(), torch.randn(4, 256)), ValueError, "d_act must be contiguous"),
]


@pytest.mark.parametrize("call,error,text", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_rejected(call, error, text):
    with pytest.raises(error) as info:
        call()
    assert text in str(info.value), f"message {str(info.value)!r} does not say {text!r}"


def test_catalogue_size():
    assert len(CASES) >= 40
