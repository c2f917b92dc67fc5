"""The GEMM host launchers' argument lists against their kernels' parameters, on the CPU.

Each host function of ``moe_fp8.gemm.kernels.fp8_gemm`` / ``wgrad`` is called with CPU tensors of
valid shapes; the kernel it asks for is compiled for sm_90a here (NVRTC / nvcc, no GPU), and its
launch goes through ``jit.runtime.pack_args`` against the parameter sizes read from that cubin,
as a real launch does: the argument count, each scalar's width and each TMA descriptor's 128
bytes must match, and the CTA's shared memory must fit sm_90's 227 KB. TMA descriptors are stand-ins (encoding them needs the driver) and nothing runs.
A GPU run would fail the same way at its first launch; this finds it without one (e.g. the fused
SwiGLU GEMM, built without a GPU lent).
"""
import ctypes

import pytest
import torch

from moe_fp8.gemm import heuristics as H
from moe_fp8.gemm import jit
from moe_fp8.gemm.jit import elf
from moe_fp8.gemm.jit.runtime import pack_args
from moe_fp8.gemm.layout import empty_act_scales

FP8 = torch.float8_e4m3fn
kSmemPerBlock = 227 * 1024  # sm_90's opt-in maximum of dynamic + static shared memory per CTA


class StandInMap:
    """A TensorMap's launch interface: 128 bytes at ``address``."""

    def __init__(self):
        self.raw = (ctypes.c_uint8 * 128)()
        self.address = ctypes.addressof(self.raw)


class ContractKernel:
    """jit.Kernel's launch checks on a cubin compiled here, without a driver."""

    def __init__(self, src, log):
        try:
            compiled = jit.compile_kernel(src)
        except jit.CompilerUnavailable as error:
            pytest.skip(f"no CUDA compiler: {error}")
        self.instance = src.instance
        self.static_smem = compiled.report.static_smem
        self.param_sizes = elf.kernel_param_sizes(compiled.cubin, compiled.symbol)
        assert self.param_sizes is not None, f"{src.instance}: no parameter sizes in the cubin"
        self.log = log

    def launch(self, grid, block, smem_bytes, args, cluster=(1, 1, 1)):
        pack_args(self.instance, self.param_sizes, args)  # raises TypeError on a mismatch
        # a CTA's shared memory within the H100's opt-in limit (227 KB), threads within 1024
        assert smem_bytes + self.static_smem <= kSmemPerBlock, (self.instance, smem_bytes)
        threads = block[0] if isinstance(block, tuple) else block
        assert 0 < threads <= 1024, (self.instance, block)
        self.log.append((self.instance, grid, block, smem_bytes, cluster))


@pytest.fixture
def launches(monkeypatch):
    from moe_fp8.gemm.kernels import fp8_gemm, wgrad
    log = []
    monkeypatch.setattr(wgrad, "_kernels", {})
    monkeypatch.setattr(jit, "get_kernel", lambda src, device=None: ContractKernel(src, log))
    monkeypatch.setattr(jit, "make_tma_2d", lambda *a, **k: StandInMap())
    monkeypatch.setattr(jit, "make_tma_3d", lambda *a, **k: StandInMap())
    monkeypatch.setattr(H, "num_sms", lambda device: 132)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(fp8_gemm, "max_active_clusters", lambda *a: 66)
    monkeypatch.setattr(fp8_gemm, "_kernels", {})
    monkeypatch.setattr(fp8_gemm, "_tma_cache", fp8_gemm._tma_cache.__class__())
    return log


def fp8(*shape):
    return torch.empty(shape, dtype=FP8)  # never read: only shapes, strides and addresses matter


def test_dense_and_grouped_launches(launches):
    from moe_fp8.gemm.kernels import fp8_gemm as K
    from moe_fp8.gemm.layout import build_m_indices
    m, n, k, experts = 256, 1024, 512, 4
    K.fp8_gemm_nt(fp8(m, k), empty_act_scales(m, k // 128), fp8(n, k),
                  torch.ones(n // 128, k // 128), torch.empty(m, n, dtype=torch.bfloat16))
    K.fp8_gemm_nt(fp8(1, 7168), empty_act_scales(1, 56), fp8(2112, 7168),  # split K at M = 1
                  torch.ones(17, 56), torch.empty(1, 2112, dtype=torch.bfloat16))
    m_indices = build_m_indices([128, 0, 256, 128])
    rows = m_indices.shape[0]
    K.m_grouped_contiguous(fp8(rows, k), empty_act_scales(rows, k // 128), fp8(experts, n, k),
                           torch.ones(experts, n // 128, k // 128), m_indices,
                           torch.empty(rows, n, dtype=torch.bfloat16))
    m_max = 64
    masked_m = torch.tensor([1, 0, 64, 17], dtype=torch.int32)
    for expected_m in (1, 64):
        K.m_grouped_masked(fp8(experts, m_max, k), empty_act_scales(m_max, k // 128, experts),
                           fp8(experts, n, k), torch.ones(experts, n // 128, k // 128), masked_m,
                           expected_m, torch.empty(experts, m_max, n, dtype=torch.bfloat16))
    names = [entry[0] for entry in launches]
    assert any("split_k_reduce" in name for name in names), names
    assert len(launches) >= 5


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("shape", [(4, 64, 512, 1024), (32, 1, 2048, 7168), (32, 256, 2048, 7168)],
                         ids=["small", "dsv3-1-token", "dsv3-256-tokens"])
def test_fused_swiglu_launch(launches, pow2, shape):
    """The fused SwiGLU GEMM (fused_swiglu.cuh, session 10): act fp8 [E, M_max, I] and its
    MN-major scales, decode (expected_m 1) and M_max-row tiles, DeepSeek-V3's gate-up shape."""
    from moe_fp8.gemm.kernels import fp8_gemm as K
    experts, m_max, inter, k = shape
    masked_m = torch.randint(0, m_max + 1, (experts,), dtype=torch.int32)
    for expected_m in (1, m_max):
        K.m_grouped_masked_swiglu(fp8(experts, m_max, k), empty_act_scales(m_max, k // 128, experts),
                                  fp8(experts, 2 * inter, k),
                                  torch.empty(experts, 2 * inter // 128, k // 128), masked_m,
                                  expected_m, fp8(experts, m_max, inter),
                                  empty_act_scales(m_max, inter // 128, experts), pow2=pow2)
    assert [entry[0] for entry in launches] and all("fused_swiglu_gemm_kernel" in entry[0]
                                                    for entry in launches)


@pytest.mark.parametrize("shape", [(4, 64, 512, 1024), (32, 128, 2048, 7168)], ids=["small", "dsv3"])
def test_fused_swiglu_gather_launch(launches, shape):
    """The gathering fused SwiGLU GEMM (MOE_FP8_DECODE_GATHER): A's rows from the token matrix
    x [T, K] at row_token [E + 1, M_max] (the dispatch's, trash bucket included); its own
    instance with the row map and x last; bad gather operands (x with strided rows, or
    broadcast, included) raise ValueError."""
    from moe_fp8.gemm.kernels import fp8_gemm as K
    experts, m_max, inter, k = shape
    masked_m = torch.randint(0, m_max + 1, (experts,), dtype=torch.int32)
    row_token = torch.zeros(experts + 1, m_max, dtype=torch.int64)
    x = fp8(300, k)
    args = (fp8(experts, m_max, k), empty_act_scales(m_max, k // 128, experts),
            fp8(experts, 2 * inter, k), torch.empty(experts, 2 * inter // 128, k // 128), masked_m)
    outs = (fp8(experts, m_max, inter), empty_act_scales(m_max, inter // 128, experts))
    for expected_m in (1, m_max):
        K.m_grouped_masked_swiglu(*args, expected_m, *outs, gather=(x, row_token[:experts]))
    assert [entry[0] for entry in launches] and all("fused_swiglu_gather_kernel" in entry[0]
                                                    for entry in launches)
    for bad in ((fp8(300, k + 128), row_token), (x, row_token[:, :-1]), (x, row_token.int()),
                (x, row_token[: experts - 1]), (x, row_token.t().contiguous().t()),
                (fp8(300, 2 * k)[:, :k], row_token),
                (fp8(1, k).expand((1 << 32) // k + 1, k), row_token)):
        with pytest.raises(ValueError, match="gather needs"):
            K.m_grouped_masked_swiglu(*args, m_max, *outs, gather=bad)


@pytest.mark.parametrize("shape", [(4, 512, 1024), (32, 2048, 7168)], ids=["small", "dsv3"])
def test_contiguous_swiglu_launch(launches, shape):
    """The fused SwiGLU GEMM on the contiguous layout (m_indices, session 14): act fp8 [M_sum, I]
    and its 2-D MN-major scales; the layout's kernel instance, not the masked one, with B
    multicast by default (launched as 2-CTA clusters, an even grid)."""
    from moe_fp8.gemm.kernels import fp8_gemm as K
    from moe_fp8.gemm.layout import build_m_indices
    experts, inter, k = shape
    m_indices = build_m_indices([5, 0, 300] + [128] * (experts - 3))
    rows = m_indices.shape[0]
    K.m_grouped_contiguous_swiglu(fp8(rows, k), empty_act_scales(rows, k // 128),
                                  fp8(experts, 2 * inter, k),
                                  torch.empty(experts, 2 * inter // 128, k // 128), m_indices,
                                  fp8(rows, inter), empty_act_scales(rows, inter // 128))
    names = [entry[0] for entry in launches]
    assert names and all("fused_swiglu_gemm_kernel" in n and n.endswith(", 1, 2>") for n in names), names
    assert all(entry[4] == (2, 1, 1) and entry[1][0] % 2 == 0 for entry in launches), launches
    with pytest.raises(ValueError, match="MN-major"):
        K.m_grouped_contiguous_swiglu(fp8(rows, k), empty_act_scales(rows, k // 128),
                                      fp8(experts, 2 * inter, k),
                                      torch.empty(experts, 2 * inter // 128, k // 128), m_indices,
                                      fp8(rows, inter), torch.empty(rows, inter // 128))


def test_swiglu_pinned_config_gets_stages(launches):
    """A config pinned without stages (GemmConfig's default 0) is resolved by both fused SwiGLU
    launches, as by the GEMM launches: stages 0 would build a kernel without a ring (session 36:
    an illegal access on the H100)."""
    from moe_fp8.gemm.kernels import fp8_gemm as K
    from moe_fp8.gemm.layout import build_m_indices
    experts, inter, k = 4, 512, 1024
    m_indices = build_m_indices([5, 0, 300, 128])
    rows = m_indices.shape[0]
    b, sb = fp8(experts, 2 * inter, k), torch.empty(experts, 2 * inter // 128, k // 128)
    K.m_grouped_contiguous_swiglu(fp8(rows, k), empty_act_scales(rows, k // 128), b, sb,
                                  m_indices, fp8(rows, inter), empty_act_scales(rows, inter // 128),
                                  config=H.GemmConfig(128, 256, cluster_m=2, num_sms=4))
    m_max = 64
    K.m_grouped_masked_swiglu(fp8(experts, m_max, k), empty_act_scales(m_max, k // 128, experts),
                              b, sb, torch.zeros(experts, dtype=torch.int32), m_max,
                              fp8(experts, m_max, inter),
                              empty_act_scales(m_max, inter // 128, experts),
                              config=H.GemmConfig(64, 256))
    names = [entry[0] for entry in launches]
    assert len(names) == 2, names
    stages = [int(names[0].split("<")[1].split(",")[2]), int(names[1].split("<")[1].split(",")[3])]
    assert min(stages) >= H.kMinStages, names


@pytest.mark.parametrize("shape", [(4, 512, 1024), (32, 2048, 7168)], ids=["small", "dsv3"])
def test_dynamic_tile_launches(launches, shape):
    """Dynamic tiles (tile_claim.cuh): the contiguous GEMM's three layouts and the contiguous
    fused SwiGLU GEMM with a tile counter take their dynamic instances (one parameter more, the
    counter, last; the claim's 48 bytes of shared memory); a bad counter is refused."""
    from moe_fp8.gemm import new_tile_counter
    from moe_fp8.gemm.kernels import fp8_gemm as K
    from moe_fp8.gemm.layout import build_m_indices, segment_offsets
    experts, inter, k = shape
    n = 2 * inter
    counts = [5, 0, 300] + [128] * (experts - 3)
    m_indices = build_m_indices(counts)
    rows = m_indices.shape[0]
    counter = new_tile_counter("cpu")
    a, sa = fp8(rows, k), empty_act_scales(rows, k // 128)
    b, sb = fp8(experts, n, k), torch.ones(experts, n // 128, k // 128)
    out = torch.empty(rows, n, dtype=torch.bfloat16)
    for zero_padding in (False, True):
        K.m_grouped_contiguous(a, sa, b, sb, m_indices, out, zero_padding=zero_padding,
                               tile_counter=counter)
    K.m_grouped_contiguous_offsets(a, sa, b, sb, segment_offsets(counts), out,
                                   tile_counter=counter)
    K.m_grouped_contiguous_swiglu(a, sa, b, sb, m_indices, fp8(rows, inter),
                                  empty_act_scales(rows, inter // 128), tile_counter=counter)
    names = [entry[0] for entry in launches]
    assert len(names) == 4, names
    assert all("fp8_gemm_dynamic_kernel" in n for n in names[:3]), names
    assert "fused_swiglu_dynamic_kernel" in names[3], names
    for bad, error in ((counter.long(), TypeError), (counter[:1], ValueError),
                       (torch.zeros(2, 2, dtype=torch.int32), ValueError)):
        with pytest.raises(error, match="tile_counter"):
            K.m_grouped_contiguous(a, sa, b, sb, m_indices, out, tile_counter=bad)
    with pytest.raises(ValueError, match="dynamic tiles"):
        K.kernel_source(n, k, H.GemmConfig(128, 128, stages=4), K.kLayoutMasked, dynamic=True)


def test_wgrad_launch(launches):
    from moe_fp8.gemm.kernels import wgrad
    m, n, tokens, experts = 256, 512, 512, 3
    offsets = torch.tensor([0, 128, 128, 512], dtype=torch.int32)
    for accumulate, dtype in ((True, torch.float32), (False, torch.float32),
                              (False, torch.bfloat16)):
        wgrad.k_grouped_tn(fp8(m, tokens), empty_act_scales(m, tokens // 128),
                           fp8(n, tokens), empty_act_scales(n, tokens // 128), offsets,
                           torch.zeros(experts, m, n, dtype=dtype), accumulate=accumulate)
    assert len(launches) == 3 and all("k_grouped_wgrad_kernel" in entry[0] for entry in launches)
    assert launches[2][0].endswith(", false, true>"), launches[2][0]


def test_contract_catches_a_wrong_argument(launches):
    """The check itself: a missing argument and a scalar of the wrong width are TypeErrors."""
    from moe_fp8.gemm.kernels import fp8_gemm as K
    kernel = ContractKernel(K.reduce_source(2), launches)
    with pytest.raises(TypeError, match="takes"):
        kernel.launch(1, 128, 0, [torch.zeros(4), torch.zeros(4)])
    with pytest.raises(TypeError, match="bytes"):
        kernel.launch(1, 128, 0, [torch.zeros(4), torch.zeros(4), jit.i32(4)])


def test_pack_args_points_at_each_value():
    """Each pointer reaches the value its parameter must hold: a tensor's data pointer, 0 for
    None, a typed scalar's own bytes, a by-value struct, a tensor map's 128 bytes."""
    class Pair(ctypes.Structure):
        _fields_ = [("a", ctypes.c_int32), ("b", ctypes.c_int32)]

    t, t2, pair, tmap = torch.empty(4), torch.empty(8), Pair(1, -2), StandInMap()
    real_map = jit.TensorMap((1,), (1,), (1,), 0, None)  # its 128 bytes on the host, unencoded
    args = [t, t2, None, jit.i32(-7), jit.i64(1 << 40), jit.f32(0.5), jit.u32(3), jit.u64(2 ** 63),
            pair, tmap, real_map, torch.nn.Parameter(t2)]
    sizes = [8, 8, 8, 4, 8, 4, 4, 8, 8, 128, 128, 8]
    pointers, keep_alive = pack_args("k", sizes, args)
    assert ctypes.c_uint64.from_address(pointers[0]).value == t.data_ptr()
    assert ctypes.c_uint64.from_address(pointers[1]).value == t2.data_ptr()
    assert ctypes.c_uint64.from_address(pointers[2]).value == 0
    assert ctypes.c_int32.from_address(pointers[3]).value == -7
    assert ctypes.c_int64.from_address(pointers[4]).value == 1 << 40
    assert ctypes.c_float.from_address(pointers[5]).value == 0.5
    assert ctypes.c_uint32.from_address(pointers[6]).value == 3
    assert ctypes.c_uint64.from_address(pointers[7]).value == 2 ** 63
    assert Pair.from_address(pointers[8]).b == -2
    assert pointers[9] == tmap.address
    assert pointers[10] == real_map.address
    assert ctypes.c_uint64.from_address(pointers[11]).value == t2.data_ptr()  # a Tensor subclass
    with pytest.raises(TypeError, match="argument 5 of k is c_float"):
        pack_args("k", sizes[:5] + [8] + sizes[6:], args)
    with pytest.raises(TypeError, match="typed scalar"):
        pack_args("k", None, [t, 3])
