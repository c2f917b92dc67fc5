"""Bandwidth of the quantisation kernels (include/quant.cuh) beside a plain torch version and
the device copy ceiling, same process, medians with the L2 flushed (benchmarks/common.py).

GB/s counts every input byte read once and every output byte (fp8 values + fp32 scales)
written once; masked shapes count only the rows below masked_m. Writes
results/bench_quant_<date>.{md,csv} and prints the table last.
Usage (GPU): PYTHONPATH=$PWD python benchmarks/bench_quant.py [--repeats N]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from moe_fp8.gemm import reference as ref  # noqa: E402
from moe_fp8.gemm.kernels import quant  # noqa: E402
from moe_fp8.gemm.layout import empty_act_scales  # noqa: E402

FP8 = torch.float8_e4m3fn
_git_commit = common.commit
common.commit = lambda: os.environ.get("MOE_FP8_COMMIT") or _git_commit()  # no .git on the device


def torch_per_token(x):
    return ref.per_token_group_quant(x, 128, False)


def torch_silu(h):
    gate, up = h.float().chunk(2, dim=-1)
    return ref.per_token_group_quant(F.silu(gate) * up, 128, False)


def case_per_token(m, k, dtype=torch.bfloat16):
    x = torch.randn(m, k, device="cuda").to(dtype)
    q = torch.empty(m, k, dtype=FP8, device="cuda")
    s = empty_act_scales(m, k // 128, device="cuda")
    nbytes = x.numel() * x.element_size() + q.numel() + m * (k // 128) * 4
    return (f"per_token_group_quant {str(dtype)[6:]}", f"M={m} K={k}", nbytes,
            lambda: quant.per_token_group_quant(x, q, s, 128, False), lambda: torch_per_token(x))


def case_per_block(e, n, k):
    w = torch.randn(e, n, k, device="cuda").to(torch.bfloat16)
    q = torch.empty_like(w, dtype=FP8)
    s = torch.empty(e, -(-n // 128), k // 128, device="cuda")
    nbytes = w.numel() * 2 + q.numel() + s.numel() * 4
    return ("per_block_quant bf16", f"E={e} N={n} K={k}", nbytes,
            lambda: quant.per_block_quant(w, q, s, 128, False),
            lambda: ref.per_block_quant(w, 128, False))


def case_silu(m, inter):
    h = torch.randn(m, 2 * inter, device="cuda").to(torch.bfloat16)
    q = torch.empty(m, inter, dtype=FP8, device="cuda")
    s = empty_act_scales(m, inter // 128, device="cuda")
    nbytes = h.numel() * 2 + q.numel() + s.numel() * 4
    return ("silu_and_mul_quant", f"M={m} I={inter}", nbytes,
            lambda: quant.silu_and_mul_quant(h, q, s, None, 128, False), lambda: torch_silu(h))


def case_silu_masked(e, m_max, inter, mean_m):
    h = torch.randn(e, m_max, 2 * inter, device="cuda").to(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    counts = torch.randint(0, 2 * mean_m + 1, (e,), generator=gen).clamp(max=m_max)
    masked_m = counts.to(torch.int32).cuda()
    q = torch.empty(e, m_max, inter, dtype=FP8, device="cuda")
    s = empty_act_scales(m_max, inter // 128, e, device="cuda")
    rows = int(counts.sum())
    nbytes = rows * (2 * inter * 2 + inter + inter // 128 * 4)
    return ("silu_and_mul_quant masked", f"E={e} M_max={m_max} I={inter} rows={rows}", nbytes,
            lambda: quant.silu_and_mul_quant(h, q, s, masked_m, 128, False),
            lambda: torch_silu(h))  # torch has no masked form: it does every row


def cases():
    yield case_per_token(16384, 7168)
    yield case_per_token(16384, 7168, torch.float32)
    yield case_per_token(4096, 7168)
    yield case_per_token(128, 7168)  # decode
    yield case_silu(16384, 2048)
    yield case_silu(4096, 2048)
    yield case_silu(128, 2048)  # decode
    yield case_silu_masked(32, 256, 2048, 32)  # decode, 32 local experts
    yield case_per_block(8, 7168, 2048)
    yield case_per_block(1, 4096, 7168)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    ceiling = common.copy_bandwidth_gbs()
    rows = []
    for name, shape, nbytes, kernel_fn, torch_fn in cases():
        kernel_us = common.bench(kernel_fn, repeats=args.repeats)
        torch_us = common.bench(torch_fn, repeats=max(args.repeats // 3, 5))
        gbs = nbytes / (kernel_us * 1e-6) / 1e9
        rows.append({"kernel": name, "shape": shape, "MB": nbytes / 1e6, "us": kernel_us,
                     "GB/s": gbs, "% of copy": 100 * gbs / ceiling, "torch us": torch_us,
                     "torch GB/s": nbytes / (torch_us * 1e-6) / 1e9,
                     "speedup": torch_us / kernel_us})
    summary = (f"copy ceiling (device-to-device copy of 2 GiB, read + write): {ceiling:.0f} GB/s. "
               f"Target: >= 85 % of it at M=16384, K=7168.")
    common.write_results("bench_quant", rows, summary)


if __name__ == "__main__":
    main()
