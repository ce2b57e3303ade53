"""Errors raised by the solvers (torch-free; ``rematc.errors`` re-exports them)."""

from __future__ import annotations


class BudgetInfeasible(ValueError):
    """No schedule found fits the memory budget.

    Fix: raise the budget to at least ``min_feasible_bytes`` (the smallest peak
    the solver could reach), or shrink the batch.

    Attributes:
        budget_bytes: the budget asked for.
        min_feasible_bytes: the smallest simulated peak the solver reached.
    """

    def __init__(self, budget_bytes: int, min_feasible_bytes: int, method: str = "") -> None:
        self.budget_bytes = int(budget_bytes)
        self.min_feasible_bytes = int(min_feasible_bytes)
        self.method = method
        by = f" by solver {method!r}" if method else ""
        super().__init__(
            f"budget of {format_bytes(budget_bytes)} is below the smallest feasible peak "
            f"found{by}: {format_bytes(min_feasible_bytes)} ({min_feasible_bytes} bytes); "
            f"use a budget >= {min_feasible_bytes} bytes"
        )

    def __reduce__(self):  # keep pickling (multiprocessing) working with the custom __init__
        return (type(self), (self.budget_bytes, self.min_feasible_bytes, self.method))


class PlannerError(RuntimeError):
    """A planner broke its contract (a schedule over the budget): a bug in rematc, never the user's input."""


def format_bytes(n: float) -> str:
    """Human-readable binary size: ``format_bytes(3 * 2**20) == '3.00 MiB'``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"
