"""Dropout whose mask can be drawn again from a saved RNG state, so the planner need not keep it.

NOTE: [Replayed dropout] ``native_dropout`` draws its mask from the global RNG,
so as a graph op it runs once and its mask (1 byte an element; for attention
probabilities B*H*T*T bytes a layer) is kept from the forward to the
backward. Hand-placed checkpointing does better: ``torch.utils.checkpoint``
saves the RNG state and replays it when it recomputes. On a Llama-style LM
with attention dropout those kept masks put rematc's smallest peak above
``gradient_checkpointing_enable()``'s.

:func:`make_dropout_replayable` rewrites each CPU training-mode dropout whose
output nothing reads (after :func:`rematc.passes.make_dropout_outputs_recomputable`
the output is two multiplies by the mask) into two ops, registered here as
``torch.ops.rematc``:

- ``dropout_rng_state(input) -> state``: the CPU RNG state (5056 bytes) where
  the dropout draws. It runs once, in the forward.
- ``replay_dropout(state, input, p) -> mask``: the mask drawn from ``state``
  with a private generator: a pure function of its inputs, which the
  planner may recompute in any phase, any number of times.

The graph (and so the planner and the simulator) sees only these two. The
code generator emits the *first* computation of each ``replay_dropout``, in
the forward, as ``draw_dropout(input, p)``: the same mask drawn from the
global RNG, which it advances exactly as eager's dropout does, so the
random ops after it draw what they drew in eager. That is the same as
replaying from the state just saved, provided nothing draws from the RNG
between the two; the code generator checks it (:func:`first_draw_is_adjacent`).
All three allocate the same bytes (a mask in the input's dtype while it
runs, then the bool mask), so one cost describes both emissions.

The mask is ``empty_like(input).bernoulli_(1 - p)`` as a bool, what the
CPU ``native_dropout`` kernel computes (same bits, same strides, same RNG
consumption: ``tests/rematc/test_rng.py`` checks it against the kernel).

Only CPU graphs are rewritten: on CUDA the generator state and the philox
offsets need their own treatment, and no CUDA machine has checked it yet.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import maybe_get_fake_mode
from torch.utils._python_dispatch import _disable_current_modes

from profiler.workspace import register_synthetic_inputs

__all__ = ["DRAW_OP", "REPLAY_OP", "RNG_STATE_OP", "consumes_rng", "first_draw_is_adjacent", "make_dropout_replayable"]

_LIB = torch.library.Library("rematc", "DEF")
_LIB.define("dropout_rng_state(Tensor input) -> Tensor")
_LIB.define("replay_dropout(Tensor state, Tensor input, float p) -> Tensor")
_LIB.define("draw_dropout(Tensor input, float p) -> Tensor")


def _mask(input: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    # aten/src/ATen/native/Dropout.cpp (CPU): the mask is bernoulli_(1 - p) on empty_like(input).
    return torch.empty_like(input).bernoulli_(1.0 - p, generator=generator).to(torch.bool)


def _rng_state_cpu(input: torch.Tensor) -> torch.Tensor:
    return torch.get_rng_state()


def _replay_cpu(state: torch.Tensor, input: torch.Tensor, p: float) -> torch.Tensor:
    generator = torch.Generator()
    generator.set_state(state)
    return _mask(input, p, generator)


def _draw_cpu(input: torch.Tensor, p: float) -> torch.Tensor:
    return _mask(input, p, None)


def _rng_state_fake(input: torch.Tensor) -> torch.Tensor:
    return input.new_empty(_STATE_NUMEL, dtype=torch.uint8, device="cpu")


def _mask_fake(input: torch.Tensor, p: float) -> torch.Tensor:
    return torch.empty_like(input, dtype=torch.bool)


_STATE_NUMEL = torch.get_rng_state().numel()
_LIB.impl("dropout_rng_state", _rng_state_cpu, "CPU")
_LIB.impl("replay_dropout", _replay_cpu, "CPU")
_LIB.impl("draw_dropout", _draw_cpu, "CPU")
torch.library.register_fake("rematc::dropout_rng_state", _rng_state_fake, lib=_LIB)
torch.library.register_fake("rematc::replay_dropout", lambda state, input, p: _mask_fake(input, p), lib=_LIB)
torch.library.register_fake("rematc::draw_dropout", _mask_fake, lib=_LIB)

RNG_STATE_OP: torch._ops.OpOverload = torch.ops.rematc.dropout_rng_state.default
REPLAY_OP: torch._ops.OpOverload = torch.ops.rematc.replay_dropout.default
DRAW_OP: torch._ops.OpOverload = torch.ops.rematc.draw_dropout.default


def _valid_state(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The profiler's synthetic inputs with a real RNG state (zeros are not a valid mt19937 state)."""
    return (torch.get_rng_state(), *args[1:]), kwargs


register_synthetic_inputs(REPLAY_OP, _valid_state)


def make_dropout_replayable(gm: fx.GraphModule) -> int:
    """Rewrite ``gm``'s CPU training-mode dropouts in place (NOTE: [Replayed dropout]); return how many.

    Run after :func:`rematc.passes.make_dropout_outputs_recomputable`, which
    leaves the dropout producing only the mask its multiplies read.
    """
    graph = gm.graph
    changed = 0
    for node in list(graph.nodes):
        if node.target is not torch.ops.aten.native_dropout.default:
            continue
        x, p = node.args[0], node.args[1]
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train")
        val = node.meta.get("val")
        if (train is not True or not isinstance(p, float) or not isinstance(x, fx.Node)
                or not isinstance(val, (tuple, list)) or val[0].device.type != "cpu"):
            continue
        getitems = [u for u in node.users if u.target is operator.getitem]
        if len(getitems) != len(node.users) or any(u.args[1] != 1 for u in getitems if u.users):
            continue  # the output itself is read: keep the dropout as it is
        for unread in [u for u in getitems if not u.users]:
            graph.erase_node(unread)
        getitems = [u for u in getitems if u.users]
        with graph.inserting_before(node):
            state = graph.call_function(RNG_STATE_OP, (x,))
            replay = graph.call_function(REPLAY_OP, (state, x, p))
        meta = {k: v for k, v in node.meta.items() if k != "val"}
        state.meta = {**meta, "val": _fake_run(RNG_STATE_OP, x.meta["val"])}
        replay.meta = {**meta, "val": val[1]}  # the dropout's own mask, layout included
        for mask in getitems:
            mask.replace_all_uses_with(replay)
            graph.erase_node(mask)
        graph.erase_node(node)
        changed += 1
    if changed:
        graph.lint()
        gm.recompile()
    return changed


def _fake_run(op: torch._ops.OpOverload, *args: torch.Tensor) -> torch.Tensor:
    """``op``'s registered fake kernel on fake ``args``, under their fake mode."""
    mode = maybe_get_fake_mode(args[0])
    with mode if mode is not None else _disable_current_modes():
        return op(*args)


def consumes_rng(node: fx.Node) -> bool:
    """Whether running ``node`` draws from the global RNG (a random op not replayed from a state)."""
    target = node.target  # rematc's own ops carry no random tag: a replay draws nothing
    return isinstance(target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in target.tags


def first_draw_is_adjacent(order: list[fx.Node], position: int) -> bool:
    """Whether nothing between ``order[position]`` (a first ``replay_dropout``) and its state draws from the RNG.

    ``order`` is the compute order of one phase. Then drawing from the global
    RNG there gives the mask the saved state gives (NOTE: [Replayed dropout]).
    Other first draws count as draws; replays do not.
    """
    state = order[position].args[0]
    first_index: dict[fx.Node, int] = {}
    for index, node in enumerate(order):
        first_index.setdefault(node, index)
    for index in range(position - 1, -1, -1):
        node = order[index]
        if node is state:
            return True
        if consumes_rng(node) or (node.target is REPLAY_OP and first_index[node] == index):
            return False
    return False  # the state was not computed in this phase
