"""Rewrites of the joint graph that widen the planner's choices without changing results.

NOTE: [Recomputable dropout] ``native_dropout`` draws a random mask, so it must
run exactly once (recomputing it would draw a new mask). Its *output* is
``x * mask * scale``, though: the CPU kernel computes exactly
``input * (mask.to(dtype) * scale)``, which equals ``input * mask * s`` with
``s`` the scale rounded to the input's dtype. :func:`make_dropout_outputs_recomputable`
rewrites each training-mode dropout so that the random op only produces the
mask (1 byte an element) and the output is two recomputable multiplies. The
planner can then keep the small mask and recompute the output, instead of
being forced to keep the 4-byte-an-element output (for attention
probabilities, B*H*T*T floats a layer). Outputs stay bitwise equal on CPU; the
end-to-end tests check it on every model with dropout. On CPU the mask itself
then becomes recomputable too, replayed from a saved RNG state (NOTE:
[Replayed dropout] in rematc/rng.py).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch.utils._python_dispatch import _disable_current_modes

aten = torch.ops.aten


def make_dropout_outputs_recomputable(gm: fx.GraphModule) -> int:
    """Rewrite ``gm`` in place (see the note above); return how many dropouts changed."""
    graph = gm.graph
    changed = 0
    backward_changed = False
    for node in list(graph.nodes):
        if node.target is aten.native_dropout_backward.default:
            backward_changed |= _match_eager_cpu_dropout_backward(graph, node)
            continue
        if node.target is not aten.native_dropout.default:
            continue
        x, p = node.args[0], node.args[1]
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train")
        if train is False or not isinstance(p, float) or not isinstance(x, fx.Node):
            continue
        getitems = {u.args[1]: u for u in node.users if u.target is operator.getitem}
        out_node = getitems.get(0)
        if out_node is None or not out_node.users:
            continue
        mask_node = getitems.get(1)
        if mask_node is None:
            with graph.inserting_after(out_node):
                mask_node = graph.call_function(operator.getitem, (node, 1))
            mask_node.meta = {**out_node.meta, "val": node.meta["val"][1]}
        val = out_node.meta["val"]
        scale = _dropout_scale(p, val.dtype)
        with graph.inserting_after(mask_node):
            masked = graph.call_function(aten.mul.Tensor, (x, mask_node))
        with graph.inserting_after(masked):
            output = graph.call_function(aten.mul.Tensor, (masked, scale))
        for new in (masked, output):
            new.meta = {k: v for k, v in out_node.meta.items() if k != "val"}
        # ``output`` takes over the dropout output's fake tensor: views of it
        # downstream share that fake storage, and lowering finds aliases by
        # storage (NOTE: [Aliasing from fake tensors]); a fresh fake here made
        # every view of a dropout output count as a new allocation.
        masked.meta["val"] = _fresh_like(val)
        output.meta["val"] = val
        out_node.replace_all_uses_with(output)
        changed += 1
    if changed or backward_changed:
        graph.lint()
        gm.recompile()
    return changed


def _match_eager_cpu_dropout_backward(graph: fx.Graph, node: fx.Node) -> bool:
    """Give a CPU ``native_dropout_backward`` eager autograd's rounding (in place); return whether it did.

    NOTE: [Dropout backward on CPU] Eager ``F.dropout`` on CPU does not call
    ``native_dropout``: it draws ``noise = bernoulli(1 - p) / (1 - p)`` in the
    input's dtype and returns ``input * noise``, whose backward is
    ``grad * noise``. Dynamo decomposes it to ``native_dropout`` (same values,
    same random stream), whose backward multiplies by the unrounded scale:
    in bfloat16 and float16 the gradients then differ from eager in the last
    bit. ``grad * mask * s``, with ``s`` the scale rounded to the dtype, is
    exactly ``grad * noise`` in every dtype. On CUDA eager does use the fused
    ``native_dropout``, so only CPU graphs are rewritten.

    The new nodes take ``node``'s fake layout, which is right once
    :func:`rematc.layouts.make_layouts_faithful` has run (NOTE: [Runtime
    layouts]): it gives ``native_dropout_backward`` the CPU kernel's layout,
    that of ``grad * mask * scale``, which these multiplies reproduce.
    """
    grad, mask, scale = node.args[:3]
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.device.type != "cpu" or not isinstance(scale, float):
        return False
    with graph.inserting_before(node):
        masked = graph.call_function(aten.mul.Tensor, (grad, mask))
        output = graph.call_function(aten.mul.Tensor, (masked, _round_to(scale, val.dtype)))
    for new in (masked, output):
        new.meta = {k: v for k, v in node.meta.items() if k != "val"}
    masked.meta["val"] = _fresh_like(val)
    output.meta["val"] = val
    node.replace_all_uses_with(output)
    graph.erase_node(node)
    return True


def _dropout_scale(p: float, dtype: torch.dtype) -> float:
    """The factor ``native_dropout`` scales kept elements by, exactly as its CPU kernel rounds it.

    The kernel computes ``input * (mask.to(dtype) * scale)``: the scale is
    rounded to the input's dtype first. Multiplying by the unrounded scale
    is exact in float32 but not in bfloat16 or float16 (a zoo entry trains
    with bfloat16 parameters); multiplying by the rounded one is exact in all.
    """
    return _round_to(0.0 if p >= 1.0 else 1.0 / (1.0 - p), dtype)


def _round_to(number: float, dtype: torch.dtype) -> float:
    """``number`` rounded to the nearest value of ``dtype``."""
    with _disable_current_modes():  # called under AOTAutograd's FakeTensorMode
        return torch.tensor(number, dtype=dtype).item()


def _fresh_like(val: torch.Tensor) -> torch.Tensor:
    """A fake tensor with ``val``'s metadata and its own storage (not an alias)."""
    mode = getattr(val, "fake_mode", None)
    if mode is None:
        return torch.empty_strided(val.shape, val.stride(), dtype=val.dtype, device=val.device)
    with mode:
        return torch.empty_strided(val.shape, val.stride(), dtype=val.dtype, device=val.device)
