"""Dispatchers: one interface (``base.Dispatcher``), one backend per transport.

``local`` (one GPU, no communication) ships here; ``torch_dist`` (all-to-all over an EP process
group) and ``deepep`` plug in behind ``make_dispatcher`` with the same interface.
"""
from __future__ import annotations

import importlib

from .base import Dispatcher
from .local import LocalDispatcher, LocalHandle

__all__ = ["Dispatcher", "LocalDispatcher", "LocalHandle", "make_dispatcher"]


def make_dispatcher(cfg, ep_group=None) -> Dispatcher:
    """The dispatcher for ``cfg`` on ``ep_group`` (None: this GPU holds every expert).

    With a process group it defers to ``moe_fp8.layers.dispatch.torch_dist.make_dispatcher``
    (torch.distributed all-to-all, or DeepEP; experts placed in contiguous blocks per rank).
    """
    if ep_group is None:
        return LocalDispatcher(cfg.num_experts, cfg.hidden_size, cfg.top_k,
                               pow2_scale=cfg.pow2_scale)
    try:
        module = importlib.import_module(".torch_dist", __name__)
    except ImportError as error:
        raise NotImplementedError("expert parallelism needs moe_fp8.layers.dispatch.torch_dist, "
                                  f"which is not in this build ({error})") from error
    return module.make_dispatcher(cfg, ep_group)
