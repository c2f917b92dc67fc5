"""Where a small-M dense GEMM's time goes, per CTA: a probe copy of the include tree writes
%globaltimer and clock64 stamps at fixed points of every CTA into a buffer passed as the dense
layout's unused ``g_layout`` argument.

Question (session 9): 64 x 4096 x 7168 (one 64 x 32 tile per SM) takes 18 us of kernel time
for 29 MB, 1.6 TB/s, while the masked decode GEMM streams 2.8-2.9 TB/s. 16 stages instead of 10
and wider boxes (split K) did not help. Candidates: launch skew, the first TMA round trip,
stragglers (the kernel ends with its slowest CTA), or a slow steady stream.

Stamps (per CTA): 0 entry, 1 after the barrier init / PDL wait (producer thread), 2 producer's
first TMA issued, 3 first K block landed and queued (math thread 0), 4 last tile's mainloop done
(math thread 0), 5 CTA done (math thread 0), 6 producer's last TMA issued. clock64 copies in
8-14 (per-SM cycle counter: durations only), %smid in 15.

    python benchmarks/experiments/cta_timeline.py
"""
import os
import shutil
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_gemm import make_inputs  # noqa: E402
from gemm_ab import kernels_from, parse_config  # noqa: E402

from moe_fp8.gemm.heuristics import dense_config, num_sms  # noqa: E402
from moe_fp8.gemm.kernels import fp8_gemm as K  # noqa: E402

kShapes = ((64, 4096, 7168, "auto"), (64, 4096, 7168, "64x32s16c1d1"), (1, 4096, 7168, "auto"),
           (64, 7168, 2048, "auto"), (128, 4096, 7168, "auto"), (4096, 4096, 7168, "auto"))

kStamp = ("{ unsigned long long* probe_ = reinterpret_cast<unsigned long long*>("
          "const_cast<int*>(params.g_layout)) + blockIdx.x * 16; u64 t_; "
          "asm volatile(\"mov.u64 %0, %%globaltimer;\" : \"=l\"(t_)); probe_[{i}] = t_; "
          "probe_[8 + {i}] = clock64(); }")


def stamp(i: int) -> str:
    return kStamp.replace("{i}", str(i))


def patched_tree() -> str:
    """A copy of moe_fp8/gemm/include with stamps in gemm_core.cuh (fails loudly if an anchor moved)."""
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "moe_fp8", "gemm",
                       "include")
    dst = tempfile.mkdtemp(prefix="cta_timeline_")
    tree = os.path.join(dst, "include")
    shutil.copytree(src, tree)
    path = os.path.join(tree, "gemm_core.cuh")
    text = open(path).read()
    smid = ("{ unsigned s_; asm volatile(\"mov.u32 %0, %%smid;\" : \"=r\"(s_)); "
            "reinterpret_cast<unsigned long long*>(const_cast<int*>(params.g_layout))"
            "[blockIdx.x * 16 + 15] = s_; }")
    edits = [
        ("  extern __shared__ __align__(1024) unsigned char smem_raw[];",
         "  if (threadIdx.x == 0) { " + stamp(0) + " " + smid + " }\n"
         "  extern __shared__ __align__(1024) unsigned char smem_raw[];"),
        ("  pdl::begin();\n", "  pdl::begin();\n  if (threadIdx.x == kNumMathWG * 128) " + stamp(1) + "\n"),
        ("          if (++stage == kStages) stage = 0, phase ^= 1;\n        }\n      }\n",
         "          if (++stage == kStages) stage = 0, phase ^= 1;\n"
         "          if (kb == 0 && !probe_first) { probe_first = true; " + stamp(2) + " }\n"
         "        }\n      }\n      " + stamp(6) + "\n"),
        ("      int stage = 0;\n      u32 phase = 0;\n      while (scheduler.next(tile)) {",
         "      int stage = 0;\n      u32 phase = 0;\n      bool probe_first = false;\n"
         "      while (scheduler.next(tile)) {"),
        ("        if (!P::kEmptyTiles || tile.num_k_blocks > 0) issue(r_p0, r_f0, 0);\n      }\n    }\n",
         "        if (!P::kEmptyTiles || tile.num_k_blocks > 0) issue(r_p0, r_f0, 0);\n      }\n"
         "      if (threadIdx.x == 0) " + stamp(3) + "\n    }\n"),
        ("      ptx::wgmma_wait<0>();\n      if constexpr (!kColumnScales) {\n",
         "      ptx::wgmma_wait<0>();\n      if (threadIdx.x == 0) " + stamp(4) + "\n"
         "      if constexpr (!kColumnScales) {\n"),
        ("    if (tid == 0) ptx::tma_store_wait_all();\n",
         "    if (tid == 0) ptx::tma_store_wait_all();\n    if (threadIdx.x == 0) " + stamp(5) + "\n"),
    ]
    for old, new in edits:
        if text.count(old) != 1:
            raise RuntimeError(f"anchor not found exactly once in gemm_core.cuh: {old[:60]!r}")
        text = text.replace(old, new)
    open(path, "w").write(text)
    return tree


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * (len(values) - 1) + 0.5))]


def main():
    tree = patched_tree()
    sms = num_sms(torch.cuda.current_device())
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    print("| M | N | K | config | CTAs | span us | entry skew p50/max | init p50 | first data p50/p90/max "
          "| mainloop p10/p50/max | epilogue p50 | end p10/p50/max | mainloop GB/s per CTA p50 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for m, n, k, text in kShapes:
        qa, sa, qb, sb = make_inputs(m, n, k)
        config = dense_config(m, n, k, sms) if text == "auto" else parse_config(text)
        if config.split_k > 1:
            continue
        c = config.resolved(k)
        tiles = -(-m // c.block_m) * -(-n // c.block_n)
        out = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
        runs = []
        for rep in range(6):
            probe = torch.zeros(sms * 16, dtype=torch.int64, device="cuda")
            flush.zero_()
            with kernels_from(tree):
                K._launch(K.kLayoutDense, qa, K._sa_view(sa), m, qb, sb.contiguous(), out,
                          probe.view(torch.int32), m, 1, n, k, config, tiles)
            torch.cuda.synchronize()
            if rep >= 2:  # the first launches compile and warm up
                runs.append(probe.view(-1, 16).cpu())
        # the run with the median span
        spans = [(int(r[r[:, 0] > 0][:, 5].max() - r[r[:, 0] > 0][:, 0].min()), i)
                 for i, r in enumerate(runs)]
        r = runs[sorted(spans)[len(spans) // 2][1]]
        r = r[r[:, 0] > 0].double()
        t0 = r[:, 0].min()
        us = lambda col: [(v - t0) / 1e3 for v in r[:, col].tolist()]  # noqa: E731
        entry, init_, first_issue, first_data, main_end, end = us(0), us(1), us(2), us(3), us(4), us(5)
        d = lambda a, b: [y - x for x, y in zip(a, b)]  # noqa: E731
        mainloop = d(first_data, main_end)
        tile_bytes = c.block_n * k * (tiles / len(r))  # B bytes per CTA (A from L2)
        gbs = [tile_bytes / (t * 1e3) for t in mainloop if t > 0]
        print(f"| {m} | {n} | {k} | {text if text != 'auto' else 'auto ' + str(c.block_m) + 'x' + str(c.block_n)} "
              f"| {len(r)} | {max(end):.1f} | {statistics.median(entry):.2f}/{max(entry):.2f} "
              f"| {statistics.median(d(entry, init_)):.2f} "
              f"| {pct(d(first_issue, first_data), .5):.2f}/{pct(d(first_issue, first_data), .9):.2f}/"
              f"{max(d(first_issue, first_data)):.2f} "
              f"| {pct(mainloop, .1):.1f}/{pct(mainloop, .5):.1f}/{max(mainloop):.1f} "
              f"| {statistics.median(d(main_end, end)):.2f} "
              f"| {pct(end, .1):.1f}/{pct(end, .5):.1f}/{max(end):.1f} "
              f"| {statistics.median(gbs):.1f} |", flush=True)
        if os.environ.get("OUT"):
            torch.save(runs, os.path.join(os.environ["OUT"], f"cta_timeline_{m}x{n}x{k}_{text}.pt"))


if __name__ == "__main__":
    main()
