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

try:  # output descriptors (torch >= 2.9); without them the output carries no "desc" meta
    from torch._functorch._aot_autograd.descriptors import SavedForBackwardsAOTOutput
except ImportError:  # pragma: no cover
    SavedForBackwardsAOTOutput = None  # type: ignore[assignment, misc]

from solvers import PlannerError, Schedule

from .rng import DRAW_OP, REPLAY_OP, first_draw_is_adjacent
from .lower import Lowered, is_tangent


_BATCH_NORM_FUNCTIONAL = torch.ops.aten._native_batch_norm_legit_functional.default
_BATCH_NORM_NO_STATS = torch.ops.aten._native_batch_norm_legit.no_stats


def _recompute_batch_norm(graph: fx.Graph, node: fx.Node, env: dict[fx.Node, fx.Node]) -> fx.Node:
    """Recompute a training-mode BatchNorm without touching its running statistics.

    NOTE: [BatchNorm recompute] The functional op reads the running-stat
    buffers, which AOTAutograd's runtime overwrites with the updated values
    right after the forward. A backward recompute reading them would see the
    new values, and autograd rejects it (version counter). In training mode
    the normalized output and the saved batch statistics do not depend on
    the running statistics, so the stats-free overload computes them with
    the same kernel; the updated statistics are forward outputs, kept anyway,
    and the backward kernel ignores them in training mode.
    """
    x, weight, bias, _running_mean, _running_var, training, momentum, eps = node.args
    assert training is True, "eval-mode BatchNorm is _native_batch_norm_legit_no_training"
    new = graph.call_function(
        _BATCH_NORM_NO_STATS, (env[x], env[weight] if weight is not None else None,
                               env[bias] if bias is not None else None, True, momentum, eps)
    )
    new.meta = dict(node.meta)
    new.meta["val"] = node.meta["val"][:3]
    return new


def _first_draws(order: list[fx.Node], phase: str) -> list[int]:
    """Positions in ``order`` of the first computation of each replayed dropout (NOTE: [Replayed dropout]).

    Raises:
        PlannerError: the first computation is not in the forward right after
            its state with nothing drawing from the RNG between (a schedule
            the draw would give another mask than eager's).
    """
    seen: set[fx.Node] = set()
    positions = []
    for position, node in enumerate(order):
        if node.target is not REPLAY_OP or node in seen:
            continue
        seen.add(node)
        if phase == "forward" and first_draw_is_adjacent(order, position):
            positions.append(position)
        elif phase == "forward":
            raise PlannerError(
                f"the schedule draws dropout mask %{node.name} after another random op ran since its "
                "RNG state was saved (NOTE: [Replayed dropout]): it would not be eager's mask"
            )
    return positions


def _first_draw(graph: fx.Graph, node: fx.Node, env: dict[fx.Node, fx.Node]) -> fx.Node:
    """``draw_dropout(input, p)`` for ``replay_dropout(state, input, p)``: the same mask, from the global RNG."""
    _state, x, p = node.args
    new = graph.call_function(DRAW_OP, (env[x], p))
    new.meta = dict(node.meta)
    return new


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
        skipped = _running_stat_values(lowered, index)
        for v in op.inputs:
            if v in from_forward and v not in skipped:
                saved[v] = None
        from_forward.difference_update(op.outputs)  # later reads see the recomputed instance
    nodes = []
    for v in saved:
        node = lowered.value_nodes[v]
        assert node is not None, f"saved value {graph.values[v].name} has no fx node"
        nodes.append(node)
    return nodes


def _running_stat_values(lowered: Lowered, op_index: int) -> set[int]:
    """Values a backward recompute of BatchNorm does not read (NOTE: [BatchNorm recompute])."""
    node = lowered.op_nodes[op_index]
    if node.target is not _BATCH_NORM_FUNCTIONAL:
        return set()
    stats = {a for a in node.args[3:5] if isinstance(a, fx.Node)}
    return {v for v, n in enumerate(lowered.value_nodes) if n in stats}


def generate_modules(joint: fx.GraphModule, lowered: Lowered, schedule: Schedule) -> GeneratedModules:
    """Build the forward/backward GraphModules for ``schedule`` (AOTAutograd conventions)."""
    forward_ops = set(schedule.computes("forward"))
    for index, node in enumerate(lowered.op_nodes):
        if node.target is REPLAY_OP and index not in forward_ops:
            # Its first draw must advance the RNG where eager's dropout does (NOTE: [Replayed dropout]).
            raise PlannerError(f"the schedule first draws dropout mask %{node.name} in the backward")
    saved = saved_value_nodes(lowered, schedule)
    requested = {n.name for n in saved}
    # AOTAutograd's own extraction fixes the calling convention (the order of
    # saved values, placeholders, output descriptors); we then rebuild both
    # bodies in schedule order. Its throwaway backward body follows the joint
    # graph, so it may need values our backward does not read (the running
    # statistics of a recomputed BatchNorm): pass them for the extraction,
    # then drop them from both templates.
    template_only = [n for n in _template_only_values(lowered, schedule) if n.name not in requested]
    template_saved = [*saved, *template_only]
    fw_template, bw_template = _extract_fwd_bwd_modules(
        joint, template_saved, [], num_fwd_outputs=lowered.num_fwd_outputs
    )
    # The extraction drops saved values its own backward does not read: a parameter that
    # only a recomputed forward op reads in our backward (a BatchNorm's bias). They go
    # back in after the values it kept, in both modules.
    kept_names = {n.name for n in template_saved}
    extra = [n for n in saved if n.name not in kept_names]
    saved_names = [n.name for n in template_saved]
    drop = {n.name for n in template_only}
    forward = _rebuild(joint, fw_template, lowered, schedule.computes("forward"), "forward", drop,
                       extra, saved_names)
    backward = _rebuild(joint, bw_template, lowered, schedule.computes("backward"), "backward", drop,
                        extra, saved_names)
    fw_ops = set(schedule.computes("forward"))
    recomputed = tuple(
        lowered.graph.ops[i].name
        for i in schedule.computes("backward")
        if not lowered.graph.ops[i].is_backward and i in fw_ops
    )
    kept = tuple(n.name for n in [*template_saved, *extra] if n.name not in drop)
    return GeneratedModules(forward, backward, kept, recomputed)


def _template_only_values(lowered: Lowered, schedule: Schedule) -> list[fx.Node]:
    nodes: dict[fx.Node, None] = {}
    for index in schedule.computes("backward"):
        for v in sorted(_running_stat_values(lowered, index)):
            node = lowered.value_nodes[v]
            if node is not None:
                nodes[node] = None
    return list(nodes)


def _rebuild(
    joint: fx.GraphModule,
    template: fx.GraphModule,
    lowered: Lowered,
    op_order: tuple[int, ...],
    phase: str,
    drop: set[str],
    extra: list[fx.Node],
    saved_names: list[str],
) -> fx.GraphModule:
    """A graph with ``template``'s placeholders and output, and ``op_order`` as body.

    Saved values named in ``drop`` are removed from the forward's outputs and
    the backward's placeholders; the joint nodes in ``extra`` are added after
    the template's saved values ``saved_names`` (forward outputs, backward placeholders).
    """
    joint_nodes = {n.name: n for n in joint.graph.nodes}
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    placeholders = list(template.graph.find_nodes(op="placeholder"))
    if phase == "backward" and extra:  # AOTAutograd's backward reads (symints, saved values, tangents...)
        kept_saved = [i for i, p in enumerate(placeholders) if p.name in set(saved_names)]
        at = kept_saved[-1] + 1 if kept_saved else next(i for i, p in enumerate(placeholders) if is_tangent(p))
        placeholders[at:at] = extra
    for placeholder in placeholders:
        if phase == "backward" and placeholder.name in drop:
            continue
        new = graph.placeholder(placeholder.name) if placeholder in extra else graph.node_copy(placeholder)
        if placeholder in extra:
            new.meta.update(placeholder.meta)
        env[joint_nodes[placeholder.name]] = new
    # Tensor constants (``get_attr``: ``torch.tensor(...)`` in the forward, as in
    # Hugging Face GPT-2) are resident module attributes: each graph reads its own.
    for index in op_order:
        for arg in lowered.op_nodes[index].all_input_nodes:
            if arg.op == "get_attr" and arg not in env:
                env[arg] = graph.node_copy(arg)
    order = [lowered.op_nodes[index] for index in op_order]
    drawn = set(_first_draws(order, phase))
    for position, index in enumerate(op_order):
        node = lowered.op_nodes[index]
        if node.op == "placeholder":
            assert node in env, f"{phase}: input {node.name} is not a placeholder of the template"
            continue
        try:
            if phase == "backward" and node.target is _BATCH_NORM_FUNCTIONAL:
                new = _recompute_batch_norm(graph, node, env)
            elif position in drawn:
                new = _first_draw(graph, node, env)
            else:
                new = graph.node_copy(node, lambda a: env[a])
        except KeyError as missing:
            raise AssertionError(
                f"{phase}: {node.name} reads {missing.args[0]}, which the schedule has not computed"
            ) from None
        env[node] = new
        for user in node.users:
            if user.target is operator.getitem:
                if new.target is _BATCH_NORM_NO_STATS and user.args[1] >= 3:
                    # Updated running statistics: the backward kernel reads them only
                    # in eval mode (it is ``Tensor?``); in training mode it uses the
                    # saved batch statistics. See NOTE: [BatchNorm recompute].
                    env[user] = None  # type: ignore[assignment]
                    continue
                env[user] = graph.node_copy(user, lambda a: env[a])
    template_output = next(iter(template.graph.find_nodes(op="output")))
    joint_by_template = {n: joint_nodes[n.name] for n in template.graph.nodes if n.name in joint_nodes}
    output = graph.node_copy(template_output, lambda a: env[joint_by_template[a]])
    if drop and phase == "forward":
        outputs = list(output.args[0])
        keep = [
            i for i, a in enumerate(template_output.args[0])
            if i < lowered.num_fwd_outputs or not (isinstance(a, fx.Node) and a.name in drop)
        ]
        output.args = (type(output.args[0])(outputs[i] for i in keep),)
        desc = output.meta.get("desc")
        if isinstance(desc, (list, tuple)) and len(desc) == len(outputs):
            output.meta["desc"] = [desc[i] for i in keep]
    if extra and phase == "forward":
        _insert_saved_outputs(output, [env[n] for n in extra], lowered.num_fwd_outputs + len(set(saved_names) - drop))
    graph.set_codegen(torch.fx.graph._BoxedCodeGen())
    graph.lint()
    module = fx.GraphModule(joint, graph)
    return module


def _insert_saved_outputs(output: fx.Node, nodes: list[fx.Node], position: int) -> None:
    """Insert saved values into the forward's output at ``position``, renumbering the descriptors."""
    values = list(output.args[0])
    values[position:position] = nodes
    output.args = (type(output.args[0])(values),)
    desc = output.meta.get("desc")
    if SavedForBackwardsAOTOutput is not None and isinstance(desc, (list, tuple)) and len(desc) + len(nodes) == len(values):
        descs = list(desc)
        descs[position:position] = [None] * len(nodes)
        saved = 0
        for i, d in enumerate(descs):
            if d is None or type(d).__name__.startswith("SavedForBackwards"):
                descs[i] = SavedForBackwardsAOTOutput(saved) if d is None else type(d)(saved)
                saved += 1
        output.meta["desc"] = descs
