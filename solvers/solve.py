"""``solve``: the one entry point that turns a graph and a budget into a verified Schedule.

Planners register in :data:`METHODS` as ``planner(graph, budget_bytes) ->
Schedule`` and raise :class:`BudgetInfeasible` when they cannot fit. Whatever
a planner returns is checked and simulated here before anyone sees it.
"""

from __future__ import annotations

from typing import Callable

from .errors import BudgetInfeasible
from .graph import Graph
from .greedy import greedy_schedule, min_feasible_peak_greedy, no_remat_schedule
from .schedule import Schedule
from .simulate import check, simulate

Planner = Callable[[Graph, int], Schedule]


def _no_remat(graph: Graph, budget_bytes: int) -> Schedule:
    schedule = no_remat_schedule(graph)
    peak = simulate(graph, schedule).peak_bytes
    if peak > budget_bytes:
        raise BudgetInfeasible(budget_bytes, peak, method="none")
    return schedule


METHODS: dict[str, Planner] = {
    "none": _no_remat,
    "greedy": greedy_schedule,
}
# "auto" is resolved at call time so planners registered later are picked up.
AUTO_ORDER: list[str] = ["greedy"]
MIN_PEAK: dict[str, Callable[[Graph], int]] = {
    "greedy": min_feasible_peak_greedy,
    "none": lambda graph: simulate(graph, no_remat_schedule(graph)).peak_bytes,
}


def _resolve(method: str) -> str:
    if method == "auto":
        return next(m for m in AUTO_ORDER if m in METHODS)
    if method not in METHODS:
        raise ValueError(f"method must be 'auto' or one of {sorted(METHODS)}, got {method!r}")
    return method


def solve(graph: Graph, budget_bytes: int, method: str = "auto") -> Schedule:
    """A schedule for ``graph`` whose simulated peak is at most ``budget_bytes``.

    Args:
        graph: the training graph.
        budget_bytes: the peak allowed, in bytes above the start of the step.
        method: ``"auto"`` or a name in :data:`METHODS`.

    Raises:
        BudgetInfeasible: no schedule found fits; ``min_feasible_bytes`` says what would.
        ValueError: a malformed argument (named in the message).
    """
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 0:
        raise ValueError(f"budget_bytes must be an int >= 0, got {budget_bytes!r}")
    name = _resolve(method)
    schedule = METHODS[name](graph, budget_bytes)
    check(graph, schedule)
    peak = simulate(graph, schedule, validate=False).peak_bytes
    assert peak <= budget_bytes, f"planner {name!r} returned a schedule peaking at {peak} > budget {budget_bytes}"
    return schedule


def min_feasible_peak(graph: Graph, method: str = "auto") -> int:
    """The smallest simulated peak ``method`` reaches on ``graph``."""
    name = _resolve(method)
    if name in MIN_PEAK:
        return MIN_PEAK[name](graph)
    try:
        METHODS[name](graph, 0)
    except BudgetInfeasible as error:
        return error.min_feasible_bytes
    return 0
