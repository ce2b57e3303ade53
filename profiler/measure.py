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

NOTE: [Calibrated per-op overhead] Ops timed one at a time miss part of what
the real step pays per op: the generated code's Python dispatch, views (not
timed, cost 0 here), and, on CPU, caches and allocator state that a repeated
isolated op finds warm and the real step finds cold. On a 4-layer GPT (about
560 ops) on one CPU thread the isolated times added up to about 10% under the
step (up to 20% in single runs). So after the per-op timings the whole joint
graph runs as generated fx code on the same inputs (one warm-up, then
``repeats`` runs, median); the difference to the sum of the per-op times,
clamped at 0 (noise can make the parts add up to more than the run), is
spread evenly over the ops the step dispatches (every ``call_function`` but
``getitem``, views included) and added to each: :func:`calibrate_overhead`.
``simulate`` then charges it once per executed op, recomputations included,
and predicts the no-remat step as the measured full run. The overhead is
stored in the profile cache under a fingerprint of the graph
(:func:`graph_key`), so a cache hit runs nothing. Spreading it evenly is a
simplification: on CPU most of the gap sits in the large kernels (cold
caches), so the term is exact for the total of the no-remat step and an
average for a single op. All timings run in the dispatcher state of the real
step (NOTE: [Profiling inside the partitioner]). Analytic mode
(:func:`profiler.analytic.analytic_costs`) has no such term.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import operator
import statistics
import time
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.fx as fx
from torch.utils._python_dispatch import _disable_current_modes

from .analytic import NodeCost, analytic_costs, is_view_like
from .cache import ProfileCache, device_name
from .workspace import OpMemory, measure_op_memory, op_signature

__all__ = ["calibrate_overhead", "graph_key", "measure_costs", "overhead_nodes"]


def measure_costs(
    gm: fx.GraphModule,
    primals: Sequence[Any],
    device: str | torch.device = "cpu",
    *,
    repeats: int = 5,
    cache: ProfileCache | None = None,
    calibrate: bool = True,
) -> dict[str, NodeCost]:
    """Per-node measured time and workspace of the joint graph ``gm``.

    Args:
        gm: an AOTAutograd joint graph (placeholders: primals, then tangents).
        primals: the real values of the primal placeholders, in order.
        device: where the ops run.
        repeats: timed runs per distinct op signature (median taken), and
            timed runs of the whole graph for the overhead.
        cache: where measurements are looked up and stored.
        calibrate: add the calibrated per-op overhead (see NOTE: [Calibrated
            per-op overhead]) to every node of :func:`overhead_nodes`. Skipped
            when no op could be timed (the costs are then the analytic ones).
    """
    device = torch.device(device)
    cache = cache if cache is not None else ProfileCache(None)
    dev = device_name(device)
    analytic = analytic_costs(gm, device.type)
    with _disable_current_modes():
        memory = measure_op_memory(gm, device)
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        try:
            args = _graph_inputs(gm, primals, device)
            with _eager_dispatch():
                times = _TimingInterpreter(gm, dev, cache, repeats, device, memory).time_all(args)
            costs = {}
            for node in gm.graph.nodes:
                fallback = analytic.get(node.name, NodeCost(0.0, 0))
                measured = memory.get(node.name, OpMemory(0))
                costs[node.name] = NodeCost(
                    times.get(node.name, fallback.time_ms), measured.workspace_bytes, measured.output_bytes
                )
            overhead = 0.0
            if calibrate and times:
                key = graph_key(gm, device)
                cached = cache.get_overhead(dev, key)
                if cached is None:
                    try:
                        overhead = calibrate_overhead(gm, args, costs, device, repeats=repeats)
                        cache.put_overhead(dev, key, overhead)
                    except Exception:
                        overhead = 0.0  # the graph did not run as code: no overhead term, nothing stored
                else:
                    overhead = cached
            del args
        finally:
            torch.set_rng_state(rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, device)
    cache.save()
    if overhead > 0:
        for node in overhead_nodes(gm):
            cost = costs[node.name]
            costs[node.name] = dataclasses.replace(cost, time_ms=cost.time_ms + overhead)
    return costs


def overhead_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The nodes the step dispatches as ops, each charged the per-op overhead.

    Every ``call_function`` node but ``getitem`` (a tuple access, not an op):
    exactly the nodes :func:`rematc.lower.lower_joint_graph` makes ops of,
    views included (they cost a dispatch in the generated code too).
    """
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is not operator.getitem]


def graph_key(gm: fx.GraphModule, device: str | torch.device) -> str:
    """A fingerprint of ``gm`` for the overhead cache: its op signatures, in order."""
    device = torch.device(device)
    digest = hashlib.sha256()
    for node in overhead_nodes(gm):
        digest.update(repr(op_signature(node, device)).encode())
        digest.update(b"\n")
    return f"graph:{len(gm.graph.nodes)}:{digest.hexdigest()}"


def calibrate_overhead(
    gm: fx.GraphModule,
    args: Sequence[Any],
    costs: dict[str, NodeCost],
    device: str | torch.device = "cpu",
    *,
    repeats: int = 5,
) -> float:
    """The per-op overhead, ms: what a full run of ``gm`` costs beyond the sum of ``costs``.

    ``max(0, median full run - sum of costs) / len(overhead_nodes(gm))``. The
    full run is ``gm``'s graph as generated fx code, called with the flat
    ``args`` (primals then tangents) under ``no_grad``: one warm-up, then
    ``repeats`` timed runs. See NOTE: [Calibrated per-op overhead].
    """
    device = torch.device(device)
    ops = overhead_nodes(gm)
    if not ops:
        return 0.0
    runner = _flat_module(gm)
    with _disable_current_modes(), _eager_dispatch(), torch.no_grad():
        _time_full_run(runner, args, device)  # warm-up
        full_ms = statistics.median(_time_full_run(runner, args, device) for _ in range(max(1, repeats)))
    return max(0.0, full_ms - sum(c.time_ms for c in costs.values())) / len(ops)


# Dispatch keys AOTAutograd's tracing leaves in the thread's include set.
_TRACING_KEYS = (
    torch._C.DispatchKey.Python,
    torch._C.DispatchKey.PythonTLSSnapshot,
    torch._C.DispatchKey.PythonDispatcher,
)


@contextlib.contextmanager
def _eager_dispatch() -> Iterator[None]:
    """Time ops in the dispatcher state the real step runs in, even inside AOTAutograd.

    NOTE: [Profiling inside the partitioner] Rockmate profiles from inside
    AOTAutograd's partition callback, where the Python dispatcher is on and
    the ``Python``/``PythonTLSSnapshot`` keys are in the thread-local include
    set (``_disable_current_modes`` pops the modes but not the keys). Every op
    then detours through Python: the per-op times and a full run came out
    5-15% slower there than in the step on one CPU thread. Only the
    thread-local key sets change here, for the duration of the timings.
    """
    include = torch._C._dispatch_tls_local_include_set()
    for key in _TRACING_KEYS:
        include = include - torch._C.DispatchKeySet(key)
    exclude = torch._C._dispatch_tls_local_exclude_set()
    with torch._C._DisablePythonDispatcher(), torch._C._ForceDispatchKeyGuard(include, exclude):
        yield


def _time_full_run(run: Callable[..., Any], args: Sequence[Any], device: torch.device) -> float:
    """Wall time of ``run(*args)``, ms (synchronized on CUDA: launch overheads count)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    out = run(*args)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = (time.perf_counter() - started) * 1e3
    del out  # freed after the clock stops: the real step hands its outputs on
    return elapsed


def _flat_module(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with fx's default code generation: flat positional inputs, a flat output list.

    AOTAutograd's joint graph takes ``(primals, tangents)`` through pytree
    code generation; a copy of the graph with the default code generator runs
    the same body from the flat inputs the profiler holds.
    """
    graph = fx.Graph()
    output = graph.graph_copy(gm.graph, {})
    graph.output(output)
    return fx.GraphModule(gm, graph)


def _graph_inputs(gm: fx.GraphModule, primals: Sequence[Any], device: torch.device) -> list[Any]:
    """The primals, then tangents shaped like the real gradients (ones)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    args = list(primals)
    for node in placeholders[len(primals):]:
        val = node.meta.get("val")
        args.append(torch.ones(val.shape, dtype=val.dtype, device=device) if isinstance(val, torch.Tensor) else val)
    return args


class _TimingInterpreter(fx.Interpreter):
    def __init__(
        self, gm: fx.GraphModule, dev: str, cache: ProfileCache, repeats: int, device: torch.device,
        memory: dict[str, OpMemory],
    ):
        super().__init__(gm, garbage_collect_values=True)
        self.dev, self.cache, self.repeats, self.device = dev, cache, repeats, device
        self.memory = memory
        self.times: dict[str, float] = {}

    def time_all(self, args: Sequence[Any]) -> dict[str, float]:
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
            self.cache.put(self.dev, signature, self.times[n.name], self.memory.get(n.name, OpMemory(0)).workspace_bytes)
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
