"""Is a small-M dense GEMM bound by each SM's stream rate or by the card's DRAM rate?

64 x 7168 x 16384 takes 52 us on an H100 (2.26 TB/s) with 112 tiles of 64 x 64 on 132 SMs, while
the card copies at 3.0 TB/s; the decode's masked GEMMs, on all 132 SMs, stream at 2.7-2.8 TB/s
(~21 GB/s per SM, session 16). Test: the same 64 x 64 tile (one tile per CTA, each streaming
64 x K weight bytes) over N = 1024 ... 8448 (16 ... 132 tiles, one wave) and 16896 (two waves).
If each SM's rate bounds it, the time stays flat up to 132 tiles; if the card's, it grows with N.
The stage count at N = 7168 tells whether the rate depends on the bytes in flight per SM.

    python benchmarks/experiments/per_sm_stream.py      (prints a markdown table)
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import common  # noqa: E402
from bench_gemm import make_inputs  # noqa: E402

from moe_fp8.gemm.heuristics import GemmConfig  # noqa: E402
from moe_fp8.gemm.kernels import fp8_gemm as K  # noqa: E402
from moe_fp8.gemm.kernels.fp8_gemm import kLayoutDense  # noqa: E402
from moe_fp8.gemm.precompile import precompile  # noqa: E402

kM, kK = 64, 16384
kNs = (1024, 2048, 4096, 7168, 8448, 16896)
kStagesAt7168 = (4, 6, 10)


def time_case(n: int, k: int, stages: int) -> dict:
    qa, sa, qb, sb = make_inputs(kM, n, k)
    out = torch.empty(kM, n, dtype=torch.bfloat16, device="cuda")
    config = GemmConfig(64, 64, stages=stages)
    fn = lambda: K.fp8_gemm_nt(qa, sa, qb, sb, out, config)  # noqa: E731
    us = common.kernel_us(fn, repeats=20)
    tiles = n // 64
    weight_bytes = n * k
    return {"N": n, "K": k, "stages": stages, "tiles": tiles, "kernel_us": us,
            "TB/s": weight_bytes / us / 1e6,
            "GB/s per busy SM": weight_bytes / min(tiles, 132) / us / 1e3}


def main():
    cases = [(n, kK, 10) for n in kNs] + [(7168, kK, s) for s in kStagesAt7168 if s != 10]
    cases += [(n, 2048, 10) for n in (4096, 7168, 8448)]
    # compiled in parallel first (each N is an instance of its own)
    precompile([K.kernel_source(n, k, GemmConfig(64, 64, stages=s).resolved(k), kLayoutDense)
                for n, k, s in cases], verbose=False)
    rows = [time_case(n, k, s) for n, k, s in cases]
    print(f"card: {common.card()} · commit {common.commit()}")
    print(common.markdown_table(rows))


if __name__ == "__main__":
    main()
