"""The model zoo: every end-to-end test runs on every entry (one table, like thunder's OpInfo)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from rematc.models import TinyGPT, TinyGPTConfig, lm_loss
from tests import zoo_models as zoo


@dataclass(frozen=True)
class Tolerance:
    """Where rematc and eager cannot run the same kernels, how close is equal, and why."""

    rtol: float
    atol: float
    why: str


@dataclass(frozen=True)
class ZooEntry:
    """How to build a model, a batch, and the loss it trains with.

    ``make_batch(seed)`` returns ``(sample, loss_args)``: ``sample`` is what
    ``Rockmate`` takes (a tuple of positional arguments or a dict of keyword
    arguments) and ``loss_args`` the extra arguments of ``loss_fn``.

    ``loss_fn`` runs inside the planned step (``Rockmate(..., loss_fn=)``);
    when it is None the model computes its own loss (Hugging Face models given
    ``labels``) and ``loss_of(output)`` picks it out of what the model returns.
    ``autocast`` is the dtype of a ``torch.autocast`` region around the step.
    ``tolerance`` is None when outputs and gradients must be bitwise equal.
    """

    name: str
    make_model: Callable[[], nn.Module]
    make_batch: Callable[[int], tuple[Any, tuple]]
    loss_fn: Callable[..., torch.Tensor] | None
    loss_of: Callable[[Any], torch.Tensor] = lambda output: output
    autocast: torch.dtype | None = None
    tolerance: Tolerance | None = None

    @property
    def returns_loss(self) -> bool:
        """Whether the model returns its own loss among other outputs (a Hugging Face ``ModelOutput``).

        Such a step is called the ordinary way, ``module(**batch).loss.backward()``.
        """
        return self.loss_of is _model_loss


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


def _model_loss(output: Any) -> torch.Tensor:
    return output.loss if hasattr(output, "loss") else output["loss"]


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        ZooEntry("mlp", _mlp, _mlp_batch, F.cross_entropy),
        ZooEntry("transformer", lambda: TinyGPT(_GPT), _gpt_batch, lm_loss),
        ZooEntry("cnn", SmallCNN, _cnn_batch, F.cross_entropy),
        # Hugging Face, random weights from small configs; the model computes its loss from ``labels``.
        ZooEntry("hf_gpt2", zoo.gpt2, zoo.lm_batch, None, _model_loss),  # LM head tied to the embedding
        ZooEntry("hf_llama", zoo.llama, zoo.lm_batch, None, _model_loss),
        ZooEntry("hf_bert", zoo.bert, zoo.bert_batch, None, _model_loss),
        ZooEntry("hf_vit", zoo.vit, zoo.vit_batch, None, _model_loss),
        ZooEntry("resnet", zoo.ResNet, zoo.image_batch, F.cross_entropy),
        ZooEntry("resnet_frozen_backbone", zoo.frozen_backbone_resnet, zoo.image_batch, F.cross_entropy),
        ZooEntry("unet", zoo.UNet, zoo.segmentation_batch, F.cross_entropy),
        # permutes, LayerNorm and an MLP on channels-last, layer scale, dropout, drop path
        ZooEntry("convnext", zoo.ConvNeXt, zoo.convnext_batch, F.cross_entropy),
        ZooEntry("random_ops_cnn", zoo.RandomOpsCNN, zoo.image_batch, F.cross_entropy),
        ZooEntry("sdpa_dropout", zoo.SDPAStack, zoo.sequence_batch, zoo.token_loss),
        ZooEntry("gpt_frozen_embeddings", zoo.gpt_frozen_embeddings, zoo.gpt_batch, lm_loss),
        ZooEntry("gpt_bfloat16_params", zoo.gpt_bfloat16, zoo.gpt_batch, lm_loss),
        ZooEntry("gpt_autocast_bfloat16", zoo.gpt_autocast, zoo.gpt_batch, lm_loss, autocast=torch.bfloat16),
        ZooEntry("multi_io_kwargs", zoo.MultiInputOutput, zoo.multi_io_kwargs_batch, None, _model_loss),
        ZooEntry("multi_io_positional", zoo.MultiInputOutput, zoo.multi_io_positional_batch, None, _model_loss),
    )
}


def build(entry: ZooEntry, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return entry.make_model()


def grads(model: nn.Module) -> dict[str, Any]:
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}
