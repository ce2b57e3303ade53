"""Checkmate's rematerialization MILP, written for this package's IR.

Stages. The ops are laid out in *stage order*: the forward ops (graph order),
then the input ops (output gradients), then the other backward ops (graph
order). Stage ``t`` ends with the first computation of op ``t`` (Checkmate's
frontier) and may recompute any recomputable forward op ``i < t`` before it, in
stage order. Stages ``0 .. n_forward-1`` form the forward phase.

Variables (all binary except ``U``):

- ``R[t, i]``: op ``i`` runs in stage ``t``. ``R[t, t] = 1`` for backward ops,
  non-recomputable ops and the forward ops the forward outputs depend on;
  other forward ops (weight copies that only the backward reads, dead ops) may
  first run later, or never. Backward and non-recomputable ops never run
  outside their own stage; input-op stages run nothing else (they come first
  in the backward phase).
- ``S[t, v]``: value ``v`` is kept from stage ``t-1`` into stage ``t``.
- ``FREE[t, r, k]``: storage ``r`` is released right after op ``k`` of stage ``t``.
- ``U[t, k]``: bytes held while op ``k`` of stage ``t`` runs (before its frees).

NOTE: [Views in the ILP] memory is counted per *storage* (a root value and
every view of it). A view may be kept only if the value it views is kept
(``S[t, view] <= S[t, base]``), so a kept alias always keeps its storage's
bytes counted; a storage is released only after the last op of the stage that
reads *any* alias, and only when no alias is kept into the next stage. Views
allocate nothing. This loses no schedule: keeping the base costs no bytes the
view did not already hold.

Phases and lifetimes: forward outputs (``required_at_end`` values) must be
available in the last forward (last) stage and are not released in it; input
ops allocate their gradients in their own stage. An end value that the forward
phase made is never re-made just to be live at the end (see NOTE: [End values
the forward made]): the extraction drops such a dead recomputation and keeps
the forward's instance (the one the caller holds) to the end. Workspace counts
while its op runs. ``FREE`` is only bounded above (a release the solver skips
over-counts memory), so the model is sound: :func:`schedule_from_order` on the extracted
order frees every value at its last use, which can only hold fewer bytes than
the model counted (``tests/solvers/test_ilp.py`` checks this on every schedule).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .graph import Graph
from .milp import MilpModel


@dataclass(frozen=True, slots=True)
class StageLayout:
    """Stage order and the facts the formulation needs, all indexed by stage.

    Attributes:
        order: graph op index of each stage.
        n_forward: number of forward stages.
        n_inputs: number of input-op stages (right after the forward stages).
        fixed_only: the op runs only in its own stage (backward, non-recomputable).
        must_run: the op runs in its own stage (``fixed_only`` or needed by a forward output).
        last_stage: the last stage in which running the op can be useful.
        out_values: per stage, the op's output values.
        in_values: per stage, the op's non-resident input values (each once).
        alloc_bytes: per stage, bytes its outputs allocate (views excluded).
        workspace_bytes: per stage, the op's workspace.
        time_ms: per stage, the op's time.
        producer_stage: per value, the stage of its producer (-1 for resident values).
        need_until: per value, the last stage that may need it (-1 when none).
        root: per value, its storage root, or -1 when the storage is resident.
        group_users: per storage root, the stages of ops reading any alias, sorted.
        view_base: per value, the value it views when that one is not resident, else -1.
        forward_output_values: non-resident forward outputs.
        required_values: non-resident ``required_at_end`` values.
        forward_output_roots: storage roots of forward outputs.
        required_roots: storage roots of ``required_at_end`` values.
    """

    order: tuple[int, ...]
    n_forward: int
    n_inputs: int
    fixed_only: tuple[bool, ...]
    must_run: tuple[bool, ...]
    last_stage: tuple[int, ...]
    out_values: tuple[tuple[int, ...], ...]
    in_values: tuple[tuple[int, ...], ...]
    alloc_bytes: tuple[int, ...]
    workspace_bytes: tuple[int, ...]
    time_ms: tuple[float, ...]
    producer_stage: tuple[int, ...]
    need_until: tuple[int, ...]
    root: tuple[int, ...]
    group_users: dict[int, tuple[int, ...]]
    view_base: tuple[int, ...]
    forward_output_values: tuple[int, ...]
    required_values: tuple[int, ...]
    forward_output_roots: frozenset[int]
    required_roots: frozenset[int]

    @property
    def n_stages(self) -> int:
        return len(self.order)

    def is_input_stage(self, t: int) -> bool:
        return self.n_forward <= t < self.n_forward + self.n_inputs

    def can_run(self, t: int, k: int) -> bool:
        """Whether ``R[t, k]`` may be 1."""
        if k == t:
            return True
        return (k < t and not self.fixed_only[k] and t <= self.last_stage[k]
                and not self.is_input_stage(t))

    def fixed_one(self, t: int, k: int) -> bool:
        return k == t and self.must_run[k]


def stage_layout(graph: Graph) -> StageLayout:
    """Lay ``graph`` out in stages (see the module docstring)."""
    ops, values = graph.ops, graph.values
    forward = [i for i, op in enumerate(ops) if not op.is_backward]
    inputs = [i for i, op in enumerate(ops) if op.is_input]
    backward = [i for i, op in enumerate(ops) if op.is_backward and not op.is_input]
    order = forward + inputs + backward
    n, n_forward = len(order), len(forward)
    stage_of = {op: t for t, op in enumerate(order)}
    producer_stage = [-1 if v.producer is None else stage_of[v.producer] for v in values]
    fixed_only = [ops[o].is_backward or not ops[o].recomputable for o in order]
    # Ops the forward outputs depend on must run in the forward phase: pin them to their stage.
    needed_by_outputs: set[int] = set()
    stack = [producer_stage[v] for v in graph.forward_outputs if producer_stage[v] >= 0]
    while stack:
        t = stack.pop()
        if t not in needed_by_outputs:
            needed_by_outputs.add(t)
            stack.extend(producer_stage[v] for v in ops[order[t]].inputs if producer_stage[v] >= 0)
    must_run = [fixed_only[t] or t in needed_by_outputs for t in range(n)]
    views_of: dict[int, list[int]] = {}
    for v, value in enumerate(values):
        if value.view_of is not None:
            views_of.setdefault(value.view_of, []).append(v)
    forward_outputs, required = set(graph.forward_outputs), set(graph.required_at_end)
    need_until = [-1] * len(values)
    last_stage = [0] * n
    for t in range(n - 1, -1, -1):
        for v in ops[order[t]].outputs:
            need = max([last_stage[stage_of[u]] for u in graph.users(v)]
                       + [need_until[w] for w in views_of.get(v, ())] + [t])
            if v in forward_outputs:
                need = max(need, n_forward - 1)
            if v in required:
                need = n - 1
            need_until[v] = need
        last_stage[t] = t if fixed_only[t] else max(need_until[v] for v in ops[order[t]].outputs) \
            if ops[order[t]].outputs else t
    root = []
    for v in range(len(values)):
        r = graph.storage_root(v)
        root.append(-1 if values[r].producer is None else r)
    group_sets: dict[int, set[int]] = {}
    for v in range(len(values)):
        if root[v] >= 0:
            group_sets.setdefault(root[v], set()).update(stage_of[u] for u in graph.users(v))
    return StageLayout(
        order=tuple(order), n_forward=n_forward, n_inputs=len(inputs),
        fixed_only=tuple(fixed_only), must_run=tuple(must_run), last_stage=tuple(last_stage),
        out_values=tuple(ops[o].outputs for o in order),
        in_values=tuple(tuple(v for v in dict.fromkeys(ops[o].inputs) if values[v].producer is not None)
                        for o in order),
        alloc_bytes=tuple(sum(graph.allocated_bytes(v) for v in ops[o].outputs) for o in order),
        workspace_bytes=tuple(ops[o].workspace_bytes for o in order),
        time_ms=tuple(ops[o].time_ms for o in order),
        producer_stage=tuple(producer_stage), need_until=tuple(need_until), root=tuple(root),
        group_users={r: tuple(sorted(s)) for r, s in sorted(group_sets.items())},
        view_base=tuple(-1 if v.view_of is None or values[v.view_of].producer is None else v.view_of
                        for v in values),
        forward_output_values=tuple(sorted(v for v in forward_outputs if producer_stage[v] >= 0)),
        required_values=tuple(sorted(v for v in required if producer_stage[v] >= 0)),
        forward_output_roots=frozenset(root[v] for v in forward_outputs if root[v] >= 0),
        required_roots=frozenset(root[v] for v in required if root[v] >= 0),
    )


@dataclass(slots=True)
class Formulation:
    """The MILP of one graph with the budgets as columns (re-solvable at other budgets).

    Attributes:
        layout: the stage layout.
        model: the MILP; memory is in units of ``bytes_scale`` bytes.
        bytes_scale: bytes per memory unit of the model.
        r_columns: ``(t, k) -> column`` of the free ``R`` variables.
        s_columns: ``(t, v) -> column`` of the ``S`` variables.
        budget_column: the peak budget (memory units); fix it with bounds.
        kept_column: the bytes live at the end of the forward phase may not exceed it.
        u_columns: ``(column, t, k)`` of every ``U[t, k]``.
        time_offset_ms: time of the ops pinned to their stage (not in the objective).
    """

    layout: StageLayout
    model: MilpModel
    bytes_scale: float
    r_columns: dict[tuple[int, int], int]
    s_columns: dict[tuple[int, int], int]
    budget_column: int
    kept_column: int
    u_columns: list[tuple[int, int, int]]
    time_offset_ms: float

    def model_peak_bytes(self, values: np.ndarray) -> int:
        """The peak the solver's own ``U`` values state for a solution (bytes, rounded)."""
        peak = 0.0
        for col, t, k in self.u_columns:
            runs = _run_value(self, values, t, k)
            peak = max(peak, values[col] + runs * self.layout.workspace_bytes[k] / self.bytes_scale)
        return int(round(peak * self.bytes_scale))


def _run_value(form: "Formulation", values: np.ndarray, t: int, k: int) -> float:
    """Value of ``R[t, k]`` in a solution."""
    if (t, k) in form.r_columns:
        return float(values[form.r_columns[(t, k)]] > 0.5)
    return 1.0 if form.layout.fixed_one(t, k) else 0.0


def build_formulation(graph: Graph, layout: StageLayout | None = None) -> Formulation:
    """Write the MILP of ``graph``: minimise time subject to the budget columns."""
    lay = layout if layout is not None else stage_layout(graph)
    n, values = lay.n_stages, graph.values
    scale = float(max(1, sum(lay.alloc_bytes) + max(lay.workspace_bytes, default=0)))
    model = MilpModel()
    r_col: dict[tuple[int, int], int] = {}
    u_cols: list[tuple[int, int, int]] = []
    s_col: dict[tuple[int, int], int] = {}
    offset = 0.0
    for t in range(n):
        for k in range(t + 1):
            if not lay.can_run(t, k):
                continue
            if lay.fixed_one(t, k):
                offset += lay.time_ms[k]
            else:
                r_col[(t, k)] = model.add_column(0, 1, cost=lay.time_ms[k], integer=True)
    model.objective_offset = offset
    forced = forced_keeps(graph, lay)
    for v, value in enumerate(values):
        p = lay.producer_stage[v]
        if p < 0 or v in forced:
            continue
        for t in range(p + 1, lay.need_until[v] + 1):
            s_col[(t, v)] = model.add_column(0, 1, integer=True)
    budget = model.add_column(0, math.inf)
    kept = model.add_column(0, math.inf)

    def run_terms(t: int, k: int, coef: float) -> tuple[list[int], list[float], float]:
        """``coef * R[t, k]`` as (columns, coefficients, constant)."""
        if (t, k) in r_col:
            return [r_col[(t, k)]], [coef], 0.0
        return [], [], coef if lay.fixed_one(t, k) else 0.0

    def keep_terms(t: int, v: int, coef: float) -> tuple[list[int], list[float], float]:
        """``coef * S[t, v]`` as (columns, coefficients, constant)."""
        if (t, v) in s_col:
            return [s_col[(t, v)]], [coef], 0.0
        return [], [], coef if is_forced(t, v) else 0.0

    def is_forced(t: int, v: int) -> bool:
        return v in forced and lay.producer_stage[v] < t <= lay.need_until[v]

    # Just in time: an op that is not pinned runs in a stage only to feed an op of that stage
    # (or to make a forward output / end value where those must be live). Running it
    # earlier only lengthens lifetimes, so this removes no optimum and prunes much symmetry.
    stage_of = {op: t for t, op in enumerate(lay.order)}
    pinned = {(lay.n_forward - 1, lay.producer_stage[v]) for v in lay.forward_output_values}
    pinned |= {(n - 1, lay.producer_stage[v]) for v in lay.required_values}
    for (t, k), col in r_col.items():
        end_pin = (t, k) in pinned and t == n - 1 and t >= lay.n_forward
        if (t, k) in pinned and not end_pin:
            continue
        users = sorted({stage_of[u] for v in lay.out_values[k] for u in graph.users(v)})
        in_stage = [j for j in users if k < j <= t and lay.can_run(t, j)]
        if any(lay.fixed_one(t, j) for j in in_stage):
            continue
        cols, coefs = [col, *(r_col[(t, j)] for j in in_stage)], [1.0] + [-1.0] * len(in_stage)
        if not end_pin:
            model.add_row(cols, coefs, upper=0.0)
            continue
        # NOTE: [End values the forward made] a forward op pinned to the last stage for an end
        # value, with no reader there, is a dead recomputation when it also ran in the forward
        # phase: the extraction (without_dead_recomputations) drops it and the forward's instance
        # stays live to the end, so the model may not count that instance as released.
        # R[t, k] - sum(R[t, readers]) + R[t2, k] <= 1 for every forward stage t2.
        for t2 in range(k, lay.n_forward):
            if lay.can_run(t2, k):
                c2, f2, k2 = run_terms(t2, k, 1.0)
                model.add_row(cols + c2, coefs + f2, upper=1.0 - k2)
    # Dependencies: an op runs only if each input is computed earlier in the stage or kept.
    for t in range(n):
        for k in range(t + 1):
            if not lay.can_run(t, k):
                continue
            for u in lay.in_values[k]:
                p = lay.producer_stage[u]
                if lay.fixed_one(t, p):
                    continue
                cols, coefs, const = run_terms(t, k, 1.0)
                c2, f2, k2 = run_terms(t, p, -1.0)
                c3, f3, k3 = keep_terms(t, u, -1.0)
                cols, coefs, const = cols + c2 + c3, coefs + f2 + f3, const + k2 + k3
                if cols:
                    model.add_row(cols, coefs, upper=-const)
    # Keeping: a value is kept into stage t only if it was computed or kept in stage t-1;
    # a view only if its base is kept too.
    for (t, v), col in s_col.items():
        p = lay.producer_stage[v]
        if not lay.fixed_one(t - 1, p):
            cols, coefs, const = run_terms(t - 1, p, -1.0)
            if (t - 1, v) in s_col:
                cols, coefs = cols + [s_col[(t - 1, v)]], coefs + [-1.0]
            model.add_row([col, *cols], [1.0, *coefs], upper=-const)
        base = values[v].view_of
        if base is not None and lay.producer_stage[base] >= 0 and not is_forced(t, base):
            model.add_row([col, s_col[(t, base)]], [1.0, -1.0], upper=0.0)
        if (t, p) in r_col:  # keeping a value and recomputing it in the same stage is never useful
            model.add_row([col, r_col[(t, p)]], [1.0, 1.0], upper=1.0)
    for v in sorted(forced):  # a forced view keeps its base (which may be a free choice)
        base = values[v].view_of
        if base is not None and lay.producer_stage[base] >= 0 and base not in forced:
            for t in range(lay.producer_stage[v] + 1, lay.need_until[v] + 1):
                model.add_row([s_col[(t, base)]], [1.0], lower=1.0)
    # Forward outputs are available in the last forward stage, required values in the last stage.
    for stage, wanted in ((lay.n_forward - 1, graph.forward_outputs), (n - 1, graph.required_at_end)):
        for v in sorted(set(wanted)):
            p = lay.producer_stage[v]
            if p < 0 or p == stage or lay.fixed_one(stage, p):
                continue
            cols, coefs, const = run_terms(stage, p, 1.0)
            c2, f2, k2 = keep_terms(stage, v, 1.0)
            if k2 or not cols + c2:
                continue
            model.add_row(cols + c2, coefs + f2, lower=1.0 - const)
    # Memory, stage by stage: U after each op that may run, releases after it.
    for t in range(n):
        active = [k for k in range(t + 1) if lay.can_run(t, k)]
        frees: dict[int, list[tuple[int, float]]] = {k: [] for k in active}
        for r, readers in lay.group_users.items():
            size = graph.allocated_bytes(r) / scale
            p = lay.producer_stage[r]
            if size == 0 or not p <= t <= lay.need_until[r]:
                continue
            if (t == lay.n_forward - 1 and r in lay.forward_output_roots) or (
                    t == n - 1 and r in lay.required_roots):
                continue
            candidates = [k for k in (p, *readers) if k <= t and lay.can_run(t, k)]
            for k in sorted(set(candidates)):
                later = [j for j in readers if k < j <= t and lay.can_run(t, j)]
                if any(lay.fixed_one(t, j) for j in later):
                    continue
                free = model.add_column(0, 1, integer=True)
                frees[k].append((free, size))
                if (t, k) in r_col:
                    model.add_row([free, r_col[(t, k)]], [1.0, -1.0], upper=0.0)
                elif not lay.fixed_one(t, k):
                    model.add_row([free], [1.0], upper=0.0)
                for j in later:
                    model.add_row([free, r_col[(t, j)]], [1.0, 1.0], upper=1.0)
                c2, f2, k2 = keep_terms(t + 1, r, 1.0)
                if k2:  # kept into the next stage for sure: never released here
                    model.add_row([free], [1.0], upper=0.0)
                elif c2:
                    model.add_row([free, *c2], [1.0, *f2], upper=1.0)
        previous: int | None = None
        previous_k = -1
        for k in active:
            u = model.add_column(0, math.inf)
            u_cols.append((u, t, k))
            cols, coefs, const = run_terms(t, k, -lay.alloc_bytes[k] / scale)
            cols, coefs = [u, *cols], [1.0, *coefs]
            if previous is None:
                for v in range(len(values)):
                    if graph.allocated_bytes(v):
                        c2, f2, k2 = keep_terms(t, v, -graph.allocated_bytes(v) / scale)
                        cols, coefs, const = cols + c2, coefs + f2, const + k2
            else:
                cols.append(previous)
                coefs.append(-1.0)
                for free, size in frees[previous_k]:
                    cols.append(free)
                    coefs.append(size)
            model.add_row(cols, coefs, lower=-const, upper=-const)
            wcols, wcoefs, wconst = run_terms(t, k, lay.workspace_bytes[k] / scale)
            model.add_row([u, budget, *wcols], [1.0, -1.0, *wcoefs], upper=-wconst)
            previous, previous_k = u, k
    # Bytes live when the forward phase ends (kept values, plus forward outputs) <= kept column.
    if lay.n_forward < n:
        constant = sum(graph.allocated_bytes(r) for r in lay.forward_output_roots) / scale
        cols, coefs = [kept], [-1.0]
        for v in range(len(values)):
            if graph.allocated_bytes(v) and v not in lay.forward_output_roots:
                c2, f2, k2 = keep_terms(lay.n_forward, v, graph.allocated_bytes(v) / scale)
                cols, coefs, constant = cols + c2, coefs + f2, constant + k2
        model.add_row(cols, coefs, upper=-constant)
    return Formulation(lay, model, scale, r_col, s_col, budget, kept, u_cols, offset)


def forced_keeps(graph: Graph, lay: StageLayout) -> set[int]:
    """Values whose keeping is forced: made by an op that runs once and read only by such ops.

    Nothing can recompute them and their readers run in fixed stages, so
    ``S[t, v] = 1`` from their producer to their last use: constants, not
    variables (about half the values of a training graph are gradients).
    """
    stage_of = {op: t for t, op in enumerate(lay.order)}
    forced: set[int] = set()
    views_of: dict[int, list[int]] = {}
    for v, value in enumerate(graph.values):
        if value.view_of is not None:
            views_of.setdefault(value.view_of, []).append(v)
    for v in range(len(graph.values) - 1, -1, -1):
        p = lay.producer_stage[v]
        if p < 0 or not lay.fixed_only[p]:
            continue
        if all(lay.fixed_only[stage_of[u]] for u in graph.users(v)) and all(
                w in forced for w in views_of.get(v, ())):
            forced.add(v)
    return forced


def stages_from_solution(form: Formulation, values: np.ndarray) -> list[list[int]]:
    """Per stage, the stage indices of the ops that run (ascending)."""
    lay = form.layout
    stages: list[list[int]] = [[] for _ in range(lay.n_stages)]
    for t in range(lay.n_stages):
        for k in range(t + 1):
            if lay.fixed_one(t, k) or ((t, k) in form.r_columns and values[form.r_columns[(t, k)]] > 0.5):
                stages[t].append(k)
    return stages


def kept_sets(lay: StageLayout, stages: list[list[int]]) -> list[set[int]]:
    """Minimal ``S``: per stage, the values it must find kept, given which ops run where.

    A value is kept into stage ``t`` when a later op reads it before it is
    recomputed (or it must be live at the end of the forward phase or of the
    step), and a kept view keeps its base.
    """
    n = lay.n_stages
    keep: list[set[int]] = [set() for _ in range(n)]
    needed: set[int] = set()
    for t in range(n - 1, -1, -1):
        if t == n - 1:
            needed |= set(lay.required_values)
        if t == lay.n_forward - 1:
            needed |= set(lay.forward_output_values)
        for k in sorted(stages[t], reverse=True):
            needed -= set(lay.out_values[k])
            needed |= set(lay.in_values[k])
        stack = list(needed)
        while stack:
            base = lay.view_base[stack.pop()]
            if base >= 0 and base not in needed:
                needed.add(base)
                stack.append(base)
        keep[t] = set(needed)
    return keep


def accounting_peak_bytes(graph: Graph, lay: StageLayout, stages: list[list[int]]) -> int:
    """The model's memory count of ``stages`` with minimal keeping and every allowed release.

    Equal to :func:`simulate` on the order the stages spell (tested); the
    solver's own ``U`` values are at least this (it may keep or hold more).
    """
    keep = kept_sets(lay, stages)
    n, peak = lay.n_stages, 0
    for t in range(n):
        running = set(stages[t])
        held = sum(graph.allocated_bytes(v) for v in keep[t])
        last_touch: dict[int, int] = {}
        for r, users in lay.group_users.items():
            touching = [k for k in (lay.producer_stage[r], *users) if k in running]
            if touching and graph.allocated_bytes(r):
                last_touch[r] = max(touching)
        released: dict[int, list[int]] = {}
        for r, k in sorted(last_touch.items()):
            if t + 1 < n and r in keep[t + 1]:
                continue
            if (t == lay.n_forward - 1 and r in lay.forward_output_roots) or (
                    t == n - 1 and r in lay.required_roots):
                continue
            released.setdefault(k, []).append(r)
        for k in sorted(running):
            held += lay.alloc_bytes[k]
            peak = max(peak, held + lay.workspace_bytes[k])
            held -= sum(graph.allocated_bytes(r) for r in released.get(k, ()))
    return peak


def order_from_stages(lay: StageLayout, stages: list[list[int]]) -> tuple[list[int], list[int]]:
    """(forward ops, backward ops) in graph indices: each stage's ops in stage order."""
    forward = [lay.order[k] for t in range(lay.n_forward) for k in sorted(stages[t])]
    backward = [lay.order[k] for t in range(lay.n_forward, lay.n_stages) for k in sorted(stages[t])]
    return forward, backward
