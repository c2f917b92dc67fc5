"""Host cost of the JIT's launch path and of the eager ops built on it.

    python benchmarks/experiments/launch_overhead.py [--cpu] [--calls N] [--layer-tokens 256,4096] [--profile]

Session 29 (ep_host_profile.py) found the expert-parallel prefill host-bound: 20-75 us of host
time per JIT launch. This times, per call:
* ``Kernel.launch`` alone (a stub driver and stream on the CPU machine with ``--cpu``: only the
  Python of packing 18 arguments and building the launch config);
* on a GPU, ``Kernel.launch`` of the per-token quant kernel with its arguments made once, the
  quant op, the dense GEMM op (M 128, N 7168, K 2048: five TMA maps), the masked grouped GEMM op
  and the eager one-GPU layer (``MoE.forward``, 32 experts, ``--layer-tokens``, default 4096).
``host us``: wall time of issuing ``--calls`` calls back to back, per call (the device queue never
fills at these counts); ``device us``: the same calls' CUDA-event span, per call. An op whose host
figure exceeds its device figure keeps the GPU waiting when issued alone.
Run it once per tree to compare (``PYTHONPATH=<old tree>``): it imports moe_fp8 from the path.
NOTE: the device machine's host CPU changed speed by ~30 % from one process to the next (session
30): the two ``torch.mm`` rows (torch's own launches, the same code in every tree) are the
control. Interleave several runs per tree and compare runs whose control rows agree.
"""
import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import time
import types

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import moe_fp8  # noqa: E402
from moe_fp8.gemm.jit import driver, runtime  # noqa: E402


def host_us(fn, calls: int, rounds: int = 5) -> float:
    """Median over rounds of the per-call host wall time of ``calls`` back-to-back calls."""
    times = []
    for _ in range(rounds):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(times)


def device_us(fn, calls: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls * 1e3


def stub_launch_row() -> dict:
    """Kernel.launch with the driver and the stream stubbed: the launch path's own Python."""
    class StubDriver:
        def cuLaunchKernelEx(self, *args):
            return 0

    driver.lib = lambda: StubDriver()
    torch.cuda.current_stream = lambda *a, **k: types.SimpleNamespace(cuda_stream=0)
    if hasattr(runtime, "_current_stream_handle"):
        runtime._current_stream_handle = lambda device_index: 0
    kernel = runtime.Kernel.__new__(runtime.Kernel)
    kernel.compiled = types.SimpleNamespace(
        source=types.SimpleNamespace(instance="stub", header="quant.cuh"))
    kernel.device_index, kernel._function, kernel._smem_limit = 0, None, 1 << 20
    kernel._attrs, kernel.pdl_capable = {}, True
    kernel.param_sizes = [8] * 8 + [4] * 6 + [8] * 4
    tensors = [torch.empty(16) for _ in range(8)]
    i32, i64 = runtime.i32, runtime.i64

    def launch():  # the scalars wrapped per call, as the op wrappers do
        kernel.launch((132, 1, 1), 384, 200000, tensors + [i32(1), i32(2), i32(3), i32(4), i32(5),
                                                           i32(6), i64(7), i64(8), i64(9), i64(10)])
    return {"op": "Kernel.launch, stub driver (18 args)", "host us": host_us(launch, 20000)}


def stage_rows(moe, layer_tokens, forwards: int = 20) -> None:
    """Host us per eager forward in each stage of ``MoE.forward`` (wall clock around the stage's
    call, no profiler): where the host-bound layer spends its time. Prints one table."""
    import moe_fp8.layers.moe as moe_module
    spent = {}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - start
        return wrapper

    patches = [(moe_module, "quantize_tokens"), (moe, "_start_shared"), (moe.gate, "forward"),
               (moe.dispatcher, "dispatch_contiguous"), (moe, "_routed_rows"),
               (moe, "_join_shared"), (moe.dispatcher, "combine_contiguous")]
    saved = [(owner, name, owner.__dict__.get(name)) for owner, name in patches]
    for owner, name in patches:
        label = "gate" if owner is moe.gate else name
        setattr(owner, name, timed(label, getattr(owner, name)))
    try:
        labels = ["gate" if owner is moe.gate else name for owner, name in patches]
        print("| tokens | " + " | ".join(labels) + " | rest | forward |")
        print("|---" * (len(patches) + 3) + "|")
        for count in layer_tokens:
            device = next(moe.parameters()).device
            sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
            tokens = torch.randn(count, moe.cfg.hidden_size, device=device, dtype=torch.bfloat16)
            moe(tokens)
            sync()
            spent.clear()
            start = time.perf_counter()
            for _ in range(forwards):
                moe(tokens)
            total = time.perf_counter() - start
            sync()
            per = {label: spent.get(label, 0.0) / forwards * 1e6 for label in labels}
            rest = total / forwards * 1e6 - sum(per.values())
            print(f"| {count} | " + " | ".join(f"{per[label]:.0f}" for label in labels)
                  + f" | {rest:.0f} | {total / forwards * 1e6:.0f} |")
    finally:
        for owner, name, original in saved:
            if original is None:
                delattr(owner, name)
            else:
                setattr(owner, name, original)


def gpu_rows(calls: int, profile: bool, layer_tokens) -> list:
    from moe_fp8 import gemm
    from moe_fp8.gemm.kernels import quant
    from moe_fp8.layers import MoE, MoEConfig

    device = torch.device("cuda")
    rows = []

    def row(name, fn, n=calls):
        fn()
        torch.cuda.synchronize()
        rows.append({"op": name, "host us": host_us(fn, n), "device us": device_us(fn, n)})

    x = torch.randn(128, 7168, device=device, dtype=torch.bfloat16)
    q, s = gemm.per_token_group_quant_fp8(x)
    kernel = runtime.get_kernel(quant.per_token_source(x.dtype, 128, False))
    args = [x, q, s, runtime.i32(128), runtime.i32(7168 // 16), runtime.i32(128),
            runtime.i64(0), runtime.i64(s.stride(-2)), runtime.i64(s.stride(-1))]
    row("Kernel.launch, per-token quant (9 args)", lambda: kernel.launch(132, 128, 0, args))
    row("per_token_group_quant_fp8 op, 128 x 7168", lambda: gemm.per_token_group_quant_fp8(x))
    w = gemm.per_block_quant_fp8(torch.randn(7168, 2048, device=device, dtype=torch.bfloat16))
    a = gemm.per_token_group_quant_fp8(torch.randn(128, 2048, device=device, dtype=torch.bfloat16))
    row("fp8_gemm_nt op, 128 x 7168 x 2048", lambda: gemm.fp8_gemm_nt(a, w))
    experts, m_max = 32, 64
    wm = gemm.per_block_quant_fp8(torch.randn(experts, 4096, 7168, device=device,
                                              dtype=torch.bfloat16))
    am = gemm.per_token_group_quant_fp8(torch.randn(experts, m_max, 7168, device=device,
                                                    dtype=torch.bfloat16))
    masked_m = torch.randint(1, m_max + 1, (experts,), device=device, dtype=torch.int32)
    row("m_grouped masked op, 32 x 64 x 4096 x 7168",
        lambda: gemm.m_grouped_fp8_gemm_nt_masked(am, wm, masked_m, 16), n=max(calls // 4, 5))
    moe = MoE(MoEConfig.deepseek_v3(num_experts=32), device=device)
    # the gate GEMM of the layer's router (torch, not ours): its host cost beside ours
    gate_x = torch.randn(4096, 7168, device=device, dtype=torch.bfloat16)
    gate_w = torch.randn(32, 7168, device=device, dtype=torch.bfloat16)
    row("torch.mm bf16 -> fp32 (out_dtype), 4096 x 32 x 7168",
        lambda: torch.mm(gate_x, gate_w.t(), out_dtype=torch.float32))
    row("torch.mm bf16 -> bf16, 4096 x 32 x 7168", lambda: torch.mm(gate_x, gate_w.t()))
    with torch.no_grad():
        for count in layer_tokens:
            tokens = torch.randn(count, 7168, device=device, dtype=torch.bfloat16)
            row(f"MoE.forward eager, 32 experts, {count} tokens", lambda: moe(tokens), n=10)
        stage_rows(moe, layer_tokens)
        if profile:
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(10):
                moe(tokens)
            profiler.disable()
            torch.cuda.synchronize()
            text = io.StringIO()
            stats = pstats.Stats(profiler, stream=text)
            stats.sort_stats("tottime").print_stats(30)
            print("== MoE.forward eager, 10 calls, by own time\n" + text.getvalue())
            text = io.StringIO()
            stats.stream = text
            stats.sort_stats("cumulative").print_stats(45)
            print("== MoE.forward eager, 10 calls, by cumulative time\n" + text.getvalue())
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="the stubbed launch row only")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--layer-tokens", default="4096",
                        help="comma-separated token counts of the eager layer rows")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile of the eager layer's host time by function")
    args = parser.parse_args()
    print(f"moe_fp8 from {os.path.dirname(os.path.dirname(os.path.abspath(moe_fp8.__file__)))}; torch {torch.__version__}"
          + (f"; {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    rows = []
    if not args.cpu and torch.cuda.is_available():
        layer_tokens = [int(t) for t in args.layer_tokens.split(",")]
        rows = gpu_rows(args.calls, args.profile, layer_tokens)
    rows.append(stub_launch_row())  # last: it stubs the driver for the rest of the process
    print("| op | host us | device us |\n|---|---|---|")
    for r in rows:
        dev = f"{r['device us']:.1f}" if "device us" in r else "-"
        print(f"| {r['op']} | {r['host us']:.1f} | {dev} |")


if __name__ == "__main__":
    main()
