"""Predicted peak == measured peak on constructs where fake tensors and real kernels disagree.

Each case was a budget exceeded on a model outside the zoo: the simulator's
prediction must equal the meter's measurement to the byte.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import solvers
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


def test_attention_without_dropout_is_recomputable_and_draws_nothing():
    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv, self.out = nn.Linear(32, 96), nn.Linear(32, 32)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q, k, v = self.qkv(x).view(4, 64, 3, 2, 16).permute(2, 0, 3, 1, 4)
            h = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=True)
            return self.out(h.transpose(1, 2).reshape(4, 64, 32))

    torch.manual_seed(0)
    model = nn.Sequential(Attention(), nn.GELU(), Attention())
    x = torch.randn(4, 64, 32)
    reference = copy.deepcopy(model)
    rm = Rockmate(model, x, 1.0, cache=False)
    attention = [op for op, node in zip(rm.plan.lowered.graph.ops, rm.plan.lowered.op_nodes)
                 if "scaled_dot_product" in str(node.target) and not op.is_backward]
    assert attention and all(op.recomputable for op in attention)
    low = Rockmate(model, x, solvers.min_feasible_peak(rm.plan.lowered.graph, rm.method), cache=False)
    rng = torch.get_rng_state()
    low(x).sum().backward()
    reference(x).sum().backward()
    assert torch.equal(torch.get_rng_state(), rng)
    for p, rp in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p.grad, rp.grad)


def test_kernels_returning_other_strides_than_their_meta_are_predicted_exactly():
    # NOTE: [Runtime layouts]: on CPU, _log_softmax_backward_data returns a contiguous gradient
    # where the meta kernel keeps log_softmax(dim=1)'s permuted layout (fuzz seed 118: 1280 B over).
    from tests.rematc.test_layouts import GridLogSoftmax

    torch.manual_seed(0)
    model = GridLogSoftmax(c=32, k=10)  # measured 896 B over the prediction before the fix
    x_grad = torch.randn(4, 16, 32).requires_grad_()
    rm = Rockmate(model, x_grad, 1.0, cache=False, verify=False)
    with MemoryMeter("cpu") as meter:
        rm(x_grad).backward()
    assert meter.peak_bytes == rm.predicted_peak_bytes
    assert meter.peak_bytes <= rm.budget_bytes
