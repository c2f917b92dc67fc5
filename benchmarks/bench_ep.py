"""Expert-parallel exchange and layer latency on the GPUs of one host, beside NCCL's raw
all-to-all on the same machine in the same run.

    python -m torch.distributed.run --nproc-per-node 2 benchmarks/bench_ep.py [--quick]
    python -m torch.distributed.run --nproc-per-node 2 benchmarks/bench_ep.py --cpu   # CPU proxy + smoke test (gloo)

DeepSeek-V3 shapes (H 7168, I 2048, 256 experts, top-8; random distinct experts per token).
Rows (median of the repeats on each rank, then the slowest rank; ranks start each repeat together
after a barrier; L2 flushed before each repeat):

* ``a2a_raw``        ``all_to_all_single`` of B bytes per rank (uint8, equal splits): the peer, at the
                     same B as the row it follows.
* ``dispatch``       ``TorchDistDispatcher.dispatch_contiguous`` on pre-quantised tokens (the layer
                     quantises once for the shared expert too): counts exchange + the one host
                     sync + ONE packed all-to-all (fp8 | scales | ids | weights) + the
                     contiguous layout. B = rows sent x (H + 4H/128 + 8k, padded to 16) bytes, rows to the rank
                     itself included.
* ``dispatch ep_send`` (GPU) the same with its send side on the ep_send kernels (``MOE_FP8_FUSED_EP=1``).
* ``dispatch_wire``  only the packed all-to-all of that dispatch (same splits): transport vs local work.
* ``combine``        ``combine_contiguous``: weighted local reduce, reverse all-to-all (bf16), source
                     sum. B = rows x 2H.
* ``combine pipelined`` the same with the per-peer chunked exchange (``MOE_FP8_EP_PIPELINE=1``): each
                     chunk's local reduce overlaps the previous chunk's transfer; rows to itself
                     are not transferred.
* ``layer_prefill``  ``MoE.forward`` with T tokens per rank (256 experts, E/R per rank).
* ``layer_decode``   one replay of ``decode_runner(128)`` (a CUDA graph: dispatch, experts, combine);
                     16 experts (the issue's target, 8 per rank at R = 2) and 256 (not with
                     ``--quick``). B = the fixed dispatch + combine packets; its peer is a raw
                     all-to-all of the same bytes.

GB/s = B / time (algorithmic, per rank); ratio = ours / a2a_raw at the same B.
Target (issue 6): dispatch and combine >= 80 % of raw all-to-all at prefill sizes.
Results: benchmarks/results/ep_<R>gpu_<date>.md/.csv (rank 0; card, date, commit in the header).

``--cpu`` (gloo, no GPU): a PROXY of the local work around the transfers, measured with
``op_counter.OpCounter`` on DeepSeek-V3 routing (H 7168, 256 experts, top-8) at
``kProxyTokens`` tokens per rank, per call of dispatch and combine (prefill and decode):
compute ops (~ kernels on a GPU; with g++ the layer's index/permute/combine kernels run emulated
and count as one launch each, as on Hopper), host read-backs (syncs), collectives, compute ops between the
last read-back and the (last) payload transfer (serial host work on the critical path), MB and
millions of elements written by the compute ops (a uint8 gather moves 8x the elements of an int64
one), MB on the wire, and the CPU wall time (gloo and CPU kernels: not a GPU figure).
Then the smoke rows above on a tiny layer. Nothing is saved.

``--profile`` (GPU): after the table, rank 0 prints where one call of each exchange spends its
time (torch.profiler; both ranks run the call, rank 0 records): host time until the call
returns, GPU busy and idle time inside the call's span, kernel count, the NCCL kernels' time
(the transfers) and the top kernels — whether the gap to raw all-to-all is host issue, the host
sync, or kernels.
"""
from __future__ import annotations

import argparse
import functools
import gc
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import env, flush_l2, write_results  # noqa: E402

from moe_fp8.layers import MoE, MoEConfig  # noqa: E402
from moe_fp8.layers.dispatch.op_counter import OpCounter  # noqa: E402
from moe_fp8.layers.dispatch.torch_dist import TorchDistDispatcher  # noqa: E402
from moe_fp8.layers.permute import quantize_tokens  # noqa: E402

kPrefillTokens = (4096, 8192, 16384)
kDecodeTokens = 128
kProxyTokens = 256  # --cpu: tokens per rank for the op-count proxy (op counts do not grow with T)
kTarget = "dispatch and combine >= 80% of raw all-to-all GB/s at prefill sizes"


class Clock:
    """Per-rank median of ``fn()`` in µs, then the max over ranks."""

    def __init__(self, device, group, repeats: int, warmup: int = 3):
        self.device, self.group, self.repeats, self.warmup = device, group, repeats, warmup

    def __call__(self, fn) -> float:
        cuda = self.device.type == "cuda"
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.repeats):
            if cuda:
                flush_l2()
            dist.barrier(group=self.group)
            if cuda:
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) * 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e6)
        slowest = torch.tensor([statistics.median(times)], device=self.device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=self.group)
        return float(slowest.item())


def raw_a2a(nbytes: int, world: int, device, group):
    """A closure running one equal-split uint8 all_to_all_single of ~nbytes per rank (the largest
    ``nbytes`` of any rank: every rank must post the same sizes)."""
    agreed = torch.tensor([nbytes], dtype=torch.int64, device=device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=group)
    per_rank = max(1, int(agreed.item()) // world)
    send = torch.randint(0, 255, (world * per_rank,), dtype=torch.uint8, device=device)
    recv = torch.empty_like(send)
    return lambda: dist.all_to_all_single(recv, send, group=group), world * per_rank


def routing(tokens: int, cfg: MoEConfig, device, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cfg.hidden_size, generator=gen).bfloat16().to(device)
    topk_idx = torch.rand(tokens, cfg.num_experts, generator=gen).topk(cfg.top_k, dim=1).indices
    return x, topk_idx.to(device), torch.rand(tokens, cfg.top_k, generator=gen).to(device)


def row(op, tokens, nbytes, us, peer_gbs=None):
    gbs = nbytes / (us * 1e-6) / 1e9 if nbytes else float("nan")
    return {"op": op, "tokens/rank": tokens, "MB/rank": round(nbytes / 1e6, 2), "us": round(us, 1),
            "GB/s": round(gbs, 1), "a2a_raw GB/s": round(peer_gbs, 1) if peer_gbs else "",
            "ratio": round(gbs / peer_gbs, 2) if peer_gbs else ""}


def _dispatch(disp, xq, xs, topk_idx, topk_w, ep_send: bool = False):
    """One prefill dispatch of pre-quantised tokens; ``ep_send``: its send side on the ep_send
    kernels (``MOE_FP8_FUSED_EP=1``), else the torch ops."""
    def fn():
        with env(MOE_FP8_FUSED_EP="1" if ep_send else "0"):
            return disp.dispatch_contiguous((xq, xs), topk_idx, topk_w)
    return fn


def bench_exchange(cfg, tokens, clock, device, group, world, rank):
    """dispatch / its wire / combine rows at T tokens per rank, each with its raw peer."""
    disp = TorchDistDispatcher(cfg, group)
    x, topk_idx, topk_w = routing(tokens, cfg, device, seed=rank)
    xq, xs = quantize_tokens(x)
    layout, handle = disp.dispatch_contiguous((xq, xs), topk_idx, topk_w)
    rows_sent = sum(handle.send_splits)
    dispatch_bytes = rows_sent * disp.row_format.nbytes
    combine_bytes = rows_sent * 2 * cfg.hidden_size
    out = []
    cases = [("dispatch", _dispatch(disp, xq, xs, topk_idx, topk_w), dispatch_bytes),
             ("dispatch_wire", _wire(disp, xq, xs, handle, device), dispatch_bytes),
             ("combine", _combine(disp, layout, handle), combine_bytes),
             ("combine pipelined", _combine(disp, layout, handle, pipelined=True), combine_bytes)]
    if device.type == "cuda":
        cases.insert(1, ("dispatch ep_send", _dispatch(disp, xq, xs, topk_idx, topk_w, True), dispatch_bytes))
    for op, fn, nbytes in cases:
        peer_fn, peer_bytes = raw_a2a(nbytes, world, device, group)
        peer_us = clock(peer_fn)
        us = clock(fn)
        out.append(row("a2a_raw", tokens, peer_bytes, peer_us))
        out.append(row(op, tokens, nbytes, us, peer_bytes / (peer_us * 1e-6) / 1e9))
    return out


def profile_exchange(cfg, tokens, device, group, rank, top: int = 10) -> None:
    """--profile: one profiled call of prefill dispatch, combine and one decode replay (rank 0
    prints; every rank runs the same calls so the collectives match)."""
    from torch.profiler import ProfilerActivity, profile, record_function
    from profile_layer import kActivities, kLayerLabel, analyse, short
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    disp = TorchDistDispatcher(cfg, group)
    x, topk_idx, topk_w = routing(tokens, cfg, device, seed=rank)
    xq, xs = quantize_tokens(x)
    layout, handle = disp.dispatch_contiguous((xq, xs), topk_idx, topk_w)
    decode_cfg = cfg.replace(num_experts=16)
    moe = MoE(decode_cfg, ep_group=group, device=device, seed=0)
    runner = moe.decode_runner(kDecodeTokens)
    runner(routing(kDecodeTokens, decode_cfg, device, seed=2)[0])
    step = runner.graph.replay if runner.graph is not None else runner._step
    calls = (("prefill dispatch", _dispatch(disp, xq, xs, topk_idx, topk_w)),
             ("prefill dispatch, ep_send kernels", _dispatch(disp, xq, xs, topk_idx, topk_w, True)),
             ("prefill combine", _combine(disp, layout, handle)),
             ("prefill combine, pipelined", _combine(disp, layout, handle, pipelined=True)),
             ("decode step E=16 (graph replay)", step))
    lines = []
    for name, fn in calls:
        fn()  # warm
        sync()
        dist.barrier(group=group)
        with profile(activities=kActivities if cuda else [ProfilerActivity.CPU]) as prof:
            with record_function(kLayerLabel):
                t0 = time.perf_counter()
                fn()
                host_us = (time.perf_counter() - t0) * 1e6
            sync()
        stats = analyse(prof, set())
        nccl = sum(us for n, (_, us) in stats["by_name"].items() if "nccl" in n.lower())
        lines.append(f"{name}: host {host_us:.0f} us until return; GPU span {stats['span_us']:.0f} us, "
                     f"busy {stats['busy_us']:.0f} us, idle {stats['span_us'] - stats['busy_us']:.0f} us; "
                     f"{stats['kernels']} kernels (+{stats['memcpy']} memcpy, {stats['memset']} memset), "
                     f"NCCL kernels {nccl:.0f} us, other kernels {stats['kernel_us'] - nccl:.0f} us; "
                     f"host launches {stats['launches']}, host syncs {stats['syncs']}")
        for n, (count, us) in sorted(stats["by_name"].items(), key=lambda kv: -kv[1][1])[:top]:
            lines.append(f"    {us:8.1f} us {count:3d}x  {short(n, 100)}")
    del runner, moe
    gc.collect()
    if rank == 0:
        print(f"\nprofile, rank 0, {tokens} tokens per rank (prefill), {kDecodeTokens} (decode):")
        print("\n".join(lines))


def _wire(disp, xq, xs, handle, device):
    """The dispatch's payload transfer alone, with its splits: ONE all-to-all of packed rows
    (fp8 | scales | metadata), no routing tables, no layout."""
    nbytes = disp.row_format.nbytes
    send = torch.randint(0, 255, (sum(handle.send_splits), nbytes), dtype=torch.uint8, device=device)
    recv = torch.empty(sum(handle.recv_splits), nbytes, dtype=torch.uint8, device=device)

    def fn():
        dist.all_to_all_single(recv, send, handle.recv_splits, handle.send_splits, group=disp.group)
    return fn


def _combine(disp, layout, handle, pipelined: bool = False):
    """One prefill combine; ``pipelined``: the per-peer chunked exchange (``MOE_FP8_EP_PIPELINE=1``)."""
    y_rows = torch.randn(layout.num_rows, disp.hidden_size, device=layout.a.device).bfloat16()

    def fn():
        with env(MOE_FP8_EP_PIPELINE="1" if pipelined else "0"):
            return disp.combine_contiguous(y_rows, handle)
    return fn


def _hopper_kernels(rank):
    """The layer's index/permute/combine kernels emulated on the CPU (tests/kernel_checks.py, g++)
    -> ``(context factory, launch log)``, so that the proxy counts what Hopper runs; the torch
    path's ops (context None) without g++."""
    import pathlib
    import shutil
    import tempfile
    if shutil.which("g++") is None:
        return None, []
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from kernel_checks import build_emulator, emulated_permute_kernels, kPermuteInstances
    build = pathlib.Path(tempfile.mkdtemp(prefix=f"bench_ep_emu{rank}_"))
    lib = build_emulator(build, ["permute.cuh"], kPermuteInstances, "permute_proxy")
    log = []
    return (lambda: emulated_permute_kernels(lib, log)), log


def proxy_rows(cfg, tokens, decode_tokens, clock, group, rank):
    """--cpu: OpCounter per call (see the module docstring) + CPU wall time, rank 0's view.
    Prefill: ``cfg``; decode: the issue's decode target, ``cfg`` with 16 experts. With g++ the
    layer's kernels run emulated (``launches``: their launches; ``ops`` = kernels + launches, the
    count on Hopper) and calls that launch one are not timed (the emulation is no CPU figure)."""
    import contextlib
    hopper, log = _hopper_kernels(rank)
    with (hopper() if hopper else contextlib.nullcontext()):
        return _proxy_rows(cfg, tokens, decode_tokens, clock, group, rank, log)


def _proxy_rows(cfg, tokens, decode_tokens, clock, group, rank, log):
    device = torch.device("cpu")
    disp = TorchDistDispatcher(cfg, group)
    disp_d = TorchDistDispatcher(cfg.replace(num_experts=16), group)
    x, topk_idx, topk_w = routing(tokens, cfg, device, seed=rank)
    xq, xs = quantize_tokens(x)
    add = torch.randn(tokens, cfg.hidden_size).bfloat16()
    layout, handle = disp.dispatch_contiguous((xq, xs), topk_idx, topk_w)
    y_rows = torch.randn(layout.num_rows, cfg.hidden_size).bfloat16()
    m_max = disp_d.max_tokens_per_expert(decode_tokens)
    xd, idx_d, w_d = routing(decode_tokens, cfg.replace(num_experts=16), device, seed=10 + rank)
    xdq = quantize_tokens(xd)
    masked, mhandle = disp_d.dispatch_masked(xdq, idx_d, w_d, max_tokens_per_expert=m_max)
    y_masked = torch.randn(*masked.a.shape[:2], cfg.hidden_size).bfloat16()
    calls = (("prefill dispatch", tokens, lambda: disp.dispatch_contiguous((xq, xs), topk_idx, topk_w)),
             ("prefill combine", tokens, lambda: disp.combine_contiguous(y_rows, handle, add=add)),
             ("decode dispatch E=16", decode_tokens,
              lambda: disp_d.dispatch_masked(xdq, idx_d, w_d, max_tokens_per_expert=m_max)),
             ("decode combine E=16", decode_tokens, lambda: disp_d.combine_masked(y_masked, mhandle, add=xd)))
    out = []
    for name, n, fn in calls:
        dist.barrier(group=group)
        first = len(log)
        with OpCounter() as counter:
            fn()
        launches = len(log) - first
        out.append({"call": name, "tokens/rank": n, "ops": counter.kernels + launches,
                    "launches": launches, **counter.summary(),
                    "cpu_us": "-" if launches else round(clock(fn))})  # emulation: no timing
    return out


def bench_layers(cfg_full, prefill_sizes, clock, device, group, world, decode_tokens, decode_experts):
    out = []
    moe = MoE(cfg_full, ep_group=group, device=device, seed=0)
    for tokens in prefill_sizes:
        x, _, _ = routing(tokens, cfg_full, device, seed=1)
        out.append(row("layer_prefill", tokens, 0, clock(functools.partial(moe, x))))
    del moe
    gc.collect()
    for experts in decode_experts:
        out += _decode_rows(cfg_full.replace(num_experts=experts), clock, device, group, world, decode_tokens)
        gc.collect()  # the graph died with _decode_rows' frame: before the process group goes
    return out


def _decode_rows(cfg, clock, device, group, world, decode_tokens):
    moe = MoE(cfg, ep_group=group, device=device, seed=0)
    runner = moe.decode_runner(decode_tokens)
    runner(routing(decode_tokens, cfg, device, seed=2)[0])
    fmt = moe.dispatcher.row_format
    nbytes = world * decode_tokens * (fmt.nbytes + 2 * cfg.hidden_size)  # dispatch + combine packets
    step = runner.graph.replay if runner.graph is not None else runner._step
    peer_fn, peer_bytes = raw_a2a(nbytes, world, device, group)
    peer_us = clock(peer_fn)
    graph = " graph" if runner.graph is not None else ""
    return [row("a2a_raw", decode_tokens, peer_bytes, peer_us),
            row(f"layer_decode E={cfg.num_experts}{graph}", decode_tokens, nbytes, clock(step),
                peer_bytes / (peer_us * 1e-6) / 1e9)]


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one prefill size, decode at 16 experts only")
    p.add_argument("--cpu", action="store_true",
                   help="op-count proxy (DeepSeek-V3 routing) + smoke test on gloo with a tiny layer (nothing saved)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--proxy-tokens", type=int, default=kProxyTokens, help="--cpu: prefill tokens per rank")
    p.add_argument("--profile", action="store_true",
                   help="GPU: after the table, where one dispatch / combine / decode step spends its time")
    args = p.parse_args()
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    if args.cpu:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
        cfg = MoEConfig.tiny(num_experts=32, n_group=4, topk_group=4)
        prefill, decode, repeats = (64,), 8, 3
    else:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", device_id=device)
        cfg = MoEConfig.deepseek_v3()
        prefill, decode, repeats = (kPrefillTokens[:1] if args.quick else kPrefillTokens), kDecodeTokens, args.repeats
    group, rank, world = dist.group.WORLD, dist.get_rank(), dist.get_world_size()
    clock = Clock(device, group, repeats)
    if args.cpu:
        from common import markdown_table
        proxy = proxy_rows(MoEConfig.deepseek_v3(), args.proxy_tokens, kDecodeTokens,
                           Clock(device, group, 5, warmup=1), group, rank)
        if rank == 0:
            print(f"CPU proxy, EP = {world} ranks (gloo), DeepSeek-V3 routing, rank 0's counts per call:")
            print(markdown_table(proxy) + "\n")
    rows = []
    for tokens in prefill:
        rows += bench_exchange(cfg, tokens, clock, device, group, world, rank)
    decode_experts = (16,) if args.quick else (16, cfg.num_experts)  # 16: the decode target
    rows += bench_layers(cfg, prefill[:2], clock, device, group, world, decode, decode_experts)
    if rank == 0:
        best = {}  # per size and exchange, the best variant (the default may not be it yet)
        for r in rows:
            kind = r["op"].split()[0]
            if kind in ("dispatch", "combine"):
                key = (kind, r["tokens/rank"])
                best[key] = max(best.get(key, 0.0), r["ratio"])
        summary = (f"EP = {world} ranks; {kTarget}: worst ratio {min(best.values()):.2f} "
                   "(best variant of each exchange at each size). "
                   "GB/s = bytes per rank / time (slowest rank's median).")
        if args.cpu:
            from common import markdown_table
            print(markdown_table(rows) + "\n\n" + summary)
        else:
            write_results(f"ep_{world}gpu", rows, summary)
    if args.profile:  # on gloo: a smoke test of the step (no device events)
        profile_exchange(cfg, prefill[0], device, group, rank)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier(group=group)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
