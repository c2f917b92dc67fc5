"""Kernel configuration for the FP8 GEMM family (dense, grouped contiguous, grouped masked).

One place decides block sizes, pipeline depth and grid size, from the problem shape and the
device's SM count. Tests pin a ``GemmConfig`` to exercise every variant; everything else asks
``dense_config`` / ``contiguous_config`` / ``masked_config``.

Choice rule (measured where noted in benchmarks/NOTES.md):
* ``block_m``: 64 (one math warpgroup) when the rows per group fit in 64, else 128 (two).
* ``block_n``: among the widths the kernel supports (multiples of 16 whose tiles touch at most two
  128-column scale blocks, e.g. 112, 144, 160 beside powers of two), the one with the fewest
  waves of tiles over the SMs, then the fullest last wave, then the widest tile (more reuse of
  each A byte). Non-powers of two let e.g. N = 7168 split into 132-ish tiles.
* large M (at least ``kWideMinWaves`` waves of 128 x 128 tiles): 128 x 256 tiles join the
  candidates (``MOE_FP8_WIDE_TILES``, on): they read 25 % fewer L2 bytes per MMA, and the
  128 x 128 mainloop is L2-bound there (ncu, H100, 2026-12-05); the dense layout multicasts B.
* ``stages``: as many shared-memory ring slots as fit in the 227 KiB a block may use.
* ``cluster_m``: 2 (two vertically adjacent tiles per 2-CTA cluster, B multicast, half the B
  bytes each CTA pulls from L2) for the dense layout with at least two row blocks of 128 and
  K <= ``kMulticastMaxK``. Measured on H100 (2026-11-25, M = 4096, same run): +7 % at K = 512,
  -3 to +0 % (noise) at K >= 1536, where L2 traffic is not what limits the kernel.

The k-grouped weight-gradient kernel (``wgrad_config``) uses 128 x 256 tiles on wide outputs (else
128 x 128) and the stages that fit beside its staging tile.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Tuple

from .jit import env

kMaxSmemBytes = 232448  # sm_90 opt-in dynamic shared memory per block (227 KiB)
kBlockK = 128           # one K block = one scale group; a 128-byte row of e4m3
kMaxStages = 16         # a pinned GemmConfig(stages=) may ask for up to this many
kDefaultMaxStages = 10  # what the heuristics give (the most that fit, up to this); deeper rings
                        # for the narrow small-M tiles are pinnable, not yet measured
kMinStages = 2
kDefaultGroupN = 16     # n blocks per rasterisation band (scheduler.cuh)
kLoadWeight = 64        # cost of a tile's operand row relative to one MMA column (see _pick_block_n)
kOddWidthPenalty = 1.3  # block_n that does not divide 128 (see _pick_block_n)
# 192-wide tiles under two math warpgroups: M = 4096, N = 2112, K = 7168 takes 3 waves of them
# instead of 5 of 128 x 128 (the last 12 % full): 137 -> 120 us (L2-flushed graph replays),
# 917-921 -> 1040 TFLOPS at steady state, cuBLAS 984 (H100 at its power cap, 2026-12-06, session 15)
kWidth192Penalty = 1.1
kMulticastMinMBlocks = 2  # dense: row blocks of 128 from which the 2-CTA B multicast is used
kMulticastMaxK = 1024     # dense: largest K that uses it (short tiles gain; see module doc)
kClaimBytes = 48  # dynamic tiles' shared memory (gemm_core.cuh CoreSmem::kClaimBytes)
kMaxSplitK = 16           # split-K slices (include/split_k.cuh)
kWgradWideBlockN = 256    # wgrad_config: the weight-gradient GEMM's tile width on wide outputs
# fused SwiGLU GEMMs: the ring depth that fits without an output tile (MOE_FP8_SWIGLU_DEEP_RING).
# Off: H100, 2026-12-06 (session 24), decode 8 / 128 / 256 tokens +3.3 / +1.6 / +2.0 us over 5
# interleaved rounds, prefill gate-up 0.98-1.02x (results/decode_switches_ab_h100_*_s24.md);
# the H200, whose decode GEMMs stream at ~80 % of its copy rate, not yet measured.
kSwigluDeepRingDefault = False
# The decode step's fused SwiGLU gate-up GEMM as its swap-AB twin (MOE_FP8_SWAP_AB_SWIGLU; tokens on
# the wgmma N side rounded up to 16, swap_ab_swiglu.cuh): at 256 tokens an expert's 49-80 rows run
# MMAs for 128 rows in 128-row tiles. Built for the H200, whose 256-token gate-up streams at
# ~3.5 TB/s of its ~4.3 (session 23). Off: H100, decode 1 / 8 / 128 / 256 tokens, one partial
# set (session 25) -1.0 / -1.3 / +4.5 / +8.5 us, two (session 26) -0.6 / -2.6 / +7.8 / +4.7 us
# (results/decode_build_ab_swap_ab_swiglu_*_h100_*); the H200 not yet measured.
kSwapAbSwigluDefault = False
# The swap-AB down GEMM's token tile at 96 rows where the masked spread fits it (tokens are the
# wgmma N side: any multiple of 16; MOE_FP8_SWAP_AB_96). At 256 tokens over 32 experts (64 +- 8
# rows each) a 96-token tile fits 7 ring stages at K = 2048 instead of 5 at 128: 112 KB of
# weights in flight per SM instead of 80. Why: the H200's 256-token down GEMM streams at 3.2 TB/s
# of its ~4.25 and its 128-token one (64-row tiles, 8 stages) faster (session 23); on the H100
# the 256-token gate-up runs at 85 % of the DRAM peak with the tensor pipe 28 % busy (ncu,
# session 26): the reading is that the decode GEMMs wait on bytes in flight, not on MMAs.
# Off: H100, session 26, 256 tokens -0.9 us (3 interleaved rounds; the down GEMM at 84 % of the
# DRAM peak with either ring, ncu); the H200 not yet measured.
kSwapAb96Default = False
kMaskedSpread = 3.0  # masked_config: standard deviations of an expert's rows above the mean
# masked_config: A in row chunks below masked_m where the mean leaves tiles partly empty. H100,
# 2026-12-05 (session 10): decode 8 / 64 / 128 tokens 518 -> 513 / 548 -> 541 / 567 -> 562 us,
# masked 32 x 1 gate-up 321 -> 313 us; chunks on full tiles (E = 1, M = 1024) read 59 -> 139 us
# once (not understood), so full tiles keep one load per slot.
kMaskedRowChunksDefault = True
kARowChunks = {64: 16, 96: 32, 128: 32}  # A's rows per load by block_m (dense M < block_m, masked decode)
# 128 x 256 tiles for large M (``MOE_FP8_WIDE_TILES``): considered from kWideMinWaves waves of
# 128 x 128 tiles on; the dense layout multicasts B across a 2-CTA cluster. On: H100, 2026-12-05,
# layer prefill 4096 / 16384 tokens 3820 -> 3509 / 14539 -> 12975 us (results/*wide_h100*).
kWideTilesDefault = True
# The contiguous layout's 128 x 256 tiles with B multicast (MOE_FP8_CONTIGUOUS_MULTICAST): a
# third fewer L2-to-SM bytes per MMA. At the 700 W power cap of the lent H100s (steady state,
# power_probe, H100 2026-12-06): record shapes 4 x 8192 K = 7168 / 2048 1074-1082 -> 1119-1122 /
# 1014-1016 -> 1062-1081 TFLOPS (cuBLAS 1094-1096 / 1011-1013); layer prefill over 5 rounds
# 4096 / 8192 / 16384 / 32768 tokens +0.7 / -2.2 / -2.4 / -2.9 %.
kContiguousMulticastDefault = True
kWideMinWaves = 2


def _fits_two_scale_blocks(block_n: int) -> bool:
    """Mirror of fits_two_scale_blocks in fp8_gemm.cuh: every tile spans <= 2 scale blocks."""
    return all((i * block_n) % 128 + block_n <= 256 for i in range(128))


# Widths the kernel instantiates (ptx.cuh has a wgmma for each). 256 runs as two 128-column
# halves one after the other (128 accumulators + one 64-register partial set; 2 x 128 spills).
kBlockNs: Tuple[int, ...] = tuple(n for n in range(16, 193, 16) if _fits_two_scale_blocks(n)) + (256,)
kBlockMs: Tuple[int, ...] = (64, 128)
kSwapAbBlockMs: Tuple[int, ...] = (64, 96, 128)  # swap AB: tokens on the wgmma N side


@dataclass(frozen=True)
class GemmConfig:
    """Compile-time shape of one kernel instance plus its grid.

    block_m: rows per tile (64: one math warpgroup, 128: two; swap AB also 96).
    block_n: columns per tile (an entry of ``kBlockNs``).
    stages:  shared-memory ring depth (A, B and sa slots), 0 = as many as fit.
    group_n: n blocks per rasterisation band of the persistent scheduler.
    num_sms: persistent grid size upper bound, 0 = the device's SM count.
    double_buffer: queue K block kb+1 on the tensor cores before promoting kb (two partial
             register sets; the kernel uses it where they fit, block_n <= 128). True/1: for
             every K block; 2: for every other one; False/0: never.
    cluster_m: 1, or 2: two vertically adjacent tiles per 2-CTA cluster share B, each CTA loads
             half of it and multicasts it (dense layout and k-grouped only).
    cluster_n: 1, or 2: two horizontally adjacent tiles per 2-CTA cluster share A, each CTA
             loads half of it and multicasts it (NT layouts whose column blocks pair up exactly,
             ceil(N / block_n) even; not with cluster_m = 2). For small M, where every CTA
             otherwise reads all of A from L2 for a narrow column block. Clusters with
             block_m = 64 run single-buffered (the kernel drops double_buffer: ptxas serialised
             the double-buffered wgmma loop there, gemm_core.cuh).
    a_row_chunk: 0, or 8 / 16 / 32: A is loaded in chunks of this many rows, only the chunks
             that hold valid rows (masked: below masked_m, decode: a few tokens per 64-row tile;
             dense: below M, where the rows past M of a whole-tile box are out of bounds, which
             TMA fills slowly: 1 x 4096 x 7168 ran 26 us against 22 us with those rows in
             bounds, H100 2026-12-05). The other rows of the slot are stale and their outputs
             never written. Masked or dense layout, no cluster, no split K.
    split_k: 1, or S >= 2: the dense layout computes each output tile S times over slices of
             K / 128 / S K blocks into an fp32 workspace [S, M, N], then a second kernel sums the
             slices in order into the bf16 output (include/split_k.cuh). For small M, where a
             tile per SM otherwise means narrow tiles re-reading all of A. Dense layout, no
             cluster, block_n a multiple of 32, (K / 128) % S == 0.
    early_b: the kernel reads the tile order (masked_m) and loads the weights (B) of its first
             ring slots before it waits for the previous kernel of the stream (programmatic
             dependent launch; without it nothing changes): the weights stream while that kernel
             finishes. Only where the immediately preceding kernel writes neither B nor the
             layout — the decode step's down GEMM (`MOE_FP8_EARLY_WEIGHTS`). Masked or dense
             layout, no cluster, no split K.
    swap_ab: (masked layout) the tile's block_m tokens are the wgmma N side, rounded up to 16
             per tile at run time, and its 128 weight rows the M side (include/swap_ab.cuh): a
             tile of 65-80 rows then runs MMAs for 80 rows, not for 128. block_n 128 (256: the
             fused SwiGLU GEMM's gate and up blocks, swap_ab_swiglu.cuh), no cluster, no split K;
             always two math warpgroups.
    """
    block_m: int = 128
    block_n: int = 128
    stages: int = 0
    group_n: int = kDefaultGroupN
    num_sms: int = 0
    double_buffer: bool = True
    cluster_m: int = 1
    cluster_n: int = 1
    a_row_chunk: int = 0
    split_k: int = 1
    early_b: bool = False
    swap_ab: bool = False

    def __post_init__(self):
        if self.block_m not in (kSwapAbBlockMs if self.swap_ab else kBlockMs):
            raise ValueError(f"GemmConfig.block_m must be one of {kBlockMs} ({kSwapAbBlockMs} "
                             f"with swap_ab), got {self.block_m}")
        if self.block_n not in kBlockNs:
            raise ValueError(f"GemmConfig.block_n must be one of {kBlockNs}, got {self.block_n}")
        if self.stages != 0 and not kMinStages <= self.stages <= kMaxStages:
            raise ValueError(f"GemmConfig.stages must be 0 or in [{kMinStages}, {kMaxStages}]")
        if self.group_n < 1:
            raise ValueError(f"GemmConfig.group_n must be >= 1, got {self.group_n}")
        if self.cluster_m not in (1, 2):
            raise ValueError(f"GemmConfig.cluster_m must be 1 or 2, got {self.cluster_m}")
        if self.cluster_n not in (1, 2):
            raise ValueError(f"GemmConfig.cluster_n must be 1 or 2, got {self.cluster_n}")
        if self.cluster_m > 1 and self.cluster_n > 1:
            # 2 x 2 clusters (both multicast, dense) measured -3..-14 % on H100 (session 21:
            # only 30 clusters of 4 resident; results/cluster2x2_h100_2026-12-06_s21.md)
            raise ValueError("GemmConfig: multicast of B (cluster_m) and of A (cluster_n) are "
                             "exclusive (clusters of 2 CTAs)")
        if self.early_b and (self.cluster_m > 1 or self.cluster_n > 1 or self.split_k > 1):
            raise ValueError("GemmConfig.early_b needs no cluster and no split K")
        if self.a_row_chunk not in (0, 8, 16, 32) or self.a_row_chunk > self.block_m:
            raise ValueError(f"GemmConfig.a_row_chunk must be 0, 8, 16 or 32 (<= block_m), got "
                             f"{self.a_row_chunk}")
        if self.a_row_chunk and self.cluster_size > 1:
            raise ValueError("GemmConfig.a_row_chunk needs cluster_m = cluster_n = 1")
        if self.swap_ab and (self.block_n not in (128, 256) or self.cluster_size > 1
                             or self.split_k > 1):
            raise ValueError(f"GemmConfig.swap_ab needs block_n = 128 (256: the fused SwiGLU GEMM), "
                             f"no cluster and no split K, got {self}")
        if not 1 <= self.split_k <= kMaxSplitK:
            raise ValueError(f"GemmConfig.split_k must be in [1, {kMaxSplitK}], got {self.split_k}")
        if self.split_k > 1 and (self.cluster_size > 1 or self.a_row_chunk or self.block_n % 32):
            raise ValueError("GemmConfig.split_k > 1 needs cluster_m = cluster_n = 1, "
                             f"a_row_chunk = 0 and block_n % 32 == 0, got {self}")

    @property
    def cluster_size(self) -> int:
        return self.cluster_m * self.cluster_n

    @property
    def num_threads(self) -> int:
        return (2 if self.swap_ab else self.block_m // 64) * 128 + 128

    def resolved(self, k: int, wgrad: bool = False, wgrad_d_bytes: int = 4,
                 swiglu: bool = False) -> "GemmConfig":
        """This config with ``stages`` filled in for reduction size ``k`` (NT kernels; ``swiglu``:
        the fused SwiGLU GEMM, no output tile), or for the k-grouped weight-gradient kernel
        (``wgrad``: reduction per tile, ``k`` unused; D of ``wgrad_d_bytes`` per element: fp32 4,
        bf16 2), and
        ``double_buffer`` off where the kernel cannot use it (tiles wider than 128 columns:
        the second partial set does not fit beside their accumulators; one math warpgroup in a
        2-CTA cluster; gemm_core.cuh), so the instance's name says what runs and two names never
        build the same code."""
        config = self
        if self.double_buffer and (self.block_n > 128 or
                                   self.block_m == 64 and self.cluster_size > 1):
            config = dataclasses.replace(config, double_buffer=False)
        if config.split_k > 1 and (k // kBlockK) % config.split_k:
            raise ValueError(f"GemmConfig.split_k = {config.split_k} must divide the K blocks "
                             f"(K / 128 = {k // kBlockK})")
        if config.stages:
            if smem_bytes(config.block_m, config.block_n, config.stages, k, wgrad,
                          config.split_k, wgrad_d_bytes, swiglu, config.swap_ab) > kMaxSmemBytes:
                raise ValueError(f"{config} needs more than {kMaxSmemBytes} bytes of shared memory "
                                 f"at K = {k}")
            return config
        return dataclasses.replace(
            config, stages=max_stages(config.block_m, config.block_n, k, wgrad, config.split_k,
                                      wgrad_d_bytes, swiglu, config.swap_ab))


def as_swap_ab(config: GemmConfig, k: int, expected_m: int = 0) -> GemmConfig:
    """A masked ``config`` as its swap-AB twin (``GemmConfig.swap_ab``): the same token tile
    (block_m), row chunks, grid and early weights, 128 weight rows per tile, stages for ``k``.
    With ``expected_m`` (the masked layout's mean rows per expert) and ``MOE_FP8_SWAP_AB_96``, a
    128-token tile whose spread fits 96 rows becomes a 96-token one (kSwapAb96Default)."""
    block_m = config.block_m
    if (block_m == 128 and expected_m > 0 and env.swap_ab_96(kSwapAb96Default)
            and _spread_rows(expected_m, env.masked_spread(kMaskedSpread)) <= 96):
        block_m = 96
    return GemmConfig(block_m, 128, group_n=config.group_n, num_sms=config.num_sms,
                      a_row_chunk=config.a_row_chunk, early_b=config.early_b,
                      swap_ab=True).resolved(k)


def pairs_columns(config: GemmConfig, n: int) -> bool:
    """Whether ``config``'s column blocks of an N-wide output pair up exactly, as an A-multicast
    cluster (``cluster_n = 2``) needs: ceil(N / block_n) even (scheduler.cuh)."""
    return _ceil_div(n, config.block_n) % 2 == 0


def with_a_multicast(config: GemmConfig, n: int):
    """``config`` with A multicast (``cluster_n = 2``) where that is allowed for an N-wide output
    (no B multicast, paired column blocks), else None. Whole-tile A boxes (multicast halves): any
    A row chunks are dropped."""
    if config.cluster_m != 1 or not pairs_columns(config, n):
        return None
    return dataclasses.replace(config, cluster_n=2, a_row_chunk=0)


def smem_bytes(block_m: int, block_n: int, stages: int, k: int, wgrad: bool = False,
               split_k: int = 1, wgrad_d_bytes: int = 4, swiglu: bool = False,
               swap_ab: bool = False, dynamic_tiles: bool = False) -> int:
    """Dynamic shared memory of one CTA; mirrors CoreSmem in gemm_core.cuh.

    NT kernels: ring of A, B, sa slots; bf16 output tile (split K: fp32); weight scales of the
    tile, double buffered ([2][2][K/128/split_k]). wgrad: ring of A, B, sa, sb slots; fp32
    output tile (bf16 with ``wgrad_d_bytes = 2``). fp32 tiles 256 wide are staged 128 columns
    at a time (EpilogueAddF32). ``swiglu``: the fused SwiGLU GEMM, whose epilogue writes from
    registers (no output tile); with ``swap_ab``, 20 bytes per row of both math warpgroups for
    the per-token amax and scales (SwapAbSwiGluSmem). ``dynamic_tiles``: 48 bytes for the
    claimed tile indices and the cluster mailbox (tile_claim.cuh)."""
    stage = block_m * kBlockK + block_n * kBlockK + block_m * 4 + (block_n * 4 if wgrad else 0)
    d_bytes = wgrad_d_bytes if wgrad else 4 if split_k > 1 else 2
    staged_n = block_n // 2 if d_bytes == 4 and block_n == 256 else block_n  # fp32: two passes
    d_tile = (2 * 5 * 4 * block_m if swap_ab else 0) if swiglu else block_m * staged_n * d_bytes
    tile_sb = 0 if wgrad else 2 * 2 * (k // kBlockK // split_k) * 4
    end = (stages * stage + d_tile + tile_sb + 7) // 8 * 8 + (2 * stages + 4) * 8
    end += kClaimBytes if dynamic_tiles else 0
    return end + 1024  # alignment slack for the 1024-byte-aligned base


def max_stages(block_m: int, block_n: int, k: int, wgrad: bool = False, split_k: int = 1,
               wgrad_d_bytes: int = 4, swiglu: bool = False, swap_ab: bool = False) -> int:
    for stages in range(kDefaultMaxStages, kMinStages - 1, -1):
        if smem_bytes(block_m, block_n, stages, k, wgrad, split_k, wgrad_d_bytes,
                      swiglu, swap_ab) <= kMaxSmemBytes:
            return stages
    raise ValueError(f"block {block_m}x{block_n} does not fit shared memory even with "
                     f"{kMinStages} stages at K = {k}")


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    import torch
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _ceil_div(a: int, b: int) -> int:
    return (a + b - 1) // b


def grid_size(config: GemmConfig, max_tiles: int, sms: int) -> int:
    """Persistent grid: one CTA per SM (``config.num_sms`` caps it, except that a cluster is
    never split: at least one whole cluster), no more than the tiles (counted in multicast
    pairs), a whole number of clusters."""
    sms = config.num_sms or sms
    size = config.cluster_size
    clusters = max(1, min(sms // size, _ceil_div(max_tiles, size)))
    return clusters * size


def _pick_block_n(m_blocks: int, n: int, sms: int, block_m: int, wide: bool = False) -> int:
    """The width with the least wave-quantised cost, ties to the wider tile.

    Every wave of tiles costs as much as its slowest tile; a tile costs its MMA work
    (block_m * block_n) plus its operand loads ((block_m + block_n) * K, weighted by
    kLoadWeight, i.e. a 128 x 128 tile is counted half load-bound), so narrow tiles win only
    where they fill otherwise idle SMs. Widths that do not divide 128 pay kOddWidthPenalty
    (192 under 128-row tiles: kWidth192Penalty, measured in session 15):
    measured on H100 (2026-11-25, M = 4096, N = 4096, K = 7168) 112/144/160/192 ran 1.2-1.4x
    slower per unit of work than 128 (two weight scales per K block, no double buffering
    above 128, fewer stages). 256 (two aligned 128-column halves) is a candidate only with
    ``wide`` (large M), without the penalty: its tiles read 25 % fewer L2 bytes per MMA, the
    128 x 128 mainloop's limit (ncu, H100, 2026-12-05).
    """
    best_key, best = None, kBlockNs[0]
    for block_n in kBlockNs:
        if block_n > max(16, _ceil_div(n, 16) * 16):
            break  # wider than the problem: only padding
        if block_n == 256 and not wide:
            continue
        tiles = m_blocks * _ceil_div(n, block_n)
        waves = _ceil_div(tiles, sms)
        cost = waves * (block_m * block_n + kLoadWeight * (block_m + block_n))
        if block_n == 192 and block_m == 128:
            cost *= kWidth192Penalty
        elif 128 % block_n and block_n != 256:
            cost *= kOddWidthPenalty
        key = (cost, -block_n)
        if best_key is None or key < best_key:
            best_key, best = key, block_n
    return best


def _wide_ok(block_m: int, m_blocks: int, n: int, sms: int) -> bool:
    """Whether 128 x 256 tiles are candidates: two math warpgroups and at least kWideMinWaves
    waves of 128 x 128 tiles (short problems keep the narrow tiles that fill the SMs)."""
    return block_m == 128 and m_blocks * _ceil_div(n, 128) >= kWideMinWaves * sms


def _spread_rows(expected_m: int, spread: float) -> int:
    """Rows a masked tile must hold: the mean plus ``spread`` standard deviations of a Poisson
    count (masked_config)."""
    expected_m = max(1, expected_m)
    return expected_m + int(math.ceil(spread * math.sqrt(expected_m)))


def _block_m(rows: int) -> int:
    """One math warpgroup (64 rows) when the rows fit in it, else two."""
    return 64 if rows <= 64 else 128


def _config(rows: int, m_blocks_of, n: int, k: int, sms: int, wide: bool = False) -> GemmConfig:
    block_m = _block_m(rows)
    m_blocks = m_blocks_of(block_m)
    block_n = _pick_block_n(m_blocks, n, sms, block_m, wide and _wide_ok(block_m, m_blocks, n, sms))
    return GemmConfig(block_m, block_n).resolved(k)


def dense_config(m: int, n: int, k: int, sms: int) -> GemmConfig:
    """Config for ``[m, k] x [n, k]^T`` on a device with ``sms`` SMs."""
    return _dense_config(m, n, k, sms, env.wide_tiles(kWideTilesDefault))


@functools.lru_cache(maxsize=4096)
def _dense_config(m: int, n: int, k: int, sms: int, wide: bool) -> GemmConfig:
    config = _config(m, lambda bm: _ceil_div(m, bm), n, k, sms, wide)
    if config.block_n == kBlockNs[0] and n >= 1024 and k >= 4096:
        # Only 16-wide tiles fill the SMs: 64-wide tiles over K slices instead (H100,
        # 2026-12-05, N = 2112, K = 7168: M = 64 16 -> 15 us, M = 128 19 -> 17 us; wider tiles or
        # other shapes were slower: results/gemm_sweep_small_m_h100_2026-12-05.md)
        split = split_k_config(m, n, k, sms, 64)
        if split is not None:
            return split
    if m < config.block_m:
        # One row block with rows past M: load A in chunks below M (out-of-bounds rows cost
        # TMA time; H100, 2026-12-05, N = 4096, K = 7168: M = 1 26.2 -> 22.5 us, M = 16 23.8 ->
        # 20.7, M = 96 25.4 -> 23.3 with 32-row chunks; N = 7168, K = 2048 unchanged at ~13 us;
        # results/small_m_chunks_h100_2026-12-05.md)
        return dataclasses.replace(config, a_row_chunk=kARowChunks[config.block_m])
    if config.block_n == 256:
        return dataclasses.replace(config, cluster_m=2)  # B multicast: 32 KB of L2 reads per 4 M MACs
    if (config.block_m == 128 and _ceil_div(m, 128) >= kMulticastMinMBlocks
            and k <= kMulticastMaxK):
        config = dataclasses.replace(config, cluster_m=2)
    return config


def split_k_config(m: int, n: int, k: int, sms: int, block_n: int = 128):
    """Split K for a small-M dense GEMM (include/split_k.cuh): ``block_n``-wide tiles, the most
    slices (dividing K / 128, at least 2 K blocks each) whose tiles still fit one wave on ``sms``
    SMs; None where fewer than 2 slices fit. ``dense_config`` takes it (64-wide) where its own
    pick is 16 wide, the only case measured faster."""
    block_m = _block_m(m)
    tiles = _ceil_div(m, block_m) * _ceil_div(n, block_n)
    k_blocks = k // kBlockK
    splits = [s for s in range(2, kMaxSplitK + 1)
              if k_blocks % s == 0 and k_blocks // s >= 2 and tiles * s <= sms]
    if not splits:
        return None
    return GemmConfig(block_m, block_n, split_k=max(splits)).resolved(k)


def contiguous_config(m_sum: int, n: int, k: int, sms: int) -> GemmConfig:
    """Config for the contiguous grouped layout (segments of 128 rows; block_m 128 always fits)."""
    return _contiguous_config(m_sum, n, k, sms, env.wide_tiles(kWideTilesDefault),
                              env.contiguous_multicast(kContiguousMulticastDefault))


@functools.lru_cache(maxsize=4096)
def _contiguous_config(m_sum: int, n: int, k: int, sms: int, wide: bool,
                       multicast: bool) -> GemmConfig:
    # 128 x 256 tiles, with ``multicast`` B shared by the two row blocks of a 2-CTA cluster where
    # both belong to one expert (scheduler.cuh kSplitPairs; kContiguousMulticastDefault). A
    # multicast measured 0.92-1.01x of none at 32 experts (H100, 2026-12-05).
    config = _config(m_sum, lambda bm: _ceil_div(m_sum, bm), n, k, sms, wide)
    if multicast and config.block_n == 256:
        config = dataclasses.replace(config, cluster_m=2)
    return config


def masked_config(num_experts: int, expected_m: int, n: int, k: int, sms: int) -> GemmConfig:
    """Config for the masked layout from the host-side hint ``expected_m`` (rows per expert).

    ``expected_m`` is a mean: a decode batch's experts spread around it (routing is random), and
    an expert past the row block reads all its weights a second time for its second block. So
    block_m is chosen for the mean plus ``kMaskedSpread`` standard deviations of a Poisson count
    (H100, 2026-12-05: 256 tokens over 32 experts, mean 64, took 64-row tiles: the routed gate-up
    410 us against ~330 us at 128 tokens; layer 701 -> 607 us), block_n for the mean (a margin
    in the tile count moved E = 1, M = 1024 to 128 x 144: 56 -> 65 us).

    Where the mean is below block_m (decode), A is loaded in 16 / 32-row chunks, only those below
    each expert's masked_m (``MOE_FP8_MASKED_ROW_CHUNKS=0``: whole tiles): a decode runner's tiles
    are sized for its spread or capacity, so a smaller batch (a 256-token runner replayed with one
    token: 128-row tiles holding one row) otherwise pulls as many A bytes from L2 as B bytes from
    DRAM. Full tiles keep one load per slot (chunked, E = 1, M = 1024 ran 2.4x slower).

    Decode tiles sized for the experts a batch is expected to touch instead of all of them (8 of
    32 at one token) measured no gain (H100, session 13: 1 / 2 / 4 tokens 160 / 260 / 372 ->
    160 / 270 / 373 us; removed in session 19)."""
    return _masked_config(num_experts, expected_m, n, k, sms,
                          env.masked_row_chunks(kMaskedRowChunksDefault),
                          env.masked_spread(kMaskedSpread))


@functools.lru_cache(maxsize=4096)
def _masked_config(num_experts: int, expected_m: int, n: int, k: int, sms: int,
                   row_chunks: bool, spread: float) -> GemmConfig:
    expected_m = max(1, expected_m)
    block_m = _block_m(_spread_rows(expected_m, spread))
    chunks = row_chunks and expected_m < block_m
    m_blocks = num_experts * _ceil_div(expected_m, block_m)
    # Full 128-row tiles (at least a wave of 128 x 128) may take 128 x 256: fewer L2 bytes per
    # MMA, as on the dense and contiguous layouts (H100 at its power cap, 2026-12-06, record
    # shapes 1 x 1024 / 2 x 512 / 4 x 256, three interleaved rounds: N = 4096, K = 7168
    # +2 / +7..11 / +1 %, N = 7168, K = 2048 +4 / +4 / +3 %; results/wide_masked_probe_*).
    wide = block_m == 128 and expected_m >= block_m and m_blocks * _ceil_div(n, 128) >= sms
    block_n = _pick_block_n(m_blocks, n, sms, block_m, wide)
    config = GemmConfig(block_m, block_n, a_row_chunk=kARowChunks[block_m] if chunks else 0)
    return config.resolved(k)


def masked_swiglu_config(num_experts: int, expected_m: int, n: int, k: int, sms: int) -> GemmConfig:
    """Config of the fused SwiGLU gate-up GEMM (include/fused_swiglu.cuh) over ``n = 2I`` weight
    rows: the masked layout's block_m and A chunks for ``expected_m``, 256-wide tiles (a gate and
    an up block each); with ``MOE_FP8_SWAP_AB_SWIGLU`` their swap-AB form (tokens on the wgmma N
    side, the ring that fits beside the amax exchange)."""
    return _swiglu_tiles(masked_config(num_experts, expected_m, n, k, sms), k,
                         env.swiglu_deep_ring(kSwigluDeepRingDefault),
                         env.swap_ab_swiglu(kSwapAbSwigluDefault))


def contiguous_swiglu_config(m_sum: int, n: int, k: int, sms: int) -> GemmConfig:
    """Config of the fused SwiGLU gate-up GEMM on the contiguous layout: 128 x 256 tiles (a gate
    and an up block each), as the contiguous GEMM runs the prefill's gate-up, with its B
    multicast (``MOE_FP8_CONTIGUOUS_MULTICAST``: a pair of row blocks shares the two boxes)."""
    return _contiguous_swiglu_config(k, env.contiguous_multicast(kContiguousMulticastDefault),
                                     env.swiglu_deep_ring(kSwigluDeepRingDefault))


# The fused SwiGLU's ring depth: ``deep_ring`` sizes it without an output tile (its epilogue
# writes from registers); off, as many stages as fit beside the bf16 staging tile these kernels
# reserved until session 23 (the measured default until the deeper ring is).
@functools.lru_cache(maxsize=4096)
def _contiguous_swiglu_config(k: int, multicast: bool, deep_ring: bool) -> GemmConfig:
    return GemmConfig(128, 256, cluster_m=2 if multicast else 1).resolved(k, swiglu=deep_ring)


@functools.lru_cache(maxsize=4096)
def _swiglu_tiles(base: GemmConfig, k: int, deep_ring: bool, swap_ab: bool = False) -> GemmConfig:
    return GemmConfig(base.block_m, 256, a_row_chunk=base.a_row_chunk,
                      swap_ab=swap_ab).resolved(k, swiglu=deep_ring or swap_ab)


@functools.lru_cache(maxsize=4096)
def wgrad_config(m: int, n: int, sms: int, d_bytes: int = 4) -> GemmConfig:
    """Config of the k-grouped weight-gradient kernel for ``D [E, m, n]`` (fp32, or bf16 with
    ``d_bytes = 2``).

    Multicast on from two row blocks: on H100 (2026-11-25) 757-768 vs 685-781 TFLOPS without,
    i.e. within the run's spread; it halves B's L2 reads, so it stays. 192-wide tiles where the
    output has at least four of them (single-buffered, 3 stages): fewer L2 bytes per FLOP, which
    is what TFLOPS follow at the power cap; H100 2026-12-06, 5 interleaved rounds
    (experiments/wgrad_width_probe.py): 7168 x 2048 x 4 / 8 experts of 4096 tokens 635 -> 595 /
    1258 -> 1212 us, 4096 x 7168 x 4 experts 1269 -> 1202 us (128 x 160: no gain).

    Outputs at least four 256-wide tiles wide: 128 x 256 (two 128-column halves, 3 stages).
    bf16 (64 KB staging tile); H100 2026-12-06, 4 interleaved rounds against 128 x 192 at 4
    stages: the record rows 550 / 1101 / 1084 -> 542 / 1084 / 1078 us, 32 experts with uneven
    tokens 599 -> 571 us (7168 x 2048) and 1210 -> 1148 us (4096 x 7168)
    (results/wgrad_width_probe_bf16_default_h100_2026-12-06_s22.md). fp32 (staged 128 columns
    at a time, 32 KB per warpgroup); H100 2026-12-06, 3 + 6 interleaved rounds against 128 x 192:
    the uneven rows -1.4 to -3.3 % in every run (accumulate 1414 -> 1386 / 2857 -> 2818 us,
    overwrite 854 -> 831 / 1757 -> 1698 us), the record rows within their ~10 % spread
    (results/wgrad_width_probe_fp32_h100_2026-12-06_s23.md)."""
    block_m = _block_m(m)
    cluster_m = 2 if block_m == 128 and _ceil_div(m, 128) >= kMulticastMinMBlocks else 1
    block_n = kWgradWideBlockN if block_m == 128 and n >= 4 * kWgradWideBlockN else 128
    return GemmConfig(block_m, block_n, cluster_m=cluster_m).resolved(0, wgrad=True,
                                                                      wgrad_d_bytes=d_bytes)
