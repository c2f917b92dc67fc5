"""The moe_fp8 demo: one DeepSeek-V3 MoE layer, FP8 prefill and CUDA-graph decode, vs bf16.

    python examples/deepseek_v3_moe.py                       # CPU: tiny layer on the references
    python examples/deepseek_v3_moe.py                       # Hopper GPU: DeepSeek-V3 shapes, kernels
    python examples/deepseek_v3_moe.py --tokens 8192 --config deepseek-v3
    python examples/deepseek_v3_moe.py --checkpoint /ckpt/DeepSeek-V3 --config /ckpt/DeepSeek-V3/config.json \
                                       --prefix model.layers.3.mlp.

What it does: builds the layer (random bf16 weights quantised to FP8 with 128x128 block scales,
or a checkpoint), runs a prefill batch through the contiguous layout and a few decode batches
through ``decode_runner`` (one CUDA graph on a GPU; the same masked path eagerly on CPU),
and compares both with the unquantised layer (bf16 weights, fp32 math, same routing).

Default shapes: on a Hopper GPU the DeepSeek-V3 layer as one GPU of an 8-way expert-parallel
deployment sees it: H 7168, I 2048, 32 local experts (8 groups of 4, top-4 groups, top-8), one
shared expert. On CPU a tiny layer (H 256, I 128, 16 experts, top-4) so it finishes in seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from moe_fp8.gemm import calc_diff  # noqa: E402
from moe_fp8.layers import MoE, MoEConfig  # noqa: E402
from moe_fp8.layers.reference import dequantized_weights, reference_moe  # noqa: E402


def on_hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=None,
                   help="'tiny', 'deepseek-v3' (32 local experts), 'deepseek-v3-full' (256), or a "
                        "transformers config.json (default: deepseek-v3 on Hopper, tiny elsewhere)")
    p.add_argument("--checkpoint", nargs="*", default=None, help="safetensors files or a directory")
    p.add_argument("--prefix", default="model.layers.3.mlp.", help="key prefix of the MoE layer")
    p.add_argument("--tokens", type=int, default=None, help="prefill tokens (default 4096 GPU / 96 CPU)")
    p.add_argument("--decode", type=int, nargs="*", default=None, help="decode batch sizes")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda on Hopper)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def make_config(name: str) -> MoEConfig:
    if name == "tiny":
        return MoEConfig.tiny()
    if name == "deepseek-v3":
        return MoEConfig.deepseek_v3(num_experts=32)  # one GPU's share of 256 (EP 8)
    if name == "deepseek-v3-full":
        return MoEConfig.deepseek_v3()
    with open(name) as f:
        return MoEConfig.from_hf(SimpleNamespace(**json.load(f)))


class Timer:
    """Wall-clock on CPU, CUDA events on a GPU; median of ``repeats`` runs, in ms."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn, repeats: int = 5, warmup: int = 1) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[len(times) // 2]


def random_dense_weights(cfg: MoEConfig, device, seed: int) -> dict:
    """bf16 weights (the unquantised layer), std 0.02 like DeepSeek-V3's init."""
    gen = torch.Generator(device=device).manual_seed(seed)
    r = lambda *shape: (torch.randn(*shape, generator=gen, device=device) * 0.02).bfloat16()  # noqa: E731
    e, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    w = dict(w13=r(e, 2 * i, h), w2=r(e, h, i), shared_w13=None, shared_w2=None,
             gate=torch.randn(e, h, generator=gen, device=device) * 0.02)
    if cfg.n_shared_experts:
        w["shared_w13"], w["shared_w2"] = r(2 * cfg.shared_intermediate_size, h), r(h, cfg.shared_intermediate_size)
    return w


def build(cfg, args, device):
    moe = MoE(cfg, device=device, seed=None)
    if args.checkpoint:
        t0 = time.perf_counter()
        moe.load_safetensors(args.checkpoint, prefix=args.prefix)
        print(f"loaded {args.prefix}* from {args.checkpoint} in {time.perf_counter() - t0:.1f} s")
        return moe, dequantized_weights(moe)  # reference: the checkpoint's weights, unquantised math
    dense = random_dense_weights(cfg, device, args.seed)
    with torch.no_grad():
        moe.gate.weight.copy_(dense["gate"])
        moe.experts.load_dense(dense["w13"], dense["w2"])
        if moe.shared_experts is not None:
            moe.shared_experts.load_dense(dense["shared_w13"], dense["shared_w2"])
    return moe, dense


@torch.no_grad()
def main() -> None:
    args = parse_args()
    hopper = on_hopper()
    device = torch.device(args.device or ("cuda" if hopper else "cpu"))
    cfg = make_config(args.config or ("deepseek-v3" if device.type == "cuda" else "tiny"))
    tokens = args.tokens or (4096 if device.type == "cuda" else 96)
    decode_sizes = args.decode or ([1, 8, 32, 128] if device.type == "cuda" else [1, 4, 16])
    backend = "sm_90a kernels" if device.type == "cuda" and hopper else "pure-torch references"
    print(f"device {device} ({backend}); layer: H {cfg.hidden_size}, I {cfg.moe_intermediate_size}, "
          f"{cfg.num_experts} experts, top-{cfg.top_k}, groups {cfg.n_group}/{cfg.topk_group}, "
          f"{cfg.n_shared_experts} shared")

    t0 = time.perf_counter()
    moe, dense = build(cfg, args, device)
    print(f"built + quantised in {time.perf_counter() - t0:.1f} s")
    timer = Timer(device)
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)

    def reference(x):
        routing = moe.gate(x)
        return reference_moe(x, routing.topk_idx, routing.topk_weights, dense["w13"], dense["w2"],
                             dense["shared_w13"], dense["shared_w2"])

    rows = []
    x = torch.randn(tokens, cfg.hidden_size, generator=gen, device=device).bfloat16()
    y = moe(x)
    ms = timer(lambda: moe(x), repeats=5 if device.type == "cuda" else 2)
    flops = 2 * 3 * cfg.hidden_size * cfg.moe_intermediate_size * tokens * (cfg.top_k + cfg.n_shared_experts)
    rows.append(("prefill", tokens, ms, calc_diff(y, reference(x)), flops / ms / 1e9))

    runner = moe.decode_runner(max(decode_sizes))
    for n in decode_sizes:
        xd = torch.randn(n, cfg.hidden_size, generator=gen, device=device).bfloat16()
        yd = runner(xd).clone()
        ms = timer(lambda: runner(xd), repeats=20 if device.type == "cuda" else 3)
        flops = 2 * 3 * cfg.hidden_size * cfg.moe_intermediate_size * n * (cfg.top_k + cfg.n_shared_experts)
        rows.append((f"decode{' (graph)' if runner.graph is not None else ''}", n, ms,
                     calc_diff(yd, reference(xd)), flops / ms / 1e9))

    print(f"\n{'step':<16}{'tokens':>8}{'ms':>10}{'tokens/s':>11}{'TFLOPS':>9}{'calc_diff vs bf16':>20}")
    for name, n, ms, diff, tflops in rows:
        print(f"{name:<16}{n:>8}{ms:>10.3f}{n / ms * 1e3:>11.0f}{tflops:>9.2f}{diff:>20.2e}")
    worst = max(r[3] for r in rows)
    print(f"\nworst calc_diff {worst:.2e} (FP8 activations + weights; ~2e-3 is the expected level)")
    if worst > 1e-2:
        raise SystemExit("accuracy check failed: calc_diff above 1e-2")


if __name__ == "__main__":
    main()
