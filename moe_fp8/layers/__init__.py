"""The MoE layer: DeepSeek-V3 router, dispatchers, FP8 experts, CUDA-graph decode, checkpoints.

    from moe_fp8.layers import MoEConfig, MoE, replace_hf_moe
    moe = MoE(MoEConfig.deepseek_v3(), device="cuda")
    y = moe(x)                                   # [T, H] -> [T, H], contiguous layout
    run = moe.decode_runner(max_tokens=128)      # masked layout, one CUDA graph
"""
from .checkpoint import replace_hf_moe
from .config import MoEConfig
from .decode import attach_graph_runners
from .moe import MoE
from .router import Router, Routing, route, tokens_per_expert

__all__ = ["MoEConfig", "MoE", "replace_hf_moe", "attach_graph_runners", "Router", "Routing",
           "route", "tokens_per_expert"]
