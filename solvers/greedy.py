"""The no-remat schedule and the greedy rematerialization planner.

Vocabulary. A forward value is *saved* when the forward phase computes it and
the backward phase reads that same instance (it lives across the phase
boundary). It is *unsaved* when the forward phase computes it but the backward
recomputes it just in time instead. Values sharing one storage (a base and its
views, see :meth:`Graph.storage_root`) form a *group*: unsaving only some
members of a group frees nothing, so the greedy planner moves whole groups.

- :func:`no_remat_schedule`: what autograd does (save everything the backward reads).
- :func:`build_remat_schedule`: the schedule for a given set of unsaved values.
- :func:`greedy_schedule`: unsave, one group at a time, the group with the best
  peak reduction per millisecond of recomputation, until the peak fits.

Example:
    >>> from solvers import Graph, Op, Value, simulate
    >>> g = Graph(
    ...     ops=(Op("f", (0,), (1,), time_ms=1.0), Op("g", (1,), (2,), time_ms=1.0),
    ...          Op("d_out", (), (3,), is_backward=True, recomputable=False, is_input=True),
    ...          Op("g_bwd", (3, 1), (4,), time_ms=1.0, is_backward=True)),
    ...     values=(Value("x", 0, None), Value("h", 100, 0), Value("y", 10, 1),
    ...             Value("dy", 10, 2), Value("dh", 100, 3)),
    ...     forward_outputs=(2,), required_at_end=(4,))
    >>> no_remat_schedule(g), simulate(g, no_remat_schedule(g)).peak_bytes
    (Schedule(C0 C1 | D2 C2 C3 D1 D3), 210)
    >>> greedy_schedule(g, budget_bytes=200), simulate(g, greedy_schedule(g, 200)).peak_bytes
    (Schedule(C0 C1 D1 | D2 C2 C0 C3 D1 D3), 210)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from .errors import BudgetInfeasible
from .graph import Graph
from .schedule import Schedule, schedule_from_order
from .simulate import simulate

#: Candidate groups judged per greedy iteration: the largest ones live at the peak.
MAX_CANDIDATES = 64

_STRUCTURE_KEY = "solvers.greedy.structure"
_RUN_KEY = "solvers.greedy.run"


@dataclass(frozen=True, slots=True)
class _Structure:
    """Facts about a graph that every schedule built here shares.

    Attributes:
        forward_phase: ops of the forward phase (ancestors of the forward outputs), graph order.
        skeleton: ops the backward phase runs exactly once, in order: the input
            ops, then the backward ops and the forward ops that must run once
            but that nothing reads (non-recomputable dead ops), in graph order.
            Recomputations are inserted just before the skeleton op that needs them.
        live_at_backward_start: 1 per value the backward may read without
            recomputing it (see [Live at backward start]).
        groups: storage root -> the forward-phase values on that storage, for
            the storages the planner may unsave (every member recomputable,
            none required at the end, the storage not resident).
    """

    forward_phase: tuple[int, ...]
    skeleton: tuple[int, ...]
    live_at_backward_start: bytes
    groups: dict[int, tuple[int, ...]]


def _structure(graph: Graph) -> _Structure:
    cached = graph._cache.get(_STRUCTURE_KEY)
    if cached is not None:
        return cached
    ops, values = graph.ops, graph.values
    in_forward = _closure_of_producers(graph, graph.forward_outputs, lambda p: True)
    forward_phase = tuple(sorted(in_forward))
    # Forward ops outside the forward phase that something downstream reads; the others
    # are dead, and only the non-recomputable ones among them must still run (once).
    backward_reads = [v for op in ops if op.is_backward for v in op.inputs]
    needed = _closure_of_producers(
        graph, [*backward_reads, *graph.required_at_end],
        lambda p: not ops[p].is_backward and p not in in_forward,
    )
    inputs = [i for i, op in enumerate(ops) if op.is_input]
    rest = [
        i for i, op in enumerate(ops)
        if not op.is_input and i not in in_forward
        and (op.is_backward or (not op.recomputable and i not in needed))
    ]
    # NOTE: [Live at backward start] exactly what the no-remat plan keeps across the
    # phase boundary (forward-phase values read outside the forward phase, forward
    # outputs), the residents, and the values of non-recomputable forward ops (never
    # recomputed, so kept longer when a recompute reads them). Not every forward-phase
    # value: a Linear output that only its ReLU reads is freed during the forward, and
    # a recompute of the ReLU must recompute it too, not silently save it instead.
    live = bytearray(len(values))
    for v, value in enumerate(values):
        p = value.producer
        live[v] = p is None or (p in in_forward and not ops[p].recomputable)
    for i, op in enumerate(ops):
        if i not in in_forward:
            for v in op.inputs:
                if values[v].producer in in_forward:
                    live[v] = 1
    for v in graph.forward_outputs:
        live[v] = 1
    members: dict[int, list[int]] = {}
    for p in forward_phase:
        for v in ops[p].outputs:
            members.setdefault(graph.storage_root(v), []).append(v)
    required = set(graph.required_at_end)
    groups = {
        root: tuple(vs) for root, vs in sorted(members.items())
        if graph.allocated_bytes(root) > 0
        and all(ops[values[v].producer].recomputable and v not in required for v in vs)  # type: ignore[index]
    }
    structure = _Structure(forward_phase, (*inputs, *rest), bytes(live), groups)
    graph._cache[_STRUCTURE_KEY] = structure
    return structure


def _closure_of_producers(graph: Graph, start: Iterable[int], follow: Callable[[int], bool]) -> set[int]:
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


def _backward_order(graph: Graph, structure: _Structure, unsaved: Iterable[int]) -> list[int]:
    """Backward compute order: the skeleton, each op preceded by recomputes of what it lacks.

    ``unsaved`` must hold only forward-phase values of recomputable ops. A value
    computed in the backward stays usable until its last use (the caller's
    :func:`schedule_from_order` frees it then), so no op is recomputed twice.
    """
    ops, values = graph.ops, graph.values
    live = bytearray(structure.live_at_backward_start)
    for v in unsaved:
        live[v] = 0
    order: list[int] = []
    done = set(structure.forward_phase)  # ops that ran already

    def run(op_index: int) -> None:
        order.append(op_index)
        done.add(op_index)
        for v in ops[op_index].outputs:
            live[v] = 1

    def materialize(missing: list[int]) -> None:
        todo: set[int] = set()
        stack = missing
        while stack:
            p = values[stack.pop()].producer
            if p not in todo:
                # Only first runs of ops outside the forward phase reach here when not
                # recomputable: forward-phase ones are live (see [Live at backward start]).
                assert ops[p].recomputable or p not in done, f"op {p} would run twice"  # type: ignore[index]
                todo.add(p)  # type: ignore[arg-type]
                stack.extend(x for x in ops[p].inputs if not live[x])  # type: ignore[index]
        # NOTE: graph order is a topological order, so sorting is enough to respect
        # dependencies, and it keeps the relative order of recomputes stable when
        # the unsaved set grows (the greedy bound relies on that).
        for p in sorted(todo):
            run(p)

    for o in structure.skeleton:
        missing = [v for v in ops[o].inputs if not live[v]]
        if missing:
            materialize(missing)
        run(o)
    missing = [v for v in graph.required_at_end if not live[v]]
    if missing:
        materialize(missing)
    return order


def build_remat_schedule(graph: Graph, unsaved_values: Iterable[int]) -> Schedule:
    """The schedule that recomputes ``unsaved_values`` in the backward instead of saving them.

    Forward phase: the ops the forward outputs depend on, in graph order.
    Backward phase: the input ops, then the backward ops in graph order; before
    each, every input that is not live is recomputed just in time, its own
    missing inputs first (in graph order), and stays live until its last use.
    Forward ops outside the forward phase (a weight transpose only the
    backward reads) run once, just before first use. Values of
    non-recomputable ops are always saved, even if listed.

    Args:
        graph: the training graph.
        unsaved_values: forward values (indices) to recompute rather than save.

    Raises:
        ValueError: an entry of ``unsaved_values`` is not a value made by a forward op.

    Example:
        >>> build_remat_schedule(mlp, [1])                           # doctest: +SKIP
        Schedule(C0 C1 D1 C2 | ... C0 C5 ...)
    """
    structure = _structure(graph)
    unsaved = []
    for v in unsaved_values:
        if not (isinstance(v, int) and 0 <= v < len(graph.values)):
            raise ValueError(f"unsaved_values must hold value indices, got {v!r}")
        p = graph.values[v].producer
        if p is None or graph.ops[p].is_backward:
            raise ValueError(
                f"unsaved_values must hold values made by forward ops; "
                f"value {v} ({graph.values[v].name}) is {'resident' if p is None else 'a backward value'}"
            )
        if graph.ops[p].recomputable:
            unsaved.append(v)
    return schedule_from_order(graph, structure.forward_phase, _backward_order(graph, structure, unsaved))


def no_remat_schedule(graph: Graph) -> Schedule:
    """Autograd's schedule: every forward value the backward reads is saved.

    Same as AOTAutograd's default partitioner: the forward phase computes what
    the forward outputs need; forward ops that only the backward needs run in
    the backward, once, just before first use.
    """
    return build_remat_schedule(graph, ())


@dataclass(frozen=True, slots=True)
class _Profile:
    """:func:`simulate`'s numbers for a compute order, plus what the greedy bound needs.

    Positions index the compute order (forward then backward). A storage counts
    at positions ``lo..hi`` inclusive (allocated at ``lo``, freed after ``hi``).
    """

    peak_bytes: int
    time_ms: float
    peak_position: int
    order: list[int]  # the compute order
    n_forward: int
    held_bytes: np.ndarray  # bytes held while running the step at each position
    prefix_max: np.ndarray  # max bytes held while running any step at positions <= i
    suffix_max: np.ndarray  # ... at positions >= i
    value_lo: list[int]  # per value: hull of the storages of all its instances (-1: none)
    value_hi: list[int]
    forward_storage: list[int]  # per value: storage of its first instance (-1: none or resident)
    storage_lo: list[int]
    storage_hi: list[int]
    first_backward_read: list[int]  # per value: first backward read of its forward instance (n: none)
    forward_free: list[int]  # per forward-phase value: its last position were it unsaved (-1: other)
    recompute_position: dict[int, int]  # forward op run in the backward -> its position


def _profile(graph: Graph, forward: tuple[int, ...], backward: list[int]) -> _Profile:
    """Simulate ``schedule_from_order(graph, forward, backward)`` without building it.

    Same rules as :func:`simulate` on that schedule (tests hold them equal);
    about three times faster, which the greedy search needs. Assumes each op
    runs at most once in the forward phase.
    """
    ops, values = graph.ops, graph.values
    order = [*forward, *backward]
    n, n_forward, n_values = len(order), len(forward), len(values)
    # Pass 1: last read of every instance (an instance = one computation of a value).
    current = [-1] * n_values
    instance_value: list[int] = []
    instance_last: list[int] = []
    first_backward_read = [n] * n_values  # per value: first read of its first instance in the backward
    forward_last: list[int] = []  # instance made by the forward -> its last read there
    for pos, o in enumerate(order):
        if pos == n_forward:
            forward_last = instance_last[:]
        op = ops[o]
        for v in op.inputs:
            i = current[v]
            if i >= 0:
                if instance_last[i] < n_forward <= pos and first_backward_read[v] == n:
                    first_backward_read[v] = pos
                instance_last[i] = pos
        for v in op.outputs:
            current[v] = len(instance_value)
            instance_value.append(v)
            instance_last.append(pos)
    if n == n_forward:
        forward_last = instance_last[:]
    keep, forward_outputs = set(graph.required_at_end), set(graph.forward_outputs)
    free_after: list[list[int]] = [[] for _ in range(n)]
    first_instance = [-1] * n_values
    forward_free = [-1] * n_values  # per forward-phase value: where it would be freed if unsaved
    for i, v in enumerate(instance_value):
        last = instance_last[i]
        if first_instance[v] < 0:
            first_instance[v] = i
            if i < len(forward_last):
                forward_free[v] = n_forward - 1 if v in forward_outputs else forward_last[i]
        if v in keep and current[v] == i:
            continue
        if last < n_forward and v in forward_outputs:
            last = n_forward - 1  # forward outputs live until the phase ends
        free_after[last].append(i)
    # Pass 2: storages, bytes held at each step.
    instance_storage = [-1] * len(instance_value)
    storage_bytes: list[int] = []
    storage_refs: list[int] = []
    storage_lo: list[int] = []
    storage_hi: list[int] = []
    current = [-1] * n_values
    during = [0] * n
    live = peak = 0
    peak_position = -1
    time_ms = 0.0
    instance = 0
    recompute_position: dict[int, int] = {}
    for pos, o in enumerate(order):
        op = ops[o]
        new_bytes = 0
        for v in op.outputs:
            base = values[v].view_of
            if base is None:
                sid = len(storage_bytes)
                storage_bytes.append(values[v].bytes)
                storage_refs.append(1)
                storage_lo.append(pos)
                storage_hi.append(n - 1)
                new_bytes += values[v].bytes
            else:
                sid = instance_storage[current[base]] if current[base] >= 0 else -1
                if sid >= 0:
                    storage_refs[sid] += 1
            instance_storage[instance] = sid
            current[v] = instance
            instance += 1
        held = live + new_bytes + op.workspace_bytes
        during[pos] = held
        if held > peak:
            peak, peak_position = held, pos
        live += new_bytes
        time_ms += op.time_ms
        if pos >= n_forward and not op.is_backward:
            recompute_position[o] = pos
        for i in free_after[pos]:
            sid = instance_storage[i]
            if sid >= 0:
                storage_refs[sid] -= 1
                if not storage_refs[sid]:
                    live -= storage_bytes[sid]
                    storage_hi[sid] = pos
    value_lo, value_hi = [-1] * n_values, [-1] * n_values
    for i, v in enumerate(instance_value):
        sid = instance_storage[i]
        if sid >= 0:
            lo, hi = storage_lo[sid], storage_hi[sid]
            value_lo[v] = lo if value_lo[v] < 0 else min(value_lo[v], lo)
            value_hi[v] = max(value_hi[v], hi)
    forward_storage = [instance_storage[i] if i >= 0 else -1 for i in first_instance]
    held_bytes = np.array(during, dtype=np.int64)
    return _Profile(
        peak, time_ms, peak_position, order, n_forward, held_bytes,
        np.maximum.accumulate(held_bytes), np.maximum.accumulate(held_bytes[::-1])[::-1],
        value_lo, value_hi, forward_storage, storage_lo, storage_hi, first_backward_read, forward_free,
        recompute_position,
    )


@dataclass(frozen=True, slots=True)
class _Candidate:
    root: int
    unsaved: frozenset[int]
    added_ms: float
    ratio_bound: float  # upper bound on (peak reduction) / added_ms


def _ratio(reduction_bytes: int, added_ms: float) -> float:
    if reduction_bytes <= 0:
        return -1.0
    return reduction_bytes / added_ms if added_ms > 0 else float("inf")


class _GreedyRun:
    """The greedy trajectory of one graph: schedules of strictly decreasing peak.

    State ``k`` unsaves the groups accepted in the first ``k`` iterations. The
    trajectory does not depend on the budget (the budget only says where to
    stop), so one run, extended on demand and cached on the graph, answers
    every budget and :func:`min_feasible_peak_greedy`.
    """

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.structure = _structure(graph)
        self.accepted: list[tuple[int, ...]] = []  # values unsaved by each iteration
        self.unsaved: frozenset[int] = frozenset()
        self.profile = self._evaluate(self.unsaved)
        self.peaks_bytes = [self.profile.peak_bytes]
        self.exhausted = False

    def _evaluate(self, unsaved: frozenset[int]) -> _Profile:
        backward = _backward_order(self.graph, self.structure, unsaved)
        return _profile(self.graph, self.structure.forward_phase, backward)

    def first_state_within(self, budget_bytes: int) -> int | None:
        """The first state whose peak is <= ``budget_bytes``; None if greedy cannot get there."""
        k = 0
        while self.peaks_bytes[k] > budget_bytes:
            if k + 1 == len(self.peaks_bytes) and not self._advance():
                return None
            k += 1
        return k

    def unsaved_at(self, state: int) -> list[int]:
        return sorted(v for group in self.accepted[:state] for v in group)

    def _candidates(self) -> list[_Candidate]:
        """Groups with a saved member whose storage is live at the peak, with ratio bounds."""
        prof, groups = self.profile, self.structure.groups
        at_peak, n = prof.peak_position, len(prof.prefix_max)
        live_groups = []
        for root, members in groups.items():
            sid = prof.forward_storage[root]
            if (sid >= 0 and prof.storage_lo[sid] <= at_peak <= prof.storage_hi[sid]
                    and any(prof.first_backward_read[v] < n for v in members)):
                live_groups.append(root)
        live_groups.sort(key=lambda r: (-self.graph.allocated_bytes(r), r))
        candidates = []
        for root in live_groups[:MAX_CANDIDATES]:
            candidate = self._bound(root)
            if candidate.ratio_bound >= 0:
                candidates.append(candidate)
        return candidates

    def _bound(self, root: int) -> _Candidate:
        """Exact added time and an upper bound on the peak ratio of unsaving ``root``'s group.

        NOTE: [Greedy bound] Let a member's *first read* be the first backward
        step reading its forward instance. Before it nothing changes except that
        the group's storage is freed after its last forward use; from it on the
        storage is back (recomputed just in time) and lives at least as long as
        before. The ops recomputed for a member (``needed_at``: its producer and
        the missing inputs that need recomputing, except ops recomputed before
        that first read) can also shorten the saved siblings of their outputs
        (the old instance dies at the recompute) and, for ops recomputed later
        today, their inputs (read earlier). Every other lifetime only grows, two
        of them certainly: a saved input of a new recompute lives until the
        recompute's batch at least, and the output of a recompute that moves
        earlier lives from the member's first read on. So each surviving step
        of the current schedule holds at least its current bytes minus the
        shortened storages plus the certain growth; the maximum of that bounds
        the new peak from below, and the peak drops by at most the bytes of the
        shortened storages.
        """
        graph, prof, live = self.graph, self.profile, self.structure.live_at_backward_start
        ops, values = graph.ops, graph.values
        members = self.structure.groups[root]
        unsaved = self.unsaved.union(members)
        n, recomputed = len(prof.order), prof.recompute_position
        needed_at: dict[int, int] = {}  # op to recompute -> first read that needs it
        for first_read, v in sorted((prof.first_backward_read[v], v) for v in members):
            stack = [values[v].producer] if first_read < n else []
            while stack:
                p = stack.pop()
                if p in needed_at or recomputed.get(p, first_read) < first_read:  # type: ignore[arg-type]
                    continue
                needed_at[p] = first_read  # type: ignore[index]
                stack.extend(values[x].producer for x in ops[p].inputs  # type: ignore[index]
                             if not live[x] or x in unsaved)
        added_ms = sum(ops[p].time_ms for p in sorted(needed_at) if p not in recomputed)
        first_read = min(needed_at.values())
        # Shortened lifetimes: (first, last position, bytes).
        shrink = [(max(prof.forward_free[v] for v in members) + 1, first_read - 1,
                   graph.allocated_bytes(root))]
        roots, others, moved = {root}, [], []
        for p in needed_at:
            others.extend(v for v in ops[p].outputs if live[v] and v not in unsaved)
            if p in recomputed:
                t = recomputed[p]
                moved.append(t)
                others.extend(x for x in ops[p].inputs
                              if prof.value_hi[x] == t or values[x].producer in recomputed)
        for v in others:
            r = graph.storage_root(v)
            if prof.value_lo[v] >= 0 and r not in roots:
                roots.add(r)
                shrink.append((prof.value_lo[v], prof.value_hi[v], graph.allocated_bytes(r)))
        shrink = [(a, b, size) for a, b, size in shrink if a <= b and size > 0]
        if not shrink:
            return _Candidate(root, unsaved, added_ms, -1.0)
        grow = []
        extended: dict[int, int] = {}  # storage root -> end of its growth so far
        for p, read_at in sorted(needed_at.items(), key=lambda item: -item[1]):
            if p in recomputed:
                t = recomputed[p]
                for v in ops[p].outputs:
                    if (not live[v] or v in unsaved) and values[v].view_of is None and v not in roots \
                            and prof.value_hi[v] > t:  # a dead output dies at once, wherever it runs
                        grow.append((read_at, t - 1, graph.allocated_bytes(v)))
                continue
            batch_start = read_at
            while batch_start > prof.n_forward and not ops[prof.order[batch_start - 1]].is_backward:
                batch_start -= 1
            for x in ops[p].inputs:
                sid, r = prof.forward_storage[x], graph.storage_root(x)
                if (sid >= 0 and live[x] and x not in unsaved and values[x].producer not in recomputed
                        and r not in roots and extended.get(r, -1) < batch_start):
                    extended[r] = batch_start
                    grow.append((prof.storage_hi[sid] + 1, batch_start - 1, graph.allocated_bytes(r)))
        lo = min(a for a, _, _ in (*shrink, *grow))
        hi = max(b for _, b, _ in (*shrink, *grow))
        lo, hi = min([lo, *moved]), max([hi, *moved])
        held = prof.held_bytes[lo:hi + 1].copy()
        for a, b, size in shrink:
            held[a - lo:b - lo + 1] -= size
        for a, b, size in grow:
            a, b = max(a, lo), min(b, hi)
            if a <= b:
                held[a - lo:b - lo + 1] += size
        for t in moved:
            held[t - lo] = 0  # that step moves: its current bytes say nothing
        floor = max(int(held.max()), prof.prefix_max[lo - 1] if lo > 0 else 0,
                    prof.suffix_max[hi + 1] if hi + 1 < n else 0)
        reduction_bound = min(prof.peak_bytes - floor, sum(size for _, _, size in shrink))
        return _Candidate(root, unsaved, added_ms, _ratio(reduction_bound, added_ms))

    def _advance(self) -> bool:
        """Unsave the best group; False (and exhausted) when no group lowers the peak."""
        if self.exhausted:
            return False
        candidates = sorted(self._candidates(), key=lambda c: (-c.ratio_bound, c.root))
        best: tuple[float, int] | None = None
        best_state: tuple[_Candidate, _Profile] | None = None
        for candidate in candidates:
            # Branch and bound: later candidates cannot beat the best exact ratio.
            if best is not None and (candidate.ratio_bound, -candidate.root) < best:
                break
            profile = self._evaluate(candidate.unsaved)
            key = (_ratio(self.profile.peak_bytes - profile.peak_bytes, candidate.added_ms), -candidate.root)
            if key[0] >= 0 and (best is None or key > best):
                best, best_state = key, (candidate, profile)
        if best_state is None:
            self.exhausted = True
            return False
        candidate, self.profile = best_state
        self.accepted.append(tuple(sorted(candidate.unsaved - self.unsaved)))
        self.unsaved = candidate.unsaved
        self.peaks_bytes.append(self.profile.peak_bytes)
        return True


def _greedy_run(graph: Graph) -> _GreedyRun:
    # NOTE: [Greedy cache] the run is a pure function of the (immutable) graph, so it
    # is memoized on the graph like Graph.users; a later, lower budget resumes it.
    run = graph._cache.get(_RUN_KEY)
    if run is None:
        run = graph._cache[_RUN_KEY] = _GreedyRun(graph)
    return run


def greedy_schedule(graph: Graph, budget_bytes: int) -> Schedule:
    """Unsave groups greedily until the simulated peak is <= ``budget_bytes``.

    Each iteration judges the (at most :data:`MAX_CANDIDATES` largest) groups
    live at the current peak step by their exact simulated peak reduction per
    millisecond of added recomputation, and unsaves the best (no added time
    ranks first; ties go to the lowest storage root index).

    Raises:
        BudgetInfeasible: no group lowers the peak any further while it is
            still above the budget; ``min_feasible_bytes`` is the lowest peak reached.
    """
    run = _greedy_run(graph)
    state = run.first_state_within(budget_bytes)
    if state is None:
        raise BudgetInfeasible(budget_bytes, run.peaks_bytes[-1], method="greedy")
    schedule = build_remat_schedule(graph, run.unsaved_at(state))
    peak_bytes = simulate(graph, schedule).peak_bytes
    assert peak_bytes == run.peaks_bytes[state], (
        f"greedy's fast profile ({run.peaks_bytes[state]} B) disagrees with simulate ({peak_bytes} B)"
    )
    return schedule


def min_feasible_peak_greedy(graph: Graph) -> int:
    """The smallest peak (bytes) the greedy planner reaches on ``graph``."""
    run = _greedy_run(graph)
    run.first_state_within(-1)
    return run.peaks_bytes[-1]
