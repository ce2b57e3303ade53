"""A canonical hash of a joint forward+backward fx graph: the identity a schedule file belongs to.

The hash covers what a schedule depends on and nothing else: per node its
``op``, name, target, argument structure (nodes referenced by their position
in the graph, constants by value) and the tensor metadata of ``meta["val"]``
(shape, stride, storage offset, dtype, device type). It never reads ids,
addresses, source locations or parameter values, so the same model with the
same sample shapes and dtypes gives the same hash in a new process and on
another machine, and changing any shape, dtype, layer or the loss changes it.

NOTE: [Hash after the passes] :func:`graph_hash` is taken after rematc's own
rewrites of the joint graph (``make_dropout_outputs_recomputable``), because
the schedule's steps name the nodes of the rewritten graph. The rewrites are
deterministic, so this is still a function of the captured graph; a rematc
version that rewrites differently gives another hash, which is what we want
(its steps would name other nodes).

Example:
    >>> graph_hash(joint, num_fwd_outputs=1)          # doctest: +SKIP
    'sha256:3f1c2a...'
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import torch
import torch.fx as fx

__all__ = ["describe_graph", "graph_hash"]

# Bump when the description below changes: old cache entries then miss instead of matching wrongly.
HASH_SCHEME = 2


def graph_hash(gm: fx.GraphModule, num_fwd_outputs: int, *, hold_outputs: bool = False) -> str:
    """The canonical hash of ``gm``, as ``"sha256:<hex>"``.

    ``hold_outputs`` (whether the caller keeps the outputs without a gradient
    through the backward) is part of what is planned, so it is hashed too.
    """
    description = describe_graph(gm, num_fwd_outputs)
    if hold_outputs:
        description["hold_outputs"] = True
    text = json.dumps(description, separators=(",", ":"), sort_keys=True)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def describe_graph(gm: fx.GraphModule, num_fwd_outputs: int) -> dict[str, Any]:
    """The JSON-able canonical description that :func:`graph_hash` digests (one row per node)."""
    position: dict[fx.Node, int] = {}
    rows = []
    for index, node in enumerate(gm.graph.nodes):
        position[node] = index
        rows.append([
            node.op,
            node.name,
            _describe_target(node),
            _describe_arg(node.args, position),
            _describe_arg(node.kwargs, position),
            _describe_val(node.meta.get("val")),
        ])
    return {"scheme": HASH_SCHEME, "num_fwd_outputs": num_fwd_outputs, "nodes": rows}


def _describe_target(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, str):  # placeholder, get_attr, output, call_method
        return target
    if isinstance(target, torch._ops.OpOverload):
        return str(target)  # "aten.mm.default"
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or getattr(target, "name", None)
    module = getattr(target, "__module__", None) or ""
    if isinstance(name, str):
        return f"{module}.{name}" if module else name
    return type(target).__qualname__  # never repr(): it may hold an address


def _describe_arg(arg: Any, position: dict[fx.Node, int]) -> Any:
    # Every branch tags its kind, so that e.g. the int 1, True and the node at position 1 differ.
    if isinstance(arg, fx.Node):
        return ["node", position[arg]]
    if arg is None or isinstance(arg, (bool, str)):
        return arg
    if isinstance(arg, int):
        return ["int", arg]
    if isinstance(arg, float):
        return ["float", repr(arg) if not math.isfinite(arg) else arg.hex()]
    if isinstance(arg, (tuple, list)):
        return ["tuple" if isinstance(arg, tuple) else "list", [_describe_arg(a, position) for a in arg]]
    if isinstance(arg, dict):
        return ["dict", [[str(k), _describe_arg(v, position)] for k, v in arg.items()]]
    if isinstance(arg, torch.device):
        return ["device", arg.type]  # not the index: another GPU of the same kind is the same graph
    if isinstance(arg, (torch.dtype, torch.memory_format, torch.layout)):
        return [type(arg).__name__, str(arg)]
    if isinstance(arg, slice):
        return ["slice", [_describe_arg(p, position) for p in (arg.start, arg.stop, arg.step)]]
    if isinstance(arg, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return ["sym", str(arg)]
    if arg is Ellipsis:
        return ["ellipsis"]
    if isinstance(arg, complex):
        return ["complex", arg.real.hex(), arg.imag.hex()]
    text = repr(arg)
    # Objects whose repr embeds an address identify the process, not the graph.
    return ["object", type(arg).__qualname__, "" if " at 0x" in text else text]


def _describe_val(val: Any) -> Any:
    if isinstance(val, torch.Tensor):
        shape, stride, offset = tuple(val.shape), val.stride(), val.storage_offset()
        if not all(type(s) is int for s in (*shape, *stride, offset)):  # symbolic sizes: their text
            shape, stride, offset = tuple(map(str, shape)), tuple(map(str, stride)), str(offset)
        return ["tensor", shape, stride, offset, str(val.dtype), val.device.type]
    if isinstance(val, (tuple, list)):
        return ["seq", [_describe_val(v) for v in val]]
    if val is None or isinstance(val, (bool, int, float, str)):
        return ["scalar", repr(val)]
    if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return ["sym", str(val)]
    return ["object", type(val).__qualname__]

