"""The shared expert folded into the routed grouped GEMMs as local expert E_loc
(``MOE_FP8_FOLD_SHARED``): the storage tie, when the fold applies, and its results against the
side path (dense shared GEMMs, output added by the combine). CPU references, and the kernels on a
Hopper GPU (``gpu`` marker)."""
import pytest
import torch

from moe_fp8.gemm import calc_diff
from moe_fp8.layers import MoE, MoEConfig
from moe_fp8.layers.dispatch import LocalDispatcher
from moe_fp8.layers.layouts import with_shared_expert

kEnv = "MOE_FP8_FOLD_SHARED"
kFoldVsSide = 1e-6  # calc_diff: the same roundings, the combine's sum in another grouping


def forward_both(moe, x, monkeypatch, **kwargs):
    """-> (side path, folded) outputs of ``moe(x)`` (or ``forward_contiguous_static`` with
    ``kwargs``)."""
    outs = []
    for value in ("0", "1"):
        monkeypatch.setenv(kEnv, value)
        with torch.no_grad():
            if kwargs:
                out = torch.zeros_like(x)
                moe.forward_contiguous_static(x, out=out, **kwargs)
            else:
                out = moe(x)
        outs.append(out.float())
    return outs


def test_shared_weights_are_the_stack_tail(gen):
    moe = MoE(MoEConfig.tiny(), seed=3)
    stack = moe.folded_weights()
    assert stack is not None
    e = moe.num_experts_local
    for name, t in zip(("w13", "w13_scale", "w2", "w2_scale"), stack):
        assert t.shape[0] == e + 1, name
        assert torch.equal(t[:e].float(), getattr(moe.experts, name).float()), name
        assert torch.equal(t[e].float(), getattr(moe.shared_experts, name).float()), name
    # loads copy in place: the stack sees them
    moe.shared_experts.random_init(gen)
    assert torch.equal(moe.folded_weights()[0][e].float(), moe.shared_experts.w13.float())
    # a move replaces every buffer alone: tied again, values kept
    before = [t.clone() for t in moe.folded_weights()]
    moe._apply(lambda t: t.clone())
    after = moe.folded_weights()
    assert after is not None
    for b, a in zip(before, after):
        assert torch.equal(a.float(), b.float())
    # a buffer replaced by hand: no stack (the side path runs)
    moe.shared_experts.w2 = moe.shared_experts.w2.clone()
    assert moe.folded_weights() is None


def test_fold_needs_a_one_gpu_layer_of_equal_widths():
    assert MoE(MoEConfig.tiny(n_shared_experts=0), seed=1).folded_weights() is None
    assert MoE(MoEConfig.tiny(n_shared_experts=2), seed=1).folded_weights() is None  # 2 x I wide


def test_fold_default_is_small_eager_batches_on_the_gpu(monkeypatch):
    """Unset: the eager forward on a GPU below kFoldSharedMaxTokens tokens (measured faster there,
    slower from 2048 tokens and mixed in graphs); 1 everywhere; 0 never."""
    from types import SimpleNamespace
    from moe_fp8.layers.moe import kFoldSharedMaxTokens
    moe = MoE(MoEConfig.tiny(), seed=2)
    small_gpu = SimpleNamespace(is_cuda=True, shape=(kFoldSharedMaxTokens - 1, 256))
    large_gpu = SimpleNamespace(is_cuda=True, shape=(kFoldSharedMaxTokens, 256))
    small_cpu = SimpleNamespace(is_cuda=False, shape=(8, 256))
    monkeypatch.delenv(kEnv, raising=False)
    assert moe._fold_shared(small_gpu) is not None
    assert moe._fold_shared(small_gpu, eager=False) is None
    assert moe._fold_shared(large_gpu) is None and moe._fold_shared(small_cpu) is None
    monkeypatch.setenv(kEnv, "1")
    assert moe._fold_shared(large_gpu, eager=False) is not None and moe._fold_shared(small_cpu) is not None
    monkeypatch.setenv(kEnv, "0")
    assert moe._fold_shared(small_gpu) is None


def test_with_shared_expert_column():
    ids = torch.tensor([[0, 3], [3, 1], [2, 0]])  # E_loc 3: 3 is the skip sentinel
    weights = torch.tensor([[0.5, 0.25], [1.0, 2.0], [0.1, 0.2]])
    folded, w = with_shared_expert(ids, weights, 3, torch.tensor(2))
    assert folded.tolist() == [[0, 4, 3], [4, 1, 3], [2, 0, 4]]
    assert w[:, :2].tolist() == weights.tolist() and w[:, 2].tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("tokens", [1, 37, 130])
def test_fold_matches_the_side_path(gen, monkeypatch, tokens):
    moe = MoE(MoEConfig.tiny(), seed=4)
    x = torch.randn(tokens, moe.cfg.hidden_size, generator=gen).bfloat16()
    side, folded = forward_both(moe, x, monkeypatch)
    assert calc_diff(side, folded) < kFoldVsSide


def test_fold_static_step_leaves_tokens_past_the_count(gen, monkeypatch):
    moe = MoE(MoEConfig.tiny(), seed=5)
    x = torch.randn(40, moe.cfg.hidden_size, generator=gen).bfloat16()
    valid = torch.tensor(23)
    side, folded = forward_both(moe, x, monkeypatch, num_valid_tokens=valid)
    assert calc_diff(side[:23], folded[:23]) < kFoldVsSide
    assert not folded[23:].any(), "tokens past num_valid_tokens must be routed nowhere"
    with torch.no_grad():
        assert calc_diff(moe(x)[:23].float(), folded[:23]) < kFoldVsSide


def test_fold_skips_other_layers_and_training(gen, monkeypatch):
    """A layer holding a shard of the experts folds into its own stack; FP8 training keeps the
    shared experts apart (same result either way)."""
    cfg = MoEConfig.tiny()
    part = MoE(cfg, seed=6, dispatcher=LocalDispatcher(cfg.num_experts, cfg.hidden_size, cfg.top_k,
                                                       num_experts_local=8, expert_offset=8))
    x = torch.randn(19, cfg.hidden_size, generator=gen).bfloat16()
    side, folded = forward_both(part, x, monkeypatch)
    assert calc_diff(side, folded) < kFoldVsSide
    train = MoE(cfg, seed=7).enable_fp8_training()
    monkeypatch.setenv(kEnv, "1")
    assert train._fold_shared(x) is None


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 129, 2048])
def test_fold_matches_the_side_path_gpu(monkeypatch, tokens):
    """DeepSeek-V3 widths on the kernels: the fold against the side path,
    eager and as the graph runner's static step (poisoned output past the count stays)."""
    moe = MoE(MoEConfig.deepseek_v3(num_experts=32), device="cuda", seed=0)
    assert moe.folded_weights() is not None
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    x = torch.randn(tokens, moe.cfg.hidden_size, device="cuda", generator=gen).bfloat16()
    side, folded = forward_both(moe, x, monkeypatch)
    print(f"{tokens} tokens: calc_diff fold vs side {calc_diff(side, folded):.2e}, "
          f"bits equal {torch.equal(side, folded)}")
    assert calc_diff(side, folded) < kFoldVsSide
    if tokens > 1:
        valid = torch.tensor(tokens - 1, device="cuda")
        monkeypatch.setenv(kEnv, "1")
        out = torch.full_like(x, float("nan"))
        with torch.no_grad():
            moe.forward_contiguous_static(x, num_valid_tokens=valid, out=out)
        assert bool(out[-1].isnan().all()), "the token past the count must keep its row"
        assert calc_diff(out[:-1].float(), folded[:-1]) < kFoldVsSide
