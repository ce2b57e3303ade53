"""End to end on the zoo: exact outputs and gradients, measured peak under the budget and near the prediction."""

from __future__ import annotations

import copy

import pytest
import torch

from profiler.meter import MemoryMeter
from rematc import BudgetTooSmall, Rockmate
from tests.models import ZOO, build

torch.set_num_threads(1)


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


# The per-model checks (outputs, gradients, buffers, RNG, measured vs budget and
# prediction, recomputation at the smallest budget) run on every zoo entry in
# test_zoo.py.


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
