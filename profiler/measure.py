"""Measured per-op costs: run the joint graph on real inputs and time every op.

The joint graph runs through an fx Interpreter on the real primals (so index
tensors hold real indices) and on output gradients shaped like the real ones.
Each distinct op signature (target, shapes, strides, dtypes, constants; see
:func:`profiler.workspace.op_signature`) is timed once, at its first
occurrence: warm-up, then ``repeats`` runs, median. CUDA uses events around
the op, CPU ``perf_counter`` (with whatever ``torch.set_num_threads`` says).
Workspace is measured per signature (:mod:`profiler.workspace`). An op whose
measurement fails falls back to the analytic model. Results go to a
:class:`~profiler.cache.ProfileCache`, so a later run measures nothing it
has seen. The RNG state is restored afterwards, and the joint graph is
functional, so profiling changes neither the model nor the random stream.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch.utils._python_dispatch import _disable_current_modes

from .analytic import NodeCost, analytic_costs, is_view_like
from .cache import ProfileCache, device_name
from .workspace import measure_workspace, op_signature

__all__ = ["measure_costs"]


def measure_costs(
    gm: fx.GraphModule,
    primals: Sequence[Any],
    device: str | torch.device = "cpu",
    *,
    repeats: int = 5,
    cache: ProfileCache | None = None,
) -> dict[str, NodeCost]:
    """Per-node measured time and workspace of the joint graph ``gm``.

    Args:
        gm: an AOTAutograd joint graph (placeholders: primals, then tangents).
        primals: the real values of the primal placeholders, in order.
        device: where the ops run.
        repeats: timed runs per distinct op signature (median taken).
        cache: where measurements are looked up and stored.
    """
    device = torch.device(device)
    cache = cache if cache is not None else ProfileCache(None)
    dev = device_name(device)
    analytic = analytic_costs(gm, device.type)
    with _disable_current_modes():
        workspace = measure_workspace(gm, device)
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        try:
            times = _TimingInterpreter(gm, dev, cache, repeats, device, workspace).time_all(primals)
        finally:
            torch.set_rng_state(rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, device)
    cache.save()
    costs = {}
    for node in gm.graph.nodes:
        fallback = analytic.get(node.name, NodeCost(0.0, 0))
        costs[node.name] = NodeCost(times.get(node.name, fallback.time_ms), workspace.get(node.name, 0))
    return costs


class _TimingInterpreter(fx.Interpreter):
    def __init__(
        self, gm: fx.GraphModule, dev: str, cache: ProfileCache, repeats: int, device: torch.device,
        workspace: dict[str, int],
    ):
        super().__init__(gm, garbage_collect_values=True)
        self.dev, self.cache, self.repeats, self.device = dev, cache, repeats, device
        self.workspace = workspace
        self.times: dict[str, float] = {}
        self._tangents: list[Any] = []

    def time_all(self, primals: Sequence[Any]) -> dict[str, float]:
        placeholders = [n for n in self.module.graph.nodes if n.op == "placeholder"]
        args = list(primals)
        for node in placeholders[len(primals):]:  # tangents: shaped like the real gradients
            val = node.meta.get("val")
            args.append(
                torch.ones(val.shape, dtype=val.dtype, device=self.device) if isinstance(val, torch.Tensor) else val
            )
        with torch.no_grad():
            self.run(*args)
        return self.times

    def run_node(self, n: fx.Node) -> Any:
        if n.op != "call_function" or is_view_like(n):
            return super().run_node(n)
        signature = repr(op_signature(n, self.device))
        cached = self.cache.get(self.dev, signature)
        if cached is not None:
            self.times[n.name] = cached[0]
            return super().run_node(n)
        result = super().run_node(n)  # warm-up, and the value downstream nodes read
        try:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            samples = [self._time_once(n, args, kwargs) for _ in range(self.repeats)]
            self.times[n.name] = statistics.median(samples)
            self.cache.put(self.dev, signature, self.times[n.name], self.workspace.get(n.name, 0))
        except Exception:
            pass  # falls back to the analytic time
        return result

    def _time_once(self, n: fx.Node, args: tuple, kwargs: dict) -> float:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            n.target(*args, **kwargs)
            end.record()
            torch.cuda.synchronize(self.device)
            return start.elapsed_time(end)
        started = time.perf_counter()
        n.target(*args, **kwargs)
        return (time.perf_counter() - started) * 1e3
