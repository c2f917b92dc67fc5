"""PNG plots of the committed benchmark tables: ours beside the peers and the target, per shape.

    python benchmarks/plot_results.py [--date 2026-11-25]     # needs matplotlib (not a dependency)
    python benchmarks/plot_results.py --stems layer_decode=layer_decode_h100_2026-12-06_s17

Reads `benchmarks/results/<table>_<date>.csv` (the CSVs the benchmarks write; or the named stems,
each plotted as its table kind) and writes the `.png` beside it. The card is in the matching `.md`
header.
"""
from __future__ import annotations

import argparse
import csv
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# table -> (label of a row, {legend: column}, y label); legends must not start with "_"
# (matplotlib hides those)
kTables = {
    "gemm_v3": (lambda r: f"{r['M']}x{r['N']}x{r['K']}",
                {"ours": "TFLOPS", "cuBLAS blockwise": "cuBLAS_TFLOPS", "target": "target_TFLOPS"},
                "TFLOPS"),
    "grouped_contiguous_v3": (lambda r: f"{r['case']}: E {r['E']}, M_sum {r['M_sum']}, {r['N']}x{r['K']}",
                              {"ours": "TFLOPS", "cuBLAS per expert": "cuBLAS_per_expert_TFLOPS",
                               "torch._scaled_grouped_mm (row-wise)": "scaled_grouped_mm_rowwise_TFLOPS",
                               "torch._grouped_mm bf16": "grouped_mm_bf16_TFLOPS",
                               "target": "target_TFLOPS"},
                              "TFLOPS"),
    "grouped_masked_v3": (lambda r: f"{r['E']}x{r['M_max']} {r['N']}x{r['K']} m~{r['expected_m']}",
                          {"ours (graph replay)": "TFLOPS",
                           "ours (kernel time)": lambda r: number(r.get("TFLOPS_kernel", "")),
                           "target": "target_TFLOPS"}, "TFLOPS"),
    "layer_prefill": (lambda r: f"{r['tokens']} tokens",
                      {"ours": "ours_us", "bf16 layer (torch._grouped_mm)": "bf16_us",
                       "row-wise FP8 layer": "fp8_row_us"}, "µs per layer (lower is better)"),
    "layer_decode": (lambda r: f"{r['tokens']} tokens",
                     {"ours (graph replay)": "graph_us", "weight-streaming floor": "floor_us",
                      "target: 1.2 x floor": lambda r: 1.2 * number(r["floor_us"])},
                     "µs per decode step (lower is better)"),
}


def number(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return float("nan")


def card(stem: str) -> str:
    try:
        with open(stem + ".md") as f:
            for line in f:
                if line.startswith("card:"):
                    return line.split("·")[0].removeprefix("card:").strip()
    except OSError:
        pass
    return "unknown card"


def plot(table: str, name: str) -> str | None:
    """``name``: the results file's stem (``<table>_<date>`` by default)."""
    stem = os.path.join(RESULTS_DIR, name)
    if not os.path.exists(stem + ".csv"):
        return None
    label, series, ylabel = kTables[table]
    with open(stem + ".csv") as f:
        rows = [r for r in csv.DictReader(f)
                if all(callable(c) or c in r for c in series.values())]
    if not rows:
        return None
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(min(13.0, max(6.0, 0.25 * len(rows) * len(series))), 5.5))
    for i, (legend, column) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(rows))]
        ax.bar(xs, [column(r) if callable(column) else number(r[column]) for r in rows], width,
               label=legend)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([label(r) for r in rows], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{name} — {card(stem)}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=110)
    plt.close(fig)
    return stem + ".png"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--date", default="2026-11-25")
    parser.add_argument("--stems", default="", help="TABLE=STEM,...: plot these files instead")
    args = parser.parse_args()
    if args.stems:
        pairs = [item.split("=", 1) for item in args.stems.split(",") if item]
    else:
        pairs = [(table, f"{table}_{args.date}") for table in kTables]
    for table, name in pairs:
        path = plot(table, name)
        print(f"{table}: {path or 'no results for ' + name}")


if __name__ == "__main__":
    main()
