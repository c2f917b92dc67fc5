"""The GEMM's promotion for tiles that straddle two weight-scale blocks (include/promote.cuh),
compiled with g++ and run on the CPU: for every straddling width and every column offset a tile
can start at, the branch chain picks the promotion whose boundary is the tile's, and each column
takes the scale of its own 128-column block — what a wrong branch would get wrong on the GPU
(there only tiles at some offsets would differ, by a scale ratio in some columns).
"""
import ctypes
import math
import shutil
import subprocess

import pytest

from moe_fp8.gemm import heuristics as H
from moe_fp8.gemm.jit import env

kStraddling = [n for n in H.kBlockNs if 128 % n and n != 256]  # 256: two 128-wide halves

kHarness = r'''
#define __device__
#define __host__
#define __forceinline__ inline
#include "promote.cuh"

// acc[4 j + i] after one promotion of partials p = 1 from acc = 0, factors f = {1, 2, 3, 4}:
// the column group j reads 1 / 2 (first block) or 3 / 4 (second block).
template <int kBlockN>
int promote(int first_cols, float* out) {
  constexpr int kGroups = kBlockN / 8;
  float acc[4 * kGroups] = {}, p[4 * kGroups];
  for (float& v : p) v = 1.0f;
  const float f[4] = {1.0f, 2.0f, 3.0f, 4.0f};
  moe_fp8::promote_straddling<kGroups, moe_fp8::gcd_int(kBlockN, 128) / 8>(first_cols / 8, acc, p, f);
  for (int i = 0; i < 4 * kGroups; ++i) out[i] = acc[i];
  return 4 * kGroups;
}

extern "C" int moe_promote(int block_n, int first_cols, float* out) {
  switch (block_n) {
@CASES@
    default: return -1;
  }
}
'''


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("the CPU emulation needs g++")
    build = tmp_path_factory.mktemp("promote")
    cases = "\n".join(f"    case {n}: return promote<{n}>(first_cols, out);" for n in kStraddling)
    (build / "harness.cpp").write_text(kHarness.replace("@CASES@", cases))
    library = build / "libpromote.so"
    result = subprocess.run([compiler, "-std=c++17", "-O1", "-fPIC", "-shared", f"-I{env.kIncludeDir}",
                             str(build / "harness.cpp"), "-o", str(library)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    lib = ctypes.CDLL(str(library))
    lib.moe_promote.restype = ctypes.c_int
    return lib


@pytest.mark.parametrize("block_n", kStraddling)
def test_every_tile_offset_gets_its_columns_scales(lib, block_n):
    step = math.gcd(block_n, 128)
    offsets = sorted({(t * block_n) % 128 for t in range(128 // step)})  # n0 % 128 of tile t
    assert offsets == list(range(0, 128, step))
    for offset in offsets:
        first_cols = min(block_n, 128 - offset)  # as gemm_core.cuh's begin_tile computes it
        out = (ctypes.c_float * (block_n // 2))()
        assert lib.moe_promote(block_n, first_cols, out) == block_n // 2
        for j in range(block_n // 8):
            in_first = 8 * j < first_cols  # column group j lies in the tile's first scale block
            want = [1.0, 1.0, 2.0, 2.0] if in_first else [3.0, 3.0, 4.0, 4.0]
            assert list(out[4 * j:4 * j + 4]) == want, (block_n, offset, j)
