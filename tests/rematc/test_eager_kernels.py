"""Interpolation traced through eager's kernels: gradients bitwise equal (NOTE: [Eager kernels while tracing])."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._C import DispatchKey

from rematc import Rockmate
from rematc.eager_kernels import eager_kernels

torch.set_num_threads(1)


class Upsampler(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.conv_in, self.conv_out = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv_in(x))
        corners = {} if self.mode == "nearest" else {"align_corners": False}
        h = F.interpolate(h, scale_factor=2, mode=self.mode, **corners)
        return self.conv_out(h).square().mean()


@pytest.mark.parametrize("mode", ["bilinear", "bicubic", "nearest"])
def test_interpolation_gradients_are_bitwise_eager(mode: str):
    torch.manual_seed(0)
    model = Upsampler(mode)
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 12, 10)
    rm = Rockmate(model, x, 1.0, cache=False)
    loss = rm(x)
    loss.backward()
    want = reference(x)
    want.backward()
    assert torch.equal(loss, want)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_the_python_kernels_are_restored():
    op = torch.ops.aten.upsample_bilinear2d.vec
    before = dict(op.py_kernels)
    assert DispatchKey.CompositeImplicitAutograd in before, "torch registers a Python kernel for it"
    with eager_kernels():
        assert DispatchKey.CompositeImplicitAutograd not in op.py_kernels
    assert op.py_kernels == before
