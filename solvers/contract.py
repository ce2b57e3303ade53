"""Fold view ops into the op that makes their storage, so the MILP sees fewer ops.

A captured aten graph is about half views (``view``, ``t``, ``transpose``,
``expand``, ``getitem`` of a split...): they allocate nothing, take no time
worth modelling, and only extend the life of the storage they alias.
Checkmate's MILP has a variable per (stage, op) pair, so every op costs a
stage *and* a column in every other stage: folding views into their storage's
maker halves a transformer block's ops and cuts a block solve from seconds to
tenths of a second.

A view op is folded into the contracted op that made every value it reads,
when both are in the same phase. Its outputs become that op's storage (the
readers of a view read the storage instead): nothing is lost, because a view
can only be kept while its storage is kept, and it costs no bytes of its own.
Expanding a contracted order runs each folded view right after its maker, so
:func:`~solvers.schedule.schedule_from_order` on the original graph frees
every storage no later than the contracted model counted.

A forward view op that makes a ``required_at_end`` value is not folded: when
its maker is recomputed in the backward for a reader of the storage, the
extraction drops the view's dead recomputation
(:func:`~solvers.schedule.without_dead_recomputations`) and the forward's
instance of the view, kept to the end, pins the forward's storage, which the
contracted model would count as released. Left separate, the view ties its
base's lifetime in the MILP (a kept view keeps its base).

Example:
    >>> c = contract_views(graph)                                   # doctest: +SKIP
    >>> c.graph.num_ops < graph.num_ops                              # doctest: +SKIP
    True
    >>> c.expand([0, 3])                                             # doctest: +SKIP
    [0, 1, 2, 5]
"""

from __future__ import annotations

from dataclasses import dataclass

from .graph import Graph, Op, Value


@dataclass(frozen=True, slots=True)
class Contraction:
    """A graph with its view ops folded, and the way back.

    Attributes:
        graph: the contracted graph.
        members: per contracted op, the original ops it stands for, in graph order.
        value_of: per original value, the contracted value standing for it.
    """

    graph: Graph
    members: tuple[tuple[int, ...], ...]
    value_of: tuple[int, ...]

    def expand(self, order: list[int] | tuple[int, ...]) -> list[int]:
        """A compute order of the contracted graph as one of the original graph."""
        return [k for c in order for k in self.members[c]]


def _is_view_op(graph: Graph, op: Op) -> bool:
    return bool(op.outputs) and not op.is_input and all(graph.values[v].view_of is not None for v in op.outputs)


def contract_views(graph: Graph) -> Contraction:
    """Fold every foldable view op of ``graph`` (see the module docstring)."""
    values = graph.values
    new_values: list[Value] = []
    value_of: list[int] = [-1] * len(values)
    members: list[list[int]] = []
    new_ops: list[Op] = []

    def new_value(v: int, producer: int | None, view_of: int | None) -> int:
        value_of[v] = len(new_values)
        original = values[v]
        new_values.append(Value(original.name, original.bytes, producer, view_of))
        return value_of[v]

    for v, value in enumerate(values):  # residents and graph inputs keep their place first
        if value.producer is None:
            new_value(v, None, None)
    required = set(graph.required_at_end)
    for i, op in enumerate(graph.ops):
        makers = {new_values[value_of[v]].producer for v in op.inputs}
        held_to_end = not op.is_backward and not required.isdisjoint(op.outputs)  # see the docstring
        if _is_view_op(graph, op) and len(makers) == 1 and not held_to_end:
            c = makers.pop()
            if c is not None and new_ops[c].is_backward == op.is_backward and not new_ops[c].is_input:
                for w in op.outputs:  # the view is its storage in the contracted graph
                    value_of[w] = value_of[values[w].view_of]  # type: ignore[index]
                members[c].append(i)
                held = new_ops[c]
                new_ops[c] = Op(held.name, held.inputs, held.outputs, held.time_ms + op.time_ms,
                                max(held.workspace_bytes, op.workspace_bytes), held.is_backward,
                                held.recomputable, held.is_input)
                continue
        c = len(new_ops)
        inputs = tuple(dict.fromkeys(value_of[v] for v in op.inputs))
        outputs = tuple(new_value(w, c, None if values[w].view_of is None else value_of[values[w].view_of])
                        for w in op.outputs)
        new_ops.append(Op(op.name, inputs, outputs, op.time_ms, op.workspace_bytes, op.is_backward,
                          op.recomputable, op.is_input))
        members.append([i])
    contracted = Graph(
        tuple(new_ops), tuple(new_values),
        tuple(dict.fromkeys(value_of[v] for v in graph.forward_outputs)),
        tuple(dict.fromkeys(value_of[v] for v in graph.required_at_end)),
    )
    return Contraction(contracted, tuple(tuple(m) for m in members), tuple(value_of))
