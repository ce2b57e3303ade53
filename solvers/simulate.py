"""The one memory and time model: what a schedule allocates, frees and costs.

Everything that says "predicted" (solvers, tests, benchmarks, the API) calls
:func:`simulate`. Its rules mirror the generated code:

- computing an op allocates a fresh storage for each output that is not a
  view; a view joins the storage of the input it aliases;
- while the op runs, its ``workspace_bytes`` are held too;
- a storage is released when the last live value that shares it is freed;
- resident values (parameters, inputs) are never counted: the budget is the
  peak above what was allocated when the step started.

:func:`check` validates a schedule against a graph and raises
:class:`ScheduleError` naming the step at fault.
"""

from __future__ import annotations

from dataclasses import dataclass

from .graph import Graph
from .schedule import Schedule


class ScheduleError(ValueError):
    """A schedule is not executable on its graph (use before compute, use after free...)."""


@dataclass(frozen=True, slots=True)
class SimulationResult:
    """Outcome of :func:`simulate`.

    Attributes:
        peak_bytes: the largest number of bytes live at any moment.
        time_ms: total compute time of all compute steps.
        peak_step: position (in ``schedule.steps``) of the step at which the peak occurs.
        live_after_forward_bytes: bytes live when the forward phase ends (what is saved).
        memory_trace: bytes live after each step (for plots and explanations).
    """

    peak_bytes: int
    time_ms: float
    peak_step: int
    live_after_forward_bytes: int
    memory_trace: tuple[int, ...]


def simulate(graph: Graph, schedule: Schedule, *, validate: bool = True) -> SimulationResult:
    """Predict the peak bytes and the time of ``schedule`` on ``graph``.

    With ``validate`` (the default) the schedule is checked first, so a
    prediction is never made for a schedule that could not run.
    """
    if validate:
        check(graph, schedule)
    storage_of: dict[int, int] = {}  # live value -> storage id
    storage_refs: dict[int, int] = {}  # storage id -> number of live values on it
    storage_bytes: dict[int, int] = {}
    next_storage = 0
    live = 0
    peak = 0
    peak_step = -1
    time_ms = 0.0
    trace: list[int] = []
    live_after_forward = 0
    n_forward = len(schedule.forward)
    for v in graph.resident_values:
        storage_of[v] = -1 - v  # residents: own storages, zero counted bytes
        storage_refs[-1 - v] = 1
        storage_bytes[-1 - v] = 0
    for pos, (kind, index) in enumerate(schedule.steps):
        if pos == n_forward:
            live_after_forward = live
        if kind == "compute":
            op = graph.ops[index]
            time_ms += op.time_ms
            new_bytes = 0
            for v in op.outputs:
                if v in storage_of:
                    # Recomputing a value still alive: the old instance is replaced.
                    live -= _release(v, storage_of, storage_refs, storage_bytes)
                value = graph.values[v]
                if value.view_of is not None:
                    sid = storage_of[value.view_of]
                else:
                    sid = next_storage
                    next_storage += 1
                    storage_bytes[sid] = value.bytes
                    storage_refs[sid] = 0
                    new_bytes += value.bytes
                storage_of[v] = sid
                storage_refs[sid] += 1
            during = live + new_bytes + op.workspace_bytes
            if during > peak:
                peak, peak_step = during, pos
            live += new_bytes
        else:
            live -= _release(index, storage_of, storage_refs, storage_bytes)
        trace.append(live)
    if n_forward == len(schedule.steps):
        live_after_forward = live
    return SimulationResult(peak, time_ms, peak_step, live_after_forward, tuple(trace))


def _release(
    value: int, storage_of: dict[int, int], storage_refs: dict[int, int], storage_bytes: dict[int, int]
) -> int:
    """Drop ``value``'s reference to its storage; return the bytes released (0 if still shared)."""
    sid = storage_of.pop(value)
    storage_refs[sid] -= 1
    if storage_refs[sid]:
        return 0
    del storage_refs[sid]
    return storage_bytes.pop(sid)


def check(graph: Graph, schedule: Schedule) -> None:
    """Raise :class:`ScheduleError` unless ``schedule`` runs correctly on ``graph``.

    Checks: every op reads only live values; no value is freed twice or while
    not live; resident values are never freed; backward ops run only in the
    backward phase, each exactly once; non-recomputable ops run exactly once;
    input ops (output gradients) come first in the backward phase; forward
    outputs are live when the forward phase ends; ``required_at_end`` values
    are live when the step ends.
    """
    live = set(graph.resident_values)
    resident = set(live)
    count = [0] * graph.num_ops
    n_forward = len(schedule.forward)
    seen_non_input_backward = False

    def fail(pos: int, message: str) -> None:
        kind, index = schedule.steps[pos]
        raise ScheduleError(f"step {pos} ({kind} {index}): {message}")

    for pos, (kind, index) in enumerate(schedule.steps):
        in_forward = pos < n_forward
        if pos == n_forward:
            _check_live_at(graph, live, graph.forward_outputs, "the end of the forward phase")
        if kind == "compute":
            if not 0 <= index < graph.num_ops:
                fail(pos, "no such op")
            op = graph.ops[index]
            if op.is_backward and in_forward:
                fail(pos, f"backward op {op.name} in the forward phase")
            if op.is_input:
                if seen_non_input_backward:
                    fail(pos, f"input op {op.name} after other backward computations")
            elif not in_forward:
                seen_non_input_backward = True
            for v in op.inputs:
                if v not in live:
                    fail(pos, f"op {op.name} reads {graph.values[v].name}, which is not live")
            count[index] += 1
            if count[index] > 1 and (op.is_backward or not op.recomputable):
                fail(pos, f"op {op.name} may run only once")
            live.update(op.outputs)
        else:
            if not 0 <= index < len(graph.values):
                fail(pos, "no such value")
            if index in resident:
                fail(pos, f"resident value {graph.values[index].name} is freed")
            if index not in live:
                fail(pos, f"value {graph.values[index].name} is freed while not live")
            live.discard(index)
    if n_forward == len(schedule.steps):
        _check_live_at(graph, live, graph.forward_outputs, "the end of the forward phase")
    for i, op in enumerate(graph.ops):
        if count[i] == 0 and (op.is_backward or not op.recomputable):
            raise ScheduleError(f"op {i} ({op.name}) never runs")
    _check_live_at(graph, live, graph.required_at_end, "the end of the step")


def _check_live_at(graph: Graph, live: set[int], required: tuple[int, ...], when: str) -> None:
    missing = [graph.values[v].name for v in required if v not in live]
    if missing:
        raise ScheduleError(f"values not live at {when}: {', '.join(missing)}")
