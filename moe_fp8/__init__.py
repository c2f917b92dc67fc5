"""moe_fp8: an FP8 Mixture-of-Experts layer for DeepSeek-V3-style models on NVIDIA Hopper.

``moe_fp8.gemm`` holds the FP8 GEMMs and quantisation ops (sm_90a kernels + pure-torch
references); ``moe_fp8.layers`` the router, dispatchers, experts and the ``MoE`` module.
"""
__version__ = "0.1.0"
