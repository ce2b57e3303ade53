"""An example factory for ``rematc plan``: a small GPT with its loss, planned in seconds on CPU.

    rematc plan examples/tiny_gpt.py:factory --budget 0.5 --out tiny_gpt.schedule.json
    rematc show tiny_gpt.schedule.json --plot tiny_gpt.png

A factory returns ``(model, sample)``, ``(model, sample, loss_fn)`` or
``(model, sample, loss_fn, loss_args)``: the same objects the training script
hands to ``Rockmate``, so that both capture the same graph (same hash) and the
training run finds this plan in the cache. Weights do not matter (only shapes
and dtypes do), so the factory may build the model with random weights.
"""

from __future__ import annotations

import torch

from rematc.models import TinyGPT, TinyGPTConfig, lm_loss

CONFIG = TinyGPTConfig(vocab_size=256, seq_len=64, n_layer=2, n_head=2, n_embd=64)
BATCH_SIZE = 8


def factory() -> tuple[torch.nn.Module, torch.Tensor, object, tuple[torch.Tensor]]:
    """TinyGPT (2 layers, n_embd 64, seq 64), a batch of 8 token sequences, the LM loss and its targets."""
    torch.manual_seed(0)
    model = TinyGPT(CONFIG)
    tokens = torch.randint(0, CONFIG.vocab_size, (BATCH_SIZE, CONFIG.seq_len + 1))
    return model, tokens[:, :-1], lm_loss, (tokens[:, 1:],)
