"""The register / spill report of ``ptxas -v``, parsed per kernel."""
from __future__ import annotations

import re
from dataclasses import dataclass

_kEntry = re.compile(r"Compiling entry function '([^']+)'")
_kProperties = re.compile(r"Function properties for (\S+)")
_kFrame = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_kRegisters = re.compile(r"Used (\d+) registers")
_kSmem = re.compile(r"(\d+) bytes smem")
# ptxas prints these as "info", not warnings: wgmma issued one at a time (a large silent slowdown)
_kWgmmaSerialized = re.compile(r"\((C7514|C7518)\)|wgmma\.mma_async instructions are serialized")


@dataclass(frozen=True)
class ResourceReport:
    """What ptxas reported for one kernel (``-1`` where it said nothing)."""
    registers: int = -1
    stack_bytes: int = -1  # local memory frame (dynamic register-array indexing lands here too)
    spill_stores: int = -1
    spill_loads: int = -1
    static_smem: int = 0
    wgmma_serialized: bool = False  # ptxas C7514/C7518: the wgmma pipeline was serialised

    @property
    def uses_local_memory(self) -> bool:
        return max(self.stack_bytes, self.spill_stores, self.spill_loads) > 0

    def __str__(self) -> str:
        return (f"{self.registers} registers, {self.stack_bytes} B stack, "
                f"{self.spill_stores} B spill stores, {self.spill_loads} B spill loads, "
                f"{self.static_smem} B static smem"
                + (", WGMMA SERIALIZED" if self.wgmma_serialized else ""))


def parse_ptxas_log(log: str, symbol: str) -> ResourceReport:
    """The report lines that belong to ``symbol`` (ptxas prints one block per entry function)."""
    current = None
    fields = {"wgmma_serialized": bool(_kWgmmaSerialized.search(log))}  # one kernel per TU
    for line in log.splitlines():
        match = _kEntry.search(line) or _kProperties.search(line)
        if match:
            current = match.group(1)
            continue
        if current != symbol:
            continue
        if frame := _kFrame.search(line):
            fields["stack_bytes"], fields["spill_stores"], fields["spill_loads"] = map(
                int, frame.groups())
        if registers := _kRegisters.search(line):
            fields["registers"] = int(registers.group(1))
            if smem := _kSmem.search(line):
                fields["static_smem"] = int(smem.group(1))
    return ResourceReport(**fields)
