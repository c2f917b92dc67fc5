"""The fused permute / index / combine kernels (include/permute.cuh) against the torch path.

Two backends run the same checks:

* ``cuda`` (marker ``gpu``): the real kernels through the JIT on a Hopper GPU (fused is the
  default there; each test pins ``MOE_FP8_FUSED_PERMUTE=0`` for its torch-path expectation and
  ``=1`` inside ``fused()``); DeepSeek-V3 shapes included.
* ``emulated`` (CPU, no GPU needed): the same ``permute.cuh`` compiled with g++ by the harness
  of tests/kernel_checks.py (one std::thread per CUDA thread, shared memory as statics, warp
  primitives through per-warp barriers), launched through the same host file
  (``moe_fp8.gemm.kernels.permute``) with its argument lists checked against the kernels' parameter types. It checks the logic and
  the argument plumbing, not the hardware (memory model, vector alignment, speed): small shapes.

Expected results: index metadata and permuted rows/scales are bit-identical to the torch path
(integers and copies). The combine is bit-identical to the documented order (fp32, acc = 0,
acc += bf16(w_j) * y_j for j ascending, then + add, one rounding); against the torch path's
``baddbmm`` (cuBLAS may sum the k exact products in another order) at most one bf16 ulp on rare
elements — the test prints how many.
"""
import contextlib

import pytest
import torch

from moe_fp8 import gemm as G
from moe_fp8.gemm.layout import empty_act_scales
from moe_fp8.layers import layouts as L
from moe_fp8.layers import permute as PM

from kernel_checks import (EmulatedKernel, RecordingKernel, assert_bundled_compile_clean, build_emulator,
                           combine_oracle, env_switch, kPermuteInstances)

FP8 = torch.float8_e4m3fn
kEnv = "MOE_FP8_FUSED_PERMUTE"


def kernels():
    from moe_fp8.gemm.kernels import permute as module
    return module


# ----------------------------------------------------------------------------- backends



@pytest.fixture(scope="session")
def emulator(tmp_path_factory):
    """The emulation harness (tests/kernel_checks.py) for permute.cuh, built with g++."""
    return build_emulator(tmp_path_factory.mktemp("permute_emulation"), ["permute.cuh"],
                          kPermuteInstances, "permute_emulation")


def _env_switch(t):
    return L.fused_switch_on()


@pytest.fixture(params=[pytest.param("cuda", marks=pytest.mark.gpu), "emulated"])
def backend(request, monkeypatch):
    """-> device string; the fused path is on while ``fused()`` is active, the torch path
    otherwise (``MOE_FP8_FUSED_PERMUTE=0``: fused is the default on Hopper)."""
    monkeypatch.setenv(kEnv, "0")
    if request.param == "emulated":
        lib = request.getfixturevalue("emulator")
        monkeypatch.setattr(kernels(), "_kernel", lambda src, like: EmulatedKernel(lib, src))
        monkeypatch.setattr(L, "fused_enabled", _env_switch)
        monkeypatch.setattr(PM, "fused_enabled", _env_switch)
        return "cpu"
    return "cuda"


def fused():
    return env_switch(kEnv, "1")


def torch_path():
    return env_switch(kEnv, "0")


def big(device):
    """DeepSeek-V3-sized cases only on the GPU (the emulation runs a thread per CUDA thread)."""
    return device == "cuda"


# ----------------------------------------------------------------------------- data

def routing_ids(tokens, top_k, experts, device, seed, skip_fraction=0.15):
    """Local ids ``[T, k]``: distinct experts per token, some pairs skipped (sentinel E, which
    may repeat within a token), and the upper half of the experts never chosen when E > 2k
    (empty experts)."""
    gen = torch.Generator().manual_seed(seed)
    chosen = max(top_k, experts // 2) if experts > 2 * top_k else experts
    ids = torch.stack([torch.randperm(chosen, generator=gen)[:top_k] for _ in range(tokens)]) \
        if tokens else torch.empty(0, top_k, dtype=torch.int64)
    skip = torch.rand(ids.shape, generator=gen) < skip_fraction
    return ids.masked_fill(skip, experts).to(device)


def quantized_tokens(tokens, hidden, device, seed):
    """Random fp8 bytes (NaN codes included: the permute copies bits) and random scales in the
    MN-major layout the quantiser produces."""
    gen = torch.Generator().manual_seed(seed)
    xq = torch.randint(0, 256, (tokens, hidden), dtype=torch.uint8, generator=gen).view(FP8)
    xs = empty_act_scales(tokens, hidden // 128)
    xs.copy_(torch.randn(tokens, hidden // 128, generator=gen).exp())
    return xq.to(device), _to(xs, device)


def _to(scales, device):
    """Keep the MN-major strides when moving scales to the device."""
    out = empty_act_scales(scales.shape[0], scales.shape[1], device=device)
    out.copy_(scales)
    return out


def assert_same(actual, expected, what):
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.cpu(), expected.cpu()
    if a.dtype in (FP8, torch.bfloat16, torch.float32):
        a, e = a.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[a.element_size()]), \
            e.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[e.element_size()])
    diff = a != e
    assert not diff.any(), f"{what}: {int(diff.sum())} elements differ, e.g. at {diff.nonzero()[:4].tolist()}"


# ----------------------------------------------------------------------------- index

kIndexCases = [  # (tokens, top_k, experts_local)
    (1, 8, 32), (1, 1, 1), (7, 2, 4), (37, 4, 16), (129, 8, 32), (300, 8, 256), (611, 5, 6),
]
kIndexCasesBig = [(4096, 8, 32), (16384, 8, 32), (4097, 8, 256)]


def index_cases(device):
    return kIndexCases + (kIndexCasesBig if big(device) else [])


@pytest.mark.parametrize("upper_bound", [False, True])
def test_contiguous_index_matches_torch(backend, upper_bound):
    for case, (tokens, top_k, experts) in enumerate(index_cases(backend)):
        ids = routing_ids(tokens, top_k, experts, backend, seed=case)
        rows = L.upper_bound_rows(ids.numel(), experts) if upper_bound else None
        expected = L.contiguous_index(ids, experts, rows)
        with fused():
            actual = L.contiguous_index(ids, experts, rows)
        assert actual.num_rows == expected.num_rows
        for name in ("m_indices", "row_pair", "pair_row", "pair_kept", "tokens_per_expert"):
            assert_same(getattr(actual, name), getattr(expected, name), f"{name} {tokens, top_k, experts}")


@pytest.mark.parametrize("m_max", [1, 3, 64])
def test_masked_index_matches_torch(backend, m_max):
    cases = [(0, 8, 4)] + index_cases(backend)[:6]  # T = 0 too; m_max < counts overflows
    for case, (tokens, top_k, experts) in enumerate(cases):
        ids = routing_ids(tokens, top_k, experts, backend, seed=100 + case)
        expected = L.masked_index(ids, experts, m_max)
        with fused():
            actual = L.masked_index(ids, experts, m_max)
        for name in ("masked_m", "pair_expert", "pair_rank", "pair_kept", "num_overflow"):
            assert_same(getattr(actual, name), getattr(expected, name), f"{name} {tokens, top_k, experts}")
        # with the weights: the same pass writes the combine index the torch path computes
        weights = torch.rand(tokens, top_k, generator=torch.Generator().manual_seed(case)).to(backend)
        expected_combine = PM.combine_index_masked(expected, weights, m_max)
        with fused():
            actual = L.masked_index(ids, experts, m_max, weights)
            assert actual.slot_row is not None and actual.slot_weight is not None
            combine = PM.combine_index_masked(actual, weights, m_max)
        for name in ("masked_m", "pair_expert", "pair_rank", "pair_kept", "num_overflow"):
            assert_same(getattr(actual, name), getattr(expected, name), f"{name} (weights)")
        assert_same(combine.slot_row, expected_combine.slot_row, f"slot_row {tokens, top_k, experts}")
        assert_same(combine.slot_weight, expected_combine.slot_weight, f"slot_weight {tokens, top_k, experts}")
        assert L.masked_index(ids, experts, m_max, weights).slot_row is None  # torch path: computed later


@pytest.mark.parametrize("m_max", [1, 64])
def test_masked_index_from_global_ids(backend, m_max, monkeypatch):
    """MOE_FP8_FUSED_DECODE_INDEX=1: one launch maps the router's global ids to this rank's
    experts (others and tokens at or beyond the device-side valid count skip) and builds the
    masked index: every field equals the two-step path's (local_expert_ids, then masked_index).
    Host-int valid counts and the switch off take the two steps."""
    monkeypatch.setenv("MOE_FP8_FUSED_DECODE_INDEX", "1")
    gen = torch.Generator().manual_seed(m_max)
    for tokens, top_k, experts_global, offset, local in ((1, 8, 64, 16, 16), (37, 4, 32, 0, 32),
                                                         (9, 8, 256, 224, 32)):
        ids = torch.stack([torch.randperm(experts_global, generator=gen)[:top_k]
                           for _ in range(tokens)]).to(backend)
        weights = torch.rand(tokens, top_k, generator=gen).to(backend)
        for valid in (0, 1, tokens, tokens + 3):
            num_valid = torch.tensor(valid, dtype=torch.int64, device=backend)
            what = f"T={tokens} k={top_k} E={experts_global} offset={offset} valid={valid}"
            with fused():
                expected = L.masked_index(L.local_expert_ids(ids, offset, local, num_valid), local,
                                          m_max, weights)
                actual = L.masked_index_from_global(ids, offset, local, m_max, weights, num_valid)
            assert actual is not None, what
            for name in ("masked_m", "pair_expert", "pair_rank", "pair_kept", "num_overflow",
                         "slot_row", "slot_weight"):
                assert_same(getattr(actual, name), getattr(expected, name), f"{name} {what}")
        with fused():
            assert L.masked_index_from_global(ids, offset, local, m_max, weights, 1) is None
    monkeypatch.setenv("MOE_FP8_FUSED_DECODE_INDEX", "0")
    with fused():
        assert L.masked_index_from_global(ids, offset, local, m_max, weights, None) is None


# ----------------------------------------------------------------------------- permute

kPermuteCases = [  # (tokens, hidden, top_k, experts_local)
    (1, 128, 8, 16), (37, 384, 4, 6), (129, 256, 4, 4), (5, 7168, 4, 4),
]
kPermuteCasesBig = [(4096, 7168, 8, 32), (1001, 2048, 8, 64)]


def permute_cases(device):
    return kPermuteCases + (kPermuteCasesBig if big(device) else [])


def test_permute_contiguous_bit_exact(backend):
    for case, (tokens, hidden, top_k, experts) in enumerate(permute_cases(backend)):
        ids = routing_ids(tokens, top_k, experts, backend, seed=200 + case)
        xq, xs = quantized_tokens(tokens, hidden, backend, seed=case)
        index = L.contiguous_index(ids, experts)
        expected = PM.permute_contiguous(xq, xs, index, top_k)
        with fused():  # through the layer function
            actual = PM.permute_contiguous(xq, xs, index, top_k)
        for name, a, e in zip(("a", "sa", "row_token", "row_slot"), actual, expected):
            assert_same(a, e, f"{name} {tokens, hidden, top_k, experts}")
        assert actual[1].stride() == expected[1].stride(), "scales must stay MN-major"
        # poisoned outputs through the host function: every element must be written
        rows = index.num_rows
        a = torch.randint(0, 256, (rows, hidden), dtype=torch.uint8, device=backend).view(FP8)
        sa = torch.full((hidden // 128, rows), float("nan"), device=backend).t()
        meta = torch.full((2, rows), 77, dtype=torch.int64, device=backend)
        kernels().permute_contiguous(xq, xs, index.row_pair, top_k, a, sa, meta[0], meta[1])
        for name, a_, e in zip(("a", "sa", "row_token", "row_slot"), (a, sa, meta[0], meta[1]),
                               expected):
            assert_same(a_, e, f"poisoned {name} {tokens, hidden, top_k, experts}")


def test_permute_contiguous_leaves_unread_padding_blocks(backend):
    """A layout sized by its upper bound ends in 128-row blocks with no kept row: the kernel
    writes their row maps (-1) and leaves their rows and scales as they were; every block with
    a kept row matches the torch path bit for bit."""
    for tokens, hidden, top_k, experts in ((37, 256, 4, 6), (3, 128, 2, 8)):
        ids = routing_ids(tokens, top_k, experts, backend, seed=tokens)
        xq, xs = quantized_tokens(tokens, hidden, backend, seed=tokens)
        index = L.contiguous_index(ids, experts, L.upper_bound_rows(ids.numel(), experts))
        rows = index.num_rows
        block_kept = (index.row_pair.view(-1, 128)[:, 0] >= 0)  # [rows / 128]
        assert not bool(block_kept.all()), "the case must end in unread padding blocks"
        read = block_kept.repeat_interleave(128)  # [rows]
        expected = PM.permute_contiguous(xq, xs, index, top_k)
        poison_a = torch.randint(0, 256, (rows, hidden), dtype=torch.uint8, device=backend)
        a = poison_a.clone().view(FP8)
        sa = torch.full((hidden // 128, rows), float("nan"), device=backend).t()
        meta = torch.full((2, rows), 77, dtype=torch.int64, device=backend)
        kernels().permute_contiguous(xq, xs, index.row_pair, top_k, a, sa, meta[0], meta[1])
        case = (tokens, hidden, top_k, experts)
        assert_same(a[read], expected[0][read], f"a {case}")
        assert_same(sa[read], expected[1][read], f"sa {case}")
        assert_same(meta[0], expected[2], f"row_token {case}")
        assert_same(meta[1], expected[3], f"row_slot {case}")
        assert torch.equal(a.view(torch.uint8)[~read], poison_a[~read]), f"unread rows written {case}"
        assert bool(sa[~read].isnan().all()), f"unread scales written {case}"


def test_permute_contiguous_strided_inputs(backend):
    """Row-major scales (not MN-major) and fp8 rows inside a wider packed buffer."""
    tokens, hidden, top_k, experts = 33, 256, 4, 8
    ids = routing_ids(tokens, top_k, experts, backend, seed=7)
    xq, xs = quantized_tokens(tokens, hidden, backend, seed=7)
    packed = torch.zeros(tokens, hidden + 64, dtype=torch.uint8, device=backend)
    packed[:, :hidden] = xq.view(torch.uint8)
    xq_strided = packed[:, :hidden].view(FP8)
    xs_rows = xs.contiguous()
    index = L.contiguous_index(ids, experts)
    expected = PM.permute_contiguous(xq, xs, index, top_k)
    with fused():
        actual = PM.permute_contiguous(xq_strided, xs_rows, index, top_k)
    for name, a, e in zip(("a", "sa", "row_token", "row_slot"), actual, expected):
        assert_same(a, e, name)


def test_permute_masked_bit_exact(backend):
    """The fused masked permute writes the torch path's bytes outside the trash bucket."""
    for case, (tokens, hidden, top_k, experts) in enumerate(permute_cases(backend)[:4]):
        for m_max in (2, tokens):
            ids = routing_ids(tokens, top_k, experts, backend, seed=300 + case)
            xq, xs = quantized_tokens(tokens, hidden, backend, seed=case)
            index = L.masked_index(ids, experts, m_max)
            expected_bufs = L.MaskedBuffers.allocate(experts, m_max, hidden, backend)
            poison = torch.randint(0, 256, expected_bufs.a.shape, dtype=torch.uint8, device=backend)
            expected_bufs.a.view(torch.uint8).copy_(poison)
            actual_bufs = L.MaskedBuffers(expected_bufs.a.clone(), expected_bufs.sa.clone())
            expected = PM.permute_masked(xq, xs, index, top_k, expected_bufs.a, expected_bufs.sa)
            with fused():
                actual = PM.permute_masked(xq, xs, index, top_k, actual_bufs.a, actual_bufs.sa)
            what = f"{tokens, hidden, top_k, experts, m_max}"
            # the trash bucket (last expert) takes every skipped pair: its content is unspecified
            assert_same(actual_bufs.a[:experts], expected_bufs.a[:experts], f"a {what}")
            assert_same(actual_bufs.sa[:experts], expected_bufs.sa[:experts], f"sa {what}")
            assert_same(actual[0], expected[0], f"row_token {what}")
            assert_same(actual[1], expected[1], f"row_slot {what}")
            # the kernel writes the row maps whole: poisoned ones come back as the torch path's
            # (-1 past masked_m and in the trash bucket)
            maps = torch.full((2, experts + 1, m_max), 12345, dtype=torch.int64, device=backend)
            with fused():
                PM._kernels().permute_masked(xq, xs, index.pair_expert, index.pair_rank, top_k,
                                             actual_bufs.a, actual_bufs.sa, maps[0], maps[1],
                                             index.masked_m)
            assert_same(maps[0, :experts], expected[0], f"poisoned row_token {what}")
            assert_same(maps[1, :experts], expected[1], f"poisoned row_slot {what}")
            assert bool((maps[:, experts] == -1).all()), f"trash row maps {what}"


def assert_same_dispatch(got, want, got_bufs, want_bufs, local, what):
    """A one-launch dispatch's ``(MaskedIndex, row_token, row_slot)`` and buffers against the
    index kernel + permute's: every index field, the rows and scales outside the trash bucket."""
    (got_index, got_token, got_slot), (index, token, slot) = got, want
    for name in ("masked_m", "pair_expert", "pair_rank", "pair_kept", "num_overflow",
                 "slot_row", "slot_weight"):
        if getattr(index, name) is None:
            assert getattr(got_index, name) is None, f"{name} {what}"
        else:
            assert_same(getattr(got_index, name), getattr(index, name), f"{name} {what}")
    assert_same(got_bufs.a[:local], want_bufs.a[:local], f"a {what}")
    assert_same(got_bufs.sa[:local], want_bufs.sa[:local], f"sa {what}")
    assert_same(got_token, token, f"row_token {what}")
    assert_same(got_slot, slot, f"row_slot {what}")


@pytest.mark.parametrize("with_weights", [False, True])
def test_masked_dispatch_small_equals_index_then_permute(backend, with_weights, monkeypatch):
    """MOE_FP8_SMALL_DISPATCH=1: one launch (every CTA ranks the <= 256 pairs itself) writes what
    the global-id masked index kernel and the masked permute write: every index field, the rows
    and scales outside the trash bucket, and the row maps whole (poisoned here); overflowing
    experts (m_max below the count), other ranks' experts and tokens past the valid count
    included. Beyond 256 pairs, or with the switch off, the two steps run."""
    monkeypatch.setenv("MOE_FP8_FUSED_DECODE_INDEX", "1")
    gen = torch.Generator().manual_seed(5 + with_weights)
    cases = [  # (tokens, top_k, experts_global, offset, local, hidden, m_max)
        (1, 8, 64, 16, 16, 128, 1), (9, 8, 256, 224, 32, 384, 9), (32, 8, 64, 0, 64, 256, 2),
        (37, 4, 32, 0, 32, 128, 37), (64, 4, 16, 8, 8, 256, 64)]
    for tokens, top_k, experts_global, offset, local, hidden, m_max in cases:
        ids = torch.stack([torch.randperm(experts_global, generator=gen)[:top_k]
                           for _ in range(tokens)]).to(backend)
        weights = torch.rand(tokens, top_k, generator=gen).to(backend) if with_weights else None
        xq, xs = quantized_tokens(tokens, hidden, backend, seed=tokens)
        for valid in (0, 1, tokens, tokens + 3):
            num_valid = torch.tensor(valid, dtype=torch.int64, device=backend)
            what = f"T={tokens} k={top_k} E={experts_global} offset={offset} m_max={m_max} valid={valid}"
            bufs = L.MaskedBuffers.allocate(local, m_max, hidden, backend)
            bufs.a.view(torch.uint8).copy_(torch.randint(0, 256, bufs.a.shape, dtype=torch.uint8))
            bufs.sa.fill_(float("nan"))
            mine = L.MaskedBuffers(bufs.a.clone(), bufs.sa.clone())
            with fused():
                index = L.masked_index_from_global(ids, offset, local, m_max, weights, num_valid)
                rows = PM.permute_masked(xq, xs, index, top_k, bufs.a, bufs.sa)
                monkeypatch.setenv("MOE_FP8_SMALL_DISPATCH", "1")
                small = PM.dispatch_masked_small(xq, xs, ids, weights, offset, local, m_max,
                                                 num_valid, mine.a, mine.sa)
                monkeypatch.setenv("MOE_FP8_SMALL_DISPATCH", "0")
            assert small is not None, what
            assert_same_dispatch(small, (index, *rows), mine, bufs, local, what)
        # the row maps written whole: poisoned ones come back as the two steps' (-1 past
        # masked_m and in the trash bucket)
        maps = torch.full((2, local + 1, m_max), 12345, dtype=torch.int64, device=backend)
        with fused():
            inputs = L.masked_index_kernel_inputs(ids, local, weights, num_valid)
        kernels().masked_dispatch_small(inputs[0], local, m_max, inputs[1], offset, top_k, inputs[2],
                                        xq, xs, mine.a, mine.sa, maps[0], maps[1])
        assert_same(maps[0, :local], rows[0], f"poisoned row_token {what}")
        assert_same(maps[1, :local], rows[1], f"poisoned row_slot {what}")
        assert bool((maps[:, local] == -1).all()), f"trash row maps {what}"
    # beyond kSmallPairs pairs, or switched off: None (the caller takes the two steps)
    ids = torch.stack([torch.randperm(64, generator=gen)[:8] for _ in range(33)]).to(backend)
    xq, xs = quantized_tokens(33, 128, backend, seed=1)
    bufs = L.MaskedBuffers.allocate(64, 33, 128, backend)
    with fused():
        monkeypatch.setenv("MOE_FP8_SMALL_DISPATCH", "1")
        assert PM.dispatch_masked_small(xq, xs, ids, None, 0, 64, 33, None, bufs.a, bufs.sa) is None
        assert PM.dispatch_masked_small(xq, xs, ids[:32], None, 0, 64, 33, None, bufs.a,
                                        bufs.sa) is not None
        monkeypatch.setenv("MOE_FP8_SMALL_DISPATCH", "0")
        assert PM.dispatch_masked_small(xq, xs, ids[:32], None, 0, 64, 33, None, bufs.a,
                                        bufs.sa) is None


@pytest.mark.parametrize("path", ["small", "permute", "torch"])
def test_masked_dispatch_without_rows(backend, path, monkeypatch):
    """copy_rows=False (MOE_FP8_DECODE_GATHER: the gate-up gathers the rows itself): the small
    dispatch, the permute kernel and the torch path write the scales and row maps they write with
    the rows, and leave every row of a_buf as it was."""
    monkeypatch.setenv("MOE_FP8_FUSED_DECODE_INDEX", "1")
    gen = torch.Generator().manual_seed(17)
    tokens, top_k, experts, hidden, m_max = 9, 8, 32, 256, 5
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k]
                       for _ in range(tokens)]).to(backend)
    xq, xs = quantized_tokens(tokens, hidden, backend, seed=3)
    num_valid = torch.tensor(7, dtype=torch.int64, device=backend)
    results = {}
    for copy_rows in (True, False):
        bufs = L.MaskedBuffers.allocate(experts, m_max, hidden, backend)
        bufs.a.view(torch.uint8).copy_(torch.randint(0, 256, bufs.a.shape, dtype=torch.uint8,
                                                     generator=torch.Generator().manual_seed(1)))
        bufs.sa.fill_(float("nan"))
        before = bufs.a.clone()
        with (torch_path() if path == "torch" else fused()):
            monkeypatch.setenv("MOE_FP8_SMALL_DISPATCH", "1" if path == "small" else "0")
            got = PM.dispatch_masked_small(xq, xs, ids, None, 0, experts, m_max, num_valid,
                                           bufs.a, bufs.sa, copy_rows=copy_rows)
            if path == "small":
                assert got is not None
                rows = got[1:]
            else:
                assert got is None
                index = L.masked_index_from_global(ids, 0, experts, m_max, None, num_valid)
                if index is None:
                    local = L.local_expert_ids(ids, 0, experts, num_valid)
                    index = L.masked_index(local, experts, m_max, None)
                rows = PM.permute_masked(xq, xs, index, top_k, bufs.a, bufs.sa,
                                         copy_rows=copy_rows)
        results[copy_rows] = (bufs, before, rows)
    (with_rows, _, rows_copied), (without, before, rows_left) = results[True], results[False]
    assert_same(without.a, before, f"{path}: a_buf rows left as they were")
    assert not torch.equal(with_rows.a[:experts], before[:experts]), "the copying run copied"
    assert_same(without.sa[:experts], with_rows.sa[:experts], f"{path}: scales")
    assert_same(rows_left[0], rows_copied[0], f"{path}: row_token")
    assert_same(rows_left[1], rows_copied[1], f"{path}: row_slot")


def test_materialize_rows_fills_what_a_gather_left():
    """The unfused gate-up's fallback for a gathering dispatch (experts._materialize_rows): rows
    below masked_m become x_fp8[row_token], the rows past it keep their bytes."""
    from moe_fp8.layers.experts import _materialize_rows
    gen = torch.Generator().manual_seed(2)
    experts, m_max, hidden, tokens = 4, 6, 256, 10
    x = torch.randint(0, 256, (tokens, hidden), dtype=torch.uint8, generator=gen)
    row_token = torch.full((experts, m_max), -1, dtype=torch.int64)
    counts = [0, 3, 6, 1]
    for e, c in enumerate(counts):
        row_token[e, :c] = torch.randint(0, tokens, (c,), generator=gen)
    a = torch.randint(0, 256, (experts, m_max, hidden), dtype=torch.uint8, generator=gen)
    before = a.clone()
    layout = L.MaskedLayout(a.view(torch.float8_e4m3fn), torch.zeros(experts, m_max, 2),
                            torch.tensor(counts, dtype=torch.int32), 3, row_token,
                            row_token.clone(), torch.zeros((), dtype=torch.int64),
                            token_source=(x.view(torch.float8_e4m3fn), row_token))
    _materialize_rows(layout)
    assert layout.token_source is None
    for e, c in enumerate(counts):
        assert torch.equal(a[e, :c], x[row_token[e, :c]]), e
        assert torch.equal(a[e, c:], before[e, c:]), e


def test_stage_rows_copies_and_counts(backend):
    """The decode runner's input staging (MOE_FP8_STAGE_KERNEL): rows [0, n) copied bit for bit,
    the rest of the static buffer untouched, the count set; grids of one CTA and of several."""
    gen = torch.Generator().manual_seed(3)
    for rows, hidden, n in ((4, 128, 1), (9, 384, 9), (300, 256, 257)):
        src = torch.randint(-2 ** 15, 2 ** 15, (n, hidden), dtype=torch.int16, generator=gen)
        src = src.view(torch.bfloat16).to(backend)
        dst = torch.randint(-2 ** 15, 2 ** 15, (rows if rows > n else n + 3, hidden),
                            dtype=torch.int16, generator=gen).view(torch.bfloat16).to(backend)
        before = dst.clone()
        count = torch.tensor(-5, dtype=torch.int64, device=backend)
        kernels().stage_rows(src, dst, count)
        assert_same(dst[:n], src, f"rows {n, hidden}")
        assert_same(dst[n:], before[n:], f"rows past n {n, hidden}")
        assert int(count) == n


# ----------------------------------------------------------------------------- combine

def check_near_torch(actual, torch_path, what, terms=None):
    """Near the torch path. ``terms = (y_rows, combine_index, add)`` (a combine): the torch path's
    ``baddbmm`` may sum the k products in another order and, with torch's default
    ``allow_bf16_reduced_precision_reduction``, round partial sums to bf16, so its error is
    bounded by the terms' magnitudes, not the result's: one bf16 ulp of the result plus 2^-8 of
    sum |w_j y_j| + |add| (the same combine over absolute values); a wrong row or weight is off by
    a whole term. Without ``terms`` (whole layers): one ulp plus 2^-16 of the largest output, on
    all but 1 in 1000 elements. Prints how many elements differ."""
    a, t = actual.float(), torch_path.float()
    ulp = torch.where(t == 0, torch.full_like(t, 2.0 ** -133),
                      2.0 ** (torch.floor(torch.log2(t.abs())) - 7))
    if terms is not None:
        y_rows, combine, add = terms
        magnitude = combine_oracle(y_rows.abs(), PM.CombineIndex(combine.slot_row, combine.slot_weight.abs()),
                                   None if add is None else add.abs()).float()
        far = (a - t).abs() > ulp + 2.0 ** -8 * magnitude
        assert not far.any(), f"{what}: {int(far.sum())} elements beyond the torch path's rounding"
    else:
        far = (a - t).abs() > ulp + 2.0 ** -16 * t.abs().max()
        assert not far.any(), f"{what}: {int(far.sum())} elements beyond one ulp of the torch path"
    mismatches = int((a != t).sum())
    print(f"{what}: {mismatches} of {a.numel()} elements differ from the torch path")
    if terms is None:
        assert mismatches <= max(8, a.numel() // 1000)


kCombineCases = [  # (tokens, hidden, top_k, experts, with shared add)
    (1, 128, 8, 16, True), (37, 384, 4, 6, False), (129, 256, 8, 16, True), (3, 7168, 8, 32, True),
    (50, 256, 1, 4, False),
]
kCombineCasesBig = [(4096, 7168, 8, 32, True), (333, 7168, 8, 256, False)]


@pytest.mark.parametrize("layout", ["contiguous", "masked"])
def test_combine_matches_oracle(backend, layout):
    cases = kCombineCases + (kCombineCasesBig if big(backend) else [])
    for case, (tokens, hidden, top_k, experts, with_add) in enumerate(cases):
        ids = routing_ids(tokens, top_k, experts, backend, seed=400 + case)
        gen = torch.Generator().manual_seed(case)
        weights = (torch.rand(tokens, top_k, generator=gen) * 2.5).to(backend)
        if layout == "contiguous":
            index = L.contiguous_index(ids, experts)
            combine = PM.combine_index_contiguous(index, weights)
            rows = index.num_rows
        else:
            m_max = tokens
            combine = PM.combine_index_masked(L.masked_index(ids, experts, m_max), weights, m_max)
            rows = experts * m_max
        y_rows = torch.randn(rows, hidden, generator=gen).bfloat16().to(backend)
        add = torch.randn(tokens, hidden, generator=gen).bfloat16().to(backend) if with_add else None
        expected = combine_oracle(y_rows, combine, add)
        torch_path = PM.unpermute_combine(y_rows, combine, add=add)
        with fused():
            actual = PM.unpermute_combine(y_rows, combine, add=add)
            out = torch.full((tokens, hidden), float("nan"), device=backend).bfloat16()
            returned = PM.unpermute_combine(y_rows, combine, add=add, out=out)  # poisoned out
        what = f"combine {layout} {tokens, hidden, top_k, experts, with_add}"
        assert_same(actual, expected, what)
        assert returned is out
        assert_same(out, expected, what + " out=")
        check_near_torch(actual, torch_path, what, terms=(y_rows, combine, add))


@pytest.mark.parametrize("valid", [0, 1, 7, 19])
def test_combine_leaves_rows_past_num_valid(backend, valid):
    """A decode runner replayed with fewer tokens than it holds passes the device count: the
    kernel writes the valid tokens' rows (the same bits as without the count) and leaves the
    others as they were (poison stays)."""
    tokens, hidden, top_k, experts = 19, 512, 4, 8
    ids = routing_ids(tokens, top_k, experts, backend, seed=450 + valid)
    gen = torch.Generator().manual_seed(valid)
    weights = (torch.rand(tokens, top_k, generator=gen) * 2.5).to(backend)
    combine = PM.combine_index_masked(L.masked_index(ids, experts, tokens), weights, tokens)
    y_rows = torch.randn(experts * tokens, hidden, generator=gen).bfloat16().to(backend)
    add = torch.randn(tokens, hidden, generator=gen).bfloat16().to(backend)
    num_valid = torch.tensor(valid, dtype=torch.int64, device=backend)
    with fused():
        full = PM.unpermute_combine(y_rows, combine, add=add)
        out = torch.full((tokens, hidden), float("nan"), device=backend).bfloat16()
        PM.unpermute_combine(y_rows, combine, add=add, out=out, num_valid=num_valid)
    assert_same(out[:valid], full[:valid], f"valid rows, num_valid={valid}")
    assert torch.isnan(out[valid:].float()).all(), "rows past num_valid were written"


def test_combine_with_no_rows_is_the_shared_part(backend):
    """Every pair skipped (no row routed here, e.g. all of a token's experts on other ranks): the
    rows tensor is empty and the result is ``add`` (or zeros), on both paths."""
    tokens, hidden, top_k = 3, 256, 2
    slot_row = torch.zeros(tokens, top_k, dtype=torch.int64, device=backend)
    index = PM.CombineIndex(slot_row, torch.zeros(tokens, top_k, device=backend))
    y_rows = torch.empty(0, hidden, dtype=torch.bfloat16, device=backend)
    add = torch.randn(tokens, hidden, device=backend).bfloat16()
    for ctx in (contextlib.nullcontext(), fused()):
        with ctx:
            assert torch.equal(PM.unpermute_combine(y_rows, index, add=add), add)
            assert torch.equal(PM.unpermute_combine(y_rows, index), torch.zeros_like(add))
    assert torch.equal(combine_oracle(y_rows, index, add), add)


def test_combine_keeps_autograd(backend):
    """Rows that need grad take the differentiable torch branch even when fused is on."""
    tokens, hidden, top_k, experts = 9, 256, 4, 8
    ids = routing_ids(tokens, top_k, experts, backend, seed=9)
    index = L.contiguous_index(ids, experts)
    weights = torch.rand(tokens, top_k, device=backend, requires_grad=True)
    combine = PM.combine_index_contiguous(index, weights)
    y_rows = torch.randn(index.num_rows, hidden, device=backend).bfloat16().requires_grad_()
    with fused():
        y = PM.unpermute_combine(y_rows, combine)
    y.float().sum().backward()
    assert y_rows.grad is not None and weights.grad is not None
    assert torch.isfinite(weights.grad).all()


# ----------------------------------------------------------------------------- the layer

def small_layer(device):
    from moe_fp8.layers import MoE, MoEConfig
    return MoE(MoEConfig.tiny(), device=device, seed=0)


@torch.no_grad()
def test_layer_forward_fused_vs_torch(backend):
    moe = small_layer(backend)
    gen = torch.Generator().manual_seed(5)
    for tokens in (1, 37):
        x = torch.randn(tokens, moe.cfg.hidden_size, generator=gen).bfloat16().to(backend)
        expected = moe(x)
        masked_expected = moe.forward_masked(x)
        with fused():
            actual = moe(x)
            masked_actual = moe.forward_masked(x)
        check_near_torch(actual, expected, f"layer forward T={tokens}")
        check_near_torch(masked_actual, masked_expected, f"layer forward_masked T={tokens}")


@pytest.mark.gpu
@torch.no_grad()
def test_decode_graph_replay():
    """The decode runner captured with the fused kernels: replays equal the eager fused step."""
    moe = small_layer("cuda")
    gen = torch.Generator().manual_seed(6)
    with fused():
        run = moe.decode_runner(max_tokens=16)
        for n in (16, 5, 1):
            x = torch.randn(n, moe.cfg.hidden_size, generator=gen).bfloat16().cuda()
            replayed = run(x).clone()
            graph, run.graph = run.graph, None  # the same static buffers, stepped eagerly
            eager = run(x).clone()
            run.graph = graph
            assert_same(replayed, eager, f"decode replay n={n}")
    with torch_path():
        plain = moe.decode_runner(max_tokens=16)
    x = torch.randn(16, moe.cfg.hidden_size, generator=gen).bfloat16().cuda()
    with fused():
        fused_y = run(x).clone()
    check_near_torch(fused_y, plain(x).clone(), "decode graph fused vs torch")


def decode_layer(device):
    """The profiled decode configuration (benchmarks/profile_layer.py: DeepSeek-V3 with 32 experts
    on the GPU, decode_runner(128)); on the emulation the same routing structure (32 experts,
    top-8, 8 groups / top-4, a shared expert) at a small width."""
    from moe_fp8.layers import MoE, MoEConfig
    if device == "cuda":
        return MoE(MoEConfig.deepseek_v3(num_experts=32), device=device, seed=0), 128
    cfg = MoEConfig.tiny(num_experts=32, top_k=8, n_group=8, topk_group=4)
    return MoE(cfg, device=device, seed=0), 16


@pytest.mark.parametrize("small", ["0", "1"])
@torch.no_grad()
def test_decode_runner_fused_vs_torch(backend, small, monkeypatch):
    """Regression (H200 integration run, 2026-11-25): profile_layer reported calc_diff 0.999
    between the fused and the torch decode graphs because it fed the two runners different
    random inputs (unseeded torch.randn per mode). Both runners here get the SAME input, in an
    order that reuses the static buffers across batch sizes (full, smaller, 1, full again), and
    must agree to bf16 rounding; on the GPU the fused one is the captured graph (built with the
    variable set, replayed with it unset: the graph alone decides), on the emulation it steps
    eagerly with the variable set. ``small`` = 1: MOE_FP8_SMALL_DISPATCH (the fused runner's
    index and permute in one kernel) and MOE_FP8_STAGE_KERNEL (its input staged by one kernel)."""
    monkeypatch.setenv("MOE_FP8_SMALL_DISPATCH", small)
    monkeypatch.setenv("MOE_FP8_STAGE_KERNEL", small)
    moe, max_tokens = decode_layer(backend)
    if small == "1":
        max_tokens = min(max_tokens, 32)  # the small dispatch takes at most 256 pairs
    torch_run = moe.decode_runner(max_tokens)
    with fused():
        fused_run = moe.decode_runner(max_tokens)
    gen = torch.Generator().manual_seed(11)
    for n in (max_tokens, 5, 1, max_tokens):
        x = torch.randn(n, moe.cfg.hidden_size, generator=gen).bfloat16().to(backend)
        expected = torch_run(x).clone()
        with fused() if fused_run.graph is None else contextlib.nullcontext():
            actual = fused_run(x).clone()
        # the bug looked like calc_diff ~1. The torch path's combine rounds partial sums to bf16
        # (check_near_torch), so elements near cancellation differ by more than one ulp of the
        # result (5.6 % of them on the H100, 2026-12-05); bound each element by 2 ulp plus 2^-8
        # of the largest output instead: a wrong row or expert is off by a whole term.
        diff = G.calc_diff(actual, expected)
        assert diff < 1e-5, f"decode runner fused vs torch n={n}: calc_diff {diff:.2e}"
        a, t = actual.float(), expected.float()
        ulp = torch.where(t == 0, torch.full_like(t, 2.0 ** -133),
                          2.0 ** (torch.floor(torch.log2(t.abs())) - 7))
        far = int(((a - t).abs() > 2 * ulp + 2.0 ** -8 * t.abs().max()).sum())
        print(f"decode n={n}: calc_diff {diff:.2e}, {int((a != t).sum())} differ, {far} far")
        assert far == 0, f"decode n={n}: {far} elements beyond the torch path's rounding"


def _launch_signature(launch):
    """What a captured graph bakes into a kernel node, minus temporaries' addresses: grid, block,
    shared memory, scalar values, and each tensor argument's size."""
    instance, grid, block, smem, args = launch
    shape = [("tensor", a.numel(), a.dtype) if isinstance(a, torch.Tensor) else
             ("null",) if a is None else (type(a).__name__, getattr(a, "value", a)) for a in args]
    return instance, grid, block, smem, shape


@pytest.mark.parametrize("small", ["0", "1"])
@torch.no_grad()
def test_decode_step_launches_do_not_depend_on_the_batch(backend, small, monkeypatch):
    """What a CUDA graph replays: the launches of the capture step, with the capture's grids,
    scalars and pointers. The runner's fused step must therefore launch the same kernels with
    the same grids and scalars whatever the live batch n (num_valid_tokens is a device scalar),
    write the layout into the runner's static buffers and the result into its static ``out``.
    Steps with n = max, 3, 1 (eager) are recorded and compared launch by launch;
    MOE_FP8_SMALL_DISPATCH=1 makes the index and the permute one launch (a runner of at most 32
    tokens: 256 pairs). The runner's input staging (MOE_FP8_STAGE_KERNEL) is a launch before the
    graph, with n as its argument by design: pinned off here. The
    runner keeps one batch size (max_tokens): each of its per-size graphs replays smaller batches
    the same way."""
    monkeypatch.setenv("MOE_FP8_SMALL_DISPATCH", small)
    monkeypatch.setenv("MOE_FP8_STAGE_KERNEL", "0")
    moe, max_tokens = decode_layer(backend)
    if small == "1":
        max_tokens = min(max_tokens, 32)
    runner = moe.decode_runner(max_tokens, use_graph=False, batch_sizes=[max_tokens])
    module, make = kernels(), kernels()._kernel
    steps = []
    monkeypatch.setattr(module, "_kernel",
                        lambda src, like: RecordingKernel(make(src, like), src, steps[-1]))
    gen = torch.Generator().manual_seed(12)
    with fused():
        for n in (max_tokens, 3, 1):
            steps.append([])
            runner(torch.randn(n, moe.cfg.hidden_size, generator=gen).bfloat16().to(backend))
    names = [launch[0] for launch in steps[0]]
    dispatch = [module.masked_dispatch_small_source().instance] if small == "1" else \
        [module.masked_index_source().instance, module.permute_source(True).instance]
    assert names == dispatch + [module.combine_source(True).instance], names
    for n, step in zip((3, 1), steps[1:]):
        assert [_launch_signature(l) for l in step] == [_launch_signature(l) for l in steps[0]], \
            f"a launch of the n={n} step differs from the n={max_tokens} step's"
    a_arg = 17 if small == "1" else 4  # a_buf's position; sa_buf follows it
    for step in steps:
        permute, combine = step[-2], step[-1]
        assert permute[4][a_arg].data_ptr() == runner.buffers.a.data_ptr()  # a_buf
        assert permute[4][a_arg + 1].data_ptr() == runner.buffers.sa.data_ptr()  # sa_buf
        assert combine[4][0].data_ptr() == runner.workspace.y.data_ptr()  # y_rows
        assert combine[4][4].data_ptr() == runner.out.data_ptr()  # out: the static buffer


@pytest.mark.gpu
@torch.no_grad()
def test_contiguous_graph_capture():
    """Index (upper-bound rows: no sync), permute and combine captured once, replayed on new ids."""
    tokens, hidden, top_k, experts = 64, 7168, 8, 32
    static_ids = routing_ids(tokens, top_k, experts, "cuda", seed=1)
    xq, xs = quantized_tokens(tokens, hidden, "cuda", seed=1)
    weights = torch.rand(tokens, top_k, device="cuda")
    rows = L.upper_bound_rows(tokens * top_k, experts)
    y_rows = torch.randn(rows, hidden, device="cuda").bfloat16()

    def step():
        index = L.contiguous_index(static_ids, experts, rows)
        a, sa, _, _ = PM.permute_contiguous(xq, xs, index, top_k)
        combine = PM.combine_index_contiguous(index, weights)
        return index, a, sa, PM.unpermute_combine(y_rows, combine)

    with fused():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()  # loads the kernels before capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = step()
    for seed in (2, 3):
        static_ids.copy_(routing_ids(tokens, top_k, experts, "cuda", seed=seed))
        graph.replay()
        torch.cuda.synchronize()
        with torch_path():
            index, a, sa, y = step()
        assert_same(outputs[0].m_indices, index.m_indices, "m_indices")
        assert_same(outputs[0].row_pair, index.row_pair, "row_pair")
        # the tail blocks with no kept row are left unwritten by the kernel (no GEMM loads them)
        read = (index.row_pair.view(-1, 128)[:, 0] >= 0).repeat_interleave(128)
        assert not bool(read.all()), "the upper bound must leave unread blocks here"
        assert_same(outputs[1][read], a[read], "a")
        assert_same(outputs[2][read], sa[read], "sa")
        check_near_torch(outputs[3], y, "combine in graph")


# ----------------------------------------------------------------------------- the switch

def test_fused_switch_semantics(monkeypatch):
    """Fused is the default; only MOE_FP8_FUSED_PERMUTE=0 selects torch; CPU tensors always
    take the torch (reference) path."""
    monkeypatch.delenv(kEnv, raising=False)
    assert L.fused_switch_on()
    for value, on in (("0", False), (" 0 ", False), ("1", True), ("yes", True), ("", True)):
        monkeypatch.setenv(kEnv, value)
        assert L.fused_switch_on() is on, value
    monkeypatch.delenv(kEnv, raising=False)
    assert not L.fused_enabled(torch.zeros(1))


@torch.no_grad()
def test_layer_default_runs_fused_and_zero_runs_torch(backend, monkeypatch):
    """With the variable unset the layer launches the permute family (forward and masked step);
    with =0 it launches none of them."""
    moe = small_layer(backend)
    x = torch.randn(9, moe.cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    x = x.bfloat16().to(backend)
    module, make = kernels(), kernels()._kernel
    log = []
    monkeypatch.setattr(module, "_kernel", lambda src, like: RecordingKernel(make(src, like), src, log))
    monkeypatch.delenv(kEnv, raising=False)
    y_default = moe(x)
    moe.forward_masked(x)
    names = {launch[0] for launch in log}
    # the masked step of 9 tokens: the small dispatch (default, <= 256 pairs) for index + permute
    assert {module.rank_source().instance, module.permute_source(False).instance,
            module.masked_dispatch_small_source().instance} <= names
    assert any("combine_kernel" in n for n in names), names
    log.clear()
    monkeypatch.setenv(kEnv, "0")
    y_torch = moe(x)
    moe.forward_masked(x)
    assert log == []
    check_near_torch(y_default, y_torch, "layer default (fused) vs =0 (torch)")


# ----------------------------------------------------------------------------- build

def test_bundled_kernels_compile_spill_free():
    """The permute family is registered for precompile() and uses no local memory (no GPU)."""
    assert_bundled_compile_clean(kernels())
