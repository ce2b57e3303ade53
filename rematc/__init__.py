"""rematc: automatic rematerialization for PyTorch training under a memory budget.

The pipeline, one stage a module::

    capture   rematc/capture.py   TorchDynamo + AOTAutograd: joint forward+backward aten graph
    lower     rematc/lower.py     fx joint graph -> solvers.Graph (torch-free IR)
    profile   profiler/           per-op time and memory
    solve     solvers/            schedule under the budget (greedy, ILP, chain DP)
    simulate  solvers/simulate.py the one memory/time model
    codegen   rematc/codegen.py   schedule -> forward and backward GraphModules

Use :class:`Rockmate`::

    model = Rockmate(model, sample, budget="512MiB")
    loss = model(x).sum(); loss.backward()
"""

from .api import Plan, Rockmate
from .budget import parse_budget
from .errors import BudgetTooSmall, CaptureError, GraphBreakError, RematcError, RematcWarning, ScheduleFileError
from .explain import Explanation

__version__ = "0.1.0"

__all__ = [
    "BudgetTooSmall", "CaptureError", "Explanation", "GraphBreakError", "Plan", "RematcError", "RematcWarning",
    "Rockmate", "ScheduleFileError", "parse_budget",
]
