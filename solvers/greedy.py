"""The greedy rematerialization planner (and the no-remat schedule it starts from).

Values sharing one storage (a base and its views, see
:meth:`Graph.storage_root`) form a *group*: unsaving only some members of a
group frees nothing, so the planner moves whole groups. Starting from
:func:`no_remat_schedule`, each iteration takes the groups alive at the peak
step (the :data:`MAX_CANDIDATES` largest), simulates unsaving each, and
unsaves the one with the best peak reduction per millisecond of added
recomputation, until the peak fits the budget. See
:mod:`solvers.recompute` for how a set of unsaved values becomes a schedule.

Example:
    >>> from solvers import Graph, Op, Value, simulate
    >>> g = Graph(
    ...     ops=(Op("f", (0,), (1,), time_ms=1.0), Op("g", (1,), (2,), time_ms=1.0),
    ...          Op("loss", (2,), (3,), time_ms=1.0),
    ...          Op("d_loss", (), (4,), is_backward=True, recomputable=False, is_input=True),
    ...          Op("loss_bwd", (4, 2), (5,), time_ms=1.0, is_backward=True),
    ...          Op("g_bwd", (5, 1), (6,), time_ms=1.0, is_backward=True)),
    ...     values=(Value("x", 0, None), Value("a", 100, 0), Value("b", 100, 1), Value("l", 10, 2),
    ...             Value("dl", 10, 3), Value("db", 100, 4), Value("da", 100, 5)),
    ...     forward_outputs=(3,), required_at_end=(6,))
    >>> simulate(g, no_remat_schedule(g)).peak_bytes
    310
    >>> s = greedy_schedule(g, budget_bytes=300)  # recompute a instead of keeping it
    >>> s, simulate(g, s).peak_bytes
    (Schedule(C0 C1 D1 C2 | D3 C3 C4 D2 D4 C0 C5 D1 D5), 300)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import BudgetInfeasible
from .graph import Graph
from .recompute import OrderProfile, RematContext, build_remat_schedule, no_remat_schedule, remat_context
from .schedule import Schedule
from .simulate import simulate

# The schedule builders are re-exported: callers find every planner entry point here.
__all__ = ["MAX_CANDIDATES", "build_remat_schedule", "greedy_schedule", "min_feasible_peak_greedy",
           "no_remat_schedule"]

#: Candidate groups judged per greedy iteration: the largest ones alive at the peak step.
MAX_CANDIDATES = 64

_RUN_KEY = "solvers.greedy.run"


@dataclass(frozen=True, slots=True)
class _Candidate:
    root: int  # storage root of the group
    unsaved: frozenset[int]  # the unsaved set once the group joins it
    added_ms: float  # recomputation time the group adds (exact)
    ratio_bound: float  # upper bound on (peak reduction) / added_ms; < 0: cannot lower the peak


def _ratio(reduction_bytes: float, added_ms: float) -> float:
    if reduction_bytes <= 0:
        return -1.0
    return reduction_bytes / added_ms if added_ms > 0 else float("inf")


class _State:
    """One point of the trajectory: an unsaved set, its profile, and what the bound reads."""

    def __init__(self, context: RematContext, unsaved: frozenset[int], profile: OrderProfile) -> None:
        self.unsaved = unsaved
        self.profile = profile
        held = profile.held_bytes
        self.prefix_max = np.maximum.accumulate(held)
        self.suffix_max = np.maximum.accumulate(held[::-1])[::-1]
        n_values, n_forward = len(context.live), len(context.forward_phase)
        # Per value: the hull of the lifetimes of the storages of all its instances (-1: none).
        instance_value = np.array(profile.instance_value, dtype=np.int64)
        storage = np.array(profile.instance_storage, dtype=np.int64)
        has_storage = storage >= 0
        lo = np.array(profile.storage_lo, dtype=np.int64)[storage[has_storage]]
        hi = np.array(profile.storage_hi, dtype=np.int64)[storage[has_storage]]
        value_lo = np.full(n_values, len(held), dtype=np.int64)
        value_hi = np.full(n_values, -1, dtype=np.int64)
        np.minimum.at(value_lo, instance_value[has_storage], lo)
        np.maximum.at(value_hi, instance_value[has_storage], hi)
        self.value_lo: list[int] = value_lo.tolist()
        self.value_hi: list[int] = value_hi.tolist()
        # (value, last read) of the instances that die in the backward.
        self.instance_ends = {(v, last) for v, last in zip(profile.instance_value, profile.instance_last)
                              if last >= n_forward}


class _GreedyRun:
    """The greedy trajectory of one graph: states of strictly decreasing peak.

    State ``k`` unsaves the groups accepted by the first ``k`` iterations. The
    trajectory does not depend on the budget (the budget only says where to
    stop), so one run, extended on demand and kept on the graph, answers every
    budget and :func:`min_feasible_peak_greedy`.
    """

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.context = context = remat_context(graph)
        ops, values = graph.ops, graph.values
        members: dict[int, list[int]] = {}
        for p in context.forward_phase:
            for v in ops[p].outputs:
                members.setdefault(graph.storage_root(v), []).append(v)
        required = set(graph.required_at_end)
        # Groups the planner may unsave: every member recomputable, none required at the
        # end (kept anyway), the storage not resident (a view of a parameter frees nothing).
        self.groups = {
            root: tuple(vs) for root, vs in sorted(members.items())
            if graph.allocated_bytes(root) > 0
            and all(ops[values[v].producer].recomputable and v not in required for v in vs)  # type: ignore[index]
        }
        unsaved: frozenset[int] = frozenset()
        profile = context.simulate(context.backward_order(unsaved))
        assert profile is not None
        self.state = _State(context, unsaved, profile)
        self.accepted: list[tuple[int, ...]] = []  # values unsaved by each iteration
        self.peaks_bytes = [profile.peak_bytes]
        self.exhausted = False

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

    def _advance(self) -> bool:
        """Unsave the best group; False (and exhausted) when no group lowers the peak."""
        if self.exhausted:
            return False
        peak_bytes = self.state.profile.peak_bytes
        candidates = sorted(self._candidates(), key=lambda c: (-c.ratio_bound, c.root))
        best: tuple[float, int] | None = None
        best_profile: OrderProfile | None = None
        best_candidate: _Candidate | None = None
        for candidate in candidates:
            # Branch and bound: this one (and all later ones) cannot beat the best so far.
            if best is not None and (candidate.ratio_bound, -candidate.root) < best:
                break
            # The peak it must reach to tie with the best (slack for float rounding).
            need = 1.0 if best is None or candidate.added_ms == 0 else best[0] * candidate.added_ms
            backward = self.context.backward_order(candidate.unsaved)
            profile = self.context.simulate(backward, give_up_above=peak_bytes - need * (1 - 1e-9))
            if profile is None:
                continue
            key = (_ratio(peak_bytes - profile.peak_bytes, candidate.added_ms), -candidate.root)
            if key[0] >= 0 and (best is None or key > best):
                best, best_candidate, best_profile = key, candidate, profile
        if best_profile is None or best_candidate is None:
            self.exhausted = True
            return False
        self.accepted.append(tuple(sorted(best_candidate.unsaved - self.state.unsaved)))
        self.state = _State(self.context, best_candidate.unsaved, best_profile)
        self.peaks_bytes.append(best_profile.peak_bytes)
        return True

    def _candidates(self) -> list[_Candidate]:
        """Groups with a saved member whose storage is alive at the peak step, with ratio bounds."""
        prof, context = self.state.profile, self.context
        at_peak = prof.peak_position
        alive = []
        for root, members in self.groups.items():
            sid = context.forward_storage[root]
            if (sid >= 0 and prof.storage_lo[sid] <= at_peak <= prof.storage_hi[sid]
                    and any(v in prof.first_backward_read for v in members)):
                alive.append(root)
        alive.sort(key=lambda r: (-self.graph.allocated_bytes(r), r))
        candidates = []
        for root in alive[:MAX_CANDIDATES]:
            candidate = self._bound(root)
            if candidate.ratio_bound >= 0:
                candidates.append(candidate)
        return candidates

    def _bound(self, root: int) -> _Candidate:
        """Exact added time and an upper bound on the ratio of unsaving ``root``'s group.

        NOTE: [Greedy bound] Let a member's *first read* be the first backward
        step reading its forward instance. Unsaving the group changes nothing
        before the batch of recomputes in front of that step, except that the
        group's storage is gone from its last forward use on; from the first
        read on it is back and lives at least as long as before. The ops
        recomputed for the group (``needed_at``: the members' producers and the
        missing inputs they need, except ops recomputed before) may also shorten
        a saved sibling of their outputs (its old instance dies at the
        recompute) and, for ops recomputed later today that now move earlier,
        the inputs they read last (not before their new batch). All other
        lifetimes only grow, and two surely do: a saved input of a new recompute
        lives until the recompute's batch, and a recomputed output of a moved op
        lives from its new position on. So every surviving step holds at least
        its current bytes, minus the shortened storages where they may be gone,
        plus the sure growth: the largest of those bounds the new peak from
        below, and the peak drops by at most the shortened storages' bytes.
        Tests compare the choices with exhaustive simulation.
        """
        graph, state, context = self.graph, self.state, self.context
        prof, live, ops, values = state.profile, context.live, graph.ops, graph.values
        members = self.groups[root]
        unsaved = state.unsaved.union(members)
        n, recomputed = len(prof.held_bytes), prof.recompute_position
        needed_at: dict[int, int] = {}  # op to recompute -> first read that needs it
        for first_read, v in sorted((prof.first_backward_read[v], v) for v in members
                                    if v in prof.first_backward_read):
            stack = [values[v].producer]
            while stack:
                p = stack.pop()
                if p in needed_at or recomputed.get(p, first_read) < first_read:  # type: ignore[arg-type]
                    continue
                needed_at[p] = first_read  # type: ignore[index]
                stack.extend(values[x].producer for x in ops[p].inputs  # type: ignore[index]
                             if not live[x] or x in unsaved)
        added_ms = sum(ops[p].time_ms for p in sorted(needed_at) if p not in recomputed)
        if not needed_at:
            return _Candidate(root, unsaved, added_ms, -1.0)
        first_read = min(needed_at.values())
        # Shortened lifetimes: storage root -> hull of the positions where it may now be gone.
        shortened = {root: (max(context.forward_free[v] for v in members) + 1, first_read - 1)}
        moved = []

        def shorten(v: int, first: int, last: int) -> None:
            r = graph.storage_root(v)
            if state.value_hi[v] >= 0 and first <= last and graph.allocated_bytes(r) > 0:
                a, b = shortened.get(r, (first, last))
                shortened[r] = (min(a, first), max(b, last))

        for p, read_at in needed_at.items():
            # A saved sibling's old instance dies at the recompute (before read_at), unless
            # it was dead before the batch of recomputes anyway.
            for v in ops[p].outputs:
                if live[v] and v not in unsaved and state.value_hi[v] >= self._batch_start(read_at):
                    shorten(v, state.value_lo[v], min(state.value_hi[v], read_at - 1))
            if p in recomputed:
                # Moved earlier: an input it read last may die earlier, but not before the batch.
                t = recomputed[p]
                moved.append(t)
                for x in ops[p].inputs:
                    if (x, t) in state.instance_ends:
                        shorten(x, self._batch_start(read_at), t)
        shrink = [(a, b, graph.allocated_bytes(r)) for r, (a, b) in shortened.items() if a <= b]
        if not shrink:
            return _Candidate(root, unsaved, added_ms, -1.0)
        roots = set(shortened)
        grow = self._certain_growth(needed_at, unsaved, roots)
        lo = min([a for a, _, _ in (*shrink, *grow)] + moved)
        hi = max([b for _, b, _ in (*shrink, *grow)] + moved)
        held = prof.held_bytes[lo:hi + 1].copy()
        for a, b, size in shrink:
            held[a - lo:b - lo + 1] -= size
        for a, b, size in grow:
            held[a - lo:b - lo + 1] += size
        for t in moved:
            held[t - lo] = 0  # that step moves: its current bytes say nothing
        floor = max(int(held.max()), state.prefix_max[lo - 1] if lo > 0 else 0,
                    state.suffix_max[hi + 1] if hi + 1 < n else 0)
        reduction_bound = min(prof.peak_bytes - floor, sum(size for _, _, size in shrink))
        return _Candidate(root, unsaved, added_ms, _ratio(reduction_bound, added_ms))

    def _batch_start(self, position: int) -> int:
        """First position of the batch of recomputes just before the step at ``position``."""
        prof, ops, n_forward = self.state.profile, self.graph.ops, len(self.context.forward_phase)
        while position > n_forward and not ops[prof.backward[position - 1 - n_forward]].is_backward:
            position -= 1
        return position

    def _certain_growth(self, needed_at: dict[int, int], unsaved: frozenset[int],
                        roots: set[int]) -> list[tuple[int, int, int]]:
        """Lifetimes that surely grow (see NOTE [Greedy bound]), each storage counted once."""
        graph, state, context = self.graph, self.state, self.context
        prof, live, ops, values = state.profile, context.live, graph.ops, graph.values
        recomputed = prof.recompute_position
        grow: list[tuple[int, int, int]] = []
        seen = set(roots)
        for p, read_at in sorted(needed_at.items(), key=lambda item: (-item[1], item[0])):
            if p in recomputed:
                t = recomputed[p]
                for v in ops[p].outputs:
                    # A dead output dies at once, wherever it runs.
                    if ((not live[v] or v in unsaved) and values[v].view_of is None and v not in seen
                            and state.value_hi[v] > t):
                        seen.add(v)
                        grow.append((read_at, t - 1, graph.allocated_bytes(v)))
                continue
            batch_start = self._batch_start(read_at)
            for x in ops[p].inputs:
                sid, r = context.forward_storage[x], graph.storage_root(x)
                if (sid >= 0 and live[x] and x not in unsaved and values[x].producer not in recomputed
                        and r not in seen):
                    seen.add(r)
                    grow.append((prof.storage_hi[sid] + 1, batch_start - 1, graph.allocated_bytes(r)))
        return [(a, b, size) for a, b, size in grow if a <= b]


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
    alive at the current peak step by their exact simulated peak reduction per
    millisecond of added recomputation, and unsaves the best (no added time
    ranks first; ties go to the lowest storage root index). A cheap upper
    bound on each ratio (NOTE [Greedy bound]) skips simulating candidates that
    cannot win, so the choice is the one simulating them all would make. The
    trajectory is kept on the graph (NOTE [Greedy cache]): asking again, with
    any budget, only simulates what was not simulated yet.

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
        f"greedy's fast simulation ({run.peaks_bytes[state]} B) disagrees with simulate ({peak_bytes} B)"
    )
    return schedule


def min_feasible_peak_greedy(graph: Graph) -> int:
    """The smallest peak (bytes) the greedy planner reaches on ``graph``."""
    run = _greedy_run(graph)
    run.first_state_within(-1)
    return run.peaks_bytes[-1]
