"""Which implementation backend="auto" picks on a Hopper GPU (simulated: the capability probe is
patched): measured kernel families run their kernels, families never yet run on a GPU keep their
references unless MOE_FP8_UNVERIFIED_KERNELS=1, and backend="reference" always wins."""
import torch

from moe_fp8.gemm import backend

kCuda = torch.device("cuda", 0)


def test_unverified_families_keep_the_reference_under_auto(monkeypatch):
    monkeypatch.setattr(backend, "_is_hopper", lambda index: True)
    monkeypatch.delenv(backend.kUnverifiedEnv, raising=False)
    monkeypatch.delenv("MOE_FP8_BACKEND", raising=False)
    assert backend.pick("auto", kCuda, "transpose_quant", "per_block_quant_transpose") is None
    assert backend.pick("auto", kCuda, "silu_backward", "silu_and_mul_backward_quant") is None
    assert backend.pick("auto", kCuda, "fp8_gemm", "fp8_gemm_nt") is not None  # measured family
    monkeypatch.setenv(backend.kUnverifiedEnv, "1")
    assert backend.pick("auto", kCuda, "transpose_quant", "per_block_quant_transpose") is not None
    assert backend.pick("reference", kCuda, "transpose_quant", "per_block_quant_transpose") is None
