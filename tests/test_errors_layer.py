"""The layer's error catalogue: MoE, MoEConfig (+ from_hf), Router, decode runner, checkpoint
loading, dispatchers and layout records. Each bad input must raise its error type with a
message naming the argument (tests/test_errors.py holds the GEMM/quant ops' catalogue).

Every case is a function of an ``Env`` (a tiny layer on one device), so the same table runs on
the CPU here and on CUDA tensors in the GPU section. Cases with ``bug=...`` document a missing
check: today the layer fails badly there (a cryptic error, or a silently wrong answer); they are
``xfail(strict=True)`` and name the one-line fix, so a fix turns them into failures to unmark.

GPU section (marker ``gpu``): the whole catalogue (ops + layer) runs on CUDA tensors in ONE
child process (``python tests/test_errors_layer.py --gpu-catalogue``), after which a correct
GEMM must still match its reference: no case may leave a sticky CUDA error behind.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple

import pytest
import torch

import moe_fp8.gemm as G
from moe_fp8.gemm import reference as ref
from moe_fp8.layers import MoE, MoEConfig, route
from moe_fp8.layers.dispatch import LocalDispatcher
from moe_fp8.layers.layouts import MaskedBuffers, MaskedLayout

kRepo = Path(__file__).resolve().parents[1]
FP8 = torch.float8_e4m3fn
kPrefix = "model.layers.3.mlp."


# ----------------------------------------------------------------------------- the environment

class Env:
    """A tiny layer (H 256, I 128, 8 experts in 4 groups, top-2, 1 shared) on ``device`` and a
    valid DeepSeek-V3-format FP8 checkpoint of it; ``elsewhere`` is a device the layer is not on."""

    def __init__(self, device: str):
        self.device = torch.device(device)
        self.elsewhere = torch.device("cpu" if self.device.type == "cuda" else "meta")
        self.cfg = MoEConfig.tiny(num_experts=8, n_group=4, topk_group=2, top_k=2)
        self.H = self.cfg.hidden_size
        self.moe = MoE(self.cfg, device=self.device, seed=0)
        self.dispatcher: LocalDispatcher = self.moe.dispatcher
        self._dir = tempfile.TemporaryDirectory(prefix="moe_fp8_errors_")
        self.tmp = Path(self._dir.name)
        self.base = self._checkpoint_tensors()
        self._written = 0

    def x(self, tokens: int = 4, hidden: Optional[int] = None, **kwargs) -> torch.Tensor:
        return torch.randn(tokens, hidden or self.H, device=kwargs.pop("device", self.device),
                           **kwargs)

    def routing(self, tokens: int = 4, value: Optional[int] = None):
        """(topk_idx int64 [T, k], topk_weights fp32 [T, k]) on the layer's device."""
        k = self.cfg.top_k
        if value is None:
            idx = torch.stack([torch.randperm(self.cfg.num_experts)[:k] for _ in range(tokens)])
        else:
            idx = torch.full((tokens, k), value, dtype=torch.int64)
        return idx.to(self.device), torch.rand(tokens, k, device=self.device)

    def _checkpoint_tensors(self) -> dict:
        """DeepSeek-V3 release names: per-expert e4m3 weights + 128x128 weight_scale_inv."""
        cfg, gen = self.cfg, torch.Generator().manual_seed(7)
        e, h, i, si = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.shared_intermediate_size
        r = lambda *shape: torch.randn(*shape, generator=gen) * 0.05  # noqa: E731
        out = {kPrefix + "gate.weight": r(e, h), kPrefix + "gate.e_score_correction_bias": r(e)}

        def fp8(name, rows, cols):
            q, s = G.per_block_quant_fp8(r(rows, cols))
            out[kPrefix + name + ".weight"], out[kPrefix + name + ".weight_scale_inv"] = q, s

        for j in range(e):
            fp8(f"experts.{j}.gate_proj", i, h)
            fp8(f"experts.{j}.up_proj", i, h)
            fp8(f"experts.{j}.down_proj", h, i)
        fp8("shared_experts.gate_proj", si, h)
        fp8("shared_experts.up_proj", si, h)
        fp8("shared_experts.down_proj", h, si)
        return out

    def checkpoint(self, drop=(), **replace) -> Path:
        """Write the base checkpoint with keys ``drop``ped and ``replace``d (names without the
        prefix; ``__`` stands for ``.`` in keyword names) into a fresh file; returns its path."""
        from safetensors.torch import save_file
        tensors = dict(self.base)
        for name in drop:
            del tensors[kPrefix + name]
        for name, value in replace.items():
            tensors[kPrefix + name.replace("__", ".")] = value
        self._written += 1
        path = self.tmp / f"ckpt{self._written}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        return path

    def load(self, drop=(), prefix: str = kPrefix, **replace):
        return self.moe.load_safetensors(self.checkpoint(drop, **replace), prefix=prefix)

    def fused_checkpoint(self, gate_up_shape) -> Path:
        """transformers-v5 fused names (bf16) with a ``gate_up_proj`` of shape ``gate_up_shape``."""
        from safetensors.torch import save_file
        cfg = self.cfg
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        tensors = {k: v for k, v in self.base.items() if ".experts." not in k}
        tensors[kPrefix + "experts.gate_up_proj"] = torch.randn(gate_up_shape).bfloat16()
        tensors[kPrefix + "experts.down_proj"] = torch.randn(e, h, i).bfloat16()
        path = self.tmp / "fused.safetensors"
        save_file(tensors, str(path))
        return path


def hf_config(**changes):
    """An object with DeepseekV3Config's attribute names (MoEConfig.from_hf reads only those)."""
    fields = dict(hidden_size=256, moe_intermediate_size=128, n_routed_experts=16,
                  num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                  norm_topk_prob=True, n_shared_experts=1, hidden_act="silu", topk_method="noaux_tc")
    fields.update(changes)
    return types.SimpleNamespace(**{k: v for k, v in fields.items() if v is not ...})


def tiny(**changes):
    return MoEConfig.tiny(**changes)


def runner(e: Env, max_tokens: int = 4):
    return e.moe.decode_runner(max_tokens)


def masked_handle(e: Env, m_max: int = 4):
    idx, w = e.routing()
    return e.dispatcher.dispatch_masked(e.x(), idx, w, max_tokens_per_expert=m_max)[1]


# ----------------------------------------------------------------------------- the catalogue

@dataclass(frozen=True)
class Case:
    id: str
    call: Callable[[Env], object]
    error: type | Tuple[type, ...]
    text: str  # the message must contain this (it names the argument)
    bug: Optional[str] = None  # a missing check: "what goes wrong today; the one-line fix"
    devices: Tuple[str, ...] = ("cpu", "cuda")
    device_assert: bool = False  # unchecked, this input hits a device-side assert on CUDA: while
    # it is a known bug the GPU section runs it in a process of its own
    value_check: bool = False  # the check reads tensor values: on CUDA only with MOE_FP8_CHECKS=1


CASES = [
    # --- MoE forward: x
    Case("moe-x-hidden", lambda e: e.moe(e.x(4, 384)), ValueError, "x must be [..., 256]"),
    Case("moe-x-int", lambda e: e.moe(torch.ones(4, e.H, dtype=torch.int32, device=e.device)), TypeError, "x must be bf16, fp16 or fp32"),
    Case("moe-x-fp8", lambda e: e.moe(e.x().to(FP8)), TypeError, "x must be bf16, fp16 or fp32"),
    Case("moe-x-float64", lambda e: e.moe(e.x(dtype=torch.float64)), TypeError, "x must be bf16, fp16 or fp32"),
    Case("moe-x-not-tensor", lambda e: e.moe([[0.0] * e.H]), TypeError, "x must be a torch.Tensor"),
    Case("moe-x-scalar", lambda e: e.moe(torch.tensor(1.0, device=e.device)), ValueError, "x must be [..., 256]"),
    Case("moe-x-device", lambda e: e.moe(e.x(device=e.elsewhere)), ValueError, "x is on"),
    Case("moe-masked-x-hidden", lambda e: e.moe.forward_masked(e.x(4, 128)), ValueError, "x must be [..., 256]"),
    Case("moe-dtype", lambda e: MoE(e.cfg, dtype=torch.float32, device=e.device), TypeError, "dtype must be torch.bfloat16"),
    Case("moe-dtype-fp16", lambda e: MoE(e.cfg, dtype=torch.float16, device=e.device), TypeError, "dtype must be torch.bfloat16"),
    Case("moe-ep-group-without-dist", lambda e: MoE(e.cfg, ep_group="not-a-group", device=e.device), RuntimeError, "needs torch.distributed initialised"),
    Case("moe-train-master-dtype", lambda e: MoE(e.cfg, device=e.device).enable_fp8_training(torch.float16), TypeError, "master_dtype must be"),
    Case("moe-sync-before-enable", lambda e: e.moe.sync_fp8_weights(), RuntimeError, "needs enable_fp8_training() first"),
    Case("moe-masked-overflow", lambda e: e.moe.forward_masked(e.x(6), max_tokens_per_expert=1), (ValueError, RuntimeError), "max_tokens_per_expert", value_check=True),
    # --- MoEConfig
    Case("cfg-hidden-not-128", lambda e: tiny(hidden_size=200), ValueError, "MoEConfig.hidden_size must be a positive multiple of 128"),
    Case("cfg-hidden-zero", lambda e: tiny(hidden_size=0), ValueError, "MoEConfig.hidden_size"),
    Case("cfg-inter-not-128", lambda e: tiny(moe_intermediate_size=192), ValueError, "MoEConfig.moe_intermediate_size must be a positive multiple of 128"),
    Case("cfg-experts-zero", lambda e: tiny(num_experts=0), ValueError, "MoEConfig.num_experts must be > 0"),
    Case("cfg-top-k-zero", lambda e: tiny(top_k=0), ValueError, "MoEConfig.top_k must be > 0"),
    Case("cfg-top-k-above-experts", lambda e: tiny(top_k=17), ValueError, "MoEConfig.top_k (17) exceeds"),
    Case("cfg-n-group-not-dividing", lambda e: tiny(n_group=3), ValueError, "must be a multiple of n_group (3)"),
    Case("cfg-topk-group-above-n-group", lambda e: tiny(topk_group=5), ValueError, "MoEConfig.topk_group (5) exceeds n_group (4)"),
    Case("cfg-one-expert-per-group", lambda e: tiny(n_group=16, topk_group=4), ValueError, ">= 2 experts per group"),
    Case("cfg-shared-negative", lambda e: tiny(n_shared_experts=-1), ValueError, "MoEConfig.n_shared_experts must be >= 0"),
    Case("cfg-group-fill", lambda e: tiny(group_mask_fill="nan"), ValueError, "MoEConfig.group_mask_fill must be one of"),
    Case("cfg-hidden-float", lambda e: tiny(hidden_size=256.0), TypeError, "MoEConfig.hidden_size"),
    Case("cfg-top-k-str", lambda e: tiny(top_k="4"), TypeError, "MoEConfig.top_k"),
    Case("cfg-scaling-nan", lambda e: tiny(routed_scaling_factor=float("nan")), ValueError, "routed_scaling_factor"),
    # --- MoEConfig.from_hf / MoE.from_hf
    Case("hf-act", lambda e: MoEConfig.from_hf(hf_config(hidden_act="gelu")), ValueError, "hf_config.hidden_act must be 'silu'"),
    Case("hf-topk-method", lambda e: MoEConfig.from_hf(hf_config(topk_method="greedy")), ValueError, "hf_config.topk_method must be 'noaux_tc'"),
    Case("hf-missing-field", lambda e: MoEConfig.from_hf(hf_config(n_routed_experts=...)), ValueError, "hf_config has no 'n_routed_experts'"),
    Case("hf-inter-not-128", lambda e: MoEConfig.from_hf(hf_config(moe_intermediate_size=1408 + 64)), ValueError, "moe_intermediate_size must be a positive multiple of 128"),
    Case("hf-module-type", lambda e: MoE.from_hf(torch.nn.Linear(4, 4)), TypeError, "module must be a transformers DeepseekV3MoE"),
    # --- Router / route
    Case("router-bias-update-shape", lambda e: e.moe.gate.update_bias(torch.ones(7, device=e.device)), ValueError, "tokens_per_expert must have shape (8,)"),
    Case("router-x-hidden", lambda e: e.moe.gate(e.x(4, 384)), ValueError, "x must be"),
    Case("route-logits-width", lambda e: route(torch.randn(4, 7, device=e.device), e.moe.gate.e_score_correction_bias, e.cfg), ValueError, "logits"),
    # --- decode runner
    Case("runner-max-tokens-zero", lambda e: e.moe.decode_runner(0), ValueError, "max_tokens must be a positive int"),
    Case("runner-max-tokens-bool", lambda e: e.moe.decode_runner(True), ValueError, "max_tokens must be a positive int"),
    Case("runner-max-tokens-float", lambda e: e.moe.decode_runner(4.0), ValueError, "max_tokens must be a positive int"),
    Case("runner-graph-on-cpu", lambda e: e.moe.decode_runner(4, use_graph=True), ValueError, "use_graph=True needs the layer on a CUDA device", devices=("cpu",)),
    Case("runner-over-capacity", lambda e: runner(e, 4)(e.x(5)), ValueError, "batch of 5 tokens exceeds this runner's max_tokens=4"),
    Case("runner-x-hidden", lambda e: runner(e)(e.x(2, 384)), ValueError, "x must be [n, 256]"),
    Case("runner-x-1d", lambda e: runner(e)(torch.randn(e.H, device=e.device)), ValueError, "x must be [n, 256]"),
    Case("runner-x-not-tensor", lambda e: runner(e)([[0.0] * e.H]), ValueError, "x must be [n, 256], got list"),
    Case("runner-x-device", lambda e: runner(e)(e.x(2, device=e.elsewhere)), ValueError, "x is on"),
    Case("runner-x-int", lambda e: runner(e)(torch.ones(2, e.H, dtype=torch.int64, device=e.device)), TypeError, "x must be"),
    # --- checkpoints
    Case("ckpt-file-missing", lambda e: e.moe.load_safetensors(e.tmp / "absent.safetensors"), FileNotFoundError, "absent.safetensors' does not exist"),
    Case("ckpt-empty-dir", lambda e: e.moe.load_safetensors(tempfile.mkdtemp(dir=e.tmp)), FileNotFoundError, "no .safetensors files in"),
    Case("ckpt-wrong-prefix", lambda e: e.load(prefix="model.layers.4.mlp."), KeyError, "'model.layers.4.mlp.gate.weight'"),
    Case("ckpt-missing-expert", lambda e: e.load(drop=["experts.7.down_proj.weight"]), KeyError, "experts.7.down_proj.weight'"),
    Case("ckpt-missing-scale", lambda e: e.load(drop=["experts.2.up_proj.weight_scale_inv"]), KeyError, "experts.2.up_proj.weight_scale_inv'"),
    Case("ckpt-hidden-mismatch", lambda e: e.load(gate__weight=torch.randn(8, 384)), ValueError, "gate.weight' has shape (8, 384), expected (8, 256)"),
    Case("ckpt-expert-count", lambda e: e.load(gate__weight=torch.randn(16, 256)), ValueError, "gate.weight' has shape (16, 256)"),
    Case("ckpt-bias-shape", lambda e: e.load(gate__e_score_correction_bias=torch.randn(7)), ValueError, "gate.e_score_correction_bias' has shape (7,)"),
    Case("ckpt-expert-shape", lambda e: e.load(experts__3__gate_proj__weight=torch.randn(256, 256).to(FP8)), ValueError, "experts.3.gate_proj.weight' has shape (256, 256), expected (128, 256)"),
    Case("ckpt-scale-shape", lambda e: e.load(experts__0__down_proj__weight_scale_inv=torch.ones(1, 1)), ValueError, "experts.0.down_proj.weight_scale_inv' has shape (1, 1)"),
    Case("ckpt-shared-shape", lambda e: e.load(shared_experts__down_proj__weight=torch.randn(256, 256).bfloat16()), ValueError, "shared_experts.down_proj.weight' has shape (256, 256)"),
    Case("ckpt-weight-dtype", lambda e: e.load(gate__weight=torch.ones(8, 256, dtype=torch.int32)), TypeError, "gate.weight' has dtype torch.int32"),
    Case("ckpt-scale-dtype", lambda e: e.load(experts__1__gate_proj__weight_scale_inv=torch.ones(1, 2).bfloat16()), TypeError, "experts.1.gate_proj.weight_scale_inv' has dtype torch.bfloat16"),
    Case("ckpt-fused-shape", lambda e: e.moe.load_safetensors(e.fused_checkpoint((8, 256, 384)), prefix=kPrefix), ValueError, "experts.gate_up_proj' has shape (8, 256, 384)"),
    Case("ckpt-not-safetensors", lambda e: e.moe.load_safetensors(garbage_file(e)), (ValueError, OSError), "garbage.safetensors"),
    # --- dispatchers (LocalDispatcher; torch_dist's factory)
    Case("disp-topk-shape", lambda e: e.dispatcher.dispatch_contiguous(e.x(), e.routing(4)[0][:, :1], e.routing(4)[1]), ValueError, "topk_idx and topk_weights must be [4, 2]"),
    Case("disp-weights-shape", lambda e: e.dispatcher.dispatch_contiguous(e.x(), e.routing(4)[0], e.routing(3)[1]), ValueError, "topk_idx and topk_weights must be [4, 2]"),
    Case("disp-topk-dtype", lambda e: e.dispatcher.dispatch_contiguous(e.x(), e.routing()[0].float(), e.routing()[1]), TypeError, "topk_idx must be int32/int64"),
    Case("disp-x-hidden", lambda e: e.dispatcher.dispatch_masked(e.x(4, 128), *e.routing(), max_tokens_per_expert=4), ValueError, "x_local must be [T, 256]"),
    Case("disp-x-3d", lambda e: e.dispatcher.dispatch_contiguous(e.x().unsqueeze(0), *e.routing()), ValueError, "x_local must be [T, 256]"),
    Case("disp-masked-out-shape", lambda e: e.dispatcher.dispatch_masked(e.x(), *e.routing(), max_tokens_per_expert=4, out=MaskedBuffers.allocate(8, 2, 256, e.device)), ValueError, "out.a must be [E_loc + 1, M_max, H]"),
    Case("disp-expert-offset", lambda e: LocalDispatcher(8, 256, 2, num_experts_local=4, expert_offset=5), ValueError, "expert_offset 5"),
    Case("disp-contiguous-rows", lambda e: LocalDispatcher(8, 256, 2, contiguous_rows="max"), ValueError, "contiguous_rows must be 'auto', 'exact' or 'upper_bound'"),
    Case("disp-ep-backend", lambda e: ep_factory()(e.cfg, None, backend="nccl"), ValueError, "backend must be one of"),
    Case("disp-ep-backend-env", lambda e: with_env(MOE_FP8_EP_BACKEND="mpi")(lambda: ep_factory()(e.cfg, None)), ValueError, "MOE_FP8_EP_BACKEND must be 'torch' or 'deepep'"),
    Case("disp-topk-above-experts", lambda e: e.dispatcher.dispatch_contiguous(e.x(), *e.routing(value=8)), ValueError, "topk_idx", value_check=True),
    # -1 is the documented "no expert" id (DeepEP's masked slots); -2 is out of range
    Case("disp-topk-negative", lambda e: e.dispatcher.dispatch_masked(e.x(), *e.routing(value=-2), max_tokens_per_expert=4), ValueError, "topk_idx", value_check=True),
    Case("disp-pair-hidden", lambda e: e.dispatcher.dispatch_contiguous(G.per_token_group_quant_fp8(e.x(4, 128)), *e.routing()), ValueError, "x_local"),
    Case("disp-pair-dtype", lambda e: e.dispatcher.dispatch_contiguous((e.x().bfloat16(), torch.ones(4, 2, device=e.device)), *e.routing()), TypeError, "x_local"),
    Case("disp-m-max-zero", lambda e: e.dispatcher.dispatch_masked(e.x(), *e.routing(), max_tokens_per_expert=0), ValueError, "max_tokens_per_expert",
         device_assert=True),
    Case("disp-m-max-float", lambda e: e.dispatcher.dispatch_masked(e.x(), *e.routing(), max_tokens_per_expert=2.5), ValueError, "max_tokens_per_expert"),
    Case("disp-zero-local-experts", lambda e: LocalDispatcher(8, 256, 2, num_experts_local=0), ValueError, "num_experts_local"),
    Case("combine-contiguous-y-rows", lambda e: e.dispatcher.combine_contiguous(e.x(7).bfloat16(), e.dispatcher.dispatch_contiguous(e.x(), *e.routing())[1]), ValueError, "y_rows",
         device_assert=True),
    Case("combine-masked-y-rows", lambda e: e.dispatcher.combine_masked(torch.randn(8, 3, e.H, device=e.device).bfloat16(), masked_handle(e, 4)), ValueError, "y_rows", device_assert=True),
    # --- layout records
    Case("layout-expected-m", lambda e: masked_layout(e, expected_m=0), ValueError, "expected_m must be a positive host int"),
    Case("layout-masked-m-dtype", lambda e: masked_layout(e, masked_m=torch.zeros(2, dtype=torch.int64, device=e.device)), TypeError, "masked_m must have dtype torch.int32"),
]


def garbage_file(e: Env) -> Path:
    path = e.tmp / "garbage.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}....")
    return path


def ep_factory():
    from moe_fp8.layers.dispatch import torch_dist
    return torch_dist.make_dispatcher


def with_env(**values):
    """``with_env(NAME=value)(fn)`` runs fn with the environment variables set, then restores them."""
    from kernel_checks import env_vars

    def run(fn):
        with env_vars(**values):
            return fn()
    return run


def masked_layout(e: Env, expected_m: int = 1, masked_m=None) -> MaskedLayout:
    experts, m_max = 2, 4
    a = torch.zeros(experts, m_max, e.H, dtype=FP8, device=e.device)
    sa = torch.ones(experts, m_max, e.H // 128, device=e.device)
    rows = torch.full((experts, m_max), -1, dtype=torch.int64, device=e.device)
    if masked_m is None:
        masked_m = torch.zeros(experts, dtype=torch.int32, device=e.device)
    return MaskedLayout(a, sa, masked_m, expected_m, rows, rows.clone(),
                        torch.zeros((), dtype=torch.int64, device=e.device))


# ----------------------------------------------------------------------------- CPU tests

@functools.lru_cache(maxsize=None)
def cpu_env() -> Env:
    return Env("cpu")


def _params():
    for case in CASES:
        if "cpu" not in case.devices:
            continue
        marks = [pytest.mark.xfail(strict=True, reason=case.bug)] if case.bug else []
        yield pytest.param(case, id=case.id, marks=marks)


def check_case(case: Case, env: Env) -> None:
    with pytest.raises(case.error) as info:
        case.call(env)
    message = str(info.value)
    assert case.text in message, f"{case.id}: message {message!r} does not say {case.text!r}"


@pytest.mark.parametrize("case", list(_params()))
def test_bad_layer_input_is_rejected(case):
    check_case(case, cpu_env())


def test_the_environment_itself_is_valid():
    """Positive controls: the unmodified checkpoint loads, and the layer, the runner and the
    dispatcher accept well-formed inputs (so every case above fails for its own reason)."""
    e = cpu_env()
    e.load()
    assert torch.equal(e.moe.gate.weight, e.base[kPrefix + "gate.weight"])
    with torch.no_grad():
        y = e.moe(e.x(5))
        assert y.shape == (5, e.H) and bool(torch.isfinite(y).all())
        assert runner(e)(e.x(3)).shape == (3, e.H)
        layout, handle = e.dispatcher.dispatch_masked(e.x(), *e.routing(), max_tokens_per_expert=4)
        assert int(layout.num_overflow) == 0
    assert MoEConfig.from_hf(hf_config()).num_experts == 16


def test_catalogue_size():
    """>= 25 layer cases beyond the ops' catalogue, >= 40 in all (known bugs not counted)."""
    from test_errors import CASES as OP_CASES
    layer_ok = [c for c in CASES if not c.bug]
    assert len(layer_ok) >= 25
    assert len(OP_CASES) + len(layer_ok) >= 40


def test_empty_batch_with_grad():
    e = cpu_env()
    y = e.moe(e.x(0))
    assert y.shape == (0, e.H)


def test_empty_batch_without_grad():
    e = cpu_env()
    with torch.no_grad():
        assert e.moe(e.x(0)).shape == (0, e.H)
        assert runner(e)(e.x(0)).shape == (0, e.H)


# ----------------------------------------------------------------------------- GPU section

kCpuOnlyOpCases = {"gemm-kernel-on-cpu"}  # backend="kernel" is legal on a Hopper GPU


def _load_op_catalogue_on_cuda():
    """tests/test_errors.py re-imported with CUDA as the default device (its module-level
    tensors and the tensors its lambdas build land on the GPU); stray CPU globals are moved."""
    spec = importlib.util.spec_from_file_location("test_errors_on_cuda", kRepo / "tests" / "test_errors.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name, value in list(vars(module).items()):
        if isinstance(value, torch.Tensor) and value.device.type == "cpu":
            setattr(module, name, value.cuda())
        elif isinstance(value, tuple) and value and all(isinstance(v, torch.Tensor) for v in value):
            setattr(module, name, tuple(v.cuda() for v in value))
    return module.CASES


def _outcome(call) -> dict:
    try:
        call()
    except Exception as error:  # noqa: BLE001 - the catalogue records whatever comes out
        return {"raised": type(error).__name__, "message": str(error)[:300],
                "types": [t.__name__ for t in type(error).__mro__]}
    return {"raised": None, "message": "", "types": []}


def _matches(outcome: dict, error, text: str) -> bool:
    errors = error if isinstance(error, tuple) else (error,)
    return (outcome["raised"] is not None and any(e.__name__ in outcome["types"] for e in errors)
            and text in outcome["message"])


def _sticky_error_check() -> dict:
    """Synchronise, then a correct dense GEMM through the kernel must match the unquantised product."""
    try:
        torch.cuda.synchronize()
        gen = torch.Generator(device="cuda").manual_seed(5)
        x = torch.randn(256, 512, device="cuda", generator=gen)
        w = torch.randn(384, 512, device="cuda", generator=gen)
        out = G.fp8_gemm_nt(G.per_token_group_quant_fp8(x), G.per_block_quant_fp8(w), backend="kernel")
        diff = G.calc_diff(out.float(), x @ w.t())
        torch.cuda.synchronize()
        return {"ok": diff < 1e-3, "calc_diff": diff, "error": ""}
    except Exception as error:  # noqa: BLE001
        return {"ok": False, "calc_diff": None, "error": f"{type(error).__name__}: {str(error)[:300]}"}


def gpu_catalogue(include_bugs: bool, only: Optional[str] = None) -> dict:
    """Run the catalogue on CUDA in this process. Ops with MOE_FP8_CHECKS=1 (their value checks
    are debug-mode only on the GPU), then the layer (checks off: a decode graph refuses them)."""
    results = {"ops": [], "layer": [], "bugs": []}
    if only is None:
        os.environ["MOE_FP8_CHECKS"] = "1"
        torch.set_default_device("cuda")
        try:
            op_cases = _load_op_catalogue_on_cuda()
            for case_id, call, error, text in op_cases:
                outcome = _outcome(call)
                outcome.update(id=case_id, ok=_matches(outcome, error, text) or case_id in kCpuOnlyOpCases)
                results["ops"].append(outcome)
        finally:
            torch.set_default_device(None)
            os.environ.pop("MOE_FP8_CHECKS", None)
        results["after_ops"] = _sticky_error_check()
    env = Env("cuda")
    for case in CASES:
        if "cuda" not in case.devices or (only is not None and case.id != only):
            continue
        if only is None and ((case.device_assert and case.bug) or (case.bug and not include_bugs)):
            continue
        if case.value_check:  # as on the CPU, where value checks always run
            outcome = _outcome(lambda: with_env(MOE_FP8_CHECKS="1")(lambda: case.call(env)))
        else:
            outcome = _outcome(lambda: case.call(env))
        outcome.update(id=case.id, ok=_matches(outcome, case.error, case.text))
        results["bugs" if case.bug else "layer"].append(outcome)
    results["final"] = _sticky_error_check()
    return results


def _run_child(*args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(kRepo), os.environ.get("PYTHONPATH")])))
    env.pop("MOE_FP8_CHECKS", None)
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], env=env,
                          capture_output=True, text=True, timeout=540)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, f"child exited {done.returncode} without a result:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return json.loads(lines[-1])


@pytest.mark.gpu
def test_gpu_catalogue_in_one_process_leaves_no_sticky_error():
    results = _run_child("--gpu-catalogue")
    bad = [r for r in results["ops"] + results["layer"] if not r["ok"]]
    assert not bad, "cases not rejected as on the CPU:\n" + "\n".join(map(json.dumps, bad))
    assert len(results["ops"]) >= 40 and len(results["layer"]) >= 25
    for stage in ("after_ops", "final"):
        assert results[stage]["ok"], f"{stage}: {results[stage]}"
    # the known-bug cases ran too (their outcome is the CPU xfails' business): none may leave a
    # CUDA error behind, which the final GEMM above proves


def _device_assert_params():
    for case in CASES:
        if case.device_assert:  # fixed ones pass here too (and run in the one-process catalogue)
            marks = [pytest.mark.xfail(strict=True, reason=case.bug)] if case.bug else []
            yield pytest.param(case.id, id=case.id, marks=marks)


@pytest.mark.gpu
@pytest.mark.parametrize("case_id", list(_device_assert_params()))
def test_gpu_device_assert_case_isolated(case_id):
    """Cases predicted to hit a device-side assert on CUDA, each in its own process: the right
    ValueError, and a healthy context afterwards."""
    results = _run_child("--gpu-catalogue", "--only", case_id)
    (outcome,) = results["bugs"] + results["layer"]
    assert outcome["ok"], outcome
    assert results["final"]["ok"], results["final"]


def main(argv) -> int:
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu-catalogue", action="store_true", help="run the catalogue on CUDA, print JSON")
    parser.add_argument("--only", help="one layer case id (run alone, device-assert cases included)")
    parser.add_argument("--no-bugs", action="store_true", help="skip the known-bug cases")
    args = parser.parse_args(argv)
    if not args.gpu_catalogue:
        parser.print_help()
        return 2
    sys.path.insert(0, str(kRepo / "tests"))
    results = gpu_catalogue(include_bugs=not args.no_bugs, only=args.only)
    for group in ("ops", "layer", "bugs"):
        for r in results[group]:
            print(f"{group:5s} {'ok ' if r['ok'] else 'BAD'} {r['id']:32s} {r['raised']}: {r['message'][:100]}",
                  file=sys.stderr)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


# ----------------------------------------------------------------------------- dtypes accepted

def _quant_case(op: str, dtype: torch.dtype):
    gen = torch.Generator(device="cuda").manual_seed(3)
    if op == "silu":
        h = (torch.randn(6, 512, device="cuda", generator=gen) * 3).to(dtype)
        q, s = G.silu_and_mul_quant_fp8(h)
        gate, up = h.float().chunk(2, dim=-1)
        expected = ref.per_token_group_quant((torch.nn.functional.silu(gate) * up).cpu())
    elif op == "per_token":
        x = (torch.randn(6, 512, device="cuda", generator=gen) * 3).to(dtype)
        q, s = G.per_token_group_quant_fp8(x)
        expected = ref.per_token_group_quant(x.cpu())
    else:
        w = (torch.randn(200, 256, device="cuda", generator=gen) * 3).to(dtype)
        q, s = G.per_block_quant_fp8(w)
        expected = ref.per_block_quant(w.cpu())
    return q, s, expected




def _dtype_params():
    for op in ("per_token", "per_block", "silu"):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            yield pytest.param(op, dtype, id=f"{op}-{str(dtype)[6:]}", marks=pytest.mark.gpu)


@pytest.mark.parametrize("op,dtype", list(_dtype_params()))
def test_gpu_quant_accepts_every_dtype_it_validates(op, dtype):
    """Every dtype the public op accepts must either match the reference bit for bit on the
    kernel path or be refused with a TypeError naming the argument — never a wrong answer."""
    try:
        q, s, (eq, es) = _quant_case(op, dtype)
    except TypeError as error:
        assert any(name in str(error) for name in ("x ", "w ", "h ")), str(error)
        return
    torch.cuda.synchronize()
    assert torch.equal(q.cpu().view(torch.uint8), eq.view(torch.uint8)), f"{op} {dtype}: fp8 values differ"
    assert torch.equal(s.cpu().contiguous(), es.contiguous()), f"{op} {dtype}: scales differ"
