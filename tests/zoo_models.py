"""Models of the zoo (``tests/models.py``): the architectures people train, kept tiny.

Hugging Face models are built from small configs with random weights (nothing
is downloaded). The others are plain ``nn.Module``s written to exercise one
construct each: BatchNorm in train mode, long skip connections, SDPA with
``dropout_p``, several inputs and outputs with non-tensor arguments, frozen
parameters, bfloat16 parameters.

Every ``*_batch(seed)`` returns ``(sample, loss_args)``: ``sample`` is what
``Rockmate`` takes (a tuple of positional arguments or a dict of keyword
arguments) and ``loss_args`` the extra arguments of the entry's ``loss_fn``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.workloads import BasicBlock
from rematc.models import TinyGPT, TinyGPTConfig

# -- Hugging Face ------------------------------------------------------------------
# Widths 32, 2 layers, sequences of 16: each captures in a few seconds on CPU.
VOCAB = 128
SEQ = 16


def _tokens(seed: int, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, SEQ), generator=g)


def gpt2() -> nn.Module:
    """GPT-2 with its LM head tied to the token embedding; dropout 0.1 everywhere."""
    import transformers

    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=0, eos_token_id=0, use_cache=False,
    )
    model = transformers.GPT2LMHeadModel(config).train()
    assert model.lm_head.weight is model.transformer.wte.weight, "the zoo covers weight tying with GPT-2"
    return model


def llama() -> nn.Module:
    """Llama: RoPE, RMSNorm, SDPA with grouped KV heads and ``dropout_p``, SwiGLU MLP."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        attention_dropout=0.1, bos_token_id=0, eos_token_id=0, pad_token_id=None, use_cache=False,
    )
    return transformers.LlamaForCausalLM(config).train()


def lm_batch(seed: int) -> tuple[dict, tuple]:
    """``input_ids`` and ``labels``: the model computes its own LM loss."""
    ids = _tokens(seed)
    return {"input_ids": ids, "labels": ids}, ()


def bert() -> nn.Module:
    """BERT sequence classifier: padding attention mask, token types, dropout."""
    import transformers

    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32, type_vocab_size=2, num_labels=3,
        pad_token_id=0,
    )
    return transformers.BertForSequenceClassification(config).train()


def bert_batch(seed: int) -> tuple[dict, tuple]:
    g = torch.Generator().manual_seed(seed)
    ids = _tokens(seed)
    attention_mask = torch.ones_like(ids)
    attention_mask[1, SEQ * 5 // 8:] = 0  # the second sequence is padded
    token_type_ids = torch.zeros_like(ids)
    token_type_ids[:, SEQ // 2:] = 1  # sentence pairs
    labels = torch.randint(0, 3, (2,), generator=g)
    sample = {"input_ids": ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids, "labels": labels}
    return sample, ()


def vit() -> nn.Module:
    """ViT image classifier (patch embedding convolution, CLS token, dropout)."""
    import transformers

    config = transformers.ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, num_labels=5,
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    )
    return transformers.ViTForImageClassification(config).train()


def vit_batch(seed: int) -> tuple[dict, tuple]:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(2, 3, 16, 16, generator=g)
    return {"pixel_values": pixels, "labels": torch.randint(0, 5, (2,), generator=g)}, ()


# -- Convolutional -----------------------------------------------------------------
# ResNet's basic block is the benchmarks' (two 3x3 conv + BatchNorm, identity or 1x1-conv shortcut).
class ResNet(nn.Module):
    """A small ResNet: stem, three stages of basic blocks, global pooling, linear head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.backbone = nn.Sequential(BasicBlock(16, 16, 1), BasicBlock(16, 32, 2), BasicBlock(32, 32, 1))
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(self.stem(x)).mean(dim=(2, 3)))


def frozen_backbone_resnet() -> nn.Module:
    """Fine-tuning: the convolutional trunk is frozen, only the head trains.

    BatchNorm stays in train mode (its running statistics update, as in
    ``model.train()`` fine-tuning), but its affine parameters are frozen too.
    """
    model = ResNet()
    for module in (model.stem, model.backbone):
        module.requires_grad_(False)
    return model


def image_batch(seed: int) -> tuple[tuple, tuple]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(4, 3, 16, 16, generator=g),), (torch.randint(0, 10, (4,), generator=g),)


class UNet(nn.Module):
    """A two-level U-Net: the encoder's features are concatenated into the decoder.

    The long skips mean no single value separates the encoder from the
    decoder: the forward graph has no cut vertex between the first and the
    last level.
    """

    def __init__(self, c: int = 8, out_channels: int = 2) -> None:
        super().__init__()

        def double_conv(a: int, b: int) -> nn.Module:
            return nn.Sequential(
                nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU(),
                nn.Conv2d(b, b, 3, padding=1), nn.ReLU(),
            )

        self.enc1, self.enc2, self.mid = double_conv(3, c), double_conv(c, 2 * c), double_conv(2 * c, 4 * c)
        self.up2 = nn.ConvTranspose2d(4 * c, 2 * c, 2, stride=2)
        self.dec2 = double_conv(4 * c, 2 * c)
        self.up1 = nn.ConvTranspose2d(2 * c, c, 2, stride=2)
        self.dec1 = double_conv(2 * c, c)
        self.out = nn.Conv2d(c, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        m = self.mid(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.out(d1)


def segmentation_batch(seed: int) -> tuple[tuple, tuple]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 3, 16, 16, generator=g),), (torch.randint(0, 2, (2, 16, 16), generator=g),)


class ChannelsFirstLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor (ConvNeXt's downsampling norm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7 conv, then LayerNorm and an MLP on channels-last, layer scale, dropout,
    stochastic depth (drop path), back to channels-first, residual add.

    The dropout runs on a channels-last activation that is permuted back: its
    gradient arrives as a permuted view, the case NOTE: [Runtime layouts]
    (rematc/layouts.py) is about.
    """

    def __init__(self, c: int, dropout: float = 0.1, drop_path: float = 0.0) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc1, self.fc2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), 0.1))  # layer scale
        self.dropout = nn.Dropout(dropout)
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dwconv(x).permute(0, 2, 3, 1)
        h = self.dropout(self.gamma * self.fc2(F.gelu(self.fc1(self.norm(h)))))
        h = h.permute(0, 3, 1, 2)
        if self.training and self.drop_path > 0:
            keep = 1.0 - self.drop_path
            h = h * x.new_empty(x.shape[0], 1, 1, 1).bernoulli_(keep).div_(keep)
        return x + h


class ConvNeXt(nn.Module):
    """A small ConvNeXt: patchify stem, two blocks, LayerNorm + 2x2 conv downsampling, one block,
    global average pooling, LayerNorm, linear head."""

    def __init__(self, c: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 4, stride=4), ChannelsFirstLayerNorm(c))
        self.stage1 = nn.Sequential(ConvNeXtBlock(c), ConvNeXtBlock(c, drop_path=0.2))
        self.downsample = nn.Sequential(ChannelsFirstLayerNorm(c), nn.Conv2d(c, 2 * c, 2, stride=2))
        self.stage2 = ConvNeXtBlock(2 * c, drop_path=0.2)
        self.norm = nn.LayerNorm(2 * c)
        self.head = nn.Linear(2 * c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.downsample(self.stage1(self.stem(x))))
        return self.head(self.norm(x.mean(dim=(2, 3))))


def convnext_batch(seed: int) -> tuple[tuple, tuple]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(8, 3, 32, 32, generator=g),), (torch.randint(0, 10, (8,), generator=g),)


class RandomOpsCNN(nn.Module):
    """Every kind of random op a training forward draws: channel dropout, alpha dropout,
    Gaussian noise, RReLU, Bernoulli masks. Each must draw once, in the forward.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout2d(torch.tanh(self.conv1(x)), 0.3, self.training)
        h = F.alpha_dropout(h, 0.2, self.training)
        h = F.rrelu(self.conv2(h), training=self.training)
        if self.training:
            h = h + 0.1 * torch.randn_like(h)
            h = h * torch.bernoulli(torch.full_like(h, 0.8))
        h = F.feature_alpha_dropout(torch.tanh(self.conv3(h)), 0.1, self.training)
        return self.head(h.mean(dim=(2, 3)))


# -- Attention and language models --------------------------------------------------
class SDPAttention(nn.Module):
    """Causal self-attention through ``F.scaled_dot_product_attention`` with ``dropout_p``."""

    def __init__(self, embd: int = 32, heads: int = 4, dropout: float = 0.2) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(embd, 3 * embd)
        self.proj = nn.Linear(embd, embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, embd = x.shape
        q, k, v = self.qkv(x).view(batch, seq, 3, self.heads, embd // self.heads).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, seq, embd))


class SDPAStack(nn.Module):
    """Two SDPA attention layers with a GELU MLP between them, pre-norm residuals.

    The first has ``dropout_p=0.2`` (on CPU AOTAutograd lowers it to the math
    path with ``native_dropout``); the second has none and runs the fused
    ``_scaled_dot_product_flash_attention_for_cpu`` (recomputable).
    """

    def __init__(self, embd: int = 32) -> None:
        super().__init__()
        self.norm1, self.attn1 = nn.LayerNorm(embd), SDPAttention(embd, dropout=0.2)
        self.norm2, self.mlp = nn.LayerNorm(embd), nn.Sequential(nn.Linear(embd, 2 * embd), nn.GELU(), nn.Linear(2 * embd, embd))
        self.norm3, self.attn2 = nn.LayerNorm(embd), SDPAttention(embd, dropout=0.0)
        self.head = nn.Linear(embd, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        x = x + self.attn2(self.norm3(x))
        return self.head(x)


def sequence_batch(seed: int) -> tuple[tuple, tuple]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, SEQ, 32, generator=g),), (torch.randint(0, 4, (2, SEQ), generator=g),)


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over every position of a ``(batch, seq, classes)`` output."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


SMALL_GPT = TinyGPTConfig(vocab_size=VOCAB, seq_len=SEQ, n_layer=2, n_head=2, n_embd=32, dropout=0.1)


def gpt_frozen_embeddings() -> nn.Module:
    """TinyGPT whose token and position embeddings are frozen (``requires_grad=False``)."""
    model = TinyGPT(SMALL_GPT)
    model.tok_emb.weight.requires_grad_(False)
    model.pos_emb.weight.requires_grad_(False)
    return model


def gpt_batch(seed: int) -> tuple[tuple, tuple]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, VOCAB, (2, SEQ + 1), generator=g)
    return (idx[:, :-1],), (idx[:, 1:],)


def gpt_bfloat16() -> nn.Module:
    """TinyGPT with bfloat16 parameters (pure low-precision training)."""
    return TinyGPT(SMALL_GPT).to(torch.bfloat16)


def gpt_autocast() -> nn.Module:
    """TinyGPT with float32 parameters, trained under ``torch.autocast("cpu", bfloat16)``."""
    return TinyGPT(SMALL_GPT)


# -- Calling conventions -------------------------------------------------------------
class MultiInputOutput(nn.Module):
    """Three tensor inputs, ints, bools, a float and ``None``, a dict of outputs.

    The loss is computed inside, like Hugging Face models given ``labels``;
    the other outputs come back to the caller with their structure: a tensor,
    a view of an intermediate, the input ``x`` itself, and a tuple holding a
    tensor and an int. ``y`` requires grad (its gradient is checked too), and
    one parameter is unused (it must get no gradient).
    """

    def __init__(self) -> None:
        super().__init__()
        self.encode_x = nn.Linear(24, 32)
        self.encode_y = nn.Linear(16, 32)
        self.mix = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 32))
        self.classify = nn.Linear(32, 5)
        self.regress = nn.Linear(32, 1)
        self.unused = nn.Linear(4, 4)

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        targets: torch.Tensor,
        mask: torch.Tensor | None = None,
        repeats: int = 1,
        use_y: bool = True,
        scale: float = 1.0,
    ) -> dict:
        h = self.encode_x(x)
        if use_y:  # a Python bool: specialised at capture
            h = h + self.encode_y(y)
        for _ in range(repeats):  # a Python int: unrolled at capture
            h = h + self.mix(F.relu(h))
        if mask is not None:
            h = h * mask
        logits = self.classify(h) * scale
        value = self.regress(h).squeeze(-1)
        loss = F.cross_entropy(logits, targets) + value.square().mean()
        return {"loss": loss, "logits": logits, "hidden": h.view(-1, 8, 32), "x": x, "extra": (value, repeats)}


def multi_io_kwargs_batch(seed: int) -> tuple[dict, tuple]:
    """Everything by keyword (the sample is a dict)."""
    g = torch.Generator().manual_seed(seed)
    sample = {
        "x": torch.randn(64, 24, generator=g),
        "y": torch.randn(64, 16, generator=g).requires_grad_(),
        "targets": torch.randint(0, 5, (64,), generator=g),
        "mask": None,
        "repeats": 2,
        "use_y": True,
        "scale": 0.5,
    }
    return sample, ()


def multi_io_positional_batch(seed: int) -> tuple[tuple, tuple]:
    """The same arguments by position (the sample is a tuple), ``None`` and ints included."""
    return tuple(multi_io_kwargs_batch(seed)[0].values()), ()
