"""Training step of the routed experts: FP8 forward + backward vs a bf16 torch._grouped_mm layer.

Per shape (contiguous layout, H = 7168, I = 2048), same process, L2 flushed before each repeat:

* ``fp8``        experts_forward_fp8 + backward (dX, dW13, dW2), FP8 weight copies cached (one
                 build per optimizer step, amortised over micro-batches: not in the timing);
                 the backward's quantisations composed from measured ops (the CUDA default);
* ``fp8 fused``  the same with ``MOE_FP8_FUSED_TRAIN=1``: the fused training kernels
                 (transpose_quant.cuh, silu_backward.cuh), not yet the default on a GPU;
* ``fp8+quant``  the weight cache rebuilt every call (one micro-batch per step), composed /
                 ``fp8+quant fused`` with the fused 128x128 quantisation + transpose;
* ``fp8 fused, bf16 masters``  ``fp8 fused`` with bf16 master weights: the weight-gradient GEMMs
                 write bf16 gradients themselves (no fp32 buffer, no conversion pass);
* ``bf16``       experts_forward_torch with torch._grouped_mm and autograd, bf16 weights.

TFLOPS count the real rows only: forward 6·M·H·I (GEMM1 2·M·2I·H, GEMM2 2·M·H·I), backward 2x
that (dgrad + wgrad). Also the weight-gradient GEMM alone (k-grouped, fp32 out) at 4096 tokens
per expert, 7168 x 2048 (issue 7's target ≥ 1100 TFLOPS; published record 878–1092 on H800,
DeepGEMM PR #95). Which ops ran kernels and which fell back to the reference is listed: a
reference fallback on the GPU is orders of magnitude slower and makes the row meaningless.

    python benchmarks/bench_train.py [--repeats 10] [--quick] [--no-profile]

After the table, one FP8 fwd+bwd step of the first shape runs under torch.profiler and the GPU
kernels that take the most time are printed (where the step goes: GEMMs vs the rest).

Results: benchmarks/results/train_<date>.md/.csv (card, date, commit in the header).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench, env, geomean, write_results  # noqa: E402

import moe_fp8.gemm as G  # noqa: E402
from moe_fp8.gemm.layout import build_m_indices  # noqa: E402
from moe_fp8.layers.autograd import (Fp8WeightCache, experts_forward_fp8,  # noqa: E402
                                     experts_forward_torch, kFusedTrainEnv)

kHidden, kInter = 7168, 2048
kTarget = 1.4  # issue 7: forward + backward >= 1.4 x the bf16 layer


def shape_cases(quick: bool):
    """(label, tokens per local expert): TARGETS.md's grouped shapes + an uneven 32-expert split."""
    gen = torch.Generator().manual_seed(0)
    uneven = (torch.rand(32, generator=gen) * 2048).long()  # mean ~1024 rows per expert
    uneven[[3, 17]] = 0  # empty experts
    cases = [("4x8192", [8192] * 4), ("8x4096", [4096] * 8), ("32 uneven", uneven.tolist())]
    return cases[1:2] if quick else cases


def backends(device) -> str:
    """Which ops run a kernel on this device ('kernel') and which the reference."""
    try:
        from moe_fp8.gemm.backend import pick
    except ImportError:
        return "unknown"
    ops = {"quant": ("quant", "per_token_group_quant"), "silu": ("quant", "silu_and_mul_quant"),
           "gemm": ("fp8_gemm", "m_grouped_contiguous"), "wgrad": ("wgrad", "k_grouped_tn"),
           "w-quant-t": ("transpose_quant", "per_block_quant_transpose"),
           "tok-quant-t": ("transpose_quant", "token_transpose_quant"),
           "silu-bwd": ("silu_backward", "silu_and_mul_backward_quant")}
    parts = []
    for label, (family, name) in ops.items():
        try:
            found = pick("auto", device, family, name) is not None
        except Exception:  # noqa: BLE001 - a broken kernel module reads as "reference"
            found = False
        parts.append(f"{label}={'kernel' if found else 'ref'}")
    return " ".join(parts)


def fused_train(flag: str, fn):
    """``fn`` run with MOE_FP8_FUSED_TRAIN=flag and MOE_FP8_UNVERIFIED_KERNELS=flag (the fused
    ops' kernels are opted in while they have not been verified on a GPU; restored after)."""
    def run():
        with env(**{kFusedTrainEnv: flag, "MOE_FP8_UNVERIFIED_KERNELS": flag}):
            return fn()
    return run


def peak_extra_gib(fn) -> float:
    """Peak memory above what is allocated before ``fn()`` runs, in GiB."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def problem(counts, seed):
    """The contiguous layout of ``counts``, x and dY (bf16), fp32 master weights w13 / w2."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    experts = len(counts)
    m_indices = build_m_indices(counts, device="cuda")
    rows = m_indices.shape[0]
    x = torch.randn(rows, kHidden, device="cuda", generator=gen).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(rows, kHidden, device="cuda", generator=gen).to(torch.bfloat16)
    w13 = torch.nn.Parameter(torch.randn(experts, 2 * kInter, kHidden, device="cuda", generator=gen)
                             * kHidden ** -0.5)
    w2 = torch.nn.Parameter(torch.randn(experts, kHidden, kInter, device="cuda", generator=gen)
                            * kInter ** -0.5)
    return m_indices, x, dy, w13, w2


def layer_rows(label, counts, repeats):
    experts, real = len(counts), sum(counts)
    m_indices, x, dy, w13, w2 = problem(counts, seed=len(counts))
    w13_bf16 = torch.nn.Parameter(w13.detach().to(torch.bfloat16))
    w2_bf16 = torch.nn.Parameter(w2.detach().to(torch.bfloat16))
    cache, cache_bf16 = Fp8WeightCache(), Fp8WeightCache()
    params = (x, w13, w2, w13_bf16, w2_bf16)

    def clear():
        for p in params:
            p.grad = None

    def fp8_fwd():
        with torch.no_grad():
            experts_forward_fp8(x, m_indices, w13, w2, cache)

    def fp8_step(rebuild=False):
        clear()
        if rebuild:
            cache.clear()
        experts_forward_fp8(x, m_indices, w13, w2, cache).backward(dy)

    def fp8_bf16_masters_fwd():
        with torch.no_grad():
            experts_forward_fp8(x, m_indices, w13_bf16, w2_bf16, cache_bf16)

    def fp8_bf16_masters_step():
        clear()
        experts_forward_fp8(x, m_indices, w13_bf16, w2_bf16, cache_bf16).backward(dy)

    def bf16_fwd():
        with torch.no_grad():
            experts_forward_torch(x, m_indices, w13_bf16, w2_bf16, grouped_mm=True)

    def bf16_step():
        clear()
        experts_forward_torch(x, m_indices, w13_bf16, w2_bf16, grouped_mm=True).backward(dy)

    flops_fwd = 6 * real * kHidden * kInter
    variants = [("fp8", fused_train("0", fp8_fwd), fused_train("0", fp8_step)),
                ("fp8 fused", fused_train("1", fp8_fwd), fused_train("1", fp8_step)),
                ("fp8+quant", fused_train("0", fp8_fwd), fused_train("0", lambda: fp8_step(True))),
                ("fp8+quant fused", fused_train("1", fp8_fwd),
                 fused_train("1", lambda: fp8_step(True))),
                ("fp8 fused, bf16 masters", fused_train("1", fp8_bf16_masters_fwd),
                 fused_train("1", fp8_bf16_masters_step)),
                ("bf16", bf16_fwd, bf16_step)]
    results = []
    for name, fwd, step in variants:
        fwd_us = bench(fwd, warmup=2, repeats=repeats)
        step_us = bench(step, warmup=2, repeats=repeats)
        peak = peak_extra_gib(step)
        results.append({"shape": label, "E": experts, "rows": real, "variant": name,
                        "fwd_us": fwd_us, "fwd_bwd_us": step_us,
                        "TFLOPS": 3 * flops_fwd / (step_us * 1e-6) / 1e12, "peak_GiB": peak})
    bf16_us = results[-1]["fwd_bwd_us"]
    for row in results:
        row["speedup_vs_bf16"] = bf16_us / row["fwd_bwd_us"]
    clear()
    return results


def profile_step(counts, top: int = 16) -> None:
    """Print the GPU kernels of one FP8 fwd+bwd step, most time first (the step's breakdown),
    composed and fused (MOE_FP8_FUSED_TRAIN=0 / 1)."""
    for flag in ("0", "1"):
        fused_train(flag, lambda: _profile_step(counts, top, flag))()


def _profile_step(counts, top: int, flag: str) -> None:
    from torch.profiler import ProfilerActivity, profile
    m_indices, x, dy, w13, w2 = problem(counts, seed=5)
    cache = Fp8WeightCache()
    experts_forward_fp8(x, m_indices, w13, w2, cache).backward(dy)  # warm: kernels loaded, cache built
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        experts_forward_fp8(x, m_indices, w13, w2, cache).backward(dy)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    events.sort(key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.device_time_total for e in events)
    print(f"\nFP8 fwd+bwd step (MOE_FP8_FUSED_TRAIN={flag}), {len(counts)} experts x {counts[0]} "
          f"tokens: GPU kernel time {total / 1e3:.2f} ms")
    for e in events[:top]:
        print(f"  {e.device_time_total / 1e3:8.3f} ms  {e.count:4d}x  {e.key[:110]}")


def wgrad_row(repeats):
    """dW[e] += dY[e]^T . X[e] at 4096 tokens x 7168 x 2048 per expert, 4 experts."""
    experts, tokens, n, k = 4, 4096, kHidden, kInter
    gen = torch.Generator(device="cuda").manual_seed(3)
    dy = torch.randn(n, experts * tokens, device="cuda", generator=gen)  # [N, T] token-contiguous
    xt = torch.randn(k, experts * tokens, device="cuda", generator=gen)  # [K, T]
    a, b = G.per_token_group_quant_fp8(dy), G.per_token_group_quant_fp8(xt)
    offsets = torch.arange(0, experts + 1, device="cuda", dtype=torch.int32) * tokens
    out = torch.zeros(experts, n, k, device="cuda", dtype=torch.float32)
    us = bench(lambda: G.k_grouped_fp8_gemm_tn_contiguous(a, b, offsets, out), warmup=2, repeats=repeats)
    tflops = 2 * experts * tokens * n * k / (us * 1e-6) / 1e12
    return {"shape": f"{experts}x{tokens} tok, {n}x{k}", "us": us, "TFLOPS": tflops,
            "published_H800": "878-1092", "target": 1100}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="one shape only")
    parser.add_argument("--no-profile", action="store_true", help="skip the kernel breakdown")
    args = parser.parse_args()
    if not (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)):
        raise SystemExit("bench_train.py needs a Hopper (sm_90) GPU")
    device = torch.device("cuda")
    used = backends(device)
    print(f"backends: {used}")
    rows = []
    for label, counts in shape_cases(args.quick):
        rows += layer_rows(label, counts, args.repeats)
        print(rows[-5:])
    speedups = [r["speedup_vs_bf16"] for r in rows if r["variant"] == "fp8"]
    fused = [r["speedup_vs_bf16"] for r in rows if r["variant"] == "fp8 fused"]
    summary = (f"backends: {used}\n\ngeomean fp8 fwd+bwd speed-up vs bf16 _grouped_mm: "
               f"{geomean(speedups):.2f}x composed, {geomean(fused):.2f}x with the fused training "
               f"kernels (MOE_FP8_FUSED_TRAIN=1) (target >= {kTarget}x)")
    write_results("train", rows, summary)
    write_results("train_wgrad", [wgrad_row(args.repeats)], f"backends: {used}")
    if not args.no_profile:
        try:  # a report, never a reason to fail the benchmark
            profile_step(shape_cases(True)[0][1])
        except Exception as error:  # noqa: BLE001
            print(f"profile skipped: {error!r}")


if __name__ == "__main__":
    main()
