"""Rotor-style dynamic program over a chain of blocks, one option per block (Rockmate).

Moves (block ``b``, option ``o``), with Rotor's names:

- ``Fck b``: run block ``b``'s forward keeping only its input (and making its output);
- ``Fn b``: the same, then drop the input (the inner blocks of a checkpointed span);
- ``Fall b o``: run the forward of option ``o`` (it keeps what ``o``'s backward needs);
- ``B b o``: run the backward of option ``o``;
- ``Fallk b o`` / ``Bk b o``: the same, while the block input must outlive the span.

``Opt(s, t, m)`` is the least time to go from "block ``s``'s input and the
gradients entering block ``t`` are live" to "the gradients leaving block ``s``
are live" in ``m`` bytes, which count those starting values, everything the
span allocates, and the values it leaves behind (block ends: parameter
gradients and other end values). Two ways:

- ``Fall s o``, then ``Opt(s+1, t, m - kept_o)``, then ``B s o``;
- checkpoint: ``Fck s``, ``Fn s+1 .. Fn s'-1``, ``Opt(s', t, m - input_s)``,
  then ``Opt(s, s'-1, m - persist(s'..t))``.

``Opt`` consumes block ``s``'s input; ``OptKeep`` leaves it live. When option
``o``'s backward reads the block's own output (an activation backward that
reads the activation), the span after it is an ``OptKeep``: its input, the
block output, is not counted twice nor dropped too early.

NOTE: [Chain memory model] Block numbers come from simulating each block's
own graph, where the block input and incoming gradients are real values:
``forward_peak``/``backward_peak`` include them, so nothing assumes the
chain's last output (say an LM head's logits) stays live through the backward
unless the block's schedule keeps it. ``kept`` is what stays between a block's
forward and backward beyond its output, which the next span counts as its
input. :func:`chain_peak_bytes` replays a move list on this model step by step;
the DP and the brute force agree with it (tests), and it bounds what
:func:`simulate` measures on the expanded schedule.

Memory is discretised in ``slots`` units of ``budget / slots`` bytes; every
requirement is rounded up and every remaining budget down, so a plan the DP
accepts always fits the byte budget (conservative).

Example:
    >>> block = ChainBlock(0, 0, 0, (ChainOption(3.0, 10, 0, 10),))
    >>> solve_chain([block], budget_bytes=10).moves
    (('Fall', 0, 0), ('B', 0, 0))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

Move = tuple[str, int, int]

#: Default number of memory units of the DP.
DEFAULT_SLOTS = 500


@dataclass(frozen=True, slots=True)
class ChainOption:
    """One way to run a block: its forward and backward, from the block's own simulation.

    Attributes:
        time_ms: forward plus backward time.
        forward_peak_bytes: peak of the block's forward (its input and output included).
        kept_bytes: bytes held from the forward to the backward, the block output excluded.
        backward_peak_bytes: peak of the block's backward (incoming gradients included).
        reads_output: the backward reads the block's own output.
        keep_forward_peak_bytes, keep_kept_bytes, keep_backward_peak_bytes: the same
            numbers when the block input stays live to the end (``kept`` then
            excludes the input too); None: derived conservatively.
    """

    time_ms: float
    forward_peak_bytes: int
    kept_bytes: int
    backward_peak_bytes: int
    reads_output: bool = False
    keep_forward_peak_bytes: int | None = None
    keep_kept_bytes: int | None = None
    keep_backward_peak_bytes: int | None = None

    def numbers(self, keep: bool, input_bytes: int) -> tuple[int, int, int]:
        """(forward peak, kept, backward peak) in consume or keep mode."""
        if not keep:
            return self.forward_peak_bytes, self.kept_bytes, self.backward_peak_bytes
        return (
            self.forward_peak_bytes + input_bytes if self.keep_forward_peak_bytes is None
            else self.keep_forward_peak_bytes,
            self.kept_bytes if self.keep_kept_bytes is None else self.keep_kept_bytes,
            self.backward_peak_bytes + input_bytes if self.keep_backward_peak_bytes is None
            else self.keep_backward_peak_bytes,
        )


@dataclass(frozen=True, slots=True)
class ChainBlock:
    """The DP's view of one block.

    Attributes:
        input_bytes: the block input (0 for the first block).
        grad_in_bytes: gradients the next block hands over (0 for the last block).
        persist_bytes: bytes the block's backward leaves live to the end of the step.
        options: the menu of (forward, backward) schedules.
        tail_options: schedules that need not make the block output, usable when
            the block is the last of a span run in the backward phase (nothing
            reads its output any more); indexed after ``options``.
        forward_only_ms: time of a forward that keeps nothing; inf forbids
            checkpointing through the block (it holds ops that run once).
        forward_only_keep_peak_bytes: its peak when the input stays live.
        forward_only_drop_peak_bytes: its peak when the input is dropped after use.
    """

    input_bytes: int
    grad_in_bytes: int
    persist_bytes: int
    options: tuple[ChainOption, ...]
    forward_only_ms: float = math.inf
    forward_only_keep_peak_bytes: int = 0
    forward_only_drop_peak_bytes: int = 0
    tail_options: tuple[ChainOption, ...] = ()

    def option(self, index: int) -> ChainOption:
        """Option ``index`` of ``options + tail_options``."""
        n = len(self.options)
        return self.options[index] if index < n else self.tail_options[index - n]


@dataclass(frozen=True, slots=True)
class ChainPlan:
    """A move list and its cost under the chain model.

    Attributes:
        moves: ``(kind, block, option)`` with kind in "Fck", "Fn", "Fall", "B" (option -1 for Fck/Fn).
        time_ms: total time of the moves.
        peak_bytes: :func:`chain_peak_bytes` of the moves.
    """

    moves: tuple[Move, ...]
    time_ms: float
    peak_bytes: int

    def __repr__(self) -> str:
        steps = " ".join(f"{k}{b}" + (f".{o}" if o >= 0 else "") for k, b, o in self.moves)
        return f"ChainPlan({steps}; {self.time_ms:.4g} ms, {self.peak_bytes} B)"


def solve_chain(blocks: Sequence[ChainBlock], budget_bytes: int, *, slots: int = DEFAULT_SLOTS,
                exact: bool = True) -> ChainPlan | None:
    """The fastest plan whose chain-model peak is at most ``budget_bytes``; None if none fits.

    With ``exact`` (the default) every requirement is rounded up, so the plan
    always fits. Without it, sizes are rounded to the nearest unit (errors
    cancel instead of adding up along a long chain) and the caller must check
    the plan's exact :func:`chain_peak_bytes`.
    """
    if budget_bytes < 0 or not blocks:
        return None
    unit = max(1.0, budget_bytes / slots)
    table = _Table(blocks, unit, int(budget_bytes // unit), exact)
    table.fill()
    top = table.value[0, 0, len(blocks) - 1, table.size]
    if not math.isfinite(top):
        return None
    moves = tuple(table.moves(0, len(blocks) - 1, table.size))
    return ChainPlan(moves, _moves_time(blocks, moves), chain_peak_bytes(blocks, moves))


def min_chain_budget(blocks: Sequence[ChainBlock], upper_bytes: int, *, slots: int = DEFAULT_SLOTS) -> int | None:
    """About the smallest budget the DP fits (within ``upper_bytes / slots``); None if even the upper fails."""
    unit = max(1.0, upper_bytes / slots)
    table = _Table(blocks, unit, int(upper_bytes // unit))
    table.fill()
    finite = np.flatnonzero(np.isfinite(table.value[0, 0, len(blocks) - 1]))
    if not len(finite):
        return None
    return int(math.ceil(finite[0] * unit))


class _Table:
    """The DP arrays: ``value[keep, s, t, m]`` (least time) and the move chosen.

    A choice >= 0 is an option index (all move); < 0 is ``-s'`` (checkpoint at
    ``s'``). Each ``(keep, s, t)`` row is computed for every memory size at
    once: candidates of all options (and all checkpoint splits) are gathered
    as a 2-D array and reduced with one ``argmin``. ``OptKeep`` rows are only
    filled for spans that some option can ask for (a block before them has an
    option whose backward reads its own output).
    """

    def __init__(self, blocks: Sequence[ChainBlock], unit: float, size: int, exact: bool = True) -> None:
        self.blocks, self.unit, self.size = blocks, unit, size
        self.rounding = 1.0 - 1e-9 if exact else 0.5  # added before flooring: ceil or nearest
        self.n = n = len(blocks)
        self.persist = np.cumsum([0] + [b.persist_bytes for b in blocks]).astype(np.float64)
        self.value = np.full((2, n, n, size + 1), np.inf, dtype=np.float64)
        self.choice = np.full((2, n, n, size + 1), _NONE, dtype=np.int32)
        self.memory = np.arange(size + 1)
        self.menus = [(_MenuArrays(b.options, b.input_bytes), _MenuArrays(b.options + b.tail_options, b.input_bytes))
                      for b in blocks]
        self.needs_keep = [s > 0 and bool(self.menus[s - 1][0].reads.any()) for s in range(n)]
        self.forward_only = np.asarray([b.forward_only_ms for b in blocks], dtype=np.float64)
        self.drop_peak = np.asarray([b.forward_only_drop_peak_bytes for b in blocks], dtype=np.float64)

    def units(self, n_bytes: float) -> int:
        """Bytes in units (requirements and reservations), rounded up when exact."""
        return int(math.floor(n_bytes / self.unit + self.rounding))

    def _units(self, n_bytes: np.ndarray) -> np.ndarray:
        return np.floor(n_bytes / self.unit + self.rounding).astype(np.int64)

    def _gather(self, keeps: np.ndarray, starts: np.ndarray, ends: np.ndarray, shifts: np.ndarray) -> np.ndarray:
        """Rows ``value[keeps[k], starts[k], ends[k], m - shifts[k]]`` (inf where ``m < shift``)."""
        rows = self.value[keeps, starts, ends]  # (k, size + 1)
        index = self.memory[None, :] - shifts[:, None]
        shifted = np.take_along_axis(rows, np.maximum(index, 0), axis=1)
        shifted[index < 0] = np.inf
        return shifted

    def fill(self) -> None:
        for length in range(self.n):
            for s in range(self.n - length):
                self._fill(False, s, s + length)
                if self.needs_keep[s]:
                    self._fill(True, s, s + length)

    def _fill(self, keep: bool, s: int, t: int) -> None:
        block = self.blocks[s]
        grad_t = float(self.blocks[t].grad_in_bytes)
        held_after = self.persist[t + 1] - self.persist[s + 1]  # persist of blocks s+1..t
        # A span ending before the last block runs in the backward phase: its last block's
        # output has no reader left, so tail options (which skip it) are allowed there.
        menu = self.menus[s][1 if s == t < self.n - 1 else 0]
        mode = int(keep)
        needs = np.maximum(self._units(grad_t + menu.forward_peak[mode]),
                           self._units(held_after + menu.backward_peak[mode]))
        usable = np.flatnonzero(needs <= self.size)
        rows, codes, need_rows = [], [usable], [needs[usable]]
        if len(usable):
            times = menu.time[usable][:, None]
            if s == t:
                rows.append(np.broadcast_to(times, (len(usable), self.size + 1)))
            else:
                k = len(usable)
                rows.append(times + self._gather(menu.reads[usable].astype(np.int64), np.full(k, s + 1),
                                                 np.full(k, t), self._units(menu.reserve[mode][usable])))
        if s < t and math.isfinite(block.forward_only_ms):
            splits, split_needs, spent = self._checkpoint_splits(s, t, grad_t)
            if len(splits):
                k = len(splits)
                first = self._gather(np.zeros(k, dtype=np.int64), splits, np.full(k, t),
                                     np.full(k, self.units(block.input_bytes)))
                second = self._gather(np.full(k, mode), np.full(k, s), splits - 1,
                                      self._units(self.persist[t + 1] - self.persist[splits]))
                rows.append(spent[:, None] + first + second)
                codes.append(-splits)
                need_rows.append(split_needs)
        if not rows:
            return
        candidates = np.vstack(rows)
        candidates[self.memory[None, :] < np.concatenate(need_rows)[:, None]] = np.inf
        best = np.argmin(candidates, axis=0)
        values = candidates[best, self.memory]
        self.value[mode, s, t] = values
        self.choice[mode, s, t] = np.where(np.isfinite(values), np.concatenate(codes)[best], _NONE)

    def _checkpoint_splits(self, s: int, t: int, grad_t: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Feasible checkpoint splits ``s'`` with their memory needs and forward-only times."""
        block = self.blocks[s]
        inner = np.arange(s + 1, t)  # blocks run with Fn for the splits after them
        finite = np.isfinite(self.forward_only[inner])
        stop = int(np.argmin(finite)) if not finite.all() else len(inner)
        inner = inner[:stop]
        first_need = self.units(grad_t + block.forward_only_keep_peak_bytes)
        inner_needs = self._units(grad_t + block.input_bytes + self.drop_peak[inner])
        needs = np.maximum.accumulate(np.concatenate([[first_need], inner_needs]))
        spent = block.forward_only_ms + np.concatenate([[0.0], np.cumsum(self.forward_only[inner])])
        count = int(np.searchsorted(needs, self.size, side="right"))  # needs only grow
        splits = np.arange(s + 1, s + 1 + len(needs))[:count]
        return splits, needs[:count], spent[:count]

    def moves(self, s: int, t: int, m: int, keep: bool = False) -> Iterator[Move]:
        code = int(self.choice[int(keep), s, t, m])
        assert code != _NONE, f"no plan for blocks {s}..{t} in {m} units"
        block = self.blocks[s]
        if code >= 0:
            option = block.option(code)
            yield ("Fallk" if keep else "Fall", s, code)
            if s < t:
                reserve = option.numbers(keep, block.input_bytes)[1] + (block.input_bytes if keep else 0)
                yield from self.moves(s + 1, t, m - self.units(reserve), option.reads_output)
            yield ("Bk" if keep else "B", s, code)
            return
        split = -code
        yield ("Fck", s, -1)
        for b in range(s + 1, split):
            yield ("Fn", b, -1)
        yield from self.moves(split, t, m - self.units(block.input_bytes), False)
        rest = self.persist[t + 1] - self.persist[split]
        yield from self.moves(s, split - 1, m - self.units(rest), keep)


@dataclass(frozen=True, slots=True)
class _MenuArrays:
    """A block's options as arrays, per mode (0: consume the input, 1: keep it)."""

    time: np.ndarray
    reads: np.ndarray
    forward_peak: tuple[np.ndarray, np.ndarray]
    backward_peak: tuple[np.ndarray, np.ndarray]
    reserve: tuple[np.ndarray, np.ndarray]  # bytes the span after the block's forward must leave

    def __init__(self, options: tuple[ChainOption, ...], input_bytes: int) -> None:
        numbers = [[o.numbers(keep, input_bytes) for o in options] for keep in (False, True)]
        as_array = lambda k, i: np.asarray([n[i] for n in numbers[k]], dtype=np.float64)  # noqa: E731
        object.__setattr__(self, "time", np.asarray([o.time_ms for o in options], dtype=np.float64))
        object.__setattr__(self, "reads", np.asarray([o.reads_output for o in options], dtype=bool))
        object.__setattr__(self, "forward_peak", (as_array(0, 0), as_array(1, 0)))
        object.__setattr__(self, "backward_peak", (as_array(0, 2), as_array(1, 2)))
        object.__setattr__(self, "reserve", (as_array(0, 1), as_array(1, 1) + input_bytes))


_NONE = -(10**6)


def _moves_time(blocks: Sequence[ChainBlock], moves: Sequence[Move]) -> float:
    total = 0.0
    for kind, b, o in moves:
        if kind in ("Fck", "Fn"):
            total += blocks[b].forward_only_ms
        elif kind in ("Fall", "Fallk"):
            total += blocks[b].option(o).time_ms
    return total


def chain_peak_bytes(blocks: Sequence[ChainBlock], moves: Sequence[Move]) -> int:
    """Replay ``moves`` on the chain memory model (exact bytes); return the peak.

    Live bytes are tracked value by value: block inputs (made by the previous
    block's forward; dropped by ``Fn``/``Fall`` of their block, kept by
    ``Fck``/``Fallk``/``Bk``, or, if nothing consumed them, dropped at the
    previous block's backward), kept bytes, gradients and persisting bytes.
    Each move's transient is its block's simulated peak minus what that peak
    already counts.
    """
    n = len(blocks)
    live_inputs: set[int] = set()
    kept: dict[int, int] = {}
    live, peak = 0, 0

    def output_of(b: int) -> int:
        return blocks[b + 1].input_bytes if b + 1 < n else 0

    for kind, b, o in moves:
        block = blocks[b]
        own_input = block.input_bytes if b in live_inputs else 0
        if kind in ("Fck", "Fn", "Fall", "Fallk"):
            if kind in ("Fall", "Fallk"):
                forward_peak, kept_bytes, _ = block.option(o).numbers(kind == "Fallk", block.input_bytes)
            else:
                forward_peak = (block.forward_only_keep_peak_bytes if kind == "Fck"
                                else block.forward_only_drop_peak_bytes)
            peak = max(peak, live - own_input + forward_peak)
            if kind in ("Fn", "Fall") and b in live_inputs:
                live_inputs.discard(b)
                live -= block.input_bytes
            if kind in ("Fall", "Fallk"):
                kept[b] = kept_bytes
                live += kept_bytes
            if b + 1 < n:
                if b + 1 in live_inputs:  # a recomputation replaces the old instance
                    live -= output_of(b)
                live_inputs.add(b + 1)
                live += output_of(b)
        else:
            if b + 1 in live_inputs:  # nothing consumed the output: its instance dies here
                live_inputs.discard(b + 1)
                live -= output_of(b)
            _, _, backward_peak = block.option(o).numbers(kind == "Bk", block.input_bytes)
            live -= kept.pop(b) + block.grad_in_bytes
            own_input = block.input_bytes if (kind == "Bk" and b in live_inputs) else 0
            peak = max(peak, live - own_input + backward_peak)
            live += block.persist_bytes + (blocks[b - 1].grad_in_bytes if b > 0 else 0)
    return peak


def brute_force_chain(blocks: Sequence[ChainBlock], budget_bytes: int) -> ChainPlan | None:
    """Enumerate every plan of the move grammar; the fastest within the budget (for tests)."""
    best: ChainPlan | None = None
    for moves in _plans(blocks, 0, len(blocks) - 1, False):
        peak = chain_peak_bytes(blocks, moves)
        if peak <= budget_bytes:
            time_ms = _moves_time(blocks, moves)
            if best is None or time_ms < best.time_ms - 1e-12:
                best = ChainPlan(tuple(moves), time_ms, peak)
    return best


def _plans(blocks: Sequence[ChainBlock], s: int, t: int, keep: bool) -> Iterator[list[Move]]:
    forward, backward = ("Fallk", "Bk") if keep else ("Fall", "B")
    menu = blocks[s].options + (blocks[s].tail_options if s == t < len(blocks) - 1 else ())
    for o, option in enumerate(menu):
        if s == t:
            yield [(forward, s, o), (backward, s, o)]
        else:
            for inner in _plans(blocks, s + 1, t, option.reads_output):
                yield [(forward, s, o), *inner, (backward, s, o)]
    if s == t or not math.isfinite(blocks[s].forward_only_ms):
        return
    for split in range(s + 1, t + 1):
        if any(not math.isfinite(blocks[b].forward_only_ms) for b in range(s + 1, split)):
            break
        head: list[Move] = [("Fck", s, -1), *(("Fn", b, -1) for b in range(s + 1, split))]
        for right in _plans(blocks, split, t, False):
            for left in _plans(blocks, s, split - 1, keep):
                yield [*head, *right, *left]
