"""``OpCounter``: what a dispatcher call would cost on a GPU, counted on the CPU (the proxy that
``benchmarks/bench_ep.py --cpu`` reports and ``tests/test_ep.py`` asserts)."""
from __future__ import annotations

from typing import List

import torch


class OpCounter:
    """Context manager counting what a call would cost on a GPU, measurable on CPU (the proxy
    ``benchmarks/bench_ep.py --cpu`` reports and ``tests/test_ep.py`` asserts):

    * ``kernels``: ATen ops that compute (one or a few CUDA kernels each; views, allocations and
      metadata ops excluded) — ``torch.utils._python_dispatch.TorchDispatchMode``;
    * ``syncs``: host read-backs (``.tolist()``, ``.item()``, ``.cpu()``, ``bool(t)``, ``int(t)``,
      ...) and ops that read back inside on CUDA (``nonzero``, boolean-mask indexing, ``unique``,
      ``bincount``, ``repeat_interleave`` with tensor repeats) — ``TorchFunctionMode`` +
      the dispatch mode;
    * ``collectives`` and their bytes (c10d ops), ``bytes_written`` and ``elements_written`` by
      the compute ops (outputs; for scatters the values written: a gather of uint8 elements runs
      index arithmetic per byte on a GPU), and ``pre_xfer_kernels``: compute ops issued after the
      last read-back and before the last collective (serial host work on the critical path).

    A proxy, not a timing: a CUDA op may launch several kernels (``sort``), and the CPU's own
    cost per op differs from a GPU launch. While counting, value checks that run only for CPU
    tensors (``gemm.validate.value_checks_enabled``) are off, so CPU counts match a GPU run.
    """

    kNoKernel = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided",
                 "scalar_tensor",  # a Python scalar operand: a CPU 0-dim tensor, no CUDA kernel
                 "lift_fresh", "lift_fresh_copy", "detach", "alias", "_unsafe_view", "_local_scalar_dense",
                 "sym_size", "sym_stride", "sym_numel", "is_same_size", "resize_", "set_"}
    kSyncOps = {"nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_dim",
                "unique_consecutive", "bincount"}
    kReadBack = {"tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"}
    kScatterValues = {"index_put": 2, "index_put_": 2, "_index_put_impl_": 2, "scatter": 3, "scatter_": 3,
                      "scatter_add": 3, "scatter_add_": 3, "index_add": 3, "index_add_": 3,
                      "index_copy": 3, "index_copy_": 3, "scatter_reduce": 3, "scatter_reduce_": 3}

    def __init__(self):
        self.kernels = 0
        self.syncs = 0
        self.collectives = 0
        self.collective_bytes = 0
        self.bytes_written = 0
        self.elements_written = 0  # same, in elements: a uint8 gather moves 8x the elements of an int64 one
        self.ops: List[str] = []  # names in issue order (kernels, "SYNC:..", "COMM:..")
        self._events: List[tuple] = []  # (kind, bytes)

    def __enter__(self) -> "OpCounter":
        from torch.overrides import TorchFunctionMode
        from torch.utils._python_dispatch import TorchDispatchMode
        counter = self

        class _Function(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                name = getattr(func, "__name__", "")
                if name in OpCounter.kReadBack and args and isinstance(args[0], torch.Tensor):
                    counter._note("sync", name, 0)
                return func(*args, **(kwargs or {}))

        class _Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                counter._dispatched(func, args, kwargs, out)
                return out

        # count as a GPU run: value checks that run only for CPU tensors (Dispatcher.check_routing
        # reads the id range back) are off, as on a device without MOE_FP8_CHECKS=1
        from ...gemm import validate
        self._value_checks = validate.value_checks_enabled
        validate.value_checks_enabled = lambda *tensors: validate.debug_mode()
        self._modes = (_Function(), _Dispatch())
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        from ...gemm import validate
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        validate.value_checks_enabled = self._value_checks

    def _note(self, kind: str, name: str, nbytes: int, elements: int = 0) -> None:
        self._events.append((kind, nbytes))
        if kind == "kernel":
            self.kernels += 1
            self.bytes_written += nbytes
            self.elements_written += elements
            self.ops.append(name)
        elif kind == "sync":
            self.syncs += 1
            self.ops.append("SYNC:" + name)
        else:
            self.collectives += 1
            self.collective_bytes += nbytes
            self.ops.append("COMM:" + name)

    def _dispatched(self, func, args, kwargs, out) -> None:
        namespace = func.namespace
        name = func._schema.name.split("::")[-1]
        if namespace == "c10d":
            tensors = [a for a in args[:2] if isinstance(a, torch.Tensor)]
            if not tensors:  # list-of-tensors variants
                tensors = [t for a in args[:2] if isinstance(a, (list, tuple)) for t in a
                           if isinstance(t, torch.Tensor)]
            self._note("comm", name, sum(t.nbytes for t in tensors[-1:]))
            return
        if namespace != "aten" or func.is_view or name in self.kNoKernel:
            return
        # repeat_interleave with tensor repeats: some torch versions read the repeats back even
        # when output_size is given (range check); a boolean mask index runs nonzero
        sync = name in self.kSyncOps or (name == "repeat_interleave" and func._overloadname != "self_int") or \
            (name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                     for i in (args[1] if len(args) > 1 else ()) or ()))
        if sync:
            self._note("sync", name, 0)
        if name in self.kScatterValues and len(args) > self.kScatterValues[name]:
            values = args[self.kScatterValues[name]]
            if isinstance(values, (list, tuple)):
                values = values[0] if values else None
            written = [values] if isinstance(values, torch.Tensor) else []
        else:
            written = [t for t in (out if isinstance(out, (list, tuple)) else (out,))
                       if isinstance(t, torch.Tensor)]
        self._note("kernel", name, sum(t.nbytes for t in written), sum(t.numel() for t in written))

    @property
    def pre_xfer_kernels(self) -> int:
        """Compute ops issued after the last read-back and before the last collective (the
        payload): host work the transfer waits for."""
        comms = [i for i, (kind, _) in enumerate(self._events) if kind == "comm"]
        if not comms:
            return 0
        syncs = [i for i, (kind, _) in enumerate(self._events[:comms[-1]]) if kind == "sync"]
        start = syncs[-1] + 1 if syncs else 0
        return sum(1 for kind, _ in self._events[start:comms[-1]] if kind == "kernel")

    def summary(self) -> dict:
        return {"kernels": self.kernels, "syncs": self.syncs, "collectives": self.collectives,
                "pre_xfer_kernels": self.pre_xfer_kernels,
                "MB_written": round(self.bytes_written / 1e6, 2),
                "Melem_written": round(self.elements_written / 1e6, 2),
                "MB_comm": round(self.collective_bytes / 1e6, 2)}
