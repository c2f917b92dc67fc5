"""The MoE module trains in FP8: gradients reach the router, the experts' masters and x; loss falls."""
import torch

import moe_fp8.gemm as G
from moe_fp8.layers import MoE, MoEConfig


def make_layer(seed=0):
    cfg = MoEConfig.tiny(num_experts=8, top_k=2, n_group=4, topk_group=2)
    return MoE(cfg, seed=seed)


def test_fp8_training_forward_matches_inference():
    torch.manual_seed(0)
    moe = make_layer()
    x = torch.randn(37, moe.cfg.hidden_size).bfloat16()
    with torch.no_grad():
        y_inference = moe(x)
    moe.enable_fp8_training()
    y_train = moe(x)
    # masters are the dequantised FP8 weights, so re-quantising them reproduces the same FP8
    # values; the inference combine rounds top-k weights to bf16 (2^-9), the training one does not
    assert G.calc_diff(y_train, y_inference) < 1e-5


def test_fp8_training_gradients_and_loss_fall():
    torch.manual_seed(0)
    moe = make_layer().enable_fp8_training()
    teacher = make_layer(seed=7)
    x = torch.randn(64, moe.cfg.hidden_size).bfloat16()
    with torch.no_grad():
        target = teacher(x).float()
    params = [moe.gate.weight, moe.experts.w13_master, moe.experts.w2_master]
    optimizer = torch.optim.Adam(params, lr=3e-3)
    losses = []
    for step in range(12):
        xr = x.clone().requires_grad_(step == 0)
        loss = torch.nn.functional.mse_loss(moe(xr).float(), target)
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            for name, t in (("x", xr), ("gate", moe.gate.weight), ("w13", moe.experts.w13_master),
                            ("w2", moe.experts.w2_master)):
                assert t.grad is not None and torch.isfinite(t.grad).all(), name
                assert t.grad.abs().sum() > 0, f"{name} got a zero gradient"
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_sync_fp8_weights_updates_inference_path():
    moe = make_layer().enable_fp8_training()
    x = torch.randn(9, moe.cfg.hidden_size).bfloat16()
    with torch.no_grad():
        moe.experts.w2_master.mul_(2.0)
        y_master = moe(x)
        moe.sync_fp8_weights()
        masked = moe.forward_masked(x)
    assert G.calc_diff(masked, y_master) < 1e-5
