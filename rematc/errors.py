"""rematc's domain errors; each docstring says how to fix it."""

from __future__ import annotations

import traceback

from solvers.errors import BudgetInfeasible, format_bytes


class RematcError(RuntimeError):
    """Base class of rematc's errors."""


class BudgetTooSmall(BudgetInfeasible, RematcError):
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

    Attributes:
        reason: what Dynamo could not trace, in its words (one or two lines).
        frame: the user's source line at which capture stopped
            (``filename``, ``lineno``, ``name``, ``line``), or None when Dynamo
            names none.
    """

    def __init__(self, message: str, reason: str = "", frame: traceback.FrameSummary | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.frame = frame


class CaptureError(RematcError):
    """Capturing or compiling the training step failed; the cause is chained."""


class ScheduleFileError(RematcError, ValueError):
    """A schedule file cannot be used for this model: corrupt, unknown format, or another graph.

    Raised for a file given explicitly (``Rockmate(..., schedule=path)``); a bad
    file found in the cache only warns (:class:`RematcWarning`) and rematc plans
    again. The message names the file and what differs (expected vs found).

    Fix: re-create the file for this model, sample shapes, dtypes and loss
    (``rematc plan MODULE:FACTORY --budget B --out FILE`` or
    ``Rockmate(...).save_schedule(FILE)``), or drop ``schedule=`` to plan now.

    Attributes:
        path: the file.
        reason: what is wrong, in words.
        expected: the value rematc needed (a graph hash, a version), if any.
        found: the value the file has, if any.
    """

    def __init__(self, path: object, reason: str, expected: object = None, found: object = None) -> None:
        self.path = str(path)
        self.reason = reason
        self.expected = expected
        self.found = found
        super().__init__(f"schedule file {self.path}: {reason}")

    def __reduce__(self):  # keep pickling working with the custom __init__
        return (type(self), (self.path, self.reason, self.expected, self.found))


class RematcWarning(UserWarning):
    """Something rematc worked around, such as a bad schedule-cache entry it replaced by planning again."""


__all__ = [
    "BudgetTooSmall", "CaptureError", "GraphBreakError", "RematcError", "RematcWarning", "ScheduleFileError",
    "format_bytes",
]
