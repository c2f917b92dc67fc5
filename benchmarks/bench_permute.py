"""The fused permute / index / combine kernels (include/permute.cuh) vs the torch path, same run.

DeepSeek-V3 shapes on one GPU holding 32 experts (H 7168, top-8, uniform random routing):
prefill T = 4096 and 16384 (contiguous layout), decode T = 128 (masked layout, M_max = 128).

Rows (each timed with MOE_FP8_FUSED_PERMUTE=0 and =1 on the same inputs):
* ``contiguous_index``  the layout metadata, exact M_sum (one host sync in both paths).
* ``masked_index``      decode metadata (no sync).
* ``permute_contiguous`` gather of fp8 rows + 1x128 scales (+ row_token/row_slot).
* ``permute_masked``    scatter into the masked buffers.
* ``combine``           weighted sum of each token's k bf16 rows + the shared-expert add.
* ``dispatch`` / ``dispatch_masked``: LocalDispatcher end to end after quantisation (local ids,
  index, permute, combine index) — what the layer runs.

GB/s counts the bytes the op must move once (reads + writes of its inputs and outputs, the
gathered source counted once per destination row); ``% of copy`` is against the device-to-device
copy ceiling measured in the same run. Timings: CUDA events, medians, L2 flushed.

    python benchmarks/bench_permute.py [--quick] [--repeats N]

Results: benchmarks/results/bench_permute_<date>.md/.csv (card, date, commit); table printed last.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench, copy_bandwidth_gbs, geomean, markdown_table, write_results  # noqa: E402

import moe_fp8.gemm as G  # noqa: E402
from moe_fp8.layers import layouts as L  # noqa: E402
from moe_fp8.layers import permute as PM  # noqa: E402
from moe_fp8.layers.dispatch import LocalDispatcher  # noqa: E402

kEnv = "MOE_FP8_FUSED_PERMUTE"
kHidden, kTopK, kExperts = 7168, 8, 32
FP8 = torch.float8_e4m3fn


def set_fused(on: bool) -> None:
    os.environ[kEnv] = "1" if on else "0"


def routing(tokens: int, seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    scores = torch.rand(tokens, kExperts, generator=gen, device="cuda")
    topk_idx = scores.topk(kTopK, dim=-1).indices  # int64 [T, k], distinct experts
    topk_weights = torch.rand(tokens, kTopK, generator=gen, device="cuda") * 2.5
    return topk_idx, topk_weights


def tokens_fp8(tokens: int, seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(tokens, kHidden, generator=gen, device="cuda").bfloat16()
    return G.per_token_group_quant_fp8(x, 128)


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        if a.dtype in (FP8,):
            a, b = a.view(torch.uint8), b.view(torch.uint8)
        return a.shape == b.shape and bool(torch.equal(a, b))
    return a == b


def compare(name, fn, nbytes, repeats, copy_gbs, check=None, snapshot=lambda result: result):
    """Time fn under both settings; returns a table row (and checks the outputs agree).
    ``snapshot`` copies a result that the next call would overwrite (static output buffers)."""
    set_fused(False)
    expected = snapshot(fn())
    torch_us = bench(fn, repeats=repeats)
    set_fused(True)
    actual = snapshot(fn())
    fused_us = bench(fn, repeats=repeats)
    set_fused(False)
    verdict = check(actual, expected) if check else "-"
    return {"op": name[0], "shape": name[1], "MB": nbytes / 1e6, "torch_us": torch_us,
            "torch_GB/s": nbytes / torch_us / 1e3, "fused_us": fused_us,
            "fused_GB/s": nbytes / fused_us / 1e3,
            "% of copy": 100 * nbytes / fused_us / 1e3 / copy_gbs,
            "speedup": torch_us / fused_us, "check": verdict}


def check_fields(fields):
    def check(actual, expected):
        bad = [f for f in fields if not same(getattr(actual, f) if not isinstance(f, int) else actual[f],
                                             getattr(expected, f) if not isinstance(f, int) else expected[f])]
        return "exact" if not bad else "DIFF " + ",".join(map(str, bad))
    return check


def check_close(actual, expected):
    differ = int((actual != expected).sum())
    return f"calc_diff {G.calc_diff(actual, expected):.1e}, {differ} differ"


def prefill_rows(tokens: int, repeats: int, copy_gbs: float):
    topk_idx, topk_weights = routing(tokens, seed=tokens)
    xq, xs = tokens_fp8(tokens, seed=tokens)
    ids = L.local_expert_ids(topk_idx, 0, kExperts)
    set_fused(False)
    index = L.contiguous_index(ids, kExperts)
    rows, pairs, groups = index.num_rows, ids.numel(), kHidden // 128
    shape = f"T={tokens} rows={rows}"
    out = []
    out.append(compare(("contiguous_index", shape), lambda: L.contiguous_index(ids, kExperts),
                       pairs * 8 + rows * 12 + pairs * 9, repeats, copy_gbs,
                       check_fields(["m_indices", "row_pair", "pair_row", "pair_kept",
                                     "tokens_per_expert", "num_rows"])))
    permute_bytes = 2 * rows * kHidden + 2 * rows * groups * 4 + rows * 24
    out.append(compare(("permute_contiguous", shape),
                       lambda: PM.permute_contiguous(xq, xs, index, kTopK), permute_bytes,
                       repeats, copy_gbs, check_fields([0, 1, 2, 3])))
    combine = PM.combine_index_contiguous(index, topk_weights)
    gen = torch.Generator(device="cuda").manual_seed(1)
    y_rows = torch.randn(rows, kHidden, generator=gen, device="cuda").bfloat16()
    shared = torch.randn(tokens, kHidden, generator=gen, device="cuda").bfloat16()
    combine_bytes = 2 * kHidden * (pairs + 2 * tokens) + pairs * 12
    out.append(compare(("combine (+shared add)", shape),
                       lambda: PM.unpermute_combine(y_rows, combine, add=shared), combine_bytes,
                       repeats, copy_gbs, check_close))
    dispatcher = LocalDispatcher(kExperts, kHidden, kTopK)
    out.append(compare(("dispatch (ids+index+permute)", shape),
                       lambda: dispatcher.dispatch_contiguous((xq, xs), topk_idx, topk_weights)[0],
                       permute_bytes, repeats, copy_gbs,
                       check_fields(["a", "sa", "m_indices", "row_token", "row_slot"])))
    return out


def decode_rows(tokens: int, repeats: int, copy_gbs: float):
    topk_idx, topk_weights = routing(tokens, seed=7 + tokens)
    xq, xs = tokens_fp8(tokens, seed=7 + tokens)
    m_max = tokens
    ids = L.local_expert_ids(topk_idx, 0, kExperts)
    pairs, groups = ids.numel(), kHidden // 128
    shape = f"T={tokens} M_max={m_max}"
    out = []
    out.append(compare(("masked_index", shape), lambda: L.masked_index(ids, kExperts, m_max),
                       pairs * 8 * 4, repeats, copy_gbs,
                       check_fields(["masked_m", "pair_expert", "pair_rank", "pair_kept",
                                     "num_overflow"])))
    set_fused(False)
    index = L.masked_index(ids, kExperts, m_max)
    bufs = L.MaskedBuffers.allocate(kExperts, m_max, kHidden, "cuda")
    permute_bytes = 2 * pairs * kHidden + 2 * pairs * groups * 4 + pairs * 32

    def permute():
        return PM.permute_masked(xq, xs, index, kTopK, bufs.a, bufs.sa)

    def permute_snapshot(result):  # the rows are written into bufs: keep a copy with the metadata
        return (*result, bufs.a[:kExperts].clone(), bufs.sa[:kExperts].clone())
    out.append(compare(("permute_masked", shape), permute, permute_bytes, repeats, copy_gbs,
                       check_fields([0, 1, 2, 3]), snapshot=permute_snapshot))
    combine = PM.combine_index_masked(index, topk_weights, m_max)
    gen = torch.Generator(device="cuda").manual_seed(2)
    y_rows = torch.randn(kExperts * m_max, kHidden, generator=gen, device="cuda").bfloat16()
    shared = torch.randn(tokens, kHidden, generator=gen, device="cuda").bfloat16()
    result = torch.empty(tokens, kHidden, dtype=torch.bfloat16, device="cuda")
    out.append(compare(("combine masked (+shared add)", shape),
                       lambda: PM.unpermute_combine(y_rows, combine, add=shared, out=result),
                       2 * kHidden * (pairs + 2 * tokens) + pairs * 12, repeats, copy_gbs,
                       check_close, snapshot=torch.clone))
    dispatcher = LocalDispatcher(kExperts, kHidden, kTopK)
    out.append(compare(("dispatch_masked (ids+index+permute)", shape),
                       lambda: dispatcher.dispatch_masked((xq, xs), topk_idx, topk_weights,
                                                          max_tokens_per_expert=m_max,
                                                          out=bufs)[0].masked_m,
                       permute_bytes, repeats, copy_gbs, lambda a, b: "exact" if same(a, b) else "DIFF"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="prefill T = 4096 only")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_permute.py needs a CUDA GPU")
    copy_gbs = copy_bandwidth_gbs()
    print(f"copy bandwidth {copy_gbs:.0f} GB/s", flush=True)
    rows = []
    for tokens in ((4096,) if args.quick else (4096, 16384)):
        rows += prefill_rows(tokens, args.repeats, copy_gbs)
        print(markdown_table(rows[-4:]), flush=True)
    rows += decode_rows(128, args.repeats, copy_gbs)
    summary = (f"copy ceiling (device-to-device copy, read + write): {copy_gbs:.0f} GB/s. "
               f"Speed-up geomean fused vs torch: {geomean([r['speedup'] for r in rows]):.2f}x. "
               "Check: 'exact' = bit-identical outputs; combine: calc_diff / differing elements "
               "vs the torch path (summation order of cuBLAS's baddbmm, <= 1 bf16 ulp).")
    write_results("bench_permute", rows, summary)


if __name__ == "__main__":
    main()
