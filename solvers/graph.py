"""The torch-free training-graph IR that every solver reads.

A :class:`Graph` is one forward+backward step as a list of ops in a
topological order. Each op reads values and produces values; a value is one
tensor, and a value that is a *view* shares the storage of one of its
producer's inputs, so it allocates nothing. Values with no producer are
*resident*: parameters, inputs, buffers. They exist before the step starts and
are not counted in any peak (the budget counts bytes allocated above the start).

Example:
    >>> g = Graph(
    ...     ops=(Op("relu", inputs=(0,), outputs=(1,), time_ms=1.0),
    ...          Op("relu_bwd", inputs=(1,), outputs=(2,), time_ms=1.0, is_backward=True)),
    ...     values=(Value("x", 0, None), Value("h", 64, 0), Value("dx", 64, 1)),
    ...     forward_outputs=(), required_at_end=(2,))
    >>> g.num_ops, g.resident_values
    (2, (0,))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property


class GraphError(ValueError):
    """A Graph violates an IR invariant (bad index, not topological, bad view)."""


@dataclass(frozen=True, slots=True)
class Value:
    """One tensor of the step.

    Attributes:
        name: stable identity (the fx node name on the torch side).
        bytes: storage bytes allocated when the value is produced; ignored
            (counted as 0) for views and for resident values.
        producer: index of the op that produces it; None for resident values.
        view_of: index of the value whose storage this one shares; it must be
            an input of ``producer``. None for values with their own storage.
    """

    name: str
    bytes: int
    producer: int | None
    view_of: int | None = None

    def __post_init__(self) -> None:
        if self.bytes < 0:
            raise GraphError(f"value {self.name!r}: bytes must be >= 0, got {self.bytes}")

    @property
    def is_resident(self) -> bool:
        return self.producer is None


@dataclass(frozen=True, slots=True)
class Op:
    """One operation of the step.

    Attributes:
        name: stable identity (the fx node name on the torch side).
        inputs: value indices read, in argument order (duplicates allowed).
        outputs: value indices produced (one op, several outputs for tuples).
        time_ms: predicted run time.
        workspace_bytes: transient bytes held only while the op runs.
        is_backward: the op depends on the output gradients (tangents), so it
            can only run in the backward phase.
        recomputable: False for ops that must run exactly once (random ops
            whose RNG is not replayed, ops with side effects, unknown ops).
        is_input: the op stands for a value handed to the backward from
            outside (an output's gradient); it has no inputs, runs once at the
            start of the backward phase, and costs no time.
    """

    name: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    time_ms: float = 0.0
    workspace_bytes: int = 0
    is_backward: bool = False
    recomputable: bool = True
    is_input: bool = False

    def __post_init__(self) -> None:
        if self.time_ms < 0 or self.workspace_bytes < 0:
            raise GraphError(f"op {self.name!r}: time_ms and workspace_bytes must be >= 0")
        if self.is_input and (self.inputs or not self.is_backward or self.recomputable):
            raise GraphError(
                f"op {self.name!r}: an input op has no inputs, is backward and not recomputable"
            )


@dataclass(frozen=True, slots=True)
class Graph:
    """A training step: ops in topological order and the values they exchange.

    Attributes:
        ops: the ops, in a valid topological order (forward ops first is not
            required, but every op's inputs come from earlier ops or are resident).
        values: every value; resident ones have ``producer=None``.
        forward_outputs: values that must be alive when the forward phase ends
            (the user outputs and anything the forward returns).
        required_at_end: values that must be alive when the step ends
            (gradients and the outputs the caller still holds).
    """

    ops: tuple[Op, ...]
    values: tuple[Value, ...]
    forward_outputs: tuple[int, ...] = ()
    required_at_end: tuple[int, ...] = ()
    _cache: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        n_values = len(self.values)
        produced_by: dict[int, int] = {}
        for i, op in enumerate(self.ops):
            for v in op.outputs:
                if not 0 <= v < n_values:
                    raise GraphError(f"op {i} ({op.name}) outputs unknown value {v}")
                if v in produced_by:
                    raise GraphError(f"value {v} is produced by ops {produced_by[v]} and {i}")
                if self.values[v].producer != i:
                    raise GraphError(
                        f"value {v} ({self.values[v].name}) lists producer "
                        f"{self.values[v].producer}, but op {i} ({op.name}) outputs it"
                    )
                produced_by[v] = i
        for v, value in enumerate(self.values):
            if value.producer is not None and produced_by.get(v) != value.producer:
                raise GraphError(f"value {v} ({value.name}) is not an output of its producer")
            if value.view_of is not None:
                if value.producer is None:
                    raise GraphError(f"resident value {v} ({value.name}) cannot be a view")
                if value.view_of not in self.ops[value.producer].inputs:
                    raise GraphError(
                        f"value {v} ({value.name}) is a view of {value.view_of}, "
                        f"which is not an input of its producer"
                    )
        for i, op in enumerate(self.ops):
            for v in op.inputs:
                if not 0 <= v < n_values:
                    raise GraphError(f"op {i} ({op.name}) reads unknown value {v}")
                p = self.values[v].producer
                if p is not None and p >= i:
                    raise GraphError(
                        f"ops are not in topological order: op {i} ({op.name}) reads "
                        f"{self.values[v].name}, produced later by op {p}"
                    )
                if op.is_backward is False and p is not None and self.ops[p].is_backward:
                    raise GraphError(f"forward op {i} ({op.name}) reads backward value {v}")
        for v in (*self.forward_outputs, *self.required_at_end):
            if not 0 <= v < n_values:
                raise GraphError(f"unknown output value {v}")
        for v in self.forward_outputs:
            p = self.values[v].producer
            if p is not None and self.ops[p].is_backward:
                raise GraphError(f"forward output {v} is produced by backward op {p}")

    @property
    def num_ops(self) -> int:
        return len(self.ops)

    @property
    def resident_values(self) -> tuple[int, ...]:
        return tuple(v for v, value in enumerate(self.values) if value.producer is None)

    def users(self, value: int) -> tuple[int, ...]:
        """Op indices that read ``value``, ascending, each once."""
        return self._users_table[value]

    def storage_root(self, value: int) -> int:
        """The value whose storage ``value`` shares (itself when not a view)."""
        while self.values[value].view_of is not None:
            value = self.values[value].view_of  # type: ignore[assignment]
        return value

    def allocated_bytes(self, value: int) -> int:
        """Bytes a fresh computation of ``value`` allocates (0 for views, residents)."""
        v = self.values[value]
        return 0 if v.view_of is not None or v.producer is None else v.bytes

    @property
    def _users_table(self) -> tuple[tuple[int, ...], ...]:
        table = self._cache.get("users")
        if table is None:
            lists: list[list[int]] = [[] for _ in self.values]
            for i, op in enumerate(self.ops):
                for v in dict.fromkeys(op.inputs):
                    lists[v].append(i)
            table = tuple(tuple(u) for u in lists)
            self._cache["users"] = table
        return table

    def describe(self) -> str:
        """A readable listing, one op a line: ``%3 relu(%1) -> v4 [64 B] 1.0 ms``."""
        lines = []
        for i, op in enumerate(self.ops):
            ins = ", ".join(self.values[v].name for v in op.inputs)
            outs = ", ".join(
                f"{self.values[v].name}[{self.allocated_bytes(v)} B]" for v in op.outputs
            )
            tag = "B" if op.is_backward else "F"
            flags = "" if op.recomputable else " (keep)"
            lines.append(f"{tag}{i:<4} {op.name}({ins}) -> {outs} {op.time_ms:.3g} ms{flags}")
        return "\n".join(lines)
