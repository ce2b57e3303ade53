"""End to end on the zoo: exact outputs and gradients, measured peak under the budget and near the prediction."""

from __future__ import annotations

import copy

import pytest
import torch

from profiler.meter import MemoryMeter
from rematc import BudgetTooSmall, Rockmate
from tests.models import ZOO, build, grads

torch.set_num_threads(1)

# Positions between the smallest feasible peak (0) and the no-remat peak (1).
BUDGETS = [1.0, 0.6, 0.3, 0.0]


def min_budget(entry, model, args, loss_args) -> int:
    with pytest.raises(BudgetTooSmall) as info:
        Rockmate(model, args, 1, loss_fn=entry.loss_fn, loss_args=loss_args)
    return info.value.min_budget_bytes


def budget_between(entry, model, args, loss_args, position: float) -> int:
    """``min + position * (no_remat - min)`` for this model's own range."""
    low = min_budget(entry, model, args, loss_args)
    high = Rockmate(model, args, 1.0, loss_fn=entry.loss_fn, loss_args=loss_args).baseline_peak_bytes
    return int(low + position * (high - low))


def one_step(module, args, loss_args, loss_fn=None):
    torch.manual_seed(1234)  # same dropout masks for both
    with MemoryMeter("cpu") as meter:
        if loss_fn is None:
            loss = module(*args, loss_args=loss_args)
        else:
            loss = loss_fn(module(*args), *loss_args)
        loss.backward()
    return loss.detach(), meter.peak_bytes


@pytest.mark.parametrize("budget", BUDGETS, ids=str)
@pytest.mark.parametrize("name", sorted(ZOO))
def test_step_matches_eager_under_budget(name, budget):
    entry = ZOO[name]
    model = build(entry)
    reference = copy.deepcopy(model)
    args, loss_args = entry.make_batch(0)
    budget = budget_between(entry, model, args, loss_args, budget)
    rm = Rockmate(model, args, budget, loss_fn=entry.loss_fn, loss_args=loss_args)

    loss, measured = one_step(rm, args, loss_args)
    ref_loss, _ = one_step(reference, args, loss_args, entry.loss_fn)

    # Same kernels on the same inputs in the same order: bitwise equal.
    assert torch.equal(loss, ref_loss)
    got, want = grads(model), grads(reference)
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), f"gradient of {key} differs"
    for (key, b), rb in zip(model.named_buffers(), reference.buffers()):
        assert torch.equal(b, rb), f"buffer {key} differs"

    assert measured <= rm.budget_bytes, (measured, rm.budget_bytes)
    assert abs(rm.predicted_peak_bytes - measured) <= 0.05 * measured, (rm.predicted_peak_bytes, measured)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_lower_budget_recomputes_and_lowers_measured_peak(name):
    """The plan really changes memory: at the minimum budget the meter sees less than plain autograd."""
    entry = ZOO[name]
    model = build(entry)
    args, loss_args = entry.make_batch(0)
    _, plain_peak = one_step(copy.deepcopy(model), args, loss_args, entry.loss_fn)
    budget = min_budget(entry, model, args, loss_args)
    rm = Rockmate(model, args, budget, loss_fn=entry.loss_fn, loss_args=loss_args)
    _, measured = one_step(rm, args, loss_args)
    assert rm.plan.modules.recomputed_ops, "the minimum budget should force recomputation"
    assert measured < plain_peak


def test_adamw_three_steps_match_eager():
    entry = ZOO["transformer"]
    model = build(entry)
    reference = copy.deepcopy(model)
    args, loss_args = entry.make_batch(0)
    budget = budget_between(entry, model, args, loss_args, 0.3)
    rm = Rockmate(model, args, budget, loss_fn=entry.loss_fn, loss_args=loss_args)
    assert rm.plan.modules.recomputed_ops
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    for step in range(3):
        args, loss_args = entry.make_batch(step)
        for module, optimizer, loss_fn in ((rm, opt, None), (reference, ref_opt, entry.loss_fn)):
            optimizer.zero_grad(set_to_none=True)
            one_step(module, args, loss_args, loss_fn)
            optimizer.step()
    for (key, p), rp in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, rp), f"parameter {key} differs after 3 AdamW steps"


def test_outputs_without_loss_fn_keep_structure():
    class TwoHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(16, 32)
            self.a = torch.nn.Linear(32, 4)
            self.b = torch.nn.Linear(32, 2)

        def forward(self, x, *, scale=1.0):
            h = torch.relu(self.body(x))
            return {"a": self.a(h) * scale, "b": (self.b(h), h.sum())}

    torch.manual_seed(0)
    model = TwoHeads()
    reference = copy.deepcopy(model)
    x = torch.randn(8, 16)
    rm = Rockmate(model, {"x": x, "scale": 2.0}, 1.0)
    out, ref = rm(x=x, scale=2.0), reference(x=x, scale=2.0)
    assert set(out) == {"a", "b"} and isinstance(out["b"], tuple)
    assert torch.equal(out["a"], ref["a"]) and torch.equal(out["b"][0], ref["b"][0])
    (out["a"].sum() + out["b"][0].square().sum() + out["b"][1]).backward()
    (ref["a"].sum() + ref["b"][0].square().sum() + ref["b"][1]).backward()
    for p, rp in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p.grad, rp.grad)


def test_eval_and_no_grad_run_the_original_model():
    entry = ZOO["mlp"]
    model = build(entry)
    args, loss_args = entry.make_batch(0)
    rm = Rockmate(model, args, 1.0)
    calls = rm._step.forward_calls
    with torch.no_grad():
        assert torch.equal(rm(*args), model(*args))
    rm.eval()
    assert torch.equal(rm(*args), model(*args))
    assert rm._step.forward_calls == calls


def test_construction_leaves_buffers_and_rng_untouched():
    entry = ZOO["cnn"]
    model = build(entry)
    before = [b.clone() for b in model.buffers()]
    state = torch.get_rng_state()
    args, loss_args = entry.make_batch(0)
    Rockmate(model, args, 1.0, loss_fn=entry.loss_fn, loss_args=loss_args)
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))
    assert torch.equal(state, torch.get_rng_state())
