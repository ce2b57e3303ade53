"""Lower AOTAutograd's joint forward+backward fx graph to the torch-free IR.

The joint graph's placeholders are primals (parameters, buffers, inputs:
resident values) and tangents (output gradients, handed to the backward from
outside: ``is_input`` ops). Each call_function node is one op; its tensor
outputs are values: the node itself for single outputs, its ``getitem`` users
(or a synthetic value when nothing reads an output) for tuples.

NOTE: [Aliasing from fake tensors] A value is a view when its FakeTensor shares
storage with one of its producer's inputs. Fake tensors track storages exactly
like real ones, so this catches ``view``, ``t``, ``expand``, ``_unsafe_view``,
``split`` and friends without an op table, and the byte counts are storage
bytes, so a storage is counted once.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from profiler.analytic import NodeCost
from profiler.tensors import same_storage, storage_nbytes
from solvers import Graph, Op, Value

from .rng import REPLAY_OP


@dataclass(frozen=True)
class Lowered:
    """The IR of a joint graph plus the maps back to fx nodes.

    Attributes:
        graph: the torch-free IR.
        op_nodes: fx node of each op (a placeholder for tangent input ops).
        value_nodes: for each value, the fx node carrying it, or None for a
            tuple output no ``getitem`` reads (it lives and dies with its op).
        num_fwd_outputs: how many of the joint outputs belong to the forward.
    """

    graph: Graph
    op_nodes: tuple[fx.Node, ...]
    value_nodes: tuple[fx.Node | None, ...]
    num_fwd_outputs: int


def is_tangent(node: fx.Node) -> bool:
    return node.op == "placeholder" and node.name.startswith("tangents")


def is_recomputable(node: fx.Node) -> bool:
    """Whether running ``node`` again is safe and gives the same values.

    Random ops (tag ``nondeterministic_seeded``: dropout, rand*, SDPA with
    dropout) run once, except a dropout replayed from its saved RNG state
    (NOTE: [Replayed dropout]); ops that mutate or have side effects, and anything that is not a
    plain aten OpOverload (higher-order and custom ops we cannot vet) run once.
    """
    target = node.target
    if target is REPLAY_OP:  # a pure function of the saved RNG state (NOTE: [Replayed dropout])
        return True
    if not isinstance(target, torch._ops.OpOverload):
        return False
    if torch.Tag.nondeterministic_seeded in target.tags and not _attention_without_dropout(node):
        return False
    schema = target._schema
    if schema.is_mutable:
        return False
    return target.namespace in ("aten", "prims")


def _attention_without_dropout(node: fx.Node) -> bool:
    """An attention kernel tagged random that draws nothing: its ``dropout_p`` is 0.

    Hugging Face models pass ``dropout_p=0.0`` to SDPA when attention dropout
    is off; the CPU flash kernel then leaves the RNG untouched (tested), so it
    recomputes like any deterministic op. Kept run-once, its outputs were
    saved in every layer (OPT: 2.05 MiB of a 52.55 MiB minimum).
    ``native_dropout`` with ``p=0`` is not in this family: it still draws.
    """
    schema = node.target._schema
    names = [a.name for a in schema.arguments]
    if "dropout_p" not in names:
        return False
    index = names.index("dropout_p")
    if "dropout_p" in node.kwargs:
        value = node.kwargs["dropout_p"]
    elif index < len(node.args):
        value = node.args[index]
    else:
        value = schema.arguments[index].default_value
    return isinstance(value, (int, float)) and value == 0


def _numel(node: fx.Node) -> int:
    val = node.meta.get("val")
    return val.numel() if isinstance(val, torch.Tensor) else 0


def _tensor_outputs(node: fx.Node) -> list[tuple[int | None, torch.Tensor]]:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return [(None, val)]
    if isinstance(val, (tuple, list)):
        return [(i, v) for i, v in enumerate(val) if isinstance(v, torch.Tensor)]
    return []


def lower_joint_graph(
    joint: fx.GraphModule, num_fwd_outputs: int, costs: dict[str, NodeCost], *, hold_outputs: bool = False
) -> Lowered:
    """Build the IR of ``joint`` with per-node ``costs`` (keyed by node name).

    Forward outputs that get a gradient (a tangent) are live to the end of the
    step. The others (logits beside a loss, updated buffers) are dropped by
    the caller when the forward returns, so the IR frees them as the backward
    starts, unless ``hold_outputs`` says the caller keeps them to the end.
    See NOTE: [Outputs the caller drops] in outputs.py.
    """
    values: list[Value] = []
    value_nodes: list[fx.Node | None] = []
    ops: list[Op] = []
    op_nodes: list[fx.Node] = []
    value_of: dict[fx.Node, int] = {}
    backward: set[fx.Node] = set()

    def add_value(name: str, nbytes: int, producer: int | None, view_of: int | None, node: fx.Node | None) -> int:
        values.append(Value(name, nbytes, producer, view_of))
        value_nodes.append(node)
        return len(values) - 1

    for node in joint.graph.nodes:
        if node.op == "placeholder":
            val = node.meta.get("val")
            nbytes = storage_nbytes(val) if isinstance(val, torch.Tensor) else 0
            if is_tangent(node):
                backward.add(node)
                op_index = len(ops)
                v = add_value(node.name, nbytes, op_index, None, node)
                ops.append(Op(node.name, (), (v,), 0.0, 0, True, False, True))
                op_nodes.append(node)
                value_of[node] = v
            elif isinstance(val, torch.Tensor):
                value_of[node] = add_value(node.name, nbytes, None, None, node)
            continue
        if node.op != "call_function" or node.target is operator.getitem:
            continue
        inputs = [a for a in node.all_input_nodes if a in value_of]
        if any(a in backward for a in node.all_input_nodes):
            backward.add(node)
            backward.update(node.users)  # its getitems
        input_values = tuple(value_of[a] for a in inputs)
        op_index = len(ops)
        output_values: list[int] = []
        getitems = {u.args[1]: u for u in node.users if u.target is operator.getitem}
        cost = costs.get(node.name, NodeCost(0.0, 0))
        fakes = _tensor_outputs(node)
        measured = cost.output_bytes if cost.output_bytes is not None and len(cost.output_bytes) == len(fakes) else None
        for k, (position, fake) in enumerate(fakes):
            carrier = node if position is None else getitems.get(position)
            view_of = next(
                (value_of[a] for a in inputs if same_storage(fake, a.meta["val"])), None
            )
            name = node.name if carrier is None and position is None else (
                carrier.name if carrier is not None else f"{node.name}[{position}]"
            )
            nbytes = storage_nbytes(fake)
            if view_of is None and measured is not None and measured[k] is not None:
                nbytes = measured[k]  # NOTE: [Real output storages] (profiler/workspace.py)
            v = add_value(name, nbytes, op_index, view_of, carrier)
            output_values.append(v)
            if carrier is not None:
                value_of[carrier] = v
        ops.append(
            Op(
                node.name,
                input_values,
                tuple(output_values),
                cost.time_ms,
                cost.workspace_bytes,
                is_backward=node in backward,
                recomputable=is_recomputable(node) and node not in backward,
            )
        )
        op_nodes.append(node)

    output_node = next(iter(joint.graph.find_nodes(op="output")))
    outputs = list(output_node.args[0])
    forward_outputs = tuple(
        value_of[o] for o in outputs[:num_fwd_outputs] if isinstance(o, fx.Node) and o in value_of
    )
    gradients = tuple(
        value_of[o] for o in outputs[num_fwd_outputs:] if isinstance(o, fx.Node) and o in value_of
    )
    # The caller holds the forward outputs (the loss, logits) until the backward
    # is done, so they stay live to the end; gradients are handed to autograd.
    # NOTE: [Which tangents are pinned] torch >= 2.13 calls AOTAutograd's
    # backward with ``boxed_grads_call``: the output gradients arrive in one
    # list, which AOTAutograd's prologue clears, and the boxed backward graph
    # drops each after its last use. A gradient made by the autograd graph
    # downstream (an output fed to a loss outside) is owned by nothing else and
    # dies there. The gradient of a backward *root* is different:
    # ``loss.backward()`` makes it (``ones_like``) and its frame holds it
    # until the backward returns. Roots are scalar losses, so one-element
    # tangents are pinned to the end and the others are not. Pinning them all
    # overestimated by an output's size (4% on a small attention stack
    # returning its activations); tests/rematc/test_model_constructs.py measures both.
    pinned = tuple(
        op.outputs[0] for op, node in zip(ops, op_nodes) if op.is_input and _numel(node) == 1
    )
    kept = _held_outputs(joint, output_node, num_fwd_outputs, hold_outputs)
    held = tuple(
        value_of[o] for i, o in enumerate(outputs[:num_fwd_outputs])
        if isinstance(o, fx.Node) and o in value_of and (kept is None or i in kept)
    )
    required = tuple(dict.fromkeys((*held, *gradients, *pinned)))
    graph = Graph(tuple(ops), tuple(values), forward_outputs, required)
    return Lowered(graph, tuple(op_nodes), tuple(value_nodes), num_fwd_outputs)


def _held_outputs(
    joint: fx.GraphModule, output_node: fx.Node, num_fwd_outputs: int, hold_outputs: bool
) -> set[int] | None:
    """Positions of the forward outputs live to the end, from AOTAutograd's descriptors.

    Those with a tangent; with ``hold_outputs``, every output the user gets
    too, but never the updated values of mutated inputs (BatchNorm's running
    statistics), which AOTAutograd copies into the buffers and drops. None
    when the descriptors are missing (torch < 2.9, or a graph built by hand):
    every forward output is then taken as held to the end.
    """
    output_descs = output_node.meta.get("desc")
    if not isinstance(output_descs, (list, tuple)) or len(output_descs) < num_fwd_outputs:
        return None
    if hold_outputs:
        return {i for i in range(num_fwd_outputs) if "InputMutation" not in type(output_descs[i]).__name__}
    tangent_of = []
    for node in joint.graph.find_nodes(op="placeholder"):
        if is_tangent(node):
            desc = node.meta.get("desc")
            if desc is None or not hasattr(desc, "output"):
                return None
            tangent_of.append(desc.output)
    return {i for i in range(num_fwd_outputs) if output_descs[i] in tangent_of}
