"""``Rockmate.explain()``: every kept and recomputed value, with bytes that add up to the simulator's."""

from __future__ import annotations

import pytest
import torch

import solvers
from rematc import Rockmate
from rematc.explain import Explanation
from tests.models import ZOO, build

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def planned() -> Rockmate:
    """TinyGPT half way between its smallest feasible peak and its no-remat peak: keeps some, recomputes some."""
    entry = ZOO["transformer"]
    args, loss_args = entry.make_batch(0)
    probe = Rockmate(build(entry), args, 1.0, loss_fn=entry.loss_fn, loss_args=loss_args)
    low = solvers.min_feasible_peak(probe.plan.lowered.graph, probe.method)
    budget = (low + probe.baseline_peak_bytes) // 2
    return Rockmate(build(entry), args, budget, loss_fn=entry.loss_fn, loss_args=loss_args)


def test_every_saved_value_is_listed_with_its_bytes(planned: Rockmate) -> None:
    explanation = planned.explain()
    graph = planned.plan.lowered.graph
    kept = {v.name: v for v in explanation.kept}
    activations = [
        name for name in planned.plan.modules.saved
        if not graph.values[_value(planned, name)].is_resident
    ]
    assert activations and sorted(kept) == sorted(activations)
    for name, report in kept.items():
        v = _value(planned, name)
        assert report.storage_bytes == graph.allocated_bytes(graph.storage_root(v))
        assert report.bytes in (0, report.storage_bytes)
        assert report.bytes or report.shares, f"{name}: 0 bytes must name the storage it shares"


def test_kept_bytes_add_up_to_the_simulated_live_bytes_after_forward(planned: Rockmate) -> None:
    """kept + forward outputs == what simulate says is live when the forward ends (NOTE: [Kept bytes])."""
    explanation = planned.explain()
    assert sum(v.bytes for v in explanation.kept) == explanation.kept_bytes
    assert explanation.kept_bytes + explanation.forward_output_bytes == planned.plan.predicted.live_after_forward_bytes
    assert explanation.live_after_forward_bytes == planned.plan.predicted.live_after_forward_bytes
    # The loss is the only forward output here: one float32.
    assert explanation.forward_output_bytes == 4


def test_recomputed_values_are_the_recomputed_ops_outputs(planned: Rockmate) -> None:
    explanation = planned.explain()
    graph = planned.plan.lowered.graph
    recomputed_ops = set(planned.plan.modules.recomputed_ops)
    assert recomputed_ops, "the budget should force recomputation"
    names = {graph.values[v].name for op in graph.ops if op.name in recomputed_ops for v in op.outputs}
    assert {v.name for v in explanation.recomputed} == names
    assert sum(v.recompute_count for v in explanation.recomputed) >= len(recomputed_ops)
    assert explanation.recomputed_bytes == sum(v.bytes * v.recompute_count for v in explanation.recomputed)


def test_peak_names_the_op_and_phase_of_the_simulated_peak(planned: Rockmate) -> None:
    explanation = planned.explain()
    predicted = planned.plan.predicted
    kind, index = planned.plan.schedule.steps[predicted.peak_step]
    assert kind == "compute"
    assert explanation.predicted_peak_bytes == planned.predicted_peak_bytes
    assert explanation.peak_op == planned.plan.lowered.graph.ops[index].name
    forward_steps = len(planned.plan.schedule.forward)
    assert explanation.peak_phase == ("forward" if predicted.peak_step < forward_steps else "backward")


def test_sources_point_at_the_users_code(planned: Rockmate) -> None:
    explanation = planned.explain()
    # TinyGPT lives in rematc/models.py; every activation comes from one of its lines.
    for value in explanation.values:
        assert value.source.startswith("models.py:"), (value.name, value.source)
    assert "in forward: " in explanation.values[0].source


def test_report_prints_each_value_and_the_totals(planned: Rockmate) -> None:
    explanation = planned.explain()
    assert isinstance(explanation, Explanation)
    text = str(explanation)
    assert text == repr(explanation)
    assert text.startswith("rematc plan: budget ")
    assert f"predicted peak {solvers.format_bytes(planned.predicted_peak_bytes)}" in text
    assert f"peak: in the {explanation.peak_phase}" in text and explanation.peak_op in text
    lines = text.splitlines()
    for value in explanation.values:
        line = next(line for line in lines if f"  {value.name} " in line and value.decision in line)
        assert solvers.format_bytes(value.bytes) in line and value.op in line


def test_no_remat_plan_recomputes_nothing() -> None:
    entry = ZOO["mlp"]
    args, loss_args = entry.make_batch(0)
    rm = Rockmate(build(entry), args, 1.0, loss_fn=entry.loss_fn, loss_args=loss_args)
    explanation = rm.explain()
    assert explanation.recomputed == () and explanation.recomputed_bytes == 0
    assert explanation.kept_bytes + explanation.forward_output_bytes == rm.plan.predicted.live_after_forward_bytes
    assert "recomputed: 0 values" in str(explanation)


def _value(rm: Rockmate, name: str) -> int:
    return next(v for v, node in enumerate(rm.plan.lowered.value_nodes) if node is not None and node.name == name)
