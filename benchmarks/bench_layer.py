"""The MoE layer on one GPU holding 32 experts (DeepSeek-V3 shapes: H 7168, I 2048, top-8 over
8 groups of 4 with 4 groups kept, one shared expert), vs peers with the SAME routing, same run.

Prefill (contiguous layout), T = 4096 .. 32768 tokens (x 8 routed rows each):
* ``ours``       MoE.forward: router, FP8 quantise + permute, grouped FP8 GEMMs (1x128 / 128x128
                 scales), fused SiLU-mul-quant, weighted un-permute, shared expert (dense FP8).
* ``bf16``       the same data flow in bf16 on ``torch._grouped_mm`` (+ F.linear shared expert).
* ``fp8_row``    row-wise FP8 on ``torch._scaled_grouped_mm`` / ``torch._scaled_mm`` (one scale per
                 token row and per weight output channel), torch quantisation passes.
  Peers get the same 128-row-padded segments (their offsets = our segment ends) and the same
  combine, so only the expert math differs; their router is not timed (routing precomputed),
  ours is: ``ours`` is the whole layer.
* ``gemm_share`` = time of our GEMMs alone (grouped 1+2, shared 1+2 or folded into the grouped
  ones) on the same layout / layer time
  (grouped 1 is the fused SwiGLU GEMM where the layer runs it: ``MOE_FP8_PREFILL_SWIGLU``).
* TFLOPS count real rows only: 6·H·I per (token, expert) incl. the shared expert.

Decode (masked layout, ``decode_runner(max_tokens=n)`` replayed as one CUDA graph), n = 1 .. 256:
time vs the weight-streaming floor = bytes of the touched experts' FP8 weights + scales (+ the
shared expert) / the measured device copy bandwidth. The decode rows are timed under the ``clean``
L2 flush unless ``MOE_FP8_BENCH_FLUSH`` says otherwise: the usual ``write`` flush leaves ~35 MB
of dirty lines whose writeback adds 5-6 us to every replay (flush_probe.py, H200 2026-12-06),
which a pure stream (the floor) does not pay. The prefill rows keep ``write``, like the peers'
published figures. Beside it, ``read_floor_us``: the same bytes at the card's read-only stream rate
(``common.read_bandwidth_gbs``; the H100 reads at its copy rate, the H200 is not yet measured).

    python benchmarks/bench_layer.py [--quick] [--decode-only | --prefill-only] [--repeats N]

Results: benchmarks/results/layer_prefill_<date>.md/.csv and layer_decode_<date>.md/.csv (card,
date, commit in the header); the tables print last. Timings: CUDA events, medians, L2 flushed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import bench, copy_bandwidth_gbs, geomean, markdown_table, write_results  # noqa: E402

import moe_fp8.gemm as G  # noqa: E402
from moe_fp8.layers import MoE, MoEConfig  # noqa: E402
from moe_fp8.layers.layouts import contiguous_index, local_expert_ids  # noqa: E402
from moe_fp8.layers.permute import (combine_index_contiguous, quantize_tokens,  # noqa: E402
                                    unpermute_combine)
from moe_fp8.layers.reference import dequantized_weights  # noqa: E402

kPrefillTokens = (4096, 8192, 16384, 32768)
kPrefillColumns = ("tokens", "routed_rows", "ours_us", "ours_TFLOPS", "gemm_share", "bf16_us",
                   "speedup_vs_bf16", "diff_vs_bf16", "fp8_row_us", "speedup_vs_fp8_row",
                   "diff_vs_fp8_row")
kDecodeTokens = (1, 2, 4, 8, 16, 32, 64, 128, 256)
kTargets = "prefill >= 1.6x bf16 and >= 1.2x fp8_row; GEMMs >= 80% of layer time; decode <= 1.2x floor"


def layer_flops(cfg: MoEConfig, tokens: int) -> float:
    return 6.0 * cfg.hidden_size * cfg.moe_intermediate_size * tokens * (cfg.top_k + cfg.n_shared_experts)


# ----------------------------------------------------------------------------- peers

class PeerWeights:
    """bf16 and row-wise FP8 copies of the layer's (dequantised) weights."""

    def __init__(self, moe: MoE):
        w = dequantized_weights(moe)
        self.w13 = w["w13"].bfloat16()  # [E, 2I, H]
        self.w2 = w["w2"].bfloat16()  # [E, H, I]
        self.s13, self.s2 = w["shared_w13"].bfloat16(), w["shared_w2"].bfloat16()
        self.q13, self.r13 = rowwise_quant(self.w13)  # fp8 [E, 2I, H], fp32 [E, 2I]
        self.q2, self.r2 = rowwise_quant(self.w2)
        self.qs13, self.rs13 = rowwise_quant(self.s13)
        self.qs2, self.rs2 = rowwise_quant(self.s2)


def rowwise_quant(x: torch.Tensor):
    """One fp32 scale per row (last dim reduced): fp8 like x, scales x.shape[:-1]."""
    scale = x.float().abs().amax(dim=-1).clamp_min(1e-10) / 448.0
    return (x.float() / scale.unsqueeze(-1)).clamp(-448, 448).to(torch.float8_e4m3fn), scale


def peer_routing(moe: MoE, x: torch.Tensor):
    """Routing + the padded contiguous index both peers use (host sync for M_sum, like ours)."""
    routing = moe.gate(x)
    local = local_expert_ids(routing.topk_idx, 0, moe.num_experts_local)
    index = contiguous_index(local, moe.num_experts_local)
    segment = (index.tokens_per_expert + 127) // 128 * 128
    ends = torch.cumsum(segment, 0).to(torch.int32)  # [E] segment ends (offs of the grouped mms)
    valid = index.row_pair >= 0
    row_token = torch.where(valid, index.row_pair // moe.cfg.top_k, 0)
    return routing, index, ends, row_token, combine_index_contiguous(index, routing.topk_weights)


def bf16_layer(x, pw: PeerWeights, ends, row_token, combine):
    rows = x.index_select(0, row_token)  # [M_sum, H]
    h = torch._grouped_mm(rows, pw.w13.transpose(-2, -1), offs=ends)  # [M_sum, 2I]
    gate, up = h.chunk(2, dim=-1)
    y = torch._grouped_mm(F.silu(gate) * up, pw.w2.transpose(-2, -1), offs=ends)  # [M_sum, H]
    sg, su = F.linear(x, pw.s13).chunk(2, dim=-1)
    shared = F.linear(F.silu(sg) * su, pw.s2)
    return unpermute_combine(y, combine, add=shared)


def _scaled_mm_rowwise(qa, sa, qb, sb):
    return torch._scaled_mm(qa, qb.t(), scale_a=sa.unsqueeze(1), scale_b=sb.unsqueeze(0),
                            out_dtype=torch.bfloat16)


def fp8_row_layer(x, pw: PeerWeights, ends, row_token, combine):
    qx, sx = rowwise_quant(x)  # [T, H], [T]
    rows, srows = qx.index_select(0, row_token), sx.index_select(0, row_token)
    h = torch._scaled_grouped_mm(rows, pw.q13.transpose(-2, -1), srows, pw.r13, offs=ends,
                                 out_dtype=torch.bfloat16)
    gate, up = h.chunk(2, dim=-1)
    qa, sa = rowwise_quant(F.silu(gate) * up)
    y = torch._scaled_grouped_mm(qa, pw.q2.transpose(-2, -1), sa, pw.r2, offs=ends,
                                 out_dtype=torch.bfloat16)
    sg, su = _scaled_mm_rowwise(qx, sx, pw.qs13, pw.rs13).chunk(2, dim=-1)
    qs, ss = rowwise_quant(F.silu(sg) * su)
    shared = _scaled_mm_rowwise(qs, ss, pw.qs2, pw.rs2)
    return unpermute_combine(y, combine, add=shared)


# ----------------------------------------------------------------------------- ours, GEMMs only

def gemm_only(moe: MoE, x: torch.Tensor):
    """A closure running just our GEMMs on a prebuilt layout (inputs precomputed): the GEMM
    kernels the layer runs, so the routed gate-up is the fused SwiGLU GEMM (its SiLU epilogue
    included) where ``MOE_FP8_PREFILL_SWIGLU`` has the layer use it, and the shared expert rides
    in the routed GEMMs where the layer folds it (``MOE_FP8_FOLD_SHARED``: 2 GEMMs, else 4)."""
    routing = moe.gate(x)
    xq, xs = quantize_tokens(x)
    folded = moe._fold_shared(xq)  # the layer's own choice
    fold = {"shared_expert": True} if folded else {}
    layout, _ = moe.dispatcher.dispatch_contiguous((xq, xs), routing.topk_idx, routing.topk_weights,
                                                   **fold)
    ex, sh = moe.experts, moe.shared_experts
    w13, w13_scale, w2, w2_scale = folded or (ex.w13, ex.w13_scale, ex.w2, ex.w2_scale)
    h = torch.zeros(layout.num_rows, 2 * ex.inter, dtype=torch.bfloat16, device=x.device)
    act = G.silu_and_mul_quant_fp8(G.m_grouped_fp8_gemm_nt_contiguous(
        (layout.a, layout.sa), (w13, w13_scale), layout.m_indices))
    y = torch.empty(layout.num_rows, ex.hidden, dtype=torch.bfloat16, device=x.device)
    dense_shared = sh is not None and not folded
    if dense_shared:
        hs = G.fp8_gemm_nt((xq, xs), (sh.w13, sh.w13_scale))
        act_s = G.silu_and_mul_quant_fp8(hs)
        ys = torch.empty(x.shape[0], ex.hidden, dtype=torch.bfloat16, device=x.device)

    counter = ex._tile_counter(layout.a)  # the layer's own choices: dynamic tiles, fused SwiGLU
    fused = ex._prefill_swiglu(layout, w13, w13_scale, counter) is not None

    def run():
        if fused:
            ex._prefill_swiglu(layout, w13, w13_scale, counter)
        else:
            G.m_grouped_fp8_gemm_nt_contiguous((layout.a, layout.sa), (w13, w13_scale),
                                               layout.m_indices, out=h, tile_counter=counter)
        G.m_grouped_fp8_gemm_nt_contiguous(act, (w2, w2_scale), layout.m_indices, out=y,
                                           tile_counter=counter)
        if dense_shared:
            G.fp8_gemm_nt((xq, xs), (sh.w13, sh.w13_scale), out=hs)
            G.fp8_gemm_nt(act_s, (sh.w2, sh.w2_scale), out=ys)
    return run


# ----------------------------------------------------------------------------- tables

@torch.no_grad()
def prefill_rows(moe, pw, token_counts, repeats, rounds=1):
    """Per token count: ours and the peers timed in ``rounds`` interleaved rounds (ours, bf16,
    fp8_row, ours, ...), each kind's time the median of its rounds. On a card at its power cap
    the clock follows the recent load and the temperature, so kinds timed at different moments
    drift apart (H100, 2026-12-06: the 16384-token row 12.3-14.5 ms between runs)."""
    rows = []
    cfg = moe.cfg
    for tokens in token_counts:
        gen = torch.Generator(device="cuda").manual_seed(tokens)
        x = torch.randn(tokens, cfg.hidden_size, generator=gen, device="cuda").bfloat16()
        flops = layer_flops(cfg, tokens)
        row = {"tokens": tokens, "routed_rows": tokens * cfg.top_k}
        routing, _, ends, row_token, combine = peer_routing(moe, x)
        y_ours = moe(x)
        kinds = {"ours": lambda: moe(x)}
        for name, layer in (("bf16", bf16_layer), ("fp8_row", fp8_row_layer)):
            try:
                y_peer = layer(x, pw, ends, row_token, combine)
                row[f"diff_vs_{name}"] = G.calc_diff(y_ours, y_peer)
                kinds[name] = lambda layer=layer: layer(x, pw, ends, row_token, combine)
            except Exception as error:  # noqa: BLE001 - keep the table going
                row[f"{name}_us"] = row[f"speedup_vs_{name}"] = row[f"diff_vs_{name}"] = float("nan")
                print(f"peer {name} failed at T={tokens}: {error!r}"[:300])
        times = {name: [] for name in kinds}
        for _ in range(rounds):
            for name, fn in kinds.items():
                times[name].append(bench(fn, repeats=repeats, warmup=2))
        ours_us = statistics.median(times["ours"])
        row["ours_us"], row["ours_TFLOPS"] = ours_us, flops / ours_us / 1e6
        for name in kinds:
            if name != "ours":
                us = statistics.median(times[name])
                row[f"{name}_us"], row[f"speedup_vs_{name}"] = us, us / ours_us
        try:
            row["gemm_share"] = bench(gemm_only(moe, x), repeats=repeats, warmup=2) / ours_us
        except Exception as error:  # noqa: BLE001
            row["gemm_share"] = float("nan")
            print(f"gemm-only timing failed at T={tokens}: {error!r}"[:300])
        row = {key: row[key] for key in kPrefillColumns if key in row}
        rows.append(row)
        common.print_row(row, 4)
        x = y_ours = y_peer = None  # free before the next size
        torch.cuda.empty_cache()
    return rows


def expert_bytes(moe: MoE) -> tuple:
    ex, sh = moe.experts, moe.shared_experts
    per_expert = (ex.w13[0].numel() + ex.w2[0].numel() + 4 * (ex.w13_scale[0].numel() + ex.w2_scale[0].numel()))
    shared = 0 if sh is None else sh.w13.numel() + sh.w2.numel() + 4 * (sh.w13_scale.numel() + sh.w2_scale.numel())
    return per_expert, shared


@torch.no_grad()
def decode_rows(moe, pw, token_counts, repeats, bandwidth_gbs, peers=True, read_gbs=None):
    """``read_gbs`` (the card's read-only stream rate) adds a second floor beside the copy-rate one
    the targets use: what a read-only weight stream can reach."""
    rows = []
    cfg = moe.cfg
    per_expert, shared = expert_bytes(moe)
    for n in token_counts:
        gen = torch.Generator(device="cuda").manual_seed(1000 + n)
        x = torch.randn(n, cfg.hidden_size, generator=gen, device="cuda").bfloat16()
        run = moe.decode_runner(max_tokens=n)
        y = run(x).clone()
        touched = int(torch.unique(moe.gate(x).topk_idx).numel())
        floor_us = (touched * per_expert + shared) / (bandwidth_gbs * 1e3)
        us = bench(lambda: run(x), repeats=repeats, warmup=3)
        row = {"tokens": n, "experts_touched": touched, "graph_us": us, "floor_us": floor_us,
               "vs_floor": us / floor_us, **_read_floor(us, floor_us, bandwidth_gbs, read_gbs),
               "diff_vs_prefill": G.calc_diff(y, moe(x))}
        row["bf16_eager_us"] = float("nan")
        try:
            if peers:
                _, _, ends, row_token, combine = peer_routing(moe, x)
                row["bf16_eager_us"] = bench(lambda: bf16_layer(x, pw, ends, row_token, combine),
                                             repeats=repeats, warmup=2)
        except Exception as error:  # noqa: BLE001
            print(f"bf16 decode peer failed at n={n}: {error!r}"[:300])
        rows.append(row)
        common.print_row(row, 4)
        del run
        torch.cuda.empty_cache()
    if not token_counts:
        return rows
    # batches below a server's runner size (the largest): each replays the runner's graph of the
    # smallest batch size holding it (decode.py), 3 and 100 tokens on graphs of 4 and 128
    biggest = max(token_counts)
    run = moe.decode_runner(max_tokens=biggest)
    for n in sorted({1, min(3, biggest), min(100, biggest)}):
        x = torch.randn(n, cfg.hidden_size, generator=torch.Generator(device="cuda").manual_seed(n),
                        device="cuda").bfloat16()
        us = bench(lambda: run(x), repeats=repeats, warmup=3)
        touched = int(torch.unique(moe.gate(x).topk_idx).numel())
        floor_us = (touched * per_expert + shared) / (bandwidth_gbs * 1e3)
        row = {"tokens": f"{n} (runner {biggest}, graph {run.batch_size_for(n)})",
               "experts_touched": touched, "graph_us": us, "floor_us": floor_us,
               "vs_floor": us / floor_us, **_read_floor(us, floor_us, bandwidth_gbs, read_gbs),
               "diff_vs_prefill": G.calc_diff(run(x), moe(x)),
               "bf16_eager_us": float("nan")}
        rows.append(row)
        common.print_row(row, 4)
    return rows


def _read_floor(us: float, floor_us: float, copy_gbs: float, read_gbs) -> dict:
    """The floor at the read-only rate and the time against it (no columns without one)."""
    if not read_gbs:
        return {}
    read_floor_us = floor_us * copy_gbs / read_gbs
    return {"read_floor_us": read_floor_us, "vs_read_floor": us / read_floor_us}


def backend_report() -> str:
    try:
        from moe_fp8.gemm.backend import pick
    except ImportError:
        return "unknown"
    device = torch.device("cuda")
    parts = []
    for label, family, name in (("quant", "quant", "per_token_group_quant"),
                                ("silu", "quant", "silu_and_mul_quant"),
                                ("gemm", "fp8_gemm", "m_grouped_contiguous"),
                                ("masked", "fp8_gemm", "m_grouped_masked"),
                                ("dense", "fp8_gemm", "fp8_gemm_nt")):
        try:
            found = pick("auto", device, family, name) is not None
        except Exception:  # noqa: BLE001
            found = False
        parts.append(f"{label}={'kernel' if found else 'REFERENCE'}")
    return " ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="T = 4096, 16384; n = 1, 32, 128")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3,
                        help="prefill: interleaved rounds of ours and the peers (medians)")
    parser.add_argument("--decode-only", action="store_true", help="skip the prefill rows (decode A/B calls)")
    parser.add_argument("--prefill-only", action="store_true", help="skip the decode rows")
    parser.add_argument("--decode-tokens", default=None,
                        help="comma-separated decode batch sizes (default: the full 1-256 list)")
    parser.add_argument("--prefill-tokens", default=None,
                        help="comma-separated prefill token counts (default: 4096-32768; below "
                             "~2048 the eager layer is host-bound on the device machine)")
    parser.add_argument("--no-peers", action="store_true",
                        help="decode rows without the bf16 peer (switch A/B calls: ours only)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_layer.py needs a CUDA GPU")
    backends = backend_report()
    print(f"backends: {backends}")
    if "REFERENCE" in backends:
        print("WARNING: some ops run the pure-torch reference on this GPU: timings are not kernel timings")
    cfg = MoEConfig.deepseek_v3(num_experts=32)
    moe = MoE(cfg, device="cuda", seed=0)
    pw = PeerWeights(moe)
    bandwidth = copy_bandwidth_gbs()
    read_gbs = common.read_bandwidth_gbs()
    print(f"copy bandwidth {bandwidth:.0f} GB/s, read-only {read_gbs:.0f} GB/s", flush=True)
    prefill_tokens = (4096, 16384) if args.quick else kPrefillTokens
    if args.prefill_tokens:
        prefill_tokens = tuple(int(n) for n in args.prefill_tokens.split(","))
    if args.decode_only:
        prefill_tokens = ()
    decode_tokens = (1, 32, 128) if args.quick else kDecodeTokens
    if args.decode_tokens:
        decode_tokens = tuple(int(n) for n in args.decode_tokens.split(","))
    if args.prefill_only:
        decode_tokens = ()

    prefill, decode = [], []
    try:
        prefill = prefill_rows(moe, pw, prefill_tokens, args.repeats, args.rounds)
    except Exception:  # noqa: BLE001 - still run decode and print what we have
        traceback.print_exc()
    decode_flush = os.environ.get("MOE_FP8_BENCH_FLUSH") or "clean"  # see the module docstring
    try:
        with common.flush_as(decode_flush):
            decode = decode_rows(moe, pw, decode_tokens, max(args.repeats, 20), bandwidth,
                                 peers=not args.no_peers, read_gbs=read_gbs)
    except Exception:  # noqa: BLE001
        traceback.print_exc()

    summary = [f"backends: {backends}", f"copy bandwidth: {bandwidth:.0f} GB/s (floor_us); read-only "
               f"stream {read_gbs:.0f} GB/s (read_floor_us: torch.sum of 2 GiB fp32)",
               f"targets: {kTargets}"]
    if prefill:
        summary.append("prefill geomean speed-up vs bf16 _grouped_mm: "
                       f"{geomean([r['speedup_vs_bf16'] for r in prefill]):.2f}x, vs row-wise FP8: "
                       f"{geomean([r['speedup_vs_fp8_row'] for r in prefill]):.2f}x; GEMM share "
                       f"{min(r['gemm_share'] for r in prefill):.0%}..{max(r['gemm_share'] for r in prefill):.0%}")
    if decode:
        summary.append(f"decode vs floor: geomean {geomean([r['vs_floor'] for r in decode]):.2f}x")
    if prefill:
        write_results("layer_prefill", prefill, "\n\n".join(
            summary + [f"prefill: ours and the peers in {args.rounds} interleaved rounds of "
                       f"{args.repeats} repeats each, medians"]))
    if decode:
        with common.flush_as(decode_flush):  # the decode table's header names its flush
            write_results("layer_decode", decode, "\n\n".join(summary))
    # the tables last, for the log's tail
    for title, rows in (("prefill", prefill), ("decode", decode)):
        if rows:
            print(f"\n## {title}\n{markdown_table(rows)}")
    print("\n" + "\n".join(summary))


if __name__ == "__main__":
    main()
