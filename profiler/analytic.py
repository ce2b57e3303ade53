"""Analytic (roofline) cost model for the nodes of an aten fx graph.

Deterministic: the time of a node is computed from its FLOPs and the bytes it
reads and writes, both read off the FakeTensors in ``node.meta["val"]``; no
kernel runs. Used when no device is at hand and in most tests::

    >>> costs = analytic_costs(joint_graph_module, device_type="cpu")
    >>> costs["mm"]  # [32, 10] @ [10, 128]: 81920 FLOPs, 22784 bytes
    NodeCost(time_ms=0.0072784, workspace_bytes=0)

A node's time is ``max(flops / flops_per_second, bytes / bytes_per_second)``
in milliseconds plus a fixed per-kernel ``floor_ms`` (launch and dispatch
overhead); view-like nodes cost nothing, since they launch no kernel and
allocate no storage.

FLOPs come from ``torch.utils.flop_counter``'s formulas, which cover matmuls,
convolutions and attention: the ops where compute, not memory traffic,
bounds the time. Every other op counts 0 FLOPs and is timed by its bytes.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx
from torch.utils.flop_counter import flop_registry

from .tensors import tensor_nbytes

__all__ = [
    "DeviceModel",
    "NodeCost",
    "analytic_costs",
    "device_model",
    "estimate_time_ms",
    "is_view_like",
    "node_bytes_moved",
    "node_flops",
]


@dataclasses.dataclass(frozen=True, slots=True)
class DeviceModel:
    """Throughputs of a device for the roofline model.

    Attributes:
        flops_per_second: Sustained floating-point operations per second.
        bytes_per_second: Sustained memory bandwidth, bytes per second.
        floor_ms: Fixed cost of any kernel (launch and dispatch), milliseconds.
    """

    flops_per_second: float
    bytes_per_second: float
    floor_ms: float

    def __post_init__(self) -> None:
        for name in ("flops_per_second", "bytes_per_second"):
            if not getattr(self, name) > 0:
                raise ValueError(f"DeviceModel.{name} must be > 0, got {getattr(self, name)}")
        if not self.floor_ms >= 0:
            raise ValueError(f"DeviceModel.floor_ms must be >= 0, got {self.floor_ms}")


# Round figures, not a calibration: what matters to the planner is the
# ratio between compute-bound and memory-bound ops, and that it is stable.
# cpu: a few cores with AVX2/AVX-512 (~50 GFLOP/s fp32) and ~10 GB/s of
# achieved DRAM bandwidth. cuda: an A100/H100-class GPU (~200 TFLOP/s with
# tensor cores, ~2 TB/s HBM). Both: ~5 us per kernel.
_DEVICE_MODELS: dict[str, DeviceModel] = {
    "cpu": DeviceModel(flops_per_second=50e9, bytes_per_second=10e9, floor_ms=0.005),
    "cuda": DeviceModel(flops_per_second=200e12, bytes_per_second=2e12, floor_ms=0.005),
}


def device_model(device_type: str) -> DeviceModel:
    """The default :class:`DeviceModel` of a device type.

    Args:
        device_type: ``"cpu"`` or ``"cuda"`` (a device index such as
            ``"cuda:1"`` is accepted and ignored).

    Returns:
        The model with the documented default throughputs.

    Example::

        >>> device_model("cpu")
        DeviceModel(flops_per_second=50000000000.0, bytes_per_second=10000000000.0, floor_ms=0.005)
    """
    kind = device_type.split(":", 1)[0]
    if kind not in _DEVICE_MODELS:
        raise ValueError(
            f"device_type must be one of {sorted(_DEVICE_MODELS)}, got {device_type!r}"
        )
    return _DEVICE_MODELS[kind]


@dataclasses.dataclass(frozen=True, slots=True)
class NodeCost:
    """Cost of running one fx node.

    Attributes:
        time_ms: Time of the node's kernel(s), milliseconds.
        workspace_bytes: Transient bytes the node allocates and frees while it
            runs, beyond its outputs (0 in analytic mode).
        output_bytes: Measured storage bytes of each tensor output that the
            kernel allocates, in the order of the node's tensor outputs (None
            where an output aliases an input); None when not measured, and
            then the fake tensors' storage sizes stand. See NOTE: [Real
            output storages] in ``profiler/workspace.py``.
    """

    time_ms: float
    workspace_bytes: int
    output_bytes: tuple[int | None, ...] | None = None


# Ops that return (a view of) their input without an alias annotation in
# their schema, or that are not OpOverloads at all.
_EXTRA_VIEW_TARGETS = (
    operator.getitem,
    torch.ops.aten._unsafe_view.default,
    torch.ops.aten.alias.default,
)


def is_view_like(node: torch.fx.Node) -> bool:
    """Whether a node launches no kernel: a view, alias or tuple access.

    An op is view-like when every value its schema returns aliases an input
    without writing to it (``Tensor(a)``, as ``view``, ``t``, ``expand``,
    ``split``), or it is ``getitem``, ``aten.alias`` or ``aten._unsafe_view``
    (a view of a fresh tensor, whose schema does not say so). In-place ops
    (``Tensor(a!)``) are not view-like: they write their input.

    Args:
        node: A node of an aten fx graph.

    Returns:
        True for view-like ``call_function`` nodes.
    """
    if node.op != "call_function":
        return False
    if node.target in _EXTRA_VIEW_TARGETS:
        return True
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.returns:
        return False
    return all(
        ret.alias_info is not None and not ret.alias_info.is_write for ret in schema.returns
    )


def node_flops(node: torch.fx.Node) -> float:
    """Floating-point operations of one node, from torch's flop formulas.

    The formulas take shapes only, so they run on the FakeTensors of
    ``node.meta["val"]``; nothing is executed.

    Args:
        node: A node of an aten fx graph whose inputs and itself carry
            ``meta["val"]``.

    Returns:
        The FLOP count; 0 for ops without a formula (elementwise ops,
        reductions, views), which the roofline times by their bytes.

    Example::

        >>> node_flops(mm_node)  # aten.mm of [32, 10] by [10, 128]
        81920.0
    """
    if node.op != "call_function":
        return 0.0
    packet = getattr(node.target, "overloadpacket", None)
    formula = flop_registry.get(packet) if packet is not None else None
    if formula is None:
        return 0.0
    args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), _meta_value)
    try:
        return float(formula(*args, **kwargs, out_val=node.meta.get("val")))
    except Exception as e:
        raise RuntimeError(f"While counting the FLOPs of %{node.name} ({node.format_node()})") from e


def node_bytes_moved(node: torch.fx.Node) -> int:
    """Bytes a node reads and writes: its tensor inputs plus its tensor outputs.

    Each distinct input node counts once (``x * x`` reads ``x`` once); a
    tensor counts the elements it views, not its whole storage. View-like
    nodes move nothing.

    Args:
        node: A node of an aten fx graph carrying ``meta["val"]``.

    Returns:
        Bytes moved; 0 for placeholders, outputs and view-like nodes.
    """
    if node.op != "call_function" or is_view_like(node):
        return 0
    input_bytes = sum(
        tensor_nbytes(t)
        for input_node in node.all_input_nodes
        for t in _tensors(input_node.meta.get("val"))
    )
    output_bytes = sum(tensor_nbytes(t) for t in _tensors(node.meta.get("val")))
    return input_bytes + output_bytes


def estimate_time_ms(node: torch.fx.Node, model: DeviceModel) -> float:
    """Roofline time of one node, milliseconds.

    Args:
        node: A node of an aten fx graph carrying ``meta["val"]``.
        model: Throughputs of the target device.

    Returns:
        0 for placeholders, outputs and view-like nodes; otherwise
        ``max(flops / flops_per_second, bytes / bytes_per_second) * 1e3 +
        floor_ms``.
    """
    if node.op != "call_function" or is_view_like(node):
        return 0.0
    compute_s = node_flops(node) / model.flops_per_second
    memory_s = node_bytes_moved(node) / model.bytes_per_second
    # Rounded to the picosecond so costs print readably (0.01548576, not
    # 0.015485760000000001); far below any kernel's time.
    return round(max(compute_s, memory_s) * 1e3 + model.floor_ms, 9)


def analytic_costs(gm: torch.fx.GraphModule, device_type: str = "cpu") -> dict[str, NodeCost]:
    """Analytic cost of every node of a graph.

    Args:
        gm: An aten-level graph (e.g. AOTAutograd's joint graph) whose nodes
            carry ``meta["val"]``.
        device_type: ``"cpu"`` or ``"cuda"``, selecting :func:`device_model`.

    Returns:
        A cost per node name, in graph order; placeholders and the output
        cost 0, workspaces are 0.

    Example::

        >>> costs = analytic_costs(joint, "cpu")  # Linear(64, 128) on a [32, 64] batch
        >>> costs["addmm"].time_ms, costs["t"].time_ms
        (0.01548576, 0.0)
    """
    model = device_model(device_type)
    return {
        node.name: NodeCost(time_ms=estimate_time_ms(node, model), workspace_bytes=0)
        for node in gm.graph.nodes
    }


def _meta_value(arg: torch.fx.Node) -> Any:
    """The example value of a node argument (its FakeTensor)."""
    if "val" not in arg.meta:
        raise ValueError(f"node %{arg.name} has no meta['val']; capture the graph with AOTAutograd")
    return arg.meta["val"]


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """The tensors in a node's value: itself, or the items of a tuple/list."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
