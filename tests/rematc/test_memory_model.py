"""Predicted peak == measured peak on constructs where fake tensors and real kernels disagree.

Each case was a budget exceeded on a model outside the zoo: the simulator's
prediction must equal the meter's measurement to the byte.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from profiler.meter import MemoryMeter
from rematc import Rockmate

torch.set_num_threads(1)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64))


@pytest.mark.parametrize(
    "loss_fn",
    [F.mse_loss, F.smooth_l1_loss, F.l1_loss, F.huber_loss],
    ids=["mse", "smooth_l1", "l1", "huber"],
)
def test_reduced_loss_viewing_its_elementwise_buffer_is_predicted_exactly(loss_fn):
    # NOTE: [Real output storages]: mse_loss's 0-dim loss views a (256, 64) buffer on CPU.
    model = _mlp()
    x, y = torch.randn(256, 64), torch.randn(256, 64)
    rm = Rockmate(model, x, 1.0, loss_fn=loss_fn, loss_args=(y,), cache=False)
    with MemoryMeter("cpu") as meter:
        rm(x, loss_args=(y,)).backward()
    assert meter.peak_bytes == rm.predicted_peak_bytes
    assert meter.peak_bytes <= rm.budget_bytes
