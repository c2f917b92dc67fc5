"""Where the MoE layer's time goes: torch.profiler over one prefill forward and one decode replay.

DeepSeek-V3 shapes on one GPU holding 32 experts (H 7168, I 2048, top-8, 1 shared expert), the
same layer as bench_layer.py. For each path (``torch``: MOE_FP8_FUSED_PERMUTE=0,
MOE_FP8_FUSED_ROUTER=0, MOE_FP8_OVERLAP_SHARED=0; ``fused``: all three on; ``--mode all`` adds
``permute``: only the fused permute, and ``nosync``: fused with the layout sized by an upper
bound of M_sum, so the prefill reads nothing back: the layer's defaults) it prints:

* the layer's clean time (CUDA events, median, L2 flushed, no profiler, no instrumentation);
* a phase table from one instrumented forward: each phase (router, quantise, index, permute,
  grouped GEMMs, SiLU-mul-quant, shared GEMMs, combine, ...) with its span on the GPU timeline
  (CUDA events around the call: kernel time + idle gaps while the host launches), the summed
  time of its kernels (profiler) and its kernel count;
* the GEMM share: the FP8 GEMM kernels' time (profiler) over the clean layer time;
* GPU busy vs idle inside the forward (union of kernel intervals vs first-start..last-end),
  kernel / memcpy / memset counts, host syncs (stream/device syncs, item()/nonzero);
* the top kernels by CUDA time;
* decode: one replay of a ``decode_runner(max_tokens)`` graph (time, kernel count, top kernels)
  and the phase table of the same step run eagerly (kernel times are the graph's; spans are not).

    python -m moe_fp8.gemm.precompile && python benchmarks/profile_layer.py [--tokens 4096 16384]
        [--decode 128] [--mode both|torch|fused|all] [--top 12]

Runs in well under a minute on an H100 once the kernels are compiled (precompile first).
Tables go to stdout and benchmarks/results/profile_layer_<date>.md (card, date, commit).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import sys
import time
from collections import defaultdict

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS_DIR, bench, card, commit, env, markdown_table  # noqa: E402

import moe_fp8.gemm as G  # noqa: E402
import moe_fp8.layers.dispatch.local as local_dispatch  # noqa: E402
import moe_fp8.layers.moe as moe_module  # noqa: E402
import moe_fp8.layers.router as router_module  # noqa: E402
from moe_fp8.layers import MoE, MoEConfig  # noqa: E402

kEnv = "MOE_FP8_FUSED_PERMUTE"
kRouterEnv = "MOE_FP8_FUSED_ROUTER"
kOverlapEnv = "MOE_FP8_OVERLAP_SHARED"
# mode -> (fused permute, fused router, shared experts on a side stream); "fused" everything
# on, "nosync" the layer's defaults (all three on, and the layout sized by the upper bound)
kModes = {"torch": (False, False, False), "permute": (True, False, False),
          "fused": (True, True, True), "nosync": (True, True, True)}
# "nosync": fused + the layout sized by an upper bound of M_sum (LocalDispatcher's
# contiguous_rows="upper_bound"): no host read-back inside the prefill layer, a few more
# padding rows (skipped by the GEMMs, quantised by the SiLU op)
kUpperBoundModes = {"nosync"}
kGemmKernel = "fp8_gemm_kernel"  # the grouped and dense FP8 GEMMs (the GEMM share)
kSyncCalls = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
              "cuStreamSynchronize", "cuCtxSynchronize", "cuEventSynchronize"}
kSyncOps = {"aten::_local_scalar_dense", "aten::nonzero"}  # ops that read the device back
kLayerLabel = "moe_layer"
kActivities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]

# (module, attribute, phase label): the functions the layer calls, wrapped while profiling
kPhases = [
    (router_module, "gate_logits", "router: logits (x.float + fp32 GEMM)"),
    (router_module, "route", "router: select (sigmoid, top-k, weights, counts)"),
    (moe_module, "quantize_tokens", "quantise x (1x128)"),
    (local_dispatch, "local_expert_ids", "index: local ids"),
    (local_dispatch, "contiguous_index", "index: contiguous_index"),
    (local_dispatch, "masked_index", "index: masked_index"),
    (local_dispatch, "permute_contiguous", "permute"),
    (local_dispatch, "permute_masked", "permute"),
    (local_dispatch, "combine_index_contiguous", "index: combine index"),
    (local_dispatch, "combine_index_masked", "index: combine index"),
    (local_dispatch, "unpermute_combine", "combine"),
    (G, "m_grouped_fp8_gemm_nt_contiguous", "GEMM grouped (contiguous)"),
    (G, "m_grouped_fp8_gemm_nt_masked", "GEMM grouped (masked)"),
    (G, "fp8_gemm_nt", "GEMM dense (shared expert)"),
    (G, "silu_and_mul_quant_fp8", "SiLU-mul-quant"),
]


@contextlib.contextmanager
def fused_mode(mode: str, moe: MoE):
    """``mode`` in kModes: the three switches set (and the layout's row count for "nosync"),
    restored after."""
    names = (kEnv, kRouterEnv, kOverlapEnv)
    rows = moe.dispatcher.contiguous_rows
    moe.dispatcher.contiguous_rows = "upper_bound" if mode in kUpperBoundModes else "exact"
    try:
        with env(**{name: "1" if on else "0" for name, on in zip(names, kModes[mode])}):
            yield
    finally:
        moe.dispatcher.contiguous_rows = rows


class Phases:
    """Wraps the layer's functions: a record_function range and two CUDA events per call."""

    def __init__(self, moe: MoE):
        self.moe, self.spans, self.saved = moe, [], []

    def _wrap(self, fn, label):
        def wrapped(*args, **kwargs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with record_function(label):
                start.record()
                result = fn(*args, **kwargs)
                end.record()
            self.spans.append((label, start, end))
            return result
        return wrapped

    def __enter__(self):
        for module, name, label in kPhases:
            if hasattr(module, name):
                original = getattr(module, name)
                self.saved.append((module, name, original))
                setattr(module, name, self._wrap(original, label))
        return self

    def __exit__(self, *exc):
        for obj, name, original in reversed(self.saved):
            setattr(obj, name, original)
        self.saved.clear()

    def span_us(self) -> dict:
        """label -> (calls, microseconds on the GPU timeline); call after a synchronize."""
        totals = defaultdict(lambda: [0, 0.0])
        for label, start, end in self.spans:
            totals[label][0] += 1
            totals[label][1] += start.elapsed_time(end) * 1e3
        return totals


def _subtree(event):
    yield event
    for child in event.cpu_children:
        yield from _subtree(child)


def _is_device(event) -> bool:
    return event.device_type == DeviceType.CUDA and not getattr(event, "is_user_annotation", False)


def analyse(prof, labels) -> dict:
    """Kernel statistics of the profiled region (inside the kLayerLabel range)."""
    events = list(prof.events())
    layer = [e for e in events if e.name == kLayerLabel and e.device_type == DeviceType.CPU]
    if not layer:
        raise RuntimeError("the profiled region lost its record_function label")
    window = layer[0].time_range
    device = [e for e in events if _is_device(e) and e.name not in labels | {kLayerLabel}]
    kernels = [e for e in device if not e.name.startswith(("Memcpy", "Memset"))]
    # phase -> [kernel us, kernel count] from the record_function subtrees (launch correlation)
    per_phase = defaultdict(lambda: [0.0, 0])
    for e in events:
        if e.device_type == DeviceType.CPU and e.name in labels:
            for node in _subtree(e):
                for k in node.kernels:
                    per_phase[e.name][0] += k.duration
                    per_phase[e.name][1] += 1
    # GPU busy time: union of device intervals; idle: the rest of first-start..last-end
    intervals = sorted((e.time_range.start, e.time_range.end) for e in device)
    busy, cursor = 0.0, None
    for start, end in intervals:
        if cursor is None or start > cursor:
            busy += end - start
            cursor = end
        elif end > cursor:
            busy += end - cursor
            cursor = end
    span = (intervals[-1][1] - intervals[0][0]) if intervals else 0.0
    inside = [e for e in events if e.device_type == DeviceType.CPU
              and window.start <= e.time_range.start <= window.end]
    by_name = defaultdict(lambda: [0, 0.0])
    for e in kernels:
        by_name[e.name][0] += 1
        by_name[e.name][1] += e.time_range.elapsed_us()
    return {
        "kernels": len(kernels),
        "memcpy": sum(e.name.startswith("Memcpy") for e in device),
        "memset": sum(e.name.startswith("Memset") for e in device),
        "kernel_us": sum(e.time_range.elapsed_us() for e in kernels),
        "busy_us": busy, "span_us": span,
        "syncs": sum(e.name in kSyncCalls for e in inside),
        "sync_ops": sum(e.name in kSyncOps for e in inside),
        "launches": sum(e.name in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel",
                                   "cuLaunchKernelEx", "cudaGraphLaunch") for e in inside),
        "per_phase": per_phase,
        "by_name": by_name,
        "timeline": sorted((e.time_range.start, e.time_range.end, e.name,
                            getattr(e, "device_resource_id", -1)) for e in kernels),
    }


def timeline_table(stats: dict):
    """The kernels of one run in start order: start and end from the first kernel's start, the
    stream, and the gap to the latest end before it (what the critical path waits on). Under
    programmatic dependent launch a kernel starts before its predecessor ends and waits inside:
    read its start as its launch, its end as its finish."""
    rows = stats["timeline"]
    if not rows:
        return []
    t0, latest = rows[0][0], rows[0][0]
    table = []
    for start, end, name, stream in rows:
        table.append({"start_us": round(start - t0, 1), "end_us": round(end - t0, 1),
                      "us": round(end - start, 1), "gap_us": round(start - latest, 1),
                      "stream": stream, "kernel": short(name, 60)})
        latest = max(latest, end)
    return table


def short(name: str, width: int = 70) -> str:
    name = name.replace("void ", "").replace("moe_fp8::", "")
    return name if len(name) <= width else name[:width - 3] + "..."


def top_table(stats: dict, top: int, total_us: float):
    rows = sorted(stats["by_name"].items(), key=lambda kv: -kv[1][1])[:top]
    return [{"kernel": short(n), "calls": c, "us": us, "% of kernel time": 100 * us / max(total_us, 1e-9)}
            for n, (c, us) in rows]


def phase_table(phases: Phases, stats: dict, layer_us: float):
    spans = phases.span_us()
    rows = []
    for label in sorted(set(spans) | set(stats["per_phase"]), key=lambda l: -spans.get(l, [0, 0])[1]):
        calls, span = spans.get(label, (0, 0.0))
        kernel_us, count = stats["per_phase"].get(label, (0.0, 0))
        rows.append({"phase": label, "calls": calls, "gpu span us": span, "kernel us": kernel_us,
                     "% of layer": 100 * span / layer_us, "kernels": count})
    rest = layer_us - sum(r["gpu span us"] for r in rows)
    rows.append({"phase": "(between phases: host launches, small ops)", "calls": 0,
                 "gpu span us": rest, "kernel us": float("nan"),
                 "% of layer": 100 * rest / layer_us, "kernels": 0})
    return rows


def gemm_us(stats: dict) -> float:
    return sum(us for name, (_, us) in stats["by_name"].items() if kGemmKernel in name)


def summary_line(title, clean_us, stats, instrumented_us) -> str:
    idle = stats["span_us"] - stats["busy_us"]
    gemm = gemm_us(stats)
    return (f"{title}: layer {clean_us:.0f} us clean (median, L2 flushed), GEMM kernels "
            f"{gemm:.0f} us = {100 * gemm / max(clean_us, 1e-9):.0f} % of it, other kernels "
            f"{stats['kernel_us'] - gemm:.0f} us; {instrumented_us:.0f} us "
            f"instrumented; kernels {stats['kernels']} (+{stats['memcpy']} memcpy, "
            f"{stats['memset']} memset), host launches {stats['launches']}, host syncs "
            f"{stats['syncs']} (+{stats['sync_ops']} item/nonzero ops); GPU busy "
            f"{stats['busy_us']:.0f} us of {stats['span_us']:.0f} us ({idle:.0f} us idle)")


@torch.no_grad()
def profile_prefill(moe: MoE, tokens: int, top: int, repeats: int):
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    x = torch.randn(tokens, moe.cfg.hidden_size, generator=gen, device="cuda").bfloat16()
    y = moe(x)  # warm-up: compile/load kernels, allocator
    clean_us = bench(lambda: moe(x), warmup=1, repeats=repeats)
    labels = {label for _, _, label in kPhases}
    torch.cuda.synchronize()
    with Phases(moe) as phases:
        with profile(activities=kActivities) as prof:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with record_function(kLayerLabel):
                start.record()
                moe(x)
                end.record()
            torch.cuda.synchronize()
        instrumented_us = start.elapsed_time(end) * 1e3
    stats = analyse(prof, labels)
    return y, clean_us, instrumented_us, stats, phases


@torch.no_grad()
def profile_decode(moe: MoE, tokens: int, top: int, repeats: int, runner_tokens: int = 0):
    run = moe.decode_runner(max_tokens=max(tokens, runner_tokens))
    # seeded: the torch and fused runs are compared on the same input
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    x = torch.randn(tokens, moe.cfg.hidden_size, generator=gen, device="cuda").bfloat16()
    y = run(x).clone()
    replay_us = bench(lambda: run(x), warmup=3, repeats=max(repeats, 20))
    torch.cuda.synchronize()
    with profile(activities=kActivities) as prof:
        with record_function(kLayerLabel):
            run(x)
        torch.cuda.synchronize()
    graph_stats = analyse(prof, set())
    labels = {label for _, _, label in kPhases}
    with Phases(moe) as phases:
        with profile(activities=kActivities) as prof:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with record_function(kLayerLabel):
                start.record()
                run._step()  # the captured step, eager, on the same static buffers
                end.record()
            torch.cuda.synchronize()
        eager_us = start.elapsed_time(end) * 1e3
    eager_stats = analyse(prof, labels)
    return y, replay_us, graph_stats, eager_us, eager_stats, phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="*", default=[4096, 16384],
                        help="prefill token counts (none: decode only)")
    parser.add_argument("--decode", type=int, default=128, help="decode batch (0: skip decode)")
    parser.add_argument("--runner", type=int, default=0,
                        help="decode runner capacity (max_tokens), when larger than --decode: a "
                             "serving-style runner replayed with fewer tokens")
    parser.add_argument("--mode", choices=("both", "torch", "fused", "permute", "nosync", "all"),
                        default="both",
                        help="both: torch and fused; all: torch, permute (fused permute only), "
                             "fused and nosync (fused, no M_sum read-back)")
    parser.add_argument("--experts", type=int, default=32, help="experts on this GPU")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_layer.py needs a CUDA GPU")
    t0 = time.perf_counter()
    cfg = MoEConfig.deepseek_v3(num_experts=args.experts)
    moe = MoE(cfg, device="cuda", seed=0)
    print(f"{card()}: layer built in {time.perf_counter() - t0:.1f} s", flush=True)
    modes = {"both": ("torch", "fused"), "all": ("torch", "fused", "nosync", "permute")}.get(args.mode,
                                                                                 (args.mode,))
    out = [f"# profile_layer\n\ncard: {card()} · torch {torch.__version__} · date "
           f"{datetime.date.today().isoformat()} · commit {commit()} · {args.experts} experts, "
           f"H {cfg.hidden_size}, I {cfg.moe_intermediate_size}, top-{cfg.top_k}\n"]
    reference = {}
    for tokens in args.tokens:
        for mode in modes:
            title = f"prefill T={tokens}, {mode} mode"
            with fused_mode(mode, moe):
                y, clean_us, inst_us, stats, phases = profile_prefill(moe, tokens, args.top,
                                                                      args.repeats)
            check = ""
            if tokens in reference:
                check = f"; vs torch path: calc_diff {G.calc_diff(y, reference[tokens]):.2e}, " \
                        f"{int((y != reference[tokens]).sum())} elements differ"
            else:
                reference[tokens] = y
            out.append(f"## {title}\n\n{summary_line(title, clean_us, stats, inst_us)}{check}\n\n"
                       + markdown_table(phase_table(phases, stats, inst_us)) + "\n\n"
                       + markdown_table(top_table(stats, args.top, stats["kernel_us"])) + "\n")
            print(out[-1], flush=True)
            torch.cuda.empty_cache()
    reference.clear()
    if args.decode:
        for mode in modes:
            title = f"decode graph n={args.decode}" + (
                f" (runner {args.runner})" if args.runner > args.decode else "") + f", {mode} mode"
            with fused_mode(mode, moe):
                y, replay_us, graph_stats, eager_us, eager_stats, phases = profile_decode(
                    moe, args.decode, args.top, args.repeats, args.runner)
            check = ""
            if "decode" in reference:
                check = f"; vs torch path: calc_diff {G.calc_diff(y, reference['decode']):.2e}"
            else:
                reference["decode"] = y
            out.append(f"## {title}\n\n{summary_line(title, replay_us, graph_stats, replay_us)}"
                       f"{check}\n\n"
                       + markdown_table(top_table(graph_stats, args.top, graph_stats["kernel_us"]))
                       + "\n\nthe replay's timeline (not L2-flushed):\n\n"
                       + markdown_table(timeline_table(graph_stats))
                       + f"\n\nthe same step eagerly (phase spans include launch gaps that the graph "
                       f"removes): {eager_us:.0f} us\n\n"
                       + markdown_table(phase_table(phases, eager_stats, eager_us)) + "\n")
            print(out[-1], flush=True)
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"profile_layer_{datetime.date.today().isoformat()}.md")
    with open(path, "w") as f:
        f.write("\n".join(out))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], os.path.basename(path)), "w") as f:
            f.write("\n".join(out))
    print(f"total {time.perf_counter() - t0:.1f} s; written {path}")


if __name__ == "__main__":
    main()
