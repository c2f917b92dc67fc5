"""Ablation copies of the GEMM include tree for ``gemm_ab.py`` (experiments only, wrong results).

    python benchmarks/ab_variants.py OUT_DIR     # writes OUT_DIR/{nopromo,noload,noepi,nofence}/

* ``nopromo``: the promotion FFMAs are left out (one element kept so the partials stay live):
  the time left is loads + MMA + issue; the difference to the real kernel is what promotion costs.
* ``noload``: after the first kStages slots the producer stops issuing TMA and only arrives on
  the full barrier, so the MMAs re-read stale shared memory: the time left is MMA + promotion +
  issue with no L2/HBM traffic (cluster_m = 1 configs only).
* ``noepi``: no epilogue (the output is never written; the accumulators stay live): what
  the per-tile store costs.
* ``nofence``: without the wgmma fence that follows each group's commit.
Each patch asserts that the text it replaces is still there.
"""
import pathlib
import re
import shutil
import sys

kInclude = pathlib.Path(__file__).resolve().parent.parent / "moe_fp8" / "gemm" / "include"

kPromotion = """            r_acc[4 * j + 0] += p[4 * j + 0] * scale_lo;
            r_acc[4 * j + 1] += p[4 * j + 1] * scale_lo;
            r_acc[4 * j + 2] += p[4 * j + 2] * scale_hi;
            r_acc[4 * j + 3] += p[4 * j + 3] * scale_hi;"""
kNoPromotion = """            if (j == 0) r_acc[0] += p[0] * scale_lo + p[kAcc - 1] * scale_hi;"""

kEpilogue = "      P::Epilogue::write_tile(r_acc, s_d_wg, tma_d, tile, params, warpgroup, tid, bar_id);"
kFence = """// keeps the commit ahead of them (ablation `nofence` in benchmarks/ab_variants.py).
ptx::wgmma_fence();"""

# noepi keeps the promotion alive (a dead accumulator would let the compiler drop the FFMAs).
kKeepAccumulatorsLive = """      float live = 0.f;
#pragma unroll
      for (int i = 0; i < kAcc; ++i) live += r_acc[i];
      if (live == 1.2345e-37f) s_d_wg[tid] = 1;"""

kLoadStart = "          ptx::mbar_arrive_expect_tx(&full[stage], Layout::kStageTxBytes);"
kLoadEnd = "          if (++stage == kStages) stage = 0, phase ^= 1;"


def patch(text: str, old: str, new: str) -> str:
    """Replace ``old`` (matched line by line with any leading indentation) by ``new``."""
    pattern = "\n".join(r"[ \t]*" + re.escape(line.strip()) for line in old.split("\n"))
    found = re.findall(pattern, text)
    assert len(found) == 1, f"ablation patch target not found once: {old[:60]!r}"
    return re.sub(pattern, lambda _: new, text)


def main(out: pathlib.Path) -> None:
    core = (kInclude / "gemm_core.cuh").read_text()
    variants = {"nopromo": patch(core, kPromotion, kNoPromotion)}
    begin, end = core.index(kLoadStart), core.index(kLoadEnd)
    loads = core[begin:end]
    variants["noload"] = core[:begin] + (
        "          if (ablate_slots < kStages) {\n" + loads + "          ++ablate_slots;\n"
        "          } else {\n            ptx::mbar_arrive(&full[stage]);\n          }\n") + core[end:]
    variants["noload"] = patch(variants["noload"], "      int stage = 0;\n      u32 phase = 0;\n",
                               "      int stage = 0, ablate_slots = 0;\n      u32 phase = 0;\n")
    variants["noepi"] = patch(core, kEpilogue, kKeepAccumulatorsLive)
    variants["nofence"] = patch(core, kFence, "      // ablated: no fence after the commit")
    for name, text in variants.items():
        folder = out / name
        if folder.exists():
            shutil.rmtree(folder)
        shutil.copytree(kInclude, folder)
        (folder / "gemm_core.cuh").write_text(text)
        print(folder)


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]))
