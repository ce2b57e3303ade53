"""Trace ops through the kernels eager autograd runs, not PyTorch's Python decompositions.

NOTE: [Eager kernels while tracing] AOTAutograd traces the joint graph with the
Python dispatcher on, and some ops have Python kernels registered for the
``CompositeImplicitAutograd`` or ``Autograd`` keys (``py_impl`` in
``torch/_decomp/decompositions.py``). Eager never runs them: it calls the C++
kernel and its derivative formula. For the interpolation family the two
compute differently: ``F.interpolate(mode="bilinear")``'s gradients from the
traced graph differed from eager's by about 1e-5 (fuzz seed 221), in
``torch.compile(backend="aot_eager")`` as in rematc. rematc promises bitwise
equal gradients on the eager path, so while it traces it sets those Python
kernels aside for the ops listed in :data:`EAGER_KERNEL_OPS`; the C++
composite and the autograd formula (``upsample_bilinear2d_backward``) are
then what the graph records, as in eager. They are restored afterwards: the
registry is PyTorch's global state, shared with ``torch.compile``.

The list is by evidence (a fuzz seed whose gradients differed), not every op
with a Python kernel: some exist because the C++ composite cannot be traced
(``dropout``, which rematc relies on reaching the graph as ``native_dropout``).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch._C import DispatchKey

__all__ = ["EAGER_KERNEL_OPS", "eager_kernels"]

_KEYS = (DispatchKey.CompositeImplicitAutograd, DispatchKey.Autograd)

#: Operator packets traced through their C++ kernels (every overload).
EAGER_KERNEL_OPS: tuple[str, ...] = (
    "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d",
    "_upsample_nearest_exact1d", "_upsample_nearest_exact2d", "_upsample_nearest_exact3d",
    "upsample_linear1d", "upsample_bilinear2d", "upsample_trilinear3d", "upsample_bicubic2d",
    "_upsample_bilinear2d_aa", "_upsample_bicubic2d_aa",
)


def _overloads() -> Iterator[torch._ops.OpOverload]:
    import torch._decomp  # noqa: F401  (registers the Python kernels we set aside)

    for name in EAGER_KERNEL_OPS:
        packet = getattr(torch.ops.aten, name, None)
        if packet is None:
            continue
        for overload in packet.overloads():
            yield getattr(packet, overload)


@contextlib.contextmanager
def eager_kernels() -> Iterator[None]:
    """Within the block, the ops of :data:`EAGER_KERNEL_OPS` dispatch as in eager (see the note)."""
    removed: list[tuple[torch._ops.OpOverload, DispatchKey, object]] = []
    try:
        for op in _overloads():
            for key in _KEYS:
                if key in op.py_kernels:
                    removed.append((op, key, op.py_kernels.pop(key)))
            op._dispatch_cache.clear()
        yield
    finally:
        for op, key, kernel in removed:
            op.py_kernels[key] = kernel
        for op in {op for op, _, _ in removed}:
            op._dispatch_cache.clear()
