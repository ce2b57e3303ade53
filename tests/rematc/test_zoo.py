"""The end-to-end checks, run on every zoo entry (``tests/models.py``) at several budgets.

For each entry and each budget between its own smallest feasible peak and its
no-remat peak, one training step through ``Rockmate`` and the same step in
eager autograd (same seed, same dropout masks) must give:

- the same outputs, of the same types (``ModelOutput`` subclasses included),
  the same loss and the same gradients: bitwise unless the entry states a
  tolerance and why; parameters that do not require grad get none;
- the same buffers (BatchNorm running statistics updated exactly once) and
  the same RNG state afterwards (recomputation draws no random numbers);
- a measured peak (``MemoryMeter``) within the budget and within 5% of the
  predicted peak;
- random ops in the forward graph only, each exactly once;

then a second micro-batch accumulates into the same gradients (still under
the budget) and an optimizer step leaves equal parameters. At the smallest
budget the plan must recompute and measure below eager autograd. The bytes
``explain()`` lists as kept add up to what the simulator keeps live.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import pytest
import torch
from torch.utils._pytree import tree_flatten, tree_map

import solvers
from profiler.meter import MemoryMeter
from rematc import Rockmate
from rematc.api import split_sample
from tests.models import ZOO, Tolerance, ZooEntry, build

torch.set_num_threads(1)

# Positions between the entry's smallest feasible peak (0) and its no-remat peak (1).
POSITIONS = (1.0, 0.5, 0.0)
SEED = 1234


def _autocast(entry: ZooEntry) -> contextlib.AbstractContextManager:
    if entry.autocast is None:
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=entry.autocast)


def _rockmate(entry: ZooEntry, model: torch.nn.Module, budget: int | float) -> Rockmate:
    sample, loss_args = entry.make_batch(0)
    with _autocast(entry):
        return Rockmate(model, sample, budget, loss_fn=entry.loss_fn, loss_args=loss_args)


def _forward(entry: ZooEntry, module: torch.nn.Module, args: tuple, kwargs: dict, loss_args: tuple, planned: bool) -> Any:
    if planned:
        return module(*args, loss_args=loss_args, **kwargs)
    output = module(*args, **kwargs)
    return output if entry.loss_fn is None else entry.loss_fn(output, *loss_args)


def _step(entry: ZooEntry, module: torch.nn.Module, seed: int, planned: bool) -> tuple[Any, torch.Tensor, int, torch.Tensor, list]:
    """One forward+backward on batch ``seed``: output, loss, measured peak, RNG state after, input gradients.

    The step is measured as it is called the ordinary way: a model that
    returns a loss among other outputs (Hugging Face's logits) is called as
    ``module(**batch).loss.backward()``, so the other outputs are dropped
    before the backward. Its outputs are then compared on a forward of the
    same batch and seed without a backward (outputs do not depend on it).
    """
    sample, loss_args = entry.make_batch(seed)
    args, kwargs = split_sample(sample)
    compared = None
    if entry.loss_fn is None and entry.returns_loss:
        torch.manual_seed(SEED)
        with _autocast(entry):
            compared = tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t,
                                _forward(entry, module, args, kwargs, loss_args, planned))
    torch.manual_seed(SEED)  # the same dropout masks for rematc and eager
    with _autocast(entry), MemoryMeter("cpu") as meter:
        output = _forward(entry, module, args, kwargs, loss_args, planned)
        loss = entry.loss_of(output)
        if compared is not None:
            output = None  # the ordinary call: `module(**batch).loss.backward()`
        loss.backward()
    input_grads = [t.grad for t in tree_flatten(sample)[0] if isinstance(t, torch.Tensor) and t.requires_grad]
    return output if compared is None else compared, loss.detach(), meter.peak_bytes, torch.get_rng_state(), input_grads


def _assert_same(got: Any, want: Any, tolerance: Tolerance | None, what: str) -> None:
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), f"{what}: got {type(got).__name__}, want a tensor"
        assert got.dtype == want.dtype and got.shape == want.shape, f"{what}: {got.dtype}{list(got.shape)} vs {want.dtype}{list(want.shape)}"
        if tolerance is None:
            assert torch.equal(got, want), f"{what} differs (max abs diff {(got.float() - want.float()).abs().max():.3g})"
        else:
            torch.testing.assert_close(got, want, rtol=tolerance.rtol, atol=tolerance.atol, msg=lambda m: f"{what}: {m} ({tolerance.why})")
    else:
        assert got == want, f"{what}: {got!r} != {want!r}"


def _assert_same_outputs(got: Any, want: Any, tolerance: Tolerance | None) -> None:
    assert type(got) is type(want), f"output type {type(got).__name__}, eager returns {type(want).__name__}"
    got_leaves, got_spec = tree_flatten(got)
    want_leaves, want_spec = tree_flatten(want)
    assert got_spec == want_spec, f"output structure differs:\n{got_spec}\nvs\n{want_spec}"
    for i, (g, w) in enumerate(zip(got_leaves, want_leaves)):
        _assert_same(g.detach() if isinstance(g, torch.Tensor) else g, w.detach() if isinstance(w, torch.Tensor) else w, tolerance, f"output leaf {i}")


def _assert_same_state(model: torch.nn.Module, reference: torch.nn.Module, tolerance: Tolerance | None, when: str) -> None:
    for (name, p), rp in zip(model.named_parameters(), reference.parameters()):
        assert p.requires_grad == rp.requires_grad
        if not rp.requires_grad:
            assert p.grad is None, f"{when}: frozen parameter {name} got a gradient"
        assert (p.grad is None) == (rp.grad is None), f"{when}: gradient of {name}: {p.grad is None} vs eager {rp.grad is None}"
        if rp.grad is not None:
            _assert_same(p.grad, rp.grad, tolerance, f"{when}: gradient of {name}")
    for (name, b), rb in zip(model.named_buffers(), reference.buffers()):
        _assert_same(b, rb, None, f"{when}: buffer {name}")  # buffers are exact even in reduced precision


def _is_random(node: torch.fx.Node) -> bool:
    return isinstance(node.target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in node.target.tags


def _random_ops(gm: torch.fx.GraphModule) -> list[str]:
    return [n.name for n in gm.graph.nodes if _is_random(n)]


def _check_plan(
    entry: ZooEntry, rm: Rockmate, model: torch.nn.Module, reference: torch.nn.Module, position: float, low: int, high: int
) -> None:
    """All the checks for ``rm`` (planned on ``model``) against ``reference``, an untouched copy."""
    where = f"{entry.name} at position {position} (budget {rm.budget_bytes} B in [{low}, {high}])"

    # Random ops: drawn in the forward, once each; never in the backward.
    joint_random = [n.name for n in rm.plan.lowered.op_nodes if _is_random(n)]
    assert sorted(_random_ops(rm.plan.modules.forward)) == sorted(joint_random), where
    assert _random_ops(rm.plan.modules.backward) == [], where

    output, loss, measured, rng, input_grads = _step(entry, rm, 0, planned=True)
    ref_output, ref_loss, eager_peak, ref_rng, ref_input_grads = _step(entry, reference, 0, planned=False)
    _assert_same(loss, ref_loss, entry.tolerance, f"{where}: loss")
    _assert_same_outputs(output, ref_output, entry.tolerance)
    assert len(input_grads) == len(ref_input_grads)
    for i, (g, rg) in enumerate(zip(input_grads, ref_input_grads)):
        _assert_same(g, rg, entry.tolerance, f"{where}: gradient of input {i}")
    _assert_same_state(model, reference, entry.tolerance, where)
    assert torch.equal(rng, ref_rng), f"{where}: the RNG advanced differently from eager"

    assert measured <= rm.budget_bytes, f"{where}: measured {measured} > budget {rm.budget_bytes}"
    predicted = rm.predicted_peak_bytes
    assert predicted == measured, f"{where}: predicted {predicted}, measured {measured} ({measured - predicted:+d} B)"
    explanation = rm.explain()  # NOTE: [Kept bytes]: what the forward saves is what simulate keeps live
    assert explanation.kept_bytes + explanation.forward_output_bytes == rm.plan.predicted.live_after_forward_bytes, where
    if position == 0.0 and low < high:
        # The smallest budget is a real saving: recomputation, or an order of ops (the MILP
        # reorders; a frozen backbone needs no saved activations) greedy's fixed order misses.
        assert rm.plan.predicted.peak_bytes < rm.plan.baseline.peak_bytes, where
        assert measured < eager_peak, f"{where}: measured {measured} not below eager {eager_peak}"

    # Gradient accumulation: a second micro-batch, then one optimizer step.
    _, _, measured_2, _, _ = _step(entry, rm, 1, planned=True)
    _step(entry, reference, 1, planned=False)
    _assert_same_state(model, reference, entry.tolerance, f"{where}, after 2 micro-batches")
    assert measured_2 <= rm.budget_bytes, f"{where}: second micro-batch measured {measured_2} > budget"
    for m in (model, reference):
        optimizer = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
        optimizer.step()
    for (name, p), rp in zip(model.named_parameters(), reference.parameters()):
        _assert_same(p.detach(), rp.detach(), entry.tolerance, f"{where}: parameter {name} after the step")


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_entry_matches_eager_under_budgets(name: str) -> None:
    entry = ZOO[name]
    original = build(entry)
    for position in POSITIONS:
        model, reference = copy.deepcopy(original), copy.deepcopy(original)
        if position == 1.0:
            # The no-remat plan also gives this model's range: its baseline and smallest feasible peak.
            rm = _rockmate(entry, model, 1.0)
            high = rm.baseline_peak_bytes
            low = solvers.min_feasible_peak(rm.plan.lowered.graph, rm.method)
        else:
            rm = _rockmate(entry, model, int(low + position * (high - low)))
        _check_plan(entry, rm, model, reference, position, low, high)
