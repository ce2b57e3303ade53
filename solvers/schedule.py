"""Schedules: the ordered compute/free steps of one training step.

A :class:`Schedule` has a forward phase and a backward phase. The code
generator turns the forward phase into the forward graph (whatever is alive at
its end and needed later is saved for the backward) and the backward phase into
the backward graph, recomputations included. Frees are explicit steps so that
the simulator, the checker and the generated code agree on every lifetime;
:func:`schedule_from_order` derives them from a compute order the way fx code
generation frees values: right after their last use.

Example:
    >>> s = Schedule(forward=(Step("compute", 0),), backward=(Step("compute", 1), Step("free", 1)))
    >>> s
    Schedule(C0 | C1 D1)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal, Sequence

from .graph import Graph

StepKind = Literal["compute", "free"]


@dataclass(frozen=True, slots=True)
class Step:
    """Compute op ``index`` or free value ``index``."""

    kind: StepKind
    index: int

    def __post_init__(self) -> None:
        if self.kind not in ("compute", "free"):
            raise ValueError(f"Step.kind must be 'compute' or 'free', got {self.kind!r}")

    def __repr__(self) -> str:
        return f"{'C' if self.kind == 'compute' else 'D'}{self.index}"


@dataclass(frozen=True, slots=True)
class Schedule:
    """Ordered steps, split into the forward and the backward phase."""

    forward: tuple[Step, ...]
    backward: tuple[Step, ...]

    @property
    def steps(self) -> tuple[tuple[StepKind, int], ...]:
        """All steps as ``(kind, index)`` pairs, forward then backward."""
        return tuple((s.kind, s.index) for s in (*self.forward, *self.backward))

    def computes(self, phase: Literal["forward", "backward"]) -> tuple[int, ...]:
        """The op indices computed in ``phase``, in order."""
        steps = self.forward if phase == "forward" else self.backward
        return tuple(s.index for s in steps if s.kind == "compute")

    def __repr__(self) -> str:
        fwd = " ".join(map(repr, self.forward))
        bwd = " ".join(map(repr, self.backward))
        return f"Schedule({fwd} | {bwd})"


def schedule_from_order(
    graph: Graph, forward_ops: Sequence[int], backward_ops: Sequence[int]
) -> Schedule:
    """Build a Schedule from compute orders, freeing each value after its last use.

    An op may appear several times (recomputation); each computation makes a
    new instance of its outputs, and the previous instance is freed after its
    last read before the recomputation. A value alive at the end of the forward
    phase and read in the backward is what the forward saves. Forward outputs
    live at least to the end of the forward phase; those not needed later are
    freed first thing in the backward phase (the runtime drops them between the
    phases). Values in ``graph.required_at_end`` are never freed; resident
    values are never freed.
    """
    order = [*forward_ops, *backward_ops]
    n_forward = len(forward_ops)
    # For each position, the positions at which the values read there were produced.
    last_read: dict[tuple[int, int], int] = {}  # (value, producing position) -> last read position
    current: dict[int, int] = {}  # value -> position of its live instance
    for pos, op_index in enumerate(order):
        op = graph.ops[op_index]
        for v in op.inputs:
            if v in current:
                last_read[(v, current[v])] = pos
        for v in op.outputs:
            current[v] = pos
            last_read.setdefault((v, pos), pos)
    keep_to_end = set(graph.required_at_end)
    forward_outputs = set(graph.forward_outputs)
    frees_after: dict[int, list[int]] = {}
    frees_at_backward_start: list[int] = []
    for (v, produced_at), last in last_read.items():
        if v in keep_to_end:
            # The instance that is live at the end is kept; earlier ones are freed.
            if current.get(v) == produced_at:
                continue
        if v in forward_outputs and produced_at < n_forward and last < n_forward:
            if _next_production(order, graph, v, produced_at) >= n_forward:
                frees_at_backward_start.append(v)
                continue
        frees_after.setdefault(last, []).append(v)
    forward: list[Step] = []
    backward: list[Step] = [Step("free", v) for v in sorted(frees_at_backward_start)]
    for pos, op_index in enumerate(order):
        target = forward if pos < n_forward else backward
        target.append(Step("compute", op_index))
        for v in sorted(frees_after.get(pos, ())):
            target.append(Step("free", v))
    return Schedule(tuple(forward), tuple(backward))


def without_dead_recomputations(graph: Graph, forward: Sequence[int], backward: Sequence[int]) -> list[int]:
    """``backward`` without the recomputations whose outputs nothing after them reads.

    A planner that replays a whole block (the hierarchical one) or ignores
    zero-cost ops (the MILP) may recompute ops that only make forward outputs
    (BatchNorm's ``num_batches_tracked + 1``) or values nothing reads again.
    Besides wasting time, replaying a buffer update reads the buffer after the
    step mutated it. Only a *re*computation goes: an op's first run stays.
    """
    ran = set(forward)
    first_run = set()
    for pos, k in enumerate(backward):
        if k not in ran:
            first_run.add(pos)
            ran.add(k)
    # A value kept to the end that the forward already made needs no second instance.
    needed = {v for v in graph.required_at_end if graph.values[v].producer not in set(forward)}
    kept: list[int] = []
    for pos in range(len(backward) - 1, -1, -1):
        op = graph.ops[backward[pos]]
        if op.is_backward or pos in first_run or any(v in needed for v in op.outputs):
            kept.append(backward[pos])
            needed.difference_update(op.outputs)  # earlier instances are not read by later readers
            needed.update(op.inputs)
    kept.reverse()
    return kept


def _next_production(order: Sequence[int], graph: Graph, value: int, after: int) -> int:
    producer = graph.values[value].producer
    for pos in range(after + 1, len(order)):
        if order[pos] == producer:
            return pos
    return len(order)


def iter_computes(schedule: Schedule) -> Iterable[tuple[str, int]]:
    """(phase, op index) for every compute step, in execution order."""
    for step in schedule.forward:
        if step.kind == "compute":
            yield "forward", step.index
    for step in schedule.backward:
        if step.kind == "compute":
            yield "backward", step.index
