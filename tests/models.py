"""The model zoo: every end-to-end test runs on every entry (one table, like thunder's OpInfo)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from rematc.models import TinyGPT, TinyGPTConfig, lm_loss


@dataclass(frozen=True)
class ZooEntry:
    """How to build a model, a batch, and the loss it trains with.

    ``make_batch(seed)`` returns ``(args, loss_args)``: the model's positional
    inputs and the extra arguments of ``loss_fn``.
    """

    name: str
    make_model: Callable[[], nn.Module]
    make_batch: Callable[[int], tuple[tuple, tuple]]
    loss_fn: Callable[..., torch.Tensor]


def _mlp() -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(6):
        layers += [nn.Linear(128, 128), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(128, 10))


def _mlp_batch(seed: int) -> tuple[tuple, tuple]:
    g = torch.Generator().manual_seed(seed)
    # Batch 512 so activations (256 KiB a layer) outweigh weight gradients (64 KiB).
    return (torch.randn(512, 128, generator=g),), (torch.randint(0, 10, (512,), generator=g),)


class SmallCNN(nn.Module):
    """Conv + BatchNorm (train mode: running statistics update) + ReLU stages."""

    def __init__(self) -> None:
        super().__init__()
        chans = [3, 16, 32, 32]
        self.stages = nn.Sequential(
            *(
                nn.Sequential(nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU(), nn.MaxPool2d(2) if i < 2 else nn.Identity())
                for i, (a, b) in enumerate(zip(chans, chans[1:]))
            )
        )
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(x).mean(dim=(2, 3)))


def _cnn_batch(seed: int) -> tuple[tuple, tuple]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(8, 3, 32, 32, generator=g),), (torch.randint(0, 10, (8,), generator=g),)


_GPT = TinyGPTConfig(vocab_size=256, seq_len=32, n_layer=3, n_head=4, n_embd=64, dropout=0.1)


def _gpt_batch(seed: int) -> tuple[tuple, tuple]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, _GPT.vocab_size, (4, _GPT.seq_len + 1), generator=g)
    return (idx[:, :-1],), (idx[:, 1:],)


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        ZooEntry("mlp", _mlp, _mlp_batch, F.cross_entropy),
        ZooEntry("transformer", lambda: TinyGPT(_GPT), _gpt_batch, lm_loss),
        ZooEntry("cnn", SmallCNN, _cnn_batch, F.cross_entropy),
    )
}


def build(entry: ZooEntry, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return entry.make_model()


def grads(model: nn.Module) -> dict[str, Any]:
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}
