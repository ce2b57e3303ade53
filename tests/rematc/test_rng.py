"""Dropout replayed from a saved RNG state (NOTE: [Replayed dropout] in rematc/rng.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rematc.api
import solvers
from profiler.meter import MemoryMeter
from rematc import Rockmate
from rematc.rng import DRAW_OP, REPLAY_OP, RNG_STATE_OP

torch.set_num_threads(1)


class DropoutStack(nn.Module):
    """Attention-like blocks: softmax probabilities through dropout, as in a Llama with attention dropout."""

    def __init__(self, width: int = 16, layers: int = 8) -> None:
        super().__init__()
        self.proj = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for proj in self.proj:
            scores = proj(x) @ x.transpose(-1, -2)  # (B, T, T)
            x = x + F.dropout(scores.softmax(-1), 0.2, self.training) @ x
        return x


def _loss(output: torch.Tensor) -> torch.Tensor:
    return output.square().mean()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "permuted", "channels_last"])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 1.0])
def test_draw_and_replay_give_the_kernels_mask_and_rng_stream(dtype: torch.dtype, layout: str, p: float):
    x = torch.randn(4, 6, 5, 7).to(dtype)
    x = {"contiguous": x, "permuted": x.permute(0, 2, 3, 1),
         "channels_last": x.contiguous(memory_format=torch.channels_last)}[layout]
    torch.manual_seed(3)
    _, want_mask = torch.ops.aten.native_dropout(x, p, True)
    want_after = torch.get_rng_state()

    torch.manual_seed(3)
    state = RNG_STATE_OP(x)
    mask = DRAW_OP(x, p)
    assert torch.equal(mask, want_mask) and mask.stride() == want_mask.stride()
    assert torch.equal(torch.get_rng_state(), want_after), "the first draw moves the stream on as eager's"
    for _ in range(2):  # any number of times, in any phase
        again = REPLAY_OP(state, x, p)
        assert torch.equal(again, want_mask) and again.stride() == want_mask.stride()
        assert torch.equal(torch.get_rng_state(), want_after), "replaying draws nothing from the stream"


def test_draw_and_replay_allocate_the_same_bytes():
    """One cost describes both emissions of the op (NOTE: [Replayed dropout])."""
    x = torch.randn(64, 96)
    state = RNG_STATE_OP(x)
    with MemoryMeter("cpu") as drawing:
        DRAW_OP(x, 0.2)
    with MemoryMeter("cpu") as replaying:
        REPLAY_OP(state, x, 0.2)
    assert drawing.peak_bytes == replaying.peak_bytes == 64 * 96 * (4 + 1)


def _min_budget(model: nn.Module, x: torch.Tensor) -> int:
    rm = Rockmate(copy.deepcopy(model), x, 1.0, loss_fn=_loss, cache=False, verify=False)
    return solvers.min_feasible_peak(rm.plan.lowered.graph, rm.method)


def test_masks_are_recomputed_at_the_smallest_budget_bitwise_like_eager():
    torch.manual_seed(0)
    model, x = DropoutStack(), torch.randn(4, 96, 16)
    reference = copy.deepcopy(model)
    rm = Rockmate(model, x, _min_budget(model, x), loss_fn=_loss, cache=False)
    replays = [n for n in rm.plan.modules.recomputed_ops if n.startswith("replay_dropout")]
    assert replays, "at the smallest budget some masks are drawn again instead of kept"

    torch.manual_seed(7)
    with MemoryMeter("cpu") as meter:
        loss = rm(x)
        loss.backward()
    rng = torch.get_rng_state()
    torch.manual_seed(7)
    want = _loss(reference(x))
    want.backward()
    assert torch.equal(loss, want)
    assert torch.equal(rng, torch.get_rng_state())
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p.grad, q.grad)
    assert meter.peak_bytes == rm.predicted_peak_bytes <= rm.budget_bytes


def test_replaying_lowers_the_smallest_peak(monkeypatch: pytest.MonkeyPatch):
    torch.manual_seed(0)
    model, x = DropoutStack(), torch.randn(4, 96, 16)
    replayed = _min_budget(model, x)
    monkeypatch.setattr(rematc.api, "make_dropout_replayable", lambda gm: 0)
    kept = _min_budget(model, x)
    # Each (4, 96, 96) bool mask is 36864 bytes, its state 5056 (measured: 864840 against 933896).
    assert replayed < kept, (replayed, kept)
