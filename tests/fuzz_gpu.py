"""Fuzzing the FP8 kernels against their references on random shapes within the contract.

Ops (each gets ``--count`` random cases, default 500):

    gemm_dense       a [M, K] x b [N, K]                          calc_diff vs unquantised + FP8 reference
    gemm_contiguous  a [M_sum, K] x b [E, N, K], m_indices        (empty experts, 128-boundary counts)
    gemm_masked      a [E, M_max, K] x b [E, N, K], masked_m      (masked_m 0 and = M_max)
    gemm_swiglu      masked gate-up GEMM + SiLU-and-mul quant vs unquantised (< 1e-2); the fused
                     SwiGLU GEMM (masked, and contiguous on the same rows) vs that pair  bit-exact
    gemm_kgrouped    out[e] += a[:, seg_e] . b[:, seg_e]^T (fp32)  (empty segments)
    quant_token      per-token-group quant, 2-D / 3-D, bf16 / fp32, pow2 or not   bit-exact
    quant_block      per-block quant, any N, 2-D / 3-D, bf16 / fp32, pow2 or not  bit-exact
    silu_contiguous  SiLU-and-mul quant [M, 2I] / [E, M, 2I]                      bit-exact
    silu_masked      SiLU-and-mul quant [E, M_max, 2I] with masked_m              bit-exact
    router           gate selection + weights + counts, local ids vs the torch router  same sets, weights <= 2e-6 rel
    permute_index    routing metadata (contiguous + masked, combine index) vs torch exact (integers)
    permute_rows     fp8 rows + scales into the contiguous / masked layout         bit-exact copies
    permute_combine  weighted un-permute (+ shared add) vs the slot-order oracle   bit-exact
    ep_send          EP send sides (prefill: table, send order, source index, records; decode:
                     the replicated rows) vs their torch ops                      exact

The permute family (moe_fp8/gemm/include/permute.cuh, the layer's default on sm_90) is compared
with the layer's torch path (MOE_FP8_FUSED_PERMUTE=0) on the same inputs: random T, top-k 1..8,
E_loc 1..256 (the kernels' limit), skipped pairs, empty experts, m_max below the counts (overflow).

Random M (1, odd, up to 2048), N % 16 == 0, K % 128 == 0. K and N are compile-time kernel
arguments, so every op draws a small pool of (N, K) per run (fresh each seed; always including
N = 16, K = 128) and all kernels the run needs are compiled in parallel first. Every GEMM output is
poisoned with NaN inside a larger buffer: written elements must be finite, unwritten ones (padding,
rows >= masked_m, the tail past the output) must keep the poison. Bounds: calc_diff vs the FP8
reference < 1e-5 (wgrad < 1e-6; same math up to summation order and bf16 rounding) and vs the
unquantised fp32 product < 1e-3 (outputs under 4096 elements: 5e-3, FP8 noise over few values;
wgrad per expert: 1e-3 at >= 65536 elements, else 1.5e-3 / 5e-3) — the bounds tests/test_gemm_gpu.py
and tests/test_wgrad_gpu.py use.

    python3 tests/fuzz_gpu.py --count 500              # the full run: CSV under benchmarks/results/
    python3 tests/fuzz_gpu.py --once all               # one fixed small call per op (sanitizer driver)
    python3 tests/fuzz_gpu.py --once guards            # out-of-contract values, checks off (memcheck)
    python3 tests/fuzz_gpu.py --cpu --count 3          # the harness itself on the CPU references
    python3 -m pytest -q -m gpu tests/fuzz_gpu.py      # 25 cases per op (marker gpu)
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import random
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

kRepo = Path(__file__).resolve().parents[1]
if str(kRepo) not in sys.path:
    sys.path.insert(0, str(kRepo))

import moe_fp8.gemm as G  # noqa: E402
from moe_fp8.gemm import reference as ref  # noqa: E402
from moe_fp8.gemm.layout import build_m_indices, empty_act_scales  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_checks import combine_oracle  # noqa: E402  (the combine's documented order)

FP8 = torch.float8_e4m3fn
# run order: the fast (quant) ops first, so their unused time share rolls over to the GEMMs
kOps = ("quant_token", "quant_block", "silu_contiguous", "silu_masked",
        "train_block_t", "train_token_t", "train_requant", "silu_backward",
        "router", "permute_index", "permute_rows", "permute_combine", "ep_send", "gemm_dense",
        "gemm_contiguous", "gemm_offsets", "gemm_masked", "gemm_swiglu", "gemm_kgrouped")
kPoolSize = 5  # (N, K) pairs per op and run: bounds the number of kernels to compile
kTail = 4096  # poisoned elements after every GEMM output


class CaseFailure(AssertionError):
    pass


def expect(condition, message: str) -> None:
    if not condition:
        raise CaseFailure(message)


@dataclass
class Context:
    device: str = "cuda"
    backend: str = "kernel"  # "reference" for the CPU dry run of the harness

    def gen(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)


# ----------------------------------------------------------------------------- data

def act_data(shape, gen, spread=0.5, device="cuda"):
    """Random fp32 with one magnitude per row (e^(spread * randn)): a wrong scale shows in the
    FP8-reference check. NOTE: wider spreads let a few rows carry all of calc_diff's energy, and
    FP8 noise alone then crossed 1e-3 (spread 2: 1.2e-3 at 570 x 16 x 128, CPU reference)."""
    x = torch.randn(shape, device=device, generator=gen)
    mag = torch.exp(torch.randn((*shape[:-1], 1), device=device, generator=gen) * spread)
    return x * mag


def weight_data(shape, gen, device="cuda"):
    """One magnitude per 128-row block (rows sharing a 128x128 scale must be alike)."""
    n = shape[-2]
    x = torch.randn(shape, device=device, generator=gen)
    mag = torch.exp(torch.randn((*shape[:-2], -(-n // 128), 1), device=device, generator=gen) * 0.5)
    return x * mag.repeat_interleave(128, dim=-2)[..., :n, :]


def quant_act(x: torch.Tensor):
    """Reference 1x128 quantisation into the MN-major layout the kernels read."""
    q, s = ref.per_token_group_quant(x)
    s_mn = empty_act_scales(x.shape[-2], s.shape[-1], x.shape[0] if x.dim() == 3 else None,
                            device=x.device)
    s_mn.copy_(s)
    return q, s_mn


def quant_weight(w: torch.Tensor):
    q, s = ref.per_block_quant(w)
    return q.contiguous(), s


def poisoned(shape, ctx: Context, dtype=torch.bfloat16):
    """A NaN-filled view of ``shape`` at the front of a buffer with kTail more NaNs after it."""
    numel = 1
    for d in shape:
        numel *= d
    buf = torch.full((numel + kTail,), float("nan"), dtype=dtype, device=ctx.device)
    return buf, buf[:numel].view(shape)


def unquantised_limit(numel: int) -> float:
    return 1e-3 if numel >= 4096 else 5e-3


def wgrad_limit(numel: int) -> float:
    return 1e-3 if numel >= 65536 else (1.5e-3 if numel >= 4096 else 5e-3)


def check_gemm_rows(out, buf, numel, reference, want, what, stats):
    """``out``/``reference``/``want`` restricted to written rows; ``buf`` tail must stay NaN."""
    expect(bool(torch.isnan(buf[numel:]).all()), f"{what}: wrote past the end of out")
    if out.numel() == 0:
        return
    expect(bool(torch.isfinite(out).all()), f"{what}: unwritten (NaN) or non-finite outputs")
    agree = G.calc_diff(out, reference)
    stats["ref"] = max(stats.get("ref", 0.0), agree)
    expect(agree < 1e-5, f"{what}: calc_diff vs FP8 reference {agree:.2e}")
    diff = G.calc_diff(out, want)
    stats["unq"] = max(stats.get("unq", 0.0), diff)
    expect(diff < unquantised_limit(out.numel()), f"{what}: calc_diff vs unquantised {diff:.2e}")


# ----------------------------------------------------------------------------- GEMM cases

def heuristic_config(op: str, c: dict):
    """The config the GEMM host code picks for case ``c`` (None: nothing to launch)."""
    from moe_fp8.gemm import heuristics as H
    sms = H.num_sms(torch.cuda.current_device())
    n, k = c["n"], c["k"]
    if op == "gemm_dense":
        return H.dense_config(c["m"], n, k, sms)
    if op in ("gemm_contiguous", "gemm_offsets"):
        m_sum = int(build_m_indices(c["counts"]).shape[0]) + c.get("extra", 0)
        return H.contiguous_config(m_sum, n, k, sms) if m_sum else None
    if op == "gemm_masked":
        return H.masked_config(len(c["masked_m"]), min(c["expected_m"], c["m_max"]), n, k, sms)
    return None


def case_config(op: str, c: dict):
    """A pinned config for cases drawn with ``a_mc`` (the heuristic's tile with A multicast,
    cluster_n = 2, where its column blocks pair up), ``a_rows`` (masked: A loaded in chunks of
    that many rows, only below masked_m) or ``split`` (dense: split K with tiles that wide);
    else None (the heuristic's own)."""
    import dataclasses
    if not (c.get("a_mc") or c.get("a_rows") or c.get("split")) or not torch.cuda.is_available():
        return None  # --cpu: the references take no config
    if c.get("split"):  # split K with c["split"]-wide tiles where a split fits, else the heuristic
        from moe_fp8.gemm import heuristics as H
        return H.split_k_config(c["m"], c["n"], c["k"], H.num_sms(torch.cuda.current_device()),
                                c["split"])
    config = heuristic_config(op, c)
    if config is None:
        return None
    if c.get("a_rows"):
        return dataclasses.replace(config, a_row_chunk=min(c["a_rows"], config.block_m))
    from moe_fp8.gemm import heuristics as H
    return H.with_a_multicast(config, c["n"])


def run_gemm_dense(c: dict, ctx: Context, stats: dict) -> None:
    m, n, k = c["m"], c["n"], c["k"]
    gen = ctx.gen(c["seed"])
    x, w = act_data((m, k), gen, device=ctx.device), weight_data((n, k), gen, device=ctx.device)
    a, b = quant_act(x.bfloat16().float()), quant_weight(w.bfloat16().float())
    buf, out = poisoned((m, n), ctx)
    G.fp8_gemm_nt(a, b, out=out, backend=ctx.backend, config=case_config("gemm_dense", c))
    reference = G.fp8_gemm_nt(a, b, backend="reference")
    want = x.bfloat16().float() @ w.bfloat16().float().t()
    check_gemm_rows(out, buf, m * n, reference, want, f"dense m={m} n={n} k={k}", stats)


def run_gemm_contiguous(c: dict, ctx: Context, stats: dict) -> None:
    counts, n, k = c["counts"], c["n"], c["k"]
    gen = ctx.gen(c["seed"])
    m_indices = build_m_indices(counts, device=ctx.device)
    m_sum, experts = m_indices.shape[0], len(counts)
    x = act_data((m_sum, k), gen, device=ctx.device).bfloat16().float()
    w = weight_data((experts, n, k), gen, device=ctx.device).bfloat16().float()
    a, b = quant_act(x), quant_weight(w)
    buf, out = poisoned((m_sum, n), ctx)
    G.m_grouped_fp8_gemm_nt_contiguous(a, b, m_indices, out=out, backend=ctx.backend,
                                       config=case_config("gemm_contiguous", c))
    what = f"contiguous counts={counts} n={n} k={k}"
    real = m_indices >= 0
    expect(bool(torch.isnan(out[~real]).all()), f"{what}: padding rows were written")
    reference = torch.full_like(out, float("nan"))
    G.m_grouped_fp8_gemm_nt_contiguous(a, b, m_indices, out=reference, backend="reference")
    want = torch.zeros(m_sum, n, device=ctx.device)
    for e in range(experts):
        rows = m_indices == e
        if bool(rows.any()):
            want[rows] = x[rows] @ w[e].t()
    check_gemm_rows(out[real], buf, m_sum * n, reference[real], want[real], what, stats)


def run_gemm_offsets(c: dict, ctx: Context, stats: dict) -> None:
    """The offsets form: every row of a segment written, rows past offsets[E] untouched."""
    from moe_fp8.gemm.layout import segment_offsets
    counts, n, k = c["counts"], c["n"], c["k"]
    gen = ctx.gen(c["seed"])
    offsets = segment_offsets(counts).to(ctx.device)
    end = int(offsets[-1])
    m_sum, experts = end + c["extra"], len(counts)
    x = act_data((m_sum, k), gen, device=ctx.device).bfloat16().float()
    w = weight_data((experts, n, k), gen, device=ctx.device).bfloat16().float()
    a, b = quant_act(x), quant_weight(w)
    buf, out = poisoned((m_sum, n), ctx)
    G.m_grouped_fp8_gemm_nt_contiguous_offsets(a, b, offsets, out=out, backend=ctx.backend)
    what = f"offsets counts={counts} extra={c['extra']} n={n} k={k}"
    expect(bool(torch.isnan(out[end:]).all()), f"{what}: rows past offsets[E] were written")
    reference = torch.full_like(out, float("nan"))
    G.m_grouped_fp8_gemm_nt_contiguous_offsets(a, b, offsets, out=reference, backend="reference")
    want = torch.zeros(end, n, device=ctx.device)
    bounds = offsets.tolist()
    for e in range(experts):
        want[bounds[e]:bounds[e + 1]] = x[bounds[e]:bounds[e + 1]] @ w[e].t()
    check_gemm_rows(out[:end], buf, m_sum * n, reference[:end], want, what, stats)


def run_gemm_masked(c: dict, ctx: Context, stats: dict) -> None:
    masked, m_max, n, k, expected_m = c["masked_m"], c["m_max"], c["n"], c["k"], c["expected_m"]
    experts = len(masked)
    gen = ctx.gen(c["seed"])
    x = act_data((experts, m_max, k), gen, device=ctx.device).bfloat16().float()
    w = weight_data((experts, n, k), gen, device=ctx.device).bfloat16().float()
    a, b = quant_act(x), quant_weight(w)
    masked_m = torch.tensor(masked, dtype=torch.int32, device=ctx.device)
    buf, out = poisoned((experts, m_max, n), ctx)
    G.m_grouped_fp8_gemm_nt_masked(a, b, masked_m, expected_m, out=out, backend=ctx.backend,
                                   config=case_config("gemm_masked", c))
    what = f"masked masked_m={masked} m_max={m_max} n={n} k={k} expected_m={expected_m}"
    valid = ref.masked_row_mask(m_max, masked_m)  # [E, M_max]
    expect(bool(torch.isnan(out[~valid]).all()), f"{what}: rows >= masked_m were written")
    reference = torch.full_like(out, float("nan"))
    G.m_grouped_fp8_gemm_nt_masked(a, b, masked_m, expected_m, out=reference, backend="reference")
    want = torch.bmm(x, w.transpose(1, 2))
    check_gemm_rows(out[valid], buf, experts * m_max * n, reference[valid], want[valid], what, stats)


def run_gemm_swiglu(c: dict, ctx: Context, stats: dict) -> None:
    """The decode gate-up pair, masked GEMM then masked SiLU-and-mul + quantisation, against the
    unquantised math; on the GPU also the fused SwiGLU GEMM (include/fused_swiglu.cuh), which
    must write the pair's bytes and scales exactly and leave rows >= masked_m alone."""
    masked, m_max, inter, k = c["masked_m"], c["m_max"], c["inter"], c["k"]
    expected_m, pow2, experts = c["expected_m"], c["pow2"], len(masked)
    gen = ctx.gen(c["seed"])
    x = act_data((experts, m_max, k), gen, device=ctx.device).bfloat16().float()
    w = weight_data((experts, 2 * inter, k), gen, device=ctx.device).bfloat16().float()
    a, b = quant_act(x), quant_weight(w)
    masked_m = torch.tensor(masked, dtype=torch.int32, device=ctx.device)
    what = f"swiglu masked_m={masked} m_max={m_max} I={inter} k={k} expected_m={expected_m} pow2={pow2}"
    h = torch.full((experts, m_max, 2 * inter), float("nan"), dtype=torch.bfloat16, device=ctx.device)
    G.m_grouped_fp8_gemm_nt_masked(a, b, masked_m, expected_m, out=h, backend=ctx.backend)
    want_q = torch.full((experts, m_max, inter), 0x5A, dtype=torch.uint8, device=ctx.device)
    want_s = empty_act_scales(m_max, inter // 128, experts, device=ctx.device)
    want_s.fill_(-7.0)
    G.silu_and_mul_quant_fp8(h, masked_m=masked_m, pow2_scale=pow2, expected_m=expected_m,
                             out=(want_q.view(FP8), want_s), backend=ctx.backend)
    valid = ref.masked_row_mask(m_max, masked_m)
    if bool(valid.any()):
        gate, up = torch.bmm(x, w.transpose(1, 2)).chunk(2, dim=-1)
        got = ref.dequant_rows(want_q.view(FP8)[valid], want_s[valid])
        diff = G.calc_diff(got, (torch.nn.functional.silu(gate) * up)[valid])
        stats["unq"] = max(stats.get("unq", 0.0), diff)
        # the act's own e4m3 rounding dominates: 1.6-3.3e-3 on the CPU references (60 cases,
        # 2026-12-05) against ~1 for a wrong row, block or scale
        expect(diff < 1e-2, f"{what}: calc_diff vs unquantised {diff:.2e}")
    if ctx.backend != "kernel":
        return
    from moe_fp8.gemm.kernels import fp8_gemm as K
    from moe_fp8.gemm.layout import to_mn_major
    got_q = torch.full_like(want_q, 0x5A)
    got_s = torch.full_like(want_s, -7.0)
    K.m_grouped_masked_swiglu(a[0], to_mn_major(a[1]), b[0], b[1], masked_m, expected_m,
                              got_q.view(FP8), got_s, pow2=pow2)
    same_bits(got_q, want_q, f"{what}: fused act bytes")
    same_bits(got_s, want_s, f"{what}: fused act scales")
    # The same expert rows in the contiguous layout (the prefill's fused SwiGLU, session 14):
    # its act must equal the masked pair's on every expert row; padding rows keep their poison.
    m_indices = build_m_indices(masked, device=ctx.device)
    rows = m_indices >= 0
    m_sum = m_indices.numel()
    a_rows = torch.zeros(m_sum, k, dtype=FP8, device=ctx.device)
    sa_rows = empty_act_scales(m_sum, k // 128, device=ctx.device)
    sa_rows.fill_(1.0)
    a_rows.view(torch.uint8)[rows] = a[0].view(torch.uint8)[valid]  # no index_put for fp8
    sa_rows[rows] = a[1][valid]
    flat_q = torch.full((m_sum, inter), 0x5A, dtype=torch.uint8, device=ctx.device)
    flat_s = empty_act_scales(m_sum, inter // 128, device=ctx.device)
    flat_s.fill_(-7.0)
    K.m_grouped_contiguous_swiglu(a_rows, sa_rows, b[0], b[1], m_indices, flat_q.view(FP8), flat_s,
                                  pow2=pow2)
    same_bits(flat_q[rows], want_q[valid], f"{what}: contiguous fused act bytes")
    same_bits(flat_s[rows], want_s[valid], f"{what}: contiguous fused act scales")
    expect(bool((flat_q[~rows] == 0x5A).all()) and bool((flat_s[~rows] == -7.0).all()),
           f"{what}: contiguous fused wrote padding rows")


def run_gemm_kgrouped(c: dict, ctx: Context, stats: dict) -> None:
    m, n, counts = c["m"], c["n"], c["counts"]
    gen = ctx.gen(c["seed"])
    tokens, experts = sum(counts), len(counts)
    xa = act_data((m, tokens), gen, device=ctx.device).bfloat16().float()
    xb = act_data((n, tokens), gen, device=ctx.device).bfloat16().float()
    a, b = quant_act(xa), quant_act(xb)
    bounds = [0]
    for count in counts:
        bounds.append(bounds[-1] + count)
    offsets = torch.tensor(bounds, dtype=torch.int32, device=ctx.device)
    before = torch.randn(experts, m, n, device=ctx.device, generator=gen)
    buf = torch.full((experts * m * n + kTail,), float("nan"), device=ctx.device)
    out = buf[:experts * m * n].view(experts, m, n)
    accumulate = not c.get("overwrite", False)
    if accumulate:
        out.copy_(before)
    else:  # every element must be written (zeros for experts without tokens)
        before.zero_()
    G.k_grouped_fp8_gemm_tn_contiguous(a, b, offsets, out, accumulate=accumulate, backend=ctx.backend)
    what = f"kgrouped m={m} n={n} counts={counts} accumulate={accumulate}"
    expect(bool(torch.isnan(buf[experts * m * n:]).all()), f"{what}: wrote past the end of out")
    expect(bool(torch.isfinite(out).all()), f"{what}: non-finite outputs")
    reference = before.clone()
    G.k_grouped_fp8_gemm_tn_contiguous(a, b, offsets, reference, backend="reference")
    for e, count in enumerate(counts):
        if count == 0:
            expect(torch.equal(out[e], before[e]), f"{what}: expert {e} has no tokens but changed")
            continue
        seg = slice(bounds[e], bounds[e + 1])
        added, ref_added = out[e] - before[e], reference[e] - before[e]
        agree = G.calc_diff(added, ref_added)
        stats["ref"] = max(stats.get("ref", 0.0), agree)
        expect(agree < 1e-6, f"{what}: expert {e}: calc_diff vs FP8 reference {agree:.2e}")
        diff = G.calc_diff(added, xa[:, seg] @ xb[:, seg].t())
        stats["unq"] = max(stats.get("unq", 0.0), diff)
        expect(diff < wgrad_limit(added.numel()), f"{what}: expert {e}: calc_diff vs unquantised {diff:.2e}")


# ----------------------------------------------------------------------------- quant cases

def bits_equal(q, s, expected_q, expected_s, what: str) -> None:
    """fp8 values and fp32 scales bit for bit (scales compared as logical [.., G] values)."""
    qb, eqb = q.cpu().view(torch.uint8), expected_q.cpu().view(torch.uint8)
    if not torch.equal(qb, eqb):
        bad = (qb != eqb).nonzero()
        raise CaseFailure(f"{what}: {bad.shape[0]} fp8 values differ, first at {bad[0].tolist()}")
    sb = s.cpu().contiguous().view(torch.int32)
    esb = expected_s.cpu().contiguous().view(torch.int32)
    if not torch.equal(sb, esb):
        bad = (sb != esb).nonzero()
        raise CaseFailure(f"{what}: {bad.shape[0]} scales differ, first at {bad[0].tolist()}")


def quant_input(shape, gen, dtype, device, zero_rows=True):
    """Random rows of varied magnitude; a few all-zero 128-groups (the floored scale)."""
    x = act_data(shape, gen, device=device)
    if zero_rows and shape[-2] > 2:
        flat = x.view(-1, shape[-1])
        flat[1, :128] = 0.0
    return x.to(dtype)


def run_quant_token(c: dict, ctx: Context, stats: dict) -> None:
    shape, dtype, pow2 = tuple(c["shape"]), c["dtype"], c["pow2"]
    x = quant_input(shape, ctx.gen(c["seed"]), dtype, ctx.device)
    batch = shape[0] if len(shape) == 3 else None
    q = torch.full(shape, 0x7F, dtype=torch.uint8, device=ctx.device).view(FP8)  # NaN poison
    s = empty_act_scales(shape[-2], shape[-1] // 128, batch, device=ctx.device)
    s.fill_(float("nan"))
    G.per_token_group_quant_fp8(x, pow2_scale=pow2, out=(q, s), backend=ctx.backend)
    eq, es = ref.per_token_group_quant(x.cpu(), 128, pow2)
    bits_equal(q, s, eq, es, f"quant_token {shape} {dtype} pow2={pow2}")


def run_quant_block(c: dict, ctx: Context, stats: dict) -> None:
    shape, dtype, pow2 = tuple(c["shape"]), c["dtype"], c["pow2"]
    w = quant_input(shape, ctx.gen(c["seed"]), dtype, ctx.device, zero_rows=False)
    q, s = G.per_block_quant_fp8(w, pow2_scale=pow2, backend=ctx.backend)
    eq, es = ref.per_block_quant(w.cpu(), 128, pow2)
    bits_equal(q, s, eq, es, f"quant_block {shape} {dtype} pow2={pow2}")


def silu_reference(h: torch.Tensor, pow2: bool):
    """silu(gate) * up in fp32 on h's device (as the kernels' tests do), quantised on the CPU."""
    gate, up = h.float().chunk(2, dim=-1)
    return ref.per_token_group_quant((F.silu(gate) * up).cpu(), 128, pow2)


def run_silu(c: dict, ctx: Context, stats: dict) -> None:
    shape, pow2, masked = tuple(c["shape"]), c["pow2"], c.get("masked_m")
    gen = ctx.gen(c["seed"])
    h = (torch.randn(shape, device=ctx.device, generator=gen) * 4).bfloat16()
    if shape[-2] > 2:
        flat = h.view(-1, shape[-1])
        flat[0, : shape[-1] // 2] = 0.0  # gate 0: a zero product
        flat[1, ::2] = -120.0  # exp(-g) overflows: silu(g) = -0
    inter = shape[-1] // 2
    out_shape = (*shape[:-1], inter)
    batch = shape[0] if len(shape) == 3 else None
    q = torch.full(out_shape, 0x7F, dtype=torch.uint8, device=ctx.device).view(FP8)
    s = empty_act_scales(shape[-2], inter // 128, batch, device=ctx.device)
    s.fill_(float("nan"))
    q_before = q.clone()
    masked_m = None if masked is None else torch.tensor(masked, dtype=torch.int32, device=ctx.device)
    G.silu_and_mul_quant_fp8(h, masked_m=masked_m, pow2_scale=pow2, out=(q, s), backend=ctx.backend)
    eq, es = silu_reference(h, pow2)
    what = f"silu {shape} masked_m={masked} pow2={pow2}"
    if masked is None:
        bits_equal(q, s, eq, es, what)
        return
    for e, rows in enumerate(masked):
        bits_equal(q[e, :rows], s[e, :rows], eq[e, :rows], es[e, :rows], f"{what} expert {e}")
        expect(torch.equal(q[e, rows:].view(torch.uint8), q_before[e, rows:].view(torch.uint8)),
               f"{what}: expert {e}: rows >= masked_m written (values)")
        expect(bool(torch.isnan(s[e, rows:]).all()), f"{what}: expert {e}: rows >= masked_m written (scales)")


# ----------------------------------------------------------------------------- permute cases

kPermuteEnv = "MOE_FP8_FUSED_PERMUTE"


class permute_switch:
    """``with permute_switch(on):`` the fused permute kernels (on) or the torch path (off)."""

    def __init__(self, on: bool):
        self.value = "1" if on else "0"

    def __enter__(self):
        self.old = os.environ.get(kPermuteEnv)
        os.environ[kPermuteEnv] = self.value

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop(kPermuteEnv, None)
        else:
            os.environ[kPermuteEnv] = self.old


def routing_ids(c: dict, gen: torch.Generator, device) -> torch.Tensor:
    """Local ids int64 [T, k]: distinct experts per token, some experts never chosen (empty),
    a fraction of pairs skipped (the sentinel E_loc, as layouts.local_expert_ids writes it)."""
    tokens, top_k, experts = c["tokens"], c["top_k"], c["experts"]
    scores = torch.rand(tokens, experts, device=device, generator=gen)
    if experts > top_k:  # a few experts nobody picks unless they must
        cold = torch.rand(experts, device=device, generator=gen) < c.get("cold", 0.0)
        scores = scores - 2.0 * cold.float()
    ids = scores.topk(top_k, dim=-1).indices if tokens else \
        torch.empty(0, top_k, dtype=torch.int64, device=device)
    skip = torch.rand(ids.shape, device=device, generator=gen) < c.get("skip", 0.0)
    return ids.masked_fill(skip, experts)


def random_fp8_tokens(tokens: int, hidden: int, gen, device):
    """Random fp8 bytes (NaN codes included: the permute copies bits), MN-major fp32 scales."""
    xq = torch.randint(0, 256, (tokens, hidden), dtype=torch.uint8, device=device, generator=gen)
    xs = empty_act_scales(tokens, hidden // 128, device=device)
    xs.copy_(torch.randn(tokens, hidden // 128, device=device, generator=gen).exp())
    return xq.view(FP8), xs


def same_bits(actual, expected, what: str) -> None:
    expect(actual.dtype == expected.dtype and actual.shape == expected.shape,
           f"{what}: {actual.dtype}{tuple(actual.shape)} != {expected.dtype}{tuple(expected.shape)}")
    if actual.numel() == 0:
        return
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[actual.element_size()]
    a = actual.contiguous().view(width) if actual.dtype != torch.bool else actual
    e = expected.contiguous().view(width) if expected.dtype != torch.bool else expected
    bad = a != e
    if bool(bad.any()):
        raise CaseFailure(f"{what}: {int(bad.sum())} elements differ, first at {bad.nonzero()[0].tolist()}")


def run_permute_index(c: dict, ctx: Context, stats: dict) -> None:
    from moe_fp8.layers import layouts as L
    ids = routing_ids(c, ctx.gen(c["seed"]), ctx.device)
    experts, what = c["experts"], f"permute_index {format_case(c)}"
    rows = L.upper_bound_rows(ids.numel(), experts) if c["upper"] else None
    with permute_switch(False):
        e_contig = L.contiguous_index(ids, experts, rows)
        e_masked = L.masked_index(ids, experts, c["m_max"])
    with permute_switch(ctx.backend == "kernel"):
        a_contig = L.contiguous_index(ids, experts, rows)
        a_masked = L.masked_index(ids, experts, c["m_max"])
    expect(a_contig.num_rows == e_contig.num_rows, f"{what}: num_rows {a_contig.num_rows} != {e_contig.num_rows}")
    for name in ("m_indices", "row_pair", "pair_row", "pair_kept", "tokens_per_expert"):
        same_bits(getattr(a_contig, name), getattr(e_contig, name), f"{what}: contiguous {name}")
    for name in ("masked_m", "pair_expert", "pair_rank", "pair_kept", "num_overflow"):
        same_bits(getattr(a_masked, name), getattr(e_masked, name), f"{what}: masked {name}")
    # the masked index with the top-k weights also writes the combine index (decode's path)
    from moe_fp8.layers import permute as PM
    weights = torch.rand(ids.shape, device=ctx.device, generator=ctx.gen(c["seed"] + 1))
    expected = PM.combine_index_masked(e_masked, weights, c["m_max"])
    with permute_switch(ctx.backend == "kernel"):
        actual = PM.combine_index_masked(L.masked_index(ids, experts, c["m_max"], weights), weights,
                                         c["m_max"])
    same_bits(actual.slot_row, expected.slot_row, f"{what}: combine slot_row")
    same_bits(actual.slot_weight, expected.slot_weight, f"{what}: combine slot_weight")


def run_permute_rows(c: dict, ctx: Context, stats: dict) -> None:
    from moe_fp8.layers import layouts as L
    from moe_fp8.layers import permute as PM
    gen = ctx.gen(c["seed"])
    ids = routing_ids(c, gen, ctx.device)
    xq, xs = random_fp8_tokens(c["tokens"], c["hidden"], gen, ctx.device)
    experts, top_k, what = c["experts"], c["top_k"], f"permute_rows {format_case(c)}"
    if c["layout"] == "contiguous":
        index = L.contiguous_index(ids, experts)
        with permute_switch(False):
            expected = PM.permute_contiguous(xq, xs, index, top_k)
        with permute_switch(ctx.backend == "kernel"):
            actual = PM.permute_contiguous(xq, xs, index, top_k)
        for name, a, e in zip(("a", "sa", "row_token", "row_slot"), actual, expected):
            same_bits(a, e, f"{what}: {name}")
        return
    m_max = c["m_max"]
    index = L.masked_index(ids, experts, m_max)
    bufs = [L.MaskedBuffers.allocate(experts, m_max, c["hidden"], ctx.device) for _ in range(2)]
    poison = torch.randint(0, 256, bufs[0].a.shape, dtype=torch.uint8, device=ctx.device, generator=gen)
    for buf in bufs:  # rows nobody writes must keep their old content in both paths
        buf.a.view(torch.uint8).copy_(poison)
    with permute_switch(False):
        expected = PM.permute_masked(xq, xs, index, top_k, bufs[0].a, bufs[0].sa)
    with permute_switch(ctx.backend == "kernel"):
        actual = PM.permute_masked(xq, xs, index, top_k, bufs[1].a, bufs[1].sa)
    # the trash bucket (last expert) takes every skipped pair: its content is unspecified
    same_bits(bufs[1].a[:experts], bufs[0].a[:experts], f"{what}: a")
    same_bits(bufs[1].sa[:experts], bufs[0].sa[:experts], f"{what}: sa")
    same_bits(actual[0], expected[0], f"{what}: row_token")
    same_bits(actual[1], expected[1], f"{what}: row_slot")
    if ctx.backend != "kernel" or ids.numel() > 256:
        return
    # the decode step's index + permute in one launch (MOE_FP8_SMALL_DISPATCH; local ids pass
    # as global ids at offset 0, the sentinel E_loc skips): the same index, bytes and row maps
    small_buf = L.MaskedBuffers.allocate(experts, m_max, c["hidden"], ctx.device)
    small_buf.a.view(torch.uint8).copy_(poison)
    old = os.environ.get("MOE_FP8_SMALL_DISPATCH")
    os.environ["MOE_FP8_SMALL_DISPATCH"] = "1"
    try:
        with permute_switch(True):
            small = PM.dispatch_masked_small(xq, xs, ids, None, 0, experts, m_max, None,
                                             small_buf.a, small_buf.sa)
    finally:
        if old is None:
            os.environ.pop("MOE_FP8_SMALL_DISPATCH", None)
        else:
            os.environ["MOE_FP8_SMALL_DISPATCH"] = old
    expect(small is not None, f"{what}: the small dispatch did not run")
    got, token, slot = small
    for name in ("masked_m", "pair_expert", "pair_rank", "pair_kept", "num_overflow"):
        same_bits(getattr(got, name), getattr(index, name), f"{what}: small dispatch {name}")
    same_bits(small_buf.a[:experts], bufs[0].a[:experts], f"{what}: small dispatch a")
    same_bits(small_buf.sa[:experts], bufs[0].sa[:experts], f"{what}: small dispatch sa")
    same_bits(token, expected[0], f"{what}: small dispatch row_token")
    same_bits(slot, expected[1], f"{what}: small dispatch row_slot")


def run_permute_combine(c: dict, ctx: Context, stats: dict) -> None:
    from moe_fp8.layers import layouts as L
    from moe_fp8.layers import permute as PM
    gen = ctx.gen(c["seed"])
    ids = routing_ids(c, gen, ctx.device)
    tokens, hidden, top_k, experts = c["tokens"], c["hidden"], c["top_k"], c["experts"]
    weights = torch.rand(tokens, top_k, device=ctx.device, generator=gen) * 2.5
    if c["layout"] == "contiguous":
        index = L.contiguous_index(ids, experts)
        combine, rows = PM.combine_index_contiguous(index, weights), index.num_rows
    else:
        m_max = c["m_max"]
        combine = PM.combine_index_masked(L.masked_index(ids, experts, m_max), weights, m_max)
        rows = experts * m_max
    y_rows = torch.randn(rows, hidden, device=ctx.device, generator=gen).bfloat16()
    add = torch.randn(tokens, hidden, device=ctx.device, generator=gen).bfloat16() if c["add"] else None
    buf, out = poisoned((tokens, hidden), ctx)
    with permute_switch(ctx.backend == "kernel"):
        returned = PM.unpermute_combine(y_rows, combine, add=add, out=out)
        fresh = PM.unpermute_combine(y_rows, combine, add=add)
    what = f"permute_combine {format_case(c)}"
    expect(returned is out, f"{what}: out= was not returned")
    expect(bool(torch.isnan(buf[tokens * hidden:]).all()), f"{what}: wrote past the end of out")
    if ctx.backend != "kernel":  # the torch path's baddbmm may sum in another order: not bit-exact
        return
    expected = combine_oracle(y_rows, combine, add)
    same_bits(out, expected, f"{what}: out=")
    same_bits(fresh, expected, f"{what}: fresh output")


# ----------------------------------------------------------------------------- EP send side

def run_ep_send(c: dict, ctx: Context, stats: dict) -> None:
    """route_pack + send_order (ep_send.cuh) vs the dispatcher's torch send side on the same
    routing: the table, the send order, the source index and the record payloads, exactly; the
    send rows past the hits and the records' padding as the kernels define them."""
    from moe_fp8.gemm.kernels import ep_send
    from moe_fp8.layers.dispatch.torch_dist import (RowFormat, pack_records, pack_replicated,
                                                    routing_table, send_order)
    gen = ctx.gen(c["seed"])
    tokens, top_k, experts, ranks, hidden = c["tokens"], c["top_k"], c["experts"], c["ranks"], c["hidden"]
    chosen = max(top_k, int(experts * (1.0 - c["cold"])))  # the upper experts (ranks) stay empty
    ids = torch.rand(tokens, chosen, device=ctx.device, generator=gen).topk(top_k, dim=1).indices
    skip = torch.rand(tokens, top_k, device=ctx.device, generator=gen) < c["skip"]
    ids = ids.masked_fill(skip, -1)
    weights = torch.rand(tokens, top_k, device=ctx.device, generator=gen)
    xq, xs = G.per_token_group_quant_fp8(
        torch.randn(tokens, hidden, device=ctx.device, generator=gen).bfloat16(), 128)
    fmt = RowFormat(hidden, top_k)
    table, expert, hit = routing_table(ids, experts, experts // ranks, ranks)
    want_send, want_source = send_order(hit)
    want_records = pack_records(fmt, xq, xs, expert, weights)
    what = f"ep_send {format_case(c)}"
    if ctx.backend != "kernel":
        return
    expect(ep_send.supports(ids, weights, xq, xs, experts, ranks), f"{what}: not supported")
    got_table = torch.zeros_like(table)
    records = torch.full((tokens, fmt.nbytes), 0xAB, dtype=torch.uint8, device=ctx.device)
    cta_counts = ep_send.route_pack(ids, weights, xq, xs, records, got_table, experts // ranks, ranks)
    send_token = torch.full((ranks * tokens,), -7, dtype=torch.int64, device=ctx.device)
    source_row = torch.full((tokens, ranks), -7, dtype=torch.int64, device=ctx.device)
    source_weight = torch.full((tokens, ranks), float("nan"), device=ctx.device)
    ep_send.send_order(ids, got_table, cta_counts, experts // ranks, ranks, send_token, source_row,
                       source_weight)
    sends = int(hit.sum())
    same_bits(got_table, table, f"{what}: table")
    same_bits(send_token[:sends], want_send[:sends], f"{what}: send order")
    expect(bool((send_token[sends:] == -7).all()), f"{what}: wrote send rows past the hits")
    same_bits(source_row, want_source.slot_row, f"{what}: source rows")
    same_bits(source_weight, want_source.slot_weight, f"{what}: source weights")
    payload = fmt.payload_bytes
    same_bits(records[:, :payload], want_records[:, :payload], f"{what}: records")
    expect(bool((records[:, payload:] == 0).all()), f"{what}: record padding not zeroed")
    # decode's packing: every destination's slot t, ids -1 from num_valid on
    num_valid = {"none": None, "int": tokens // 3,
                 "tensor": torch.tensor(tokens - 1, device=ctx.device)}[c.get("valid", "none")]
    want_send = torch.zeros(ranks, tokens, fmt.nbytes, dtype=torch.uint8, device=ctx.device)
    pack_replicated(fmt, xq, xs, ids, weights, num_valid, want_send)
    send = torch.full_like(want_send, 0xAB)
    expect(ep_send.supports_replicate(ids, weights, xq, xs, num_valid), f"{what}: replicate unsupported")
    ep_send.replicate_pack(ids, weights, xq, xs, num_valid, send)
    same_bits(send, want_send, f"{what}: replicated send rows")


# ----------------------------------------------------------------------------- router cases

class router_switch(permute_switch):
    """``with router_switch(on):`` the router kernels (on) or the torch router (off)."""

    def __enter__(self):
        self.old = os.environ.get("MOE_FP8_FUSED_ROUTER")
        os.environ["MOE_FP8_FUSED_ROUTER"] = self.value

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop("MOE_FP8_FUSED_ROUTER", None)
        else:
            os.environ["MOE_FP8_FUSED_ROUTER"] = self.old


def run_router(c: dict, ctx: Context, stats: dict) -> None:
    """The router kernel vs the torch router on the same logits: the same expert set per token
    (unless a tie at the top-k boundary makes it ambiguous: then a valid top-k), weights within
    a few ulps (slot-order sum), counts = bincount; local ids identical."""
    from moe_fp8.layers import MoEConfig
    from moe_fp8.layers import layouts as L
    from moe_fp8.layers import router as R
    cfg = MoEConfig.tiny(num_experts=c["experts"], n_group=c["groups"], topk_group=c["topk_group"],
                         top_k=c["top_k"], group_mask_fill=c["fill"], norm_topk_prob=c["norm"])
    gen = ctx.gen(c["seed"])
    logits = torch.randn(c["tokens"], c["experts"], device=ctx.device, generator=gen) * c["spread"]
    if c.get("quantised"):  # many exact ties
        logits = (logits * 4).round() / 4
    bias = (torch.rand(c["experts"], device=ctx.device, generator=gen) - 0.5) * 2 * c["bias"]
    what = f"router {format_case(c)}"
    counts = [torch.zeros(c["experts"], dtype=torch.int64, device=ctx.device) for _ in range(2)]
    with router_switch(False):
        idx_t, w_t = R.route(logits, bias, cfg, counts_out=counts[0])
    with router_switch(ctx.backend == "kernel"):
        idx_f, w_f = R.route(logits, bias, cfg, counts_out=counts[1])
    expect(idx_f.shape == idx_t.shape and idx_f.dtype == torch.int64, f"{what}: shape/dtype")
    expect(torch.equal(counts[1], torch.bincount(idx_f.flatten(), minlength=c["experts"])),
           f"{what}: counts are not the bincount of the indices")
    # the torch path's masked scores decide which tokens have a unique answer
    scores = logits.sigmoid()
    grouped = (scores + bias).view(c["tokens"], cfg.n_group, -1)
    group_scores = grouped.topk(2, dim=-1).values.sum(-1)
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(
        1, group_scores.topk(cfg.topk_group, dim=-1).indices, True)
    fill = float("-inf") if c["fill"] == "neg_inf" else 0.0
    masked = grouped.masked_fill(~keep.unsqueeze(-1), fill).view(c["tokens"], -1)
    ambiguous = torch.zeros(c["tokens"], dtype=torch.bool, device=ctx.device)
    if cfg.top_k < cfg.num_experts:
        top = masked.topk(cfg.top_k + 1, dim=-1).values
        ambiguous |= top[:, -1] == top[:, -2]
    if cfg.topk_group < cfg.n_group:
        top = group_scores.topk(cfg.topk_group + 1, dim=-1).values
        ambiguous |= top[:, -1] == top[:, -2]
    sorted_t, order_t = idx_t.sort(1)
    sorted_f, order_f = idx_f.sort(1)
    differ = (sorted_t != sorted_f).any(1)
    expect(not bool((differ & ~ambiguous).any()),
           f"{what}: {int((differ & ~ambiguous).sum())} tokens with a unique top-k pick other experts")
    chosen = torch.zeros_like(masked, dtype=torch.bool).scatter_(1, idx_f, True)
    low = masked.masked_fill(~chosen, float("inf")).min(1).values
    high = masked.masked_fill(chosen, float("-inf")).max(1).values
    expect(bool((low >= high).all()), f"{what}: the kernel's pick is not a top-k")
    same = ~differ
    if bool(same.any()):
        a, e = w_f.gather(1, order_f)[same], w_t.gather(1, order_t)[same]
        rel = float(((a - e).abs() / e.abs().clamp_min(1e-30)).max()) if a.numel() else 0.0
        stats["ref"] = max(stats.get("ref", 0.0), rel)
        expect(rel <= 2e-6, f"{what}: weights differ by {rel:.1e} relative")
    offset = c["offset"]
    local = max(1, c["experts"] // 4)
    num_valid = c["tokens"] // 2 if c["valid"] == "int" else \
        torch.tensor(max(c["tokens"] - 1, 0), device=ctx.device) if c["valid"] == "tensor" else None
    with router_switch(False):
        expected_local = L.local_expert_ids(idx_t, offset, local, num_valid)
    with router_switch(ctx.backend == "kernel"):
        actual_local = L.local_expert_ids(idx_t, offset, local, num_valid)
    same_bits(actual_local, expected_local, f"{what}: local ids")


# ----------------------------------------------------------------------------- training quantisation
# Each kernel against its own reference (backend="reference", same block math): bit for bit.

def pairs_equal(got, want, what: str) -> None:
    for i, ((q, s), (eq, es)) in enumerate(zip(got, want)):
        bits_equal(q, s, eq, es, f"{what} output {i}")


def padding_ids(tokens: int, gen: torch.Generator, device):
    """m_indices-like int32 [T]: about a fifth of the rows -1 (padding), the rest 0."""
    ids = torch.zeros(tokens, dtype=torch.int32, device=device)
    ids[torch.rand(tokens, generator=gen, device=device) < 0.2] = -1
    return ids


def run_train_block_t(c: dict, ctx: Context, stats: dict) -> None:
    shape, dtype, pow2 = tuple(c["shape"]), c["dtype"], c["pow2"]
    w = quant_input(shape, ctx.gen(c["seed"]), dtype, ctx.device, zero_rows=False)
    got = G.per_block_quant_transpose_fp8(w, pow2_scale=pow2, backend=ctx.backend)
    want = G.per_block_quant_transpose_fp8(w, pow2_scale=pow2, backend="reference")
    pairs_equal(got, want, f"train_block_t {shape} {dtype} pow2={pow2}")


def run_train_token_t(c: dict, ctx: Context, stats: dict) -> None:
    shape, dtype, pow2 = tuple(c["shape"]), c["dtype"], c["pow2"]
    gen = ctx.gen(c["seed"])
    x = quant_input(shape, gen, dtype, ctx.device)
    ids = padding_ids(shape[0], gen, ctx.device) if c["padding"] else None
    got = G.transpose_token_group_quant_fp8(x, m_indices=ids, pow2_scale=pow2, backend=ctx.backend)
    want = G.transpose_token_group_quant_fp8(x, m_indices=ids, pow2_scale=pow2, backend="reference")
    pairs_equal([got], [want], f"train_token_t {shape} {dtype} pow2={pow2} padding={c['padding']}")


def run_train_requant(c: dict, ctx: Context, stats: dict) -> None:
    shape, pow2 = tuple(c["shape"]), c["pow2"]
    gen = ctx.gen(c["seed"])
    a = quant_act(quant_input(shape, gen, torch.float32, ctx.device))
    ids = padding_ids(shape[0], gen, ctx.device) if c["padding"] else None
    got = G.transpose_token_group_requant_fp8(a, m_indices=ids, pow2_scale=pow2, backend=ctx.backend)
    want = G.transpose_token_group_requant_fp8(a, m_indices=ids, pow2_scale=pow2, backend="reference")
    pairs_equal([got], [want], f"train_requant {shape} pow2={pow2} padding={c['padding']}")


def run_silu_backward(c: dict, ctx: Context, stats: dict) -> None:
    rows, inter, pow2 = c["rows"], c["inter"], c["pow2"]
    gen = ctx.gen(c["seed"])
    h = (torch.randn((rows, 2 * inter), device=ctx.device, generator=gen) * 4).bfloat16()
    d_act = quant_input((rows, inter), gen, torch.bfloat16, ctx.device)
    got = G.silu_and_mul_backward_quant_fp8(d_act, h, pow2_scale=pow2, backend=ctx.backend)
    want = G.silu_and_mul_backward_quant_fp8(d_act, h, pow2_scale=pow2, backend="reference")
    pairs_equal(got, want, f"silu_backward rows={rows} inter={inter} pow2={pow2}")


kRunners: Dict[str, Callable] = {
    "gemm_dense": run_gemm_dense, "gemm_contiguous": run_gemm_contiguous,
    "gemm_masked": run_gemm_masked, "gemm_swiglu": run_gemm_swiglu,
    "gemm_kgrouped": run_gemm_kgrouped,
    "quant_token": run_quant_token, "quant_block": run_quant_block,
    "silu_contiguous": run_silu, "silu_masked": run_silu,
    "permute_index": run_permute_index, "permute_rows": run_permute_rows,
    "permute_combine": run_permute_combine, "router": run_router,
    "gemm_offsets": run_gemm_offsets, "train_block_t": run_train_block_t,
    "train_token_t": run_train_token_t, "train_requant": run_train_requant,
    "silu_backward": run_silu_backward, "ep_send": run_ep_send,
}


# ----------------------------------------------------------------------------- shapes

class Sampler:
    """Random cases within the contract; (N, K) from a per-op pool drawn once per run."""

    def __init__(self, seed: int, scale: float = 1.0):
        self.rng = random.Random(seed)
        self.scale = scale  # < 1 shrinks the largest sizes (CPU dry run)
        self.pools = {op: self._pool()
                      for op in ("gemm_dense", "gemm_contiguous", "gemm_offsets", "gemm_masked")}
        self.n_pool = [16] + [16 * self.rng.randint(2, 64) for _ in range(kPoolSize - 1)]

    def _cap(self, value: int) -> int:
        return max(1, int(value * self.scale))

    def _pool(self):
        pairs = [(16, 128)]
        while len(pairs) < kPoolSize:
            n = 16 * self.rng.randint(1, self._cap(2304) // 16 or 1)
            k = 128 * self.rng.randint(1, max(1, self._cap(3072) // 128))
            pairs.append((n, k))
        return pairs

    def rows(self, cap: int = 2048) -> int:
        """1 (15 %), odd around one or two 64-row tiles (30 %), else anything up to cap."""
        r, cap = self.rng.random(), self._cap(cap)
        if r < 0.15:
            return 1
        if r < 0.45:
            return min(cap, self.rng.randrange(1, 193, 2))
        return self.rng.randint(1, cap)

    def width(self, cap: int) -> int:
        return 128 * self.rng.randint(1, max(1, self._cap(cap) // 128))

    def counts(self, experts: int, cap: int = 400) -> List[int]:
        """Tokens per expert: 25 % empty, 10 % exactly 128 (a segment boundary), else 1..cap."""
        out = []
        for _ in range(experts):
            r = self.rng.random()
            out.append(0 if r < 0.25 else 128 if r < 0.35 else self.rng.randint(1, self._cap(cap)))
        return out

    def masked_m(self, experts: int, m_max: int) -> List[int]:
        """20 % zero, 20 % full (= M_max), else random; sometimes every expert empty."""
        if self.rng.random() < 0.03:
            return [0] * experts
        out = []
        for _ in range(experts):
            r = self.rng.random()
            out.append(0 if r < 0.2 else m_max if r < 0.4 else self.rng.randint(0, m_max))
        return out

    def case(self, op: str, seed: int) -> dict:
        rng = self.rng
        c = {"seed": seed}
        if op == "gemm_dense":
            c["n"], c["k"] = rng.choice(self.pools[op])
            c["m"] = self.rows()
            c["a_mc"] = rng.random() < 0.3  # A multicast (case_config)
            if not c["a_mc"] and rng.random() < 0.3:  # split K, this tile width (case_config)
                c["split"] = rng.choice((64, 128, 256))
        elif op == "gemm_contiguous":
            c["n"], c["k"] = rng.choice(self.pools[op])
            c["counts"] = self.counts(rng.randint(1, 12))
            c["a_mc"] = rng.random() < 0.3
        elif op == "gemm_offsets":
            c["n"], c["k"] = rng.choice(self.pools[op])
            c["counts"] = self.counts(rng.randint(1, 12))
            c["extra"] = rng.choice((0, 0, 128, 256))
        elif op == "train_block_t":
            n, k = self.width(1024), self.width(1024)
            c["shape"] = [n, k] if rng.random() < 0.6 else [rng.randint(1, 3), n, k]
            c["dtype"] = rng.choice((torch.bfloat16, torch.float32))
            c["pow2"] = rng.random() < 0.5
        elif op in ("train_token_t", "train_requant"):
            c["shape"] = [self.rows(1024), self.width(2048)]
            c["dtype"] = rng.choice((torch.bfloat16, torch.float32))
            c["pow2"] = rng.random() < 0.5
            c["padding"] = rng.random() < 0.5
        elif op == "silu_backward":
            c["rows"], c["inter"] = self.rows(1024), self.width(1024)
            c["pow2"] = rng.random() < 0.5
        elif op == "gemm_masked":
            c["n"], c["k"] = rng.choice(self.pools[op])
            c["m_max"] = self.rows(384)
            c["masked_m"] = self.masked_m(rng.randint(1, 12), c["m_max"])
            c["expected_m"] = rng.randint(1, c["m_max"])
            c["a_rows"] = rng.choice((0, 0, 0, 0, 16, 32))  # A rows by need (case_config)
            c["a_mc"] = not c["a_rows"] and rng.random() < 0.3
        elif op == "gemm_swiglu":
            c["inter"], c["k"] = rng.choice((128, 256, 512)), rng.choice((128, 256, 512, 1024))
            c["m_max"] = self.rows(256)
            c["masked_m"] = self.masked_m(rng.randint(1, 8), c["m_max"])
            c["expected_m"] = rng.randint(1, c["m_max"])
            c["pow2"] = rng.random() < 0.5
        elif op == "gemm_kgrouped":
            c["n"] = rng.choice(self.n_pool)
            c["m"] = self.rows(1024)
            c["counts"] = [128 * rng.choice((0, 0, 1, 1, 2, 3, 4)) for _ in range(rng.randint(1, 8))]
            c["overwrite"] = rng.random() < 0.5  # accumulate=False
        elif op in ("quant_token", "quant_block"):
            k = self.width(4096 if op == "quant_token" else 2048)
            rows = self.rows() if op == "quant_token" else rng.randint(1, self._cap(700))
            c["shape"] = [rows, k] if rng.random() < 0.7 else [rng.randint(1, 4), min(rows, self._cap(512)), k]
            c["dtype"] = rng.choice((torch.bfloat16, torch.float32))
            c["pow2"] = rng.random() < 0.5
        elif op == "silu_contiguous":
            inter = self.width(2048)
            rows = self.rows()
            c["shape"] = [rows, 2 * inter] if rng.random() < 0.8 else [rng.randint(1, 4), min(rows, self._cap(512)), 2 * inter]
            c["pow2"] = rng.random() < 0.5
        elif op == "silu_masked":
            inter, m_max = self.width(1024), self.rows(384)
            experts = rng.randint(1, 12)
            c["shape"] = [experts, m_max, 2 * inter]
            c["masked_m"] = self.masked_m(experts, m_max)
            c["pow2"] = rng.random() < 0.5
        elif op == "router":
            c["experts"], c["groups"], c["topk_group"], c["top_k"] = rng.choice(
                ((256, 8, 4, 8), (32, 8, 4, 8), (16, 4, 2, 4), (64, 1, 1, 6), (96, 32, 11, 32),
                 (250, 5, 2, 3), (128, 16, 3, 12)))
            c["tokens"] = self.rows(4096)
            c["fill"] = rng.choice(("neg_inf", "zero"))
            c["norm"] = rng.random() < 0.8
            c["spread"] = rng.choice((0.5, 2.0, 8.0))
            c["bias"] = rng.choice((0.0, 0.1, 1.5))
            c["quantised"] = rng.random() < 0.2
            c["offset"] = rng.choice((0, c["experts"] // 2))
            c["valid"] = rng.choice((None, "int", "tensor"))
        elif op == "ep_send":
            c["experts"], c["ranks"] = rng.choice(((256, 2), (256, 8), (16, 4), (64, 64), (1024, 16),
                                                   (24, 3), (8, 1)))
            c["top_k"] = min(rng.choice((1, 2, 6, 8, 8)), c["experts"])
            c["tokens"] = self.rows(4096)
            c["hidden"] = 128 * rng.randint(1, self._cap(56 if c["tokens"] <= 512 else 16))
            c["skip"] = rng.choice((0.0, 0.1, 0.5))
            c["cold"] = rng.choice((0.0, 0.5))
            c["valid"] = rng.choice(("none", "int", "tensor"))
        elif op.startswith("permute_"):
            c["top_k"] = rng.choice((1, 2, 4, 6, 8, 8, 8))
            c["experts"] = rng.choice((1, 4, 8, 32, 32, 64, 256, rng.randint(1, 256)))
            c["top_k"] = min(c["top_k"], c["experts"])
            c["tokens"] = self.rows(2048 if op == "permute_index" else 1024)
            c["skip"] = rng.choice((0.0, 0.1, 0.5, 1.0 if rng.random() < 0.1 else 0.2))
            c["cold"] = rng.choice((0.0, 0.3, 0.7))
            c["m_max"] = rng.choice((1, max(1, c["tokens"] // 3), c["tokens"]))
            if op == "permute_index":
                c["upper"] = rng.random() < 0.5
            else:
                c["layout"] = rng.choice(("contiguous", "masked"))
                c["hidden"] = 128 * rng.randint(1, self._cap(56 if c["tokens"] <= 256 else 16))
                if c["layout"] == "masked":  # the masked buffers are [E + 1, M_max, H]
                    c["m_max"] = min(c["m_max"], max(1, self._cap(8192) // max(1, c["experts"])))
                if op == "permute_combine":
                    c["add"] = rng.random() < 0.6
        else:
            raise ValueError(f"unknown op {op!r}")
        return c


# ----------------------------------------------------------------------------- precompile

def kernel_sources(op: str, c: dict) -> list:
    """The JIT sources a case will load, as the kernel host files pick them (best effort)."""
    from moe_fp8.gemm import heuristics as H
    from moe_fp8.gemm.kernels import fp8_gemm, wgrad
    sms = H.num_sms(torch.cuda.current_device())
    layouts = {"gemm_dense": fp8_gemm.kLayoutDense, "gemm_contiguous": fp8_gemm.kLayoutContiguous,
               "gemm_offsets": fp8_gemm.kLayoutContiguousOffsets, "gemm_masked": fp8_gemm.kLayoutMasked}
    if op in layouts:
        config = case_config(op, c) or heuristic_config(op, c)
        if config is None:
            return []
        config = config.resolved(c["k"])
        sources = [fp8_gemm.kernel_source(c["n"], c["k"], config, layouts[op])]
        return sources + ([fp8_gemm.reduce_source(config.split_k)] if config.split_k > 1 else [])
    if op == "gemm_kgrouped":
        if sum(c["counts"]) == 0:
            return []
        return [wgrad.kernel_source(c["n"], H.wgrad_config(c["m"], c["n"], sms),
                                    not c.get("overwrite", False))]
    return []


def precompile_for(cases: Dict[str, List[dict]], log) -> None:
    """Compile every kernel the run needs, in parallel (a cold cache would otherwise compile
    them one by one inside the timed loop). Failures only cost time: the ops compile lazily."""
    start = time.perf_counter()
    try:
        from moe_fp8.gemm.kernels import ep_send, permute, quant, router
        sources = list(quant.bundled_sources()) + list(permute.bundled_sources()) + \
            list(router.bundled_sources()) + list(ep_send.bundled_sources())
        for op, op_cases in cases.items():
            for c in op_cases:
                sources += kernel_sources(op, c)
        sources = list(dict.fromkeys(sources))
        G.precompile(sources, verbose=False, workers=min(16, os.cpu_count() or 1))
        log(f"precompiled {len(sources)} kernels in {time.perf_counter() - start:.1f} s")
    except Exception as error:  # noqa: BLE001 - best effort
        log(f"precompile incomplete ({type(error).__name__}: {str(error)[:300]}); "
            "the rest compiles lazily")


# ----------------------------------------------------------------------------- the run

@dataclass
class OpResult:
    op: str
    cases: int = 0
    passed: int = 0
    failed: int = 0
    seconds: float = 0.0
    stats: dict = field(default_factory=dict)
    failures: List[str] = field(default_factory=list)


def is_fatal(error: BaseException) -> bool:
    """A CUDA error that poisons the context: every later case would fail too."""
    text = f"{type(error).__name__} {error}".lower()
    return any(s in text for s in ("illegal", "device-side assert", "unspecified launch",
                                   "misaligned address", "cuda error", "acceleratorerror"))


def run_cases(op: str, cases: List[dict], ctx: Context, deadline: float, log) -> OpResult:
    result = OpResult(op)
    start = time.perf_counter()
    for c in cases:
        if time.perf_counter() > deadline:
            log(f"{op}: time budget reached after {result.cases} cases")
            break
        result.cases += 1
        try:
            kRunners[op](c, ctx, result.stats)
            if ctx.device == "cuda":
                torch.cuda.synchronize()
            result.passed += 1
        except Exception as error:  # noqa: BLE001 - every failure is counted and reported
            result.failed += 1
            detail = f"{op} {format_case(c)}: {type(error).__name__}: {str(error)[:400]}"
            if not isinstance(error, CaseFailure):
                detail += "\n" + "".join(traceback.format_exception(error)[-3:])
            result.failures.append(detail)
            if is_fatal(error):
                log(f"{op}: fatal CUDA error, stopping the run: {detail}")
                raise SystemExit(4) from error
    result.seconds = time.perf_counter() - start
    return result


def format_case(c: dict) -> str:
    return "{" + ", ".join(f"{k}={str(v).replace('torch.', '')}" for k, v in c.items()) + "}"


def card() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def commit() -> str:
    if os.environ.get("MOE_FP8_COMMIT"):
        return os.environ["MOE_FP8_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True, cwd=kRepo,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def fuzz(count: int, seed: int, ops, ctx: Context, time_budget: float, log=print,
         csv_path: Path | None = None, scale: float = 1.0) -> List[OpResult]:
    """``time_budget`` seconds for everything from here on, compiling included."""
    deadline = time.perf_counter() + time_budget
    sampler = Sampler(seed, scale)
    cases = {op: [sampler.case(op, seed * 100003 + i) for i in range(count)] for op in ops}
    if ctx.device == "cuda":
        precompile_for(cases, log)
    results = []
    for op in ops:
        # spread the budget: an op may not eat the time of the ops after it
        share = (deadline - time.perf_counter()) / (len(ops) - len(results))
        results.append(run_cases(op, cases[op], ctx, time.perf_counter() + share, log))
        r = results[-1]
        log(f"{op:16s} {r.passed:4d}/{r.cases:<4d} passed  {r.seconds:6.1f} s  "
            f"max calc_diff vs ref {r.stats.get('ref', 0):.1e}, vs unquantised {r.stats.get('unq', 0):.1e}")
        for line in r.failures[:5]:
            log(f"  FAIL {line}")
    if csv_path is not None:
        write_csv(csv_path, results, seed)
        failures = [f for r in results for f in r.failures]
        if failures:
            csv_path.with_name(csv_path.stem + "_failures.txt").write_text("\n".join(failures) + "\n")
    return results


def write_csv(path: Path, results: List[OpResult], seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    date, gpu, sha = datetime.date.today().isoformat(), card(), commit()
    new = not path.exists()
    with path.open("a", newline="") as file:
        writer = csv.writer(file)
        if new:
            writer.writerow(["date", "card", "commit", "seed", "op", "cases", "passed", "failed",
                             "max_calc_diff_vs_reference", "max_calc_diff_vs_unquantised", "seconds"])
        for r in results:
            exact = r.op.startswith(("quant", "silu", "permute", "ep_send", "train"))
            writer.writerow([date, gpu, sha, seed, r.op, r.cases, r.passed, r.failed,
                             "bit-exact" if exact else f"{r.stats.get('ref', 0):.2e}",
                             "-" if exact else f"{r.stats.get('unq', 0):.2e}", f"{r.seconds:.1f}"])


# ----------------------------------------------------------------------------- --once (sanitizer driver)

def once_cases() -> Dict[str, List[dict]]:
    """Small fixed shapes reaching every kernel and path (edge rows, empty experts, 3-D, pow2)."""
    bf, f32 = torch.bfloat16, torch.float32
    return {
        "quant_token": [dict(shape=[37, 384], dtype=bf, pow2=False, seed=1), dict(shape=[3, 37, 384], dtype=f32, pow2=True, seed=2),
                        dict(shape=[1, 128], dtype=bf, pow2=False, seed=3), dict(shape=[2048, 1152], dtype=bf, pow2=True, seed=4)],
        "quant_block": [dict(shape=[200, 256], dtype=bf, pow2=False, seed=5), dict(shape=[2, 130, 384], dtype=f32, pow2=True, seed=6),
                        dict(shape=[1, 128], dtype=bf, pow2=True, seed=7)],
        "silu_contiguous": [dict(shape=[5, 512], pow2=False, seed=8), dict(shape=[333, 1024], pow2=True, seed=9),
                            dict(shape=[2, 40, 512], pow2=False, seed=10)],
        "silu_masked": [dict(shape=[3, 9, 512], masked_m=[0, 9, 4], pow2=False, seed=11),
                        dict(shape=[6, 37, 1024], masked_m=[37, 0, 1, 20, 36, 5], pow2=True, seed=12)],
        "router": [dict(experts=256, groups=8, topk_group=4, top_k=8, tokens=777, fill="neg_inf", norm=True, spread=2.0,
                        bias=0.1, offset=128, valid="tensor", seed=32),
                   dict(experts=32, groups=8, topk_group=4, top_k=8, tokens=1, fill="zero", norm=False, spread=0.5,
                        bias=1.5, quantised=True, offset=0, valid=None, seed=33),
                   dict(experts=96, groups=32, topk_group=11, top_k=32, tokens=37, fill="zero", norm=True, spread=8.0,
                        bias=0.0, offset=48, valid="int", seed=34)],
        "permute_index": [dict(tokens=1, top_k=8, experts=32, skip=0.0, m_max=1, upper=False, seed=23),
                          dict(tokens=3001, top_k=8, experts=256, skip=0.2, cold=0.5, m_max=700, upper=False, seed=24),
                          dict(tokens=777, top_k=6, experts=32, skip=0.1, cold=0.3, m_max=5, upper=True, seed=25)],
        "permute_rows": [dict(tokens=37, top_k=8, experts=32, skip=0.1, cold=0.3, hidden=384, layout="contiguous", m_max=37, seed=26),
                         dict(tokens=1, top_k=4, experts=4, skip=0.0, hidden=7168, layout="contiguous", m_max=1, seed=27),
                         dict(tokens=129, top_k=8, experts=16, skip=0.2, hidden=256, layout="masked", m_max=40, seed=28),
                         dict(tokens=9, top_k=8, experts=32, skip=0.2, hidden=7168, layout="masked", m_max=3, seed=48)],
        "permute_combine": [dict(tokens=129, top_k=8, experts=16, skip=0.1, hidden=512, layout="contiguous", add=True, m_max=129, seed=29),
                            dict(tokens=33, top_k=8, experts=32, skip=0.2, hidden=7168, layout="masked", add=True, m_max=33, seed=30),
                            dict(tokens=50, top_k=1, experts=4, skip=0.0, hidden=256, layout="masked", add=False, m_max=10, seed=31)],
        "ep_send": [dict(tokens=1, top_k=8, experts=256, ranks=8, hidden=7168, skip=0.0, cold=0.0, valid="tensor",
                         seed=44),
                    dict(tokens=777, top_k=8, experts=256, ranks=64, hidden=384, skip=0.1, cold=0.5, valid="int", seed=45),
                    dict(tokens=513, top_k=2, experts=24, ranks=3, hidden=128, skip=0.5, cold=0.0, valid="none", seed=46)],
        "gemm_dense": [dict(m=1, n=16, k=128, seed=13), dict(m=77, n=272, k=384, seed=14), dict(m=333, n=2128, k=1536, seed=15),
                       dict(m=256, n=1024, k=7168, seed=16), dict(m=77, n=2112, k=1536, a_mc=True, seed=42),
                       dict(m=77, n=2112, k=1536, split=128, seed=46), dict(m=1, n=272, k=512, split=64, seed=47),
                       dict(m=200, n=1040, k=1024, split=256, seed=48)],
        "gemm_contiguous": [dict(counts=[0, 1, 127, 128, 129, 0, 300, 5], n=144, k=384, seed=17), dict(counts=[600, 0, 40], n=4096, k=256, seed=18),
                            dict(counts=[0, 130, 5], n=1024, k=384, a_mc=True, seed=43)],
        "gemm_offsets": [dict(counts=[0, 1, 127, 128, 129, 0, 300], extra=128, n=144, k=384, seed=35),
                         dict(counts=[600, 0, 40], extra=0, n=4096, k=256, seed=36)],
        "train_block_t": [dict(shape=[256, 384], dtype=bf, pow2=False, seed=37), dict(shape=[2, 128, 256], dtype=f32, pow2=True, seed=38)],
        "train_token_t": [dict(shape=[1, 256], dtype=bf, pow2=False, padding=False, seed=39),
                          dict(shape=[333, 384], dtype=f32, pow2=True, padding=True, seed=40)],
        "train_requant": [dict(shape=[130, 256], dtype=f32, pow2=False, padding=True, seed=41)],
        "silu_backward": [dict(rows=1, inter=128, pow2=False, seed=42), dict(rows=333, inter=256, pow2=True, seed=43)],
        "gemm_swiglu": [dict(masked_m=[0, 1, 17, 64], m_max=64, inter=256, k=512, expected_m=1, pow2=False, seed=49),
                        dict(masked_m=[129, 0, 200], m_max=200, inter=512, k=256, expected_m=64, pow2=True, seed=50)],
        "gemm_masked": [dict(masked_m=[0, 37, 1, 20], m_max=37, n=272, k=256, expected_m=8, seed=19),
                        dict(masked_m=[256, 0, 100], m_max=256, n=2048, k=512, expected_m=200, seed=20),
                        dict(masked_m=[0, 37, 1, 20], m_max=37, n=2048, k=256, expected_m=8, a_mc=True, seed=44),
                        dict(masked_m=[0, 17, 1, 64, 65], m_max=100, n=1024, k=256, expected_m=8, a_rows=16, seed=45),
                        # the heuristic's 128-row decode tiles: A chunks, the second warpgroup idle at <= 64 rows
                        dict(masked_m=[0, 64, 1, 65, 129], m_max=160, n=1024, k=256, expected_m=64, seed=50)],
        "gemm_kgrouped": [dict(m=144, n=272, counts=[128, 0, 256, 128], seed=21), dict(m=333, n=800, counts=[0, 640, 128], seed=22),
                          dict(m=333, n=800, counts=[0, 640, 0, 128, 0], overwrite=True, seed=49)],
    }


def run_guards(ctx: Context, log) -> None:
    """Out-of-contract *values* that only debug mode (MOE_FP8_CHECKS=1) rejects on the GPU: the
    kernels must still stay inside their tensors (memcheck judges; results are not checked)."""
    gen = ctx.gen(99)
    k, n, experts, m_max = 256, 144, 3, 16
    a = quant_act(act_data((experts, m_max, k), gen, device=ctx.device))
    b = quant_weight(weight_data((experts, n, k), gen, device=ctx.device))
    masked_m = torch.tensor([m_max + 50, 2 ** 30, -4], dtype=torch.int32, device=ctx.device)
    log("guards: masked GEMM with masked_m > M_max and < 0")
    G.m_grouped_fp8_gemm_nt_masked(a, b, masked_m, 8, backend=ctx.backend)
    log("guards: SiLU-mul masked with masked_m > M_max and < 0")
    h = torch.randn(experts, m_max, 512, device=ctx.device, generator=gen).bfloat16()
    G.silu_and_mul_quant_fp8(h, masked_m=masked_m, backend=ctx.backend)
    log("guards: contiguous GEMM with m_indices naming a missing expert and padding mid-block")
    a2 = quant_act(act_data((256, k), gen, device=ctx.device))
    m_indices = torch.full((256,), experts, dtype=torch.int32, device=ctx.device)  # expert 3 of 3
    m_indices[128:192] = -1
    m_indices[192:] = 0  # real rows after padding inside one block
    G.m_grouped_fp8_gemm_nt_contiguous(a2, b, m_indices, backend=ctx.backend)
    m_indices.fill_(-7)
    G.m_grouped_fp8_gemm_nt_contiguous(a2, b, m_indices, backend=ctx.backend)
    log("guards: contiguous GEMM, offsets form, with offsets past M_sum, decreasing and unaligned")
    for bounds in ([0, 128, 512, 1024], [0, 256, 128, 256], [0, 100, 200, 256], [-128, 0, 128, 256]):
        G.m_grouped_fp8_gemm_nt_contiguous_offsets(
            a2, b, torch.tensor(bounds, dtype=torch.int32, device=ctx.device), backend=ctx.backend)
    log("guards: k-grouped GEMM with offsets past the tokens, decreasing and unaligned")
    xa, xb = quant_act(act_data((144, 256), gen, device=ctx.device)), quant_act(act_data((160, 256), gen, device=ctx.device))
    out = torch.zeros(3, 144, 160, device=ctx.device)
    for bounds in ([0, 128, 512, 1024], [0, 256, 128, 256], [0, 100, 200, 256], [-128, 0, 128, 256]):
        G.k_grouped_fp8_gemm_tn_contiguous(xa, xb, torch.tensor(bounds, dtype=torch.int32, device=ctx.device),
                                           out, backend=ctx.backend)
    if ctx.device == "cuda":
        torch.cuda.synchronize()


def run_once(family: str, ctx: Context, log) -> int:
    """``family``: an op name, "all" or "guards". Prints a begin/end marker per family (the
    sanitizer script attributes findings by them). Returns the number of failed checks."""
    if family == "guards":
        log("FAMILY guards begin", flush=True)
        run_guards(ctx, log)
        log("FAMILY guards end", flush=True)
        return 0
    table = once_cases()
    families = list(table) if family == "all" else [family]
    failed = 0
    for name in families:
        log(f"FAMILY {name} begin", flush=True)
        op = name
        result = run_cases(op, table[name], ctx, float("inf"), log)
        if ctx.device == "cuda":
            torch.cuda.synchronize()
        failed += result.failed
        for line in result.failures:
            log(f"  FAIL {line}")
        log(f"FAMILY {name} end {result.passed}/{result.cases} checks passed", flush=True)
    return failed


# ----------------------------------------------------------------------------- pytest

def _pytest_mark(fn):
    try:
        import pytest
    except ImportError:
        return fn
    return pytest.mark.gpu(fn)


@_pytest_mark
def test_fuzz_every_op_briefly():
    seed = int(time.time()) % 100000
    results = fuzz(25, seed=seed, ops=kOps, ctx=Context(), time_budget=150)
    failures = [f for r in results for f in r.failures]
    assert not failures, f"seed {seed}:\n" + "\n".join(failures[:10])


def test_fuzz_harness_on_the_cpu_references():
    """The harness itself (shapes, checks, CSV) on the CPU references: catches rot without a GPU."""
    results = fuzz(2, seed=7, ops=kOps, ctx=Context("cpu", "reference"), time_budget=60, log=lambda *a, **k: None,
                   scale=0.25)
    assert all(r.cases == 2 and r.failed == 0 for r in results), [f for r in results for f in r.failures]


def main(argv) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=500, help="random cases per op (default 500)")
    parser.add_argument("--seed", type=int, default=None, help="default: from the clock (printed)")
    parser.add_argument("--ops", default=",".join(kOps), help=f"comma-separated subset of {kOps}")
    parser.add_argument("--time-budget", type=float, default=200.0,
                        help="seconds for compiling and all cases; ops left unfinished fail the run (default 200)")
    parser.add_argument("--csv", default=None, help="default: benchmarks/results/fuzz_<date>.csv")
    parser.add_argument("--once", default=None, help="one fixed small call per op: an op, 'all' or 'guards'")
    parser.add_argument("--cpu", action="store_true", help="dry run of the harness on the CPU references")
    args = parser.parse_args(argv)
    ctx = Context("cpu", "reference") if args.cpu else Context()
    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA device (use --cpu for a dry run of the harness)", file=sys.stderr)
        return 2
    log = lambda *a, **k: print(*a, **k)  # noqa: E731
    if args.once:
        failed = run_once(args.once, ctx, log)
        print(f"once {args.once}: {'ok' if failed == 0 else f'{failed} FAILED'}")
        return 0 if failed == 0 else 1
    seed = args.seed if args.seed is not None else int(time.time()) % 1000000
    ops = [op for op in args.ops.split(",") if op]
    unknown = set(ops) - set(kOps)
    if unknown:
        parser.error(f"unknown ops {sorted(unknown)}; choose from {kOps}")
    csv_path = Path(args.csv) if args.csv else kRepo / "benchmarks" / "results" / f"fuzz_{datetime.date.today().isoformat()}.csv"
    if args.cpu and not args.csv:
        csv_path = None
    print(f"fuzz: seed {seed}, {args.count} cases per op, card {card()}, commit {commit()}")
    start = time.perf_counter()
    results = fuzz(args.count, seed, ops, ctx, args.time_budget, log, csv_path, scale=0.25 if args.cpu else 1.0)
    total = sum(r.cases for r in results)
    failed = sum(r.failed for r in results)
    print("\n| op | cases | passed | failed | max calc_diff vs ref | vs unquantised | s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        exact = r.op.startswith(("quant", "silu", "permute", "ep_send", "train"))
        print(f"| {r.op} | {r.cases} | {r.passed} | {r.failed} | "
              f"{'bit-exact' if exact else format(r.stats.get('ref', 0), '.1e')} | "
              f"{'-' if exact else format(r.stats.get('unq', 0), '.1e')} | {r.seconds:.1f} |")
    short = [r.op for r in results if r.cases < args.count]
    print(f"fuzz: {total - failed}/{total} passed in {time.perf_counter() - start:.0f} s, seed {seed}"
          + (f"; stopped early (time budget) in {short}" if short else "")
          + (f"; CSV {csv_path}" if csv_path else ""))
    return 0 if failed == 0 and not short else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
