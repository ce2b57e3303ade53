"""The benchmark's models: GPT-2 and Llama (Hugging Face, random weights) and a small ResNet.

Each :class:`Workload` builds a model, a batch and the loss it trains with,
and names the blocks a user would wrap in ``torch.utils.checkpoint``. Two
sizes: ``quick`` (runs in minutes on a 2-core CPU) and ``full`` (GPT-2 small's
12 layers and sequence 1024, meant for a GPU). Dropout is off everywhere so
that every method computes the same function and gradients can be compared
without replaying random masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Workload:
    """One model to benchmark.

    Attributes:
        name: short name used in tables and plots.
        description: the shapes, in words, for the report.
        make_model: builds the model (random weights from the current seed).
        make_batch: ``make_batch(generator) -> (args, targets)``: the model's
            positional inputs and the loss's targets.
        loss_fn: ``loss_fn(output, targets) -> scalar loss``.
        blocks: the modules checkpointed one by one (transformer layers,
            residual blocks).
    """

    name: str
    description: str
    make_model: Callable[[], nn.Module]
    make_batch: Callable[[torch.Generator], tuple[tuple[torch.Tensor, ...], torch.Tensor]]
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor]
    blocks: Callable[[nn.Module], list[nn.Module]]


# -- language models ------------------------------------------------------------------------


def causal_lm_loss(output: Any, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on a Hugging Face ``CausalLMOutput``'s logits."""
    logits = output.logits
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


def _token_batch(vocab_size: int, batch_size: int, seq_len: int):
    def make_batch(generator: torch.Generator) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        tokens = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=generator)
        return (tokens[:, :-1].contiguous(),), tokens[:, 1:].contiguous()

    return make_batch


def gpt2(*, n_layer: int, n_embd: int, n_head: int, vocab_size: int, seq_len: int, batch_size: int) -> Workload:
    """Hugging Face ``GPT2LMHeadModel`` from a ``GPT2Config`` (no download)."""

    def make_model() -> nn.Module:
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            vocab_size=vocab_size, n_positions=seq_len, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
            bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1,
        )
        return GPT2LMHeadModel(config)

    return Workload(
        name="gpt2",
        description=(
            f"HF GPT2LMHeadModel, {n_layer} layers, n_embd {n_embd}, {n_head} heads, vocab {vocab_size}, "
            f"batch {batch_size} x seq {seq_len}"
        ),
        make_model=make_model,
        make_batch=_token_batch(vocab_size, batch_size, seq_len),
        loss_fn=causal_lm_loss,
        blocks=lambda model: list(model.get_submodule("transformer.h").children()),
    )


def llama(
    *, n_layer: int, hidden: int, intermediate: int, n_head: int, n_kv_head: int, vocab_size: int,
    seq_len: int, batch_size: int,
) -> Workload:
    """Hugging Face ``LlamaForCausalLM`` from a small ``LlamaConfig`` (RMSNorm, RoPE, SwiGLU, GQA)."""

    def make_model() -> nn.Module:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
            num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=n_kv_head,
            max_position_embeddings=seq_len, attention_dropout=0.0, use_cache=False,
            bos_token_id=0, eos_token_id=0, pad_token_id=None,
        )
        return LlamaForCausalLM(config)

    return Workload(
        name="llama",
        description=(
            f"HF LlamaForCausalLM, {n_layer} layers, hidden {hidden}, MLP {intermediate}, "
            f"{n_head} heads / {n_kv_head} KV heads, vocab {vocab_size}, batch {batch_size} x seq {seq_len}"
        ),
        make_model=make_model,
        make_batch=_token_batch(vocab_size, batch_size, seq_len),
        loss_fn=causal_lm_loss,
        blocks=lambda model: list(model.get_submodule("model.layers").children()),
    )


# -- ResNet ---------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv + BatchNorm, identity or 1x1 projection shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class ResNet(nn.Module):
    """A ResNet-18-style CNN (no torchvision here): stem, stages of basic blocks, pooled linear head."""

    def __init__(self, widths: tuple[int, ...], blocks_per_stage: int, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks: list[nn.Module] = []
        in_channels = widths[0]
        for stage, width in enumerate(widths):
            for index in range(blocks_per_stage):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(BasicBlock(in_channels, width, stride))
                in_channels = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def resnet(*, widths: tuple[int, ...], blocks_per_stage: int, image_size: int, batch_size: int) -> Workload:
    def make_batch(generator: torch.Generator) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        images = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
        return (images,), torch.randint(0, 10, (batch_size,), generator=generator)

    return Workload(
        name="resnet",
        description=(
            f"ResNet (basic blocks, BatchNorm), widths {list(widths)}, {blocks_per_stage} blocks/stage, "
            f"batch {batch_size} x 3x{image_size}x{image_size}"
        ),
        make_model=lambda: ResNet(widths, blocks_per_stage),
        make_batch=make_batch,
        loss_fn=F.cross_entropy,
        blocks=lambda model: list(model.get_submodule("blocks").children()),
    )


# -- the two sizes --------------------------------------------------------------------------


def workloads(size: str) -> list[Workload]:
    """The benchmark's models at size ``"quick"`` (CPU, minutes), ``"full"`` (GPU) or ``"tiny"`` (smoke test)."""
    if size == "tiny":
        return [
            gpt2(n_layer=2, n_embd=32, n_head=2, vocab_size=64, seq_len=16, batch_size=2),
            llama(n_layer=2, hidden=32, intermediate=64, n_head=2, n_kv_head=1, vocab_size=64, seq_len=16, batch_size=2),
            resnet(widths=(8, 16), blocks_per_stage=1, image_size=8, batch_size=2),
        ]
    if size == "quick":
        return [
            gpt2(n_layer=4, n_embd=128, n_head=4, vocab_size=2048, seq_len=128, batch_size=4),
            llama(
                n_layer=4, hidden=128, intermediate=352, n_head=4, n_kv_head=2, vocab_size=2048,
                seq_len=128, batch_size=4,
            ),
            resnet(widths=(16, 32, 64), blocks_per_stage=2, image_size=32, batch_size=16),
        ]
    if size == "full":
        return [
            gpt2(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, seq_len=1024, batch_size=8),
            llama(
                n_layer=8, hidden=1024, intermediate=2816, n_head=16, n_kv_head=8, vocab_size=32000,
                seq_len=1024, batch_size=8,
            ),
            resnet(widths=(64, 128, 256, 512), blocks_per_stage=2, image_size=64, batch_size=64),
        ]
    raise ValueError(f"size must be 'tiny', 'quick' or 'full', got {size!r}")
