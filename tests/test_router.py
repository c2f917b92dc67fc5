"""The DeepSeek-V3 gate: identical expert indices to transformers, both group-mask modes."""
import pytest
import torch

from moe_fp8.layers import MoEConfig, Router, route, tokens_per_expert

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV3Config  # noqa: E402

from test_layer_helpers import hf_config, installed_transformers_fill  # noqa: E402
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf  # noqa: E402


def oracle_route(logits, bias, cfg: MoEConfig):
    """Token-by-token restatement of the DeepSeek-V3 gate in plain Python (independent oracle)."""
    fill = float("-inf") if cfg.group_mask_fill == "neg_inf" else 0.0
    size = cfg.experts_per_group
    out = []
    for row in logits.tolist():
        s = [1 / (1 + __import__("math").exp(-v)) for v in row]
        c = [sv + float(b) for sv, b in zip(s, bias.tolist())]
        gscore = [sum(sorted(c[g * size:(g + 1) * size], reverse=True)[:2]) for g in range(cfg.n_group)]
        kept = sorted(range(cfg.n_group), key=lambda g: -gscore[g])[: cfg.topk_group]
        masked = [c[e] if e // size in kept else fill for e in range(cfg.num_experts)]
        idx = sorted(range(cfg.num_experts), key=lambda e: -masked[e])[: cfg.top_k]
        out.append(sorted(idx))
    return torch.tensor(out)


def sorted_rows(idx, weights):
    order = idx.argsort(dim=1)
    return idx.gather(1, order), weights.gather(1, order)


def random_gate(cfg, gen, bias_scale):
    weight = torch.randn(cfg.num_experts, cfg.hidden_size, generator=gen) * 0.05
    bias = (torch.rand(cfg.num_experts, generator=gen) - 0.5) * 2 * bias_scale
    return weight, bias


@pytest.mark.parametrize("bias_scale", [0.0, 0.1, 1.5])  # 1.5: biased scores go negative
@pytest.mark.parametrize("tokens", [1, 7, 129])
def test_same_indices_as_transformers(gen, tokens, bias_scale):
    fill = installed_transformers_fill()
    cfg = MoEConfig.tiny(group_mask_fill=fill)
    weight, bias = random_gate(cfg, gen, bias_scale)
    x = torch.randn(tokens, cfg.hidden_size, generator=gen).bfloat16()

    theirs = hf.DeepseekV3TopkRouter(hf_config(cfg))
    with torch.no_grad():
        theirs.weight.copy_(weight)
        theirs.e_score_correction_bias.copy_(bias)
    _, hf_w, hf_idx = theirs(x)

    ours = Router(cfg)
    with torch.no_grad():
        ours.weight.copy_(weight)
        ours.e_score_correction_bias.copy_(bias)
    routing = ours(x)
    hf_idx, hf_w = sorted_rows(hf_idx, hf_w)
    idx, w = sorted_rows(routing.topk_idx, routing.topk_weights)
    assert torch.equal(idx, hf_idx)
    torch.testing.assert_close(w, hf_w, rtol=0, atol=0)


@pytest.mark.parametrize("fill", ["neg_inf", "zero"])
@pytest.mark.parametrize("bias_scale", [0.0, 1.5])
def test_both_fills_match_oracle(gen, fill, bias_scale):
    cfg = MoEConfig.tiny(group_mask_fill=fill)
    _, bias = random_gate(cfg, gen, bias_scale)
    logits = torch.randn(64, cfg.num_experts, generator=gen) * 2
    idx, weights = route(logits, bias, cfg)
    assert torch.equal(idx.sort(dim=1).values, oracle_route(logits, bias, cfg))
    expected = logits.sigmoid().gather(1, idx)
    expected = expected / expected.sum(1, keepdim=True) * cfg.routed_scaling_factor
    torch.testing.assert_close(weights, expected)


def test_fills_differ_when_kept_scores_are_negative():
    # A bias below -1 makes every biased score negative: "neg_inf" still picks inside the kept
    # groups (0 and 1, the largest logits), "zero" prefers the 0.0 of the dropped groups' experts.
    cfg = MoEConfig.tiny()  # 4 groups of 4 experts, keep 2 groups, top-4
    logits = torch.full((1, 16), -4.0)
    logits[0, :8] = torch.linspace(1.0, 4.0, 8)
    bias = torch.full((16,), -2.0)
    neg_inf, _ = route(logits, bias, cfg.replace(group_mask_fill="neg_inf"))
    zero, _ = route(logits, bias, cfg.replace(group_mask_fill="zero"))
    assert sorted(neg_inf[0].tolist()) == [4, 5, 6, 7]
    assert all(e >= 8 for e in zero[0].tolist())
    # with a zero bias both agree (sigmoid scores are positive)
    bias.zero_()
    assert torch.equal(route(logits, bias, cfg.replace(group_mask_fill="zero"))[0].sort(1).values,
                       route(logits, bias, cfg)[0].sort(1).values)


def test_unnormalised_weights(gen):
    cfg = MoEConfig.tiny(norm_topk_prob=False, routed_scaling_factor=1.0)
    logits = torch.randn(5, cfg.num_experts, generator=gen)
    idx, weights = route(logits, torch.zeros(cfg.num_experts), cfg)
    torch.testing.assert_close(weights, logits.sigmoid().gather(1, idx))


def test_tokens_per_expert_and_bias_update(gen):
    cfg = MoEConfig.tiny()
    router = Router(cfg)
    routing = router(torch.randn(100, cfg.hidden_size, generator=gen))
    counts = tokens_per_expert(routing.topk_idx, cfg.num_experts)
    assert torch.equal(counts, torch.bincount(routing.topk_idx.flatten(), minlength=cfg.num_experts))
    assert int(counts.sum()) == 100 * cfg.top_k
    before = router.e_score_correction_bias.clone()
    router.update_bias(counts, rate=0.01)
    delta = router.e_score_correction_bias - before
    mean = counts.float().mean()
    assert torch.all(delta[counts > mean] == -0.01) and torch.all(delta[counts < mean] == 0.01)
    with pytest.raises(ValueError, match="tokens_per_expert"):
        router.update_bias(counts[:3])


def test_config_from_hf_and_validation():
    cfg = MoEConfig.tiny()
    assert MoEConfig.from_hf(hf_config(cfg)) == cfg
    v3 = MoEConfig.from_hf(DeepseekV3Config())
    assert v3 == MoEConfig.deepseek_v3()
    assert (v3.hidden_size, v3.moe_intermediate_size, v3.num_experts, v3.top_k) == (7168, 2048, 256, 8)
    with pytest.raises(ValueError, match="hidden_size"):
        MoEConfig.tiny(hidden_size=200)
    with pytest.raises(ValueError, match="n_group"):
        MoEConfig.tiny(num_experts=18)
    with pytest.raises(ValueError, match="top_k"):
        MoEConfig.tiny(top_k=9)
    with pytest.raises(ValueError, match="group_mask_fill"):
        MoEConfig.tiny(group_mask_fill="nan")
