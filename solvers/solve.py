"""``solve``: the one entry point that turns a graph and a budget into a verified Schedule.

Planners register in :data:`METHODS` as ``planner(graph, budget_bytes) ->
Schedule`` and raise :class:`BudgetInfeasible` (carrying the smallest peak
they reach) when they cannot fit. ``"auto"`` runs the first name of
:data:`AUTO_ORDER` that is registered. Whatever a planner returns is checked
and simulated here before anyone sees it.

Example:
    >>> from solvers import Graph, Op, Value
    >>> g = Graph(
    ...     ops=(Op("f", (0,), (1,), time_ms=1.0),
    ...          Op("d_h", (), (2,), is_backward=True, recomputable=False, is_input=True),
    ...          Op("f_bwd", (2, 1), (3,), time_ms=1.0, is_backward=True)),
    ...     values=(Value("x", 0, None), Value("h", 64, 0), Value("dh", 64, 1), Value("dx", 64, 2)),
    ...     forward_outputs=(1,), required_at_end=(3,))
    >>> solve(g, budget_bytes=192, method="none")
    Schedule(C0 | C1 C2 D1 D2)
    >>> min_feasible_peak(g)
    192
"""

from __future__ import annotations

from numbers import Integral
from typing import Callable

from .errors import BudgetInfeasible, PlannerError
from .graph import Graph
from .greedy import greedy_schedule, min_feasible_peak_greedy
from .hierarchical import hierarchical_min_feasible_peak, hybrid_min_feasible_peak, solve_auto, solve_hierarchical
from .ilp import ilp_min_feasible_peak, solve_ilp
from .recompute import no_remat_schedule
from .schedule import Schedule
from .simulate import check, simulate

Planner = Callable[[Graph, int], Schedule]


def _no_remat(graph: Graph, budget_bytes: int) -> Schedule:
    schedule = no_remat_schedule(graph)
    peak = simulate(graph, schedule).peak_bytes
    if peak > budget_bytes:
        raise BudgetInfeasible(budget_bytes, peak, method="none")
    return schedule


#: Planner name -> planner. Register a new one with ``METHODS["name"] = planner``.
METHODS: dict[str, Planner] = {
    "none": _no_remat,
    "greedy": greedy_schedule,
}
#: What ``"auto"`` runs: the first name here that is in METHODS (resolved at call time).
AUTO_ORDER: list[str] = ["greedy"]
#: Fast answers for :func:`min_feasible_peak`; other planners are asked at budget 0.
MIN_PEAK: dict[str, Callable[[Graph], int]] = {
    "greedy": min_feasible_peak_greedy,
    "none": lambda graph: simulate(graph, no_remat_schedule(graph)).peak_bytes,
}


# The MILP planners (solvers.ilp, solvers.hierarchical). "hybrid" is what "auto" runs:
# the whole-graph MILP for small graphs, the hierarchical planner (chain of block MILP
# menus + Rotor DP) otherwise, greedy as the fallback; each answers its own minimum.
def _ilp(graph: Graph, budget_bytes: int) -> Schedule:
    return solve_ilp(graph, budget_bytes).schedule


def _hierarchical(graph: Graph, budget_bytes: int) -> Schedule:
    return solve_hierarchical(graph, budget_bytes).schedule


METHODS.update(ilp=_ilp, hierarchical=_hierarchical, hybrid=solve_auto)
AUTO_ORDER.insert(0, "hybrid")
MIN_PEAK.update(ilp=ilp_min_feasible_peak, hierarchical=hierarchical_min_feasible_peak,
                hybrid=hybrid_min_feasible_peak)


def _resolve(method: str) -> str:
    if not isinstance(method, str) or (method != "auto" and method not in METHODS):
        raise ValueError(f"method must be 'auto' or one of {sorted(METHODS)}, got {method!r}")
    if method == "auto":
        return next(m for m in AUTO_ORDER if m in METHODS)
    return method


def _validated_budget(budget_bytes: int) -> int:
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, Integral):
        raise ValueError(f"budget_bytes must be an int >= 0, got {budget_bytes!r} "
                         f"({type(budget_bytes).__name__})")
    if budget_bytes < 0:
        raise ValueError(f"budget_bytes must be an int >= 0, got {budget_bytes!r}")
    return int(budget_bytes)


def solve(graph: Graph, budget_bytes: int, method: str = "auto") -> Schedule:
    """A schedule for ``graph`` whose simulated peak is at most ``budget_bytes``.

    Args:
        graph: the training graph.
        budget_bytes: the peak allowed, in bytes above what is allocated when the step starts.
        method: ``"auto"`` or a name in :data:`METHODS`.

    Raises:
        BudgetInfeasible: no schedule found fits; ``min_feasible_bytes`` says what would.
        ValueError: a malformed argument (named in the message).
    """
    budget_bytes = _validated_budget(budget_bytes)
    name = _resolve(method)
    schedule = METHODS[name](graph, budget_bytes)
    check(graph, schedule)
    peak = simulate(graph, schedule, validate=False).peak_bytes
    if peak > budget_bytes:  # the promise itself: a real check, not an assert that `python -O` removes
        raise PlannerError(f"planner {name!r} returned a schedule peaking at {peak} B > budget {budget_bytes} B")
    return schedule


def min_feasible_peak(graph: Graph, method: str = "auto") -> int:
    """The smallest simulated peak (bytes) ``method`` reaches on ``graph``.

    ``solve(graph, min_feasible_peak(graph, method), method)`` succeeds.
    """
    name = _resolve(method)
    if name in MIN_PEAK:
        return MIN_PEAK[name](graph)
    try:
        METHODS[name](graph, 0)
    except BudgetInfeasible as error:
        return error.min_feasible_bytes
    return 0
