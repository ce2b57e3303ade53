"""Rewrites of the joint graph that widen the planner's choices without changing results.

NOTE: [Recomputable dropout] ``native_dropout`` draws a random mask, so it must
run exactly once (recomputing it would draw a new mask). Its *output* is
``x * mask * scale``, though: the CPU kernel computes exactly
``input.mul(mask).mul_(scale)``. :func:`make_dropout_outputs_recomputable`
rewrites each training-mode dropout so that the random op only produces the
mask (1 byte an element) and the output is two recomputable multiplies. The
planner can then keep the small mask and recompute the output, instead of
being forced to keep the 4-byte-an-element output (for attention
probabilities, B*H*T*T floats a layer). Outputs stay bitwise equal on CPU; the
end-to-end tests check it on every model with dropout.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

aten = torch.ops.aten


def make_dropout_outputs_recomputable(gm: fx.GraphModule) -> int:
    """Rewrite ``gm`` in place (see the note above); return how many dropouts changed."""
    graph = gm.graph
    changed = 0
    for node in list(graph.nodes):
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
        scale = 0.0 if p >= 1.0 else 1.0 / (1.0 - p)
        val = out_node.meta["val"]
        with graph.inserting_after(mask_node):
            masked = graph.call_function(aten.mul.Tensor, (x, mask_node))
        with graph.inserting_after(masked):
            output = graph.call_function(aten.mul.Tensor, (masked, scale))
        for new in (masked, output):
            new.meta = {k: v for k, v in out_node.meta.items() if k != "val"}
            new.meta["val"] = _fresh_like(val)
        out_node.replace_all_uses_with(output)
        changed += 1
    if changed:
        graph.lint()
        gm.recompile()
    return changed


def _fresh_like(val: torch.Tensor) -> torch.Tensor:
    """A fake tensor with ``val``'s metadata and its own storage (not an alias)."""
    mode = getattr(val, "fake_mode", None)
    if mode is None:
        return torch.empty_strided(val.shape, val.stride(), dtype=val.dtype, device=val.device)
    with mode:
        return torch.empty_strided(val.shape, val.stride(), dtype=val.dtype, device=val.device)
