"""Emit AOTAutograd's forward and backward graphs in the order of a Schedule.

The forward graph runs the schedule's forward phase and returns the forward
outputs plus the values the backward reads (the saved values). The backward
graph runs the backward phase: recomputed forward ops are fresh fx nodes
interleaved with the backward ops exactly in schedule order; an op recomputed
twice is two nodes. fx code generation frees every value right after its last
use, and :func:`solvers.schedule_from_order` frees at the same points, so the
order *is* the memory plan and :func:`solvers.simulate` predicts it.

NOTE: [Boxed calling convention] AOTAutograd passes the saved tensors to the
backward in a list. With a plain ``gm.forward(*args)`` call that list (and the
autograd context) would pin every saved tensor until the backward returns. The
graphs use fx's ``_BoxedCodeGen``, whose generated code clears the argument
list after unpacking, and AOTAutograd clears the context's saved tensors before
calling the backward, so each saved tensor dies at its last use.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch._functorch.partitioners import _extract_fwd_bwd_modules

from solvers import Schedule

from .lower import Lowered


@dataclass(frozen=True)
class GeneratedModules:
    """The forward and backward graph modules and the joint nodes saved between them."""

    forward: fx.GraphModule
    backward: fx.GraphModule
    saved: tuple[str, ...]
    recomputed_ops: tuple[str, ...]


def saved_value_nodes(lowered: Lowered, schedule: Schedule) -> list[fx.Node]:
    """Joint nodes alive after the forward phase and read by the backward before any recompute."""
    graph = lowered.graph
    from_forward: set[int] = set(graph.resident_values)
    for index in schedule.computes("forward"):
        from_forward.update(graph.ops[index].outputs)
    saved: dict[int, None] = {}
    for index in schedule.computes("backward"):
        op = graph.ops[index]
        for v in op.inputs:
            if v in from_forward:
                saved[v] = None
        from_forward.difference_update(op.outputs)  # later reads see the recomputed instance
    nodes = []
    for v in saved:
        node = lowered.value_nodes[v]
        assert node is not None, f"saved value {graph.values[v].name} has no fx node"
        nodes.append(node)
    return nodes


def generate_modules(joint: fx.GraphModule, lowered: Lowered, schedule: Schedule) -> GeneratedModules:
    """Build the forward/backward GraphModules for ``schedule`` (AOTAutograd conventions)."""
    saved = saved_value_nodes(lowered, schedule)
    requested = [n.name for n in saved]
    # AOTAutograd's own extraction fixes the calling convention (the order of
    # saved values, placeholders, output descriptors); we then rebuild both
    # bodies in schedule order.
    fw_template, bw_template = _extract_fwd_bwd_modules(
        joint, saved, [], num_fwd_outputs=lowered.num_fwd_outputs
    )
    if sorted(n.name for n in saved) != sorted(requested):
        raise AssertionError(
            "AOTAutograd dropped saved values the schedule reads: "
            f"{sorted(set(requested) - {n.name for n in saved})}"
        )
    forward = _rebuild(joint, fw_template, lowered, schedule.computes("forward"), "forward")
    backward = _rebuild(joint, bw_template, lowered, schedule.computes("backward"), "backward")
    fw_ops = set(schedule.computes("forward"))
    recomputed = tuple(
        lowered.graph.ops[i].name
        for i in schedule.computes("backward")
        if not lowered.graph.ops[i].is_backward and i in fw_ops
    )
    return GeneratedModules(forward, backward, tuple(n.name for n in saved), recomputed)


def _rebuild(
    joint: fx.GraphModule,
    template: fx.GraphModule,
    lowered: Lowered,
    op_order: tuple[int, ...],
    phase: str,
) -> fx.GraphModule:
    """A graph with ``template``'s placeholders and output, and ``op_order`` as body."""
    joint_nodes = {n.name: n for n in joint.graph.nodes}
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for placeholder in template.graph.find_nodes(op="placeholder"):
        new = graph.node_copy(placeholder)
        env[joint_nodes[placeholder.name]] = new
    for index in op_order:
        node = lowered.op_nodes[index]
        if node.op == "placeholder":
            assert node in env, f"{phase}: input {node.name} is not a placeholder of the template"
            continue
        try:
            new = graph.node_copy(node, lambda a: env[a])
        except KeyError as missing:
            raise AssertionError(
                f"{phase}: {node.name} reads {missing.args[0]}, which the schedule has not computed"
            ) from None
        env[node] = new
        for user in node.users:
            if user.target is operator.getitem:
                env[user] = graph.node_copy(user, lambda a: env[a])
    template_output = next(iter(template.graph.find_nodes(op="output")))
    joint_by_template = {n: joint_nodes[n.name] for n in template.graph.nodes if n.name in joint_nodes}
    graph.node_copy(template_output, lambda a: env[joint_by_template[a]])
    graph.set_codegen(torch.fx.graph._BoxedCodeGen())
    graph.lint()
    module = fx.GraphModule(joint, graph)
    return module
