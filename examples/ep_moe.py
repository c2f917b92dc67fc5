"""Expert-parallel demo: one DeepSeek-V3 MoE layer split over N ranks with torch.distributed.

    python -m torch.distributed.run --nproc-per-node 2 examples/ep_moe.py         # GPUs, NCCL
    python -m torch.distributed.run --nproc-per-node 4 examples/ep_moe.py --cpu   # CPU, gloo, tiny
    (``torchrun`` is the same launcher.)

Rank r holds experts ``r * E/N .. (r + 1) * E/N - 1`` (``moe_fp8.layers.placement``) and routes its
own tokens. Prefill runs the contiguous layout (tokens quantised to FP8, then all-to-all); decode
runs ``decode_runner``: dispatch, experts and combine captured in ONE CUDA graph per rank, NCCL
included (eager on CPU). Each rank prints its timings; rank 0 prints the table. With ``--check``
(default) every rank also runs the single-device layer (every expert, same weights) on its own
tokens and reports ``calc_diff``.

GPU default: DeepSeek-V3's layer (H 7168, I 2048, 256 experts, top-8, 1 shared), 4096 prefill
tokens and 128 decode tokens per rank. CPU default: the tiny layer, 48 / 8 tokens per rank.
``NCCL_NVLS_ENABLE=0`` is set before the group starts.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from moe_fp8.gemm import calc_diff  # noqa: E402
from moe_fp8.layers import MoE, MoEConfig  # noqa: E402
from moe_fp8.layers.dispatch.torch_dist import make_dispatcher  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true", help="gloo on CPU with the tiny layer")
    p.add_argument("--config", default=None, choices=("tiny", "deepseek-v3", "deepseek-v3-16"),
                   help="layer: tiny, deepseek-v3 (256 experts), deepseek-v3-16 (16 experts, the "
                        "decode target); default deepseek-v3 on GPUs, tiny with --cpu")
    p.add_argument("--tokens", type=int, default=None, help="prefill tokens per rank")
    p.add_argument("--decode", type=int, default=None, help="decode tokens per rank (graph size)")
    p.add_argument("--backend", default="torch", choices=("torch", "deepep"), help="EP transport")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the single-device comparison (it holds every expert on each rank)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def make_config(name: str) -> MoEConfig:
    return {"tiny": MoEConfig.tiny, "deepseek-v3": MoEConfig.deepseek_v3,
            "deepseek-v3-16": lambda: MoEConfig.deepseek_v3(num_experts=16)}[name]()


def shared_tokens(rows: int, hidden: int, seed: int, device) -> torch.Tensor:
    """The same tokens on every rank (so each can run the single-device reference)."""
    return torch.randn(rows, hidden, generator=torch.Generator().manual_seed(seed)).bfloat16().to(device)


def timed(fn, device, group, repeats: int) -> float:
    """Median ms of ``fn()``; the ranks start each repeat together (barrier)."""
    times = []
    for _ in range(repeats):
        dist.barrier(group=group)
        if device.type == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def build_layers(cfg, group, device, args):
    """(reference layer holding every expert or None, this rank's EP layer) with the same weights."""
    full = MoE(cfg, device=device, seed=args.seed)  # every expert; the EP layer keeps its slice
    kwargs = {"max_tokens_per_rank": args.decode} if args.backend == "deepep" else {}
    ep = MoE(cfg, device=device, seed=None,
             dispatcher=make_dispatcher(cfg, group, backend=args.backend, **kwargs))
    local = ep.dispatcher.placement.local_slice
    ep.gate.load_state_dict(full.gate.state_dict())
    if full.shared_experts is not None:
        ep.shared_experts.load_state_dict(full.shared_experts.state_dict())
    ep.experts.load_fp8(full.experts.w13[local], full.experts.w13_scale[local],
                        full.experts.w2[local], full.experts.w2_scale[local])
    return (full if args.check else None), ep


def run_decode(ep, full, decode, world, rank, device, group, repeats, seed) -> dict:
    """One graph per rank (NCCL inside), replayed with a new batch each step; the graph is freed
    when this returns."""
    runner = ep.decode_runner(decode)
    xd_all = shared_tokens(world * decode, ep.cfg.hidden_size, seed + 2, device)
    xd = xd_all[rank * decode:(rank + 1) * decode]
    yd = runner(xd).clone()
    out = {"decode_tokens": decode, "decode_graph": runner.graph is not None,
           "decode_us": round(timed(lambda: runner(xd), device, group, repeats * 3) * 1e3, 1)}
    if full is not None:
        out["decode_diff"] = calc_diff(yd, full(xd))
    return out


@torch.no_grad()
def main() -> None:
    args = parse_args()
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.cpu:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    else:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", device_id=device)
    group, rank, world = dist.group.WORLD, dist.get_rank(), dist.get_world_size()
    cfg = make_config(args.config or ("tiny" if args.cpu else "deepseek-v3"))
    tokens = args.tokens or (48 if args.cpu else 4096)
    decode = args.decode or (8 if args.cpu else 128)
    repeats = args.repeats or (3 if args.cpu else 10)
    if rank == 0:
        print(f"{world} ranks on {device.type} ({args.backend}); layer H {cfg.hidden_size}, "
              f"I {cfg.moe_intermediate_size}, {cfg.num_experts} experts ({cfg.num_experts // world} "
              f"per rank), top-{cfg.top_k}; {tokens} prefill / {decode} decode tokens per rank", flush=True)

    t0 = time.perf_counter()
    full, ep = build_layers(cfg, group, device, args)
    build_s = time.perf_counter() - t0
    row = {"rank": rank, "experts": f"{ep.expert_offset}..{ep.expert_offset + ep.num_experts_local - 1}",
           "build_s": round(build_s, 1)}

    # prefill: uneven batches (rank r has tokens - 7 r), so the exchange is not symmetric
    counts = [max(1, tokens - 7 * r) for r in range(world)]
    x_all = shared_tokens(sum(counts), cfg.hidden_size, args.seed + 1, device)
    x = x_all[sum(counts[:rank]):sum(counts[:rank + 1])]
    y = ep(x)
    row["prefill_tokens"] = counts[rank]
    row["prefill_ms"] = round(timed(lambda: ep(x), device, group, repeats), 3)
    if full is not None:
        row["prefill_diff"] = calc_diff(y, full(x))  # tokens are independent: this rank's rows

    row.update(run_decode(ep, full, decode, world, rank, device, group, repeats, args.seed))
    del full
    gc.collect()  # the decode graph is gone with run_decode's frame (DEVICE_FACTS: teardown hung otherwise)

    print(" ".join(f"{k}={v:.2e}" if isinstance(v, float) and "diff" in k else f"{k}={v}"
                   for k, v in row.items()), flush=True)
    rows = [None] * world
    dist.all_gather_object(rows, row, group=group)
    if rank == 0:
        keys = list(rows[0].keys())
        print("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
        for r in rows:
            print("| " + " | ".join(f"{r[k]:.2e}" if isinstance(r[k], float) and "diff" in k else str(r[k])
                                    for k in keys) + " |")
        prefill_tokens = sum(r["prefill_tokens"] for r in rows)
        slowest = max(r["prefill_ms"] for r in rows)
        print(f"\nprefill: {prefill_tokens} tokens in {slowest:.3f} ms (slowest rank) = "
              f"{prefill_tokens / slowest * 1e3:.0f} tokens/s; decode step {max(r['decode_us'] for r in rows):.1f} µs "
              f"for {world * decode} tokens")
    worst = max(max(r.get("prefill_diff", 0.0), r.get("decode_diff", 0.0)) for r in rows)
    if rank == 0 and args.check:
        print(f"worst calc_diff vs the single-device layer: {worst:.2e} (bound 1e-3)", flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier(group=group)
    dist.destroy_process_group()
    if worst > 1e-3:
        raise SystemExit("EP output differs from the single-device layer")


if __name__ == "__main__":
    main()
