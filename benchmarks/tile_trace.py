"""Where a streaming GEMM's time goes, tile by tile (GPU only; seconds).

Builds the GEMM instances with ``include/tile_trace.cuh`` compiled in (``MOE_FP8_TILE_TRACE``),
runs each case once per repeat after an L2 flush, and reads back per-tile %globaltimer stamps:
when the producer got K block 0's slot, when that slot landed, when the last wgmma group retired,
when the epilogue was issued. Printed per case (medians over repeats):

* span: first stamp to last epilogue (the kernel without launch and prologue);
* fill: the first tile's slot acquired -> its first K block landed (DRAM latency + TMA);
* tile: slot 0 acquired -> last group retired, and the stream rate of one SM over it;
* tail: the spread of the CTAs' last epilogues (idle SMs at the end);
* streaming: the SMs with a tile in flight per microsecond bin of the span.

    python benchmarks/tile_trace.py [--repeats 5] [--tiles 32]
"""
from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from bench_grouped import _act, _rand  # noqa: E402
from bench_gemm import make_inputs  # noqa: E402

from moe_fp8.gemm import reference as ref  # noqa: E402
from moe_fp8.gemm.heuristics import dense_config, masked_config, num_sms  # noqa: E402
from moe_fp8.gemm.kernels import fp8_gemm as K  # noqa: E402

kFields = 8
kGlobal = "moe_fp8_tile_trace"


def masked_case(experts, active, rows, n, k, gen):
    """A masked GEMM of ``active`` of ``experts`` experts x ``rows`` rows: (config, bytes, run)."""
    x, w = _rand((experts, 128, k), gen), _rand((experts, n, k), gen)
    qa, sa = _act(x)
    qb, sb = ref.per_block_quant(w)
    masked_m = torch.tensor([rows] * active + [0] * (experts - active), dtype=torch.int32,
                            device="cuda")
    d = torch.empty(experts, 128, n, dtype=torch.bfloat16, device="cuda")
    cfg = masked_config(experts, rows, n, k, num_sms(torch.cuda.current_device()))
    run = lambda: K.m_grouped_masked(qa, sa, qb, sb, masked_m, rows, d, cfg)  # noqa: E731
    return cfg, active * n * k, run


def dense_case(m, n, k):
    """A dense GEMM ``m x n x k``: (config, bytes of B, run)."""
    qa, sa, qb, sb = make_inputs(m, n, k)
    d = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
    cfg = dense_config(m, n, k, num_sms(torch.cuda.current_device()))
    return cfg, n * k, lambda: K.fp8_gemm_nt(qa, sa, qb, sb, d, cfg)


def analyse(rec: torch.Tensor, block_n: int, k: int) -> dict:
    """Summary of one traced launch; ``rec`` [ctas, tiles, kFields] int64 on the CPU."""
    valid = rec[:, :, 2] != 0
    t0 = int(torch.where(rec[:, :, 6] != 0, rec[:, :, 6], rec[:, :, 2])[valid].min())
    end = int(rec[:, :, 5][valid].max())
    first = rec[:, 0, :][valid[:, 0]]
    fill = (first[:, 3] - first[:, 6]).float()
    tiles = rec[valid]
    stream = (tiles[:, 4] - tiles[:, 6]).float()
    epi = (tiles[:, 5] - tiles[:, 4]).float()
    per_cta_end = torch.stack([rec[c, :, 5][valid[c]].max() for c in range(rec.shape[0])
                               if valid[c].any()]).float() - t0
    stamps = torch.sort(rec[valid][:, 2:].flatten()[rec[valid][:, 2:].flatten() > 0]).values
    steps = stamps[1:] - stamps[:-1]
    bins = []
    for b in range(0, (end - t0) // 1000 + 1):
        lo, hi = t0 + 1000 * b, t0 + 1000 * (b + 1)
        bins.append(int(((tiles[:, 6] < hi) & (tiles[:, 4] > lo)).sum()))
    return {"span_us": (end - t0) / 1e3, "ctas": int(valid[:, 0].sum()),
            "tiles": int(valid.sum()), "fill_us_med": float(fill.median()) / 1e3,
            "fill_us_max": float(fill.max()) / 1e3, "tile_us_med": float(stream.median()) / 1e3,
            "tile_us_max": float(stream.max()) / 1e3,
            "sm_GBs_med": block_n * k / float(stream.median()),
            "epi_us_med": float(epi.median()) / 1e3,
            "cta_end_us_min": float(per_cta_end.min()) / 1e3,
            "cta_end_us_med": float(per_cta_end.median()) / 1e3,
            "timer_step_ns": int(steps[steps > 0].min()) if (steps > 0).any() else 0,
            "streaming_per_us": bins}


def trace_case(label, cfg, nbytes, run, n, k, layout, repeats, tiles_per_cta):
    run()  # compiles / loads the traced instance
    dev = torch.cuda.current_device()
    kernel = K._get_kernel(n, k, cfg.resolved(k), layout, dev)
    ctas = 4 * num_sms(dev)
    buffer = torch.zeros(ctas, tiles_per_cta, kFields, dtype=torch.int64, device="cuda")
    kernel.set_global(kGlobal, ctypes.c_uint64(buffer.data_ptr()))
    runs = []
    try:
        for _ in range(repeats):
            buffer.zero_()
            common.flush_l2()
            torch.cuda.synchronize()
            run()
            torch.cuda.synchronize()
            runs.append(analyse(buffer.cpu(), cfg.block_n, k))
    finally:
        kernel.set_global(kGlobal, ctypes.c_uint64(0))
    keys = [key for key in runs[0] if key != "streaming_per_us"]
    row = {"case": label, "config": f"{cfg.block_m}x{cfg.block_n}s{cfg.stages}r{cfg.a_row_chunk}"}
    row.update({key: statistics.median(r[key] for r in runs) for key in keys})
    row["GB/s"] = nbytes / row["span_us"] / 1e3
    middle = sorted(runs, key=lambda r: r["span_us"])[len(runs) // 2]
    common.print_row(row)
    print(f"  streaming SMs per us ({label}): {middle['streaming_per_us']}", flush=True)
    return row


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tiles", type=int, default=32, help="tiles recorded per CTA")
    args = parser.parse_args()
    K.extra_defines = (("MOE_FP8_TILE_TRACE", args.tiles),)
    gen = torch.Generator(device="cuda").manual_seed(11)
    rows = []
    for label, experts, active, m_rows, n, k in (
            ("down, 8 of 32 x 1 row", 32, 8, 1, 7168, 2048),
            ("gate-up, 8 of 32 x 1 row", 32, 8, 1, 4096, 7168),
            ("down, 32 of 32 x 1 row", 32, 32, 1, 7168, 2048),
            ("down, 32 of 32 x 8 rows", 32, 32, 8, 7168, 2048)):
        cfg, nbytes, run = masked_case(experts, active, m_rows, n, k, gen)
        rows.append(trace_case(label, cfg, nbytes, run, n, k, K.kLayoutMasked, args.repeats,
                               args.tiles))
    for m, n, k in ((64, 7168, 2048), (128, 4096, 7168)):
        cfg, nbytes, run = dense_case(m, n, k)
        rows.append(trace_case(f"dense {m}x{n}x{k}", cfg, nbytes, run, n, k, K.kLayoutDense,
                               args.repeats, args.tiles))
    common.write_results("tile_trace", rows, "per-tile %globaltimer stamps (include/tile_trace.cuh)"
                         ", medians over repeats; write flush before each")


if __name__ == "__main__":
    main()
