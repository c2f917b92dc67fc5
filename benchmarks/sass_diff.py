"""SASS of every GEMM instance in two JIT cache directories, compared instance by instance: how
many instructions differ (CPU only: cuobjdump from the `nvidia-cuda-cuobjdump` wheel or the
toolkit). Checks that a kernel change leaves the instances it should not touch as they were
measured, before any device call:

    (cd old_tree && PYTHONPATH=$PWD MOE_FP8_CACHE_DIR=/tmp/sass_old python3 -m moe_fp8.gemm.precompile)
    PYTHONPATH=$PWD MOE_FP8_CACHE_DIR=/tmp/sass_new python3 -m moe_fp8.gemm.precompile
    python3 benchmarks/sass_diff.py /tmp/sass_old /tmp/sass_new [--cuobjdump PATH]

Addresses and comments are dropped; register renamings count as differences.
"""
from __future__ import annotations

import argparse
import difflib
import glob
import json
import os
import re
import shutil
import subprocess

kInstruction = re.compile(r"\s+/\*[0-9a-f]{4}\*/")


def cubins(cache_dir: str, pattern: str) -> dict:
    """instance name -> cubin path, for the instances whose name contains ``pattern``."""
    found = {}
    for meta_path in glob.glob(os.path.join(cache_dir, "kernels", "*", "*.json")):
        with open(meta_path) as f:
            meta = json.load(f)
        if pattern in meta.get("instance", "") and meta.get("cubin_file"):
            found[meta["instance"]] = os.path.join(os.path.dirname(meta_path), meta["cubin_file"])
    return found


def sass(cuobjdump: str, cubin: str) -> list:
    text = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True,
                          check=True).stdout
    return [re.sub(r"/\*[0-9a-f]+\*/", "", line).split(";")[0].strip()
            for line in text.splitlines() if kInstruction.match(line)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--pattern", default="gemm", help="instances whose name contains this")
    parser.add_argument("--cuobjdump", default=shutil.which("cuobjdump") or "cuobjdump")
    args = parser.parse_args()
    old, new = cubins(args.old, args.pattern), cubins(args.new, args.pattern)
    print("| differing | old | new | instance |\n|---|---|---|---|")
    for name in sorted(set(old) & set(new)):
        a, b = sass(args.cuobjdump, old[name]), sass(args.cuobjdump, new[name])
        changed = sum(1 for line in difflib.unified_diff(a, b, lineterm="", n=0)
                      if line[:1] in "+-" and not line.startswith(("+++", "---")))
        print(f"| {changed} | {len(a)} | {len(b)} | {name} |")
    for label, names in (("only old", set(old) - set(new)), ("only new", set(new) - set(old))):
        if names:
            print(f"{label}: {', '.join(sorted(names))}")


if __name__ == "__main__":
    main()
