"""Whether one-row TMA loads gather a 128B-swizzled tile (GPU; seconds). See probe.cuh.

Prints one dict: equal (the gathered tile's bytes equal the whole-box load of the same rows,
packed), and swizzle_as_expected (16-byte unit u of row r at unit u ^ (r % 8)).

    python benchmarks/experiments/tma_row_gather/probe.py
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
from moe_fp8.gemm import jit  # noqa: E402

kRows, kTokens = 64, 300


def main():
    header = os.path.join(os.path.dirname(os.path.abspath(__file__)), "probe.cuh")
    kernel = jit.get_kernel(jit.KernelSource(header, f"probe::row_gather_kernel<{kRows}>"),
                            torch.cuda.current_device())
    gen = torch.Generator(device="cuda").manual_seed(1)
    source = torch.randint(0, 256, (kTokens, 256), dtype=torch.uint8, device="cuda", generator=gen)
    rows = torch.randperm(kTokens, device="cuda", generator=gen)[:kRows].to(torch.int32)
    packed = source[rows.long()].contiguous()
    view = lambda t: t.view(torch.float8_e4m3fn)  # noqa: E731 (the TMA helper's 1-byte dtype)
    box_desc = jit.make_tma_2d(view(packed), 128, kRows, 128)
    row_desc = jit.make_tma_2d(view(source), 128, 1, 128)
    out = torch.zeros(2, kRows, 128, dtype=torch.uint8, device="cuda")
    kernel.launch((1, 1, 1), (128, 1, 1), 0, [box_desc, row_desc, rows, out])
    torch.cuda.synchronize()
    expect = torch.empty(kRows, 128, dtype=torch.uint8)
    want = packed[:, :128].cpu()
    for r in range(kRows):
        for u in range(8):
            expect[r, 16 * (u ^ (r % 8)):16 * (u ^ (r % 8)) + 16] = want[r, 16 * u:16 * u + 16]
    print({"equal": torch.equal(out[0], out[1]),
           "swizzle_as_expected": torch.equal(out[0].cpu(), expect),
           "gathered_as_expected": torch.equal(out[1].cpu(), expect)}, flush=True)


if __name__ == "__main__":
    main()
