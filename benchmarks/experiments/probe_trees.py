"""Ablated copies of the GEMM include tree, for gemm_ab.py: which side limits a small-M dense GEMM.

    python benchmarks/experiments/probe_trees.py /tmp/probe    # writes /tmp/probe/{nomma,noa}
    python benchmarks/gemm_ab.py --variant head=moe_fp8/gemm/include \
        --variant nomma=/tmp/probe/nomma --variant noa=/tmp/probe/noa --config 64x32c1d1 ...

nomma: the math warps issue no wgmma (they still wait for every stage, promote and release it):
       the time left is the loads' (TMA, DRAM, L2) and the pipeline's, with no tensor-core work.
noa:   the producer loads no A (whole-tile boxes only; A chunk configs keep their loads): the
       time without the re-reads of A from L2 that every CTA of a small-M GEMM makes.
Outputs of both are wrong by construction; only their times mean something.
"""
import os
import shutil
import sys

kInclude = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "moe_fp8", "gemm",
                        "include")

kEdits = {
    "nomma": [
        ("        Mma::mma(desc_a + k * ptx::kDescKStep, desc_b + k * ptx::kDescKStep, p, k > 0);\n",
         "        if (desc_a == 0xffffffffu) Mma::mma(desc_a + k * ptx::kDescKStep, "
         "desc_b + k * ptx::kDescKStep, p, k > 0);\n"),
    ],
    "noa": [
        ("        const u32 stage_tx = kARowChunk == 0 ? Layout::kStageTxBytes :",
         "        const u32 stage_tx = kARowChunk == 0 ? Layout::kStageTxBytes - Layout::kABytes :"),
        ("            ptx::tma_load_2d(s_a + stage * Layout::kABytes, tma_a, &full[stage], k, tile.m_row);\n",
         ""),
    ],
}


def write(root: str) -> dict:
    """Writes one patched tree per entry of kEdits under ``root``; returns name -> folder."""
    folders = {}
    for name, edits in kEdits.items():
        folder = os.path.join(root, name)
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(kInclude, folder)
        path = os.path.join(folder, "gemm_core.cuh")
        text = open(path).read()
        for old, new in edits:
            if text.count(old) != 1:
                raise RuntimeError(f"{name}: anchor not found exactly once: {old[:70]!r}")
            text = text.replace(old, new)
        open(path, "w").write(text)
        folders[name] = folder
    return folders


if __name__ == "__main__":
    for name, folder in write(sys.argv[1] if len(sys.argv) > 1 else "/tmp/probe").items():
        print(f"{name}={folder}")
