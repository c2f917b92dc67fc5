"""Memory layouts shared by the quantisation ops, the GEMMs and the MoE layer.

Scale layouts (all fp32, "dequantise = fp8 value x scale"):

* activation scales, one per row per 128 channels: logical ``[M, K/128]``, stored
  **MN-major** (``stride == (1, M_pad)``, ``M_pad = align(M, 4)``) so that a TMA box of
  ``BLOCK_M`` scales is one contiguous 16-byte-aligned run. Batched over experts (masked
  layout): logical ``[E, M_max, K/128]``, strides ``(K/128 * M_pad, 1, M_pad)``.
* weight scales, one per 128x128 block: ``[ceil(N/128), K/128]`` (``[E, ...]`` for experts),
  contiguous.

Contiguous (grouped) layout: rows of every expert form one segment padded to a multiple of
128 rows; ``m_indices[row]`` is the row's expert, ``-1`` for padding rows.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

kScaleBlock = 128  # channels per activation scale, rows/cols per weight-scale block
kSegmentAlign = 128  # rows: every expert segment of the contiguous layout is padded to this
kScaleRowAlign = 4  # fp32 elements: TMA needs 16-byte strides


def ceil_div(x: int, y: int) -> int:
    return (x + y - 1) // y


def align(x: int, y: int) -> int:
    return ceil_div(x, y) * y


def empty_act_scales(m: int, groups: int, batch: Optional[int] = None, *,
                     device=None) -> torch.Tensor:
    """Uninitialised MN-major activation scales: ``[m, groups]`` or ``[batch, m, groups]`` fp32."""
    m_pad = align(max(m, 1), kScaleRowAlign)
    # NOTE: where no padding row exists, one op instead of three (empty, transpose, slice):
    # 11.5 -> 2.7 us of host time on the CPU machine; a few per forward of the layer
    if m == m_pad:
        if batch is None:
            return torch.empty_strided((m, groups), (1, m_pad), dtype=torch.float32, device=device)
        return torch.empty_strided((batch, m, groups), (groups * m_pad, 1, m_pad),
                                   dtype=torch.float32, device=device)
    if batch is None:  # the storage keeps the padding rows of the last group too
        return torch.empty(groups, m_pad, dtype=torch.float32, device=device).t()[:m]
    storage = torch.empty(batch, groups, m_pad, dtype=torch.float32, device=device)
    return storage.transpose(1, 2)[:, :m]


def is_mn_major(s: torch.Tensor) -> bool:
    """True when ``s`` (``[.., M, G]``) has the layout ``empty_act_scales`` produces."""
    if s.dim() not in (2, 3):
        return False
    m, g = s.shape[-2], s.shape[-1]
    m_pad = align(max(m, 1), kScaleRowAlign)
    if g > 1 and s.stride(-1) != m_pad:
        return False
    if m > 1 and s.stride(-2) != 1:
        return False
    if s.dim() == 3 and s.shape[0] > 1 and s.stride(0) != g * m_pad:
        return False
    return True


def to_mn_major(s: torch.Tensor) -> torch.Tensor:
    """Copy activation scales into the MN-major layout (a no-op when they already are)."""
    if is_mn_major(s):
        return s
    batch = s.shape[0] if s.dim() == 3 else None
    out = empty_act_scales(s.shape[-2], s.shape[-1], batch, device=s.device)
    out.copy_(s)
    return out


def aligned_segment_sizes(counts: torch.Tensor, alignment: int = kSegmentAlign) -> torch.Tensor:
    """Per-expert token counts -> per-expert segment sizes padded to ``alignment`` rows."""
    return (counts + alignment - 1) // alignment * alignment


def build_m_indices(counts: Sequence[int] | torch.Tensor,
                    alignment: int = kSegmentAlign, *, device=None) -> torch.Tensor:
    """The contiguous layout's ``m_indices`` for experts holding ``counts[e]`` rows each.

    Expert ``e``'s rows come first in its segment, then ``-1`` padding up to ``alignment``.
    Returns int32 ``[sum(align(counts))]``. Host-side helper (reads ``counts``).
    """
    # built on the CPU whatever torch's default device is, then moved
    counts = torch.as_tensor(counts, dtype=torch.int64, device="cpu")
    sizes = aligned_segment_sizes(counts, alignment)
    total = int(sizes.sum())
    experts = torch.arange(len(counts), dtype=torch.int32, device="cpu")
    seg_ids = torch.repeat_interleave(experts, sizes)  # [total] expert of each row's segment
    seg_start = torch.repeat_interleave(torch.cumsum(sizes, 0) - sizes, sizes)
    row_in_seg = torch.arange(total, device="cpu") - seg_start
    valid = row_in_seg < torch.repeat_interleave(counts, sizes)
    m_indices = torch.where(valid, seg_ids, torch.full_like(seg_ids, -1))
    return m_indices.to(device) if device is not None else m_indices


def segment_offsets(counts: Sequence[int] | torch.Tensor,
                    alignment: int = kSegmentAlign) -> torch.Tensor:
    """Cumulative starts of the aligned segments: int32 ``[E + 1]`` (``[0, s0, s0+s1, ...]``)."""
    device = counts.device if isinstance(counts, torch.Tensor) else "cpu"  # a list: host-side
    counts = torch.as_tensor(counts, dtype=torch.int64, device=device)
    sizes = aligned_segment_sizes(counts, alignment)
    return torch.cat([sizes.new_zeros(1), torch.cumsum(sizes, 0)]).to(torch.int32)
