"""A compact markdown table of ncu raw-page CSVs (``ncu -i X.ncu-rep --page raw --csv``): one
column per profiled kernel, the rows that say whether a streaming GEMM waits on DRAM, on the L2
(its fills and the SMs' reads of the same slices), on its MMAs or on itself.

    python3 benchmarks/ncu_table.py A.raw.csv [B.raw.csv ...]
"""
import csv
import sys

KEYS = [
    ("gpu__time_duration.sum", "duration"),
    ("gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed", "DRAM throughput, % of peak"),
    ("dram__bytes_read.sum.per_second", "DRAM read rate"),
    ("dram__bytes_read.sum", "DRAM read"),
    ("lts__throughput.avg.pct_of_peak_sustained_elapsed", "L2 throughput, % of peak"),
    ("lts__d_sectors_fill_device.avg.pct_of_peak_sustained_elapsed", "L2 fills from DRAM, % of peak"),
    ("lts__t_sectors.avg.pct_of_peak_sustained_elapsed", "L2 sectors (tag stage), % of peak"),
    ("lts__t_sectors_srcunit_ltcfabric.avg.pct_of_peak_sustained_elapsed",
     "L2 sectors from the other partition, % of peak"),
    ("lts__cycles_elapsed.avg.per_second", "L2 clock"),
    ("sm__cycles_elapsed.avg.per_second", "SM clock"),
    ("dram__cycles_elapsed.avg.per_second", "DRAM clock"),
    ("sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_elapsed", "tensor pipe active, SM average"),
    ("sm__pipe_tensor_cycles_active.max.pct_of_peak_sustained_elapsed", "tensor pipe active, busiest SM"),
    ("sm__ops_path_tensor_src_fp8_sparsity_off.sum", "FP8 tensor ops"),
    ("launch__shared_mem_per_block_dynamic", "dynamic shared memory"),
    ("launch__grid_size", "grid"),
    ("smsp__pcsamp_warps_issue_stalled_long_scoreboard", "stall samples: long scoreboard"),
    ("smsp__pcsamp_warps_issue_stalled_barrier", "stall samples: barrier"),
    ("smsp__pcsamp_warps_issue_stalled_wait", "stall samples: wait"),
    ("smsp__pcsamp_warps_issue_stalled_short_scoreboard", "stall samples: short scoreboard"),
    ("smsp__pcsamp_warps_issue_stalled_no_instructions", "stall samples: no instructions"),
    ("smsp__pcsamp_warps_issue_stalled_selected", "samples: selected"),
]


def kernels(path: str):
    """-> [(kernel name, {metric: (value, unit)})] for each profiled launch in one raw CSV."""
    with open(path) as f:
        rows = list(csv.reader(f))
    if len(rows) < 3:
        return []
    header, units = rows[0], rows[1]
    index = {name: i for i, name in enumerate(header)}
    out = []
    for row in rows[2:]:
        values = {key: (row[index[key]], units[index[key]]) if key in index else ("", "")
                  for key, _ in KEYS}
        out.append((row[index["Kernel Name"]][:70] if "Kernel Name" in index else path, values))
    return out


def main(paths) -> None:
    cols = [k for path in paths for k in kernels(path)]
    if not cols:
        print("no profiled kernels in", " ".join(paths))
        return
    print("| metric | " + " | ".join(name for name, _ in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for key, label in KEYS:
        unit = next((v[key][1] for _, v in cols if v[key][1]), "")
        print(f"| {label}{f' ({unit})' if unit else ''} | "
              + " | ".join(v[key][0] for _, v in cols) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
