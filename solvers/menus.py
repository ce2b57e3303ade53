"""Per-block option menus: Pareto sets of (time, forward peak, kept bytes, backward peak).

For one :class:`~solvers.block_graph.BlockGraph`, :func:`build_menu` solves the
block's MILP on a grid of (peak budget, kept-after-forward budget) pairs (a
sweep of kept budgets at the no-remat peak, a coarser grid at lower peaks),
adds the no-remat schedule, greedy schedules at the same peaks and a greedy
trajectory that lowers the kept bytes, simulates every schedule on the block
graph, and keeps the options no other option beats on all four numbers. A
MILP solve is skipped when an optimum found at a looser pair already fits.
It also measures the *forward-only* run (the block output from its input,
keeping nothing) used by the chain's checkpoint moves, and a *tail* menu
(schedules that need not make the block output).

Example:
    >>> menu = build_menu(build_block_graph(chain, 2))            # doctest: +SKIP
    >>> [f"{o.costs.time_ms:.1f}" for o in menu.options]          # doctest: +SKIP
    ['12.0', '13.5', '16.0']
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable

from .block_graph import BlockGraph
from .errors import BudgetInfeasible
from .graph import Graph
from .greedy import greedy_schedule, min_feasible_peak_greedy
from .ilp import RematIlp
from .milp import MilpSettings
from .recompute import build_remat_schedule, no_remat_schedule
from .rotor import ChainBlock, ChainOption
from .schedule import Schedule, schedule_from_order
from .simulate import check, simulate


@dataclass(frozen=True, slots=True)
class MenuSettings:
    """How block menus are built.

    Attributes:
        peak_levels: peak budgets of the grid (from the block's smallest to its no-remat peak).
        kept_levels: kept-after-forward budgets of the grid at the lower peaks.
        kept_sweep: at the highest peak, kept budgets are swept down from the
            no-remat schedule's, each just below the last solution's, at most this many
            (in long chains the kept bytes of every block add up, so this axis matters most).
        use_ilp: solve the grid with the MILP (else greedy options only).
        max_ilp_ops: blocks with more ops get greedy options only.
        max_ilp_solves: MILP solves per menu (the grid is cut short after them).
        large_block_ops, large_block_solves: blocks with more ops than the
            first get at most the second number of solves (their solves are
            slower and their many ops already give the greedy options choice).
        ilp: MILP settings (time limit per grid point).
    """

    peak_levels: int = 4
    kept_levels: int = 3
    kept_sweep: int = 4
    use_ilp: bool = True
    max_ilp_ops: int = 250
    max_ilp_solves: int = 10
    large_block_ops: int = 32
    large_block_solves: int = 5
    # Menu models are small and solved many times: HiGHS's presolve costs more than it saves.
    ilp: MilpSettings = field(default_factory=lambda: MilpSettings(
        time_limit_s=0.5, mip_rel_gap=1e-2, highs_options=(("presolve", "off"),)))


@dataclass(frozen=True, slots=True)
class BlockOption:
    """One schedule of a block graph and its chain numbers.

    Attributes:
        forward_order: local ops of the forward phase, in order.
        backward_order: local ops of the backward phase, in order.
        costs: the numbers the chain DP uses.
        source: "no_remat", "ilp" or "greedy".
    """

    forward_order: tuple[int, ...]
    backward_order: tuple[int, ...]
    costs: ChainOption
    source: str


@dataclass(frozen=True, slots=True)
class BlockMenu:
    """The options of one distinct block and its forward-only run."""

    options: tuple[BlockOption, ...]
    tail_options: tuple[BlockOption, ...]
    forward_only_order: tuple[int, ...]
    forward_only_ms: float
    forward_only_keep_peak_bytes: int
    forward_only_drop_peak_bytes: int
    single_run: bool
    complete: bool = True

    def chain_block(self, block: BlockGraph) -> ChainBlock:
        return ChainBlock(
            input_bytes=block.input_bytes,
            grad_in_bytes=block.grad_in_bytes,
            persist_bytes=block.persist_bytes,
            options=tuple(o.costs for o in self.options),
            forward_only_ms=math.inf if self.single_run else self.forward_only_ms,
            forward_only_keep_peak_bytes=self.forward_only_keep_peak_bytes,
            forward_only_drop_peak_bytes=self.forward_only_drop_peak_bytes,
            tail_options=tuple(o.costs for o in self.tail_options),
        )

    def option(self, index: int) -> BlockOption:
        """Option ``index`` of ``options + tail_options`` (the chain DP's numbering)."""
        n = len(self.options)
        return self.options[index] if index < n else self.tail_options[index - n]


def option_of(block: BlockGraph, schedule: Schedule, source: str) -> BlockOption:
    """Simulate ``schedule`` on the block graph and read off its chain numbers.

    The chain model counts the block input from the start of the block's
    forward, so a schedule that would make it later gets it first. The
    "keep" numbers replay the same schedule with the input never freed.
    """
    graph = block.graph
    input_op = 0 if block.input_bytes or (graph.num_ops and _synthetic(block, 0)
                                           and not graph.ops[0].is_backward) else -1
    if input_op >= 0 and input_op not in schedule.computes("forward"):
        schedule = schedule_from_order(graph, (input_op, *schedule.computes("forward")),
                                       tuple(i for i in schedule.computes("backward") if i != input_op))
    check(graph, schedule)
    forward_peak, backward_peak, kept, time_ms = _phase_numbers(graph, schedule)
    output = block.output_local
    output_bytes = 0 if output is None else graph.allocated_bytes(graph.storage_root(output))
    leading_frees = []
    for step in schedule.backward:
        if step.kind != "free":
            break
        leading_frees.append(step.index)
    reads_output = output is not None and output not in leading_frees
    keep_numbers: tuple[int | None, int | None, int | None] = (None, None, None)
    if input_op >= 0:
        x = graph.ops[input_op].outputs[0]
        held = Schedule(tuple(st for st in schedule.forward if not (st.kind == "free" and st.index == x)),
                        tuple(st for st in schedule.backward if not (st.kind == "free" and st.index == x)))
        keep_forward, keep_backward, keep_kept, _ = _phase_numbers(graph, held)
        keep_numbers = (keep_forward, max(keep_kept - block.input_bytes - output_bytes, 0), keep_backward)
    costs = ChainOption(time_ms, forward_peak, max(kept - output_bytes, 0), backward_peak, reads_output,
                        *keep_numbers)
    return BlockOption(schedule.computes("forward"), schedule.computes("backward"), costs, source)


def _phase_numbers(graph: Graph, schedule: Schedule) -> tuple[int, int, int, float]:
    """(forward peak, backward peak, bytes live at the phase boundary, time) from :func:`simulate`."""
    sim = simulate(graph, schedule, validate=False)
    forward_peak = backward_peak = 0
    n_forward = len(schedule.forward)
    for pos, (kind, index) in enumerate(schedule.steps):
        if kind == "compute":
            # No compute step replaces a live instance in these schedules, so the
            # bytes held while it runs are the trace after it plus its workspace.
            during = sim.memory_trace[pos] + graph.ops[index].workspace_bytes
            if pos < n_forward:
                forward_peak = max(forward_peak, during)
            else:
                backward_peak = max(backward_peak, during)
    assert max(forward_peak, backward_peak) == sim.peak_bytes, "phase peaks disagree with simulate"
    return forward_peak, backward_peak, sim.live_after_forward_bytes, sim.time_ms


def build_menu(block: BlockGraph, settings: MenuSettings | None = None, *, complete: bool = True) -> BlockMenu:
    """The Pareto menu of ``block`` (see the module docstring), and its tail menu.

    The tail menu schedules the block graph without forward outputs: the
    block's last run inside a span that the chain replays in the backward
    phase needs no output (nothing reads it any more).

    Without ``complete``, only the options that matter when the chain's
    budget is loose are solved for: the MILP sweeps the kept bytes at the
    block's no-remat peak (in a long chain the kept bytes add up and decide),
    greedy fills the lower peaks, and tail options are greedy's. The caller
    completes the menu when a budget gets tight.
    """
    settings = settings if settings is not None else MenuSettings()
    part = "all" if complete else "loose"
    options = _menu_options(block, settings, part)
    tail_block = _tail_block(block)
    tail_options = _menu_options(tail_block, settings, part) if tail_block is not None else ()
    forward_only = _forward_only_run(block)
    single_run = any(not op.recomputable and not _synthetic(block, i) for i, op in enumerate(block.graph.ops)
                     if not op.is_backward)
    return BlockMenu(options, tail_options, *forward_only, single_run, complete)


def complete_menu(block: BlockGraph, menu: BlockMenu, settings: MenuSettings | None = None) -> BlockMenu:
    """``menu`` (built without ``complete``) with the options of tight budgets added.

    Solves only what the loose menu lacks: the block's smallest peak, the
    lower peak levels and the tail runs' grid; the loose options are kept.
    """
    if menu.complete:
        return menu
    settings = settings if settings is not None else MenuSettings()
    options = _pareto([*menu.options, *_menu_options(block, settings, "tight")])
    tail_block = _tail_block(block)
    tail = menu.tail_options
    if tail_block is not None:
        tail = _pareto([*tail, *_menu_options(tail_block, settings, "tight")])
    return dataclasses.replace(menu, options=options, tail_options=tail, complete=True)


def _tail_block(block: BlockGraph) -> BlockGraph | None:
    """The block graph without forward outputs (its last run in a backward span), if it has a backward."""
    if block.output_local is None or not any(op.is_backward for op in block.graph.ops):
        return None
    tail_graph = dataclasses.replace(block.graph, forward_outputs=(), _cache={})
    return dataclasses.replace(block, graph=tail_graph, output_local=None)


def _menu_options(block: BlockGraph, settings: MenuSettings, part: str) -> tuple[BlockOption, ...]:
    """Options of ``part``: "loose" (kept sweep at the top peak, greedy), "tight" (smallest
    peak and lower peak levels), or "all"."""
    graph = block.graph
    complete = part != "loose"
    found: dict[tuple[tuple[int, ...], tuple[int, ...]], BlockOption] = {}

    def add(schedule: Schedule, source: str) -> BlockOption:
        option = option_of(block, schedule, source)
        found.setdefault((option.forward_order, option.backward_order), option)
        return option

    no_remat = add(no_remat_schedule(graph), "no_remat")
    has_backward = any(op.is_backward for op in graph.ops)
    top_peak = max(no_remat.costs.forward_peak_bytes, no_remat.costs.backward_peak_bytes)
    if has_backward:
        all_forward = [v for op in graph.ops if not op.is_backward for v in op.outputs]
        add(build_remat_schedule(graph, all_forward), "greedy")
        low_peak = min_feasible_peak_greedy(graph)
        use_ilp = settings.use_ilp and graph.num_ops <= settings.max_ilp_ops
        use_ilp = use_ilp and (complete or bool(graph.forward_outputs))
        ilp = RematIlp(graph, settings.ilp) if use_ilp else None
        # A tail run's smallest peak comes from greedy: its MILP minimum costs a solve per
        # block and the chain rarely needs it (the tail runs once, at the end of a span).
        if ilp is not None and complete and graph.forward_outputs:
            low_ilp, _ = ilp.min_peak_bytes()
            if low_ilp > 0:
                low_peak = min(low_peak, low_ilp)
                if ilp.last_min_peak_schedule is not None:
                    add(ilp.last_min_peak_schedule, "ilp")
        peaks = _levels(low_peak, top_peak, settings.peak_levels)
        for peak in peaks:
            try:
                add(greedy_schedule(graph, peak), "greedy")
            except BudgetInfeasible:
                pass
        if graph.forward_outputs and part != "tight":
            _kept_greedy(block, add)
        if ilp is not None:
            _ilp_grid(block, ilp, peaks if complete else peaks[:1], settings, add, sweep=part != "tight")
    return _pareto(list(found.values()))


def _kept_greedy(block: BlockGraph, add: Callable[[Schedule, str], BlockOption], max_steps: int = 24) -> None:
    """Options along a greedy trajectory that lowers the kept bytes (cheap, dense in kept).

    Each step unsaves the storage group (a saved forward value and its views)
    with the most kept bytes removed per millisecond of recomputation, as the
    global greedy does for the peak. In a long chain every block's kept bytes
    add up, so fine steps on this axis pay off.
    """
    graph = block.graph
    roots: dict[int, list[int]] = {}
    for op in graph.ops:
        if not op.is_backward and op.recomputable:
            for v in op.outputs:
                if graph.allocated_bytes(graph.storage_root(v)) > 0:
                    roots.setdefault(graph.storage_root(v), []).append(v)
    unsaved: list[int] = []
    current = add(build_remat_schedule(graph, unsaved), "greedy").costs
    for _ in range(max_steps):
        best: tuple[float, int] | None = None
        best_option: BlockOption | None = None
        for root, members in sorted(roots.items()):
            if root in unsaved:
                continue
            option = option_of(block, build_remat_schedule(graph, unsaved + members), "greedy")
            saved = current.kept_bytes - option.costs.kept_bytes
            if saved <= 0:
                continue
            added = option.costs.time_ms - current.time_ms
            ratio = saved / added if added > 1e-12 else math.inf
            if best is None or (ratio, -root) > best:
                best, best_option = (ratio, -root), option
        if best is None or best_option is None:
            return
        unsaved += roots[-best[1]]
        current = add(build_remat_schedule(graph, unsaved), "greedy").costs


def _ilp_grid(block: BlockGraph, ilp: RematIlp, peaks: list[int], settings: MenuSettings,
              add: Callable[[Schedule, str], BlockOption], *, sweep: bool = True) -> None:
    """Solve the MILP at every (peak, kept) pair of the grid, loose budgets first.

    A pair is skipped when a schedule proved optimal at a looser pair already
    fits it (it is optimal there too). Kept budgets matter only when the block
    has forward outputs (a tail run has nothing between its phases).
    """
    graph = block.graph
    no_remat = simulate(graph, no_remat_schedule(graph))
    kept_grid: list[int] = []
    if graph.forward_outputs and settings.kept_levels > 1:
        all_forward = [v for op in graph.ops if not op.is_backward for v in op.outputs]
        kept_low = simulate(graph, build_remat_schedule(graph, all_forward)).live_after_forward_bytes
        kept_grid = _levels(kept_low, no_remat.live_after_forward_bytes, settings.kept_levels)
    kept_levels: list[int | None] = [*kept_grid] if kept_grid else [None]
    proved: list[tuple[int, float, int, int]] = [  # (peak budget, kept budget, peak, kept) of optima
        (no_remat.peak_bytes, math.inf, no_remat.peak_bytes, no_remat.live_after_forward_bytes)]
    solves_left = [settings.large_block_solves if graph.num_ops > settings.large_block_ops
                   else settings.max_ilp_solves]

    def solve(peak: int, kept: int | None) -> tuple[str, int]:
        """Solve one pair unless an optimum already covers it; (status, kept bytes of the result)."""
        kept_budget = math.inf if kept is None else kept
        for p_budget, k_budget, p, k in proved:
            if p_budget >= peak and k_budget >= kept_budget and p <= peak and k <= kept_budget:
                return "covered", k
        if solves_left[0] <= 0:
            return "budget", -1
        solves_left[0] -= 1
        stages, status, _ = ilp.solve_stages(peak, kept)
        if stages is None:
            return status, -1
        schedule = ilp.schedule_of(stages)
        sim = simulate(graph, schedule)
        if sim.peak_bytes > peak:
            return "no_solution", -1
        add(schedule, "ilp")
        if status == "optimal":
            proved.append((peak, kept_budget, sim.peak_bytes, sim.live_after_forward_bytes))
        return status, sim.live_after_forward_bytes

    if len(peaks) > 1:
        solve(peaks[-1], None)  # the fastest schedule at the block's smallest peak, first
    for level, peak in enumerate(peaks):
        if level == 0 and not sweep:
            continue
        if level == 0 and len(kept_grid) > 1:
            low, kept = kept_grid[-1], kept_grid[0]
            sweep = min(settings.kept_sweep, max(1, solves_left[0] // 2))
            step = max(1, (kept - low) // sweep)
            for _ in range(sweep):
                status, found = solve(peak, kept)
                if status in ("infeasible", "no_solution") or found < 0:
                    break
                kept = min(found - 1, kept - step)
                if kept < low:
                    break
            continue
        for level_kept in kept_levels:
            status, _ = solve(peak, level_kept)
            if status == "infeasible":
                break  # tighter kept budgets are infeasible too


def _levels(low: int, high: int, count: int) -> list[int]:
    """``count`` integers from ``high`` down to ``low`` (deduplicated)."""
    if count <= 1 or high <= low:
        return [high]
    return sorted({int(low + (high - low) * i / (count - 1)) for i in range(count)}, reverse=True)


def _synthetic(block: BlockGraph, local_op: int) -> bool:
    return block.op_map[local_op] < 0


def _forward_only_run(block: BlockGraph) -> tuple[tuple[int, ...], float, int, int]:
    """(order, time, peak keeping the input, peak dropping it) of the keep-nothing forward."""
    graph = block.graph
    order = block.forward_only
    schedule = schedule_from_order(graph, order, ())
    drop = simulate(graph, schedule, validate=False).peak_bytes
    inputs = {v for i in order if _synthetic(block, i) for v in graph.ops[i].outputs}
    keep_steps = tuple(s for s in schedule.forward if not (s.kind == "free" and s.index in inputs))
    keep = simulate(graph, Schedule(keep_steps, ()), validate=False).peak_bytes
    return order, sum(graph.ops[i].time_ms for i in order), keep, drop


def _pareto(options: list[BlockOption]) -> tuple[BlockOption, ...]:
    """Options not dominated on (time, forward peak, kept, backward peak); deterministic order."""
    def numbers(o: BlockOption) -> tuple[float, int, int, int]:
        c = o.costs
        return (c.time_ms, c.forward_peak_bytes, c.kept_bytes, c.backward_peak_bytes)

    ordered = sorted(options, key=lambda o: (numbers(o), o.forward_order, o.backward_order))
    kept: list[BlockOption] = []
    for option in ordered:
        mine = numbers(option)
        if not any(all(a <= b for a, b in zip(numbers(other), mine)) for other in kept):
            kept.append(option)
    return tuple(kept)

