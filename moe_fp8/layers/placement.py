"""Expert placement: which rank of an expert-parallel (EP) group holds which global expert.

One rule, used by every EP dispatcher, the tests and the examples: **contiguous blocks**.
With ``num_experts_global = E`` and ``ep_size = R`` (E % R == 0), rank ``r`` holds
``num_experts_local = E / R`` experts, the global ids ``r * E_loc .. (r + 1) * E_loc - 1``;
local id ``l`` on rank ``r`` is global id ``r * E_loc + l``. So

    expert_rank(g)  = g // E_loc          (the rank that computes global expert g)
    local_id(g)     = g %  E_loc          (its index in that rank's weight stack)

Contiguous blocks keep a rank's weights one slice ``[expert_offset : expert_offset + E_loc]`` of
the global stacks (checkpoint loading slices once) and make the per-rank count a reshape
``[R, E_loc]`` of the per-expert count. DeepEP assumes the same placement.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertPlacement:
    num_experts_global: int  # E: routed experts of the model
    ep_size: int  # R: ranks in the EP group
    ep_rank: int  # this rank, 0 .. R - 1

    def __post_init__(self) -> None:
        for name in ("num_experts_global", "ep_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.num_experts_global % self.ep_size:
            raise ValueError(f"num_experts_global ({self.num_experts_global}) must be a multiple of "
                             f"the EP group size ({self.ep_size}): experts are placed in equal blocks")
        if not 0 <= self.ep_rank < self.ep_size:
            raise ValueError(f"ep_rank must be in [0, {self.ep_size}), got {self.ep_rank}")

    @classmethod
    def from_group(cls, num_experts_global: int, ep_group) -> "ExpertPlacement":
        """The placement of this process in ``ep_group`` (a torch.distributed process group)."""
        import torch.distributed as dist
        return cls(num_experts_global, dist.get_world_size(ep_group), dist.get_rank(ep_group))

    @property
    def num_experts_local(self) -> int:
        return self.num_experts_global // self.ep_size

    @property
    def expert_offset(self) -> int:
        """Global id of this rank's local expert 0."""
        return self.ep_rank * self.num_experts_local

    @property
    def local_slice(self) -> slice:
        """This rank's experts as a slice of a global ``[E, ...]`` weight stack."""
        return slice(self.expert_offset, self.expert_offset + self.num_experts_local)

    def experts_of(self, rank: int) -> range:
        """Global ids held by ``rank``."""
        return range(rank * self.num_experts_local, (rank + 1) * self.num_experts_local)

    def expert_rank(self, topk_idx_global: torch.Tensor) -> torch.Tensor:
        """Global ids (any shape, any int dtype) -> int64 rank holding each; ids outside
        ``[0, E)`` (DeepEP's ``-1`` = no expert) map to ``ep_size`` (no rank)."""
        ids = topk_idx_global.long()
        valid = (ids >= 0) & (ids < self.num_experts_global)
        return torch.where(valid, ids // self.num_experts_local, self.ep_size)

    def to_local(self, topk_idx_global: torch.Tensor, sentinel: int | None = None) -> torch.Tensor:
        """Global ids -> this rank's local ids (int64); ids of other ranks' experts (and invalid
        ids) become ``sentinel`` (default ``num_experts_local``, the layouts' skip id)."""
        experts = self.num_experts_local
        local = torch.sub(topk_idx_global, self.expert_offset,
                          out=torch.empty(topk_idx_global.shape, dtype=torch.int64,
                                          device=topk_idx_global.device))
        if sentinel is None or sentinel == experts:  # three elementwise kernels, not six
            return local.clamp_(-1, experts).remainder_(experts + 1)  # < 0 and >= E_loc -> E_loc
        return torch.where((local >= 0) & (local < experts), local, sentinel)

    def shard(self, global_stack: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global per-expert tensor ``[E, ...]`` (a view)."""
        if global_stack.shape[0] != self.num_experts_global:
            raise ValueError(f"global_stack must have {self.num_experts_global} experts on dim 0, "
                             f"got shape {tuple(global_stack.shape)}")
        return global_stack[self.local_slice]
