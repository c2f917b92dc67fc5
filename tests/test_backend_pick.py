"""Which implementation backend="auto" picks on a Hopper GPU (simulated: the capability probe is
patched): measured kernel families run their kernels, families never yet run on a GPU keep their
references unless MOE_FP8_UNVERIFIED_KERNELS=1, and backend="reference" always wins."""
import torch

from moe_fp8.gemm import backend

kCuda = torch.device("cuda", 0)


def test_unverified_families_keep_the_reference_under_auto(monkeypatch):
    """The mechanism (no family is unverified today: the training-quant families passed on an
    H100, 2026-12-05): a family in the set keeps its reference under auto until opted in."""
    assert backend.kUnverifiedFamilies == frozenset()
    monkeypatch.setattr(backend, "kUnverifiedFamilies", frozenset({"transpose_quant", "silu_backward"}))
    monkeypatch.setattr(backend, "_is_hopper", lambda index: True)
    monkeypatch.delenv(backend.kUnverifiedEnv, raising=False)
    monkeypatch.delenv("MOE_FP8_BACKEND", raising=False)
    assert backend.pick("auto", kCuda, "transpose_quant", "per_block_quant_transpose") is None
    assert backend.pick("auto", kCuda, "silu_backward", "silu_and_mul_backward_quant") is None
    assert backend.pick("auto", kCuda, "fp8_gemm", "fp8_gemm_nt") is not None  # measured family
    monkeypatch.setenv(backend.kUnverifiedEnv, "1")
    assert backend.pick("auto", kCuda, "transpose_quant", "per_block_quant_transpose") is not None
    assert backend.pick("reference", kCuda, "transpose_quant", "per_block_quant_transpose") is None


def test_silu_backward_mixed_dtypes_never_pick_the_bf16_kernel(monkeypatch):
    """The kernel reads d_act and h as bf16: a pair with an fp32 or fp16 member must ask for
    that dtype (the reference under auto, a TypeError when forced), whichever member it is."""
    asked = []
    monkeypatch.setattr(backend, "pick", lambda b, device, family, name, dtype=None:
                        asked.append(dtype))
    rows, inter = 4, 128
    outs = [torch.empty(1)] * 6
    for d_dtype, h_dtype, expected in ((torch.bfloat16, torch.float32, torch.float32),
                                       (torch.float16, torch.bfloat16, torch.float16),
                                       (torch.bfloat16, torch.bfloat16, torch.bfloat16)):
        d_act = torch.randn(rows, inter).to(d_dtype)
        h = torch.randn(rows, 2 * inter).to(h_dtype)
        asked.clear()
        try:
            backend.silu_and_mul_backward_quant(d_act, h, *outs, 128, False, "auto")
        except RuntimeError:
            pass  # the reference's copies into the dummy outputs: only the pick matters here
        assert asked == [expected], (d_dtype, h_dtype, asked)


def test_transposing_quantisers_reject_more_token_tiles_than_grid_y():
    from moe_fp8.gemm.kernels import transpose_quant as TQ
    TQ.check_token_tiles(TQ.kMaxGridY * TQ.kTile, "x")
    import pytest
    with pytest.raises(ValueError, match="x has"):
        TQ.check_token_tiles(TQ.kMaxGridY * TQ.kTile + 1, "x")
