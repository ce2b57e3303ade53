"""Chains of blocks: cuts, backward placement, identical blocks, graphs without cuts."""

from __future__ import annotations

import random

import pytest

from solvers import Graph, check, simulate
from solvers.block_graph import build_block_graph
from solvers.partition import Chain, partition_chain
from solvers.recompute import no_remat_schedule
from solvers.synthetic import TransformerShape, transformer_graph
from tests.solvers.graphs import GraphBuilder, mlp_chain_graph, random_training_graph

TINY = TransformerShape(batch=2, seq=16, n_embd=16, n_head=2, vocab=50)


def _assert_chain_reads(chain: Chain) -> None:
    """Every read crosses at most what the chain model allows (checked independently of partition.py)."""
    graph = chain.graph
    block_of: dict[int, int] = {}
    for b, block in enumerate(chain.blocks):
        for k in (*block.forward_ops, *block.backward_ops):
            if k not in chain.replicated_ops:
                assert k not in block_of, f"op {graph.ops[k].name} in blocks {block_of[k]} and {b}"
                block_of[k] = b
    covered = set(block_of) | set(chain.replicated_ops)
    assert covered == set(range(graph.num_ops))
    for b, block in enumerate(chain.blocks):
        assert b == 0 or block.input_value == chain.blocks[b - 1].output_value
        for k in (*block.forward_ops, *block.backward_ops):
            for v in graph.ops[k].inputs:
                p = graph.values[v].producer
                if p is None or p in chain.replicated_ops:
                    continue
                if k in chain.replicated_ops:
                    continue
                a = block_of[p]
                if a == b:
                    continue
                if not graph.ops[p].is_backward:
                    assert v == block.input_value and a == b - 1, (graph.ops[k].name, graph.values[v].name)
                else:
                    assert graph.ops[k].is_backward and a > b
                    assert v in block.grad_inputs or v in block.held_inputs
                    if a > b + 1:
                        assert v in block.held_inputs


def _block_graphs_run(chain: Chain) -> None:
    for b in range(len(chain.blocks)):
        block = build_block_graph(chain, b)
        schedule = no_remat_schedule(block.graph)
        check(block.graph, schedule)
        assert simulate(block.graph, schedule).peak_bytes >= block.input_bytes
        assert [o >= 0 for o in block.op_map].count(False) == (block.input_bytes > 0 or b > 0) + len(
            chain.blocks[b].grad_inputs)


def test_mlp_cuts_between_layers() -> None:
    graph = mlp_chain_graph(4)
    chain = partition_chain(graph)
    assert len(chain.blocks) >= 8  # every activation is a cut
    _assert_chain_reads(chain)
    _block_graphs_run(chain)


def test_transformer_layers_share_block_keys() -> None:
    graph = transformer_graph(4, TINY)
    chain = partition_chain(graph)
    _assert_chain_reads(chain)
    keys = [build_block_graph(chain, b).key for b in range(len(chain.blocks))]
    names = [graph.values[b.output_value].name if b.output_value is not None else "-" for b in chain.blocks]
    attention = [k for k, name in zip(keys, names) if name.endswith("res1") and name != "l0.res1"]
    mlp = [k for k, name in zip(keys, names) if name.endswith("res2")]
    assert len(attention) == 3 and len(set(attention)) == 1
    assert len(mlp) == 4 and len(set(mlp)) == 1
    assert len(set(keys)) == len(keys) - 5  # 3 attention + 4 MLP blocks solved as 2


def test_coarsening_keeps_periodic_blocks_identical() -> None:
    graph = transformer_graph(6, TINY)
    fine = partition_chain(graph)
    coarse = partition_chain(graph, min_block_ops=30)
    assert len(coarse.blocks) < len(fine.blocks)
    _assert_chain_reads(coarse)
    keys = [build_block_graph(coarse, b).key for b in range(len(coarse.blocks))]
    assert len(set(keys[1:-1])) == 1  # one distinct middle block
    limited = partition_chain(graph, max_blocks=5)
    assert len(limited.blocks) <= 5
    _assert_chain_reads(limited)


def test_tied_embedding_gradient_is_held_not_merged() -> None:
    graph = transformer_graph(3, TINY)  # the LM head reuses wte: its gradient half crosses the chain
    chain = partition_chain(graph)
    assert len(chain.blocks) > 4
    held = sorted(v for block in chain.blocks for v in block.held_inputs)
    assert [graph.values[v].name for v in held] == ["lm_head_bwd_w"]
    maker = next(b for b, block in enumerate(chain.blocks)
                 if graph.values[held[0]].producer in block.backward_ops)
    # The chain keeps it live to the end: it persists past the backward of the block making it.
    assert build_block_graph(chain, maker).persist_bytes >= TINY.vocab * TINY.n_embd * 4


def _unet(depth: int = 3) -> Graph:
    """Encoder/decoder with a skip from every encoder level to its decoder level: no cut inside."""
    b = GraphBuilder()
    x = b.resident("x")
    encoder, h = [], x
    for i in range(depth):
        (h,) = b.add(f"enc{i}", [h], [400 >> i], time_ms=1.0)
        encoder.append(h)
    for i in reversed(range(depth)):
        (h,) = b.add(f"dec{i}", [h, encoder[i]], [400 >> i], time_ms=1.0)
    (loss,) = b.add("loss", [h], [8], time_ms=0.1)
    (grad,) = b.add("d_loss", [], [8], is_backward=True, recomputable=False, is_input=True, time_ms=0.0)
    (grad,) = b.add("loss_bwd", [grad, h], [400], is_backward=True, time_ms=0.1)
    skip_grads = []
    for i in range(depth):
        name_in = encoder[i - 1] if i > 0 else x
        grad, skip = b.add(f"dec{i}_bwd", [grad, encoder[i]], [400 >> min(i + 1, depth - 1), 400 >> i],
                           is_backward=True, time_ms=1.0)
        skip_grads.append(skip)
        del name_in
    for i in reversed(range(depth)):
        (grad,) = b.add(f"acc{i}", [grad, skip_grads[i]], [400 >> i], is_backward=True, time_ms=0.1)
        inputs = [grad] + ([encoder[i - 1]] if i > 0 else [])
        (grad,) = b.add(f"enc{i}_bwd", inputs, [400 >> max(i - 1, 0)], is_backward=True, time_ms=1.0)
    return b.build(forward_outputs=[loss], required_at_end=[grad])


def test_unet_long_skips_make_one_block() -> None:
    graph = _unet(depth=4)
    chain = partition_chain(graph)
    # Only the outermost level and the loss are cuts; every skip lives inside one block.
    assert max(len(block.forward_ops) for block in chain.blocks) >= 2 * 4 - 2
    _assert_chain_reads(chain)
    _block_graphs_run(chain)


def test_shared_resident_derived_mask_is_replicated() -> None:
    b = GraphBuilder()
    x, seed = b.resident("x"), b.resident("mask_seed")
    (mask,) = b.add("mask", [seed], [8], time_ms=0.001)
    h, acts = x, []
    for i in range(4):
        (h,) = b.add(f"layer{i}", [h, mask], [1000], time_ms=1.0)
        acts.append(h)
    (loss,) = b.add("loss", [h], [8], time_ms=0.1)
    (grad,) = b.add("d_loss", [], [8], is_backward=True, recomputable=False, is_input=True, time_ms=0.0)
    for i in reversed(range(4)):
        (grad,) = b.add(f"layer{i}_bwd", [grad, acts[i - 1] if i else x, mask], [1000], is_backward=True)
    graph = b.build(forward_outputs=[loss], required_at_end=[grad])
    chain = partition_chain(graph)
    assert len(chain.blocks) >= 4
    assert graph.values[mask].producer in chain.replicated_ops
    _assert_chain_reads(chain)
    _block_graphs_run(chain)


@pytest.mark.parametrize("seed", range(8))
def test_random_graphs_partition_soundly(seed: int) -> None:
    graph = random_training_graph(random.Random(seed), 30)
    for min_ops in (1, 12):
        chain = partition_chain(graph, min_block_ops=min_ops)
        _assert_chain_reads(chain)
        _block_graphs_run(chain)
    assert "block 0" in chain.describe()


def _layers_graph(n: int, *, side_outputs: bool = False, mask_chain: int = 0, saved_view: bool = False) -> Graph:
    """A chain of ``n`` layers with the shapes of captured graphs that used to leave no cut.

    ``side_outputs``: every layer also outputs a small running statistic (BatchNorm's).
    ``mask_chain``: a mask built from residents by that many cheap ops, read by every layer.
    ``saved_view``: each layer output has a view (``detach``) that only its backward reads.
    """
    b = GraphBuilder()
    x, w = b.resident("x"), b.resident("w")
    mask = None
    if mask_chain:
        (mask,) = b.add("arange", [w], [64], time_ms=0.0001)
        for i in range(mask_chain - 1):
            (mask,) = b.add(f"mask{i}", [mask], [64], time_ms=0.0001)
    h, outs, stats, saved = x, [], [], []
    for i in range(n):
        (h,) = b.add(f"layer{i}", [h, w] + ([mask] if mask is not None else []), [1000], time_ms=1.0)
        outs.append(h)
        if side_outputs:
            (stat,) = b.add(f"stat{i}", [h], [8], time_ms=0.001)
            stats.append(stat)
        if saved_view:
            (view,) = b.add(f"detach{i}", [h], [1000], view_of=[h], time_ms=0.0)
            saved.append(view)
    (loss,) = b.add("loss", [h], [8], time_ms=0.1)
    (grad,) = b.add("d_loss", [], [8], is_backward=True, recomputable=False, is_input=True, time_ms=0.0)
    for i in reversed(range(n)):
        reads = [grad, outs[i - 1] if i else x] + ([saved[i]] if saved_view else [])
        (grad,) = b.add(f"layer{i}_bwd", reads, [1000], is_backward=True)
    return b.build(forward_outputs=[loss, *stats], required_at_end=[grad])


@pytest.mark.parametrize("shape", ["side_outputs", "mask_chain", "saved_view"])
def test_captured_graph_shapes_keep_their_cuts(shape: str) -> None:
    """Regressions from captured graphs: ResNet's BatchNorm statistics (forward outputs in every
    block), GPT-2's causal mask (a long chain of resident-only ops), ReLU's saved ``detach``."""
    kwargs = {"side_outputs": {"side_outputs": True}, "mask_chain": {"mask_chain": 20},
              "saved_view": {"saved_view": True}}[shape]
    graph = _layers_graph(6, **kwargs)
    chain = partition_chain(graph)
    assert len(chain.blocks) >= 6, chain.describe()
    _assert_chain_reads(chain)
    _block_graphs_run(chain)
