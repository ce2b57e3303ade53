"""One block of a chain as a standalone :class:`Graph`, and its canonical key.

The block graph is what the block's ILP schedules. Its boundary with the rest
of the chain becomes ordinary IR:

- the block input (the previous cut value) is made by a synthetic forward op
  ``<input>`` (no inputs, not recomputable, 0 ms) so the block's own memory
  count holds it until its last use;
- each gradient made by the next block and read here is made by a synthetic
  input op (``is_input``), so it is allocated when the block's backward
  starts, freed after its last use, and it comes first in the backward;
- held gradients (see :mod:`solvers.partition`) are resident here: the chain
  keeps them alive;
- forward outputs: the block output plus the graph's forward outputs made
  here; required at the end: gradients the previous block reads, held values
  made here, and the graph's end values made here.

Blocks with equal keys (same ops, sizes, costs and wiring up to renaming) have
interchangeable schedules; the key is a hash of the numbers only.

Example:
    >>> bg = build_block_graph(chain, 3)                          # doctest: +SKIP
    >>> bg.graph.num_ops, bg.input_bytes, bg.key[:8]              # doctest: +SKIP
    (41, 6291456, '3f2a9c1e')
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from .graph import Graph, Op, Value
from .partition import Chain, storage_bytes


@dataclass(frozen=True, slots=True)
class BlockGraph:
    """A block as a standalone graph plus what the chain DP needs to know about it.

    Attributes:
        graph: the block's graph (local indices).
        op_map: per local op, the graph op it stands for (-1 for synthetic ops).
        forward_only: local ops (in order) that make the block output and the
            forward outputs, for runs that keep nothing (chain checkpointing).
        input_bytes: bytes of the block input (0 for the first block).
        grad_in_bytes: bytes of the gradients the next block hands over.
        persist_bytes: bytes of values made here that live to the end of the
            step (end values, held gradients), not counting the gradients
            handed to the previous block.
        output_local: local index of the block output value (None in the last block).
        key: canonical hash of the graph's numbers.
    """

    graph: Graph
    op_map: tuple[int, ...]
    forward_only: tuple[int, ...]
    input_bytes: int
    grad_in_bytes: int
    persist_bytes: int
    output_local: int | None
    key: str


def build_block_graph(chain: Chain, index: int) -> BlockGraph:
    """The block ``index`` of ``chain`` as a standalone graph (see the module docstring)."""
    graph, block = chain.graph, chain.blocks[index]
    g_values, g_ops = graph.values, graph.ops
    local: dict[int, int] = {}
    values: list[Value] = []
    ops: list[Op] = []
    op_map: list[int] = []

    def add_value(v: int, n_bytes: int, producer: int | None, view_of: int | None = None) -> int:
        local[v] = len(values)
        values.append(Value(g_values[v].name, n_bytes, producer, view_of))
        return local[v]

    def add_synthetic(name: str, v: int, is_backward: bool) -> None:
        out = add_value(v, storage_bytes(graph, v), len(ops))
        ops.append(Op(name, (), (out,), 0.0, 0, is_backward, False, is_backward))
        op_map.append(-1)

    members = (*block.forward_ops, *block.backward_ops)
    for k in members:
        for v in g_ops[k].inputs:
            if v not in local and (g_values[v].producer is None or v in block.held_inputs):
                add_value(v, 0, None)
    if block.input_value is not None:
        add_synthetic("<input>", block.input_value, is_backward=False)
    inputs_first = [k for k in block.backward_ops if g_ops[k].is_input]
    rest = [k for k in block.backward_ops if not g_ops[k].is_input]
    for position, k in enumerate([*block.forward_ops, *inputs_first, *rest]):
        if position == len(block.forward_ops):
            for v in block.grad_inputs:  # input ops: first in the backward, graph inputs after
                add_synthetic("<grad>", v, is_backward=True)
        op = g_ops[k]
        outs = []
        for v in op.outputs:
            base = g_values[v].view_of
            outs.append(add_value(v, g_values[v].bytes, len(ops), None if base is None else local[base]))
        ops.append(Op(op.name, tuple(local[v] for v in op.inputs), tuple(outs), op.time_ms,
                      op.workspace_bytes, op.is_backward, op.recomputable, op.is_input))
        op_map.append(k)
    made = {v for k in members for v in g_ops[k].outputs}
    forward_outputs = sorted(
        local[v] for v in {*graph.forward_outputs, *([block.output_value] if block.output_value is not None else [])}
        if v in made)
    reads_below = _values_read_below(chain, index)
    required = sorted(local[v] for v in {*graph.required_at_end, *reads_below} if v in made)
    local_graph = Graph(tuple(ops), tuple(values), tuple(forward_outputs), tuple(required))
    grad_outs = {local[v] for v in reads_below if v in made and v in _grad_inputs_of(chain, index - 1)}
    grad_out_roots = {local_graph.storage_root(v) for v in grad_outs}
    persist = sum(local_graph.allocated_bytes(r) for r in sorted({local_graph.storage_root(v) for v in required})
                  if r not in grad_out_roots)
    return BlockGraph(
        graph=local_graph,
        op_map=tuple(op_map),
        forward_only=_forward_only(local_graph, block.input_value is not None),
        input_bytes=0 if block.input_value is None else storage_bytes(graph, block.input_value),
        grad_in_bytes=sum(storage_bytes(graph, v) for v in block.grad_inputs),
        persist_bytes=persist,
        output_local=None if block.output_value is None else local[block.output_value],
        key=graph_key(local_graph),
    )


def _grad_inputs_of(chain: Chain, index: int) -> set[int]:
    return set(chain.blocks[index].grad_inputs) if index >= 0 else set()


def _values_read_below(chain: Chain, index: int) -> set[int]:
    """Values made by block ``index`` that earlier blocks read (gradients and held values)."""
    result: set[int] = set()
    for b in range(index):
        result.update(chain.blocks[b].grad_inputs)
        result.update(chain.blocks[b].held_inputs)
    return result


def _forward_only(graph: Graph, has_input: bool) -> tuple[int, ...]:
    """Forward ops the forward outputs depend on, in order, and the block input's op (op 0)."""
    needed: set[int] = set()
    if has_input:
        needed.add(0)
    stack = [graph.values[v].producer for v in graph.forward_outputs]
    while stack:
        p = stack.pop()
        if p is None or p in needed:
            continue
        needed.add(p)
        stack.extend(graph.values[v].producer for v in graph.ops[p].inputs)
    return tuple(sorted(needed))


def graph_key(graph: Graph) -> str:
    """Hash of a graph's numbers and wiring (names excluded)."""
    parts = [
        tuple((op.inputs, op.outputs, op.time_ms, op.workspace_bytes, op.is_backward, op.recomputable, op.is_input)
              for op in graph.ops),
        tuple((v.bytes if v.producer is not None else 0, v.producer, v.view_of) for v in graph.values),
        graph.forward_outputs,
        graph.required_at_end,
    ]
    return hashlib.sha256(repr(parts).encode()).hexdigest()
