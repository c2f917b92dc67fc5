"""The GEMM configuration rules (moe_fp8.gemm.heuristics) and the instances they name, on the CPU:
validation, the persistent grid, instance names, and that the multicast variants compile for
sm_90a without local memory or a serialised wgmma pipeline."""
import dataclasses

import pytest

from moe_fp8.gemm import heuristics as H
from moe_fp8.gemm import jit
from moe_fp8.gemm.kernels import fp8_gemm as K


def test_cluster_validation():
    assert H.GemmConfig(64, 16, cluster_n=2).cluster_size == 2
    assert H.GemmConfig(128, 128, cluster_m=2).cluster_size == 2
    with pytest.raises(ValueError, match="cluster_n must be 1 or 2"):
        H.GemmConfig(64, 16, cluster_n=4)
    with pytest.raises(ValueError, match="exclusive"):
        H.GemmConfig(128, 128, cluster_m=2, cluster_n=2)


def test_a_row_chunk_validation():
    assert H.GemmConfig(64, 128, a_row_chunk=16).a_row_chunk == 16
    assert H.GemmConfig(64, 32, a_row_chunk=8).a_row_chunk == 8
    for bad in (4, 48, 64):
        with pytest.raises(ValueError, match="a_row_chunk must be"):
            H.GemmConfig(64, 128, a_row_chunk=bad)
    with pytest.raises(ValueError, match="needs cluster_m = cluster_n = 1"):
        H.GemmConfig(64, 128, a_row_chunk=16, cluster_n=2)
    name = K.kernel_source(4096, 7168, H.GemmConfig(64, 128, a_row_chunk=16).resolved(7168),
                           K.kLayoutMasked).instance
    assert name.endswith(", 1, 1, 1, 16>")


def test_split_k_validation_and_instance():
    config = H.GemmConfig(64, 128, split_k=7).resolved(7168)
    assert config.split_k == 7
    for bad, match in (({"split_k": 0}, "split_k must be in"), ({"split_k": 17}, "split_k must be in"),
                       ({"split_k": 2, "cluster_n": 2}, "needs cluster_m"),
                       ({"split_k": 2, "block_n": 48}, "block_n % 32")):
        with pytest.raises(ValueError, match=match):
            H.GemmConfig(**{"block_m": 64, "block_n": 128, **bad})
    with pytest.raises(ValueError, match="must divide the K blocks"):
        H.GemmConfig(64, 128, split_k=5).resolved(7168)  # 56 K blocks
    # fp32 staging tile and a slice of the scales: fewer stages fit than in the bf16 kernel
    assert H.smem_bytes(128, 128, 4, 7168, split_k=4) == (
        H.smem_bytes(128, 128, 4, 7168) + 128 * 128 * 2 - 2 * 2 * (56 - 14) * 4)
    name = K.kernel_source(2112, 7168, config, K.kLayoutDense)
    assert name.header == "split_k.cuh"
    assert name.instance == "moe_fp8::fp8_gemm_split_k_kernel<2112, 7168, 64, 128, %d, 16, 1, 7>" % (
        config.stages)
    with pytest.raises(ValueError, match="needs the dense layout"):
        K.kernel_source(2112, 7168, config, K.kLayoutMasked)


def test_split_k_instances_compile_clean():
    """Split-K GEMM and reduction instances build for sm_90a without local memory or a serialised
    wgmma pipeline (one math warpgroup with double buffering, two, a straddling width)."""
    from moe_fp8.gemm.precompile import precompile
    sources = [K.kernel_source(n, k, H.GemmConfig(bm, bn, split_k=sk).resolved(k), K.kLayoutDense)
               for n, k, bm, bn, sk in ((2112, 7168, 64, 128, 7), (4096, 7168, 128, 128, 4),
                                        (2112, 1536, 128, 96, 3))]
    sources += [K.reduce_source(sk) for sk in (2, 7)]
    compiled = precompile(sources, verbose=False)
    assert len(compiled) == len(sources)


def test_grid_is_whole_clusters_and_no_more_than_the_tiles():
    config = H.GemmConfig(64, 16, cluster_n=2)
    assert H.grid_size(config, max_tiles=132, sms=132) == 132
    assert H.grid_size(config, max_tiles=10, sms=132) == 10
    assert H.grid_size(config, max_tiles=500, sms=131) == 130  # 65 clusters of 2
    assert H.grid_size(H.GemmConfig(64, 16), max_tiles=500, sms=131) == 131


def test_one_warpgroup_clusters_resolve_single_buffered():
    assert not H.GemmConfig(64, 128, cluster_n=2).resolved(7168).double_buffer
    assert not H.GemmConfig(64, 128, cluster_m=2).resolved(7168).double_buffer
    assert H.GemmConfig(64, 128).resolved(7168).double_buffer
    assert H.GemmConfig(128, 128, cluster_n=2).resolved(7168).double_buffer


def test_instance_names():
    plain = K.kernel_source(2112, 7168, H.GemmConfig(64, 16).resolved(7168), 0).instance
    assert plain.endswith(", 1, 1>")  # the names (and caches) of the plain instances are unchanged
    paired = K.kernel_source(2112, 7168, H.GemmConfig(64, 16, cluster_n=2).resolved(7168), 0)
    assert paired.instance.endswith(", 0, 1, 2>")  # single-buffered, named so


def test_default_heuristics_do_not_pick_a_multicast_yet():
    # A multicast is measured before the heuristics pick it (benchmarks/NOTES.md)
    for m, n, k in K.kDenseShapes:
        assert H.dense_config(m, n, k, K.kH100Sms).cluster_n == 1


def _assert_compiles_clean(source):
    """``source`` compiles for sm_90a without local memory or a serialised wgmma pipeline
    (skips where no CUDA toolkit is installed)."""
    try:
        report = jit.compile_kernel(source).report
    except jit.CompilerUnavailable as error:
        pytest.skip(str(error))
    assert report.spill_stores == report.spill_loads == report.stack_bytes == 0, report
    assert not report.wgmma_serialized, report


@pytest.mark.parametrize("n,k,config,layout", [
    (2112, 7168, H.GemmConfig(64, 16, cluster_n=2), K.kLayoutDense),
    (4096, 7168, H.GemmConfig(128, 32, cluster_n=2), K.kLayoutDense),
    (7168, 2048, H.GemmConfig(64, 64, cluster_n=2), K.kLayoutMasked),
    (4096, 7168, H.GemmConfig(64, 128, cluster_n=2), K.kLayoutMasked),  # the decode tile, paired
    (4096, 7168, H.GemmConfig(128, 128, cluster_n=2), K.kLayoutContiguous),
    (24576, 1536, H.GemmConfig(128, 192, cluster_n=2), K.kLayoutDense),
    (2112, 7168, H.GemmConfig(64, 16, cluster_m=2), K.kLayoutDense),
    (4096, 7168, H.GemmConfig(64, 128, a_row_chunk=16), K.kLayoutMasked),  # decode, A by need
    (7168, 2048, H.GemmConfig(128, 128, a_row_chunk=32), K.kLayoutMasked),
], ids=str)
def test_multicast_instances_compile_clean(n, k, config, layout, tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_FP8_CACHE_DIR", str(tmp_path))
    _assert_compiles_clean(K.kernel_source(n, k, config.resolved(k), layout))


def test_stage_limits():
    """Pinned rings up to kMaxStages (deeper rings for narrow small-M tiles, an experiment);
    the heuristics stay at kDefaultMaxStages."""
    assert H.GemmConfig(64, 32, stages=16).resolved(7168).stages == 16
    for bad in (1, 17):
        with pytest.raises(ValueError, match="stages must be"):
            H.GemmConfig(64, 32, stages=bad)
    with pytest.raises(ValueError, match="shared memory"):
        H.GemmConfig(128, 256, stages=16).resolved(7168)
    for m, n, k in ((1, 4096, 7168), (64, 7168, 2048), (4096, 4096, 7168)):
        assert H.dense_config(m, n, k, 132).stages <= H.kDefaultMaxStages, (m, n, k)


def test_dense_small_m_loads_a_rows_by_need():
    """One row block with rows past M: A in 16 / 32-row chunks (no out-of-bounds rows); whole
    row blocks and several of them: whole-tile boxes; split K (N = 2112) has no chunks."""
    for m, n, k, chunk in ((1, 4096, 7168, 16), (63, 7168, 2048, 16), (64, 4096, 7168, 0),
                           (96, 4096, 7168, 32), (128, 4096, 7168, 0), (200, 4096, 7168, 0),
                           (1, 2112, 7168, 0)):
        assert H.dense_config(m, n, k, 132).a_row_chunk == chunk, (m, n, k)


def test_wide_tiles_switch(monkeypatch):
    """MOE_FP8_WIDE_TILES=1: 128 x 256 tiles for large M (dense and contiguous: B multicast);
    short problems and small M keep their tiles."""
    monkeypatch.setenv("MOE_FP8_WIDE_TILES", "1")
    monkeypatch.delenv("MOE_FP8_CONTIGUOUS_MULTICAST", raising=False)
    c = H.dense_config(4096, 4096, 7168, 132)
    assert (c.block_m, c.block_n, c.cluster_m, c.cluster_n) == (128, 256, 2, 1)
    c = H.contiguous_config(6144, 7168, 2048, 132)
    assert (c.block_n, c.cluster_m, c.cluster_n) == (256, 2, 1)
    for m, n, k in ((128, 4096, 7168), (64, 32768, 512), (1024, 2112, 7168)):
        assert H.dense_config(m, n, k, 132).block_n != 256, (m, n, k)
    monkeypatch.setenv("MOE_FP8_WIDE_TILES", "0")
    assert H.dense_config(4096, 4096, 7168, 132).block_n == 128
    assert H.contiguous_config(6144, 7168, 2048, 132).block_n == 128


def test_masked_tiles_cover_the_spread_of_a_decode_batch(monkeypatch):
    """masked_config: block_m for the mean rows per expert plus three Poisson standard deviations
    (mean 64 -> 128-row tiles, mean 32 -> 64), block_n from the mean (full 128-row tiles over at
    least a wave of 128 x 128: 128 x 256, as measured on the record shapes); A in chunks of 16 / 32
    rows where the mean is below block_m (by default and with MOE_FP8_MASKED_ROW_CHUNKS=1; never
    for full tiles), none with 0; the decode tiles keep their width either way."""
    for setting in (None, "1"):
        if setting is None:
            monkeypatch.delenv("MOE_FP8_MASKED_ROW_CHUNKS", raising=False)
        else:
            monkeypatch.setenv("MOE_FP8_MASKED_ROW_CHUNKS", setting)
        for experts, mean, n, k, tile in ((32, 1, 4096, 7168, (64, 128, 16)),
                                          (32, 32, 7168, 2048, (64, 128, 16)),
                                          (32, 64, 4096, 7168, (128, 128, 32)),
                                          (4, 256, 4096, 7168, (128, 256, 0)),
                                          (1, 1024, 4096, 7168, (128, 256, 0)),
                                          (1, 256, 4096, 7168, (128, 64, 0))):
            c = H.masked_config(experts, mean, n, k, 132)
            assert (c.block_m, c.block_n, c.a_row_chunk) == tile, (setting, experts, mean)
    monkeypatch.setenv("MOE_FP8_MASKED_ROW_CHUNKS", "0")
    assert H.masked_config(32, 1, 4096, 7168, 132).a_row_chunk == 0
    assert H.masked_config(32, 64, 4096, 7168, 132).a_row_chunk == 0
    assert H.masked_config(32, 64, 4096, 7168, 132).block_n == 128


def test_masked_spread_knob(monkeypatch):
    """MOE_FP8_MASKED_SPREAD replaces the three standard deviations block_m must hold: 0 sizes a
    256-token decode's tiles (mean 64 rows per expert) for the mean, 64 rows, whole tiles, and
    their fused SwiGLU twin with them; bad values raise naming the variable."""
    monkeypatch.setenv("MOE_FP8_MASKED_SPREAD", "0")
    c = H.masked_config(32, 64, 7168, 2048, 132)
    assert (c.block_m, c.block_n, c.a_row_chunk) == (64, 128, 0)
    assert H.masked_swiglu_config(32, 64, 4096, 7168, 132).block_m == 64
    monkeypatch.setenv("MOE_FP8_MASKED_SPREAD", "3")
    assert H.masked_config(32, 64, 7168, 2048, 132).block_m == 128
    for bad in ("-1", "wide", "nan"):
        monkeypatch.setenv("MOE_FP8_MASKED_SPREAD", bad)
        with pytest.raises(ValueError, match="MOE_FP8_MASKED_SPREAD"):
            H.masked_config(32, 64, 7168, 2048, 132)


def test_a_multicast_drops_row_chunks():
    """with_a_multicast (benchmarks, the fuzz driver's a_mc cases) on a decode config with A row
    chunks: whole-tile multicast halves, no chunks (the two are exclusive)."""
    config = H.masked_config(32, 1, 4096, 7168, 132)
    assert config.a_row_chunk > 0
    paired = H.with_a_multicast(config, 4096)
    assert paired is not None and (paired.cluster_n, paired.a_row_chunk) == (2, 0)


def test_masked_silu_knob(monkeypatch):
    """MOE_FP8_MASKED_SILU pins the masked SiLU kernel where the caller did not; an explicit
    variant wins; unknown values raise naming the variable; unset: the expected_m rule."""
    from moe_fp8.gemm.kernels import quant as Q
    monkeypatch.delenv("MOE_FP8_MASKED_SILU", raising=False)
    assert Q._pick_masked_variant(None, 64, 256) == "oneshot"
    assert Q._pick_masked_variant(None, 8, 256) == "stream"
    monkeypatch.setenv("MOE_FP8_MASKED_SILU", "stream")
    assert Q._pick_masked_variant(None, 64, 256) == "stream"
    assert Q._pick_masked_variant("oneshot", 8, 256) == "oneshot"
    monkeypatch.setenv("MOE_FP8_MASKED_SILU", "fast")
    with pytest.raises(ValueError, match="MOE_FP8_MASKED_SILU"):
        Q._pick_masked_variant(None, 64, 256)


def test_fused_swiglu_instances():
    """The fused SwiGLU GEMM: 256-wide tiles with the masked layout's block_m and A chunks; its
    instance names the weight rows (2I), K, tile, stages, group, chunk and pow2; other tiles raise."""
    c = H.masked_swiglu_config(32, 1, 4096, 7168, 132)
    assert (c.block_m, c.block_n, c.a_row_chunk) == (64, 256, 16) and c.stages > 0
    c128 = H.masked_swiglu_config(32, 64, 4096, 7168, 132)
    assert (c128.block_m, c128.block_n, c128.a_row_chunk) == (128, 256, 32)
    name = K.swiglu_source(4096, 7168, c, pow2=True).instance
    assert name == f"moe_fp8::fused_swiglu_gemm_kernel<4096, 7168, 64, {c.stages}, 16, 16, true>"
    with pytest.raises(ValueError, match="fused SwiGLU GEMM needs 256-wide tiles"):
        K.swiglu_source(4096, 7168, H.GemmConfig(64, 128).resolved(7168), pow2=False)
    with pytest.raises(ValueError, match="fused SwiGLU GEMM needs 256-wide tiles"):
        K.swiglu_source(4096 + 128, 7168, c, pow2=False)  # I = 2112: not whole 128-blocks pairs


def test_contiguous_multicast_switch(monkeypatch):
    """MOE_FP8_CONTIGUOUS_MULTICAST: the contiguous layout's 128 x 256 tiles take B multicast
    (a 2-CTA cluster); narrower tiles and the switch off keep none."""
    monkeypatch.setenv("MOE_FP8_WIDE_TILES", "1")
    monkeypatch.setenv("MOE_FP8_CONTIGUOUS_MULTICAST", "1")
    c = H.contiguous_config(32768, 4096, 7168, 132)
    assert (c.block_m, c.block_n, c.cluster_m, c.cluster_n) == (128, 256, 2, 1)
    assert H.contiguous_config(1024, 2112, 7168, 132).cluster_m == 1  # short: narrow tiles
    monkeypatch.setenv("MOE_FP8_CONTIGUOUS_MULTICAST", "0")
    assert H.contiguous_config(32768, 4096, 7168, 132).cluster_m == 1


def test_early_b_config_and_instances():
    """GemmConfig.early_b (B before the PDL wait, gemm_core.cuh kEarlyB): its own instance name,
    no cluster or split K, refused by the kernels that cannot honour it; the decode down GEMM's
    early instances compile for sm_90a without local memory or a serialised wgmma pipeline."""
    import dataclasses

    from moe_fp8.gemm.kernels import wgrad
    from moe_fp8.gemm.precompile import precompile
    for bad in ({"cluster_n": 2}, {"cluster_m": 2}, {"split_k": 2}):
        with pytest.raises(ValueError, match="early_b needs no cluster"):
            H.GemmConfig(**{"block_m": 128, "block_n": 128, "early_b": True, **bad})
    plain = H.masked_config(32, 1, 7168, 2048, 132).resolved(2048)
    early = dataclasses.replace(plain, early_b=True)
    name = K.kernel_source(7168, 2048, early, K.kLayoutMasked).instance
    assert name == K.kernel_source(7168, 2048, plain, K.kLayoutMasked).instance[:-1] + ", true>"
    full_tiles = H.GemmConfig(128, 128, early_b=True).resolved(2048)
    assert K.kernel_source(7168, 2048, full_tiles, K.kLayoutMasked).instance.endswith(
        ", 1, 1, 1, 0, true>")
    with pytest.raises(ValueError, match="masked or dense layout"):
        K.kernel_source(7168, 2048, early, K.kLayoutContiguous)
    with pytest.raises(ValueError, match="early B"):
        K.swiglu_source(4096, 7168, H.GemmConfig(64, 256, early_b=True).resolved(7168), False)
    with pytest.raises(ValueError, match="early_b"):
        wgrad.kernel_source(2048, H.GemmConfig(128, 128, early_b=True).resolved(0, wgrad=True))
    sources = [K.kernel_source(7168, 2048, dataclasses.replace(
        H.masked_config(32, m, 7168, 2048, 132), early_b=True).resolved(2048), K.kLayoutMasked)
        for m in (1, 48, 128)]
    sources.append(K.kernel_source(7168, 2048, full_tiles, K.kLayoutDense))
    assert len(precompile(sources, verbose=False)) == len(sources)


def test_swap_ab_config_and_instances(tmp_path, monkeypatch):
    """GemmConfig.swap_ab (tokens on the wgmma N side, include/swap_ab.cuh): 128-wide weight
    tiles, no cluster or split K, the masked layout only, two math warpgroups whatever block_m;
    its instances compile for sm_90a without local memory or a serialised wgmma pipeline."""
    for bad in ({"block_n": 64}, {"cluster_m": 2}, {"split_k": 2}):
        with pytest.raises(ValueError, match="swap_ab needs"):
            H.GemmConfig(**{"block_m": 128, "block_n": 128, "swap_ab": True, **bad})
    config = H.GemmConfig(64, 128, a_row_chunk=16, swap_ab=True).resolved(2048)
    assert config.num_threads == 384
    assert H.smem_bytes(64, 128, config.stages, 2048) <= H.kMaxSmemBytes
    name = K.kernel_source(7168, 2048, config, K.kLayoutMasked).instance
    assert name == f"moe_fp8::fp8_gemm_swap_ab_kernel<7168, 2048, 64, {config.stages}, 16, 16, false>"
    for layout in (K.kLayoutDense, K.kLayoutContiguous):
        with pytest.raises(ValueError, match="masked layout"):
            K.kernel_source(7168, 2048, config, layout)
    monkeypatch.setenv("MOE_FP8_CACHE_DIR", str(tmp_path))
    for n, k, block_m in ((7168, 2048, 128), (4096, 7168, 64)):
        source = K.kernel_source(n, k, H.GemmConfig(block_m, 128, a_row_chunk=16, swap_ab=True,
                                                    early_b=True).resolved(k), K.kLayoutMasked)
        try:
            report = jit.compile_kernel(source).report
        except jit.CompilerUnavailable as error:  # no CUDA toolkit on this machine
            pytest.skip(str(error))
        assert report.spill_stores == 0 and report.stack_bytes == 0, report
        assert not report.wgmma_serialized, report


def test_wgrad_wide_configs_and_instances(tmp_path, monkeypatch):
    """fp32 and bf16 weight gradients on 128 x 256 tiles at 3 stages (fp32 staged 128 columns at
    a time: the same 64 KB as the whole bf16 tile); the bf16 instances have their own names and
    never accumulate; all compile for sm_90a without local memory or a serialised wgmma
    pipeline."""
    from moe_fp8.gemm.kernels import wgrad
    fp32, bf16 = H.wgrad_config(7168, 2048, 132), H.wgrad_config(7168, 2048, 132, 2)
    assert (fp32.block_n, fp32.stages, bf16.block_n, bf16.stages) == (256, 3, 256, 3)
    assert (H.smem_bytes(128, 256, 3, 0, wgrad=True)
            == H.smem_bytes(128, 256, 3, 0, wgrad=True, wgrad_d_bytes=2) <= H.kMaxSmemBytes)
    name = wgrad.kernel_source(2048, bf16, False, True).instance
    assert name.endswith(", false, true>")
    assert name != wgrad.kernel_source(2048, bf16, False).instance
    with pytest.raises(ValueError, match="never accumulated"):
        wgrad.kernel_source(2048, bf16, True, True)
    monkeypatch.setenv("MOE_FP8_CACHE_DIR", str(tmp_path))
    for source in wgrad.bundled_sources():
        _assert_compiles_clean(source)


def test_swiglu_ring_without_output_tile(tmp_path, monkeypatch):
    """The fused SwiGLU GEMMs reserve no output tile (their epilogue writes from registers):
    MOE_FP8_SWIGLU_DEEP_RING=1 gives them the ring that then fits (DeepSeek-V3's gate-up, K = 7168:
    4 stages at 128 rows, 5 at 64), off keeps the depth they had beside the unused bf16 tile
    (3 / 4); the deep instances compile for sm_90a without local memory or a serialised wgmma
    pipeline."""
    n, k = 4096, 7168
    depths = {}
    for deep in ("0", "1"):
        monkeypatch.setenv("MOE_FP8_SWIGLU_DEEP_RING", deep)
        depths[deep] = (H.masked_swiglu_config(32, 64, n, k, 132),
                        H.masked_swiglu_config(32, 1, n, k, 132),
                        H.contiguous_swiglu_config(8192, n, k, 132))
    assert [(c.block_m, c.stages) for c in depths["0"]] == [(128, 3), (64, 4), (128, 3)]
    assert [(c.block_m, c.stages) for c in depths["1"]] == [(128, 4), (64, 5), (128, 4)]
    for c in depths["1"]:
        assert H.smem_bytes(c.block_m, 256, c.stages, k, swiglu=True) <= H.kMaxSmemBytes
        assert H.smem_bytes(c.block_m, 256, c.stages + 1, k, swiglu=True) > H.kMaxSmemBytes
        with pytest.raises(ValueError, match="shared memory"):
            c.resolved(k)  # beside a bf16 output tile this ring does not fit
        assert c.resolved(k, swiglu=True) == c
    masked128, masked64, contiguous = depths["1"]
    sources = [K.swiglu_source(n, k, masked128, False), K.swiglu_source(n, k, masked64, False),
               K.swiglu_source(n, k, masked128, False, gather=True),
               K.swiglu_source(n, k, contiguous, False, K.kLayoutContiguous)]
    monkeypatch.setenv("MOE_FP8_CACHE_DIR", str(tmp_path))
    for source in sources:
        _assert_compiles_clean(source)


def test_swap_ab_swiglu_config(tmp_path, monkeypatch):
    """MOE_FP8_SWAP_AB_SWIGLU=1 gives the decode gate-up its swap-AB twin: the same token tile and
    row chunks, 384 threads whatever block_m, the ring that fits beside the 20 bytes per row of
    amax exchange (4 stages at 128 rows, 5 at 64); instance names end in `true` (the others keep
    theirs); the swap-AB instances (gather and row chunks) compile for sm_90a without local memory
    or a serialised wgmma pipeline; the contiguous layout and a plain swap-AB GEMM 256 wide are
    rejected."""
    n, k = 4096, 7168
    monkeypatch.setenv("MOE_FP8_SWAP_AB_SWIGLU", "1")
    swapped = [H.masked_swiglu_config(32, em, n, k, 132) for em in (64, 1)]
    monkeypatch.setenv("MOE_FP8_SWAP_AB_SWIGLU", "0")
    plain = [H.masked_swiglu_config(32, em, n, k, 132) for em in (64, 1)]
    for s, p in zip(swapped, plain):
        assert s.swap_ab and not p.swap_ab
        assert (s.block_m, s.block_n, s.a_row_chunk) == (p.block_m, p.block_n, p.a_row_chunk)
        assert s.num_threads == 384
        assert H.smem_bytes(s.block_m, 256, s.stages, k, swiglu=True, swap_ab=True) <= H.kMaxSmemBytes
        assert (H.smem_bytes(s.block_m, 256, s.stages + 1, k, swiglu=True, swap_ab=True)
                > H.kMaxSmemBytes)
    assert [(c.block_m, c.stages) for c in swapped] == [(128, 4), (64, 5)]
    assert K.swiglu_source(n, k, swapped[0], False).instance.endswith(", 2, 1, true>")
    assert K.swiglu_source(n, k, swapped[0], False, gather=True).instance.endswith(", false, true>")
    assert K.swiglu_source(n, k, plain[0], False, gather=True).instance.endswith(", false>")
    with pytest.raises(ValueError, match="masked layout"):
        K.swiglu_source(n, k, H.GemmConfig(128, 256, swap_ab=True).resolved(k, swiglu=True), False,
                        K.kLayoutContiguous)
    with pytest.raises(ValueError, match="block_n = 128"):
        K.kernel_source(n, k, H.GemmConfig(128, 256, swap_ab=True).resolved(k), K.kLayoutMasked)
    monkeypatch.setenv("MOE_FP8_CACHE_DIR", str(tmp_path))
    for config in swapped:
        for gather in (False, True):
            _assert_compiles_clean(K.swiglu_source(n, k, config, False, gather=gather))


def test_swap_ab_96_token_tiles(tmp_path, monkeypatch):
    """MOE_FP8_SWAP_AB_96=1 gives the swap-AB down GEMM (DeepSeek-V3's, N = 7168, K = 2048)
    96-token tiles where the masked spread fits 96 rows (256 tokens over 32 experts: 64 rows
    each): 7 ring stages instead of 5, the same row chunks and early weights; tiles sized for
    more (or fewer) rows and the switch off keep the masked config's block_m; 96 is a swap-AB
    size only; the instance (row chunks, early weights) compiles for sm_90a without local memory
    or a serialised wgmma pipeline."""
    n, k = 7168, 2048
    base = dataclasses.replace(H.masked_config(32, 64, n, k, 132), early_b=True)
    monkeypatch.setenv("MOE_FP8_SWAP_AB_96", "0")
    assert (H.as_swap_ab(base, k, 64).block_m, H.as_swap_ab(base, k, 64).stages) == (128, 5)
    monkeypatch.setenv("MOE_FP8_SWAP_AB_96", "1")
    c = H.as_swap_ab(base, k, 64)
    assert (c.block_m, c.stages, c.a_row_chunk, c.early_b, c.swap_ab) == (96, 7, 32, True, True)
    assert H.smem_bytes(96, 128, 7, k) <= H.kMaxSmemBytes < H.smem_bytes(96, 128, 8, k)
    assert H.as_swap_ab(base, k).block_m == 128  # no expected rows: the config's own tile
    assert H.as_swap_ab(base, k, 100).block_m == 128  # 100 + 30 rows do not fit 96
    small = H.masked_config(32, 8, n, k, 132)
    assert H.as_swap_ab(small, k, 8).block_m == 64
    with pytest.raises(ValueError, match="block_m"):
        H.GemmConfig(96, 128)
    monkeypatch.setenv("MOE_FP8_CACHE_DIR", str(tmp_path))
    _assert_compiles_clean(K.kernel_source(n, k, c, K.kLayoutMasked))
