"""Weights in and out of ``MoE``: safetensors checkpoints, transformers modules, model surgery.

Names accepted under ``prefix`` (e.g. ``"model.layers.3.mlp."``):

* router: ``gate.weight`` ``[E, H]``, ``gate.e_score_correction_bias`` ``[E]``.
* routed experts, DeepSeek-V3 per-expert names (global expert id j):
  ``experts.{j}.{gate,up,down}_proj.weight`` — fp8 e4m3 with ``...weight_scale_inv`` fp32 (or
  e8m0) ``[ceil(out/128), ceil(in/128)]``, or bf16/fp16/fp32 (quantised here).
* routed experts, transformers v5 fused names: ``experts.gate_up_proj`` ``[E, 2I, H]`` (gate rows
  first) and ``experts.down_proj`` ``[E, H, I]``; fp8 ones with ``..._scale_inv``
  ``[E, 2I/128, H/128]`` / ``[E, ceil(H/128), I/128]``.
* shared experts: ``shared_experts.{gate,up,down}_proj.weight`` (+ ``weight_scale_inv``).

Only this rank's experts are read (``expert_offset .. + E_loc``). Reads are lazy (``safe_open``,
one tensor or one slice at a time; never a whole file). A missing tensor raises ``KeyError``
naming the key; a wrong shape ``ValueError`` and an unusable dtype ``TypeError``, both naming it.
"""
from __future__ import annotations

import contextlib
import os
from typing import Dict, Optional

import torch
from torch import nn

from .. import gemm as G
from .config import MoEConfig

FP8 = torch.float8_e4m3fn
kDenseDtypes = (torch.bfloat16, torch.float16, torch.float32)
kScaleDtypes = (torch.float32, getattr(torch, "float8_e8m0fnu", torch.float32))


# ----------------------------------------------------------------------------- tensor sources

class SafetensorsSource:
    """Tensors of one or more ``.safetensors`` files, opened lazily (headers only until read)."""

    def __init__(self, files):
        from safetensors import safe_open
        self._safe_open = safe_open
        paths = self._expand(files)
        if not paths:
            raise FileNotFoundError(f"no .safetensors files in {files!r}")
        self._stack = contextlib.ExitStack()
        self._where: Dict[str, object] = {}
        for path in paths:
            try:
                handle = self._stack.enter_context(safe_open(path, framework="pt"))
            except Exception as error:  # safetensors' own errors name no file
                self._stack.close()
                raise ValueError(f"{path}: not a readable safetensors file ({error})") from error
            for key in handle.keys():
                self._where[key] = handle

    @staticmethod
    def _expand(files) -> list:
        if isinstance(files, (str, os.PathLike)):
            files = [files]
        paths = []
        for f in files:
            f = os.fspath(f)
            if os.path.isdir(f):
                paths += sorted(os.path.join(f, n) for n in os.listdir(f) if n.endswith(".safetensors"))
            elif not os.path.exists(f):
                raise FileNotFoundError(f"checkpoint file {f!r} does not exist")
            else:
                paths.append(f)
        return paths

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple:
        return tuple(self._handle(key).get_slice(key).get_shape())

    def get(self, key: str, rows: Optional[slice] = None) -> torch.Tensor:
        """The tensor (or rows ``rows`` of its first dim, read without the rest)."""
        handle = self._handle(key)
        if rows is None:
            return handle.get_tensor(key)
        return handle.get_slice(key)[rows]

    def _handle(self, key: str):
        if key not in self._where:
            raise KeyError(f"checkpoint has no tensor {key!r}")
        return self._where[key]

    def close(self) -> None:
        self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class DictSource:
    """Tensors of a state dict (``module.state_dict()``), same interface as SafetensorsSource."""

    def __init__(self, tensors: Dict[str, torch.Tensor]):
        self._tensors = tensors

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def shape(self, key: str) -> tuple:
        return tuple(self._get(key).shape)

    def get(self, key: str, rows: Optional[slice] = None) -> torch.Tensor:
        t = self._get(key).detach()
        return t if rows is None else t[rows]

    def _get(self, key: str) -> torch.Tensor:
        if key not in self._tensors:
            raise KeyError(f"state dict has no tensor {key!r}")
        return self._tensors[key]


# ----------------------------------------------------------------------------- reading helpers

class _Reader:
    """Typed, shape-checked reads under a prefix; every error names the full key."""

    def __init__(self, source, prefix: str, device):
        self.source, self.prefix, self.device = source, prefix, device

    def key(self, name: str) -> str:
        return self.prefix + name

    def has(self, name: str) -> bool:
        return self.key(name) in self.source

    def tensor(self, name: str, shape: tuple, dtypes=None, rows: Optional[slice] = None) -> torch.Tensor:
        key = self.key(name)
        if key not in self.source:
            raise KeyError(f"checkpoint has no tensor {key!r} (prefix {self.prefix!r}); "
                           "check the prefix and the checkpoint format")
        full = self.source.shape(key)
        expected = shape if rows is None else (None, *shape[1:])
        if len(full) != len(shape) or any(e is not None and e != f for e, f in zip(expected, full)):
            raise ValueError(f"tensor {key!r} has shape {full}, expected {shape if rows is None else ('E', *shape[1:])}")
        t = self.source.get(key, rows)
        if rows is not None and tuple(t.shape) != tuple(shape):
            raise ValueError(f"tensor {key!r} has shape {full}: rows {rows.start}..{rows.stop} "
                             f"do not give {shape}")
        if dtypes is not None and t.dtype not in dtypes:
            raise TypeError(f"tensor {key!r} has dtype {t.dtype}, expected one of {list(dtypes)}")
        return t.to(self.device)

    def weight(self, name: str, shape: tuple, rows: Optional[slice] = None):
        """An fp8 weight with its ``{name}_scale_inv`` / ``weight_scale_inv`` -> (q, s fp32), or a
        dense one -> (dense, None)."""
        w = self.tensor(name, shape, (FP8, *kDenseDtypes), rows)
        if w.dtype != FP8:
            return w, None
        scale_name = (name[: -len("weight")] + "weight_scale_inv" if name.endswith("weight")
                      else name + "_scale_inv")
        blocks = (*shape[:-2], -(-shape[-2] // 128), -(-shape[-1] // 128))
        s = self.tensor(scale_name, blocks, kScaleDtypes, rows)
        return w, s.to(torch.float32)


def _quantized(w: torch.Tensor, s: Optional[torch.Tensor]):
    if s is not None:
        return w, s
    return G.per_block_quant_fp8(w.contiguous(), 128)


# ----------------------------------------------------------------------------- the loader

@torch.no_grad()
def load_moe_weights(moe, source, prefix: str = "") -> None:
    """Fill ``moe`` (router, local experts, shared experts) from ``source`` under ``prefix``."""
    cfg: MoEConfig = moe.cfg
    r = _Reader(source, prefix, moe.device)
    e, h = cfg.num_experts, cfg.hidden_size
    moe.gate.weight.copy_(r.tensor("gate.weight", (e, h), kDenseDtypes))
    moe.gate.e_score_correction_bias.copy_(r.tensor("gate.e_score_correction_bias", (e,), kDenseDtypes))
    moe.gate.refresh_bf16_gate_if_enabled()
    local = slice(moe.expert_offset, moe.expert_offset + moe.num_experts_local)
    if r.has("experts.gate_up_proj"):
        _load_fused_experts(moe, r, local)
    else:
        _load_per_expert(moe, r, local)
    if moe.shared_experts is not None:
        si = cfg.shared_intermediate_size
        gate = _quantized(*r.weight("shared_experts.gate_proj.weight", (si, h)))
        up = _quantized(*r.weight("shared_experts.up_proj.weight", (si, h)))
        down = _quantized(*r.weight("shared_experts.down_proj.weight", (h, si)))
        moe.shared_experts.load_fp8(torch.cat([gate[0], up[0]]), torch.cat([gate[1], up[1]]), *down)


def _load_fused_experts(moe, r: _Reader, local: slice) -> None:
    h, i = moe.cfg.hidden_size, moe.cfg.moe_intermediate_size
    for j in range(local.start, local.stop):  # one expert at a time: bounded temporary memory
        rows = slice(j, j + 1)
        w13, s13 = _quantized(*r.weight("experts.gate_up_proj", (1, 2 * i, h), rows))
        w2, s2 = _quantized(*r.weight("experts.down_proj", (1, h, i), rows))
        moe.experts.load_fp8(w13, s13, w2, s2, experts=slice(j - local.start, j - local.start + 1))


def _load_per_expert(moe, r: _Reader, local: slice) -> None:
    h, i = moe.cfg.hidden_size, moe.cfg.moe_intermediate_size
    for j in range(local.start, local.stop):
        gate = _quantized(*r.weight(f"experts.{j}.gate_proj.weight", (i, h)))
        up = _quantized(*r.weight(f"experts.{j}.up_proj.weight", (i, h)))
        down = _quantized(*r.weight(f"experts.{j}.down_proj.weight", (h, i)))
        w13 = torch.cat([gate[0], up[0]])[None]  # [1, 2I, H]: gate rows, then up rows
        s13 = torch.cat([gate[1], up[1]])[None]  # [1, 2I/128, H/128] (I % 128 == 0)
        moe.experts.load_fp8(w13, s13, down[0][None], down[1][None],
                             experts=slice(j - local.start, j - local.start + 1))


# ----------------------------------------------------------------------------- transformers

def _hf_moe_class_names() -> tuple:
    return ("DeepseekV3MoE",)


def is_hf_deepseek_moe(module: nn.Module) -> bool:
    return type(module).__name__ in _hf_moe_class_names()


def moe_from_hf(cls, module: nn.Module, *, device=None, dtype=torch.bfloat16, **cfg_changes):
    """``MoE`` built from a transformers ``DeepseekV3MoE`` (v5 fused experts or v4 per-expert MLPs)."""
    if not hasattr(module, "config") or not hasattr(module, "gate"):
        raise TypeError(f"module must be a transformers DeepseekV3MoE, got {type(module).__name__}")
    cfg = MoEConfig.from_hf(module.config, **cfg_changes)
    if device is None:
        device = module.gate.weight.device
    moe = cls(cfg, device=device, dtype=dtype, seed=None)
    load_moe_weights(moe, DictSource(dict(module.state_dict())), prefix="")
    return moe


def replace_hf_moe(model: nn.Module, *, dtype=torch.bfloat16, **cfg_changes) -> list:
    """Swap every ``DeepseekV3MoE`` inside ``model`` for an ``MoE`` with the same (quantised)
    weights, in place. Returns the replaced modules' names."""
    from .moe import MoE
    targets = [name for name, m in model.named_modules() if name and is_hf_deepseek_moe(m)]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, MoE.from_hf(getattr(parent, child), dtype=dtype, **cfg_changes))
    return targets
