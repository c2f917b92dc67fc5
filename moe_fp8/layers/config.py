"""``MoEConfig``: the shape and routing hyper-parameters of one DeepSeek-V3-style MoE layer.

Expert counts here are *global* (the whole model); how many experts one rank holds is decided
by the dispatcher (``num_experts_local = num_experts // ep_size``).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

kGroupFills = ("neg_inf", "zero")


@dataclass
class MoEConfig:
    hidden_size: int = 7168  # H: model width; a multiple of 128 (GEMM1's K)
    moe_intermediate_size: int = 2048  # I: one expert's width; a multiple of 128 (GEMM2's K)
    num_experts: int = 256  # routed experts, global count (num_experts_global)
    top_k: int = 8  # experts per token
    n_group: int = 8  # expert groups for group-limited routing
    topk_group: int = 4  # groups kept per token
    routed_scaling_factor: float = 2.5  # multiplies the routed weights
    norm_topk_prob: bool = True  # normalise the top-k weights to sum to 1 (before scaling)
    n_shared_experts: int = 1  # shared experts, fused into one MLP of width n_shared * I
    # How dropped groups are masked before the top-k: "neg_inf" (DeepSeek's reference and
    # transformers >= 5 `DeepseekV3TopkRouter`) or "zero" (transformers 4.x, vLLM/SGLang's
    # grouped_topk). They differ only when a kept expert's biased score is below 0.
    group_mask_fill: str = "neg_inf"
    pow2_scale: bool = False  # power-of-two activation scales (UE8M0, DeepSeek-V3.1 style)

    def __post_init__(self) -> None:
        for name in ("hidden_size", "moe_intermediate_size", "num_experts", "top_k", "n_group",
                     "topk_group", "n_shared_experts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"MoEConfig.{name} must be an int, got {value!r}")
        scaling = self.routed_scaling_factor
        if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) \
                or not math.isfinite(scaling) or scaling <= 0:
            raise ValueError(f"MoEConfig.routed_scaling_factor must be a finite number > 0, got {scaling!r}")
        for name in ("hidden_size", "moe_intermediate_size"):
            value = getattr(self, name)
            if value <= 0 or value % 128:
                raise ValueError(f"MoEConfig.{name} must be a positive multiple of 128, got {value}")
        for name in ("num_experts", "top_k", "n_group", "topk_group"):
            if getattr(self, name) <= 0:
                raise ValueError(f"MoEConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.num_experts % self.n_group:
            raise ValueError(f"MoEConfig.num_experts ({self.num_experts}) must be a multiple of "
                             f"n_group ({self.n_group})")
        if self.experts_per_group < 2:
            raise ValueError("MoEConfig needs >= 2 experts per group (group score = top-2 sum), "
                             f"got {self.experts_per_group}")
        if self.topk_group > self.n_group:
            raise ValueError(f"MoEConfig.topk_group ({self.topk_group}) exceeds n_group ({self.n_group})")
        if self.top_k > self.topk_group * self.experts_per_group:
            raise ValueError(f"MoEConfig.top_k ({self.top_k}) exceeds the experts of the kept groups "
                             f"({self.topk_group} x {self.experts_per_group})")
        if self.n_shared_experts < 0:
            raise ValueError(f"MoEConfig.n_shared_experts must be >= 0, got {self.n_shared_experts}")
        if self.group_mask_fill not in kGroupFills:
            raise ValueError(f"MoEConfig.group_mask_fill must be one of {kGroupFills}, "
                             f"got {self.group_mask_fill!r}")

    @property
    def experts_per_group(self) -> int:
        return self.num_experts // self.n_group

    @property
    def shared_intermediate_size(self) -> int:
        return self.moe_intermediate_size * self.n_shared_experts

    def replace(self, **changes) -> "MoEConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def deepseek_v3(cls, **changes) -> "MoEConfig":
        """DeepSeek-V3 / R1 (671B): H 7168, I 2048, 256 experts, top-8, 8 groups / top-4, 1 shared."""
        return cls(**changes)

    @classmethod
    def tiny(cls, **changes) -> "MoEConfig":
        """A small layer for CPU tests and the demo: H 256, I 128, 16 experts, top-4, 4 groups / top-2."""
        base = dict(hidden_size=256, moe_intermediate_size=128, num_experts=16, top_k=4,
                    n_group=4, topk_group=2)
        base.update(changes)
        return cls(**base)

    @classmethod
    def from_hf(cls, hf_config, **changes) -> "MoEConfig":
        """From a transformers ``DeepseekV3Config`` (or any object with its attribute names)."""
        def get(name, default=None):
            value = getattr(hf_config, name, default)
            if value is None:
                raise ValueError(f"hf_config has no {name!r}; expected a DeepseekV3Config")
            return value

        act = getattr(hf_config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hf_config.hidden_act must be 'silu', got {act!r}")
        topk_method = getattr(hf_config, "topk_method", "noaux_tc")
        if topk_method != "noaux_tc":
            raise ValueError(f"hf_config.topk_method must be 'noaux_tc' (sigmoid gate with "
                             f"correction bias), got {topk_method!r}")
        fields = dict(
            hidden_size=get("hidden_size"),
            moe_intermediate_size=get("moe_intermediate_size"),
            num_experts=get("n_routed_experts"),
            top_k=get("num_experts_per_tok"),
            n_group=get("n_group"),
            topk_group=get("topk_group"),
            routed_scaling_factor=float(get("routed_scaling_factor")),
            norm_topk_prob=bool(get("norm_topk_prob")),
            n_shared_experts=getattr(hf_config, "n_shared_experts", 0) or 0,
        )
        fields.update(changes)
        return cls(**fields)
