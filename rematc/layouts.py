"""Make the joint graph's fake tensor layouts match the kernels that run, and keep its views valid.

NOTE: [Runtime layouts] AOTAutograd traces the joint graph with fake tensors
and decides from their strides whether a ``reshape`` can be a view: where the
fake input is viewable it emits ``aten.view`` (or ``_unsafe_view``), which
fails at run time if the real input is not. The fake strides come from each
op's meta kernel or decomposition, and some of those describe another
device's kernel, or no kernel at all:

- ``native_dropout_backward``'s decomposition returns
  ``grad.suggest_memory_format()`` strides, as the CUDA kernel does, while
  the CPU kernel is ``grad * mask * scale``, whose TensorIterator output
  follows ``grad``'s own stride order. In a ConvNeXt block the gradient
  reaching the dropout is a permuted view: the fake says contiguous, the
  real tensor is not, and the ``view`` that flattens it for the ``Linear``
  backward's ``mm`` fails ("view size is not compatible with input
  tensor's size and stride"), in ``torch.compile(backend="aot_eager")`` as
  in rematc.
- ``native_layer_norm`` on a bfloat16 input returns its mean and rstd in
  float32 on CPU (the kernel's accumulation type); the meta kernel says
  bfloat16, so the statistics counted half their bytes and the backward
  was measured on other dtypes (fuzz seed 300: 16512 bytes over at the
  backward). The dtype is measured with the layout.
- ``_log_softmax_backward_data`` on CPU returns a contiguous gradient where
  the meta kernel keeps the permuted layout of ``log_softmax(dim=1)`` on a
  token grid (fuzz seed 118): every later op then runs on other strides than
  the ones it was measured on, and the plan measured 1280 bytes over its
  no-remat budget.

A list of such ops is never complete, so the layouts are measured, not
listed: :func:`make_layouts_faithful` walks the graph in order and runs each
op's real kernel once on synthetic inputs with the (already corrected)
layouts of its inputs (``profiler.workspace.measure_op``, the same cached run
that measures the op's workspace and output storage). Where the kernel
returns other strides than the fake tensor says, the fake value takes the
real layout, and the fake values downstream are re-derived (fake-tensor
propagation, so views alias the storage they view; ops measured again on
the new layouts). Every ``view`` whose input can no longer be viewed reads a
contiguous copy instead: what eager ``reshape`` does in that case, so values
and gradients stay bitwise equal. Profiling then measures each op on the
layouts it will really see.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import maybe_get_fake_mode
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map

from profiler.tensors import same_storage
from profiler.workspace import measure_op

from .errors import CaptureError

aten = torch.ops.aten

__all__ = ["make_layouts_faithful"]

# Ops whose result depends on the input's strides (not only on its shape and
# values): a view is only valid for some strides.
_VIEWS = (aten.view.default, aten._unsafe_view.default)
# Ops that read the input's storage through explicit strides: a changed input
# layout changes their values, and no copy can restore it in general.
_STORAGE_READERS = (aten.as_strided.default, aten.as_strided_scatter.default, aten.as_strided_copy.default)


def make_layouts_faithful(gm: fx.GraphModule) -> int:
    """Rewrite ``gm`` in place (see NOTE: [Runtime layouts]); return how many views became copies.

    Values and gradients are unchanged (bitwise): only fake metadata changes,
    and a view that the real input cannot support reads a contiguous copy
    of it instead, as ``reshape`` would.
    """
    graph = gm.graph
    changed: set[fx.Node] = set()  # nodes whose meta["val"] was replaced
    copies = 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        touched = any(a in changed for a in node.all_input_nodes)
        if node.target in _VIEWS and isinstance(node.args[0], fx.Node):
            source = node.args[0]
            if not _viewable(source.meta.get("val"), node.args[1]):
                changed.add(_copy_before_view(graph, node, source))  # a new storage for the view
                copies += 1
                touched = True
        if touched and node.target in _STORAGE_READERS:
            raise CaptureError(
                f"rematc: %{node.name} ({node.target}) reads its input through explicit strides, and "
                "that input's layout at run time differs from the one the graph was traced with "
                "(NOTE: [Runtime layouts] in rematc/layouts.py)"
            )
        if touched and isinstance(node.target, torch._ops.OpOverload) and node.target._schema.is_mutable:
            continue  # its output aliases the argument it mutates, whose value did not change
        old = node.meta.get("val")
        new = _with_runtime_layouts(node, old)
        if new is None:
            if not touched:
                continue
            new = _fake_run(node, node.target)
        if _needs_update(node, old, new, changed):
            node.meta["val"] = new
            changed.add(node)
    if copies or changed:
        graph.lint()
        gm.recompile()
    return copies


def _with_runtime_layouts(node: fx.Node, old: Any) -> Any:
    """``old`` with the strides ``node``'s real kernel returns, or None when they agree (or are unknown)."""
    olds = _tensors(old)
    if not olds:
        return None
    measured = measure_op(node, olds[0].device).output_layouts
    if measured is None or len(measured) != len(olds):
        return None
    replaced: list[torch.Tensor] = []
    for fake, (shape, stride, offset, dtype) in zip(olds, measured):
        if tuple(fake.shape) != shape:
            return None  # not the same output: trust the trace
        same = tuple(fake.stride()) == stride and fake.storage_offset() == offset and fake.dtype == dtype
        replaced.append(fake if same else _fake_like(fake, stride, offset, dtype))
    if all(a is b for a, b in zip(olds, replaced)):
        return None
    if isinstance(old, torch.Tensor):
        return replaced[0]
    it = iter(replaced)
    return tree_map(lambda v: next(it) if isinstance(v, torch.Tensor) else v, old)


def _fake_like(fake: torch.Tensor, stride: tuple[int, ...], offset: int, dtype: torch.dtype) -> torch.Tensor:
    """A fresh fake tensor of ``fake``'s shape with the given strides, storage offset and dtype."""
    mode = maybe_get_fake_mode(fake)
    span = 1 + sum((n - 1) * abs(s) for n, s in zip(fake.shape, stride)) if fake.numel() else 0
    with mode if mode is not None else _disable_current_modes():
        base = torch.empty(offset + span, dtype=dtype, device=fake.device)
        return base.as_strided(tuple(fake.shape), stride, offset)


def _viewable(val: Any, shape: Any) -> bool:
    """Whether a tensor with ``val``'s sizes and strides can be viewed as ``shape`` (ATen's own check)."""
    if not isinstance(val, torch.Tensor):
        return True
    with _disable_current_modes():  # a meta tensor runs the view's own stride check, nothing else
        probe = torch.empty_strided(val.shape, val.stride(), dtype=val.dtype, device="meta")
        try:
            probe.view(shape)
        except (RuntimeError, ValueError):  # ATen raises RuntimeError, the meta reference ValueError
            return False
    return True


def _copy_before_view(graph: fx.Graph, view: fx.Node, source: fx.Node) -> fx.Node:
    """Make ``view`` read a contiguous copy of ``source`` (eager ``reshape`` of a non-viewable tensor)."""
    with graph.inserting_before(view):
        copy = graph.call_function(aten.clone.default, (source,), {"memory_format": torch.contiguous_format})
    copy.meta = {k: v for k, v in view.meta.items() if k != "val"}
    copy.meta["val"] = _fake_run(copy, copy.target)
    view.replace_input_with(source, copy)
    return copy


def _fake_run(node: fx.Node, fn: Callable[..., Any]) -> Any:
    """``fn`` applied to the fake values of ``node``'s arguments, under their fake mode."""
    args, kwargs = tree_map(lambda a: a.meta["val"] if isinstance(a, fx.Node) else a, (node.args, node.kwargs))
    mode = next((m for m in map(maybe_get_fake_mode, tree_flatten((args, kwargs))[0]) if m is not None), None)
    if mode is None:
        raise CaptureError(f"rematc: %{node.name} has no fake tensor inputs to propagate layouts with")
    try:
        with mode:
            return fn(*args, **kwargs)
    except Exception as error:
        raise CaptureError(
            f"rematc: cannot re-derive the fake value of %{node.name} ({node.target}) after its input's "
            f"layout changed (NOTE: [Runtime layouts] in rematc/layouts.py): {error}"
        ) from error


def _needs_update(node: fx.Node, old: Any, new: Any, changed: set[fx.Node]) -> bool:
    """Whether ``new`` must replace ``old``: other metadata, or an alias of a replaced value.

    An unchanged result keeps its old fake tensor, so the storage identity
    other nodes' values rely on (NOTE: [Aliasing from fake tensors]) holds.
    """
    olds, news = _tensors(old), _tensors(new)
    if len(olds) != len(news) or any(not _same_layout(a, b) for a, b in zip(olds, news)):
        return True
    replaced = [t for a in node.all_input_nodes if a in changed for t in _tensors(a.meta.get("val"))]
    return any(same_storage(t, r) for t in news for r in replaced)


def _tensors(val: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(val)[0] if isinstance(t, torch.Tensor)]


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.shape == b.shape
        and a.stride() == b.stride()
        and a.storage_offset() == b.storage_offset()
        and a.dtype == b.dtype
        and a.device == b.device
        and a.untyped_storage().nbytes() == b.untyped_storage().nbytes()
    )

