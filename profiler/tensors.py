"""Byte sizes and storage identity of tensors, real, fake or meta.

The memory model counts a storage once, however many views of it are alive
(DESIGN.md, "Views share storage"). These helpers read that from tensor
metadata alone, so they work on the FakeTensors in ``node.meta["val"]`` of a
captured graph::

    >>> with FakeTensorMode():
    ...     x = torch.empty(4, 8)
    ...     row = x[1]
    >>> tensor_nbytes(row), storage_nbytes(row), same_storage(x, row)
    (32, 128, True)
"""

from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef

__all__ = ["same_storage", "storage_nbytes", "storage_ref", "tensor_nbytes"]


def tensor_nbytes(t: torch.Tensor) -> int:
    """Bytes of the elements a tensor views: ``numel * element_size``.

    Args:
        t: A real, fake or meta tensor with static shape.

    Returns:
        The byte count; for a view this is less than its storage.
    """
    return _static_int(t.numel() * t.element_size(), "numel * element_size")


def storage_nbytes(t: torch.Tensor) -> int:
    """Bytes of the untyped storage behind a tensor (what the allocator holds).

    Args:
        t: A real, fake or meta tensor with static shape.

    Returns:
        The storage's byte count, shared by every view of it.
    """
    return _static_int(t.untyped_storage().nbytes(), "storage nbytes")


def storage_ref(t: torch.Tensor) -> StorageWeakRef:
    """A hashable key of a tensor's storage: equal for views of one storage.

    The key is a weak reference: it does not keep the storage alive, and is
    only meaningful while the storage is (as for ``node.meta["val"]``).

    Args:
        t: A real, fake or meta tensor.

    Returns:
        A weak reference, hashable and comparable with ``==``.
    """
    return StorageWeakRef(t.untyped_storage())


def same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors share one storage (one aliases the other).

    Args:
        a: A real, fake or meta tensor.
        b: Another tensor of the same kind.

    Returns:
        True when both view the same storage.
    """
    return storage_ref(a) == storage_ref(b)


def _static_int(value: int | torch.SymInt, what: str) -> int:
    """Rejects symbolic sizes: the memory model needs exact byte counts."""
    if isinstance(value, torch.SymInt):
        raise ValueError(
            f"{what} is symbolic ({value}); rematc needs static shapes "
            "(capture with torch.compile(..., dynamic=False))"
        )
    return int(value)
