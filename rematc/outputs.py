"""Which outputs of the step get gradients, and which the caller keeps.

NOTE: [Outputs the caller drops] A Hugging Face model called the ordinary way,
``rm(**batch).loss.backward()``, returns its logits beside the loss. Traced as
they are, the logits are a differentiable output: AOTAutograd's backward then
takes a gradient for them, which the autograd engine materializes as zeros
(one logits-sized tensor) and the backward adds to the loss's gradient
(another), and the plan keeps the logits alive to the end of the step. Eager
autograd does none of that: the caller drops the logits, and only the loss is
backpropagated. Measured on GPT-2 (4 layers, vocab 4096): rematc's no-remat
prediction was 198 MiB against eager's measured 162 MiB.

So when the model returns a mapping with a ``loss`` tensor and no ``loss_fn``
is given, the step returns every other tensor *detached* inside the captured
graph: the joint graph has one tangent, the loss's, and the other outputs are
non-differentiable forward outputs. The plan assumes the caller drops them
before the backward (the IR frees them when the backward starts; see
``rematc.lower``), unless ``Rockmate(..., hold_outputs=True)``.

Both assumptions are checked at run time, never trusted silently:

- a detached output is handed back marked as requiring grad, through
  :class:`_NoGradientPlanned`, whose backward raises a :class:`RematcError`
  naming the output: a backward through the logits fails loudly instead of
  giving a wrong gradient;
- when the backward starts, :class:`DroppedOutputs` checks that the outputs
  the plan assumed dropped are dead, and warns once (``RematcWarning``, with
  their bytes) when the caller still holds one.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map

from .errors import RematcError, RematcWarning

__all__ = ["DroppedOutputs", "detach_all_but_loss", "has_loss", "mark_no_gradient_planned"]


def has_loss(output: Any) -> bool:
    """Whether ``output`` is a mapping (a ``ModelOutput``, a dict) holding a ``loss`` tensor."""
    return isinstance(output, Mapping) and isinstance(output.get("loss"), torch.Tensor)


def detach_all_but_loss(output: Mapping) -> Any:
    """``output`` with every tensor but ``loss`` detached (traced by Dynamo, inside the step).

    Rebuilt as the same mapping type (a ``ModelOutput`` subclass stays one).
    """
    fields = {
        key: value if key == "loss" else tree_map(_detach, value)
        for key, value in output.items()
    }
    return fields if type(output) is dict else type(output)(**fields)


def _detach(value: Any) -> Any:
    return value.detach() if isinstance(value, torch.Tensor) else value


class _NoGradientPlanned(torch.autograd.Function):
    """Identity on an output the plan gives no gradient; a backward through it raises."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, anchor: torch.Tensor, name: str) -> torch.Tensor:  # type: ignore[override]
        # ``anchor`` is an empty leaf that requires grad: without an input that
        # requires grad, autograd would not make the output require grad.
        ctx.name = name
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:  # type: ignore[override]
        raise RematcError(
            f"a backward pass reached the output {ctx.name!r}, which rematc planned without a gradient: "
            "with no loss_fn, only the model's own `loss` is differentiable (the other outputs are what "
            "the caller reads, not what it backpropagates). Compute the whole loss inside the planned "
            "region with Rockmate(..., loss_fn=...), or plan every output as differentiable with "
            "Rockmate(..., differentiable_outputs='all')"
        )


def mark_no_gradient_planned(output: Mapping) -> Any:
    """Give the detached floating outputs of ``output`` back their ``requires_grad``, guarded.

    In eager autograd they would require grad; here a backward through one
    raises (see :class:`_NoGradientPlanned`) instead of silently giving a
    gradient without their contribution.
    """
    if not torch.is_grad_enabled() or not output["loss"].requires_grad:
        return output

    anchor = torch.empty(0, requires_grad=True)

    def guard(path: str, value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not value.requires_grad:
            return _NoGradientPlanned.apply(value, anchor, path)
        return value

    for key, value in list(output.items()):
        if key == "loss":
            continue
        leaves, spec = tree_flatten(value)
        guarded = [guard(key if len(leaves) == 1 else f"{key}[{i}]", leaf) for i, leaf in enumerate(leaves)]
        output[key] = spec.unflatten(guarded) if len(leaves) != 1 or guarded[0] is not value else value
    return output


class DroppedOutputs:
    """The outputs the plan assumes the caller drops before the backward, checked when it starts.

    ``watch(output)`` takes weak references to the tensors handed to the
    caller (every one but the loss); ``check()``, called as the backward
    starts, warns once per module when the caller still holds one of them
    (or a view of one: a view keeps its base alive). The tensor objects are
    watched, not their storages: a storage may live on for reasons of its own
    (an input returned as an output, a value the backward reads).
    """

    def __init__(self) -> None:
        self._watched: list[tuple[str, weakref.ref, int]] = []
        self._warned = False

    def watch(self, output: Mapping) -> None:
        self._watched = []
        for key, value in output.items():
            if key == "loss":
                continue
            leaves = tree_flatten(value)[0]
            for i, leaf in enumerate(leaves):
                if isinstance(leaf, torch.Tensor):
                    name = key if len(leaves) == 1 else f"{key}[{i}]"
                    self._watched.append((name, weakref.ref(leaf), leaf.untyped_storage().nbytes()))

    def check(self) -> None:
        alive = [(name, nbytes) for name, ref, nbytes in self._watched if ref() is not None]
        self._watched = []
        if not alive or self._warned:
            return
        self._warned = True
        names = ", ".join(f"{name} ({nbytes} bytes)" for name, nbytes in alive)
        warnings.warn(
            f"rematc: the backward started while the caller still holds output(s) {names}. The plan "
            "assumed they are dropped after the forward (as in `rm(**batch).loss.backward()`), so this "
            f"step can exceed the budget by up to {sum(n for _, n in alive)} bytes. Drop them before "
            "calling backward, or plan with Rockmate(..., hold_outputs=True)",
            RematcWarning,
            stacklevel=3,
        )
