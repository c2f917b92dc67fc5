"""One line from an nvidia-smi sample file (benchmarks/with_clocks.sh): SM clock min / median /
max, the largest power draw and how often each clock-event reason was active (0x4: software
power cap, 0x1: idle)."""
from __future__ import annotations

import collections
import sys

kReasons = {"0x0000000000000000": "none", "0x0000000000000001": "idle",
            "0x0000000000000004": "sw power cap", "0x0000000000000020": "sw thermal",
            "0x0000000000000040": "hw thermal", "0x0000000000000080": "hw power brake"}


def summary(path: str) -> str:
    clocks, power, reasons = [], [], collections.Counter()
    with open(path) as f:
        for line in f:
            fields = [x.strip() for x in line.split(",")]
            if len(fields) < 4 or not fields[1].split()[0].isdigit():
                continue
            clocks.append(int(fields[1].split()[0]))
            try:
                power.append(float(fields[2].split()[0]))
            except ValueError:
                pass
            reasons[kReasons.get(fields[3], fields[3])] += 1
    if not clocks:
        return f"clocks: no samples in {path}"
    clocks.sort()
    top = ", ".join(f"{name} {count}" for name, count in reasons.most_common(4))
    return (f"clocks: {len(clocks)} samples, SM MHz min / median / max {clocks[0]} / "
            f"{clocks[len(clocks) // 2]} / {clocks[-1]}, power max {max(power, default=0):.0f} W, "
            f"reasons: {top}")


if __name__ == "__main__":
    print(summary(sys.argv[1]))
