"""Ablation copies of the GEMM include tree for ``gemm_ab.py`` (experiments only, wrong results).

    python benchmarks/ab_variants.py OUT_DIR     # writes OUT_DIR/{nopromo,noload,noepi,nofence}/

* ``nopromo``: the promotion FFMAs are left out (one element kept so the partials stay live):
  the time left is loads + MMA + issue; the difference to the real kernel is what promotion costs.
* ``noload``: after the first kStages slots the producer stops issuing TMA and only arrives on
  the full barrier, so the MMAs re-read stale shared memory: the time left is MMA + promotion +
  issue with no L2/HBM traffic (dense, cluster_m = 1 configs only).
* ``noepi``: no epilogue (the output is never written; the accumulators stay live): what
  the per-tile store costs.
* ``nofence``: without the wgmma fence that follows each group's commit.
* ``colonefma`` / ``colnopromo`` (k-grouped weight gradients, ``experiments/wgrad_ab.py``): the
  column-scale promotion without its per-element FMUL (sa * sb; one FFMA by sb alone), or
  without any promotion: what the second scale and the whole promotion cost there.
* ``ordered``: the single-buffered loop's warpgroups take turns issuing (named barriers 3 / 4),
  so one's group runs while the other promotes (dense: measured wrong in session 6; the weight
  gradient's promotion is twice as long).
Each patch asserts that the text it replaces is still there.
"""
import pathlib
import re
import shutil
import sys

kInclude = pathlib.Path(__file__).resolve().parent.parent / "moe_fp8" / "gemm" / "include"

# The two promotion loops: a 256-wide tile's halves (acc = r_acc + half * kPart) and the
# single-block tiles (r_acc, factors s00 / s10).
kPromotionWide = """          acc[4 * j + 0] += p[4 * j + 0] * scale_lo;
          acc[4 * j + 1] += p[4 * j + 1] * scale_lo;
          acc[4 * j + 2] += p[4 * j + 2] * scale_hi;
          acc[4 * j + 3] += p[4 * j + 3] * scale_hi;"""
kNoPromotionWide = """          if (j == 0) acc[0] += p[0] * scale_lo + p[kPart - 1] * scale_hi;"""
kPromotion = """          r_acc[4 * j + 0] += p[4 * j + 0] * s00;
          r_acc[4 * j + 1] += p[4 * j + 1] * s00;
          r_acc[4 * j + 2] += p[4 * j + 2] * s10;
          r_acc[4 * j + 3] += p[4 * j + 3] * s10;"""
kNoPromotion = """          if (j == 0) r_acc[0] += p[0] * s00 + p[kAcc - 1] * s10;"""

kEpilogue = "      P::Epilogue::write_tile(r_acc, s_d_wg, tma_d, tile, params, warpgroup, tid, bar_id);"
kFence = """// keeps the commit ahead of them (ablation `nofence` in benchmarks/ab_variants.py).
ptx::wgmma_fence();"""

# noepi keeps the promotion alive (a dead accumulator would let the compiler drop the FFMAs).
kKeepAccumulatorsLive = """      float live = 0.f;
#pragma unroll
      for (int i = 0; i < kAcc; ++i) live += r_acc[i];
      if (live == 1.2345e-37f) s_d_wg[tid] = 1;"""

# The column-scale promotion (weight gradients).
kColumnPromotion = """          acc[4 * j + 0] += p[4 * j + 0] * (sa_lo * sb.x);
          acc[4 * j + 1] += p[4 * j + 1] * (sa_lo * sb.y);
          acc[4 * j + 2] += p[4 * j + 2] * (sa_hi * sb.x);
          acc[4 * j + 3] += p[4 * j + 3] * (sa_hi * sb.y);"""
kColumnOneFma = """          acc[4 * j + 0] += p[4 * j + 0] * sb.x;
          acc[4 * j + 1] += p[4 * j + 1] * sb.y;
          acc[4 * j + 2] += p[4 * j + 2] * sb.x;
          acc[4 * j + 3] += p[4 * j + 3] * sb.y;"""
kColumnNoPromotion = """          if (j == 0) acc[0] += p[0] * (sa_lo * sb.x) + p[kPart - 1] * (sa_hi * sb.y);"""

# The single-buffered K loop, and the same with turns (WG1 pre-arrives so that WG0 goes first;
# WG0 takes WG1's last arrival after the loop).
kSingleLoop = """            issue(r_p0, r_f0, kb, half);
            ptx::wgmma_wait<0>();
            retire(r_p0, r_f0, half);"""
kSingleLoopOrdered = """            if constexpr (kTurns)
              asm volatile("bar.sync %0, 256;" ::"r"(3 + warpgroup) : "memory");
            issue(r_p0, r_f0, kb, half);
            if constexpr (kTurns)
              asm volatile("bar.arrive %0, 256;" ::"r"(4 - warpgroup) : "memory");
            ptx::wgmma_wait<0>();
            retire(r_p0, r_f0, half);"""
kLoopStart = "    bool have_tile = scheduler.next(tile);"
kLoopStartOrdered = """    constexpr bool kTurns = math_warpgroups<P>() == 2;
    if (kTurns && warpgroup == 1) asm volatile("bar.arrive 3, 256;" ::: "memory");
    bool have_tile = scheduler.next(tile);"""
kLoopEnd = "    if (tid == 0) ptx::tma_store_wait_all();"
kLoopEndOrdered = """    if (kTurns && warpgroup == 0) asm volatile("bar.sync 3, 256;" ::: "memory");
    if (tid == 0) ptx::tma_store_wait_all();"""

# The main producer's wait for a free slot (the dense / grouped loop, not the scale warp's).
kSlotWait = "ptx::mbar_wait_idle(&empty[stage], phase ^ 1);  // slot released by every math warp"
kSlotWaitNoLoad = """            ptx::mbar_wait_idle(&empty[stage], phase ^ 1);
            if (ablate_slots >= kStages) {  // ablation noload: the slot keeps stale data
              ptx::mbar_arrive(&full[stage]);
              if (++stage == kStages) stage = 0, phase ^= 1;
              continue;
            }
            ++ablate_slots;"""


def patch(text: str, old: str, new: str) -> str:
    """Replace ``old`` (matched line by line with any leading indentation) by ``new``."""
    pattern = "\n".join(r"[ \t]*" + re.escape(line.strip()) for line in old.split("\n"))
    found = re.findall(pattern, text)
    assert len(found) == 1, f"ablation patch target not found once: {old[:60]!r}"
    return re.sub(pattern, lambda _: new, text)


def main(out: pathlib.Path) -> None:
    core = (kInclude / "gemm_core.cuh").read_text()
    variants = {"nopromo": patch(patch(core, kPromotion, kNoPromotion), kPromotionWide,
                                 kNoPromotionWide)}
    variants["noload"] = patch(core, kSlotWait, kSlotWaitNoLoad)
    variants["noload"] = patch(variants["noload"], "      int stage = 0;\n      u32 phase = 0;\n"
                               "      MOE_FP8_TRACE(int trace_tile = 0;)",
                               "      int stage = 0, ablate_slots = 0;\n      u32 phase = 0;\n"
                               "      MOE_FP8_TRACE(int trace_tile = 0;)")
    variants["noepi"] = patch(core, kEpilogue, kKeepAccumulatorsLive)
    variants["nofence"] = patch(core, kFence, "      // ablated: no fence after the commit")
    variants["colonefma"] = patch(core, kColumnPromotion, kColumnOneFma)
    variants["colnopromo"] = patch(core, kColumnPromotion, kColumnNoPromotion)
    ordered = patch(core, kSingleLoop, kSingleLoopOrdered)
    ordered = patch(ordered, kLoopStart, kLoopStartOrdered)
    variants["ordered"] = patch(ordered, kLoopEnd, kLoopEndOrdered)
    for name, text in variants.items():
        folder = out / name
        if folder.exists():
            shutil.rmtree(folder)
        shutil.copytree(kInclude, folder)
        (folder / "gemm_core.cuh").write_text(text)
        print(folder)


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]))
