"""Bandwidth of the quantisation kernels (include/quant.cuh) beside a plain torch version and
the device copy ceiling, same process, medians with the L2 flushed (benchmarks/common.py).

GB/s counts every input byte read once and every output byte (fp8 values + fp32 scales)
written once; masked shapes count only the rows below masked_m. "x floor" = time over the byte
floor (bytes / copy ceiling); "% of same-size copy" = a device copy of the same bytes, timed the
same way, over the kernel's time (the ceiling at decode sizes, where a copy is latency-bound
too). "us" is the variant the op dispatches; per-token and contiguous
SiLU rows also time every kernel variant ("stream", "oneshot" = v1's structure, hoisted division)
on the same tensors, and "same" checks that all of them wrote identical bytes. The summary gives
the launch floor (a 4-byte torch memset timed the same way) and the resident CTAs per SM of the
stream kernels. Writes results/bench_quant_<date>.{md,csv} and prints the table last.

Training kernels (include/transpose_quant.cuh, include/silu_backward.cuh) at the training
benchmark's shape (8 experts x 4096 tokens, H 7168, I 2048): the fused 128x128 quantisation +
transpose of the fp32 masters, the along-token transpose quantisation of dY (bf16) and x' (fp32),
the along-token requantisation of the saved fp8 x (x'), and the fused SiLU-mul backward + its
three quantisations; their "torch us" column is the composition they replace in
layers/autograd.py (transposed copy + the row-quant kernel; dequantise + mask + transposed copy +
row quant; the SiLU backward in torch + three quantisations), so "speedup vs torch" is the gain.
``--quick`` runs those plus the M=16384 per-token and SiLU rows (issue 10's target).
Usage (GPU): PYTHONPATH=$PWD python benchmarks/bench_quant.py [--repeats N] [--quick]
"""
from __future__ import annotations

import argparse
import functools
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from moe_fp8.gemm import jit, reference as ref  # noqa: E402
from moe_fp8.gemm.kernels import quant  # noqa: E402
from moe_fp8.gemm.kernels import silu_backward, transpose_quant  # noqa: E402
from moe_fp8.gemm.layout import empty_act_scales  # noqa: E402

FP8 = torch.float8_e4m3fn
_git_commit = common.commit
common.commit = lambda: os.environ.get("MOE_FP8_COMMIT") or _git_commit()  # no .git on the device


def torch_per_token(x):
    return ref.per_token_group_quant(x, 128, False)


def torch_silu(h):
    gate, up = h.float().chunk(2, dim=-1)
    return ref.per_token_group_quant(F.silu(gate) * up, 128, False)


# Each case: (name, shape, bytes, {label: fn} with the dispatched op first, torch fn, outputs)
def case_per_token(m, k, dtype=torch.bfloat16):
    x = torch.randn(m, k, device="cuda").to(dtype)
    q = torch.empty(m, k, dtype=FP8, device="cuda")
    s = empty_act_scales(m, k // 128, device="cuda")
    nbytes = x.numel() * x.element_size() + q.numel() + m * (k // 128) * 4
    fns = {"us": lambda: quant.per_token_group_quant(x, q, s, 128, False)}
    for v in quant.kVariants:
        fns[f"{v} us"] = functools.partial(quant.per_token_group_quant, x, q, s, 128, False,
                                           variant=v)
    return (f"per_token_group_quant {str(dtype)[6:]}", f"M={m} K={k}", nbytes, fns,
            lambda: torch_per_token(x), (q, s))


def case_per_block(e, n, k):
    w = torch.randn(e, n, k, device="cuda").to(torch.bfloat16)
    q = torch.empty_like(w, dtype=FP8)
    s = torch.empty(e, -(-n // 128), k // 128, device="cuda")
    nbytes = w.numel() * 2 + q.numel() + s.numel() * 4
    return ("per_block_quant bf16", f"E={e} N={n} K={k}", nbytes,
            {"us": lambda: quant.per_block_quant(w, q, s, 128, False)},
            lambda: ref.per_block_quant(w, 128, False), (q, s))


def case_silu(m, inter):
    h = torch.randn(m, 2 * inter, device="cuda").to(torch.bfloat16)
    q = torch.empty(m, inter, dtype=FP8, device="cuda")
    s = empty_act_scales(m, inter // 128, device="cuda")
    nbytes = h.numel() * 2 + q.numel() + s.numel() * 4
    fns = {"us": lambda: quant.silu_and_mul_quant(h, q, s, None, 128, False)}
    for v in quant.kVariants:
        fns[f"{v} us"] = functools.partial(quant.silu_and_mul_quant, h, q, s, None, 128, False,
                                           variant=v)
    return ("silu_and_mul_quant", f"M={m} I={inter}", nbytes, fns, lambda: torch_silu(h), (q, s))


def case_silu_masked(e, m_max, inter, mean_m):
    h = torch.randn(e, m_max, 2 * inter, device="cuda").to(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    counts = torch.randint(0, 2 * mean_m + 1, (e,), generator=gen).clamp(max=m_max)
    masked_m = counts.to(torch.int32).cuda()
    q = torch.zeros(e, m_max, inter, dtype=FP8, device="cuda")
    s = empty_act_scales(m_max, inter // 128, e, device="cuda").zero_()
    rows = int(counts.sum())
    nbytes = rows * (2 * inter * 2 + inter + inter // 128 * 4)
    # "us": the variant the layer picks (it passes its layout's expected_m, pairs / experts)
    expected_m = max(1, rows // e)
    fns = {"us": lambda: quant.silu_and_mul_quant(h, q, s, masked_m, 128, False,
                                                  expected_m=expected_m)}
    for v in quant.kVariants:
        fns[f"{v} us"] = functools.partial(quant.silu_and_mul_quant, h, q, s, masked_m, 128, False,
                                           variant=v)
    return ("silu_and_mul_quant masked", f"E={e} M_max={m_max} I={inter} rows={rows}", nbytes,
            fns, lambda: torch_silu(h), (q, s))  # torch has no masked form: it does every row


def _row_quant(x):
    """The row-quant kernel on a contiguous copy (the old along-token path)."""
    q = torch.empty(x.shape, dtype=FP8, device="cuda")
    s = empty_act_scales(x.shape[0], x.shape[1] // 128, device="cuda")
    quant.per_token_group_quant(x.contiguous(), q, s, 128, False)
    return q, s


def case_block_transpose(e, n, k, dtype=torch.float32):
    w = torch.randn(e, n, k, device="cuda").to(dtype)
    q, qt = torch.empty_like(w, dtype=FP8), torch.empty(e, k, n, dtype=FP8, device="cuda")
    s = torch.empty(e, n // 128, k // 128, device="cuda")
    st = torch.empty(e, k // 128, n // 128, device="cuda")
    nbytes = w.numel() * w.element_size() + 2 * q.numel() + 2 * s.numel() * 4

    def composition():  # per_block_quant, then the transposed copies (the old cache build)
        quant.per_block_quant(w, q, s, 128, False)
        return q.transpose(1, 2).contiguous(), s.transpose(1, 2).contiguous()
    return (f"per_block_quant_transpose {str(dtype)[6:]}", f"E={e} N={n} K={k}", nbytes,
            {"us": lambda: transpose_quant.per_block_quant_transpose(w, q, s, qt, st, 128, False)},
            composition, (q, s, qt, st))


def case_token_transpose(t, c, dtype):
    x = torch.randn(t, c, device="cuda").to(dtype)
    qt = torch.empty(c, t, dtype=FP8, device="cuda")
    st = empty_act_scales(c, -(-t // 128), device="cuda")
    nbytes = x.numel() * x.element_size() + qt.numel() + st.numel() * 4
    return (f"token_transpose_quant {str(dtype)[6:]}", f"T={t} C={c}", nbytes,
            {"us": lambda: transpose_quant.token_transpose_quant(x, qt, st, 128, False)},
            lambda: _row_quant(x.t()), (qt, st))


def case_token_requant(t, c):
    """x' of the backward: fp8 rows + 1x128 scales -> dequantised, padding zero, along tokens."""
    x = torch.randn(t, c, device="cuda").to(torch.bfloat16)
    a = torch.empty(t, c, dtype=FP8, device="cuda")
    sa = empty_act_scales(t, c // 128, device="cuda")
    quant.per_token_group_quant(x, a, sa, 128, False)
    m_indices = torch.arange(t, device="cuda", dtype=torch.int32) // 4096  # 8 full experts
    qt = torch.empty(c, t, dtype=FP8, device="cuda")
    st = empty_act_scales(c, -(-t // 128), device="cuda")
    nbytes = a.numel() + sa.numel() * 4 + t * 4 + qt.numel() + st.numel() * 4

    def composition():  # layers/autograd.py before: dequant, masked_fill, transposed copy, quant
        x_val = ref.dequant_rows(a, sa).masked_fill((m_indices < 0).unsqueeze(1), 0)
        return _row_quant(x_val.t())
    return ("token_transpose_requant fp8", f"T={t} C={c}", nbytes,
            {"us": lambda: transpose_quant.token_transpose_requant(a, sa, m_indices, qt, st, 128,
                                                                   False)},
            composition, (qt, st))


def case_silu_backward(m, inter):
    h = torch.randn(m, 2 * inter, device="cuda").to(torch.bfloat16)
    d_act = torch.randn(m, inter, device="cuda").to(torch.bfloat16)
    groups = -(-m // 128)
    dh = (torch.empty(m, 2 * inter, dtype=FP8, device="cuda"),
          empty_act_scales(m, 2 * inter // 128, device="cuda"))
    dh_t = (torch.empty(2 * inter, m, dtype=FP8, device="cuda"),
            empty_act_scales(2 * inter, groups, device="cuda"))
    act_t = (torch.empty(inter, m, dtype=FP8, device="cuda"),
             empty_act_scales(inter, groups, device="cuda"))
    nbytes = (d_act.numel() + h.numel()) * 2 + 2 * dh[0].numel() + act_t[0].numel() + 4 * (
        dh[1].numel() + dh_t[1].numel() + act_t[1].numel())

    def composition():  # layers/autograd.py before the fused op
        d_h, act = ref.silu_mul_backward(d_act, h)
        return _row_quant(d_h), _row_quant(d_h.t()), _row_quant(act.t())
    return ("silu_and_mul_backward_quant", f"M={m} I={inter}", nbytes,
            {"us": lambda: silu_backward.silu_and_mul_backward_quant(d_act, h, *dh, *dh_t, *act_t,
                                                                     128, False)},
            composition, (*dh, *dh_t, *act_t))


def training_cases():
    """The training step's shapes (bench_train.py: 8 experts x 4096 tokens, fp32 masters)."""
    yield case_block_transpose(8, 4096, 7168)  # W13 [E, 2I, H]
    yield case_block_transpose(8, 7168, 2048)  # W2 [E, H, I]
    yield case_token_transpose(32768, 7168, torch.bfloat16)  # dY
    yield case_token_requant(32768, 7168)  # x' (the saved fp8 x, dequantised)
    yield case_silu_backward(32768, 2048)
    yield case_silu_backward(4096, 2048)


def quick_cases():
    yield from training_cases()
    yield case_per_token(16384, 7168)
    yield case_silu(16384, 2048)


def decode_cases():
    yield case_per_token(128, 7168)
    yield case_silu(128, 2048)
    yield case_silu_masked(32, 256, 2048, 32)  # decode, 32 local experts (the case)
    yield case_silu_masked(32, 256, 2048, 8)  # lighter decode step
    yield case_silu_masked(32, 256, 2048, 128)  # every expert about half full
    yield case_silu_masked(256, 128, 2048, 4)  # 256 experts on one card, ~4 rows each
    # The first row again: as the first row of a process it has read 50-64 us (stream variant
    # 38-131 us) against ~6 us in other runs (H100, 2026-12-05); a second reading in the same
    # process tells a first-row artefact from the kernel.
    yield case_per_token(128, 7168)


def cases():
    yield from training_cases()
    yield case_per_token(16384, 7168)
    yield case_per_token(16384, 7168, torch.float32)
    yield case_per_token(4096, 7168)
    yield case_silu(16384, 2048)
    yield case_silu(4096, 2048)
    yield from decode_cases()
    yield case_per_block(8, 7168, 2048)
    yield case_per_block(1, 4096, 7168)


def resident_ctas(src, threads: int, smem: int) -> str:
    """cuOccupancyMaxActiveBlocksPerMultiprocessor for a kernel (the streaming kernels are sized
    for kStreamBlocksPerSm CTAs per SM; fewer means the shared-memory carveout or registers
    limit them)."""
    import ctypes
    from moe_fp8.gemm.jit import driver
    try:
        fn = driver.lib().lib.cuOccupancyMaxActiveBlocksPerMultiprocessor
        fn.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_void_p, ctypes.c_int,
                       ctypes.c_size_t]
        count = ctypes.c_int()
        code = fn(ctypes.byref(count), jit.get_kernel(src)._function, threads, smem)
    except Exception as error:  # a report line must not cost the table
        return f"n/a ({error})"
    return str(count.value) if code == 0 else f"error {code}"


def launch_floor_us(repeats: int) -> float:
    """The timing method's floor: a 4-byte memset, flushed and timed like the kernels."""
    tiny = torch.empty(1, device="cuda")
    return common.bench(lambda: tiny.zero_(), repeats=repeats)


def same_size_copy_us(nbytes: int, repeats: int) -> float:
    """A device-to-device copy moving the kernel's bytes (nbytes / 2 read, nbytes / 2 written),
    timed like the kernels: the copy ceiling at this size (decode sizes are latency-bound)."""
    src = torch.empty(max(nbytes // 2, 16), dtype=torch.int8, device="cuda").random_(-128, 127)
    dst = torch.empty_like(src)
    return common.bench(lambda: dst.copy_(src), repeats=repeats)


def snapshot(outputs):
    return [t.view(torch.uint8).clone() if t.dtype == FP8 else t.clone() for t in outputs]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--quick", action="store_true",
                        help="training kernels + the M=16384 per-token and SiLU rows only")
    parser.add_argument("--decode", action="store_true", help="the decode-size rows only")
    args = parser.parse_args()
    ceiling = common.copy_bandwidth_gbs()
    floor_us = launch_floor_us(args.repeats)
    rows = []
    chosen = decode_cases() if args.decode else quick_cases() if args.quick else cases()
    for name, shape, nbytes, fns, torch_fn, outputs in chosen:
        times, same = {}, True
        reference = None
        for label, fn in fns.items():
            times[label] = common.bench(fn, repeats=args.repeats)
            written = snapshot(outputs)
            if reference is None:
                reference = written
            same = same and all(torch.equal(a, b) for a, b in zip(reference, written))
        torch_us = common.bench(torch_fn, repeats=max(args.repeats // 3, 5))
        kernel_us = times.pop("us")
        gbs = nbytes / (kernel_us * 1e-6) / 1e9
        copy_us = same_size_copy_us(nbytes, args.repeats)
        row = {"kernel": name, "shape": shape, "MB": nbytes / 1e6, "us": kernel_us, "GB/s": gbs,
               "% of copy": 100 * gbs / ceiling,
               "x floor": kernel_us / (nbytes / (ceiling * 1e9) * 1e6),
               "same-size copy us": copy_us, "% of same-size copy": 100 * copy_us / kernel_us}
        row.update({label: times.get(label, "") for label in
                    (f"{v} us" for v in quant.kVariants)})
        row.update({"same": "yes" if same else "NO", "torch us": torch_us,
                    "speedup vs torch": torch_us / kernel_us})
        rows.append(row)
        torch.cuda.empty_cache()  # the training cases hold ~1-2 GB each
    occupancy = ", ".join(
        f"{name} {resident_ctas(src, quant.kStreamThreads, smem)}" for name, src, smem in (
            ("per-token bf16", quant.per_token_source(torch.bfloat16, 128, False), 0),
            ("silu", quant.silu_source(128, False, False), 0),
            ("silu masked E=32", quant.silu_source(128, False, True), 4 * 33)))
    summary = (f"copy ceiling (device-to-device copy of 2 GiB, read + write): {ceiling:.0f} GB/s. "
               f"Launch floor (4-byte memset, same method): {floor_us:.2f} us. "
               f"Resident CTAs per SM of the stream kernels (of {quant.kStreamBlocksPerSm}): "
               f"{occupancy}. Target: >= 85 % of copy at M=16384; masked decode within ~2x of "
               f"its byte floor.")
    common.write_results("bench_quant", rows, summary)


if __name__ == "__main__":
    main()
