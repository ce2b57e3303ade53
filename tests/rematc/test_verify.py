"""Verified plans (NOTE: [Verified plans]): the budget is a measured promise on the sample."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rematc.api
from profiler.meter import MemoryMeter
from rematc import BudgetTooSmall, RematcError, RematcWarning, Rockmate

torch.set_num_threads(1)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
        nn.Linear(256, 64),
    )


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2048, 64, generator=g), torch.randn(2048, 64, generator=g)


# The bytes the wrong cost model below does not see: mse_loss's element-wise buffer.
_UNSEEN = 2048 * 64 * 4


def _blind_to_output_storages(monkeypatch: pytest.MonkeyPatch) -> None:
    """A deliberately wrong cost model: fake tensors' sizes only (mse_loss's 512 KiB buffer unseen)."""
    real = rematc.api.profile_costs

    def wrong(joint, device_type):
        return {name: dataclasses.replace(cost, output_bytes=None) for name, cost in real(joint, device_type).items()}

    monkeypatch.setattr(rematc.api, "profile_costs", wrong)


def test_measured_peak_equals_prediction_and_state_is_restored():
    model = _model()
    x, y = _data()
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    rm = Rockmate(model, x, 0.9, loss_fn=F.mse_loss, loss_args=(y,), cache=False)
    assert rm.measured_peak_bytes == rm.predicted_peak_bytes <= rm.budget_bytes
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)


def test_a_wrong_cost_model_is_caught_warned_and_the_plan_still_fits(monkeypatch):
    x, y = _data()
    exact = Rockmate(_model(), x, 1.0, loss_fn=F.mse_loss, loss_args=(y,), cache=False)
    budget = exact.baseline_peak_bytes - _UNSEEN // 2  # the blind model thinks no remat fits
    _blind_to_output_storages(monkeypatch)
    with pytest.warns(RematcWarning, match="from its prediction"):
        rm = Rockmate(_model(), x, budget, loss_fn=F.mse_loss, loss_args=(y,), cache=False)
    assert rm.measured_peak_bytes <= budget
    with MemoryMeter("cpu") as meter:  # the training call, not only the verification, fits
        rm(x, loss_args=(y,)).backward()
    assert meter.peak_bytes == rm.measured_peak_bytes <= budget
    assert rm.predicted_peak_bytes < rm.measured_peak_bytes  # the model is still wrong: the margin covers it


def test_a_wrong_cost_model_without_verification_exceeds_the_budget(monkeypatch):
    # The control for the test above: the same wrong model, unverified, trains over budget.
    x, y = _data()
    exact = Rockmate(_model(), x, 1.0, loss_fn=F.mse_loss, loss_args=(y,), cache=False)
    budget = exact.baseline_peak_bytes - _UNSEEN // 2
    _blind_to_output_storages(monkeypatch)
    rm = Rockmate(_model(), x, budget, loss_fn=F.mse_loss, loss_args=(y,), cache=False, verify=False)
    assert rm.measured_peak_bytes is None
    with MemoryMeter("cpu") as meter:
        rm(x, loss_args=(y,)).backward()
    assert meter.peak_bytes > budget


def test_unfixable_gap_raises_budget_too_small_naming_the_measured_peak(monkeypatch):
    import solvers

    x, y = _data()
    probe = Rockmate(_model(), x, 1.0, loss_fn=F.mse_loss, loss_args=(y,), cache=False)
    exact_min = solvers.min_feasible_peak(probe.plan.lowered.graph, probe.method)
    _blind_to_output_storages(monkeypatch)
    with pytest.warns(RematcWarning), pytest.raises(BudgetTooSmall) as error:
        Rockmate(_model(), x, exact_min - 1, loss_fn=F.mse_loss, loss_args=(y,), cache=False)
    assert isinstance(error.value, RematcError)
    assert error.value.min_budget_bytes >= exact_min


def test_schedule_file_records_the_measured_peak(tmp_path):
    x, y = _data()
    rm = Rockmate(_model(), x, 0.9, loss_fn=F.mse_loss, loss_args=(y,), cache=False)
    path = rm.save_schedule(tmp_path / "plan.json")
    document = json.loads(path.read_text())
    assert document["measured"] == {"peak_bytes": rm.measured_peak_bytes, "margin_bytes": 0}


def test_data_parallel_wrapper_warns_that_its_buffers_are_not_planned(tmp_path):
    import torch.distributed as dist

    x, y = _data()
    model = _model()
    rm = Rockmate(model, x, 0.9, loss_fn=F.mse_loss, loss_args=(y,), cache=False)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(rm)
        with pytest.warns(RematcWarning, match="DistributedDataParallel"):
            ddp(x, loss_args=(y,)).backward()
    finally:
        dist.destroy_process_group()
