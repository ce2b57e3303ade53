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
(valid indices for embedding, gather and friends), bool tensors random. An op
that needs more (a valid RNG state) registers a maker of its valid inputs with
:func:`register_synthetic_inputs`.

NOTE: [Real output storages] The same run records the storage bytes of each
output the kernel allocates. Fake tensors promise what an op's meta function
says, and real CPU kernels do not always agree: ``mse_loss`` and
``smooth_l1_loss`` with a reduction return a 0-dim loss that *views* the
element-wise loss buffer (1 MiB for a 1 MiB input; the fake tensor says 4
bytes), so the buffer lives as long as the loss. A prediction from fake sizes
was one output-sized tensor low for the whole step (measured: 9.50 MiB against
8.50 MiB predicted on a 3-layer MLP with ``F.mse_loss``). The lowering takes
the measured storage bytes where they are known.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map

from .meter import MemoryMeter
from .tensors import storage_nbytes, storage_ref

__all__ = ["OpMemory", "measure_op", "measure_op_memory", "op_signature", "register_synthetic_inputs"]


@dataclass(frozen=True, slots=True)
class OpMemory:
    """What one op allocates, measured on a real run of its kernel.

    Attributes:
        workspace_bytes: peak bytes above the start beyond its fresh outputs.
        output_bytes: storage bytes of each tensor output (in the order of
            ``node.meta["val"]``'s tensors), None where it aliases an input;
            None when the op was not run (views, failures).
        output_layouts: (shape, stride, storage offset, dtype) of each
            tensor output as the kernel returned it (see NOTE: [Runtime
            layouts] in ``rematc/layouts.py``); None when the op was not run.
    """

    workspace_bytes: int
    output_bytes: tuple[int | None, ...] | None = None
    output_layouts: tuple[tuple[tuple[int, ...], tuple[int, ...], int, torch.dtype], ...] | None = None


_UNMEASURED = OpMemory(0, None)
_CACHE: dict[tuple, OpMemory] = {}
# op -> a function from the synthetic (args, kwargs) to valid ones; see register_synthetic_inputs.
_INPUT_MAKERS: dict[Any, Callable[[tuple, dict], tuple[tuple, dict]]] = {}


def register_synthetic_inputs(op: Any, make: Callable[[tuple, dict], tuple[tuple, dict]]) -> None:
    """Measure ``op`` on ``make(args, kwargs)`` instead of the plain synthetic inputs.

    For ops whose kernels reject random or zero inputs of the right shape and
    dtype: a replayed dropout needs a valid RNG state (``rematc/rng.py``).
    """
    _INPUT_MAKERS[op] = make


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


def measure_op_memory(gm: fx.GraphModule, device: str | torch.device = "cpu") -> dict[str, OpMemory]:
    """Workspace and output storage bytes of every node of ``gm``.

    Views, placeholders and ops that cannot run standalone get no workspace
    and no measured outputs (the fake tensors' sizes stand).

    The RNG state is saved and restored around the measurements, so random ops
    measured here do not change the model's random stream.
    """
    return {node.name: measure_op(node, device) for node in gm.graph.nodes}


def measure_op(node: fx.Node, device: str | torch.device = "cpu") -> OpMemory:
    """What ``node``'s kernel allocates and returns, run once on synthetic inputs with its inputs' layouts.

    Cached per :func:`op_signature` for the life of the process; views,
    placeholders and ops that cannot run standalone give an unmeasured
    ``OpMemory(0, None)``. The RNG state is restored.
    """
    device = torch.device(device)
    if not _measurable(node):
        return _UNMEASURED
    key = op_signature(node, device)
    if key not in _CACHE:
        with _disable_current_modes():
            rng = torch.get_rng_state()
            try:
                _CACHE[key] = _measure_node(node, device)
            finally:
                torch.set_rng_state(rng)
    return _CACHE[key]


def _measure_node(node: fx.Node, device: torch.device) -> OpMemory:
    def real(arg: Any) -> Any:
        if isinstance(arg, fx.Node):
            val = arg.meta.get("val")
            return _materialize(val, device) if isinstance(val, torch.Tensor) else val
        return arg

    try:
        args = tree_map(real, node.args)
        kwargs = tree_map(real, node.kwargs)
        if node.target in _INPUT_MAKERS:
            args, kwargs = _INPUT_MAKERS[node.target](args, kwargs)
        inputs = {storage_ref(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        with torch.no_grad(), MemoryMeter(device) as meter:
            out = node.target(*args, **kwargs)
            # Bytes of fresh output storages (outputs aliasing an input allocate nothing).
            outputs = tuple(
                None if storage_ref(t) in inputs else storage_nbytes(t) for t in _tensor_outputs(out)
            )
            fresh = {storage_ref(t): storage_nbytes(t) for t in _tensor_outputs(out) if storage_ref(t) not in inputs}
            layouts = tuple((tuple(t.shape), tuple(t.stride()), int(t.storage_offset()), t.dtype)
                            for t in _tensor_outputs(out))
            del out
        return OpMemory(max(0, meter.peak_bytes - sum(fresh.values())), outputs, layouts)
    except Exception:  # an op we cannot run standalone: assume no workspace (analytic default)
        return _UNMEASURED


def _tensor_outputs(out: Any) -> list[torch.Tensor]:
    """The tensors an op returned, in the order ``rematc.lower`` numbers a node's outputs."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for t in out if isinstance(t, torch.Tensor)]
    return []
