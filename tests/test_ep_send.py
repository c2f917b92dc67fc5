"""The send-side kernels of the expert-parallel exchange (include/ep_send.cuh) on the CPU, in the
g++ emulation (tests/kernel_checks.py), against their torch references in
``moe_fp8.layers.dispatch.torch_dist`` — no process group needed (tests/test_ep.py runs them
inside the exchange)."""
import ctypes

import pytest
import torch


@pytest.fixture(scope="module")
def ep_send_lib(tmp_path_factory):
    from kernel_checks import build_ep_send_emulator
    lib = ctypes.CDLL(build_ep_send_emulator(tmp_path_factory.mktemp("ep_send")))
    lib.moe_emu_launch.restype = ctypes.c_int
    return lib


@pytest.mark.parametrize("tokens,top_k,experts,ranks", [
    (1, 1, 1, 1), (5, 4, 16, 4), (256, 8, 256, 8), (257, 6, 24, 3), (600, 8, 64, 64), (300, 2, 1024, 8)])
def test_ep_send_kernels_match_torch(ep_send_lib, tokens, top_k, experts, ranks):
    """route_pack + send_order (emulated) == the torch send side, without a process group: any
    R <= 64 (the fused job runs R = 2), E up to 1024, several CTAs, -1 ids and empty ranks."""
    from kernel_checks import emulated_permute_kernels
    from moe_fp8.gemm.kernels import ep_send
    from moe_fp8.layers.dispatch.torch_dist import RowFormat, pack_records, routing_table, send_order
    from moe_fp8.layers.permute import quantize_tokens
    gen = torch.Generator().manual_seed(tokens * 31 + ranks)
    experts_per_rank = experts // ranks
    chosen = max(top_k, experts // 2)  # the upper experts (and ranks) stay empty
    ids = torch.stack([torch.randperm(chosen, generator=gen)[:top_k] for _ in range(tokens)])
    ids.view(-1)[::7] = -1
    weights = torch.rand(tokens, top_k, generator=gen)
    xq, xs = quantize_tokens(torch.randn(tokens, 256, generator=gen).bfloat16())
    fmt = RowFormat(256, top_k)
    table, expert, hit = routing_table(ids, experts, experts_per_rank, ranks)
    want_send, want_source = send_order(hit)
    want_records = pack_records(fmt, xq, xs, expert, weights)
    log = []
    with emulated_permute_kernels(ep_send_lib, log, ep_send=True):
        assert ep_send.supports(ids, weights, xq, xs, experts, ranks)
        got_table = torch.zeros_like(table)
        records = torch.full((tokens, fmt.nbytes), 0xAB, dtype=torch.uint8)  # poison
        cta_counts = ep_send.route_pack(ids, weights, xq, xs, records, got_table, experts_per_rank, ranks)
        send_token = torch.full((ranks * tokens,), -7, dtype=torch.int64)
        source_row = torch.full((tokens, ranks), -7, dtype=torch.int64)
        source_weight = torch.full((tokens, ranks), float("nan"))
        ep_send.send_order(ids, got_table, cta_counts, experts_per_rank, ranks, send_token, source_row,
                           source_weight)
    assert len(log) == 2
    assert torch.equal(got_table, table)
    sends = int(hit.sum())
    assert torch.equal(send_token[:sends], want_send[:sends]) and (send_token[sends:] == -7).all()
    assert torch.equal(source_row, want_source.slot_row)
    assert torch.equal(source_weight, want_source.slot_weight)
    payload = fmt.payload_bytes
    assert torch.equal(records[:, :payload], want_records[:, :payload])
    assert (records[:, payload:] == 0).all()


@pytest.mark.parametrize("tokens,ranks,valid", [(1, 1, None), (5, 3, 2), (300, 8, "tensor"),
                                                (9, 2, 0), (40, 4, 40)])
def test_replicate_pack_matches_torch(ep_send_lib, tokens, ranks, valid):
    """Decode's packing kernel (emulated) == the torch packing: every destination's slot t holds
    token t's record, ids -1 from num_valid on (None, an int, a device scalar), -1 slots kept."""
    from kernel_checks import emulated_permute_kernels
    from moe_fp8.gemm.kernels import ep_send
    from moe_fp8.layers.dispatch.torch_dist import RowFormat, pack_replicated
    from moe_fp8.layers.permute import quantize_tokens
    gen = torch.Generator().manual_seed(tokens + ranks)
    top_k, experts = 8, 64
    ids = torch.rand(tokens, experts, generator=gen).topk(top_k, dim=1).indices
    ids.view(-1)[::5] = -1
    weights = torch.rand(tokens, top_k, generator=gen)
    xq, xs = quantize_tokens(torch.randn(tokens, 384, generator=gen).bfloat16())
    num_valid = torch.tensor(tokens // 2) if valid == "tensor" else valid
    fmt = RowFormat(384, top_k)
    want = torch.zeros(ranks, tokens, fmt.nbytes, dtype=torch.uint8)  # the kernel zeroes padding
    pack_replicated(fmt, xq, xs, ids, weights, num_valid, want)
    got = torch.full_like(want, 0xAB)  # poison: every byte must be written (padding as zeros)
    log = []
    with emulated_permute_kernels(ep_send_lib, log, ep_send=True):
        assert ep_send.supports_replicate(ids, weights, xq, xs, num_valid)
        ep_send.replicate_pack(ids, weights, xq, xs, num_valid, got)
    assert len(log) == 1 and torch.equal(got, want)


def test_ep_send_kernels_compile_clean():
    """Both ep_send kernels are registered for precompile() and use no local memory (sm_90a)."""
    from kernel_checks import assert_bundled_compile_clean
    from moe_fp8.gemm.kernels import ep_send
    assert_bundled_compile_clean(ep_send)
