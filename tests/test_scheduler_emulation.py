"""The GEMM tile scheduler (include/scheduler.cuh) compiled with g++ and run on the CPU: every CTA
of a persistent grid walks its tiles as on the GPU, and the test checks what a hang or a wrong
result on the device would come from —

* coverage: every output tile that must be computed is computed exactly once, nothing else
  (dense; contiguous with m_indices and with offsets, padding skipped, or with zero padding every
  row block, the all-padding ones with no K block; masked, empty experts skipped; k-grouped,
  experts without tokens skipped);
* multicast pairs: the two CTAs of a 2-CTA cluster see the same number of tiles, in lockstep,
  sharing B (cluster_m: vertically adjacent row blocks) or A (cluster_n: horizontally adjacent
  column blocks of the same rows and expert) — a pair that diverged would deadlock on the
  cluster's barriers. Contiguous B pairs: both halves share B exactly when they name one expert
  (else each loads its own); a padding half takes its peer's expert and writes nothing (zero
  padding: its zeros).
"""
import ctypes
import random
import shutil
import subprocess
import zlib

import pytest

from moe_fp8.gemm.jit import env

# (name, layout, N, K, block_m, block_n, group_n, cluster_m, cluster_n)
kInstances = [
    ("dense_n2_64x16", 0, 2112, 1536, 64, 16, 16, 1, 2),
    ("dense_n2_128x144", 0, 1424, 1536, 128, 144, 3, 1, 2),
    ("dense_m2_128x128", 0, 2112, 1536, 128, 128, 16, 2, 1),
    ("dense_128x80", 0, 2128, 1536, 128, 80, 5, 1, 1),
    ("contig_n2_128x32", 1, 1024, 384, 128, 32, 16, 1, 2),
    ("contig_128x128", 1, 1024, 384, 128, 128, 16, 1, 1),
    ("contig_m2_128x256", 1, 1024, 384, 128, 256, 16, 2, 1),
    ("contig_m2_128x144", 1, 1024, 384, 128, 144, 2, 2, 1),
    ("offsets_m2_128x128", 4, 1024, 384, 128, 128, 16, 2, 1),
    ("zeropad_m2_128x256", 5, 1024, 384, 128, 256, 16, 2, 1),
    ("offsets_n2_64x64", 4, 1024, 384, 64, 64, 16, 1, 2),
    ("zeropad_128x256", 5, 1024, 384, 128, 256, 16, 1, 1),
    ("zeropad_n2_64x64", 5, 1024, 384, 64, 64, 16, 1, 2),
    ("masked_n2_64x64", 2, 1024, 1024, 64, 64, 16, 1, 2),
    ("masked_64x128", 2, 1024, 1024, 64, 128, 16, 1, 1),
    ("masked_n2_128x128", 2, 2048, 256, 128, 128, 4, 1, 2),
    ("kgrouped_m2_128x32", 3, 800, 0, 128, 32, 16, 2, 1),
]
# split K (dense): (name, N, K, block_m, block_n, splits)
kSplitInstances = [("split7_64x128", 2112, 7168, 64, 128, 7), ("split4_128x96", 2112, 1536, 128, 96, 4),
                   ("split2_64x256", 4096, 256, 64, 256, 2)]
# fused SwiGLU (masked, kPairedHalves): (name, N = 2I, K, block_m, group_n)
kPairedInstances = [("paired_64x256", 1024, 512, 64, 16), ("paired_128x256", 4096, 256, 128, 4)]
# fused SwiGLU on the m_indices layout with B-multicast pairs: (name, N = 2I, K, group_n)
kPairedContiguousInstances = [("paired_contig_m2", 1024, 384, 16), ("paired_contig_m2_g2", 2048, 256, 2)]
kFields = ("cta", "m_row", "sa_m", "sa_k", "k_block0", "num_k_blocks", "n0", "b_row", "sb_row",
           "rows_valid", "expert", "b_shared")
kNumFields = len(kFields)

kPrelude = r'''
#include <algorithm>
using std::max;
using std::min;
struct Dim3 { unsigned x = 0, y = 0, z = 0; };
static Dim3 blockIdx, gridDim;
#define __device__
#define __host__
#define __forceinline__ inline
template <typename T> inline T __ldg(const T* p) { return *p; }
template <typename T> inline T __ldcg(const T* p) { return *p; }
'''

kEntry = r'''
extern "C" int walk_@NAME@(int m, int num_experts, const int* layout, int grid, int* out, int cap) {
  using namespace moe_fp8;
  using S = TileScheduler<@LAYOUT@, @N@, @K@, @BM@, @BN@, @GN@, @CM@, @CN@, @SK@, @ET@, @PH@>;
  const GemmParams params{m, num_experts, layout, nullptr, nullptr};
  int count = 0;
  gridDim.x = grid;
  for (int cta = 0; cta < grid; ++cta) {
    blockIdx.x = cta;
    S scheduler(params, cta % (@CM@ * @CN@));
    Tile t;
    while (scheduler.next(t)) {
      if (count >= cap) return -1;
      int* r = out + 12 * count++;
      r[0] = cta; r[1] = t.m_row; r[2] = t.sa_m; r[3] = t.sa_k; r[4] = t.k_block0;
      r[5] = t.num_k_blocks; r[6] = t.n0; r[7] = t.b_row; r[8] = t.sb_row; r[9] = t.rows_valid;
      r[10] = t.expert; r[11] = t.b_shared;
    }
  }
  return count;
}
'''


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("the scheduler emulation needs g++")
    text = (env.kIncludeDir / "scheduler.cuh").read_text().replace('#include "ptx.cuh"', "")
    source = kPrelude + text
    instances = [i + (1,) for i in kInstances]
    instances += [(name, 0, n, k, bm, bn, 16, 1, 1, sk) for name, n, k, bm, bn, sk in kSplitInstances]
    for name, layout, n, k, bm, bn, gn, cm, cn, sk in instances:
        entry = kEntry
        empty_tiles = "true" if layout == 5 else "false"  # as NtPolicy: zero padding yields them
        for key, value in (("NAME", name), ("LAYOUT", layout), ("N", n), ("K", k), ("BM", bm),
                           ("BN", bn), ("GN", gn), ("CM", cm), ("CN", cn), ("SK", sk),
                           ("ET", empty_tiles)):
            entry = entry.replace(f"@{key}@", str(value))
        source += entry.replace("@PH@", "false")
    for name, n, k, bm, gn in kPairedInstances:
        entry = kEntry
        for key, value in (("NAME", name), ("LAYOUT", 2), ("N", n), ("K", k), ("BM", bm),
                           ("BN", 256), ("GN", gn), ("CM", 1), ("CN", 1), ("SK", 1),
                           ("ET", "false"), ("PH", "true")):
            entry = entry.replace(f"@{key}@", str(value))
        source += entry
    for name, n, k, gn in kPairedContiguousInstances:
        entry = kEntry
        for key, value in (("NAME", name), ("LAYOUT", 1), ("N", n), ("K", k), ("BM", 128),
                           ("BN", 256), ("GN", gn), ("CM", 2), ("CN", 1), ("SK", 1),
                           ("ET", "false"), ("PH", "true")):
            entry = entry.replace(f"@{key}@", str(value))
        source += entry
    build = tmp_path_factory.mktemp("scheduler")
    (build / "scheduler.cpp").write_text(source)
    library = build / "libscheduler.so"
    result = subprocess.run([compiler, "-std=c++17", "-O1", "-fPIC", "-shared",
                             str(build / "scheduler.cpp"), "-o", str(library)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return ctypes.CDLL(str(library))


def _walk(lib, name, m, num_experts, layout_values, grid):
    cap = 200000
    out = (ctypes.c_int * (kNumFields * cap))()
    layout = (ctypes.c_int * max(1, len(layout_values)))(*layout_values)
    fn = getattr(lib, f"walk_{name}")
    count = fn(m, num_experts, layout, grid, out, cap)
    assert count >= 0, "more tiles than the harness holds"
    return [dict(zip(kFields, out[kNumFields * i:kNumFields * (i + 1)])) for i in range(count)]


def _ceil(a, b):
    return -(-a // b)


def _problem(layout, rng):
    """(m, num_experts, the layout array: m_indices / offsets / masked_m / token offsets)."""
    if layout == 0:
        return rng.choice((1, 63, 64, 65, 200, 333, 1000)), 1, []
    if layout in (1, 4, 5):
        counts = [rng.choice((0, 0, 1, 5, 127, 128, 129, 300)) for _ in range(rng.randint(1, 9))]
        segments = [_ceil(c, 128) * 128 for c in counts]
        if layout in (1, 5):
            m_indices = []
            for e, (c, s) in enumerate(zip(counts, segments)):
                m_indices += [e] * c + [-1] * (s - c)
            m_indices += [-1] * 128 * rng.randint(0, 3)  # trailing all-padding row blocks
            return len(m_indices), len(counts), m_indices
        offsets = [0]
        for s in segments:
            offsets.append(offsets[-1] + s)
        extra = 128 * rng.randint(0, 1)
        return offsets[-1] + extra, len(counts), offsets
    if layout == 2:
        m_max = rng.choice((1, 37, 64, 65, 200))
        experts = rng.randint(1, 12)
        masked_m = [rng.choice((0, 1, m_max, rng.randint(0, m_max))) for _ in range(experts)]
        return m_max, experts, masked_m
    counts = [128 * rng.choice((0, 0, 1, 2, 3)) for _ in range(rng.randint(1, 6))]
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    return rng.choice((128, 144, 333, 800)), len(counts), offsets


def _expected(layout, n, bm, bn, m, experts, values):
    """{(expert, m_row, n0)} every tile that must be computed once (k-grouped: m_row = row)."""
    n_blocks = _ceil(n, bn)
    want = set()
    if layout == 0:
        for mb in range(_ceil(m, bm)):
            want |= {(0, mb * bm, nb * bn) for nb in range(n_blocks)}
    elif layout == 1:
        for mb in range(_ceil(m, bm)):
            e = values[mb * bm]
            if 0 <= e < experts:
                want |= {(e, mb * bm, nb * bn) for nb in range(n_blocks)}
    elif layout == 5:  # every row block; an all-padding one under expert 0's coordinates
        for mb in range(_ceil(m, bm)):
            e = values[mb * bm]
            want |= {(e if 0 <= e < experts else 0, mb * bm, nb * bn) for nb in range(n_blocks)}
    elif layout == 4:
        for mb in range(_ceil(m, bm)):
            row = mb * bm
            if row < values[-1]:
                e = max(i for i in range(experts) if values[i] <= row)
                want |= {(e, row, nb * bn) for nb in range(n_blocks)}
    elif layout == 2:
        for e, rows in enumerate(values):
            for mb in range(_ceil(min(max(rows, 0), m), bm)):
                want |= {(e, e * m + mb * bm, nb * bn) for nb in range(n_blocks)}
    else:
        for e in range(experts):
            if values[e + 1] > values[e]:
                for mb in range(_ceil(m, bm)):
                    want |= {(e, mb * bm, nb * bn) for nb in range(n_blocks)}
    return want


def _block_expert_valid(layout, values, experts, m, row):
    """Whether the contiguous row block at ``row`` holds an expert's rows (not padding, not past M
    or, offsets form, past offsets[E])."""
    if row >= m:
        return False
    if layout == 4:
        return row < values[-1]
    return 0 <= values[row] < experts


def _tile_key(layout, t, n):
    """(expert, m_row, n0): the grouped NT layouts name the expert by B's row block."""
    expert = t["expert"] if layout in (0, 3) else t["b_row"] // n
    return expert, t["m_row"], t["n0"]


@pytest.mark.parametrize("instance", kInstances, ids=[i[0] for i in kInstances])
def test_scheduler_covers_each_tile_once_and_pairs_stay_in_lockstep(lib, instance):
    name, layout, n, k, bm, bn, gn, cm, cn = instance
    size = cm * cn
    rng = random.Random(zlib.crc32(name.encode()))  # stable across processes
    for trial in range(40):
        m, experts, values = _problem(layout, rng)
        grid = size * rng.choice((1, 2, 3, 7, 66))
        tiles = _walk(lib, name, m, experts, values, grid)
        what = f"{name} trial {trial}: m={m} experts={experts} grid={grid} layout={values[:16]}"
        real = [t for t in tiles if t["rows_valid"] > 0]
        got = [_tile_key(layout, t, n) for t in real]
        if layout == 5:  # a padding row block is named by expert 0 (a pair's: by its peer's)
            got = [(0 if not 0 <= values[row] < experts else e, row, n0) for e, row, n0 in got]
        assert len(got) == len(set(got)), f"{what}: a tile computed twice"
        assert set(got) == _expected(layout, n, bm, bn, m, experts, values), f"{what}: coverage"
        if layout == 5:  # zero padding: all-padding row blocks run with no K block, others with all
            for t in real:  # (a pair's padding half runs its peer's K blocks, on its B)
                padding = not 0 <= values[t["m_row"]] < experts
                if padding and cm == 2 and t["num_k_blocks"]:
                    peer = t["m_row"] ^ bm  # the other row block of the pair
                    assert peer < m and 0 <= values[peer] < experts, f"{what}: {t}"
                    assert t["b_row"] // n == values[peer], f"{what}: {t}"
                    continue
                assert t["num_k_blocks"] == (0 if padding else k // 128), f"{what}: {t}"
        if layout == 2:  # masked: the rows a tile may write stay inside its expert's masked_m
            for t in real:
                e = t["b_row"] // n
                assert t["m_row"] + min(t["rows_valid"], bm) <= e * m + min(values[e], m), what
        if size == 1:
            continue
        by_cta = {}
        for t in tiles:
            by_cta.setdefault(t["cta"], []).append(t)
        for first in range(0, grid, size):
            a, b = by_cta.get(first, []), by_cta.get(first + 1, [])
            assert len(a) == len(b), f"{what}: cluster {first // size} CTAs see {len(a)} / {len(b)} tiles"
            for ta, tb in zip(a, b):
                same = ("sa_k", "k_block0", "num_k_blocks", "expert")
                assert all(ta[f] == tb[f] for f in same), f"{what}: pair diverged {ta} {tb}"
                if cn == 2:  # A shared: same rows, adjacent column blocks
                    assert ta["m_row"] == tb["m_row"] and ta["rows_valid"] == tb["rows_valid"], what
                    assert tb["n0"] == ta["n0"] + bn and (ta["n0"] // bn) % 2 == 0, what
                    assert tb["b_row"] - ta["b_row"] == bn, what
                elif layout == 0 or layout == 3:  # B shared: same columns, adjacent row blocks
                    assert ta["n0"] == tb["n0"] and ta["b_row"] == tb["b_row"], what
                    assert tb["m_row"] == ta["m_row"] + bm, what
                else:  # contiguous: B shared where both row blocks read one expert's B
                    assert ta["n0"] == tb["n0"] and tb["m_row"] == ta["m_row"] + bm, what
                    assert ta["b_shared"] == tb["b_shared"], f"{what}: {ta} {tb}"
                    assert ta["b_shared"] == (ta["b_row"] == tb["b_row"]), f"{what}: {ta} {tb}"
                    for t in (ta, tb):  # a padding half writes nothing (zero padding: zeros)
                        if not _block_expert_valid(layout, values, experts, m, t["m_row"]):
                            assert layout == 5 or t["rows_valid"] <= 0, f"{what}: {t}"


@pytest.mark.parametrize("instance", kSplitInstances, ids=[i[0] for i in kSplitInstances])
def test_split_k_scheduler_covers_each_tile_and_slice_once(lib, instance):
    """Split K: every (output tile, K slice) exactly once; a slice's K blocks, scale column and
    workspace slice (the tile's expert field) agree."""
    name, n, k, bm, bn, splits = instance
    per_split = k // 128 // splits
    rng = random.Random(zlib.crc32(name.encode()))
    for trial in range(30):
        m = rng.choice((1, 63, 64, 65, 128, 200))
        grid = rng.choice((1, 2, 7, 66, 132))
        tiles = _walk(lib, name, m, 1, [], grid)
        what = f"{name} trial {trial}: m={m} grid={grid}"
        got = [(t["expert"], t["m_row"], t["n0"]) for t in tiles]
        assert len(got) == len(set(got)), f"{what}: a (tile, slice) computed twice"
        want = {(s, key[1], key[2]) for s in range(splits)
                for key in _expected(0, n, bm, bn, m, 1, [])}
        assert set(got) == want, f"{what}: coverage"
        for t in tiles:
            assert t["k_block0"] == t["sa_k"] == t["expert"] * per_split, f"{what}: {t}"
            assert t["num_k_blocks"] == per_split and t["rows_valid"] > 0, f"{what}: {t}"


@pytest.mark.parametrize("instance", kPairedInstances, ids=[i[0] for i in kPairedInstances])
def test_paired_halves_scheduler_pairs_gate_and_up_blocks(lib, instance):
    """Fused SwiGLU: an expert's tiles are its row blocks x the I / 128 column blocks t of the
    SiLU output, each exactly once; tile t's B rows start at gate block t (e * 2I + 128 t; the up
    half is I rows further, added by gemm_core), its scale row is gate block t's, and its rows stay
    inside masked_m."""
    name, n, k, bm, gn = instance
    inter = n // 2
    rng = random.Random(zlib.crc32(name.encode()))
    for trial in range(40):
        m, experts, values = _problem(2, rng)
        grid = rng.choice((1, 2, 3, 7, 66))
        tiles = _walk(lib, name, m, experts, values, grid)
        what = f"{name} trial {trial}: m={m} experts={experts} grid={grid} masked_m={values[:16]}"
        got = []
        for t in tiles:
            e, block = t["b_row"] // n, t["n0"] // 128
            assert t["rows_valid"] > 0 and t["n0"] % 128 == 0 and t["n0"] < inter, f"{what}: {t}"
            assert t["b_row"] == e * n + t["n0"], f"{what}: B rows {t}"
            assert t["sb_row"] == e * (n // 128) + block, f"{what}: scale row {t}"
            assert t["sa_k"] == e * (k // 128) and t["num_k_blocks"] == k // 128, f"{what}: {t}"
            assert t["m_row"] + min(t["rows_valid"], bm) <= e * m + min(values[e], m), what
            got.append((e, t["m_row"], block))
        assert len(got) == len(set(got)), f"{what}: a tile computed twice"
        want = {(e, e * m + mb * bm, block) for e, rows in enumerate(values)
                for mb in range(_ceil(min(max(rows, 0), m), bm)) for block in range(inter // 128)}
        assert set(got) == want, f"{what}: coverage"


@pytest.mark.parametrize("instance", kPairedContiguousInstances,
                         ids=[i[0] for i in kPairedContiguousInstances])
def test_paired_halves_multicast_pairs_on_the_contiguous_layout(lib, instance):
    """The contiguous fused SwiGLU with B multicast: every (row block of an expert, column block
    t) once, B at gate block t of that expert; the two CTAs of a cluster walk the same sequence,
    adjacent row blocks of one column block, sharing B exactly where both name one expert; a
    padding half writes nothing."""
    name, n, k, gn = instance
    inter, bm = n // 2, 128
    rng = random.Random(zlib.crc32(name.encode()))
    for trial in range(40):
        m, experts, values = _problem(1, rng)
        grid = 2 * rng.choice((1, 2, 3, 7, 66))
        tiles = _walk(lib, name, m, experts, values, grid)
        what = f"{name} trial {trial}: m={m} experts={experts} grid={grid} m_indices={values[:16]}"
        got = []
        for t in tiles:
            e, block = t["b_row"] // n, t["n0"] // 128
            assert t["n0"] % 128 == 0 and t["n0"] < inter, f"{what}: {t}"
            assert t["b_row"] == e * n + t["n0"] and t["sb_row"] == e * (n // 128) + block, what
            if t["rows_valid"] > 0:
                assert values[t["m_row"]] == e, f"{what}: {t}"
                got.append((e, t["m_row"], block))
            else:
                assert not _block_expert_valid(1, values, experts, m, t["m_row"]), f"{what}: {t}"
        assert len(got) == len(set(got)), f"{what}: a tile computed twice"
        want = {(values[mb * bm], mb * bm, block) for mb in range(_ceil(m, bm))
                if 0 <= values[mb * bm] < experts for block in range(inter // 128)}
        assert set(got) == want, f"{what}: coverage"
        by_cta = {}
        for t in tiles:
            by_cta.setdefault(t["cta"], []).append(t)
        for first in range(0, grid, 2):
            a, b = by_cta.get(first, []), by_cta.get(first + 1, [])
            assert len(a) == len(b), f"{what}: cluster {first // 2} CTAs see {len(a)} / {len(b)}"
            for ta, tb in zip(a, b):
                assert ta["n0"] == tb["n0"] and tb["m_row"] == ta["m_row"] + bm, what
                assert ta["b_shared"] == tb["b_shared"] == (ta["b_row"] == tb["b_row"]), what
