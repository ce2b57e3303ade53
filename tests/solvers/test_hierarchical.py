"""The hierarchical planner: valid schedules within budget, near-optimal, never worse than checkpointing."""

from __future__ import annotations

import functools
import random

import pytest

from solvers import BudgetInfeasible, Graph, check, schedule_from_order, simulate
from solvers.checkmate_data import checkmate_graph_path, load_checkmate_graph
from solvers.hierarchical import (ChainSolver, HierarchicalSettings, chain_solver, hierarchical_min_feasible_peak,
                                  solve_auto, solve_hierarchical)
from solvers.ilp import ilp_min_feasible_peak, solve_ilp
from solvers.menus import MenuSettings
from solvers.milp import MilpSettings
from solvers.recompute import no_remat_schedule
from solvers.synthetic import TransformerShape, transformer_graph
from tests.solvers.graphs import mlp_chain_graph, random_training_graph
from tests.solvers.test_partition import _unet

TINY = TransformerShape(batch=2, seq=32, n_embd=32, n_head=2, vocab=64)
ILP = MilpSettings(time_limit_s=30)
#: Smaller menus for the tests that check validity, not quality (the 2-core CI budget).
FAST = HierarchicalSettings(menu=MenuSettings(peak_levels=3, kept_levels=2, kept_sweep=3, max_ilp_solves=5,
                                              large_block_solves=3))


def _budgets(graph: Graph, low: int, fractions: tuple[float, ...]) -> list[int]:
    top = simulate(graph, no_remat_schedule(graph)).peak_bytes
    return [int(low + (top - low) * f) for f in fractions]


@functools.cache
def _transformer() -> Graph:
    """One tiny GPT-2-like graph shared by several tests (its planner is cached on it)."""
    return transformer_graph(2, TINY)


PROPERTY_GRAPHS = {
    "mlp5": lambda: mlp_chain_graph(5),
    "transformer2": _transformer,
    "unet": lambda: _unet(depth=4),
    **{f"random{seed}": (lambda seed=seed: random_training_graph(random.Random(seed), 15)) for seed in range(3)},
}


@pytest.mark.parametrize("name", sorted(PROPERTY_GRAPHS))
def test_every_schedule_checks_and_fits(name: str) -> None:
    graph = PROPERTY_GRAPHS[name]()
    solver = chain_solver(graph, FAST)
    low = solver.min_feasible_peak()
    for budget in _budgets(graph, low, (1.0, 0.7, 0.4, 0.15, 0.0)):
        result = solver.solve(budget)
        check(graph, result.schedule)
        sim = simulate(graph, result.schedule)
        assert sim.peak_bytes == result.peak_bytes <= budget
        assert sim.time_ms == pytest.approx(result.time_ms)
        if result.plan is not None:  # the chain model bounds what simulate measures
            variant = next(v for v in solver.variants if len(v.blocks) == result.n_blocks)
            assert sim.peak_bytes <= result.plan.peak_bytes + variant.chain.static_bytes
    with pytest.raises(BudgetInfeasible) as info:
        solver.solve(low // 2)
    assert info.value.min_feasible_bytes > low // 2


def _quality_graphs() -> dict[str, Graph]:
    graphs = {
        "mlp6": mlp_chain_graph(6),
        "random6": random_training_graph(random.Random(6), 16),
    }
    path = checkmate_graph_path("vgg16")
    if path is not None:
        graphs["vgg16"] = load_checkmate_graph(path)
    return graphs


@functools.cache
def _optima(name: str, graph_key: int) -> list[tuple[int, float]]:
    """(budget, proved MILP optimum) at five budgets from the no-remat peak down near the minimum."""
    graph = QUALITY[name]
    low = ilp_min_feasible_peak(graph, ILP)
    optima = []
    for budget in _budgets(graph, low, (1.0, 0.75, 0.5, 0.25, 0.1)):
        result = solve_ilp(graph, budget, settings=ILP)
        if result.optimal:
            optima.append((budget, result.time_ms))
    return optima


QUALITY = _quality_graphs()
WEAK = {  # graphs where the hierarchical plan is known to miss 1.05x (reported, not hidden)
    "random4": (random_training_graph(random.Random(4), 16),
                "random skip connections: near the minimum the chain cannot interleave a block's "
                "backward with the previous block's recomputation as the whole-graph MILP does"),
}


@pytest.mark.parametrize("name", sorted(QUALITY))
def test_within_five_percent_of_the_whole_graph_optimum(name: str) -> None:
    graph = QUALITY[name]
    optima = _optima(name, id(graph))
    assert len(optima) == 5, "the MILP should prove optimality on these small graphs"
    solver = chain_solver(graph)
    for budget, optimum_ms in optima:
        result = solver.solve(budget)
        assert result.time_ms <= 1.05 * optimum_ms + 1e-9, (budget, result.time_ms / optimum_ms)


@pytest.mark.parametrize("name", sorted(WEAK))
def test_known_weak_cases(name: str) -> None:
    graph, reason = WEAK[name]
    low = ilp_min_feasible_peak(graph, ILP)
    solver = chain_solver(graph)
    worst = 1.0
    for budget in _budgets(graph, low, (1.0, 0.75, 0.5, 0.25, 0.1)):
        optimum = solve_ilp(graph, budget, settings=ILP).time_ms
        try:
            worst = max(worst, solver.solve(budget).time_ms / optimum)
        except BudgetInfeasible:
            worst = float("inf")
    if worst > 1.05:
        pytest.xfail(f"{name}: worst ratio {worst:.3f}; {reason}")


def _checkpoint_per_layer(graph: Graph, n_layers: int) -> tuple[list[int], list[int]]:
    """``torch.utils.checkpoint`` around every layer: keep layer inputs, recompute each layer
    right before its backward."""
    forward = [i for i, op in enumerate(graph.ops) if not op.is_backward]
    layer_of = {i: int(op.name.split(".")[0][1:]) for i, op in enumerate(graph.ops)
                if op.name.startswith("l") and "." in op.name and op.name.split(".")[0][1:].isdigit()}
    backward: list[int] = []
    current = None
    for i, op in enumerate(graph.ops):
        if not op.is_backward:
            continue
        layer = layer_of.get(i)
        if layer is not None and layer != current:
            backward += [k for k in forward if layer_of.get(k) == layer]
            current = layer
        backward.append(i)
    assert sorted(set(layer_of.values())) == list(range(n_layers))
    return forward, backward


def test_min_peak_not_above_checkpointing_every_layer() -> None:
    graph = _transformer()
    forward, backward = _checkpoint_per_layer(graph, 2)
    baseline = schedule_from_order(graph, forward, backward)
    check(graph, baseline)
    base = simulate(graph, baseline)
    ours = hierarchical_min_feasible_peak(graph, FAST)
    assert ours <= base.peak_bytes
    at_baseline_peak = solve_hierarchical(graph, base.peak_bytes, FAST)
    assert at_baseline_peak.time_ms <= base.time_ms + 1e-9


def test_logits_are_not_assumed_live_through_the_backward() -> None:
    shape = TransformerShape(batch=2, seq=32, n_embd=32, n_head=2, vocab=4096)  # logits dominate
    graph = transformer_graph(2, shape)
    solver = chain_solver(graph, FAST)
    low = solver.min_feasible_peak()
    schedule = solver.solve(low).schedule
    steps = schedule.steps
    first_layer_backward = next(p for p, (kind, i) in enumerate(steps) if p >= len(schedule.forward)
                                and kind == "compute" and graph.ops[i].name.startswith("l1."))
    live: set[int] = set()
    for kind, i in steps[:first_layer_backward]:
        if kind == "compute":
            live.update(graph.ops[i].outputs)
        else:
            live.discard(i)
    logits = {v for v in range(len(graph.values)) if graph.values[v].name in ("lm_head", "log_softmax")}
    assert not live & logits, "the logits must be dead once the head's backward is done"
    logits_bytes = shape.batch * shape.seq * shape.vocab * 4
    # Holding the logits and their gradient through every layer's backward would not fit.
    layer_peak = max(simulate(graph, schedule).memory_trace[first_layer_backward:])
    assert layer_peak + 2 * logits_bytes > low


def test_identical_blocks_are_solved_once() -> None:
    graph = transformer_graph(8, TINY)
    greedy_menus = MenuSettings(use_ilp=False)  # the count is the point here, not the menus
    solver = ChainSolver(graph, HierarchicalSettings(menu=greedy_menus, granularities=(1,)))
    assert len(solver.variants[0].blocks) >= 17
    assert solver.n_distinct_blocks <= 8


def test_solve_auto_dispatches_and_falls_back() -> None:
    small = mlp_chain_graph(3)
    top = simulate(small, no_remat_schedule(small)).peak_bytes
    schedule = solve_auto(small, top)
    check(small, schedule)
    large = _transformer()
    assert large.num_ops > FAST.whole_graph_ilp_max_ops
    low = hierarchical_min_feasible_peak(large, FAST)
    schedule = solve_auto(large, low, FAST)
    assert simulate(large, schedule).peak_bytes <= low
    with pytest.raises(BudgetInfeasible) as info:
        solve_auto(large, low // 3, FAST)
    assert info.value.min_feasible_bytes <= low


def test_graph_without_a_chain_beyond_the_milp_limit_is_planned_by_greedy() -> None:
    """No useful cut and too many ops for the whole-graph MILP (BERT's padding mask feeds every
    layer): the planner answers greedy's schedule and minimum instead of spending MILP time limits."""
    from solvers.greedy import greedy_schedule, min_feasible_peak_greedy

    graph = _unet(depth=4)
    solver = ChainSolver(graph, HierarchicalSettings(no_chain_ilp_max_ops=1))
    assert not solver.whole_graph and not solver.usable
    assert solver.min_feasible_peak() == min_feasible_peak_greedy(graph)
    top = simulate(graph, no_remat_schedule(graph)).peak_bytes
    budget = (solver.min_feasible_peak() + top) // 2
    result = solver.solve(budget)
    assert result.schedule == greedy_schedule(graph, budget)
    assert result.peak_bytes <= budget
