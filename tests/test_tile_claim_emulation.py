"""Dynamic tiles (include/tile_claim.cuh) compiled with g++ and run on the CPU, one thread per CTA.

The header's own code runs: the claim (``TileClaim::next``: first tile = cluster index, then
``num_clusters + atomicAdd``), the 2-CTA mailbox (rank 0 ``st.async``-writes each index into rank
1's slot and waits for the slot back; rank 1 expects 4 bytes, waits, reads, hands the slot back
with a remote arrive) and ``finish`` (the last cluster resets the counter). The PTX it calls is
replaced by an emulation of mbarriers (phases, pending arrivals, transaction bytes; ``try_wait``
on a parity) over a mutex, atomics by GCC's builtins, ``mapa`` by the peer CTA's copy of the same
shared-memory field. Each CTA then walks the claim loop of gemm_core.cuh's scale warp against the
real scheduler (scheduler.cuh), with random pauses and late starts so the claims interleave
differently in every trial. The test checks what a hang or a wrong result on the device would
come from: every tile computed exactly once, the two CTAs of a pair on the same tiles in the same
order, and the counter back at zero after each launch (three launches in a row on one counter).
"""
import ctypes
import random
import shutil
import subprocess
import zlib

import pytest

from moe_fp8.gemm.jit import env

# the static walk's entry and reader, and contiguous layouts with padding and empties
from test_scheduler_emulation import _ceil, _problem, _walk, kEntry as kWalkEntry

# (name, layout, N, K, block_m, block_n, group_n, cluster_m): the claimable (contiguous) layouts,
# m_indices (1), offsets (4), zero padding (5)
kInstances = [
    ("contig_128x256_c2", 1, 1024, 384, 128, 256, 16, 2),
    ("contig_128x128_c1", 1, 1024, 384, 128, 128, 16, 1),
    ("offsets_128x144_c2", 4, 1152, 384, 128, 144, 2, 2),
    ("zeropad_128x256_c2", 5, 1024, 384, 128, 256, 16, 2),
    ("contig_64x112_c1", 1, 1120, 384, 64, 112, 16, 1),
]

kPrelude = r'''
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <map>
#include <mutex>
#include <random>
#include <thread>
#include <vector>
using std::max;
using std::min;
struct Dim3 { unsigned x = 0, y = 0, z = 0; };
static thread_local Dim3 blockIdx, threadIdx;  // threadIdx 0: each CTA's claiming lane
static Dim3 gridDim;
#define __device__
#define __host__
#define __forceinline__ inline
template <typename T> inline T __ldg(const T* p) { return *p; }
template <typename T> inline T __ldcg(const T* p) { return *p; }
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline int atomicExch(int* p, int v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline int __shfl_sync(unsigned, int v, int) { return v; }  // one lane emulated: lane 0's value

namespace moe_fp8 {
using u32 = unsigned int;
using u64 = unsigned long long;

// Each CTA's shared memory: the fields TileClaim touches. A cluster's CTAs sit side by side, so
// mapa (a field of CTA r of this cluster) is this CTA's field offset into CTA r's copy.
struct Smem { int s_mail[2]; u64 mail_full[2]; u64 mail_empty[2]; };
static thread_local Smem* t_smem;
static thread_local Smem* t_cluster;

template <typename T> T* mapa(T* p, u32 cta) {
  return reinterpret_cast<T*>(reinterpret_cast<char*>(t_cluster + cta) +
                              (reinterpret_cast<char*>(p) - reinterpret_cast<char*>(t_smem)));
}

// mbarriers: expected arrivals, pending arrivals, transaction bytes, phase; one lock for all
struct Bar { int expected = 0, pending = 0, tx = 0; unsigned phase = 0; };
static std::mutex g_lock;
static std::condition_variable g_changed;
static std::map<u64*, Bar> g_bars;
static void bar_settle(Bar& b) {  // the phase completes once every arrival and byte is in
  if (b.pending == 0 && b.tx == 0) { b.phase ^= 1; b.pending = b.expected; g_changed.notify_all(); }
}
inline void bar_init(u64* bar, int count) {
  std::lock_guard<std::mutex> g(g_lock);
  g_bars[bar] = Bar{count, count, 0, 0};
}

namespace ptx {
inline void mbar_arrive_expect_tx(u64* bar, u32 bytes) {
  std::lock_guard<std::mutex> g(g_lock);
  Bar& b = g_bars.at(bar);
  b.tx += int(bytes);
  --b.pending;
  bar_settle(b);
}
// try_wait.parity: true once the phase of parity `parity` has completed (the current phase's
// parity differs); a fresh barrier (phase 0) passes a wait on parity 1 at once
struct Hang {};  // a wait that never ends on the device: the CTA's thread gives up, the test fails
inline void mbar_wait_idle(u64* bar, u32 parity) {
  std::unique_lock<std::mutex> g(g_lock);
  if (!g_changed.wait_for(g, std::chrono::seconds(5),
                          [&] { return g_bars.at(bar).phase != parity; }))
    throw Hang{};
}
inline void mbar_arrive_cluster(u64* bar, u32 cta) {
  std::lock_guard<std::mutex> g(g_lock);
  Bar& b = g_bars.at(mapa(bar, cta));
  --b.pending;
  bar_settle(b);
}
// st.async: the value lands, then its 4 bytes complete on the peer's barrier
inline void st_async_cluster(int* p, int value, u64* bar, u32 cta) {
  std::lock_guard<std::mutex> g(g_lock);
  *mapa(p, cta) = value;
  Bar& b = g_bars.at(mapa(bar, cta));
  b.tx -= 4;
  bar_settle(b);
}
}  // namespace ptx
}  // namespace moe_fp8
'''

kEntry = r'''
// One launch: `grid` CTAs as threads, each walking gemm_core's claim loop; tile records
// (cta, order, m_row, n0, b_row, rows_valid, num_k_blocks) into `out`. Returns the record count,
// -1 past `cap`.
extern "C" int launch_@NAME@(int m, int num_experts, const int* layout, int grid, int* counter,
                             unsigned seed, int* out, int cap) {
  using namespace moe_fp8;
  using S = TileScheduler<@LAYOUT@, @N@, @K@, @BM@, @BN@, @GN@, @CM@, 1, 1, @ET@, false>;
  constexpr int kClusterSize = @CM@;
  GemmParams params{m, num_experts, layout, nullptr, nullptr};
  params.g_tile_counter = counter;
  gridDim.x = grid;
  std::vector<Smem> smem(grid);
  for (auto& s : smem)
    for (int b = 0; b < 2; ++b) { bar_init(&s.mail_full[b], 1); bar_init(&s.mail_empty[b], 1); }
  std::atomic<int> count{0};
  std::atomic<bool> overflow{false}, hung{false};
  std::vector<std::thread> ctas;
  for (int cta = 0; cta < grid; ++cta) {
    ctas.emplace_back([&, cta] {
      try {
      blockIdx.x = cta;
      t_smem = &smem[cta];
      t_cluster = &smem[cta - cta % kClusterSize];
      const u32 rank = cta % kClusterSize;
      std::mt19937 rng(seed * 7919u + cta);
      auto pause = [&](int max_us) {
        const int us = int(rng() % (max_us + 1));
        if (us) std::this_thread::sleep_for(std::chrono::microseconds(us));
        else std::this_thread::yield();
      };
      if (rng() % 3 == 0) pause(2000);  // a late start: its SM still held by another kernel
      S scheduler(params, rank);
      TileClaim<kClusterSize> claim(params.g_tile_counter, t_smem->s_mail, t_smem->mail_full,
                                    t_smem->mail_empty, rank);
      for (int order = 0;; ++order) {
        Tile t;
        TileStatus status;
        do {  // the scale warp: claim past padding pairs
          status = scheduler.get(claim.next(), t);
        } while (status == TileStatus::kSkip);
        if (status == TileStatus::kDone) {
          if (rank == 0) claim.finish();
          return;
        }
        const int i = count.fetch_add(1);
        if (i >= cap) { overflow = true; return; }
        int* r = out + 7 * i;
        r[0] = cta; r[1] = order; r[2] = t.m_row; r[3] = t.n0; r[4] = t.b_row;
        r[5] = t.rows_valid; r[6] = t.num_k_blocks;
        pause(rng() % 4 == 0 ? 300 : 20);  // the tile's math
      }
      } catch (const ptx::Hang&) {
        hung = true;
      }
    });
  }
  for (auto& c : ctas) c.join();
  {
    std::lock_guard<std::mutex> g(g_lock);
    for (auto& s : smem)
      for (int b = 0; b < 2; ++b) { g_bars.erase(&s.mail_full[b]); g_bars.erase(&s.mail_empty[b]); }
  }
  return hung ? -2 : overflow ? -1 : count.load();
}
'''
kFields = ("cta", "order", "m_row", "n0", "b_row", "rows_valid", "num_k_blocks")


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("the tile-claim emulation needs g++")
    source = kPrelude
    for header in ("scheduler.cuh", "tile_claim.cuh"):
        text = (env.kIncludeDir / header).read_text()
        assert '#include "ptx.cuh"' in text, header  # the stubs above stand in for it
        source += text.replace('#include "ptx.cuh"', "").replace("#pragma once", "")
    for name, layout, n, k, bm, bn, gn, cm in kInstances:
        entry = kEntry + kWalkEntry  # launch_NAME (claimed) and walk_NAME (fixed stride)
        for key, value in (("NAME", name), ("LAYOUT", layout), ("N", n), ("K", k), ("BM", bm),
                           ("BN", bn), ("GN", gn), ("CM", cm), ("CN", 1), ("SK", 1), ("PH", "false"),
                           ("ET", "true" if layout == 5 else "false")):
            entry = entry.replace(f"@{key}@", str(value))
        source += entry
    build = tmp_path_factory.mktemp("tile_claim")
    (build / "tile_claim.cpp").write_text(source)
    library = build / "libtile_claim.so"
    result = subprocess.run([compiler, "-std=c++17", "-O1", "-fPIC", "-shared", "-pthread",
                             str(build / "tile_claim.cpp"), "-o", str(library)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return ctypes.CDLL(str(library))


def _records(fn, m, experts, values, grid, *args):
    cap = 100000
    out = (ctypes.c_int * (len(kFields) * cap))()
    layout = (ctypes.c_int * max(1, len(values)))(*values)
    count = fn(m, experts, layout, grid, *args, out, cap)
    assert count != -2, "a CTA waited 5 s on a barrier: the launch would hang"
    assert count >= 0, "more tiles than the harness holds"
    return [dict(zip(kFields, out[len(kFields) * i:len(kFields) * (i + 1)])) for i in range(count)]


def _tile_set(tiles, what):
    keys = {(t["m_row"], t["n0"], t["b_row"]): (t["rows_valid"], t["num_k_blocks"]) for t in tiles}
    assert len(keys) == len(tiles), f"{what}: a tile computed twice"
    return keys


@pytest.mark.parametrize("instance", kInstances, ids=[i[0] for i in kInstances])
def test_claimed_tiles_cover_once_pairs_in_step_counter_reset(lib, instance):
    name, layout, n, k, bm, bn, gn, cm = instance
    rng = random.Random(zlib.crc32(name.encode()))  # stable across processes
    counter = (ctypes.c_int * 2)(0, 0)
    for trial in range(12):
        m, experts, values = _problem(layout, rng)
        pairs = _ceil(_ceil(m, bm), cm) * _ceil(n, bn)
        # few clusters (many claims each) up to 24 (the first round covers more of the work)
        grid = cm * rng.choice((1, 2, 3, 5, min(pairs, 24)))
        what = f"{name} trial {trial}: m={m} experts={experts} grid={grid} layout={values[:12]}"
        want = _tile_set(_walk(lib, name, m, experts, values, grid), what)
        for launch in range(3):  # one counter, three launches: each must find it at zero
            seed = zlib.crc32(f"{what} {launch}".encode())
            tiles = _records(getattr(lib, f"launch_{name}"), m, experts, values, grid, counter,
                             ctypes.c_uint(seed))
            assert list(counter) == [0, 0], f"{what} launch {launch}: counter {list(counter)}"
            assert _tile_set(tiles, what) == want, f"{what} launch {launch}: not the static tiles"
            if cm == 2:  # a pair computes the same tile sequence: adjacent rows, same columns
                by_cta = {}
                for t in tiles:
                    by_cta.setdefault(t["cta"], []).append(t)
                for first in range(0, grid, 2):
                    a = sorted(by_cta.get(first, []), key=lambda t: t["order"])
                    b = sorted(by_cta.get(first + 1, []), key=lambda t: t["order"])
                    assert len(a) == len(b), f"{what}: cluster {first // 2}: {len(a)} / {len(b)}"
                    for ta, tb in zip(a, b):
                        assert ta["n0"] == tb["n0"] and tb["m_row"] == ta["m_row"] + bm, \
                            f"{what} launch {launch}: pair diverged {ta} {tb}"
