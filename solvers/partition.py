"""Cut a training graph into a chain of blocks (Rockmate's sequence of blocks).

The forward dataflow is cut at *cut values*: single values through which
every path from the sources to the forward outputs passes (a transformer's
residual stream between layers, ResNet's stage outputs). They are the
dominators of the loss in the dataflow graph of activations (networkx
``immediate_dominators``; the forward output with the longest dominator
chain: other outputs, such as BatchNorm's new running statistics, branch off
inside blocks). Block ``b`` holds the forward ops between
cut ``b-1`` (its *input*) and cut ``b`` (its *output*).

NOTE: [Replicated values] Parameters are resident and ignored, but ops that
read only residents (``t(W)`` before an ``mm``, a causal mask, position ids)
would otherwise look like sources feeding every layer and leave no cut.
Values computed from residents by a few cheap, recomputable ops
(:data:`REPLICATE_MAX_OPS`, :data:`REPLICATE_MAX_TIME_FRACTION` of the forward
time) are left out of the dataflow. Afterwards, one that allocates and is
read by two neighbouring blocks and by no other candidate (the token embedding: data, not a
parameter, though the IR cannot tell) goes back into the dataflow and the
cuts are recomputed; one read by a single block joins it; the others (a mask
read by every layer, views of tied weights) are *replicated*: every block
that reads one recomputes it inside its own schedule. That is safe for
memory: whichever block's instance is live, the block holding it counts it.

Backward ops join blocks by dataflow: an op reading an internal forward value
of block ``b`` belongs to ``b``; the others (gradient sums, activation
backward that reads only a block output) go to the block of their gradient
inputs. Two placement rules are tried (gradient windows, as early in the
backward as possible; and the lowest block among the gradient producers),
and the chain whose largest block is smallest is kept. A block's backward may read its
own forward values, its input and output, gradients made by the next block,
and *held* gradients: backward values made further down the chain or kept to
the end (parameter-gradient partial sums of tied weights), which the chain
keeps alive until the step ends. Any other read across blocks merges the
blocks it spans, so graphs without cuts (U-Net's long skips) become one block.

Example:
    >>> chain = partition_chain(graph)                           # doctest: +SKIP
    >>> [len(b.forward_ops) for b in chain.blocks]               # doctest: +SKIP
    [9, 12, 12, 12, 4]
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import networkx as nx

from .graph import Graph

#: Largest ancestor closure (ops) of a replicated value.
REPLICATE_MAX_OPS = 64
#: Largest time of a replicated value's closure, as a fraction of the forward time.
REPLICATE_MAX_TIME_FRACTION = 0.02


@dataclass(frozen=True, slots=True)
class Block:
    """One block of the chain (graph op indices, graph order).

    Attributes:
        forward_ops: forward ops of the block, replicated ops included.
        backward_ops: backward ops of the block.
        input_value: the cut value the block reads (None for the first block).
        output_value: the cut value the block makes (None for the last block).
        grad_inputs: backward values made by the next block and read here.
        held_inputs: backward values made further down the chain (or kept to
            the end) and read here; the chain keeps them alive.
        has_single_run_ops: the block holds a non-recomputable forward op, so
            its forward can run only once (no checkpointing through it).
    """

    forward_ops: tuple[int, ...]
    backward_ops: tuple[int, ...]
    input_value: int | None
    output_value: int | None
    grad_inputs: tuple[int, ...]
    held_inputs: tuple[int, ...]
    has_single_run_ops: bool


@dataclass(frozen=True, slots=True)
class Chain:
    """A graph cut into blocks.

    Attributes:
        graph: the partitioned graph.
        blocks: the blocks, first to last.
        replicated_ops: ops recomputed inside every block that reads their outputs.
        static_bytes: bytes the chain counts as held for the whole step
            (forward outputs made before the last block: they live to the end
            of the forward phase, past the blocks that made them).
    """

    graph: Graph
    blocks: tuple[Block, ...]
    replicated_ops: tuple[int, ...]
    static_bytes: int

    def describe(self) -> str:
        """One line per block: ``block 3: 12 fwd + 20 bwd ops, in h2 [4.00 MiB] -> out h3``."""
        from .errors import format_bytes

        names = self.graph.values
        lines = []
        for b, block in enumerate(self.blocks):
            x = "-" if block.input_value is None else names[block.input_value].name
            y = "-" if block.output_value is None else names[block.output_value].name
            size = 0 if block.input_value is None else storage_bytes(self.graph, block.input_value)
            lines.append(f"block {b}: {len(block.forward_ops)} fwd + {len(block.backward_ops)} bwd ops, "
                         f"in {x} [{format_bytes(size)}] -> out {y}")
        return "\n".join(lines)


def storage_bytes(graph: Graph, value: int) -> int:
    """Bytes of the storage ``value`` lives on (its root's), 0 when resident."""
    return graph.allocated_bytes(graph.storage_root(value))


def replicable_ops(graph: Graph) -> set[int]:
    """Forward ops cheap enough to recompute in every block that reads them.

    See NOTE: [Replicated values]; the ones whose readers all fall in one
    block are then simply ops of that block.
    """
    ops = graph.ops
    forward_ms = sum(op.time_ms for op in ops if not op.is_backward)
    # Ops making forward outputs or end values stay in one block (their lifetime is global).
    pinned = {graph.values[v].producer for v in (*graph.forward_outputs, *graph.required_at_end)}
    limit_ms = REPLICATE_MAX_TIME_FRACTION * forward_ms
    closure: dict[int, frozenset[int]] = {}
    result: set[int] = set()
    for i, op in enumerate(ops):
        if op.is_backward or not op.recomputable or i in pinned:
            continue
        parents = {graph.values[v].producer for v in op.inputs} - {None}
        if not parents <= result:
            continue
        members = frozenset({i}).union(*(closure[p] for p in parents))  # type: ignore[index]
        if len(members) <= REPLICATE_MAX_OPS and sum(ops[m].time_ms for m in members) <= limit_ms:
            closure[i] = members
            result.add(i)
    return result


def find_cut_values(graph: Graph, replicated: set[int]) -> list[int]:
    """Values every source-to-output path of the forward dataflow passes through, in order."""
    values, ops = graph.values, graph.ops
    dag = nx.DiGraph()
    source, sink = ("source",), ("sink",)
    dag.add_node(source)
    for i, op in enumerate(ops):
        if op.is_backward or i in replicated:
            continue
        reads = [v for v in op.inputs if values[v].producer is not None and values[v].producer not in replicated]
        for w in op.outputs:
            dag.add_node(w)
            if not reads:
                dag.add_edge(source, w)
            for v in reads:
                dag.add_edge(v, w)
    outputs = [v for v in graph.forward_outputs if v in dag]
    if not outputs:
        return []
    dominators = nx.immediate_dominators(dag, source)
    # The cuts of the output with the longest dominator chain (the loss): the other forward
    # outputs (BatchNorm's new running statistics, an auxiliary head) branch off inside blocks.
    cuts: list[int] = []
    for output in outputs:
        chain = [output]
        while chain[-1] != source:
            chain.append(dominators[chain[-1]])
        if len(chain) - 2 > len(cuts):
            cuts = chain[1:-1]
    return sorted(cuts, key=lambda v: values[v].producer)  # type: ignore[arg-type, return-value]


def partition_chain(graph: Graph, *, min_block_ops: int = 1, max_blocks: int | None = None) -> Chain:
    """Cut ``graph`` into a chain of blocks (see the module docstring).

    Args:
        graph: the training graph.
        min_block_ops: merge neighbouring blocks, left to right, until each
            holds at least this many ops (forward and backward). Tiny blocks
            hide recomputation from the block solver: a block input cannot be
            recomputed from the block before, so a 1-op block pins its output.
            Periodic chains stay periodic (identical blocks stay identical).
        max_blocks: coarsen further (doubling ``min_block_ops``) until at most
            this many blocks remain; None for no limit.
    """
    # Two ways of placing backward ops; each can leave reads that merge blocks where the
    # other does not (a residual stream's gradient sums, a ReLU block's backward), so both
    # are tried and the chain whose largest block is smallest wins.
    best: tuple[int, int, list[int], dict[int, int], set[int], set[int], str] | None = None
    for rule in ("windows", "lowest"):
        cuts, candidates, block_of, replicated = _cut(graph, rule)
        largest = max(Counter(block_of.values()).values(), default=0)
        if best is None or (largest, -len(cuts)) < best[:2]:
            best = (largest, -len(cuts), cuts, block_of, replicated, candidates, rule)
    assert best is not None
    _, _, cuts, block_of, replicated, candidates, rule = best
    target = max(1, min_block_ops)
    while True:
        coarse = _coarsen(cuts, block_of, target)
        if max_blocks is None or len(coarse) + 1 <= max_blocks or not coarse:
            break
        target *= 2
    if coarse != cuts:
        cuts = coarse
        block_of, replicated, violations = _assign(graph, candidates, cuts, rule)
        assert not violations, "merging neighbouring blocks cannot create forbidden reads"
    return _build_chain(graph, replicated, cuts, block_of)


def _cut(graph: Graph, rule: str) -> tuple[list[int], set[int], dict[int, int], set[int]]:
    """Cuts, replication candidates, block of every op and replicated ops, with backward ops placed by ``rule``."""
    candidates = replicable_ops(graph)
    outputs = set(graph.forward_outputs)
    while True:
        cuts = [c for c in find_cut_values(graph, candidates) if c not in outputs]
        while True:
            block_of, replicated, violations = _assign(graph, candidates, cuts, rule)
            if not violations:
                break
            cuts = _merge(cuts, violations)
        local = _local_activations(graph, candidates, block_of)
        if not local:
            return cuts, candidates, block_of, replicated
        candidates -= local  # back into the dataflow: they may be cuts themselves (the embedding)


def _local_activations(graph: Graph, candidates: set[int], block_of: dict[int, int]) -> set[int]:
    """Replication candidates that allocate, are read by no other candidate, and by exactly two blocks.

    Replication is for values read all along the chain (a causal mask, tied
    weights' views); a cheap value read by two neighbouring blocks (the token
    embedding) is an activation: left out of the dataflow it would open a
    path around the cut between them, so it goes back in (it may be a cut
    itself). One read by a single block simply joins it, and one that other
    candidates read stays out: back in the dataflow it would pin them (a
    causal mask's chain of cheap ops) to its block. Views of residents
    allocate nothing and stay out: they would be sources feeding every layer.
    """
    allocates: dict[int, bool] = {}  # the op or a candidate it reads from allocates
    for i in sorted(candidates):
        parents = {graph.values[v].producer for v in graph.ops[i].inputs} - {None}
        allocates[i] = any(graph.allocated_bytes(v) for v in graph.ops[i].outputs) or any(
            p not in candidates or allocates[p] for p in parents)  # type: ignore[index]
    local = set()
    for i in sorted(candidates):
        if not allocates[i]:
            continue
        if any(u in candidates for v in graph.ops[i].outputs for u in graph.users(v)):
            continue  # other candidates read it: back in the dataflow it would pin them to one block
        readers = {block_of[u] for v in graph.ops[i].outputs for u in graph.users(v) if u in block_of}
        if len(readers) == 2:  # one reader: it joins that block; none: it goes where its readers go
            local.add(i)
    return local


def _coarsen(cuts: list[int], block_of: dict[int, int], min_ops: int) -> list[int]:
    """Keep a cut only once the blocks since the last kept cut hold ``min_ops`` ops."""
    if min_ops <= 1 or not cuts:
        return list(cuts)
    sizes = [0] * (len(cuts) + 1)
    for b in block_of.values():
        sizes[b] += 1
    kept: list[int] = []
    group = 0
    for j, cut in enumerate(cuts):
        group += sizes[j]
        if group >= min_ops:
            kept.append(cut)
            group = 0
    if kept and group + sizes[-1] < min_ops:
        kept.pop()  # the tail is too small: it joins the group before it
    return kept


def _assign(graph: Graph, candidates: set[int], cuts: list[int], rule: str
            ) -> tuple[dict[int, int], set[int], list[tuple[int, int]]]:
    """Block of every non-replicated op, the replicated ops, and the block pairs of forbidden reads."""
    ops, values = graph.ops, graph.values
    n_blocks = len(cuts) + 1
    cut_index = {c: j for j, c in enumerate(cuts)}  # cut j is the output of block j
    block_of: dict[int, int] = {}
    floating: list[int] = []
    for i, op in enumerate(ops):
        if op.is_backward or i in candidates:
            continue
        # A view of a cut that only the backward reads (a ReLU output's detach, saved for its
        # backward) stays with the block that made the cut; other readers of cut j are block j+1.
        saved_view = _saved_view(graph, i)
        after = [cut_index[v] + (not saved_view) if v in cut_index else block_of[values[v].producer]  # type: ignore[index]
                 for v in op.inputs if values[v].producer in block_of]
        if after:
            block_of[i] = max(after)
        elif _on_path(graph, i):
            block_of[i] = 0
        else:
            floating.append(i)
    replicated: set[int] = set()
    for i in sorted(candidates, reverse=True):  # a candidate read by one block joins it
        readers = {block_of.get(u, -1) for v in ops[i].outputs for u in graph.users(v)
                   if not ops[u].is_backward}
        if len(readers) == 1 and -1 not in readers:
            block_of[i] = readers.pop()
        else:
            replicated.add(i)
    place = _assign_backward_windows if rule == "windows" else _assign_backward_lowest
    place(graph, replicated, cut_index, block_of, n_blocks)
    for i in reversed(floating):  # sources off the forward-output paths: the first block reading them
        reading = [block_of[u] for v in ops[i].outputs for u in graph.users(v) if u in block_of]
        block_of[i] = min(reading) if reading else n_blocks - 1
    violations = []
    for k, op in enumerate(ops):
        if k not in block_of:
            continue
        b = block_of[k]
        for v in op.inputs:
            p = values[v].producer
            if p is None or p in replicated:
                continue
            a = block_of[p]
            if not _allowed(graph, k, v, a, b, cut_index):
                violations.append((min(a, b), max(a, b)))
    return block_of, replicated, sorted(set(violations))


def _saved_view(graph: Graph, op_index: int) -> bool:
    """A view op whose outputs only backward ops read, directly or through more views (``detach``)."""
    op = graph.ops[op_index]
    if not op.outputs or any(graph.values[w].view_of is None for w in op.outputs):
        return False
    return all(graph.ops[u].is_backward or _saved_view(graph, u) for w in op.outputs for u in graph.users(w))


def _on_path(graph: Graph, op_index: int) -> bool:
    """Whether a forward source op feeds a forward output (else it may float to its readers)."""
    seen, stack = set(), [op_index]
    outputs = set(graph.forward_outputs)
    while stack:
        i = stack.pop()
        if i in seen:
            continue
        seen.add(i)
        for v in graph.ops[i].outputs:
            if v in outputs:
                return True
            stack.extend(u for u in graph.users(v) if not graph.ops[u].is_backward)
    return False


def _assign_backward_windows(graph: Graph, replicated: set[int], cut_index: dict[int, int],
                     block_of: dict[int, int], n_blocks: int) -> None:
    """Backward ops: a window of blocks per op, narrowed until every gradient edge is legal.

    An op reading an internal forward value of block ``a`` is pinned to ``a``;
    reading cut ``j`` limits it to ``{j, j+1}``; input ops go to the last
    block. A gradient edge ``u -> w`` needs ``block(w) <= block(u) <= block(w) + 1``
    (held edges only ``block(w) <= block(u)``). The windows are narrowed to a
    fixpoint, then each op takes the latest block left (earliest in the
    backward), in graph order, narrowing again after each choice. Conflicts
    are left to the caller's check, which merges blocks.
    """
    ops, values = graph.ops, graph.values
    backward = [k for k, op in enumerate(ops) if op.is_backward]
    low = {k: 0 for k in backward}
    high = {k: n_blocks - 1 for k in backward}
    edges: list[tuple[int, int, bool]] = []  # (producer, reader, tight)
    required = set(graph.required_at_end)
    for k in backward:
        if ops[k].is_input:
            low[k] = high[k] = n_blocks - 1
            continue
        anchors = []
        for v in dict.fromkeys(ops[k].inputs):
            p = values[v].producer
            if p is None or p in replicated or p not in block_of and not ops[p].is_backward:
                continue
            if ops[p].is_backward:
                edges.append((p, k, not (v in required or _accumulates_end_value(graph, k))))
            elif v in cut_index:
                low[k], high[k] = max(low[k], cut_index[v]), min(high[k], cut_index[v] + 1)
            else:
                anchors.append(block_of[p])
        if anchors:
            low[k] = high[k] = max(anchors)
    readers: dict[int, list[tuple[int, bool]]] = {}
    producers: dict[int, list[tuple[int, bool]]] = {}
    for p, k, tight in edges:
        readers.setdefault(p, []).append((k, tight))
        producers.setdefault(k, []).append((p, tight))

    def narrow(start: list[int]) -> None:
        work = list(start)
        while work:
            a = work.pop()
            for b, tight in readers.get(a, ()):  # block(b) <= block(a) <= block(b) + 1
                new_high = min(high[b], high[a])
                new_low = max(low[b], low[a] - 1) if tight else low[b]
                if (new_low, new_high) != (low[b], high[b]) and new_low <= new_high:
                    low[b], high[b] = new_low, new_high
                    work.append(b)
            for b, tight in producers.get(a, ()):
                new_low = max(low[b], low[a])
                new_high = min(high[b], high[a] + 1) if tight else high[b]
                if (new_low, new_high) != (low[b], high[b]) and new_low <= new_high:
                    low[b], high[b] = new_low, new_high
                    work.append(b)

    narrow(backward)
    for k in backward:
        block_of[k] = high[k] if low[k] <= high[k] else low[k]
        low[k] = high[k] = block_of[k]
        narrow([k])


def _assign_backward_lowest(graph: Graph, replicated: set[int], cut_index: dict[int, int],
                     block_of: dict[int, int], n_blocks: int) -> None:
    """Backward ops, in graph order: the block of the forward values they read, else of their gradients.

    An op reading an internal forward value of block ``a`` is pinned to ``a``
    (the latest such block when it reads several); one reading cut ``j`` (the
    output of block ``j``) goes to ``j`` (a ReLU's backward reads its output). An op reading only gradients goes to the lowest
    block among their producers: gradients flow down the chain, so the sum of
    a gradient of block ``b + 1`` and one of block ``b`` (a residual stream's)
    is block ``b``'s work. Input ops (output gradients) go to the last block.
    Reads this leaves illegal are the caller's to check: it merges the blocks
    they span (the LM head's chain of one-view blocks, typically).
    """
    ops, values = graph.ops, graph.values
    for k, op in enumerate(ops):
        if not op.is_backward:
            continue
        anchors: list[int] = []
        cut_reads: list[int] = []
        gradients: list[int] = []
        for v in op.inputs:
            p = values[v].producer
            if p is None or p in replicated or p not in block_of:
                continue
            if ops[p].is_backward:
                gradients.append(block_of[p])
            elif v in cut_index:
                cut_reads.append(cut_index[v])
            else:
                anchors.append(block_of[p])
        if op.is_input or not (anchors or cut_reads or gradients):
            block_of[k] = n_blocks - 1
        else:
            block_of[k] = max(anchors) if anchors else min(cut_reads) if cut_reads else min(gradients)


def _allowed(graph: Graph, reader: int, value: int, a: int, b: int, cut_index: dict[int, int]) -> bool:
    """Whether op ``reader`` in block ``b`` may read ``value`` made in block ``a``."""
    producer_backward = graph.ops[graph.values[value].producer].is_backward  # type: ignore[index]
    if a == b:
        return True
    if not producer_backward:
        return value in cut_index and cut_index[value] == a and b == a + 1
    if not graph.ops[reader].is_backward or a < b:
        return False
    return a == b + 1 or _accumulates_end_value(graph, reader) or value in set(graph.required_at_end)


def _accumulates_end_value(graph: Graph, op_index: int) -> bool:
    """An op that only sums gradients into end values (a tied weight's gradient halves)."""
    op, values, ops = graph.ops[op_index], graph.values, graph.ops
    required = set(graph.required_at_end)
    reads_forward = any(values[v].producer is not None and not ops[values[v].producer].is_backward  # type: ignore[index]
                        for v in op.inputs)
    return not reads_forward and all(v in required for v in op.outputs)


def _merge(cuts: list[int], violations: list[tuple[int, int]]) -> list[int]:
    """Drop the cuts inside every violating block range (cut j separates blocks j and j+1)."""
    drop = {j for lo, hi in violations for j in range(lo, hi)}
    return [c for j, c in enumerate(cuts) if j not in drop]


def _build_chain(graph: Graph, replicated: set[int], cuts: list[int], block_of: dict[int, int]) -> Chain:
    ops, values = graph.ops, graph.values
    n_blocks = len(cuts) + 1
    forward: list[set[int]] = [set() for _ in range(n_blocks)]
    backward: list[list[int]] = [[] for _ in range(n_blocks)]
    grad_inputs: list[set[int]] = [set() for _ in range(n_blocks)]
    held_inputs: list[set[int]] = [set() for _ in range(n_blocks)]
    required = set(graph.required_at_end)
    for k, op in enumerate(ops):
        if k in replicated:
            continue
        b = block_of[k]
        if op.is_backward:
            backward[b].append(k)
        else:
            forward[b].add(k)
        for v in op.inputs:
            p = values[v].producer
            if p is None or p in replicated:
                continue
            a = block_of[p]
            if ops[p].is_backward and a != b:
                held = v in required or _read_far(graph, v, block_of, a)
                (held_inputs if held else grad_inputs)[b].add(v)
    for b in range(n_blocks):
        forward[b] |= _replicas_needed(graph, replicated, forward[b] | set(backward[b]))
    makers = {v: values[v].producer for v in graph.forward_outputs}
    roots = {graph.storage_root(v) for v, p in makers.items()
             if p is not None and p not in replicated and block_of[p] < n_blocks - 1}
    static = sum(graph.allocated_bytes(r) for r in sorted(roots))
    blocks = tuple(
        Block(
            forward_ops=tuple(sorted(forward[b])),
            backward_ops=tuple(sorted(backward[b])),
            input_value=cuts[b - 1] if b > 0 else None,
            output_value=cuts[b] if b < n_blocks - 1 else None,
            grad_inputs=tuple(sorted(grad_inputs[b])),
            held_inputs=tuple(sorted(held_inputs[b])),
            has_single_run_ops=any(not ops[k].recomputable for k in forward[b]),
        )
        for b in range(n_blocks)
    )
    return Chain(graph, blocks, tuple(sorted(replicated)), static)


def _read_far(graph: Graph, value: int, block_of: dict[int, int], made_in: int) -> bool:
    """Whether a backward value is also read two or more blocks below where it is made."""
    return any(block_of.get(u, made_in) < made_in - 1 for u in graph.users(value))


def _replicas_needed(graph: Graph, replicated: set[int], members: set[int]) -> set[int]:
    """Replicated ops whose outputs ``members`` read, with their replicated ancestors."""
    needed: set[int] = set()
    stack = [graph.values[v].producer for k in members for v in graph.ops[k].inputs]
    while stack:
        p = stack.pop()
        if p is None or p not in replicated or p in needed:
            continue
        needed.add(p)
        stack.extend(graph.values[v].producer for v in graph.ops[p].inputs)
    return needed
