"""Argument checks shared by the public ops. Every error names the argument and what was expected.

Checks that read tensor values (expert ids in range, masked_m <= M_max, offsets aligned) need a
device-to-host copy; they always run on CPU tensors, and on GPU tensors only in debug mode
(``MOE_FP8_CHECKS=1``) so that the hot path never synchronises.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .jit.env import lookup
from .layout import ceil_div, kScaleBlock

FP8 = torch.float8_e4m3fn
kFloatInputs = (torch.bfloat16, torch.float16, torch.float32)


def debug_mode() -> bool:
    return lookup("MOE_FP8_CHECKS", "0") not in ("", "0")


def value_checks_enabled(*tensors: torch.Tensor) -> bool:
    """Value checks run for CPU tensors always, for device tensors only with MOE_FP8_CHECKS=1.

    Never while torch.compile traces (fake tensors hold no values).
    """
    if torch.compiler.is_compiling():
        return False
    return debug_mode() or all(t.device.type == "cpu" for t in tensors)


def tensor(name: str, t, *, dtypes: Sequence[torch.dtype], dims: Sequence[int],
           contiguous: bool = True) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        expected = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype {expected}, got {t.dtype}")
    if t.dim() not in dims:
        expected = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{name} must be {expected}, got shape {tuple(t.shape)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (row-major), got strides {t.stride()}")
    return t


def shape(name: str, t: torch.Tensor, expected: Sequence[int]) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(t.shape)}")


def same_device(**named: torch.Tensor) -> torch.device:
    devices = {name: t.device for name, t in named.items() if t is not None}
    first_name, first = next(iter(devices.items()))
    for name, device in devices.items():
        if device != first:
            raise ValueError(f"{name} is on {device} but {first_name} is on {first}; "
                             "all tensors of one op must share a device")
    return first


def fp8_pair(name: str, pair, *, dims: Sequence[int]):
    """An ``(fp8 values, fp32 scales)`` pair; values contiguous, scales any strides."""
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise TypeError(f"{name} must be a pair (fp8 tensor, fp32 scale tensor), "
                        f"got {type(pair).__name__}")
    q = tensor(f"{name}[0]", pair[0], dtypes=(FP8,), dims=dims)
    s = tensor(f"{name}[1]", pair[1], dtypes=(torch.float32,), dims=dims, contiguous=False)
    return q, s


def multiple_of(name: str, value: int, multiple: int) -> None:
    if value % multiple != 0:
        raise ValueError(f"{name} must be a multiple of {multiple}, got {value}")


def act_scales(name: str, s: torch.Tensor, rows: Sequence[int], k: int) -> None:
    """1x128 scales of an operand ``[.., rows, k]``: shape ``[.., rows, k/128]``."""
    shape(name, s, (*rows, k // kScaleBlock))


def block_scales(name: str, s: torch.Tensor, lead: Sequence[int], n: int, k: int) -> None:
    """128x128 scales of a weight ``[.., n, k]``: shape ``[.., ceil(n/128), k/128]``."""
    shape(name, s, (*lead, ceil_div(n, kScaleBlock), k // kScaleBlock))


def output(name: str, out, expected_shape: Sequence[int], dtype: torch.dtype,
           device: torch.device) -> torch.Tensor:
    tensor(name, out, dtypes=(dtype,), dims=(len(expected_shape),))
    shape(name, out, expected_shape)
    if out.device != device:
        raise ValueError(f"{name} is on {out.device} but the inputs are on {device}")
    return out


def int32_vector(name: str, t, length: int) -> torch.Tensor:
    tensor(name, t, dtypes=(torch.int32,), dims=(1,))
    shape(name, t, (length,))
    return t


def tile_counter(t, device: torch.device) -> None:
    """A dynamic-tile claim counter (``moe_fp8.gemm.new_tile_counter``): int32, at least 2
    elements, contiguous, on ``device``. Its zeros are the owner's contract (reading them would
    sync)."""
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int32:
        raise TypeError(f"tile_counter must be an int32 tensor (new_tile_counter), got "
                        f"{getattr(t, 'dtype', type(t).__name__)}")
    if t.dim() != 1 or t.numel() < 2 or not t.is_contiguous() or t.device != device:
        raise ValueError(f"tile_counter must be a contiguous int32 vector of at least 2 elements "
                         f"on {device} (new_tile_counter), got shape {tuple(t.shape)} on "
                         f"{t.device}")


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a Python int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def finite(name: str, x: torch.Tensor) -> None:
    """Debug-mode check: quantising NaN/inf gives NaN/inf scales, never a finite wrong answer."""
    if debug_mode() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf (MOE_FP8_CHECKS=1)")


def m_indices_values(m_indices: torch.Tensor, num_experts: int) -> None:
    """Expert ids in [-1, E) and constant within every 128-row block (padding only at a block's end)."""
    if not value_checks_enabled(m_indices) or m_indices.numel() == 0:
        return
    ids = m_indices.cpu().long()
    bad = (ids < -1) | (ids >= num_experts)
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        raise ValueError(f"m_indices[{row}] = {int(ids[row])} names no expert "
                         f"(expected -1 or 0..{num_experts - 1})")
    blocks = ids.view(-1, kScaleBlock)
    first = blocks[:, :1]
    ok = (blocks == first) | (blocks == -1)
    # once a block turns to padding it must stay padding: a later real row would share the block
    pad_then_real = (blocks[:, 1:] != -1) & (blocks[:, :-1] == -1)
    if not bool(ok.all()) or bool(pad_then_real.any()):
        block = int((~ok.all(1) | pad_then_real.any(1)).nonzero()[0])
        raise ValueError(f"m_indices must hold one expert per 128-row block (padding -1 only at "
                         f"the block's end); block {block} (rows {block * 128}..{block * 128 + 127}) "
                         "mixes experts")


def masked_m_values(masked_m: torch.Tensor, m_max: int) -> None:
    if not value_checks_enabled(masked_m):
        return
    values = masked_m.cpu()
    if bool(((values < 0) | (values > m_max)).any()):
        raise ValueError(f"masked_m must lie in [0, M_max={m_max}], got {values.tolist()}")


def segment_starts_values(offsets: torch.Tensor, m_sum: int) -> None:
    """The contiguous layout's offsets form: 0, non-decreasing, multiples of 128, <= M_sum."""
    if not value_checks_enabled(offsets):
        return
    values = offsets.cpu().long()
    if int(values[0]) != 0 or int(values[-1]) > m_sum:
        raise ValueError(f"offsets must start at 0 and end at most at M_sum = {m_sum}, "
                         f"got {values[0].item()}..{values[-1].item()}")
    if bool((values[1:] < values[:-1]).any()):
        raise ValueError(f"offsets must be non-decreasing, got {values.tolist()}")
    if bool((values % kScaleBlock != 0).any()):
        raise ValueError(f"offsets must be multiples of {kScaleBlock} (each expert's segment is "
                         f"aligned), got {values.tolist()}")


def offsets_values(offsets: torch.Tensor, total: int) -> None:
    if not value_checks_enabled(offsets):
        return
    values = offsets.cpu().long()
    if int(values[0]) != 0 or int(values[-1]) != total:
        raise ValueError(f"offsets must start at 0 and end at the token count {total}, "
                         f"got {values[0].item()}..{values[-1].item()}")
    if bool((values[1:] < values[:-1]).any()):
        raise ValueError(f"offsets must be non-decreasing, got {values.tolist()}")
    if bool((values % kScaleBlock != 0).any()):
        raise ValueError(f"offsets must be multiples of {kScaleBlock} (pad each expert's tokens), "
                         f"got {values.tolist()}")
