"""Timing and reporting helpers shared by the benchmarks (GPU only).

`bench` times with CUDA events, flushes the L2 before every repeat, and returns the median in
microseconds; `bench_interleaved` does the same for several kernels in turns (ours beside its
peers: one power and thermal history for all). The flush (``MOE_FP8_BENCH_FLUSH``, or ``flush_mode``):
* ``write`` (default): a 256 MiB ``zero_()``, the field's usual flush (triton's do_bench,
  DeepGEMM's bench_kineto). It leaves the L2 full of the flush's own dirty lines, which the timed
  region then writes back to DRAM as it evicts them: measured ~8.5 us on a 128 MB read and 5-6
  us on each bandwidth-bound GEMM or decode step (flush_probe.py, H200 2026-12-06).
* ``clean``: the same write, then a read of another 256 MiB: the L2 holds clean lines of no use
  to the timed region, so it pays neither hits nor a writeback that is not its own (measured
  equal to no flush on inputs larger than the L2). bench_layer's decode rows default to it.

`write_results` saves a markdown table and a CSV under benchmarks/results/ with the card, date,
commit and flush mode in the header, and prints the table.
"""
from __future__ import annotations

import contextlib
import csv
import datetime
import os
import statistics
import subprocess
import tempfile
from typing import Callable, Dict, List, Sequence

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
_flush_buffer = None
_flush_read_buffer = None
kFlushModes = ("write", "clean")
flush_mode = os.environ.get("MOE_FP8_BENCH_FLUSH", "write")
if flush_mode not in kFlushModes:
    raise ValueError(f"MOE_FP8_BENCH_FLUSH must be one of {kFlushModes}, got {flush_mode!r}")


@contextlib.contextmanager
def env(**values: str):
    """Environment variables set inside the block (a package switch: MOE_FP8_...), restored (or
    removed) after it."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


@contextlib.contextmanager
def flush_as(mode: str):
    """``flush_mode`` is ``mode`` inside the block: for the timings and the result headers."""
    global flush_mode
    saved, flush_mode = flush_mode, mode
    try:
        yield
    finally:
        flush_mode = saved


def flush_l2(mode: str | None = None) -> None:
    """Evict the L2 (``mode``: ``write`` / ``clean``, default ``flush_mode``; module doc)."""
    global _flush_buffer, _flush_read_buffer
    mode = mode or flush_mode
    if _flush_buffer is None:
        _flush_buffer = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    _flush_buffer.zero_()
    if mode == "clean":
        if _flush_read_buffer is None:
            _flush_read_buffer = torch.ones(64 << 20, dtype=torch.float32, device="cuda")
        _flush_read_buffer.sum()


@contextlib.contextmanager
def smi_samples(fields: str, interval_ms: int):
    """nvidia-smi samples of ``fields`` (its --query-gpu list) every ``interval_ms`` while the
    block runs; the list it yields is filled on exit, one list of stripped values per sample.
    The block synchronizes the device itself before it ends."""
    samples: List[List[str]] = []
    with tempfile.NamedTemporaryFile("r", suffix=".csv") as log:
        smi = subprocess.Popen(["nvidia-smi", f"--query-gpu={fields}",
                                "--format=csv,noheader,nounits", "-lms", str(interval_ms)],
                               stdout=open(log.name, "w"), stderr=subprocess.DEVNULL)
        try:
            yield samples
        finally:
            smi.terminate()
            smi.wait()
            samples.extend([v.strip() for v in line.split(",")] for line in open(log.name)
                           if line.strip())


def numbers(samples: List[List[str]], column: int) -> List[float]:
    """Column ``column`` of ``smi_samples`` rows, the numeric entries only."""
    return [float(r[column]) for r in samples
            if len(r) > column and r[column].replace(".", "").isdigit()]


def print_row(row: Dict[str, object], digits: int = 2) -> None:
    """One result row as a dict line, floats rounded: a cut device call's log still has it."""
    print({k: (round(v, digits) if isinstance(v, float) else v) for k, v in row.items()},
          flush=True)


def _device_ms(fn: Callable[[], object], calls: int) -> float:
    """Device time of ``calls`` back-to-back calls of ``fn`` (CUDA events), in milliseconds."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


_card_awake = [False]


def _wake_card() -> None:
    """The first call of a process first runs ~300 ms of L2 flushes (see ``bench``)."""
    if not _card_awake[0]:
        _device_ms(flush_l2, 1)
        _device_ms(flush_l2, max(1, int(300.0 / max(_device_ms(flush_l2, 4) / 4, 1e-3))))
        _card_awake[0] = True


def bench(fn: Callable[[], object], *, warmup: int = 5, repeats: int = 30, flush: bool = True,
          busy_ms: float = 40.0) -> float:
    """Median device time of ``fn()`` in microseconds (L2 flushed before each repeat).

    After ``warmup`` calls, ``fn`` keeps the card busy for ``busy_ms`` more (in doubling batches)
    before timing, and the first call of a process first runs ~300 ms of L2 flushes: after an
    idle spell (process start, a JIT compile) the first shape of a row timed ~10 % slower than
    the same kernel timed later in that row (32 experts, ~128 tokens each: 435 vs 386 us, H100
    2026-12-05). Not removed by this: bench_quant's first row (per-token M = 128) read 64 us in
    one process with the wake-up and 6.1 us first and last in another (H100, 2026-12-05).
    """
    _wake_card()
    for _ in range(warmup):
        fn()
    busy, calls = 0.0, 1
    for _ in range(16):  # bounded: an fn with (almost) no device work never fills busy_ms
        busy += _device_ms(fn, calls)
        if busy >= busy_ms:
            break
        calls = min(2 * calls, 4096)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for start, end in zip(starts, ends):
        if flush:
            flush_l2()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1e3


def bench_interleaved(fns: Sequence[Callable[[], object]], *, warmup: int = 5, repeats: int = 30,
                      busy_ms: float = 40.0) -> List[float]:
    """Median device time of each of ``fns`` in microseconds, timed in turns (L2 flushed before
    every call): repeat i times fns[0], fns[1], ... one after the other, so each kernel sees the
    same power and thermal history.

    NOTE: timed one after the other (``bench`` per kernel), a compute-bound peer timed after
    ours ran on a card our runs had pushed into its 700 W cap: at 4096 x 7168 x 16384 cuBLAS
    read 868 us there against 745 us in a burst after idling and 832-844 us sustained, while
    ours read 741 / 714 / 807-810 (H100, session 20, experiments/burst_probe.py).
    """
    _wake_card()
    for fn in fns:
        for _ in range(warmup):
            fn()
    for fn in fns:  # each keeps the card busy for busy_ms / len(fns), in turn
        _device_ms(fn, max(1, int(busy_ms / len(fns) / max(_device_ms(fn, 1), 1e-3))))
    events = [[(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
               for _ in range(repeats)] for _ in fns]
    for i in range(repeats):
        for fn, evs in zip(fns, events):
            flush_l2()
            evs[i][0].record()
            fn()
            evs[i][1].record()
    torch.cuda.synchronize()
    return [statistics.median(s.elapsed_time(e) for s, e in evs) * 1e3 for evs in events]


def kernel_us(fn: Callable[[], object], *, repeats: int = 30, flush: bool = True) -> float:
    """Median GPU time of ``fn()``'s kernels alone, in microseconds: the sum of the durations of
    the kernels one call launches (torch.profiler), without the gaps between launches or the
    event records — the convention of DeepGEMM's published figures (its ``bench_kineto``), which
    ``bench``'s CUDA-event time exceeds by the launch gap (~1-3 us: 10-25 % of a 14 us GEMM).

    ``fn`` must launch the same number of kernels every call (the calls are told apart by
    position: one L2 flush kernel, then ``fn``'s kernels); the flush is always ``write`` (one
    kernel).
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    fn()
    flush_l2("write")
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            flush_l2("write")  # one kernel: also marks where a call begins
            fn()
        torch.cuda.synchronize()
    events = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA
                     and not e.name.startswith(("Memcpy", "Memset"))),
                    key=lambda e: e.time_range.start)
    per_call = len(events) // repeats
    if per_call < 2 or per_call * repeats != len(events):
        raise RuntimeError(f"kernel_us: {len(events)} kernels over {repeats} calls (not one flush "
                           "+ a fixed number per call)")
    flush_name = events[0].name
    sums = []
    for i in range(repeats):
        chunk = events[i * per_call:(i + 1) * per_call]
        if chunk[0].name != flush_name or any(e.name == flush_name for e in chunk[1:]):
            raise RuntimeError("kernel_us: calls could not be told apart by the flush kernel")
        sums.append(sum(e.time_range.elapsed_us() for e in chunk[1:]))
    return statistics.median(sums)


def copy_bandwidth_gbs(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy ceiling in GB/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 2, dtype=torch.int8, device="cuda").random_(-128, 127)
    dst = torch.empty_like(src)
    us = bench(lambda: dst.copy_(src), flush=False)
    return 2 * src.numel() / (us * 1e-6) / 1e9


def read_bandwidth_gbs(nbytes: int = 2 << 30) -> float:
    """Read-only stream rate in GB/s: ``nbytes`` of fp32 summed to one value (torch's reduction;
    nothing written back). A decode step's weights are a read-only stream, while the copy rate
    counts reads plus writes; whether the two differ on the H200 is not yet measured (NOTES,
    session 28; on the H100 2 GiB read 3.16 TB/s against a 3.03 TB/s copy)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
    out = torch.empty((), dtype=torch.float32, device="cuda")
    us = bench(lambda: torch.sum(src, dim=0, out=out), flush=False)
    return nbytes / (us * 1e-6) / 1e9


def card() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def commit() -> str:
    """The commit under test: MOE_FP8_COMMIT (the device machine gets no .git), else git."""
    if os.environ.get("MOE_FP8_COMMIT"):
        return os.environ["MOE_FP8_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def geomean(values: Sequence[float]) -> float:
    values = [v for v in values if v > 0]
    return statistics.geometric_mean(values) if values else float("nan")


def _columns(rows: List[Dict[str, object]]) -> List[str]:
    """Every key of every row, in first-seen order (rows may add columns, e.g. pinned configs)."""
    return list(dict.fromkeys(key for row in rows for key in row))


def markdown_table(rows: List[Dict[str, object]]) -> str:
    columns = _columns(rows)
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) and abs(v) < 10 else (f"{v:.0f}" if isinstance(v, float) else str(v))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(name: str, rows: List[Dict[str, object]], summary: str = "") -> str:
    """Write ``results/<name>_<date>.md`` and ``.csv``; print the table; return the markdown."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    date = datetime.date.today().isoformat()
    header = (f"# {name}\n\ncard: {card()} · torch {torch.__version__} · date {date} · "
              f"commit {commit()} · L2 flush {flush_mode}\n\n")
    text = header + markdown_table(rows) + ("\n\n" + summary if summary else "") + "\n"
    stem = os.path.join(RESULTS_DIR, f"{name}_{date}")
    with open(stem + ".md", "w") as f:
        f.write(text)
    with open(stem + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_columns(rows), restval="")
        writer.writeheader()
        writer.writerows(rows)
    out_dir = os.environ.get("OUT")
    if out_dir:
        for ext in (".md", ".csv"):
            with open(stem + ext) as src, open(os.path.join(out_dir, os.path.basename(stem) + ext), "w") as dst:
                dst.write(src.read())
    print(text)
    return text
