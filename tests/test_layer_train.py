"""The MoE module trains in FP8: gradients reach the router, the experts' masters and x; loss falls."""
import pytest
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


@pytest.mark.parametrize("experts_here", [8, 4])  # 4: half the experts elsewhere, skipped slots
def test_input_gradient_sums_each_tokens_rows_in_fp32(monkeypatch, experts_here):
    """The experts' share of x's gradient is the fp32 sum of its rows' gradients over the slots
    that have a row, rounded once (the combine), not a scatter-add in bf16; padding rows and
    skipped slots add nothing. The layer's own indices and row gradients, the rows' function
    replayed on its own (x's full gradient also has the router's share)."""
    import moe_fp8.layers.autograd as A
    cfg = MoEConfig.tiny(num_experts=8, top_k=4, n_group=4, topk_group=2, n_shared_experts=0)
    from moe_fp8.layers.dispatch import LocalDispatcher
    dispatcher = LocalDispatcher(cfg.num_experts, cfg.hidden_size, cfg.top_k,
                                 num_experts_local=experts_here)
    moe = MoE(cfg, seed=3, dispatcher=dispatcher).enable_fp8_training()
    captured = {}

    def capture(x, slot_row, pair_kept, num_rows):
        rows = A._RowsOfTokens.apply(x, slot_row, pair_kept, num_rows)
        rows.register_hook(lambda g: captured.update(grad=g.clone()))
        captured.update(slot_row=slot_row, kept=pair_kept, num_rows=num_rows)
        return rows

    monkeypatch.setattr(A, "rows_of_tokens", capture)
    x = torch.randn(29, cfg.hidden_size, generator=torch.Generator().manual_seed(1)).bfloat16()
    x.requires_grad_(True)
    y = moe(x)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).bfloat16())
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    grad_rows, slot_row, kept = captured["grad"], captured["slot_row"], captured["kept"]
    assert bool(kept.all()) == (experts_here == cfg.num_experts)
    assert grad_rows.shape == (captured["num_rows"], cfg.hidden_size)
    x_alone = x.detach().clone().requires_grad_(True)
    A._RowsOfTokens.apply(x_alone, slot_row, kept, captured["num_rows"]).backward(grad_rows)
    want = (grad_rows.float()[slot_row] * kept.unsqueeze(-1)).sum(1).bfloat16()  # [T, k, H] -> [T, H]
    torch.testing.assert_close(x_alone.grad, want, rtol=2 ** -8, atol=0)


def test_combine_backward():
    """The training combine's backward: rows and add against autograd's numerical gradients in
    float64, the top-k weights (fp32 by the index's contract) against <d_out[t], y[row(t, j)]>:
    padding rows (no slot), skipped slots pointing at row 0 with weight 0, a kept slot whose
    weight is exactly 0 (its weight still gets its gradient, its row gets 0)."""
    from moe_fp8.layers.layouts import CombineIndex
    from moe_fp8.layers.permute import unpermute_combine
    gen = torch.Generator().manual_seed(0)
    y_rows = torch.randn(10, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    slot_row = torch.tensor([[1, 4, 0], [0, 2, 0], [9, 3, 6]])  # rows 5, 7, 8: padding
    weight = torch.rand(3, 3, generator=gen)
    weight[0, 2] = weight[1, 2] = 0.0  # skipped slots (row 0)
    weight[2, 2] = 0.0  # kept slot (row 6), weight 0
    add = torch.randn(3, 16, generator=gen, dtype=torch.float64, requires_grad=True)

    def combine(y, w, a):
        return unpermute_combine(y, CombineIndex(slot_row, w), add=a)

    assert torch.autograd.gradcheck(lambda y, a: combine(y, weight, a), (y_rows, add))
    w = weight.clone().requires_grad_(True)
    d_out = torch.randn(3, 16, generator=gen, dtype=torch.float64)
    d_rows, d_w, d_add = torch.autograd.grad(combine(y_rows, w, add), (y_rows, w, add), d_out)
    want_w = (y_rows.detach()[slot_row] * d_out.unsqueeze(1)).sum(-1)
    torch.testing.assert_close(d_w, want_w.float())
    assert (d_rows[[5, 7, 8, 6]] == 0).all() and torch.equal(d_add, d_out)


def test_combine_backward_reads_nothing_back():
    """The training combine's backward (and the input-gradient function's) never reads a tensor
    back to the host (boolean-mask indexing would: a sync per step on a GPU)."""
    from moe_fp8.layers.autograd import rows_of_tokens
    from moe_fp8.layers.dispatch.op_counter import OpCounter
    from moe_fp8.layers.layouts import CombineIndex
    from moe_fp8.layers.permute import unpermute_combine
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, generator=gen).bfloat16().requires_grad_(True)
    slot_row = torch.tensor([[1, 4, 0], [0, 2, 0], [9, 3, 6]])
    weight = torch.rand(3, 3, generator=gen)
    weight[0, 2] = weight[1, 2] = 0.0
    kept = weight != 0
    rows = rows_of_tokens(x, slot_row, kept, 10) + torch.randn(10, 16, generator=gen).bfloat16()
    y = unpermute_combine(rows, CombineIndex(slot_row, weight.requires_grad_(True)))
    with OpCounter() as counter:
        y.backward(torch.ones_like(y))
    assert counter.syncs == 0, counter.ops
    assert x.grad is not None and weight.grad is not None
