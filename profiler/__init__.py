"""Costs and memory of torch code: what the planner needs to know about ops.

This package knows torch and fx but not :mod:`solvers` nor :mod:`rematc`.

- :mod:`profiler.meter`: :class:`MemoryMeter` and :func:`measure_peak_bytes`,
  the deterministic memory meter every test and benchmark uses (the
  profiler's allocation events on CPU, the caching allocator's peak on
  CUDA).
- :mod:`profiler.tensors`: byte sizes and storage identity of real, fake
  and meta tensors (:func:`storage_nbytes`, :func:`same_storage`).
- :mod:`profiler.analytic`: the roofline cost model of an aten fx graph
  (:func:`analytic_costs` gives a :class:`NodeCost` per node).

Example::

    >>> with MemoryMeter("cpu") as meter:
    ...     model(batch).sum().backward()
    >>> meter.peak_bytes
    33352
"""

from .analytic import (
    DeviceModel,
    NodeCost,
    analytic_costs,
    device_model,
    estimate_time_ms,
    is_view_like,
    node_bytes_moved,
    node_flops,
)
from .meter import MemoryMeter, measure_peak_bytes
from .tensors import same_storage, storage_nbytes, storage_ref, tensor_nbytes

__all__ = [
    "DeviceModel",
    "MemoryMeter",
    "NodeCost",
    "analytic_costs",
    "device_model",
    "estimate_time_ms",
    "is_view_like",
    "measure_peak_bytes",
    "node_bytes_moved",
    "node_flops",
    "same_storage",
    "storage_nbytes",
    "storage_ref",
    "tensor_nbytes",
]
