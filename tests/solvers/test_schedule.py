"""``schedule_from_order``: frees after the last use, saves exactly what the backward reads."""

from __future__ import annotations

import random

import pytest

from solvers import Graph, Schedule, Step, check, no_remat_schedule, schedule_from_order, simulate
from tests.solvers.graphs import GraphBuilder, chain_graph, mlp_chain_graph, random_training_graph


def test_frees_right_after_the_last_use() -> None:
    graph = chain_graph([100, 200, 300])
    schedule = schedule_from_order(graph, [0, 1, 2], [3, 4, 5])
    # v3 (forward output, unread later) goes at backward start; v2 and v4 after f2_bwd
    # (op 4, their last reader); v1 and v5 after f1_bwd; v6 is required: never freed.
    assert repr(schedule) == "Schedule(C0 C1 C2 | D3 C3 C4 D2 D4 C5 D1 D5)"


def test_recomputation_frees_each_instance_after_its_own_last_use() -> None:
    graph = chain_graph([100, 200, 300])
    schedule = schedule_from_order(graph, [0, 1, 2], [3, 4, 0, 5])
    # The forward's v1 dies after f1 (its last read before the recompute); the
    # recomputed one after f1_bwd.
    assert repr(schedule) == "Schedule(C0 C1 D1 C2 | D3 C3 C4 D2 D4 C0 C5 D1 D5)"
    check(graph, schedule)


def test_unused_output_is_freed_at_once() -> None:
    b = GraphBuilder()
    x = b.resident("x")
    y, mask = b.add("dropout", [x], [100, 25])
    (z,) = b.add("relu", [y], [100])
    graph = b.build(forward_outputs=[z])
    assert repr(schedule_from_order(graph, [0, 1], [])) == f"Schedule(C0 D{mask} C1 D{y} | D{z})"


def _saved_values(graph: Graph, schedule: Schedule) -> set[int]:
    """Values live when the forward phase ends, minus forward outputs the backward drops."""
    live: set[int] = set()
    for step in schedule.forward:
        if step.kind == "compute":
            live.update(graph.ops[step.index].outputs)
        else:
            live.discard(step.index)
    dropped = set()
    for step in schedule.backward:  # frees before the first compute: forward outputs dropped
        if step.kind == "compute":
            break
        dropped.add(step.index)
    return live - dropped


def _read_in_backward(graph: Graph, schedule: Schedule) -> set[int]:
    """Forward-phase values some backward-phase op reads (no-remat: nothing is recomputed)."""
    forward_values = {v for i in schedule.computes("forward") for v in graph.ops[i].outputs}
    return {v for i in schedule.computes("backward") for v in graph.ops[i].inputs} & forward_values


@pytest.mark.parametrize("seed", range(12))
def test_no_remat_saves_exactly_what_the_backward_reads(seed: int) -> None:
    rng = random.Random(seed)
    graph = random_training_graph(rng, rng.randint(2, 60), kept_forward_values=rng.randint(0, 2))
    schedule = no_remat_schedule(graph)
    check(graph, schedule)
    required = set(graph.required_at_end)
    assert _saved_values(graph, schedule) - required == _read_in_backward(graph, schedule) - required


def test_mlp_saves_layer_inputs_and_relu_outputs() -> None:
    graph = mlp_chain_graph(3, activation_bytes=1000)
    schedule = no_remat_schedule(graph)
    saved = {graph.values[v].name for v in _saved_values(graph, schedule)}
    # linear_bwd reads the layer input (relu{i-1}), relu_bwd the relu output; the linear
    # outputs only feed their relu, so the forward frees them.
    assert saved == {"relu0", "relu1", "relu2"}
    result = simulate(graph, schedule)
    assert result.live_after_forward_bytes == 3 * 1000 + 8  # + the loss (a forward output)


def test_step_repr_and_validation() -> None:
    assert repr(Schedule((Step("compute", 0),), (Step("free", 1),))) == "Schedule(C0 | D1)"
    with pytest.raises(ValueError, match="Step.kind"):
        Step("run", 0)  # type: ignore[arg-type]
