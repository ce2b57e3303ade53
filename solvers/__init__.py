"""Torch-free scheduling: the training-graph IR, the memory model and the planners.

Pipeline inside this package::

    Graph  --solve(graph, budget_bytes, method)-->  Schedule  --simulate-->  peak, time

- :mod:`solvers.graph`: :class:`Graph`, :class:`Op`, :class:`Value`.
- :mod:`solvers.schedule`: :class:`Schedule`, :class:`Step`, :func:`schedule_from_order`.
- :mod:`solvers.simulate`: :func:`simulate` (the one memory/time model) and :func:`check`.
- :mod:`solvers.recompute`: the schedule of a set of unsaved (recomputed) values.
- :mod:`solvers.greedy`: the no-remat schedule and the greedy planner.
- :mod:`solvers.solve`: :func:`solve`, the dispatcher every caller uses.
- :mod:`solvers.ilp`: the whole-graph MILP (Checkmate's formulation), :func:`solve_ilp`.
- :mod:`solvers.partition`, :mod:`solvers.menus`, :mod:`solvers.rotor`, :mod:`solvers.hierarchical`:
  the chain of blocks, per-block option menus, the chain DP and :func:`solve_hierarchical`.
- :mod:`solvers.checkmate_data`: Checkmate's published graphs as :class:`Graph`.
"""

from .errors import BudgetInfeasible, PlannerError, format_bytes
from .graph import Graph, GraphError, Op, Value
from .schedule import Schedule, Step, schedule_from_order
from .simulate import ScheduleError, SimulationResult, check, simulate
from .greedy import greedy_schedule, min_feasible_peak_greedy, no_remat_schedule
from .recompute import build_remat_schedule
from .solve import METHODS, min_feasible_peak, solve
from .checkmate_data import load_checkmate_graph
from .hierarchical import (ChainSolver, HierarchicalResult, HierarchicalSettings, hierarchical_min_feasible_peak,
                           hybrid_min_feasible_peak, solve_auto, solve_hierarchical)
from .ilp import IlpResult, RematIlp, ilp_min_feasible_peak, solve_ilp
from .milp import MilpSettings
from .partition import Chain, partition_chain
from .rotor import ChainBlock, ChainOption, ChainPlan, solve_chain

__all__ = [
    "Chain",
    "ChainBlock",
    "ChainOption",
    "ChainPlan",
    "ChainSolver",
    "HierarchicalResult",
    "HierarchicalSettings",
    "IlpResult",
    "MilpSettings",
    "RematIlp",
    "hierarchical_min_feasible_peak",
    "hybrid_min_feasible_peak",
    "ilp_min_feasible_peak",
    "load_checkmate_graph",
    "partition_chain",
    "solve_auto",
    "solve_chain",
    "solve_hierarchical",
    "solve_ilp",
    "METHODS",
    "BudgetInfeasible",
    "PlannerError",
    "build_remat_schedule",
    "greedy_schedule",
    "min_feasible_peak",
    "min_feasible_peak_greedy",
    "no_remat_schedule",
    "solve",
    "Graph",
    "GraphError",
    "Op",
    "Schedule",
    "ScheduleError",
    "SimulationResult",
    "Step",
    "Value",
    "check",
    "format_bytes",
    "schedule_from_order",
    "simulate",
]
