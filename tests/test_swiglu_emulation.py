"""The fused SwiGLU GEMM's epilogue (include/fused_swiglu.cuh, ``EpilogueSwiGlu``) emulated on the
CPU against the masked SiLU-and-mul quantisation kernel it replaces (include/quant.cuh, the one-shot
form), both compiled with g++ (tests/kernel_checks.py's quant prelude) — no GPU needed.

The epilogue receives a math warpgroup's accumulators in wgmma's register layout (PTX ISA,
"wgmma .m64nNk32 register fragment for D": row 16 warp + lane / 4 (+ 8 for the second pair),
columns 8 j + 2 (lane % 4) + {0, 1}); this test builds those registers from a fp32 product tile
[gate block t | up block t], so it checks what a GPU run would otherwise be the first to see:
the fragment-to-column mapping, the quad's amax, where the bytes and the MN-major scales land,
and that rows at or past masked_m stay untouched. The unfused pair gets h = bf16(product), the
rounding of the masked GEMM's store; bytes and scales must be identical. The device-only parts
(the paired B boxes, wgmma, the device's expf) are tests/test_gemm_gpu.py's
``test_masked_swiglu_is_gemm_then_silu``.
"""
import types

import pytest
import torch

from moe_fp8.gemm.jit import env
from moe_fp8.gemm.kernels import quant as quant_kernels
from moe_fp8.gemm.jit.runtime import i32, i64
from moe_fp8.gemm.layout import empty_act_scales

from kernel_checks import EmulatedKernel, compile_harness, kQuantPrelude, launch_code

kInter = 512  # I: four 128-column blocks t per expert
kMasked, kContiguous = "moe_fp8::kLayoutMasked", "moe_fp8::kLayoutContiguous"


def _probe(pow2: bool, layout: str) -> str:
    return f"swiglu_epilogue_probe<{2 * kInter}, {str(pow2).lower()}, {layout}>"
kBlockM = 128  # two math warpgroups
# the one-shot masked SiLU kernel (the stream kernel's 8-lane shuffles are beyond the harness)
kSiluInstances = [quant_kernels.silu_oneshot_source(128, p, masked).instance
                  for p in (False, True) for masked in (True, False)]


def _header(name: str, *drop: str) -> str:
    """The text of an include/ header without the lines ``drop`` (includes g++ cannot take)."""
    text = (env.kIncludeDir / name).read_text()
    for line in drop:
        assert line in text, f"{name} no longer has {line}"
        text = text.replace(line, "")
    return text


def _harness() -> str:
    stubs = r'''
#define __host__
#define __grid_constant__
#include "quant.cuh"
namespace moe_fp8 {
namespace ptx {
struct TmaDesc {};
// cvt.rn.bf16x2.f32 (nearest even, NaN -> the canonical 0x7FFF; the low half from lo)
inline unsigned bf16_bits(float f) {
  unsigned u = __float_as_uint(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FFFu;
  return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
}
inline unsigned pack_bf16x2(float lo, float hi) { return bf16_bits(lo) | bf16_bits(hi) << 16; }
}  // namespace ptx
}  // namespace moe_fp8
'''
    epilogue_stubs = r'''
namespace moe_fp8 {
template <int, int, int> struct Epilogue { static constexpr int kBytes = 0; };
template <typename Policy, typename... Args> void gemm_body(Args&&...) {}
template <int> struct SwapAbSwiGluSmem { static constexpr int kBytes = 0; };
template <bool> struct SwapAbSwiGluTile {};
}  // namespace moe_fp8
'''
    probe = r'''
// One tile's epilogue: kBlockM / 64 warpgroups of 128 threads; thread x's 128 accumulators at
// acc[x * 128 ..]. m: M_max (masked) or M_sum (contiguous); layout: m_indices (contiguous) or null.
template <int kN, bool kPow2, int kLayout>
void swiglu_epilogue_probe(const float* acc, int m_row, int n0, int rows_valid, int m,
                           int num_experts, const int* layout, void* act, float* act_s,
                           long long s_batch, long long s_group) {
  float r_acc[128];
  for (int i = 0; i < 128; ++i) r_acc[i] = acc[threadIdx.x * 128 + i];
  moe_fp8::Tile tile{};
  tile.m_row = m_row;
  tile.n0 = n0;
  tile.rows_valid = rows_valid;
  const moe_fp8::GemmParams params{m, num_experts, layout, nullptr, act, act_s, s_batch, s_group};
  moe_fp8::EpilogueSwiGlu<kN, kPow2, kLayout>::write_tile(r_acc, nullptr, nullptr, tile, params,
                                                          threadIdx.x / 128, threadIdx.x % 128, 0);
}
'''
    probes = [_probe(p, layout) for p in (False, True) for layout in (kMasked, kContiguous)]
    return (kQuantPrelude + stubs + _header("scheduler.cuh", '#include "ptx.cuh"') + epilogue_stubs
            + _header("fused_swiglu.cuh", '#include "fp8_gemm.cuh"', '#include "quant.cuh"',
                      '#include "swap_ab_swiglu.cuh"')
            + probe + launch_code(probes + kSiluInstances))


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    return compile_harness(tmp_path_factory.mktemp("swiglu_emulation"), _harness(), "swiglu_emulation")


def _fragments(tile: torch.Tensor) -> torch.Tensor:
    """fp32 [kBlockM, 256] -> [kBlockM / 64 * 128 threads, 128] wgmma accumulators: thread
    (warpgroup g, warp w, lane l), index i = 4 j + 2 p + c holds row 64 g + 16 w + 8 p + l / 4,
    column 8 j + 2 (l % 4) + c."""
    threads = torch.arange(kBlockM // 64 * 128)
    i = torch.arange(128)
    g, w, lane = threads // 128, threads % 128 // 32, threads % 32
    j, p, c = i // 4, i // 2 % 2, i % 2
    rows = (64 * g + 16 * w + lane // 4)[:, None] + 8 * p[None, :]
    cols = (2 * (lane % 4))[:, None] + (8 * j + c)[None, :]
    return tile[rows, cols].contiguous()


def _products(counts, m_max, seed):
    """fp32 gate-up products [E, m_max, 2I] of varied magnitude, with values in the SiLU's special
    ranges (exp(-g) overflow, d >= 2^126, +-inf, NaN) in a few rows."""
    gen = torch.Generator().manual_seed(seed)
    d = torch.randn(len(counts), m_max, 2 * kInter, generator=gen)
    d *= torch.pow(10.0, torch.empty(len(counts), m_max, 1).uniform_(-3, 3, generator=gen))
    d[:, 3] *= 400.0
    d[:, 4, :kInter:7] = -88.0  # d = 1 + exp(88) >= 2^126
    d[:, 6, 1] = float("inf")
    d[:, 6, 130] = float("-inf")
    d[:, 7, 260] = float("nan")
    d[:, 8] = 0.0
    return d


@pytest.mark.parametrize("pow2", [False, True])
def test_swiglu_epilogue_writes_what_gemm_then_silu_writes(emulator, monkeypatch, pow2):
    from moe_fp8.gemm.kernels import quant
    counts, m_max = [0, 1, 9, 64, 65, 128, 200], 200
    experts = len(counts)
    d = _products(counts, m_max, seed=7 + pow2)
    masked_m = torch.tensor(counts, dtype=torch.int32)

    # the fused epilogue: every tile the scheduler would give it (rows >= masked_m[e] get NaN
    # accumulators, as garbage the epilogue must not write)
    got_q = torch.full((experts, m_max, kInter), 0x5A, dtype=torch.uint8)
    got_s = empty_act_scales(m_max, kInter // 128, experts)
    got_s.fill_(-7.0)
    probe = EmulatedKernel(emulator, types.SimpleNamespace(instance=_probe(pow2, kMasked)))
    s_batch, s_group = got_s.stride(0), got_s.stride(2)
    assert got_s.stride(1) == 1  # MN-major: the down GEMM's A scales
    for e, rows in enumerate(counts):
        for m0 in range(0, rows, kBlockM):
            block = torch.full((kBlockM, 2 * kInter), float("nan"))
            valid = min(kBlockM, m_max - m0)
            block[:valid] = d[e, m0:m0 + valid]
            block[rows - m0:] = float("nan")
            for t in range(kInter // 128):
                tile = torch.cat([block[:, 128 * t:128 * t + 128],
                                  block[:, kInter + 128 * t:kInter + 128 * t + 128]], dim=1)
                probe.launch(1, kBlockM // 64 * 128, 0,
                             [_fragments(tile), i32(e * m_max + m0), i32(128 * t), i32(rows - m0),
                              i32(m_max), i32(experts), None, got_q, got_s, i64(s_batch),
                              i64(s_group)])

    # the unfused pair: the masked GEMM's bf16 store, then each masked SiLU kernel
    h = d.to(torch.bfloat16)
    monkeypatch.setattr(quant, "get_kernel", lambda src, *a: EmulatedKernel(emulator, src))
    want_q = torch.full_like(got_q, 0x5A)
    want_s = torch.full_like(got_s, -7.0)
    quant.silu_and_mul_quant(h, want_q.view(torch.float8_e4m3fn), want_s, masked_m, 128, pow2,
                             variant="oneshot")
    what = f"pow2={pow2}"
    diff = got_q != want_q
    assert not diff.any(), f"{what}: {int(diff.sum())} bytes differ, e.g. {diff.nonzero()[:4].tolist()}"
    bits = got_s.view(torch.int32) != want_s.view(torch.int32)
    assert not bits.any(), f"{what}: scales differ at {bits.nonzero()[:4].tolist()}"
    # rows >= masked_m keep their poison; every valid row was written
    for e, rows in enumerate(counts):
        assert (got_q[e, rows:] == 0x5A).all() and (got_s[e, rows:] == -7.0).all()
        assert not (got_s[e, :rows] == -7.0).any()


@pytest.mark.parametrize("pow2", [False, True])
def test_contiguous_swiglu_epilogue_writes_what_gemm_then_silu_writes(emulator, monkeypatch, pow2):
    """The contiguous layout's epilogue (the prefill's fused SwiGLU): the bytes and scales of the
    SiLU-and-mul kernel on every expert row, and nothing on the padding rows (m_indices -1) of the
    tiles the scheduler gives it (all-padding segments it never gives)."""
    from moe_fp8.gemm.kernels import quant
    from moe_fp8.gemm.layout import build_m_indices
    counts = [0, 1, 9, 64, 65, 128, 200]
    m_indices = build_m_indices(counts)
    m_sum, experts = m_indices.numel(), len(counts)
    d = _products([1], m_sum, seed=11 + pow2)[0]
    d[256:265] = d[0:9].clone()  # _products' special rows (3-8) inside expert 3's rows (256-319)
    d[m_indices < 0] = float("nan")  # padding rows: garbage the epilogue must not write
    got_q = torch.full((m_sum, kInter), 0x5A, dtype=torch.uint8)
    got_s = empty_act_scales(m_sum, kInter // 128)
    got_s.fill_(-7.0)
    assert got_s.stride(0) == 1  # MN-major
    probe = EmulatedKernel(emulator, types.SimpleNamespace(instance=_probe(pow2, kContiguous)))
    for m0 in range(0, m_sum, kBlockM):
        if int(m_indices[m0]) < 0:
            continue  # the scheduler skips padding tiles
        block = d[m0:m0 + kBlockM]
        for t in range(kInter // 128):
            tile = torch.cat([block[:, 128 * t:128 * t + 128],
                              block[:, kInter + 128 * t:kInter + 128 * t + 128]], dim=1)
            probe.launch(1, kBlockM // 64 * 128, 0,
                         [_fragments(tile), i32(m0), i32(128 * t), i32(m_sum - m0), i32(m_sum),
                          i32(experts), m_indices, got_q, got_s, i64(0), i64(got_s.stride(1))])

    monkeypatch.setattr(quant, "get_kernel", lambda src, *a: EmulatedKernel(emulator, src))
    want_q = torch.full_like(got_q, 0x5A)
    want_s = empty_act_scales(m_sum, kInter // 128)
    want_s.fill_(-7.0)
    quant.silu_and_mul_quant(d.to(torch.bfloat16), want_q.view(torch.float8_e4m3fn), want_s, None,
                             128, pow2, variant="oneshot")
    rows = m_indices >= 0
    what = f"contiguous pow2={pow2}"
    diff = got_q[rows] != want_q[rows]
    assert not diff.any(), f"{what}: {int(diff.sum())} bytes differ"
    bits = got_s[rows].view(torch.int32) != want_s[rows].view(torch.int32)
    assert not bits.any(), f"{what}: scales differ at {bits.nonzero()[:4].tolist()}"
    assert (got_q[~rows] == 0x5A).all() and (got_s[~rows] == -7.0).all(), f"{what}: padding written"
