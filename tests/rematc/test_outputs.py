"""Outputs the caller drops (NOTE: [Outputs the caller drops]): the ordinary Hugging Face call."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from profiler.meter import MemoryMeter
from rematc import BudgetTooSmall, RematcError, RematcWarning, Rockmate

torch.set_num_threads(1)


class LossAndLogits(nn.Module):
    """Returns ``{"loss", "logits"}`` like a Hugging Face LM given labels: large logits, scalar loss."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU())
        self.head = nn.Linear(64, 512)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.head(self.body(x))
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def _setup():
    torch.manual_seed(0)
    model = LossAndLogits()
    g = torch.Generator().manual_seed(1)
    batch = {"x": torch.randn(256, 32, generator=g), "labels": torch.randint(0, 512, (256,), generator=g)}
    return model, batch


def _eager_peak(model: nn.Module, batch: dict) -> int:
    with MemoryMeter("cpu") as meter:
        model(**batch)["loss"].backward()
    return meter.peak_bytes


def test_ordinary_call_is_predicted_exactly_and_costs_no_more_than_eager():
    model, batch = _setup()
    reference = copy.deepcopy(model)
    eager = _eager_peak(reference, batch)
    rm = Rockmate(model, batch, 1.0, cache=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RematcWarning)
        with MemoryMeter("cpu") as meter:
            rm(**batch)["loss"].backward()
    assert meter.peak_bytes == rm.predicted_peak_bytes == rm.measured_peak_bytes
    assert meter.peak_bytes <= 1.02 * eager
    for p, rp in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p.grad, rp.grad)


def test_same_cost_as_a_loss_fn_picking_the_loss():
    model, batch = _setup()
    ordinary = Rockmate(model, batch, 1.0, cache=False)
    picked = Rockmate(copy.deepcopy(model), batch, 1.0, cache=False, loss_fn=lambda o: o["loss"])
    assert ordinary.measured_peak_bytes <= picked.measured_peak_bytes


def test_holding_the_logits_through_the_backward_warns():
    model, batch = _setup()
    rm = Rockmate(model, batch, 1.0, cache=False)
    out = rm(**batch)
    with pytest.warns(RematcWarning, match="still holds output.*logits"):
        out["loss"].backward()


def test_hold_outputs_plans_them_held_and_then_predicts_exactly():
    model, batch = _setup()
    dropped = Rockmate(copy.deepcopy(model), batch, 1.0, cache=False)
    rm = Rockmate(model, batch, 1.0, cache=False, hold_outputs=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RematcWarning)
        with MemoryMeter("cpu") as meter:
            out = rm(**batch)
            out["loss"].backward()
    assert meter.peak_bytes == rm.predicted_peak_bytes > dropped.predicted_peak_bytes


def test_a_backward_through_an_output_planned_without_gradient_raises():
    model, batch = _setup()
    rm = Rockmate(model, batch, 1.0, cache=False)
    out = rm(**batch)
    assert out["logits"].requires_grad
    with pytest.raises(RematcError, match="'logits'.*differentiable_outputs='all'"):
        (out["loss"] + out["logits"].square().mean()).backward()


def test_differentiable_outputs_all_gives_exact_gradients_through_every_output():
    # At the smallest budget: a regression test of the MILP's accounting for a held output
    # the loss reads (NOTE: [End values the forward made]).
    model, batch = _setup()
    reference = copy.deepcopy(model)
    with pytest.raises(BudgetTooSmall) as error:
        Rockmate(copy.deepcopy(model), batch, 1, cache=False, differentiable_outputs="all")
    rm = Rockmate(model, batch, error.value.min_budget_bytes, cache=False, differentiable_outputs="all")
    assert rm.measured_peak_bytes == rm.predicted_peak_bytes
    out, ref = rm(**batch), reference(**batch)
    (out["loss"] + out["logits"].square().mean()).backward()
    (ref["loss"] + ref["logits"].square().mean()).backward()
    for p, rp in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p.grad, rp.grad)
