"""Random training models from a grammar of blocks, deterministic in an integer seed.

A model is a :class:`ModelSpec`: a stem (the inputs), a sequence of 2-8
blocks over a running tensor whose layout and shape are tracked (``seq``
``(B, T, C)``, ``img1d`` ``(B, C, L)``, ``img2d`` ``(B, C, H, W)``), a head and
a loss. Every block kind is a row of :data:`KINDS`: it samples its parameters
for the current state and builds an ``nn.Module``. Any block accepts any state:
when its kind wants another layout an adapter (transpose, flatten, reshape to
a grid) is inserted at build time, and parameters that no longer fit (heads
that do not divide the width, a stack with nothing to pop) are clamped. So
every sub-list of blocks still builds: the shrinker cuts blocks freely.

The spec is plain data (JSON), readable (:meth:`ModelSpec.describe`) and
rebuilt exactly by :func:`build` (weights and batches come from
``torch.Generator``s seeded by ``spec.seed``; global RNG state is left alone)::

    >>> spec = generate(3)                                   # doctest: +SKIP
    >>> print(spec.describe())                               # doctest: +SKIP
    >>> built = build(spec); sample, loss_args = built.make_batch()   # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["KINDS", "Built", "ModelSpec", "State", "build", "generate"]

ACTS = ("relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid", "softplus", "leaky_relu")
#: Elements of the running tensor (batch included) the generator stays under.
MAX_ELEMENTS = 48 * 1024
#: Trailing blocks are cut while a forward runs more aten ops than this: the planner (a MILP) is
#: the cost of a seed, and it grows fast with the graph (about 3 joint ops per forward op).
MAX_FORWARD_OPS = 36
IGNORE_INDEX = -100


def act(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "relu":
        return F.relu(x)
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "silu":
        return F.silu(x)
    if name == "tanh":
        return torch.tanh(x)
    if name == "sigmoid":
        return torch.sigmoid(x)
    if name == "softplus":
        return F.softplus(x)
    if name == "leaky_relu":
        return F.leaky_relu(x, 0.1)
    return x


# -- shapes ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class State:
    """The running tensor: ``seq`` (B, T, C), ``img1d`` (B, C, T), ``img2d`` (B, C, H, W)."""

    layout: str
    C: int
    T: int = 0
    H: int = 0
    W: int = 0

    def dims(self) -> tuple[int, ...]:
        """The shape without the batch dimension."""
        if self.layout == "seq":
            return (self.T, self.C)
        if self.layout == "img1d":
            return (self.C, self.T)
        return (self.C, self.H, self.W)

    @property
    def numel(self) -> int:
        return math.prod(self.dims())

    @property
    def cd(self) -> int:
        """The channel dimension."""
        return -1 if self.layout == "seq" else 1

    @property
    def ld(self) -> int:
        """A length (token or spatial) dimension."""
        return 1 if self.layout == "seq" else 2

    @property
    def length(self) -> int:
        return self.T if self.layout != "img2d" else self.H


def _grid(n: int) -> tuple[int, int]:
    h = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return h, n // h


def _divisor(want: int, n: int) -> int:
    """The largest divisor of ``n`` that is at most ``want``."""
    return max(d for d in range(1, max(1, min(want, n)) + 1) if n % d == 0)


def _widths(c: int) -> list[int]:
    return sorted({max(8, c // 2), c, min(64, 2 * c)})


def _conv_out(n: int, k: int, s: int, d: int) -> int:
    p = d * (k - 1) // 2
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def pool_all(x: torch.Tensor, layout: str, how: str = "mean") -> torch.Tensor:
    """(B, C): reduce every dimension but batch and channels."""
    dims = (1,) if layout == "seq" else tuple(range(2, x.dim()))
    if how == "amax":
        return x.amax(dims)
    if how == "first":
        return x.select(1, 0) if layout == "seq" else x.flatten(2).select(2, 0)
    if how == "logsumexp":
        return x.flatten(2).logsumexp(2) if layout != "seq" else x.logsumexp(1)
    return x.mean(dims)


def broadcast_channels(v: torch.Tensor, layout: str) -> torch.Tensor:
    """A (B, C) or (C,) tensor shaped to broadcast over a ``layout`` tensor."""
    if layout == "seq":
        return v.unsqueeze(-2)
    return v.view(*v.shape, *([1] * (1 if layout == "img1d" else 2)))


def chan_linear(layout: str, cin: int, cout: int, bias: bool = True) -> nn.Module:
    """A per-position linear map over the channels of any layout."""
    if layout == "seq":
        return nn.Linear(cin, cout, bias=bias)
    if layout == "img1d":
        return nn.Conv1d(cin, cout, 1, bias=bias)
    return nn.Conv2d(cin, cout, 1, bias=bias)


class Adapt(nn.Module):
    """Change layout: seq <-> (B, C, N) <-> img2d (tokens on a grid)."""

    def __init__(self, st: State, layout: str) -> None:
        super().__init__()
        self.src, self.dst = st.layout, layout
        n = st.H * st.W if st.layout == "img2d" else st.T
        if layout == "seq":
            self.out = State("seq", st.C, T=n)
        elif layout == "img1d":
            self.out = State("img1d", st.C, T=n)
        else:
            h, w = (st.H, st.W) if st.layout == "img2d" else _grid(n)
            self.out = State("img2d", st.C, H=h, W=w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.src == self.dst:
            return x
        x = x.transpose(1, 2) if self.src == "seq" else x.flatten(2) if self.src == "img2d" else x
        if self.dst == "seq":
            return x.transpose(1, 2)
        if self.dst == "img2d":
            return x.reshape(x.shape[0], self.out.C, self.out.H, self.out.W)
        return x


class Norm(nn.Module):
    """A normalisation over the channels of any layout (batch, group, layer, RMS)."""

    # momentum=None BatchNorm ("batch_cma") is left out: its 1/num_batches_tracked is a graph break
    # (Dynamo cannot trace it as one graph; rematc raises GraphBreakError, as documented).
    KINDS = ("layer", "layer_noaffine", "rms", "batch", "batch_nostats", "group", "none")

    def __init__(self, kind: str, layout: str, c: int) -> None:
        super().__init__()
        self.kind, self.layout = kind, layout
        if kind == "layer":
            self.m = nn.LayerNorm(c)
        elif kind == "layer_noaffine":
            self.m = nn.LayerNorm(c, elementwise_affine=False)
        elif kind == "rms":
            self.m = nn.RMSNorm(c)
        elif kind.startswith("batch"):
            cls = nn.BatchNorm2d if layout == "img2d" else nn.BatchNorm1d
            self.m = cls(c, momentum=None if kind == "batch_cma" else 0.1, track_running_stats=kind != "batch_nostats")
        elif kind == "group":
            self.m = nn.GroupNorm(_divisor(4, c), c)
        else:
            self.m = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "none":
            return x
        if self.kind in ("layer", "layer_noaffine", "rms"):  # over the channels: move them last
            if self.layout == "seq":
                return self.m(x)
            if self.layout == "img1d":
                return self.m(x.transpose(1, 2)).transpose(1, 2)
            return self.m(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # ConvNeXt's LayerNorm
        if self.layout == "seq":
            return self.m(x.transpose(1, 2)).transpose(1, 2)
        return self.m(x)


# -- blocks ---------------------------------------------------------------------------------
class Net:
    """What blocks share while a model is built: the generator, the weight pool, the skip stack."""

    def __init__(self, g: torch.Generator) -> None:
        self.g = g
        self.shared = nn.ModuleDict()
        self.embedding: nn.Embedding | None = None
        self.stack: list[State] = []
        self.extras_used: list[bool] = []

    def rand(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.g)


class Block(nn.Module):
    """A grammar block: ``forward(x, stack, extras) -> x``; ``self.out`` is the state after it."""

    name = ""
    layouts: tuple[str, ...] = ("seq", "img1d", "img2d")
    weight = 1.0

    def __init__(self, p: dict[str, Any], st: State, net: Net) -> None:
        super().__init__()
        self.p, self.out = p, st

    @staticmethod
    def sample(r: random.Random, st: State) -> dict[str, Any]:
        return {}


KINDS: dict[str, type[Block]] = {}


def kind(cls: type[Block]) -> type[Block]:
    KINDS[cls.name] = cls
    return cls


@kind
class Linear(Block):
    name = "linear"

    def __init__(self, p, st, net):
        super().__init__(p, st, net)
        self.f = chan_linear(st.layout, st.C, p.get("out", st.C), p.get("bias", True))
        self.out = dataclasses.replace(st, C=p.get("out", st.C))

    @staticmethod
    def sample(r, st):
        return {"out": r.choice(_widths(st.C)), "act": r.choice(ACTS + ("none",)), "bias": r.random() < 0.8}

    def forward(self, x, stack, extras):
        return act(self.p.get("act", "none"), self.f(x))


@kind
class MlpRes(Block):
    name = "mlp_res"
    weight = 2.0

    def __init__(self, p, st, net):
        super().__init__(p, st, net)
        hidden = min(128, st.C * p.get("mult", 2))
        self.norm = Norm(p.get("norm", "none"), st.layout, st.C)
        self.fc1, self.fc2 = chan_linear(st.layout, st.C, hidden), chan_linear(st.layout, hidden, st.C)
        self.drop = nn.Dropout(p.get("dropout", 0.0))

    @staticmethod
    def sample(r, st):
        return {"mult": r.choice([1, 2, 4]), "act": r.choice(ACTS), "norm": r.choice(Norm.KINDS),
                "dropout": r.choice([0.0, 0.0, 0.1]), "drop_kind": r.choice(["F", "module"])}

    def forward(self, x, stack, extras):
        h = self.fc2(act(self.p.get("act", "relu"), self.fc1(self.norm(x))))
        if self.p.get("drop_kind") == "F":
            h = F.dropout(h, self.p.get("dropout", 0.0), training=True)
        else:
            h = self.drop(h)
        return x + h


@kind
class Sdpa(Block):
    name = "sdpa"
    layouts = ("seq",)
    weight = 2.0

    def __init__(self, p, st, net):
        super().__init__(p, st, net)
        self.h = _divisor(p.get("heads", 2), st.C)
        self.norm = Norm(p.get("norm", "none"), "seq", st.C)
        self.qkv, self.proj = nn.Linear(st.C, 3 * st.C), nn.Linear(st.C, st.C)
        mask = p.get("mask", "none") if not p.get("causal") else "none"
        self.mask_kind = mask
        if mask == "bool":  # keep the diagonal so no row is fully masked
            self.register_buffer("mask", (torch.rand(st.T, st.T, generator=net.g) > 0.3) | torch.eye(st.T, dtype=torch.bool))
        elif mask == "float":
            self.register_buffer("mask", 0.5 * net.rand(st.T, st.T))

    @staticmethod
    def sample(r, st):
        return {"heads": r.choice([1, 2, 4]), "causal": r.random() < 0.5, "dropout": r.choice([0.0, 0.0, 0.1]),
                "qkv": r.choice(["split", "chunk", "unbind"]), "mask": r.choice(["none", "bool", "float"]),
                "norm": r.choice(["layer", "rms", "none"])}

    def forward(self, x, stack, extras):
        b, t, c = x.shape
        h, d = self.h, c // self.h
        qkv = self.qkv(self.norm(x))
        how = self.p.get("qkv", "split")
        if how == "unbind":
            q, k, v = qkv.view(b, t, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            parts = qkv.split(c, -1) if how == "split" else qkv.chunk(3, -1)
            q, k, v = (part.view(b, t, h, d).transpose(1, 2) for part in parts)
        mask = self.mask if self.mask_kind != "none" else None
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.p.get("dropout", 0.0),
                                           is_causal=bool(self.p.get("causal")))
        return x + self.proj(y.transpose(1, 2).reshape(b, t, c))


@kind
class ManualAttention(Block):
    name = "attn_manual"
    layouts = ("seq",)
    weight = 1.5

    def __init__(self, p, st, net):
        super().__init__(p, st, net)
        self.h = _divisor(p.get("heads", 2), st.C)
        self.q, self.k, self.v, self.o = (nn.Linear(st.C, st.C) for _ in range(4))
        self.register_buffer("tril", torch.tril(torch.ones(st.T, st.T)), persistent=p.get("persistent", True))

    @staticmethod
    def sample(r, st):
        return {"heads": r.choice([1, 2, 4]), "causal": r.random() < 0.6, "dropout": r.choice([0.0, 0.1]),
                "softmax": r.choice(["method", "F_float"]), "persistent": r.random() < 0.5}

    def forward(self, x, stack, extras):
        b, t, c = x.shape
        h, d = self.h, c // self.h
        q, k, v = (f(x).view(b, t, h, d).transpose(1, 2) for f in (self.q, self.k, self.v))
        s = (q @ k.transpose(-2, -1)) * (d ** -0.5)
        if self.p.get("causal"):
            s = s.masked_fill(self.tril[:t, :t] == 0, float("-inf"))
        a = s.softmax(-1) if self.p.get("softmax") == "method" else F.softmax(s.float(), dim=-1).type_as(q)
        a = F.dropout(a, self.p.get("dropout", 0.0), training=True)
        return x + self.o((a @ v).transpose(1, 2).contiguous().view(b, t, c))


@kind
class NormBlock(Block):
    name = "norm"

    def __init__(self, p, st, net):
        super().__init__(p, st, net)
        self.norm = Norm(p.get("norm", "layer"), st.layout, st.C)

    @staticmethod
    def sample(r, st):
        return {"norm": r.choice(Norm.KINDS[:-1])}

    def forward(self, x, stack, extras):
        return self.norm(x)


@kind
class Act(Block):
    name = "act"
    weight = 0.7

    @staticmethod
    def sample(r, st):
        return {"act": r.choice(ACTS)}

    def forward(self, x, stack, extras):
        return act(self.p.get("act", "relu"), x)


INPLACE_OPS = ("add_residual", "mul_scalar", "add_buffer", "slice_mul", "index_add", "masked_fill", "slice_assign", "sub_scalar")


@kind
class Inplace(Block):
    """In-place ops on a fresh non-leaf tensor (safe in eager); an output-saving op only last."""

    name = "inplace"
    weight = 1.5

    def __init__(self, p, st, net):
        super().__init__(p, st, net)
        self.f = chan_linear(st.layout, st.C, st.C) if p.get("src", "linear") == "linear" else None
        n = st.T if st.layout == "seq" else st.C  # dim 1
        self.k = max(1, n // 2)
        self.register_buffer("bias_buf", 0.1 * net.rand(st.C))
        self.register_buffer("idx", torch.randint(0, n, (self.k,), generator=net.g))
        shape = [1] * (len(st.dims()) + 1)
        shape[1] = n
        self.register_buffer("mask", torch.rand(*shape, generator=net.g) > 0.5)

    @staticmethod
    def sample(r, st):
        ops = r.sample(INPLACE_OPS, r.randint(1, 4))
        return {"src": r.choice(["linear", "linear", "clone"]), "ops": ops, "last": r.choice(["none", "relu_", "sigmoid_"])}

    def forward(self, x, stack, extras):
        y = self.f(x) if self.f is not None else x.clone()
        for op in self.p.get("ops", []):
            if op == "add_residual":
                y.add_(x)
            elif op == "mul_scalar":
                y.mul_(0.5)
            elif op == "sub_scalar":
                y.sub_(0.25)
            elif op == "add_buffer":
                y.add_(broadcast_channels(self.bias_buf, self.out.layout))
            elif op == "slice_mul":
                y[:, : self.k].mul_(2.0)
            elif op == "index_add":
                y.index_add_(1, self.idx, (x.narrow(1, 0, self.k) * 0.5).to(y.dtype))
            elif op == "masked_fill":
                y.masked_fill_(self.mask, 0.0)
            elif op == "slice_assign":
                y[:, : self.k] = x[:, : self.k] * 3.0
        last = self.p.get("last", "none")
        if last == "relu_":
            y.relu_()
        elif last == "sigmoid_":
            y.sigmoid_()
        return y


VIEW_OPS = ("view_heads", "reshape_heads", "movedim_roundtrip", "swap_mix", "chunk_swap", "split_uneven", "unbind_stack",
            "strided_interleave", "narrow_scale", "expand_sum", "expand_buffer", "flatten_unflatten", "squeeze_unsqueeze",
            "diff", "roll_narrow", "t_contig", "select_cat", "expand_as_add", "channels_last", "transpose_hw")


@kind
class Views(Block):
    """Shape-preserving compositions of views, slices, cat/stack, split/chunk/unbind, expand."""

    name = "views"
    weight = 2.0

    def __init__(self, p, st, net):
        super().__init__(p, st, net)
        self.register_buffer("scale", 1.0 + 0.1 * net.rand(st.C))

    @staticmethod
    def sample(r, st):
        ops = [op for op in VIEW_OPS if op not in ("channels_last", "transpose_hw") or st.layout == "img2d"]
        return {"ops": r.sample(ops, r.randint(1, 3))}

    def forward(self, x, stack, extras):
        for op in self.p.get("ops", []):
            x = self.view_op(op, x)
        return x

    def view_op(self, op: str, x: torch.Tensor) -> torch.Tensor:
        st = self.out
        cd, ld, c, n = st.cd, st.ld, st.C, x.shape[st.ld]
        if op in ("view_heads", "reshape_heads") and c % 2 == 0:
            x = x.movedim(cd, -1)
            h = _divisor(4, c)
            if op == "view_heads":
                y = x.contiguous().view(*x.shape[:-1], h, c // h).transpose(-1, -2).contiguous().view(x.shape)
            else:
                y = x.reshape(*x.shape[:-1], h, c // h).transpose(-1, -2).reshape(x.shape)
            return y.movedim(-1, cd)
        if op == "movedim_roundtrip":
            return x.movedim(cd, 0).contiguous().movedim(0, cd)
        if op == "swap_mix":  # reinterpret the last two dims swapped, then transpose back: a shuffle
            return x.reshape(*x.shape[:-2], x.shape[-1], x.shape[-2]).transpose(-1, -2)
        if op == "chunk_swap" and c % 2 == 0:
            return torch.cat(x.chunk(2, cd)[::-1], cd)
        if op == "split_uneven" and c >= 4:
            a, b = x.split([c // 4, c - c // 4], cd)
            return torch.cat([b, a * 2.0], cd)
        if op == "unbind_stack" and c % 2 == 0:
            parts = x.unflatten(cd, (2, c // 2)).unbind(cd - 1 if cd < 0 else cd)
            return torch.stack(parts[::-1], cd - 1 if cd < 0 else cd).flatten(cd - 1 if cd < 0 else cd, cd if cd < 0 else cd + 1)
        if op == "strided_interleave" and n >= 2:
            idx = [slice(None)] * x.dim()
            even, odd = list(idx), list(idx)
            even[ld], odd[ld] = slice(0, None, 2), slice(1, None, 2)
            return torch.cat([x[tuple(even)], x[tuple(odd)]], ld)
        if op == "narrow_scale" and c >= 2:
            k = c // 2
            return torch.cat([x.narrow(cd, 0, k), x.narrow(cd, k, c - k) * 0.5], cd)
        if op == "expand_sum":
            return x.unsqueeze(1).expand(x.shape[0], 2, *x.shape[1:]).sum(1)
        if op == "expand_buffer":
            return x * broadcast_channels(self.scale, st.layout).expand_as(x)
        if op == "flatten_unflatten":
            return x.flatten(1).unflatten(1, x.shape[1:])
        if op == "squeeze_unsqueeze":
            return x.unsqueeze(0).unsqueeze(-1).squeeze(-1).squeeze(0)
        if op == "diff" and n >= 2:
            return torch.cat([x.narrow(ld, 0, 1), x.narrow(ld, 1, n - 1) - x.narrow(ld, 0, n - 1)], ld)
        if op == "roll_narrow" and n >= 2:
            return torch.cat([x.narrow(ld, 1, n - 1), x.narrow(ld, 0, 1)], ld)
        if op == "t_contig":
            return x.transpose(0, 1).contiguous().transpose(0, 1)
        if op == "select_cat" and n >= 2:
            return torch.cat([x.select(ld, 0).unsqueeze(ld) * 2.0, x.narrow(ld, 1, n - 1)], ld)
        if op == "expand_as_add":
            return x + x.narrow(ld, 0, 1).expand_as(x)
        if op == "channels_last" and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        if op == "transpose_hw" and x.dim() == 4:
            return x.transpose(2, 3).contiguous().transpose(2, 3)
        return x


@kind
class Glu(Block):
    name = "glu"

    def __init__(self, p, st, net):
        super().__init__(p, st, net)
        hidden = min(64, st.C * p.get("mult", 1))
        self.f, self.g = chan_linear(st.layout, st.C, 2 * hidden), chan_linear(st.layout, hidden, st.C)

    @staticmethod
    def sample(r, st):
        return {"mult": r.choice([1, 2]), "act": r.choice(["sigmoid", "silu", "gelu"])}

    def forward(self, x, stack, extras):
        a, b = self.f(x).chunk(2, self.out.cd)
        return x + self.g(a * act(self.p.get("act", "sigmoid"), b))


@kind
class Moe(Block):
    """Top-k routing over a few experts, combined with gather or with a scattered dense weight."""

    name = "moe_topk"
    layouts = ("seq",)

    def __init__(self, p, st, net):
        super().__init__(p, st, net)
        self.e = max(2, p.get("experts", 4))
        self.k = min(p.get("k", 2), self.e)
        self.router = nn.Linear(st.C, self.e)
        self.experts = nn.Parameter(torch.empty(self.e, st.C, st.C))

    @staticmethod
    def sample(r, st):
        return {"experts": r.choice([2, 4]), "k": r.choice([1, 2]), "combine": r.choice(["gather", "scatter"])}

    def forward(self, x, stack, extras):
        b, t, c = x.shape
        logits = self.router(x)
        values, idx = logits.topk(self.k, dim=-1)
        weights = values.softmax(-1)
        every = torch.einsum("btc,ecd->bted", x, self.experts)
        if self.p.get("combine") == "scatter":
            dense = torch.zeros_like(logits).scatter(-1, idx, weights)
            y = (every * dense.unsqueeze(-1)).sum(2)
        else:
            chosen = every.gather(2, idx.unsqueeze(-1).expand(b, t, self.k, c))
            y = (chosen * weights.unsqueeze(-1)).sum(2)
        return x + y


@kind
class Detach(Block):
    name = "detach"
    weight = 0.7

    def __init__(self, p, st, net):
        super().__init__(p, st, net)
        self.f = chan_linear(st.layout, st.C, st.C)

    @staticmethod
    def sample(r, st):
        return {"mode": r.choice(["stopgrad_mix", "detach_input", "detach_gate"])}

    def forward(self, x, stack, extras):
        mode = self.p.get("mode", "stopgrad_mix")
        if mode == "detach_input":
            return x.detach() * 0.5 + self.f(x)
        y = self.f(x)
        if mode == "detach_gate":
            return x * torch.sigmoid(y.detach()) + y
        return x + 0.5 * y + 0.5 * y.detach()


@kind
class Shared(Block):
    """One module from a pool, applied ``times`` times here and in every other ``shared`` block."""

    name = "shared"

    def __init__(self, p, st, net):
        super().__init__(p, st, net)
        key = f"{st.layout}_{st.C}"
        if key not in net.shared:
            net.shared[key] = chan_linear(st.layout, st.C, st.C)
        self.f = net.shared[key]

    @staticmethod
    def sample(r, st):
        return {"times": r.choice([1, 2]), "act": r.choice(ACTS)}

    def forward(self, x, stack, extras):
        h = x
        for _ in range(self.p.get("times", 1)):
            h = act(self.p.get("act", "relu"), self.f(h))
        return x + h


@kind
class Dropout(Block):
    name = "dropout"

    def __init__(self, p, st, net):
        super().__init__(p, st, net)
        self.m = nn.Dropout(p.get("p", 0.1))

    @staticmethod
    def sample(r, st):
        kinds = ["F", "module", "alpha", "noise", "rrelu", "channel"]
        return {"variant": r.choice(kinds), "p": r.choice([0.1, 0.25, 0.5])}

    def forward(self, x, stack, extras):
        kind_, p = self.p.get("variant", "F"), self.p.get("p", 0.1)
        if kind_ == "module":
            return self.m(x)
        if kind_ == "alpha":
            return F.alpha_dropout(x, p, training=True)
        if kind_ == "noise":
            return x + p * torch.randn_like(x)
        if kind_ == "rrelu":
            return F.rrelu(x, training=True)
        if kind_ == "channel":
            if self.out.layout == "img2d":
                return F.dropout2d(x, p, training=True)
            if self.out.layout == "img1d":
                return F.dropout1d(x, p, training=True)
        return F.dropout(x, p, training=True)


@kind
class PosEmb(Block):
    name = "pos_emb"
    layouts = ("seq",)
    weight = 0.5

    def __init__(self, p, st, net):
        super().__init__(p, st, net)
        self.emb = nn.Embedding(st.T, st.C)
        self.register_buffer("pos", torch.arange(st.T), persistent=p.get("persistent", False))

    @staticmethod
    def sample(r, st):
        return {"persistent": r.random() < 0.5}

    def forward(self, x, stack, extras):
        return x + self.emb(self.pos)


@kind
class SideOutput(Block):
    """An extra model output: pooled, a max, detached, or a view of the activation."""

    name = "side_output"
    weight = 0.7

    def __init__(self, p, st, net):
        super().__init__(p, st, net)
        self.f = nn.Linear(st.C, 4)
        net.extras_used.append(bool(p.get("used", False)) and p.get("mode") not in ("detached",))

    @staticmethod
    def sample(r, st):
        return {"mode": r.choice(["mean", "amax", "detached", "view"]), "used": r.random() < 0.5}

    def forward(self, x, stack, extras):
        mode = self.p.get("mode", "mean")
        if mode == "view":
            extras.append(x.narrow(self.out.cd, 0, 1))
        elif mode == "detached":
            extras.append(pool_all(x.detach(), self.out.layout))
        else:
            extras.append(self.f(pool_all(x, self.out.layout, mode)))
        return x


@kind
class Push(Block):
    """Save the running tensor for a later ``pop_merge`` (a long skip connection)."""

    name = "push"
    weight = 0.8

    def __init__(self, p, st, net):
        super().__init__(p, st, net)
        net.stack.append(st)

    def forward(self, x, stack, extras):
        stack.append(x)
        return x


@kind
class PopMerge(Block):
    name = "pop_merge"
    weight = 0.8

    def __init__(self, p, st, net):
        super().__init__(p, st, net)
        self.skip = net.stack.pop() if net.stack else None
        mode = p.get("mode", "add")
        if self.skip is not None and self.skip != st:
            mode = "pooled"
        elif mode == "cat_proj":
            self.proj = chan_linear(st.layout, 2 * st.C, st.C)
        if mode == "pooled" and self.skip is not None:
            self.proj = nn.Linear(self.skip.C, st.C)
        self.mode = mode

    @staticmethod
    def sample(r, st):
        return {"mode": r.choice(["add", "mul_sigmoid", "cat_proj"])}

    def forward(self, x, stack, extras):
        if self.skip is None:
            return x
        s = stack.pop()
        if self.mode == "pooled":
            return x + broadcast_channels(self.proj(pool_all(s, self.skip.layout)), self.out.layout)
        if self.mode == "mul_sigmoid":
            return x * torch.sigmoid(s)
        if self.mode == "cat_proj":
            return self.proj(torch.cat([x, s], self.out.cd))
        return x + s


@kind
class CatBranch(Block):
    name = "cat_branch"
    weight = 0.7

    def __init__(self, p, st, net):
        super().__init__(p, st, net)
        a = max(4, st.C // 2)
        self.f, self.g = chan_linear(st.layout, st.C, a), chan_linear(st.layout, st.C, st.C - a if p.get("mode") == "cat" else a)
        self.out = dataclasses.replace(st, C=st.C if p.get("mode") == "cat" else a)

    @staticmethod
    def sample(r, st):
        return {"mode": r.choice(["cat", "stack_sum"]), "act": r.choice(ACTS)}

    def forward(self, x, stack, extras):
        a, b = act(self.p.get("act", "relu"), self.f(x)), self.g(x)
        if self.p.get("mode") == "cat":
            return torch.cat([a, b], self.out.cd)
        return torch.stack([a, b], 0).sum(0)


class _Conv(Block):
    """Shared by conv1d/conv2d: strided, dilated, grouped, with a norm and an activation."""

    dim = 1

    def __init__(self, p, st, net):
        super().__init__(p, st, net)
        k, s, d = p.get("k", 3), p.get("stride", 1), p.get("dilation", 1)
        out = p.get("out", st.C)
        groups = _divisor(p.get("groups", 1), math.gcd(st.C, out))
        cls = nn.Conv1d if self.dim == 1 else nn.Conv2d
        lengths = (st.T,) if self.dim == 1 else (st.H, st.W)
        pad = d * (k - 1) // 2
        mode = p.get("padding_mode", "zeros")
        if mode != "zeros" and pad >= min(lengths):
            mode = "zeros"
        self.conv = cls(st.C, out, k, stride=s, padding=pad, dilation=d, groups=groups, bias=p.get("bias", True),
                        padding_mode=mode)
        new = [_conv_out(n, k, s, d) for n in lengths]
        self.out = State("img1d", out, T=new[0]) if self.dim == 1 else State("img2d", out, H=new[0], W=new[1])
        self.norm = Norm(p.get("norm", "none"), self.out.layout, out)

    @staticmethod
    def sample(r, st):
        return {"out": r.choice(_widths(st.C)), "k": r.choice([1, 3, 3, 5]), "stride": r.choice([1, 1, 2]),
                "dilation": r.choice([1, 1, 2]), "groups": r.choice([1, 1, 2, 4, 64]), "bias": r.random() < 0.7,
                "norm": r.choice(["batch", "group", "none", "layer"]), "act": r.choice(ACTS + ("none",)),
                "padding_mode": r.choice(["zeros", "zeros", "reflect", "circular"]), "channels_last": r.random() < 0.3}

    def forward(self, x, stack, extras):
        if self.p.get("channels_last") and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return act(self.p.get("act", "none"), self.norm(self.conv(x)))


@kind
class Conv1d(_Conv):
    name = "conv1d"
    layouts = ("img1d",)
    dim = 1


@kind
class Conv2d(_Conv):
    name = "conv2d"
    layouts = ("img2d",)
    dim = 2
    weight = 2.0


@kind
class ResConv(Block):
    name = "res_conv"
    layouts = ("img2d",)
    weight = 1.5

    def __init__(self, p, st, net):
        super().__init__(p, st, net)
        k = p.get("k", 3)
        g = _divisor(p.get("groups", 1), st.C)
        self.c1 = nn.Conv2d(st.C, st.C, k, padding=k // 2, groups=g, bias=False)
        self.c2 = nn.Conv2d(st.C, st.C, k, padding=k // 2, bias=False)
        self.n1 = Norm(p.get("norm", "batch"), "img2d", st.C)
        self.n2 = Norm(p.get("norm", "batch"), "img2d", st.C)

    @staticmethod
    def sample(r, st):
        return {"k": r.choice([1, 3]), "groups": r.choice([1, 2, 64]), "norm": r.choice(["batch", "group", "none", "layer"]),
                "act": r.choice(ACTS)}

    def forward(self, x, stack, extras):
        a = self.p.get("act", "relu")
        return act(a, x + self.n2(self.c2(act(a, self.n1(self.c1(x))))))


@kind
class Pool(Block):
    name = "pool"
    layouts = ("img2d", "img1d")

    def __init__(self, p, st, net):
        super().__init__(p, st, net)
        self.on = st.length >= 2 and (st.layout == "img1d" or st.W >= 2)
        if self.on:
            self.out = State("img1d", st.C, T=st.T // 2) if st.layout == "img1d" else State("img2d", st.C, H=st.H // 2, W=st.W // 2)

    @staticmethod
    def sample(r, st):
        return {"op": r.choice(["max", "avg", "max_indices", "adaptive"])}

    def forward(self, x, stack, extras):
        if not self.on:
            return x
        kind_ = self.p.get("op", "max")
        two = x.dim() == 4
        if kind_ == "avg":
            return F.avg_pool2d(x, 2) if two else F.avg_pool1d(x, 2)
        if kind_ == "max_indices":
            y, _ = F.max_pool2d(x, 2, return_indices=True) if two else F.max_pool1d(x, 2, return_indices=True)
            return y
        if kind_ == "adaptive":
            return F.adaptive_avg_pool2d(x, self.out.dims()[1:]) if two else F.adaptive_avg_pool1d(x, self.out.T)
        return F.max_pool2d(x, 2) if two else F.max_pool1d(x, 2)


@kind
class Upsample(Block):
    name = "upsample"
    layouts = ("img2d",)
    weight = 0.5

    def __init__(self, p, st, net):
        super().__init__(p, st, net)
        self.on = st.H * st.W <= 64
        if self.on:
            self.out = dataclasses.replace(st, H=2 * st.H, W=2 * st.W)

    @staticmethod
    def sample(r, st):
        return {"mode": r.choice(["nearest", "bilinear"])}

    def forward(self, x, stack, extras):
        if not self.on:
            return x
        mode = self.p.get("mode", "nearest")
        return F.interpolate(x, scale_factor=2, mode=mode, align_corners=False if mode == "bilinear" else None)


@kind
class Patchify(Block):
    """img2d -> seq: a strided conv, then tokens (ViT's patch embedding)."""

    name = "patchify"
    layouts = ("img2d",)
    weight = 0.7

    def __init__(self, p, st, net):
        super().__init__(p, st, net)
        k = 2 if min(st.H, st.W) >= 2 else 1
        out = p.get("out", st.C)
        self.conv = nn.Conv2d(st.C, out, k, stride=k)
        self.out = State("seq", out, T=(st.H // k) * (st.W // k))

    @staticmethod
    def sample(r, st):
        return {"out": r.choice(_widths(max(16, st.C)))}

    def forward(self, x, stack, extras):
        return self.conv(x).flatten(2).transpose(1, 2)


@kind
class ToLayout(Block):
    """An explicit layout change (tokens to a grid, images to tokens)."""

    name = "to_layout"
    weight = 0.7

    def __init__(self, p, st, net):
        super().__init__(p, st, net)
        self.adapt = Adapt(st, p.get("layout", "seq"))
        self.out = self.adapt.out

    @staticmethod
    def sample(r, st):
        return {"layout": r.choice([lay for lay in ("seq", "img1d", "img2d") if lay != st.layout])}

    def forward(self, x, stack, extras):
        return self.adapt(x)


class Step(nn.Module):
    """A block with the adapter its layout needs; frozen blocks get ``requires_grad=False``."""

    def __init__(self, spec: dict[str, Any], st: State, net: Net) -> None:
        super().__init__()
        cls = KINDS[spec["kind"]]
        self.adapt = Adapt(st, st.layout if st.layout in cls.layouts else cls.layouts[0])
        params = {k: v for k, v in spec.items() if k != "kind"}
        self.block = cls(params, self.adapt.out, net)
        self.out = self.block.out

    def forward(self, x, stack, extras):
        return self.block(self.adapt(x), stack, extras)


# -- stems, heads, losses -------------------------------------------------------------------
class Stem(nn.Module):
    """The inputs: tokens, features, images, 1-d signals, or several inputs (one unused)."""

    def __init__(self, p: dict[str, Any], net: Net) -> None:
        super().__init__()
        self.p = p
        kind_, c = p["kind"], p["C"]
        if kind_ in ("tokens", "tokens_features"):
            self.emb = nn.Embedding(p["V"], c, padding_idx=0 if p.get("padding_idx") else None)
            net.embedding = self.emb
            if kind_ == "tokens_features":
                self.f = nn.Linear(p["Cin"], c)
            self.out = State("seq", c, T=p["T"])
        elif kind_ in ("features", "multi"):
            self.f = nn.Linear(p["Cin"], c)
            if kind_ == "multi":
                self.g = nn.Linear(p["C2"], c, bias=False)
            self.out = State("seq", c, T=p["T"])
        elif kind_ == "image":
            self.f = nn.Conv2d(p["Cin"], c, 3, padding=1)
            self.out = State("img2d", c, H=p["H"], W=p["W"])
        else:
            self.f = nn.Conv1d(p["Cin"], c, 3, padding=1)
            self.out = State("img1d", c, T=p["T"])

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        kind_ = self.p["kind"]
        if kind_ == "tokens":
            return self.emb(inputs[0])
        if kind_ == "tokens_features":
            return self.emb(inputs[0]) + self.f(inputs[1])
        if kind_ == "multi":  # inputs[2], when present, is never used
            return self.f(inputs[0]) * torch.sigmoid(self.g(inputs[1]))
        return self.f(inputs[0])

    def make_inputs(self, batch: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        p, kind_ = self.p, self.p["kind"]
        grad = bool(p.get("grad"))
        if kind_ == "tokens":
            return (torch.randint(0, p["V"], (batch, p["T"]), generator=g),)
        if kind_ == "tokens_features":
            return (torch.randint(0, p["V"], (batch, p["T"]), generator=g),
                    torch.randn(batch, p["T"], p["Cin"], generator=g).requires_grad_(grad))
        if kind_ in ("features", "multi"):
            if p.get("noncontig"):
                x = torch.randn(batch, p["Cin"], p["T"], generator=g).transpose(1, 2)
            else:
                x = torch.randn(batch, p["T"], p["Cin"], generator=g)
            if kind_ == "features":
                return (x.requires_grad_(grad),)
            extra = (torch.randn(batch, p["T"], 3, generator=g),) if p.get("unused") else ()
            return (x.requires_grad_(grad), torch.randn(batch, p["T"], p["C2"], generator=g), *extra)
        if kind_ == "image":
            x = torch.randn(batch, p["Cin"], p["H"], p["W"], generator=g)
            if p.get("channels_last"):
                x = x.contiguous(memory_format=torch.channels_last)
            return (x.requires_grad_(grad),)
        return (torch.randn(batch, p["Cin"], p["T"], generator=g).requires_grad_(grad),)


class Head(nn.Module):
    """Running tensor -> the output the loss reads: class logits or a dense prediction.

    ``task`` is ``"class"`` (classes along ``class_dim``) or ``"dense"``;
    ``out_shape`` excludes the batch.
    """

    def __init__(self, p: dict[str, Any], st: State, net: Net) -> None:
        super().__init__()
        self.p, kind_ = p, p["kind"]
        self.task, self.class_dim = "class", -1
        if kind_ == "tied" and net.embedding is not None:
            self.adapt = Adapt(st, "seq")
            v, e = net.embedding.weight.shape
            self.proj = nn.Linear(st.C, e) if st.C != e else nn.Identity()
            self.emb = net.embedding  # the output projection is the embedding's weight
            self.out_shape: tuple[int, ...] = (st.T if st.layout != "img2d" else st.H * st.W, v)
            return
        self.adapt = Adapt(st, st.layout)
        k = p.get("K", 8)
        if kind_ == "classify":
            self.f = nn.Linear(st.C, k)
            self.out_shape = (k,)
        elif kind_ == "dense":
            self.f = chan_linear(st.layout, st.C, k)
            self.task, self.class_dim = "dense", st.cd
            self.out_shape = State(st.layout, k, st.T, st.H, st.W).dims()
        else:  # per_token (also what "tied" falls back to without an embedding)
            self.f = chan_linear(st.layout, st.C, k)
            self.class_dim = st.cd
            self.out_shape = State(st.layout, k, st.T, st.H, st.W).dims()
        self.layout = st.layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.adapt(x)
        if hasattr(self, "emb"):
            return F.linear(self.proj(x), self.emb.weight)
        if self.p["kind"] == "classify":
            return self.f(pool_all(x, self.layout, self.p.get("pool", "mean")))
        return self.f(x)


CLASS_LOSSES = ("cross_entropy", "nll", "kl_div")
LOSSES = CLASS_LOSSES + ("bce_logits", "mse", "l1", "smooth_l1", "huber", "square_mean", "sum", "mean", "logsumexp")


class FuzzLoss:
    """``loss(output, *targets)``; ``output`` is the head's tensor or (it, *extra outputs)."""

    def __init__(self, p: dict[str, Any], head: Head, extras_used: list[bool]) -> None:
        self.p, self.kind = p, p["kind"]
        self.class_dim = head.class_dim
        self.out_shape = head.out_shape
        self.extras_used = list(extras_used)

    def __call__(self, output: Any, *targets: torch.Tensor) -> torch.Tensor:
        out = output[0] if isinstance(output, tuple) else output
        loss = self.main(out, *targets)
        if isinstance(output, tuple):
            for used, extra in zip(self.extras_used, output[1:]):
                if used:
                    loss = loss + 0.01 * extra.square().mean()
        return loss

    def _classes_at_1(self, x: torch.Tensor) -> torch.Tensor:
        cd = self.class_dim % x.dim()
        return x if cd == 1 else x.movedim(cd, 1)

    def main(self, out: torch.Tensor, *targets: torch.Tensor) -> torch.Tensor:
        p, kind_ = self.p, self.kind
        red = p.get("reduction", "mean")
        if kind_ in ("cross_entropy", "nll"):
            target = targets[0]
            weight = targets[1] if p.get("weighted") else None
            ignore = p.get("ignore_index", IGNORE_INDEX)
            logits = out if kind_ == "cross_entropy" else F.log_softmax(out, dim=self.class_dim)
            if p.get("layout") == "flat":
                k = logits.shape[self.class_dim]
                logits, target = logits.movedim(self.class_dim, -1).reshape(-1, k), target.reshape(-1)
            else:
                logits = self._classes_at_1(logits)
            if kind_ == "nll":
                return F.nll_loss(logits, target, weight=weight, ignore_index=ignore, reduction=red)
            return F.cross_entropy(logits, target, weight=weight, ignore_index=ignore, reduction=red,
                                   label_smoothing=p.get("label_smoothing", 0.0))
        if kind_ == "kl_div":
            return F.kl_div(F.log_softmax(out, dim=self.class_dim), targets[0], reduction=p.get("reduction", "batchmean"),
                            log_target=bool(p.get("log_target")))
        if kind_ == "bce_logits":
            pos = targets[1] if p.get("pos_weight") else None
            return F.binary_cross_entropy_with_logits(out, targets[0], pos_weight=pos, reduction=red)
        if kind_ == "mse":
            return F.mse_loss(out, targets[0], reduction=red)
        if kind_ == "l1":
            return F.l1_loss(out, targets[0], reduction=red)
        if kind_ == "smooth_l1":
            return F.smooth_l1_loss(out, targets[0], reduction=red, beta=p.get("beta", 1.0))
        if kind_ == "huber":
            return F.huber_loss(out, targets[0], reduction=red, delta=p.get("delta", 1.0))
        if kind_ == "square_mean":
            return out.square().mean()
        if kind_ == "logsumexp":
            return out.logsumexp(self.class_dim).mean()
        if kind_ == "mean":
            return out.mean()
        return out.sum()

    def make_targets(self, batch: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        p, kind_ = self.p, self.kind
        shape = (batch, *self.out_shape)
        cd = self.class_dim % len(shape)
        k = shape[cd]
        if kind_ in ("cross_entropy", "nll"):
            tshape = shape[:cd] + shape[cd + 1:]
            target = torch.randint(0, k, tshape, generator=g)
            if p.get("ignore"):
                ignore = p.get("ignore_index", IGNORE_INDEX)
                target = torch.where(torch.rand(tshape, generator=g) < 0.25, torch.full_like(target, ignore), target)
            if p.get("weighted"):
                return target, 0.5 + torch.rand(k, generator=g)
            return (target,)
        if kind_ == "kl_div":
            t = F.log_softmax(torch.randn(shape, generator=g), dim=cd)
            return (t if p.get("log_target") else t.exp(),)
        if kind_ == "bce_logits":
            t = torch.rand(shape, generator=g)
            return (t, 0.5 + torch.rand(shape[-1], generator=g)) if p.get("pos_weight") else (t,)
        if kind_ in ("mse", "l1", "smooth_l1", "huber"):
            return (torch.randn(shape, generator=g),)
        return ()


def sample_loss(r: random.Random, head: Head) -> dict[str, Any]:
    kinds = CLASS_LOSSES if head.task == "class" and r.random() < 0.5 else LOSSES[3:]
    kind_ = r.choice(kinds)
    p: dict[str, Any] = {"kind": kind_}
    if kind_ in ("cross_entropy", "nll"):
        p.update(reduction=r.choice(["mean", "mean", "sum"]), ignore=r.random() < 0.4, weighted=r.random() < 0.25,
                 layout=r.choice(["flat", "channel"]))
        if p["ignore"] and r.random() < 0.3:
            p["ignore_index"] = 1  # a custom index
        if kind_ == "cross_entropy":
            p["label_smoothing"] = r.choice([0.0, 0.0, 0.1])
    elif kind_ == "kl_div":
        p.update(reduction=r.choice(["batchmean", "sum", "mean"]), log_target=r.random() < 0.5)
    elif kind_ == "bce_logits":
        p.update(reduction=r.choice(["mean", "sum"]), pos_weight=r.random() < 0.3)
    elif kind_ in ("mse", "l1", "smooth_l1", "huber"):
        p["reduction"] = r.choice(["mean", "mean", "sum"])
        if kind_ == "smooth_l1":
            p["beta"] = r.choice([1.0, 0.5])
        if kind_ == "huber":
            p["delta"] = r.choice([1.0, 2.0])
    return p


# -- the spec and the model -----------------------------------------------------------------
@dataclass
class ModelSpec:
    """A model as data: rebuilt exactly by :func:`build`, printed by :meth:`describe`.

    ``loss_inside`` True passes the loss to ``Rockmate(loss_fn=...)``; False
    makes the model compute it from targets given as extra inputs and return
    ``{"loss", "out", "extras"}``.
    """

    seed: int
    batch: int
    stem: dict[str, Any]
    blocks: list[dict[str, Any]]
    head: dict[str, Any]
    loss: dict[str, Any]
    loss_inside: bool = True
    autocast: bool = False
    hold_outputs: bool = False  # with the loss in the model: the caller keeps the outputs through the backward

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        return cls(**json.loads(text))

    def describe(self) -> str:
        def call(d: dict[str, Any]) -> str:
            args = ", ".join(f"{k}={v!r}" for k, v in d.items() if k != "kind")
            return f"{d['kind']}({args})"

        where = "loss_fn inside Rockmate" if self.loss_inside else "loss computed by the model"
        if not self.loss_inside:
            where += ", outputs " + ("held through the backward" if self.hold_outputs else "dropped before the backward")
        lines = [f"seed {self.seed}: batch {self.batch}, {where}" + (", autocast bf16" if self.autocast else "")]
        lines.append(f"  stem   {call(self.stem)}")
        lines += [f"  {i:<6} {call(b)}" for i, b in enumerate(self.blocks)]
        lines.append(f"  head   {call(self.head)}")
        lines.append(f"  loss   {call(self.loss)}")
        return "\n".join(lines)


class FuzzNet(nn.Module):
    def __init__(self, spec: ModelSpec, net: Net) -> None:
        super().__init__()
        self.stem = Stem(spec.stem, net)
        st = self.stem.out
        steps = []
        for b in spec.blocks:
            steps.append(Step(b, st, net))
            st = steps[-1].out
        self.blocks = nn.ModuleList(steps)
        self.shared = net.shared
        self.head = Head(spec.head, st, net)
        self.out_state = st
        self.n_extras = len(net.extras_used)
        self.n_inputs = len(self.stem.make_inputs(1, torch.Generator().manual_seed(0)))
        self.loss = FuzzLoss(spec.loss, self.head, net.extras_used)
        self.loss_inside = spec.loss_inside

    def forward(self, *args: torch.Tensor) -> Any:
        inputs, targets = args[: self.n_inputs], args[self.n_inputs:]
        stack: list[torch.Tensor] = []
        extras: list[torch.Tensor] = []
        h = self.stem(*inputs)
        for step in self.blocks:
            h = step(h, stack, extras)
        out = self.head(h)
        output = (out, *extras) if extras else out
        if self.loss_inside:
            return output
        return {"loss": self.loss(output, *targets), "out": out, "extras": extras}


@dataclass
class Built:
    """A built spec: ``model(*sample)``; with ``loss_fn``, ``loss_fn(output, *loss_args)`` is the loss."""

    spec: ModelSpec
    model: FuzzNet
    loss_fn: Callable[..., torch.Tensor] | None
    make_batch: Callable[[], tuple[tuple, tuple]] = field(repr=False)

    def loss_of(self, output: Any) -> torch.Tensor:
        return output if self.loss_fn is not None else output["loss"]


def _init_parameters(model: nn.Module, g: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * p[0].numel() ** -0.5)
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def build(spec: ModelSpec) -> Built:
    """The model, a batch factory and the loss of ``spec``; the same spec gives the same values."""
    g = torch.Generator().manual_seed(spec.seed)
    with torch.random.fork_rng(devices=[]):  # nn modules draw their default init from the global RNG
        net = Net(g)
        model = FuzzNet(spec, net)
    _init_parameters(model, g)
    for step, b in zip(model.blocks, spec.blocks):
        if b.get("frozen"):
            step.requires_grad_(False)
    if spec.stem.get("frozen"):
        model.stem.requires_grad_(False)
    model.train()

    def make_batch() -> tuple[tuple, tuple]:
        bg = torch.Generator().manual_seed(spec.seed + 7919)
        inputs = model.stem.make_inputs(spec.batch, bg)
        targets = model.loss.make_targets(spec.batch, bg)
        if spec.loss_inside:
            return inputs, targets
        return inputs + targets, ()

    return Built(spec, model, model.loss if spec.loss_inside else None, make_batch)


# -- generation -----------------------------------------------------------------------------
def _sample_stem(r: random.Random) -> dict[str, Any]:
    kind_ = r.choice(["tokens", "tokens", "features", "features", "image", "image", "signal", "multi", "tokens_features"])
    c = r.choice([16, 32, 32, 48, 64])
    if kind_ == "image":
        return {"kind": kind_, "Cin": 3, "H": r.choice([8, 16]), "W": r.choice([8, 16]), "C": r.choice([8, 16, 32]),
                "channels_last": r.random() < 0.3, "grad": r.random() < 0.3}
    if kind_ == "signal":
        return {"kind": kind_, "Cin": r.choice([2, 4]), "T": r.choice([32, 64]), "C": r.choice([8, 16, 32]),
                "grad": r.random() < 0.3}
    p: dict[str, Any] = {"kind": kind_, "T": r.choice([8, 16, 32]), "C": c}
    if kind_ in ("tokens", "tokens_features"):
        p.update(V=r.choice([32, 64, 100]), padding_idx=r.random() < 0.2)
    if kind_ != "tokens":
        p.update(Cin=r.choice([8, 16]), grad=r.random() < 0.3)
    if kind_ in ("features", "multi"):
        p["noncontig"] = r.random() < 0.3
    if kind_ == "multi":
        p.update(C2=r.choice([4, 8]), unused=r.random() < 0.5)
    if r.random() < 0.08:
        p["frozen"] = True
    return p


def _sample_head(r: random.Random, stem: dict[str, Any], st: State) -> dict[str, Any]:
    choices = ["classify", "per_token", "dense"] + (["tied", "tied"] if "V" in stem else [])
    kind_ = r.choice(choices)
    p: dict[str, Any] = {"kind": kind_}
    if kind_ != "tied":
        p["K"] = r.choice([4, 10, 16])
    if kind_ == "classify":
        p["pool"] = r.choice(["mean", "amax", "first", "logsumexp"])
    return p


def generate(seed: int, max_blocks: int = 8, max_forward_ops: int = MAX_FORWARD_OPS) -> ModelSpec:
    """The random model of ``seed``: up to ``max_blocks`` blocks (at least 2 where they fit), its
    forward running at most about ``max_forward_ops`` aten ops (:func:`forward_op_count`): a
    block that does not fit is drawn again, trailing blocks are cut if the head and loss overflow."""
    r = random.Random(seed)
    stem = _sample_stem(r)
    batch = r.choice([4, 8, 16])
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        net = Net(g)
        st = Stem(stem, net).out
        while batch > 2 and batch * st.numel > MAX_ELEMENTS:
            batch //= 2
        blocks: list[dict[str, Any]] = []
        names = list(KINDS)
        for _ in range(r.randint(2, max_blocks)):
            for _attempt in range(12):
                weights = [KINDS[n].weight * (1.0 if st.layout in KINDS[n].layouts else 0.15) for n in names]
                name = r.choices(names, weights)[0]
                probe = Adapt(st, st.layout if st.layout in KINDS[name].layouts else KINDS[name].layouts[0]).out
                if name in ("sdpa", "attn_manual") and probe.T > 64:  # keep B*H*T*T scores small
                    continue
                p = {"kind": name, **KINDS[name].sample(r, probe)}
                if r.random() < 0.06:
                    p["frozen"] = True
                saved = (list(net.stack), list(net.extras_used))
                out = Step(p, st, net).out
                trial = ModelSpec(seed, batch, stem, [*blocks, p], {"kind": "dense", "K": 4}, {"kind": "sum"})
                if (batch * out.numel <= MAX_ELEMENTS and out.C >= 4
                        and forward_op_count(trial) <= max_forward_ops - _HEAD_AND_LOSS_OPS):
                    blocks.append(p)
                    st = out
                    break
                net.stack, net.extras_used = saved
        head = _sample_head(r, stem, st)
        loss = sample_loss(r, Head(head, st, net))
    loss_inside = r.random() < 0.6
    spec = ModelSpec(seed, batch, stem, blocks, head, loss, loss_inside=loss_inside, autocast=r.random() < 0.12,
                     hold_outputs=not loss_inside and r.random() < 0.5)
    while len(spec.blocks) > 1 and forward_op_count(spec) > max_forward_ops:
        spec.blocks.pop()
    if not _probe(spec)[1]:  # everything the loss reads is frozen (a tied head on a frozen embedding)
        spec.stem.pop("frozen", None)
    return spec


# What a provisional dense head and sum loss leave for the real head and loss, in forward ops.
_HEAD_AND_LOSS_OPS = 6


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def forward_op_count(spec: ModelSpec) -> int:
    """How many aten ops one eager forward (with the loss) of ``spec`` runs: a proxy for the graph's size."""
    return _probe(spec)[0]


def _probe(spec: ModelSpec) -> tuple[int, bool]:
    """(aten ops of one forward with the loss, whether the loss requires grad)."""
    built = build(dataclasses.replace(spec, batch=2))  # the count does not depend on the batch size
    sample, loss_args = built.make_batch()
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings(), _CountOps() as counter:
        warnings.simplefilter("ignore")
        output = built.model(*sample)
        loss = built.loss_of(output if built.loss_fn is None else built.loss_fn(output, *loss_args))
    return counter.count, loss.requires_grad
