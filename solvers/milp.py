"""A small sparse mixed-integer model and the two backends that solve it.

The rematerialization ILPs (:mod:`solvers.ilp`) have tens of thousands of
columns. Building them as PuLP expressions costs seconds of Python per model,
so the formulation is written once into :class:`MilpModel` (numpy arrays:
column bounds, costs, integrality, rows in COO form) and handed to:

- HiGHS through ``highspy`` (the default when installed): the arrays go in as
  one CSR block, the same instance is re-solved after bound changes (menus of
  budgets), a known solution can be passed as a start, and the MIP dual bound
  is read back;
- PuLP with its bundled CBC otherwise (or with ``backend="pulp"``), through
  ``pulp.LpProblem`` built from the same arrays.

NOTE: [Why not PuLP's HiGHS wrapper] ``pulp.HiGHS`` rebuilds the model row by
row from PuLP expressions and has no warm start; with highspy present we pass
the same model to HiGHS directly. PuLP stays the portable fallback.

Example:
    >>> m = MilpModel()
    >>> x = m.add_column(0, 1, cost=-1.0, integer=True)
    >>> y = m.add_column(0, 1, cost=-1.0, integer=True)
    >>> _ = m.add_row([x, y], [1.0, 1.0], upper=1.0)
    >>> s = solve_milp(m, MilpSettings(time_limit_s=5))
    >>> s.status, round(s.objective, 3)
    ('optimal', -1.0)
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Iterator, Literal, Sequence

import numpy as np

try:  # highspy is optional: PuLP+CBC is the fallback.
    import highspy

    HAVE_HIGHS = True
except ImportError:  # pragma: no cover - depends on the environment
    highspy = None  # type: ignore[assignment]
    HAVE_HIGHS = False

Backend = Literal["auto", "highs", "pulp"]
MilpStatus = Literal["optimal", "feasible", "infeasible", "no_solution"]


@dataclass(frozen=True, slots=True)
class MilpSettings:
    """Solver settings (a frozen dataclass so it can key caches).

    Attributes:
        time_limit_s: wall-clock limit of one MIP solve.
        threads: solver threads (1 in tests; the CI machine has 2 cores).
        mip_rel_gap: stop when the incumbent is within this relative gap of the bound.
        backend: "highs" (highspy), "pulp" (PuLP+CBC), or "auto" (highs when installed).
        verbose: print the solver log.
        highs_options: extra HiGHS options as ``(name, value)`` pairs.
    """

    time_limit_s: float = 60.0
    threads: int = 1
    mip_rel_gap: float = 1e-4
    backend: Backend = "auto"
    verbose: bool = False
    highs_options: tuple[tuple[str, bool | int | float | str], ...] = ()

    def __post_init__(self) -> None:
        if self.time_limit_s <= 0:
            raise ValueError(f"time_limit_s must be > 0, got {self.time_limit_s}")
        if self.backend not in ("auto", "highs", "pulp"):
            raise ValueError(f"backend must be 'auto', 'highs' or 'pulp', got {self.backend!r}")


@dataclass(frozen=True, slots=True)
class MilpSolution:
    """Outcome of one solve.

    Attributes:
        status: "optimal", "feasible" (time limit with an incumbent),
            "infeasible" (proved), "no_solution" (limit hit without incumbent).
        values: column values (empty without a solution).
        objective: incumbent objective (inf without one).
        bound: proved lower bound on the objective (-inf when unknown).
        seconds: solver wall time.
    """

    status: MilpStatus
    values: np.ndarray
    objective: float
    bound: float
    seconds: float

    @property
    def has_solution(self) -> bool:
        return self.status in ("optimal", "feasible")


@dataclass(slots=True)
class MilpModel:
    """A minimisation MILP under construction: columns, then rows in COO form."""

    lower: list[float] = field(default_factory=list)
    upper: list[float] = field(default_factory=list)
    cost: list[float] = field(default_factory=list)
    integer: list[bool] = field(default_factory=list)
    row_lower: list[float] = field(default_factory=list)
    row_upper: list[float] = field(default_factory=list)
    entry_rows: list[int] = field(default_factory=list)
    entry_cols: list[int] = field(default_factory=list)
    entry_values: list[float] = field(default_factory=list)
    objective_offset: float = 0.0

    @property
    def num_columns(self) -> int:
        return len(self.lower)

    @property
    def num_rows(self) -> int:
        return len(self.row_lower)

    def add_column(self, lower: float, upper: float, *, cost: float = 0.0, integer: bool = False) -> int:
        """Add a column; return its index."""
        self.lower.append(lower)
        self.upper.append(upper)
        self.cost.append(cost)
        self.integer.append(integer)
        return len(self.lower) - 1

    def add_row(
        self, columns: Sequence[int], coefficients: Sequence[float], *,
        lower: float = -math.inf, upper: float = math.inf,
    ) -> int:
        """Add ``lower <= sum(coef * x[col]) <= upper``; return the row index."""
        row = len(self.row_lower)
        self.row_lower.append(lower)
        self.row_upper.append(upper)
        self.entry_rows.extend([row] * len(columns))
        self.entry_cols.extend(columns)
        self.entry_values.extend(coefficients)
        return row

    def csr(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows as CSR arrays (starts, column indices, values), duplicates summed."""
        rows = np.asarray(self.entry_rows, dtype=np.int64)
        cols = np.asarray(self.entry_cols, dtype=np.int64)
        vals = np.asarray(self.entry_values, dtype=np.float64)
        order = np.lexsort((cols, rows))
        rows, cols, vals = rows[order], cols[order], vals[order]
        if len(rows):
            keep = np.ones(len(rows), dtype=bool)
            keep[1:] = (rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1])
            group = np.cumsum(keep) - 1
            vals = np.bincount(group, weights=vals).astype(np.float64)
            rows, cols = rows[keep], cols[keep]
        starts = np.searchsorted(rows, np.arange(self.num_rows + 1)).astype(np.int32)
        return starts, cols.astype(np.int32), vals


class MilpSolver:
    """A model loaded into a backend, re-solvable after column bound changes.

    Example:
        >>> m = MilpModel(); x = m.add_column(0, 10, cost=1.0)
        >>> solver = MilpSolver(m, MilpSettings())
        >>> solver.set_bounds(x, 3, 10); round(solver.solve().objective, 3)
        3.0
    """

    def __init__(self, model: MilpModel, settings: MilpSettings) -> None:
        self.model = model
        self.settings = settings
        self.backend = _pick_backend(settings.backend)
        self._lower = np.asarray(model.lower, dtype=np.float64)
        self._upper = np.asarray(model.upper, dtype=np.float64)
        self._highs = _load_highs(model, settings) if self.backend == "highs" else None

    def set_bounds(self, column: int, lower: float, upper: float) -> None:
        """Change one column's bounds for the next solves."""
        self._lower[column], self._upper[column] = lower, upper
        if self._highs is not None:
            self._highs.changeColBounds(column, lower, upper)

    def solve(self, *, relax: bool = False, start: np.ndarray | None = None,
              cutoff: float | None = None) -> MilpSolution:
        """Solve the MIP (or its LP relaxation with ``relax``).

        Args:
            relax: drop integrality (the LP bound).
            start: a candidate solution handed to the solver (ignored when infeasible).
            cutoff: prune solutions whose objective is not below this value.
        """
        if self.backend == "highs":
            return self._solve_highs(relax, start, cutoff)
        return _solve_pulp(self.model, self._lower, self._upper, self.settings, relax)

    def _solve_highs(self, relax: bool, start: np.ndarray | None, cutoff: float | None) -> MilpSolution:
        h = self._highs
        assert h is not None, "highs backend without an instance"
        n = self.model.num_columns
        integrality = np.asarray(self.model.integer, dtype=bool)
        integer = integrality & (not relax)
        kinds = [highspy.HighsVarType.kInteger if i else highspy.HighsVarType.kContinuous for i in integer]
        h.changeColsIntegrality(n, np.arange(n, dtype=np.int32), np.asarray(kinds))
        h.setOptionValue("objective_bound", math.inf if cutoff is None else float(cutoff))
        h.clearSolver()
        if start is not None and not relax:
            solution = highspy.HighsSolution()
            solution.col_value = list(map(float, start))
            solution.value_valid = True
            h.setSolution(solution)
        _use_highs_threads(self.settings.threads)
        began = time.perf_counter()
        h.run()
        seconds = time.perf_counter() - began
        status = h.getModelStatus()
        kind = highspy.HighsModelStatus
        info = h.getInfo()
        has_values = info.primal_solution_status == 2  # kSolutionStatusFeasible
        values = np.asarray(h.getSolution().col_value, dtype=np.float64) if has_values else np.zeros(0)
        objective = h.getInfo().objective_function_value + self.model.objective_offset
        if relax:
            bound = objective if status == kind.kOptimal else -math.inf
        else:
            bound = info.mip_dual_bound + self.model.objective_offset
        if status == kind.kOptimal:
            result: MilpStatus = "optimal"
        elif status in (kind.kInfeasible, kind.kUnboundedOrInfeasible) or (
            status == kind.kObjectiveBound and not has_values
        ):
            result = "infeasible"
        elif has_values:
            result = "feasible"
        else:
            result = "no_solution"
        if result in ("infeasible", "no_solution"):
            values, objective = np.zeros(0), math.inf
        if not math.isfinite(bound):
            bound = -math.inf
        return MilpSolution(result, values, objective, bound, seconds)


def solve_milp(model: MilpModel, settings: MilpSettings, *, relax: bool = False) -> MilpSolution:
    """Solve ``model`` once (see :class:`MilpSolver` for repeated solves)."""
    return MilpSolver(model, settings).solve(relax=relax)


def _pick_backend(backend: Backend) -> Literal["highs", "pulp"]:
    if backend == "highs" and not HAVE_HIGHS:
        raise ValueError("backend='highs' needs highspy; install it or use backend='pulp'")
    if backend == "auto":
        return "highs" if HAVE_HIGHS else "pulp"
    return backend


_HIGHS_BANNER_SHOWN = False
_HIGHS_THREADS: int | None = None  # HiGHS keeps one global thread pool per process


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """Silence C-level stdout (HiGHS prints a banner when the first instance is created)."""
    try:
        saved = os.dup(1)
    except OSError:  # pragma: no cover - no fd 1
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _use_highs_threads(threads: int) -> None:
    """Size HiGHS's process-wide thread pool for the next run (it refuses a mismatch)."""
    global _HIGHS_THREADS
    if _HIGHS_THREADS is not None and _HIGHS_THREADS != threads:
        highspy.Highs.resetThreadScheduler(True)
    _HIGHS_THREADS = threads


def _load_highs(model: MilpModel, settings: MilpSettings) -> "highspy.Highs":
    global _HIGHS_BANNER_SHOWN
    _use_highs_threads(settings.threads)
    if settings.verbose or _HIGHS_BANNER_SHOWN:
        h = highspy.Highs()
    else:
        with _quiet_stdout():
            h = highspy.Highs()
        _HIGHS_BANNER_SHOWN = True
    h.setOptionValue("output_flag", bool(settings.verbose))
    h.setOptionValue("time_limit", float(settings.time_limit_s))
    h.setOptionValue("threads", int(settings.threads))
    h.setOptionValue("mip_rel_gap", float(settings.mip_rel_gap))
    h.setOptionValue("random_seed", 0)
    for name, value in settings.highs_options:
        h.setOptionValue(name, value)
    n = model.num_columns
    h.addVars(n, np.asarray(model.lower, dtype=np.float64), np.asarray(model.upper, dtype=np.float64))
    h.changeColsCost(n, np.arange(n, dtype=np.int32), np.asarray(model.cost, dtype=np.float64))
    starts, cols, vals = model.csr()
    h.addRows(model.num_rows, np.asarray(model.row_lower, dtype=np.float64),
              np.asarray(model.row_upper, dtype=np.float64), len(vals), starts[:-1], cols, vals)
    return h


def _solve_pulp(model: MilpModel, lower: np.ndarray, upper: np.ndarray, settings: MilpSettings,
                relax: bool) -> MilpSolution:
    import pulp

    problem = pulp.LpProblem("rematc", pulp.LpMinimize)
    with warnings.catch_warnings():  # PuLP 3.x deprecates direct LpVariable and PULP_CBC_CMD
        warnings.simplefilter("ignore", DeprecationWarning)
        columns = [
            pulp.LpVariable(f"x{i}", None if math.isinf(lo) else lo, None if math.isinf(hi) else hi,
                            pulp.LpInteger if (integer and not relax) else pulp.LpContinuous)
            for i, (lo, hi, integer) in enumerate(zip(lower, upper, model.integer))
        ]
        solver = pulp.PULP_CBC_CMD(msg=settings.verbose, timeLimit=settings.time_limit_s,
                                   threads=settings.threads, gapRel=settings.mip_rel_gap)
    problem += pulp.lpSum(c * columns[i] for i, c in enumerate(model.cost) if c) + model.objective_offset
    starts, cols, vals = model.csr()
    for row in range(model.num_rows):
        lo, hi = model.row_lower[row], model.row_upper[row]
        expr = pulp.lpSum(v * columns[c] for c, v in zip(cols[starts[row]:starts[row + 1]],
                                                          vals[starts[row]:starts[row + 1]]))
        if lo == hi:
            problem += expr == lo
        else:
            if not math.isinf(lo):
                problem += expr >= lo
            if not math.isinf(hi):
                problem += expr <= hi
    began = time.perf_counter()
    problem.solve(solver)
    seconds = time.perf_counter() - began
    status = pulp.LpStatus[problem.status]
    has_values = problem.sol_status in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible)
    if status == "Infeasible":
        return MilpSolution("infeasible", np.zeros(0), math.inf, math.inf, seconds)
    if not has_values:
        return MilpSolution("no_solution", np.zeros(0), math.inf, -math.inf, seconds)
    values = np.asarray([v.varValue or 0.0 for v in columns], dtype=np.float64)
    objective = float(pulp.value(problem.objective))
    optimal = problem.sol_status == pulp.LpSolutionOptimal
    # CBC through PuLP reports no dual bound; an optimal solve proves its own objective.
    bound = objective if optimal else -math.inf
    return MilpSolution("optimal" if optimal else "feasible", values, objective, bound, seconds)
