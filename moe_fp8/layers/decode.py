"""``DecodeRunner``: the layer's step captured in CUDA graphs, one per batch size bucket, replayed
per batch: the masked layout for decode-sized buckets, the contiguous layout past them.

Capacity: ``M_max = dispatcher.max_tokens_per_expert(b)`` rows per expert for the largest
masked bucket b; one token picks an expert at most once, so no expert can receive more than b
rows from one rank: nothing overflows. Static state: the input ``x [max_tokens, H]``, ``num_valid`` (a device
scalar; tokens beyond it are routed to the skip sentinel), the layout buffers, the experts'
workspace and the output ``[max_tokens, H]``. A replay launches kernels only: no host sync,
no allocation, no compilation (kernels are compiled by the warm-up before the capture).

Batch sizes: one graph per size of ``batch_sizes`` (default: the powers of two below
``max_tokens``, and ``max_tokens``), each captured on the first rows of the same static buffers
with its own tile choices (the GEMMs' expected rows, the dispatch kernel by pair count); a batch
of n tokens replays the smallest that holds n. A 256-token graph replayed with one token ran
quantisation, gate, shared experts and combine over 256 rows and the routed GEMMs on tiles sized
for 64 rows per expert: 178 us against 156 for a one-token graph (H100, 2026-12-06). The graphs
run one at a time on the same buffers, so they share one memory pool. An expert-parallel layer
keeps one graph (every rank must replay the same exchange shapes).

Layouts: a bucket of at most ``kRunnerMaskedMaxRows`` expected rows per local expert (512 tokens
on 32 experts at top-8) takes the masked layout; a larger one the prefill's contiguous layout
(``MoE.forward_contiguous_static``: sized by its upper bound, no sync; its intermediates live in
the graphs' pool), so ``M_max`` covers only the largest masked bucket. A runner of 2048 tokens on
32 experts then holds masked buffers for 512 tokens instead of 2048 (E_loc x M_max rows of the
input, the SiLU output and the down output: ~0.4 GB at M_max = 512, ~1.6 GB at 2048).

Sharing across layers: the layout buffers and the experts' workspace (``E_loc x M_max`` rows of
the input in fp8, the SiLU output and the down output: ~197 MB per layer at DeepSeek-V3 widths,
32 experts, 256 tokens, ~264 MB where the unfused gate-up's output is needed too; four times
that at EP = 8 with 128 tokens per rank, where ``M_max = 8 x 128``) live only within one step.
A model's layers run one after another, so their runners can hold one set:
``layer_b.decode_runner(n, share_buffers_with=runner_a)``, which also captures b's graphs in a's
memory pool (the intermediates a step allocates: each graph's are dead when its capture ends, so
later captures reuse them). What each runner keeps to itself: its input and output rows and its
graphs. Runners that share must not run concurrently (two streams at once).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..gemm.jit.env import pdl_scope
from ..gemm.validate import debug_mode
from .experts import MaskedWorkspace
from . import layouts
from .layouts import MaskedBuffers
from .switches import switch_on, switch_up_to_rows

kWarmupSteps = 2  # eager steps on a side stream before capture (JIT compile, allocator warm-up)
# The decode graph captured with programmatic dependent launch (each kernel's prologue overlaps
# the previous kernel's tail). MOE_FP8_PDL over everything measured 1.08x on the decode graph at
# one token and 0.92x on the eager prefill (H100, 2026-12-05); this applies it to the decode
# graph alone: 195 -> 189 / 551 -> 548 / 592 -> 585 us at 1 / 32 / 128 tokens, prefill unchanged
# (H100, 2026-12-05, session 8). MOE_FP8_DECODE_PDL=0 leaves the decode graph to MOE_FP8_PDL.
kDecodePdlEnv = "MOE_FP8_DECODE_PDL"
kDecodePdlDefault = True
# The batch staged into the static input (rows copied, num_valid set) by one kernel instead of a
# copy and a fill: one stream operation fewer before each replay (permute.cuh stage_rows_kernel).
# On: measured together with the small dispatch (layers/permute.py), H100 2026-12-05, session 11.
kStageKernelEnv = "MOE_FP8_STAGE_KERNEL"
kStageKernelDefault = True
# Which layout a batch size's step takes. The masked layout is the decode step's (its GEMMs and
# dispatch tuned for a few rows per expert; buffers of E_loc x M_max rows, M_max = the batch for a
# local layer). Past 128 expected rows per expert the runner captures the eager prefill's
# contiguous layout instead (sized by its upper bound, no sync): T k + E_loc x 127 rows instead of
# E_loc x T. H100, session 33 (32 experts, 3 interleaved rounds, contiguous minus masked):
# +40 / +60 us at 384 / 512 tokens (96 / 128 rows); captured without PDL (below) -35 / +20 / -96 us
# at 768 / 1024 / 2048, where the masked buffers would be 0.6 / 0.8 / 1.6 GB.
# MOE_FP8_RUNNER_MASKED: 1 every size masked (the runner before session 33), 0 none.
kRunnerMaskedEnv = "MOE_FP8_RUNNER_MASKED"
kRunnerMaskedMaxRows = 128.0


def default_batch_sizes(max_tokens: int) -> tuple:
    """The powers of two below ``max_tokens``, then ``max_tokens``."""
    return tuple(1 << i for i in range(max_tokens.bit_length()) if (1 << i) < max_tokens) + (max_tokens,)


def _checked_batch_sizes(batch_sizes, max_tokens: int) -> tuple:
    """``batch_sizes`` sorted, without repeats, with ``max_tokens`` added; each a positive int
    at most ``max_tokens``."""
    try:
        sizes = list(batch_sizes)
    except TypeError:
        raise TypeError(f"batch_sizes must be a sequence of ints, got {type(batch_sizes).__name__}") from None
    for b in sizes:
        if isinstance(b, bool) or not isinstance(b, int) or not 0 < b <= max_tokens:
            raise ValueError(f"batch_sizes must hold ints in [1, max_tokens={max_tokens}], got {b!r}")
    return tuple(sorted(set(sizes) | {max_tokens}))


def masked_batch_sizes(moe, batch_sizes: Sequence[int]) -> tuple:
    """The sizes of ``batch_sizes`` whose step takes the masked layout (``kRunnerMaskedEnv``):
    all of them for an expert-parallel layer (its exchange is the masked one), else those of at
    most ``kRunnerMaskedMaxRows`` expected rows per local expert."""
    if moe._expert_parallel:
        return tuple(batch_sizes)
    expected = moe.dispatcher.expected_rows
    return tuple(b for b in batch_sizes
                 if switch_up_to_rows(kRunnerMaskedEnv, expected(b), kRunnerMaskedMaxRows))


def plan_batch_sizes(moe, max_tokens: int, batch_sizes) -> tuple:
    """-> ``(batch sizes, the masked ones among them, M_max)`` of a runner: ``M_max`` rows per
    expert hold the largest masked step (0: no masked step, no layout buffers)."""
    sizes = _checked_batch_sizes(default_batch_sizes(max_tokens) if batch_sizes is None
                                 else batch_sizes, max_tokens)
    if moe._expert_parallel:  # one size: every EP rank must replay the same exchange
        sizes = (max_tokens,)
    masked = masked_batch_sizes(moe, sizes)
    m_max = moe.dispatcher.max_tokens_per_expert(max(masked)) if masked else 0
    return sizes, masked, m_max


def _shareable(runner, experts: int, m_max: int, hidden: int, inter: int, device, dtype):
    """``runner``'s layout buffers and workspace, checked to be the ones this runner would
    allocate (same shapes, dtype, device); a TypeError / ValueError naming the argument else."""
    if not isinstance(runner, DecodeRunner):
        raise TypeError(f"share_buffers_with must be a DecodeRunner, got {type(runner).__name__}")
    if runner.m_max != m_max:
        raise ValueError(f"share_buffers_with: its masked steps hold {runner.m_max} rows per "
                         f"expert, this runner's {m_max} (same batch sizes and layouts needed)")
    if m_max == 0:
        return None, None
    want = {"buffers.a": (experts + 1, m_max, hidden), "workspace.act": (experts, m_max, inter),
            "workspace.y": (experts, m_max, hidden)}
    have = {"buffers.a": runner.buffers.a, "workspace.act": runner.workspace.act[0],
            "workspace.y": runner.workspace.y}
    for name, shape in want.items():
        if tuple(have[name].shape) != shape:
            raise ValueError(f"share_buffers_with: its {name} is {tuple(have[name].shape)}, this "
                             f"runner needs {shape} (same experts, widths and max tokens per expert)")
    if runner.workspace.y.dtype != dtype or runner.buffers.a.device != device:
        raise ValueError(f"share_buffers_with: its buffers are {runner.workspace.y.dtype} on "
                         f"{runner.buffers.a.device}, this runner needs {dtype} on {device}")
    return runner.buffers, runner.workspace


class DecodeRunner:
    def __init__(self, moe, max_tokens: int, *, use_graph: Optional[bool] = None,
                 batch_sizes: Optional[Sequence[int]] = None, share_buffers_with=None):
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
            raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
        self.moe, self.max_tokens = moe, max_tokens
        device, cfg, dispatcher = moe.device, moe.cfg, moe.dispatcher
        self.use_graph = device.type == "cuda" if use_graph is None else use_graph
        if self.use_graph and device.type != "cuda":
            raise ValueError("use_graph=True needs the layer on a CUDA device")
        if self.use_graph and debug_mode():
            raise RuntimeError("MOE_FP8_CHECKS=1 reads tensors back to the host, which a CUDA graph "
                               "cannot capture; unset it to build a decode runner")
        self.batch_sizes, self.masked_sizes, self.m_max = plan_batch_sizes(moe, max_tokens,
                                                                           batch_sizes)
        self.x = torch.zeros(max_tokens, cfg.hidden_size, dtype=moe.dtype, device=device)
        self.num_valid = torch.zeros((), dtype=torch.int64, device=device)
        if share_buffers_with is not None:
            self.buffers, self.workspace = _shareable(
                share_buffers_with, dispatcher.num_experts_local, self.m_max, cfg.hidden_size,
                cfg.moe_intermediate_size, device, moe.dtype)
        elif self.m_max:
            self.buffers = MaskedBuffers.allocate(dispatcher.num_experts_local, self.m_max,
                                                  cfg.hidden_size, device)
            self.workspace = MaskedWorkspace.allocate(dispatcher.num_experts_local, self.m_max,
                                                      cfg.hidden_size, cfg.moe_intermediate_size,
                                                      device, moe.dtype)
        else:  # every step contiguous: its buffers live in the graphs' pool
            self.buffers = self.workspace = None
        self.out = torch.zeros(max_tokens, cfg.hidden_size, dtype=moe.dtype, device=device)
        # the graphs' memory pool, shared with share_buffers_with's graphs: their steps never
        # overlap, and a contiguous bucket's intermediates (~0.5 GB at 2048 tokens) would
        # otherwise be held once per layer
        self.pool = None
        if self.use_graph:
            shared_pool = getattr(share_buffers_with, "pool", None)
            self.pool = shared_pool if shared_pool is not None else torch.cuda.graph_pool_handle()
        self.graphs = self._capture() if self.use_graph else {}
        self.graph = self.graphs.get(max_tokens)  # the full-size graph

    @property
    def buffer_bytes(self) -> int:
        """Bytes of the masked layout's buffers and the experts' workspace (what
        ``share_buffers_with`` lets several runners hold once)."""
        if self.buffers is None:
            return 0
        tensors = (self.buffers.a, self.buffers.sa, self.workspace.h, *self.workspace.act,
                   self.workspace.y)
        return sum(t.untyped_storage().nbytes() for t in tensors if t is not None)

    def batch_size_for(self, n: int) -> int:
        """The smallest captured batch size that holds ``n`` tokens."""
        return next(b for b in self.batch_sizes if b >= n)

    @torch.no_grad()
    def _step(self, batch: Optional[int] = None) -> None:
        """One step over the first ``batch`` rows of the static buffers (default: all)."""
        b = batch or self.max_tokens
        if b in self.masked_sizes:
            self.moe.forward_masked(self.x[:b], max_tokens_per_expert=self.m_max,
                                    num_valid_tokens=self.num_valid, buffers=self.buffers,
                                    workspace=self.workspace, out=self.out[:b])
        else:
            self.moe.forward_contiguous_static(self.x[:b], num_valid_tokens=self.num_valid,
                                               out=self.out[:b])

    def _capture(self) -> dict:
        graphs, pool = {}, self.pool
        side = torch.cuda.Stream()  # the warm-up steps' stream
        # unset: MOE_FP8_PDL decides, as for every other launch
        pdl = True if switch_on(kDecodePdlEnv, kDecodePdlDefault) else None
        # largest first: the pool's blocks are sized by the largest step
        for b in reversed(self.batch_sizes):
            self.num_valid.fill_(b)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(kWarmupSteps):
                    self._step(b)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # contiguous buckets: no PDL unless MOE_FP8_PDL asks. Under PDL the shared experts'
            # SiLU kernel was resident beside their gate-up GEMM, on the SMs left to the router
            # branch, whose split-K reduce then waited 57 us (session 33, H100, 1024 tokens)
            with pdl_scope(pdl if b in self.masked_sizes else None):
                with torch.cuda.graph(graph, pool=pool):
                    self._step(b)
            graphs[b] = graph
        return graphs

    def _stage(self, x: torch.Tensor) -> bool:
        """x's rows into the static input and n into num_valid with one kernel where the switch is
        on and the kernel applies (same dtype, contiguous, 16-byte aligned); else False."""
        if x.shape[0] == 0 or not switch_on(kStageKernelEnv, kStageKernelDefault) or \
                not layouts.fused_enabled(self.x):
            return False
        from ..gemm.kernels import permute as kernels
        if not (x.dtype == self.x.dtype and x.is_contiguous() and kernels.aligned16(x, self.x)
                and x.shape[1] * x.element_size() % kernels.kVectorBytes == 0):
            return False
        kernels.stage_rows(x, self.x, self.num_valid)
        return True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x [n, H]`` (n <= max_tokens) -> ``[n, H]``: a view of the static output buffer,
        overwritten by the next call (clone it to keep it)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.x.shape[1]:
            raise ValueError(f"x must be [n, {self.x.shape[1]}], got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise TypeError(f"x must be bf16, fp16 or fp32, got {x.dtype}")
        n = x.shape[0]
        if n > self.max_tokens:
            raise ValueError(f"batch of {n} tokens exceeds this runner's max_tokens={self.max_tokens}; "
                             "build a larger one with MoE.decode_runner(max_tokens)")
        if x.device != self.x.device:
            raise ValueError(f"x is on {x.device} but the runner's buffers are on {self.x.device}")
        if not self._stage(x):
            self.x[:n].copy_(x)
            self.num_valid.fill_(n)
        b = self.batch_size_for(n) if n else self.batch_sizes[0]
        if self.graph is not None:
            self.graphs[b].replay()
        else:
            self._step(b)
        return self.out[:n]


def attach_graph_runners(model, max_tokens: int, **runner_kwargs) -> list:
    """A graph runner of ``max_tokens`` for every one-GPU ``MoE`` in ``model`` (its modules, the
    module itself included), attached so that ``forward`` replays it for small inference batches
    (``MoE.attach_graph_runner``), the runners of layers with the same shapes sharing one set of
    step buffers. E.g. after ``replace_hf_moe(model)`` and moving the model to its GPU, a
    transformers ``generate`` loop (one eager forward per step) replays graphs. Returns the
    runners, in module order."""
    from .moe import MoE
    runners, first_of_shape = [], {}
    for module in model.modules():
        if not isinstance(module, MoE) or module._expert_parallel:
            continue
        cfg = module.cfg
        # what _shareable compares: layers alike in these hold one set of buffers
        m_max = plan_batch_sizes(module, max_tokens, runner_kwargs.get("batch_sizes"))[2]
        shape = (module.num_experts_local, m_max, cfg.hidden_size, cfg.moe_intermediate_size,
                 module.dtype, module.device)
        runner = module.decode_runner(max_tokens, share_buffers_with=first_of_shape.get(shape),
                                      **runner_kwargs)
        first_of_shape.setdefault(shape, runner)
        module.attach_graph_runner(runner)
        runners.append(runner)
    return runners
