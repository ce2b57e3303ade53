"""``Rockmate.explain()``: what a plan keeps, what it recomputes, and where it peaks.

Like JAX's ``print_saved_residuals``, every activation the plan saves for the
backward or recomputes during it is listed with its bytes, the op that makes
it and the user's source line (the last frame of fx's
``node.meta["stack_trace"]``). Values are grouped by the chain's blocks when
the graph has more than one (``solvers.partition``), else in one section.

NOTE: [Kept bytes] The figures add up to the simulator's:
``kept_bytes + forward_output_bytes == predicted.live_after_forward_bytes``.
Each storage is counted once: a storage held by a forward output (the loss,
the logits the caller receives) counts as output bytes; a saved value on a
storage counted already (a view of another kept value, or of a parameter) is
listed with 0 bytes and names what it shares.

Example output::

    rematc plan: budget 1.70 MiB, predicted peak 1.67 MiB (no remat: 2.42 MiB)
    peak: in the backward (step 8 of 642), computing _log_softmax_backward_data (aten._log_softmax_backward_data.default)
          models.py:89 in lm_loss: return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
    kept for backward: 58 values, 1.42 MiB; recomputed: 42 values (42 recomputations), 966.00 KiB
    forward outputs: 4 B; live after forward = 1.42 MiB + 4 B = 1.42 MiB

    block 4 of 12
      recomputed   32.00 KiB  getitem_2    aten.native_layer_norm.default  models.py:62 in forward: x = x + self.attn(self.ln_1(x))
      kept               0 B  t            aten.t.default                  models.py:38 in forward: q, k, v = ...  [shares input or parameter primals_6]
      kept         32.00 KiB  _unsafe_view aten._unsafe_view.default       models.py:41 in forward: scores = ...
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch.fx as fx

import solvers

if TYPE_CHECKING:  # api imports this module
    from .api import Plan

Decision = Literal["kept", "recomputed"]

_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<name>\S+)\n(?P<code>[^\n]*)')


@dataclass(frozen=True, slots=True)
class ValueReport:
    """One activation the plan keeps for the backward or recomputes in it.

    Attributes:
        name: the joint graph's node name.
        decision: ``"kept"`` (saved by the forward for the backward) or
            ``"recomputed"`` (freed after the forward, computed again in the
            backward; ``recompute_count`` times).
        bytes: bytes of storage this value accounts for (0 for a view, or a
            value whose storage another listed value or an output already
            counts; see NOTE: [Kept bytes]).
        storage_bytes: bytes of the storage it lives in.
        shares: the value or output whose storage it shares, if any.
        op: the aten op that produces it.
        source: the user's source line, ``file:line in function: code``.
        block: index of the chain block whose forward makes it (0 when the
            graph is one block).
        recompute_count: how many times the backward recomputes it.
    """

    name: str
    decision: Decision
    bytes: int
    storage_bytes: int
    shares: str | None
    op: str
    source: str
    block: int
    recompute_count: int = 0


@dataclass(frozen=True, slots=True)
class Explanation:
    """A plan in words; ``str()`` (and ``repr()``) is the report.

    Attributes:
        values: every kept or recomputed activation, in graph order.
        budget_bytes: the budget the plan was made for.
        predicted_peak_bytes: peak predicted by ``solvers.simulate``.
        baseline_peak_bytes: predicted peak without rematerialization.
        peak_phase: ``"forward"`` or ``"backward"``: where the peak occurs.
        peak_step: position of the peak in the schedule's steps.
        peak_op: the op running at the peak (its node name).
        peak_target: that op's aten target.
        peak_source: that op's source line.
        kept_bytes: storage bytes saved for the backward, outputs' storages excluded.
        recomputed_bytes: bytes recomputed (each recomputation counted).
        forward_output_bytes: storage bytes of the forward outputs.
        live_after_forward_bytes: the simulator's bytes live when the forward
            ends; equals ``kept_bytes + forward_output_bytes``.
        num_blocks: blocks of the chain (1 when the graph has no cut).
        num_forward_steps: steps of the schedule's forward phase.
        num_steps: steps of the schedule.
    """

    values: tuple[ValueReport, ...]
    budget_bytes: int
    predicted_peak_bytes: int
    baseline_peak_bytes: int
    peak_phase: str
    peak_step: int
    peak_op: str
    peak_target: str
    peak_source: str
    kept_bytes: int
    recomputed_bytes: int
    forward_output_bytes: int
    live_after_forward_bytes: int
    num_blocks: int
    num_forward_steps: int
    num_steps: int

    @property
    def kept(self) -> tuple[ValueReport, ...]:
        return tuple(v for v in self.values if v.decision == "kept")

    @property
    def recomputed(self) -> tuple[ValueReport, ...]:
        return tuple(v for v in self.values if v.decision == "recomputed")

    def __str__(self) -> str:
        fmt = solvers.format_bytes
        recompute_ops = sum(v.recompute_count for v in self.recomputed)
        lines = [
            f"rematc plan: budget {fmt(self.budget_bytes)}, predicted peak {fmt(self.predicted_peak_bytes)} "
            f"(no remat: {fmt(self.baseline_peak_bytes)})",
            f"peak: in the {self.peak_phase} (step {self._phase_step} of {self._phase_steps}), "
            f"computing {self.peak_op} ({self.peak_target})",
        ]
        if self.peak_source:
            lines.append(f"      {self.peak_source}")
        lines += [
            f"kept for backward: {len(self.kept)} values, {fmt(self.kept_bytes)}; "
            f"recomputed: {len(self.recomputed)} values ({recompute_ops} recomputations), {fmt(self.recomputed_bytes)}",
            f"forward outputs: {fmt(self.forward_output_bytes)}; live after forward = "
            f"{fmt(self.kept_bytes)} + {fmt(self.forward_output_bytes)} = {fmt(self.live_after_forward_bytes)}",
        ]
        name_width = max((len(v.name) for v in self.values), default=4)
        op_width = max((len(v.op) for v in self.values), default=2)
        for block in sorted({v.block for v in self.values}):
            lines += ["", f"block {block + 1} of {self.num_blocks}" if self.num_blocks > 1 else "all ops (one block)"]
            for v in (v for v in self.values if v.block == block):
                times = f" x{v.recompute_count}" if v.recompute_count > 1 else ""
                shares = f"  [shares {v.shares}]" if v.shares else ""
                lines.append(
                    f"  {v.decision:<10}  {fmt(v.bytes):>10}  {v.name + times:<{name_width + 3}}  "
                    f"{v.op:<{op_width}}  {v.source}{shares}"
                )
        return "\n".join(lines)

    __repr__ = __str__

    @property
    def _phase_step(self) -> int:
        return self.peak_step + 1 - (self.num_forward_steps if self.peak_phase == "backward" else 0)

    @property
    def _phase_steps(self) -> int:
        return self.num_steps - self.num_forward_steps if self.peak_phase == "backward" else self.num_forward_steps


def explain_plan(plan: Plan) -> Explanation:
    """Describe ``plan``: kept and recomputed values, their bytes and sources, and the peak."""
    lowered, schedule, graph = plan.lowered, plan.schedule, plan.lowered.graph
    value_index = {node.name: v for v, node in enumerate(lowered.value_nodes) if node is not None}
    saved = [value_index[name] for name in plan.modules.saved if name in value_index]
    block_of_op = _blocks(graph)
    num_blocks = max(block_of_op.values(), default=0) + 1

    # Storages: outputs first, then kept values in graph order (NOTE: [Kept bytes]).
    owner: dict[int, str] = {}
    for v in graph.forward_outputs:
        owner.setdefault(graph.storage_root(v), graph.values[v].name)
    forward_output_bytes = sum(graph.allocated_bytes(root) for root in owner)

    reports: list[ValueReport] = []
    kept_bytes = 0
    for v in sorted(v for v in saved if not graph.values[v].is_resident):
        root = graph.storage_root(v)
        storage = graph.allocated_bytes(root)
        shares = owner.get(root) if root in owner else (None if storage else _resident_name(graph, root))
        attributed = 0 if root in owner else storage
        owner.setdefault(root, graph.values[v].name)
        kept_bytes += attributed
        reports.append(_report(lowered, v, "kept", attributed, storage, shares, block_of_op, 0))

    recomputed_counts: dict[int, int] = {}
    forward_ops = set(schedule.computes("forward"))
    for index in schedule.computes("backward"):
        if index in forward_ops and not graph.ops[index].is_backward:
            recomputed_counts[index] = recomputed_counts.get(index, 0) + 1
    recomputed_bytes = 0
    for index, count in sorted(recomputed_counts.items()):
        for v in graph.ops[index].outputs:
            nbytes = graph.allocated_bytes(v)
            recomputed_bytes += nbytes * count
            shares = None if graph.values[v].view_of is None else graph.values[graph.storage_root(v)].name
            reports.append(_report(lowered, v, "recomputed", nbytes, nbytes, shares, block_of_op, count))
    reports.sort(key=lambda r: (r.block, value_index.get(r.name, 0)))

    steps = schedule.steps
    peak_step = plan.predicted.peak_step
    peak_kind, peak_index = steps[peak_step] if 0 <= peak_step < len(steps) else ("compute", -1)
    peak_node = lowered.op_nodes[peak_index] if peak_kind == "compute" and peak_index >= 0 else None
    return Explanation(
        values=tuple(reports),
        budget_bytes=plan.budget_bytes,
        predicted_peak_bytes=plan.predicted.peak_bytes,
        baseline_peak_bytes=plan.baseline.peak_bytes,
        peak_phase="forward" if peak_step < len(schedule.forward) else "backward",
        peak_step=peak_step,
        peak_op=peak_node.name if peak_node is not None else "?",
        peak_target=_target(peak_node) if peak_node is not None else "?",
        peak_source=source_line(peak_node) if peak_node is not None else "",
        kept_bytes=kept_bytes,
        recomputed_bytes=recomputed_bytes,
        forward_output_bytes=forward_output_bytes,
        live_after_forward_bytes=plan.predicted.live_after_forward_bytes,
        num_blocks=num_blocks,
        num_forward_steps=len(schedule.forward),
        num_steps=len(steps),
    )


def source_line(node: fx.Node) -> str:
    """The last frame of ``node``'s stack trace as ``file:line in function: code`` ('' if none)."""
    trace = node.meta.get("stack_trace") or ""
    frames = list(_FRAME.finditer(trace))
    if not frames:
        return ""
    last = frames[-1]
    where = f"{last['file'].rsplit('/', 1)[-1]}:{last['line']} in {last['name']}"
    code = last["code"].strip()
    return f"{where}: {code}" if code else where


def _report(lowered, v: int, decision: Decision, nbytes: int, storage: int, shares: str | None,
            block_of_op: dict[int, int], count: int) -> ValueReport:
    graph = lowered.graph
    producer = graph.values[v].producer
    node = lowered.op_nodes[producer] if producer is not None else None
    return ValueReport(
        name=graph.values[v].name,
        decision=decision,
        bytes=nbytes,
        storage_bytes=storage,
        shares=shares,
        op=_target(node) if node is not None else "?",
        source=source_line(node) if node is not None else "",
        block=block_of_op.get(producer, 0) if producer is not None else 0,
        recompute_count=count,
    )


def _target(node: fx.Node) -> str:
    return str(node.target) if node.op == "call_function" else node.op


def _resident_name(graph: solvers.Graph, root: int) -> str | None:
    value = graph.values[root]
    return f"input or parameter {value.name}" if value.is_resident else None


def _blocks(graph: solvers.Graph) -> dict[int, int]:
    """Forward op index -> chain block, or {} (one section) when the graph has no chain."""
    try:
        from solvers.partition import partition_chain
    except ImportError:  # the partitioner is optional for explanations
        return {}
    chain = partition_chain(graph)
    block_of: dict[int, int] = {}
    for b, block in enumerate(chain.blocks):
        for op in block.forward_ops:
            block_of.setdefault(op, b)  # a replicated op belongs to the first block that makes it
    return block_of
