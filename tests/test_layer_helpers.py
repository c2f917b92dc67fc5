"""Helpers shared by the layer tests: a tiny transformers DeepseekV3 config and modules."""
import inspect

import torch

from moe_fp8.layers import MoEConfig


def hf_config(cfg: MoEConfig, **extra):
    from transformers import DeepseekV3Config
    fields = dict(hidden_size=cfg.hidden_size, moe_intermediate_size=cfg.moe_intermediate_size,
                  n_routed_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k,
                  n_group=cfg.n_group, topk_group=cfg.topk_group,
                  routed_scaling_factor=cfg.routed_scaling_factor, norm_topk_prob=cfg.norm_topk_prob,
                  n_shared_experts=cfg.n_shared_experts, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=64, intermediate_size=256, q_lora_rank=None,
                  kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16)
    fields.update(extra)
    return DeepseekV3Config(**fields)


def hf_moe(cfg: MoEConfig, seed: int = 0, std: float = 0.05, bias: float = 0.1):
    """A transformers ``DeepseekV3MoE`` (fp32) with random weights and a random correction bias."""
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf
    module = hf.DeepseekV3MoE(hf_config(cfg))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
        module.gate.e_score_correction_bias.copy_(
            (torch.rand(cfg.num_experts, generator=gen) * 2 - 1) * bias)
    return module.eval()


def sorted_idx(idx: torch.Tensor) -> torch.Tensor:
    return idx.sort(dim=1).values


def installed_transformers_fill() -> str:
    """How the installed transformers masks dropped groups: "neg_inf" (v5) or "zero" (v4)."""
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf
    src = inspect.getsource(hf.DeepseekV3TopkRouter.forward)
    return "neg_inf" if '"-inf"' in src or "'-inf'" in src else "zero"
