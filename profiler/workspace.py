"""Measured transient workspace of each op: bytes an op holds only while it runs.

Many CPU kernels allocate temporaries through the c10 allocator: dropout's
backward turns its bool mask into a float tensor, BatchNorm's backward keeps a
scratch copy, convolutions get oneDNN buffers. No formula predicts them, and a
plan that ignores them exceeds its budget. So each distinct op signature
(target, shapes, strides, dtypes, constant arguments) is run once on
synthetic inputs under the memory meter, and its workspace is the peak above
the start minus the bytes of the outputs it returns. Results are cached per
signature and device for the life of the process.

Synthetic inputs: floating tensors are random normal, integer tensors zeros
(valid indices for embedding, gather and friends), bool tensors random.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map

from .meter import MemoryMeter
from .tensors import storage_nbytes, storage_ref

__all__ = ["measure_workspace", "op_signature"]

_CACHE: dict[tuple, int] = {}


def op_signature(node: fx.Node, device: torch.device) -> tuple:
    """A hashable key: equal for nodes that run the same kernel on the same metadata."""

    def describe(arg: Any) -> Any:
        if isinstance(arg, fx.Node):
            val = arg.meta.get("val")
            if isinstance(val, torch.Tensor):
                return ("T", tuple(val.shape), tuple(val.stride()), val.dtype, val.storage_offset())
            return ("V", repr(val))
        return repr(arg)

    flat_args, _ = tree_flatten((node.args, node.kwargs))
    return (str(node.target), device.type, tuple(describe(a) for a in flat_args))


def _measurable(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target is operator.getitem:
        return False
    if not isinstance(node.target, torch._ops.OpOverload):
        return False
    # Views and aliases allocate nothing; their schema says so.
    returns = node.target._schema.returns
    return not any(r.alias_info is not None for r in returns)


def _materialize(val: torch.Tensor, device: torch.device) -> torch.Tensor:
    base_numel = storage_nbytes(val) // max(val.element_size(), 1)
    base = torch.empty(base_numel, dtype=val.dtype, device=device)
    if val.dtype.is_floating_point or val.dtype.is_complex:
        base.normal_()
    elif val.dtype == torch.bool:
        base.bernoulli_(0.5)
    else:
        base.zero_()
    return base.as_strided(tuple(val.shape), tuple(val.stride()), val.storage_offset())


def measure_workspace(gm: fx.GraphModule, device: str | torch.device = "cpu") -> dict[str, int]:
    """Workspace bytes of every node of ``gm`` (0 for views, placeholders, failures).

    The RNG state is saved and restored around the measurements, so random ops
    measured here do not change the model's random stream.
    """
    device = torch.device(device)
    result: dict[str, int] = {}
    # Called from inside AOTAutograd's partitioner, where a FakeTensorMode is
    # active: leave it, or the "real" inputs would be fake and allocate nothing.
    with _disable_current_modes():
        rng = torch.get_rng_state()
        try:
            _measure_all(gm, device, result)
        finally:
            torch.set_rng_state(rng)
    return result


def _measure_all(gm: fx.GraphModule, device: torch.device, result: dict[str, int]) -> None:
    for node in gm.graph.nodes:
        if not _measurable(node):
            result[node.name] = 0
            continue
        key = op_signature(node, device)
        if key not in _CACHE:
            _CACHE[key] = _measure_node(node, device)
        result[node.name] = _CACHE[key]


def _measure_node(node: fx.Node, device: torch.device) -> int:
    def real(arg: Any) -> Any:
        if isinstance(arg, fx.Node):
            val = arg.meta.get("val")
            return _materialize(val, device) if isinstance(val, torch.Tensor) else val
        return arg

    try:
        args = tree_map(real, node.args)
        kwargs = tree_map(real, node.kwargs)
        inputs = {storage_ref(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        with torch.no_grad(), MemoryMeter(device) as meter:
            out = node.target(*args, **kwargs)
            # Bytes of fresh output storages (outputs aliasing an input allocate nothing).
            fresh = {}
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and storage_ref(t) not in inputs:
                    fresh[storage_ref(t)] = storage_nbytes(t)
            del out
        return max(0, meter.peak_bytes - sum(fresh.values()))
    except Exception:  # an op we cannot run standalone: assume no workspace (analytic default)
        return 0
