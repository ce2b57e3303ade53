"""Whole-graph optimal rematerialization: Checkmate's MILP on this package's IR.

:func:`solve_ilp` returns the fastest schedule the MILP finds under a budget
(see :mod:`solvers.ilp_model` for the formulation and how views, workspace,
phases and end-alive values map into it), together with the LP relaxation's
(or the MIP's) lower bound, so the gap to the optimum can be stated. It is
never worse than what is already known: the no-remat schedule when it fits,
greedy, and a caller's fallback schedule compete with the MILP's incumbent,
and the best simulated one is returned. Every returned schedule is checked and
simulated; the peak it reports is :func:`simulate`'s.

Bounds and optimality are relative to the MILP's space: Checkmate's stages
follow one topological order (the graph's, forward ops first).

Example:
    >>> r = solve_ilp(graph, budget_bytes=3000)                  # doctest: +SKIP
    >>> r.peak_bytes <= 3000, r.optimal, f"{r.gap:.1%}"          # doctest: +SKIP
    (True, True, '0.0%')
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from numbers import Integral

import numpy as np

from .contract import Contraction, contract_views
from .errors import BudgetInfeasible
from .graph import Graph
from .ilp_model import (Formulation, accounting_peak_bytes, build_formulation, order_from_stages,
                        stages_from_solution)
from .greedy import greedy_schedule, min_feasible_peak_greedy
from .milp import MilpModel, MilpSettings, MilpSolver
from .recompute import no_remat_schedule
from .schedule import Schedule, schedule_from_order, without_dead_recomputations
from .simulate import SimulationResult, check, simulate

#: When a solution's simulated peak exceeds the budget (solver tolerances are
#: about 1e-7 of the model's memory unit), the budget is shrunk by this
#: fraction and the MILP solved again.
BUDGET_SAFETY = 1e-6


@dataclass(frozen=True, slots=True)
class IlpResult:
    """A schedule from :func:`solve_ilp` and what is known about its optimality.

    Attributes:
        schedule: the returned schedule (checked; fits the budget under simulate).
        time_ms: its simulated time.
        peak_bytes: its simulated peak.
        kept_bytes: bytes live when its forward phase ends (simulated).
        lower_bound_time_ms: a proved lower bound on the MILP optimum (LP
            relaxation or MIP dual bound, whichever is higher).
        optimal: the MILP proved no schedule in its space is faster (within ``mip_rel_gap``).
        solve_seconds: wall time of the whole call.
        source: where the schedule came from: "no_remat", "ilp", "greedy", "fallback".
        predicted_peak_bytes: the MILP's memory count of the returned stages
            (-1 when the schedule did not come from the MILP). Never below
            ``peak_bytes``.
    """

    schedule: Schedule
    time_ms: float
    peak_bytes: int
    kept_bytes: int
    lower_bound_time_ms: float
    optimal: bool
    solve_seconds: float
    source: str
    predicted_peak_bytes: int = -1

    @property
    def gap(self) -> float:
        """Relative gap of ``time_ms`` above the lower bound (0 when optimal)."""
        if self.lower_bound_time_ms <= 0:
            return math.inf if self.time_ms > 0 else 0.0
        return max(0.0, self.time_ms / self.lower_bound_time_ms - 1.0)


@dataclass(slots=True)
class RematIlp:
    """The MILP of one graph, built once and solved at many (peak, kept) budgets.

    Example:
        >>> ilp = RematIlp(graph)                                    # doctest: +SKIP
        >>> stages, status, bound_ms = ilp.solve_stages(4000)        # doctest: +SKIP
    """

    graph: Graph
    settings: MilpSettings = field(default_factory=MilpSettings)
    contraction: Contraction = field(init=False)
    form: Formulation = field(init=False)
    solver: MilpSolver = field(init=False)
    last_values: np.ndarray | None = field(init=False, default=None)
    last_min_peak_schedule: Schedule | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.contraction = contract_views(self.graph)  # the MILP sees views folded into their makers
        self.form = build_formulation(self.contraction.graph)
        self.solver = MilpSolver(self.form.model, self.settings)

    def _set_budgets(self, budget_bytes: float, kept_budget_bytes: float | None) -> None:
        scale = self.form.bytes_scale
        self.solver.set_bounds(self.form.budget_column, budget_bytes / scale, budget_bytes / scale)
        kept = math.inf if kept_budget_bytes is None else kept_budget_bytes / scale
        self.solver.set_bounds(self.form.kept_column, 0.0, kept)

    def lp_bound_ms(self, budget_bytes: float, kept_budget_bytes: float | None = None) -> float:
        """The LP relaxation's optimum (a lower bound on the MILP); inf when the LP is infeasible."""
        self._set_budgets(budget_bytes, kept_budget_bytes)
        solution = self.solver.solve(relax=True)
        if solution.status == "infeasible":
            return math.inf
        return solution.objective if solution.status == "optimal" else 0.0

    def solve_stages(
        self, budget_bytes: float, kept_budget_bytes: float | None = None, *, cutoff_ms: float | None = None,
    ) -> tuple[list[list[int]] | None, str, float]:
        """Solve the MIP; return (stages or None, status, proved lower bound in ms).

        With ``cutoff_ms``, only schedules not slower than it are searched; an
        "infeasible" status then means none exists (the bound becomes ``cutoff_ms``).
        """
        self._set_budgets(budget_bytes, kept_budget_bytes)
        solution = self.solver.solve(cutoff=cutoff_ms)
        self.last_values = solution.values if solution.has_solution else None
        if not solution.has_solution:
            bound = cutoff_ms if (solution.status == "infeasible" and cutoff_ms is not None) else (
                math.inf if solution.status == "infeasible" else max(solution.bound, 0.0))
            return None, solution.status, bound
        return stages_from_solution(self.form, solution.values), solution.status, max(solution.bound, 0.0)

    def schedule_of(self, stages: list[list[int]]) -> Schedule:
        forward, backward = order_from_stages(self.form.layout, stages)
        expand = self.contraction.expand
        forward, backward = expand(forward), expand(backward)
        # The MILP is indifferent to zero-cost dead recomputations (a buffer's update): drop them.
        return schedule_from_order(self.graph, forward, without_dead_recomputations(self.graph, forward, backward))

    def predicted_peak_bytes(self, stages: list[list[int]]) -> int:
        return accounting_peak_bytes(self.contraction.graph, self.form.layout, stages)

    def min_peak_bytes(self) -> tuple[int, bool]:
        """The smallest peak the MILP can reach: (simulated peak of its schedule, proved optimal).

        Solves a copy of the model whose objective is the budget column.
        """
        model = self.form.model
        costs = [0.0] * model.num_columns
        costs[self.form.budget_column] = 1.0
        copy = MilpModel(model.lower, model.upper, costs, model.integer, model.row_lower, model.row_upper,
                         model.entry_rows, model.entry_cols, model.entry_values, 0.0)
        solver = MilpSolver(copy, self.settings)
        solver.set_bounds(self.form.budget_column, 0.0, math.inf)
        solver.set_bounds(self.form.kept_column, 0.0, math.inf)
        solution = solver.solve()
        if not solution.has_solution:
            return -1, False
        stages = stages_from_solution(self.form, solution.values)
        self.last_min_peak_schedule = self.schedule_of(stages)
        peak = simulate(self.graph, self.last_min_peak_schedule).peak_bytes
        return peak, solution.status == "optimal"


def solve_ilp(
    graph: Graph,
    budget_bytes: int,
    *,
    settings: MilpSettings | None = None,
    kept_budget_bytes: int | None = None,
    fallback: Schedule | None = None,
    use_greedy: bool = True,
) -> IlpResult:
    """The fastest schedule the MILP finds with simulated peak <= ``budget_bytes``.

    Args:
        graph: the training graph.
        budget_bytes: the peak budget.
        settings: solver settings (time limit, threads, backend).
        kept_budget_bytes: also bound the bytes live when the forward phase ends.
        fallback: a schedule known to fit, returned if the MILP does no better.
        use_greedy: also try the greedy planner as a fallback.

    Raises:
        BudgetInfeasible: neither the MILP nor any fallback fits the budget;
            ``min_feasible_bytes`` is the smallest peak the MILP can reach.
    """
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, Integral) or budget_bytes < 0:
        raise ValueError(f"budget_bytes must be an int >= 0, got {budget_bytes!r}")
    budget_bytes = int(budget_bytes)
    began = time.perf_counter()
    settings = settings if settings is not None else MilpSettings()
    candidates = _known_schedules(graph, budget_bytes, kept_budget_bytes, fallback, use_greedy)
    smallest = _min_peak_cache(graph, settings).get("schedule")
    if smallest is not None:  # the MILP's smallest-peak schedule, when an earlier call found it
        sim = simulate(graph, smallest)
        if sim.peak_bytes <= budget_bytes and (kept_budget_bytes is None
                                               or sim.live_after_forward_bytes <= kept_budget_bytes):
            candidates.append(("ilp_min_peak", sim, smallest))
    best = min(candidates, key=lambda c: (c[1].time_ms, c[1].peak_bytes)) if candidates else None
    cache = _min_peak_cache(graph, settings)
    if best is None and cache.get("proved") and budget_bytes < cache["peak"]:
        raise BudgetInfeasible(budget_bytes, cache["peak"], method="ilp")  # below the proved minimum
    if best is not None and best[0] == "no_remat":
        sim = best[1]
        return IlpResult(best[2], sim.time_ms, sim.peak_bytes, sim.live_after_forward_bytes, sim.time_ms,
                         True, time.perf_counter() - began, "no_remat")
    ilp = RematIlp(graph, settings)
    lp_bound = ilp.lp_bound_ms(budget_bytes, kept_budget_bytes)
    cutoff = best[1].time_ms * (1 + 1e-9) if best is not None else None
    predicted = -1
    for shrink in (1.0, 1.0 - BUDGET_SAFETY):
        stages, status, mip_bound = ilp.solve_stages(
            budget_bytes * shrink, None if kept_budget_bytes is None else kept_budget_bytes * shrink,
            cutoff_ms=cutoff)
        if stages is None:
            break
        schedule = ilp.schedule_of(stages)
        check(graph, schedule)
        sim = simulate(graph, schedule, validate=False)
        predicted = ilp.predicted_peak_bytes(stages)
        assert sim.peak_bytes <= predicted, (
            f"MILP accounting ({predicted} B) below simulate ({sim.peak_bytes} B): formulation bug")
        kept_ok = kept_budget_bytes is None or sim.live_after_forward_bytes <= kept_budget_bytes
        if sim.peak_bytes <= budget_bytes and kept_ok:
            if best is None or sim.time_ms < best[1].time_ms:
                best = ("ilp", sim, schedule)
            break
    bound = max(lp_bound, mip_bound)
    if best is None:  # the time limit struck, or the budget is below the minimum
        minimum = ilp_min_feasible_peak(graph, settings)
        best = _fitting_minimum(graph, settings, budget_bytes, kept_budget_bytes) if minimum <= budget_bytes else None
        if best is None:
            raise BudgetInfeasible(budget_bytes, minimum, method="ilp")
    source, sim, schedule = best
    optimal = status == "optimal" or (status == "infeasible" and cutoff is not None)
    if source != "ilp":
        predicted = -1
        bound = min(bound, sim.time_ms) if optimal else bound
    return IlpResult(schedule, sim.time_ms, sim.peak_bytes, sim.live_after_forward_bytes,
                     min(bound, sim.time_ms), optimal, time.perf_counter() - began, source, predicted)


def _fitting_minimum(graph: Graph, settings: MilpSettings, budget_bytes: int,
                     kept_budget_bytes: int | None) -> tuple[str, SimulationResult, Schedule] | None:
    """A schedule reaching the smallest peak that fits both budgets, or None.

    :func:`ilp_min_feasible_peak` is the lower of the MILP's smallest peak and
    greedy's: the MILP's schedule may be missing (it found none) or above the
    budget (greedy's minimum was lower), so each is simulated and checked
    against both budgets before it is returned (greedy even with
    ``use_greedy=False``: here it is the schedule the minimum promised).
    """
    makers = [("ilp_min_peak", lambda: _min_peak_cache(graph, settings).get("schedule")),
              ("greedy", lambda: greedy_schedule(graph, budget_bytes))]
    for source, make in makers:
        try:
            schedule = make()
        except BudgetInfeasible:
            continue
        if schedule is None:
            continue
        sim = simulate(graph, schedule)
        if sim.peak_bytes <= budget_bytes and (kept_budget_bytes is None
                                               or sim.live_after_forward_bytes <= kept_budget_bytes):
            return source, sim, schedule
    return None


def _known_schedules(graph: Graph, budget_bytes: int, kept_budget_bytes: int | None,
                     fallback: Schedule | None, use_greedy: bool) -> list[tuple[str, SimulationResult, Schedule]]:
    """Schedules known without the MILP that fit: (source, simulation, schedule)."""
    found = []
    makers = [("no_remat", lambda: no_remat_schedule(graph))]
    if use_greedy:
        makers.append(("greedy", lambda: greedy_schedule(graph, budget_bytes)))
    if fallback is not None:
        makers.append(("fallback", lambda: fallback))
    for source, make in makers:
        try:
            schedule = make()
            sim = simulate(graph, schedule)
        except (BudgetInfeasible, ValueError):
            continue
        kept_ok = kept_budget_bytes is None or sim.live_after_forward_bytes <= kept_budget_bytes
        if sim.peak_bytes <= budget_bytes and kept_ok:
            found.append((source, sim, schedule))
    return found


def ilp_min_feasible_peak(graph: Graph, settings: MilpSettings | None = None) -> int:
    """The smallest budget :func:`solve_ilp` meets: the MILP's smallest peak (its optimum
    when proved within the time limit), or greedy's when lower. Computed once per graph."""
    cache = _min_peak_cache(graph, settings if settings is not None else MilpSettings())
    if "peak" not in cache:
        ilp = RematIlp(graph, settings if settings is not None else MilpSettings())
        peak, proved = ilp.min_peak_bytes()
        greedy = min_feasible_peak_greedy(graph)
        if peak > 0 and ilp.last_min_peak_schedule is not None:
            cache["schedule"] = ilp.last_min_peak_schedule
        cache["peak"] = min(greedy, peak) if peak > 0 else greedy
        cache["proved"] = proved
    return int(cache["peak"])


def _min_peak_cache(graph: Graph, settings: MilpSettings | None) -> dict:
    # NOTE: [Solver cache] the graph is immutable: its MILP minimum is memoized on it, so
    # solve_ilp and ilp_min_feasible_peak give the same answer every time (time limits aside).
    return graph._cache.setdefault(("solvers.ilp.min_peak", settings or MilpSettings()), {})
