"""The gate GEMM's bf16 path (router.gate_logits with Router.refresh_bf16_gate): when the gate
weights are bf16 values exactly (checkpoints), inference on CUDA takes one bf16 tensor-core GEMM
with fp32 output instead of an fp32 copy of x and an fp32 GEMM. CPU: when the copy is kept,
dropped and bypassed. GPU: the logits agree with the fp32 path to summation order and pick the
same experts."""
import pytest
import torch

from moe_fp8.layers import MoE, MoEConfig, Router
from moe_fp8.layers import router as R


def _router(device="cpu", exact=True):
    cfg = MoEConfig.tiny(num_experts=32, top_k=8, n_group=8, topk_group=4)
    router = Router(cfg, device=device)
    with torch.no_grad():
        if exact:
            router.weight.copy_(router.weight.bfloat16())
    return router


def test_copy_kept_only_for_bf16_values():
    assert _router(exact=True).refresh_bf16_gate()
    router = _router(exact=False)
    assert not router.refresh_bf16_gate() and router._bf16_gate() is None


def test_copy_dropped_when_the_weight_changes_or_trains():
    router = _router()
    assert router.refresh_bf16_gate()
    with torch.no_grad():
        assert router._bf16_gate() is not None
    assert router._bf16_gate() is None  # grad enabled and the weight requires grad
    with torch.no_grad():
        router.weight.mul_(2.0)  # in place, as an optimizer step: a new version (still bf16 values)
        assert router._bf16_gate() is None
    assert router.refresh_bf16_gate()
    router.to(torch.float32)  # _apply: device / dtype moves drop it
    with torch.no_grad():
        assert router._bf16_gate() is None


def test_random_init_keeps_the_copy_where_switched_on(monkeypatch):
    cfg = MoEConfig.tiny(num_experts=8, top_k=2, n_group=1, topk_group=1)
    monkeypatch.setenv(R.kBf16GateEnv, "1")
    with torch.no_grad():
        assert MoE(cfg, seed=3).gate._bf16_gate() is not None
        monkeypatch.setenv(R.kBf16GateEnv, "0")
        assert MoE(cfg, seed=3).gate._bf16_gate() is None


@pytest.mark.gpu
@torch.no_grad()
def test_bf16_gate_matches_fp32_gate_on_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    cfg = MoEConfig.deepseek_v3()  # 256 experts, H 7168
    router = Router(cfg, device="cuda")
    router.weight.copy_((torch.randn_like(router.weight) * 0.02).bfloat16())
    router.e_score_correction_bias.copy_(torch.rand(256, device="cuda") * 0.2 - 0.1)
    assert router.refresh_bf16_gate()
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2048, cfg.hidden_size, generator=gen, device="cuda").bfloat16()
    fast = R.gate_logits(x, router.weight, router._bf16_gate())
    slow = R.gate_logits(x, router.weight)
    assert R._mm_out_dtype[0], "torch.mm(out_dtype=float32) is missing on this build"
    assert fast.dtype == torch.float32 and fast.shape == slow.shape
    # same exact products, another summation order: fp32 rounding of a 7168-term sum
    scale = (x.float().abs() @ router.weight.abs().t())
    assert ((fast - slow).abs() <= 1e-6 * scale + 1e-7).all()
    routed = router(x)  # takes the bf16 path (no grad)
    idx_fast = routed.topk_idx.sort(1).values
    idx_slow = R.route(slow, router.e_score_correction_bias, cfg)[0].sort(1).values
    differing = int((idx_fast != idx_slow).any(dim=1).sum())
    # near-ties (gaps ~1e-7) may flip between the two summation orders: rare
    assert differing <= 2, f"{differing} of 2048 tokens chose other experts"
