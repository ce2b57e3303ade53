"""Schedules that recompute a set of unsaved forward values, and their fast simulation.

A forward value is *saved* when the forward phase computes it and the backward
phase reads that same instance (it lives across the phase boundary). It is
*unsaved* when the forward phase computes it but the backward recomputes it
just in time instead. :func:`build_remat_schedule` turns a set of unsaved
values into a :class:`Schedule`; :class:`RematContext` does the same for many
sets of one graph and simulates them several times faster than
:func:`simulate` (the greedy planner's inner loop), with the same numbers.

Example:
    >>> from solvers import Graph, Op, Value, simulate
    >>> g = Graph(
    ...     ops=(Op("f", (0,), (1,), time_ms=1.0), Op("g", (1,), (2,), time_ms=1.0),
    ...          Op("d_y", (), (3,), is_backward=True, recomputable=False, is_input=True),
    ...          Op("g_bwd", (3, 1), (4,), time_ms=1.0, is_backward=True)),
    ...     values=(Value("x", 0, None), Value("h", 100, 0), Value("y", 10, 1),
    ...             Value("dy", 10, 2), Value("dh", 100, 3)),
    ...     forward_outputs=(2,), required_at_end=(4,))
    >>> no_remat_schedule(g)
    Schedule(C0 C1 | D2 C2 C3 D1 D3)
    >>> build_remat_schedule(g, [1])
    Schedule(C0 C1 D1 | D2 C2 C0 C3 D1 D3)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from .graph import Graph
from .schedule import Schedule, schedule_from_order

_CONTEXT_KEY = "solvers.recompute.context"


def build_remat_schedule(graph: Graph, unsaved_values: Iterable[int]) -> Schedule:
    """The schedule that recomputes ``unsaved_values`` in the backward instead of saving them.

    Forward phase: the ops the forward outputs depend on, in graph order.
    Backward phase: the input ops, then the backward ops in graph order; before
    each, every input that is not live is recomputed just in time, its own
    missing inputs first (in graph order), and stays live until its last use.
    Forward ops outside the forward phase (a weight transpose only the
    backward reads) run once, just before first use. Values of
    non-recomputable ops are always kept, even if listed.

    Args:
        graph: the training graph.
        unsaved_values: forward values (indices) to recompute rather than save.

    Raises:
        ValueError: an entry of ``unsaved_values`` is not a value made by a forward op.
    """
    context = remat_context(graph)
    unsaved = []
    for v in unsaved_values:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < len(graph.values):
            raise ValueError(f"unsaved_values must hold value indices, got {v!r}")
        p = graph.values[v].producer
        if p is None or graph.ops[p].is_backward:
            kind = "resident" if p is None else "made by a backward op"
            raise ValueError(
                f"unsaved_values must hold values made by forward ops; value {v} "
                f"({graph.values[v].name}) is {kind}"
            )
        if graph.ops[p].recomputable:
            unsaved.append(v)
    return schedule_from_order(graph, context.forward_phase, context.backward_order(unsaved))


def no_remat_schedule(graph: Graph) -> Schedule:
    """Autograd's schedule: every forward value the backward reads is saved.

    As AOTAutograd's default partitioner: the forward phase computes what the
    forward outputs need; forward ops only the backward needs run in the
    backward, once, just before first use.
    """
    return build_remat_schedule(graph, ())


@dataclass(frozen=True, slots=True)
class OrderProfile:
    """What :func:`simulate` says about ``schedule_from_order(forward_phase, backward)``, and more.

    Positions index the compute order (the forward phase, then ``backward``).
    An *instance* is one computation of a value: instances ``0..F-1`` are the
    forward phase's (one per forward-phase value), later ones the backward's.
    A storage counts at positions ``storage_lo..storage_hi`` inclusive.
    """

    peak_bytes: int
    peak_position: int
    time_ms: float
    backward: list[int]
    held_bytes: np.ndarray  # bytes held while running the step at each position
    first_backward_read: dict[int, int]  # forward-phase value -> first backward read of it (saved ones)
    recompute_position: dict[int, int]  # forward op run in the backward -> its position
    instance_value: list[int]
    instance_last: list[int]  # last read of each instance (its own position if never read)
    instance_storage: list[int]  # storage of each instance, -1 for resident storages
    storage_lo: list[int]
    storage_hi: list[int]


class RematContext:
    """Per-graph facts shared by every unsaved set, and the fast simulator built on them.

    Attributes:
        forward_phase: the ops the forward outputs depend on, graph order.
        skeleton: the ops the backward phase runs exactly once, in order: the
            input ops, then the backward ops, and the non-recomputable forward
            ops that nothing reads (outside the forward phase), in graph order.
            Recomputations are inserted just before the skeleton op needing them.
        live: per value, 1 when the backward may read it without recomputing it
            (see NOTE [Live at backward start]).
        forward_free: per forward-phase value, where the forward frees it when
            the backward does not read it (-1 for other values).
        forward_storage: per value, the storage of its forward-phase instance (-1: none).
    """

    def __init__(self, graph: Graph) -> None:
        ops, values = graph.ops, graph.values
        self.graph = graph
        in_forward = _producers_closure(graph, graph.forward_outputs, lambda p: True)
        self.forward_phase = tuple(sorted(in_forward))
        # Forward ops outside the forward phase that something downstream reads; of the
        # others (dead), only the non-recomputable must still run, once.
        backward_reads = [v for op in ops if op.is_backward for v in op.inputs]
        needed = _producers_closure(graph, [*backward_reads, *graph.required_at_end],
                                    lambda p: not ops[p].is_backward and p not in in_forward)
        self.skeleton = (
            *(i for i, op in enumerate(ops) if op.is_input),
            *(i for i, op in enumerate(ops) if not op.is_input and i not in in_forward
              and (op.is_backward or (not op.recomputable and i not in needed))),
        )
        # NOTE: [Live at backward start] what the no-remat plan keeps across the phase
        # boundary (forward-phase values read outside the forward phase, forward outputs,
        # values required at the end), the residents, and the values of non-recomputable
        # forward ops (never recomputed, so kept longer when a recompute reads them). Not
        # every forward-phase value: a Linear output only its ReLU reads is freed during
        # the forward, and recomputing the ReLU must recompute it too, not silently save
        # it instead.
        live = bytearray(len(values))
        for v, value in enumerate(values):
            p = value.producer
            live[v] = p is None or (p in in_forward and not ops[p].recomputable)
        for i, op in enumerate(ops):
            if i not in in_forward:
                for v in op.inputs:
                    if values[v].producer in in_forward:
                        live[v] = 1
        for v in (*graph.forward_outputs, *graph.required_at_end):
            if values[v].producer is None or values[v].producer in in_forward:
                live[v] = 1
        self.live = bytes(live)
        self._in_forward = in_forward
        self._inputs = [op.inputs for op in ops]
        self._outputs = [op.outputs for op in ops]
        self._producer = [value.producer for value in values]
        self._view_of = [value.view_of for value in values]
        self._required = set(graph.required_at_end)
        self._value_bytes = [value.bytes for value in values]
        self._workspace = [op.workspace_bytes for op in ops]
        self._time = [op.time_ms for op in ops]
        self._is_forward = [not op.is_backward for op in ops]
        self._workspace_array = np.array(self._workspace, dtype=np.int64)
        self._simulate_forward()

    def _simulate_forward(self) -> None:
        """The forward phase's bytes when it frees every value after its last forward use."""
        graph, n_forward = self.graph, len(self.forward_phase)
        values, ops = graph.values, graph.ops
        kept_to_boundary = set(graph.forward_outputs)
        instance_of: list[int] = [-1] * len(values)
        last: list[int] = []
        storage: list[int] = []
        storage_bytes: list[int] = []
        storage_lo: list[int] = []
        for pos, o in enumerate(self.forward_phase):
            for v in ops[o].inputs:
                if instance_of[v] >= 0:
                    last[instance_of[v]] = pos
            for v in ops[o].outputs:
                instance_of[v] = len(last)
                last.append(pos)
                base = values[v].view_of
                if base is None:
                    storage.append(len(storage_bytes))
                    storage_bytes.append(values[v].bytes)
                    storage_lo.append(pos)
                else:
                    storage.append(storage[instance_of[base]] if instance_of[base] >= 0 else -1)
        value_of = [v for o in self.forward_phase for v in ops[o].outputs]
        free = [n_forward - 1 if v in kept_to_boundary else last[i] for i, v in enumerate(value_of)]
        storage_free = [-1] * len(storage_bytes)  # where the last alias goes
        for i, sid in enumerate(storage):
            if sid >= 0:
                storage_free[sid] = max(storage_free[sid], free[i])
        held = np.zeros(n_forward + 1, dtype=np.int64)
        for sid, n_bytes in enumerate(storage_bytes):
            held[storage_lo[sid]] += n_bytes
            held[storage_free[sid] + 1] -= n_bytes
        held = np.cumsum(held)[:n_forward]
        for pos, o in enumerate(self.forward_phase):
            held[pos] += ops[o].workspace_bytes
        self.forward_time_ms = 0.0
        for o in self.forward_phase:  # the same summation order as simulate
            self.forward_time_ms += ops[o].time_ms
        self.forward_held = held
        self.forward_free = [-1] * len(values)
        self.forward_storage = [-1] * len(values)
        for i, v in enumerate(value_of):
            self.forward_free[v] = free[i]
            self.forward_storage[v] = storage[i]
        self._forward_instance_of = instance_of
        self._forward_instance_last = last
        self._forward_instance_value = value_of
        self._forward_instance_storage = storage
        self._forward_storage_bytes = storage_bytes
        self._forward_storage_lo = storage_lo
        self._forward_storage_free_array = np.array(storage_free, dtype=np.int64)

    def backward_order(self, unsaved: Iterable[int]) -> list[int]:
        """The backward compute order: the skeleton, each op preceded by recomputes of what it lacks.

        ``unsaved`` must hold only forward-phase values of recomputable ops. A value
        computed in the backward stays usable until its last use (the caller's
        :func:`schedule_from_order` frees it then), so no op is recomputed twice.
        """
        inputs, outputs = self._inputs, self._outputs
        live = bytearray(self.live)
        for v in unsaved:
            live[v] = 0
        order: list[int] = []
        for o in self.skeleton:
            missing = [v for v in inputs[o] if not live[v]]
            if missing:
                order.extend(self._recompute(missing, live))
            order.append(o)
            for v in outputs[o]:
                live[v] = 1
        missing = [v for v in self.graph.required_at_end if not live[v]]
        if missing:
            order.extend(self._recompute(missing, live))
        return order

    def _recompute(self, missing: list[int], live: bytearray) -> list[int]:
        """Ops making ``missing`` and their own missing inputs, in graph order; marks them live."""
        inputs, producer, ops = self._inputs, self._producer, self.graph.ops
        todo: set[int] = set()
        stack = missing
        while stack:
            p = producer[stack.pop()]
            if p not in todo:
                # Non-recomputable forward-phase values are live (NOTE [Live at backward
                # start]), so only first runs of such ops can get here.
                assert ops[p].recomputable or p not in self._in_forward, f"op {p} would run twice"  # type: ignore[index]
                todo.add(p)  # type: ignore[arg-type]
                stack.extend(x for x in inputs[p] if not live[x])  # type: ignore[index]
        # NOTE: graph order is a topological order, so sorting respects dependencies,
        # and the relative order of recomputes stays put when the unsaved set grows.
        ran = sorted(todo)
        for p in ran:
            for v in self._outputs[p]:
                live[v] = 1
        return ran

    def simulate(self, backward: list[int], give_up_above: float = float("inf")) -> OrderProfile | None:
        """What :func:`simulate` says of ``schedule_from_order(graph, forward_phase, backward)``.

        Same rules, computed differently: one pass over the backward finds each
        instance's last read; every storage then lives from its allocation to
        the last read of its last alias (or to the end when required), and the
        bytes held at each step are a cumulative sum. Returns None when some
        step holds more than ``give_up_above`` bytes.
        """
        inputs, outputs, view_of, required = self._inputs, self._outputs, self._view_of, self._required
        value_bytes, op_time, is_forward = self._value_bytes, self._time, self._is_forward
        n_forward = len(self.forward_phase)
        n = n_forward + len(backward)
        n_forward_instances = len(self._forward_instance_value)
        n_forward_storages = len(self._forward_storage_bytes)
        instance_of = self._forward_instance_of[:]
        last = self._forward_instance_last[:]
        instance_value = self._forward_instance_value[:]
        storage = self._forward_instance_storage[:]
        storage_bytes = self._forward_storage_bytes[:]
        storage_lo = self._forward_storage_lo[:]
        first_read: dict[int, int] = {}
        recompute_position: dict[int, int] = {}
        time_ms = self.forward_time_ms
        add_storage, add_storage_bytes, add_storage_lo = storage.append, storage_bytes.append, storage_lo.append
        add_last, add_value = last.append, instance_value.append
        n_instances, n_storages = len(last), len(storage_bytes)
        for pos, o in enumerate(backward, n_forward):
            for v in inputs[o]:
                i = instance_of[v]
                if i >= 0:
                    if i < n_forward_instances and last[i] < n_forward:
                        first_read[v] = pos  # the forward instance's first backward read
                    last[i] = pos
            for v in outputs[o]:
                base = view_of[v]
                if base is None:
                    add_storage(n_storages)
                    n_storages += 1
                    add_storage_bytes(value_bytes[v])
                    add_storage_lo(pos)
                else:
                    i = instance_of[base]
                    add_storage(storage[i] if i >= 0 else -1)  # -1: a view of a resident
                instance_of[v] = n_instances
                n_instances += 1
                add_last(pos)
                add_value(v)
            time_ms += op_time[o]
            if is_forward[o]:
                recompute_position[o] = pos
        # A storage dies after the last read of its last alias that lives into the
        # backward; a forward instance does when the backward reads it or it is required.
        forward_instance_of = self._forward_instance_of
        alive_instances = [forward_instance_of[v] for v in first_read]
        alive_instances += [forward_instance_of[v] for v in required if v not in first_read
                            and forward_instance_of[v] >= 0 and instance_of[v] == forward_instance_of[v]]
        alive_instances += range(n_forward_instances, len(last))
        ends = np.array([last[i] for i in alive_instances], dtype=np.int64)
        for k, i in enumerate(alive_instances):
            v = instance_value[i]
            if v in required and instance_of[v] == i:
                ends[k] = n - 1
        sids = np.array([storage[i] for i in alive_instances], dtype=np.int64)
        has_storage = sids >= 0
        storage_hi = np.full(len(storage_bytes), -1, dtype=np.int64)
        np.maximum.at(storage_hi, sids[has_storage], ends[has_storage])
        n_bytes = np.array(storage_bytes, dtype=np.int64)
        lo = np.array(storage_lo, dtype=np.int64)
        forward_free = self._forward_storage_free_array
        crossing = storage_hi[:n_forward_storages] >= 0
        # Forward storages living across the boundary hold from their forward free on.
        delta = np.zeros(n + 1, dtype=np.int64)
        np.add.at(delta, forward_free[crossing] + 1, n_bytes[:n_forward_storages][crossing])
        np.subtract.at(delta, storage_hi[:n_forward_storages][crossing] + 1,
                       n_bytes[:n_forward_storages][crossing])
        np.add.at(delta, lo[n_forward_storages:], n_bytes[n_forward_storages:])
        np.subtract.at(delta, storage_hi[n_forward_storages:] + 1, n_bytes[n_forward_storages:])
        held_bytes = np.cumsum(delta[:n])
        held_bytes[:n_forward] += self.forward_held
        held_bytes[n_forward:] += self._workspace_array[np.array(backward, dtype=np.int64)]
        peak_position = int(np.argmax(held_bytes)) if n else -1
        peak = int(held_bytes[peak_position]) if n else 0
        if peak > give_up_above:
            return None
        storage_hi[:n_forward_storages][~crossing] = forward_free[~crossing]
        return OrderProfile(peak, peak_position, time_ms, backward, held_bytes, first_read,
                            recompute_position, instance_value, last, storage, storage_lo,
                            storage_hi.tolist())


def remat_context(graph: Graph) -> RematContext:
    """The :class:`RematContext` of ``graph``, built once and kept on the (immutable) graph."""
    context = graph._cache.get(_CONTEXT_KEY)
    if context is None:
        context = graph._cache[_CONTEXT_KEY] = RematContext(graph)
    return context


def _producers_closure(graph: Graph, start: Iterable[int], follow: Callable[[int], bool]) -> set[int]:
    """Ops producing ``start`` values, and their producers' producers, while ``follow(op)``."""
    values, ops = graph.values, graph.ops
    seen: set[int] = set()
    stack = [values[v].producer for v in start]
    while stack:
        p = stack.pop()
        if p is None or p in seen or not follow(p):
            continue
        seen.add(p)
        stack.extend(values[v].producer for v in ops[p].inputs)
    return seen
