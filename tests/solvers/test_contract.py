"""solvers.contract: view folding for the MILP (torch-free)."""

from __future__ import annotations

import random

import pytest

from solvers import check, simulate
from solvers.contract import contract_views
from solvers.recompute import no_remat_schedule
from solvers.schedule import schedule_from_order
from solvers.synthetic import transformer_graph
from tests.solvers.graphs import random_training_graph
from tests.solvers.test_ilp import _views_graph


def _graphs():
    yield "views", _views_graph()
    yield "transformer", transformer_graph(2)
    for seed in range(4):
        yield f"random{seed}", random_training_graph(random.Random(seed), 14)


@pytest.mark.parametrize("name, graph", list(_graphs()))
def test_contraction_keeps_memory_and_time_and_expands_to_a_valid_schedule(name, graph) -> None:
    c = contract_views(graph)
    views = sum(1 for op in graph.ops if op.outputs and all(graph.values[v].view_of is not None for v in op.outputs))
    assert c.graph.num_ops <= graph.num_ops
    assert sum(len(m) for m in c.members) == graph.num_ops  # every op is in exactly one member list
    assert sorted(k for m in c.members for k in m) == list(range(graph.num_ops))
    if views == 0:
        assert c.graph.num_ops == graph.num_ops
    small_schedule = no_remat_schedule(c.graph)
    small = simulate(c.graph, small_schedule)
    forward, backward = small_schedule.computes("forward"), small_schedule.computes("backward")
    expanded = schedule_from_order(graph, c.expand(forward), c.expand(backward))
    check(graph, expanded)
    full = simulate(graph, expanded)
    assert full.peak_bytes <= small.peak_bytes  # the contracted count is never below the real one
    assert full.time_ms == pytest.approx(small.time_ms)
    assert full.peak_bytes == simulate(graph, no_remat_schedule(graph)).peak_bytes


def test_views_fold_into_their_maker() -> None:
    graph = _views_graph()
    c = contract_views(graph)
    assert c.graph.num_ops < graph.num_ops
    for members in c.members:
        head, *folded = members
        for k in folded:
            op = graph.ops[k]
            assert all(graph.values[v].view_of is not None for v in op.outputs)
            assert op.is_backward == graph.ops[head].is_backward
