"""rematc's domain errors; each docstring says how to fix it."""

from __future__ import annotations

from solvers.errors import BudgetInfeasible, format_bytes


class RematcError(RuntimeError):
    """Base class of rematc's errors."""


class BudgetTooSmall(BudgetInfeasible):
    """The memory budget is below the smallest peak any schedule reaches.

    Fix: pass ``budget >= err.min_budget_bytes`` (also in the message), or
    reduce the batch size.

    Attributes:
        budget_bytes: the budget asked for.
        min_budget_bytes: the smallest feasible peak found (bytes above the
            memory allocated when the step starts).
    """

    @property
    def min_budget_bytes(self) -> int:
        return self.min_feasible_bytes


class GraphBreakError(RematcError):
    """TorchDynamo could not capture the model's step as one graph.

    Fix: remove the construct the message names (data-dependent Python control
    flow, ``.item()``, printing, unsupported calls) from the forward, or wrap
    it so it runs outside the model passed to ``Rockmate``.
    """


class CaptureError(RematcError):
    """Capturing or compiling the training step failed; the cause is chained."""


__all__ = ["BudgetTooSmall", "CaptureError", "GraphBreakError", "RematcError", "format_bytes"]
