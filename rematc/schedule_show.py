"""``rematc show``: what a schedule file keeps, what it recomputes, and its memory over the step.

Everything here is read from the file alone (its IR, costs and steps) through
``solvers.simulate``, the one memory/time model; no model, no torch.

Example:
    >>> print(summarize_schedule_file(read_schedule_file("gpt.schedule.json")))   # doctest: +SKIP
    schedule file   gpt.schedule.json (format 1, rematc 0.1.0, torch 2.13.0+cpu)
    graph           sha256:b1311eea561d... (601 ops, 719 values) on cpu
    budget          1.07 MiB (given as 0.4)
    predicted peak  1.04 MiB (no remat: 2.67 MiB, -61%)
    ...
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from solvers import Graph, Schedule, format_bytes, no_remat_schedule, simulate

from .schedule_file import ScheduleFile

__all__ = ["ScheduleDecisions", "decisions", "plot_schedule_file", "summarize_schedule_file"]


@dataclass(frozen=True)
class ScheduleDecisions:
    """What a schedule decided about the activations.

    Attributes:
        kept: (value name, storage bytes) of the activations saved by the
            forward for the backward, one per storage, largest first.
        recomputed: (op name, times run in the backward, time_ms of all
            those runs) of forward ops recomputed, most expensive first.
    """

    kept: tuple[tuple[str, int], ...]
    recomputed: tuple[tuple[str, int, float], ...]

    @property
    def kept_bytes(self) -> int:
        return sum(b for _, b in self.kept)

    @property
    def recomputed_time_ms(self) -> float:
        return sum(t for _, _, t in self.recomputed)


def decisions(graph: Graph, schedule: Schedule) -> ScheduleDecisions:
    """The kept storages and recomputed ops of ``schedule`` (same rule as codegen's saved values)."""
    from_forward: set[int] = set()
    for index in schedule.computes("forward"):
        from_forward.update(graph.ops[index].outputs)
    kept_roots: dict[int, str] = {}
    recomputed: Counter[int] = Counter()
    for index in schedule.computes("backward"):
        op = graph.ops[index]
        for v in op.inputs:
            root = graph.storage_root(v)
            if v in from_forward and graph.values[root].producer is not None:
                kept_roots.setdefault(root, graph.values[v].name)
        if not op.is_backward:
            recomputed[index] += 1
        from_forward.difference_update(op.outputs)  # later reads see the recomputed instance
    kept = sorted(((name, graph.values[root].bytes) for root, name in kept_roots.items()), key=lambda k: -k[1])
    recomputed_rows = sorted(
        ((graph.ops[i].name, n, n * graph.ops[i].time_ms) for i, n in recomputed.items()), key=lambda r: -r[2]
    )
    return ScheduleDecisions(tuple(kept), tuple(recomputed_rows))


def _percent(value: float, reference: float) -> str:
    return f"{(value / reference - 1) * 100:+.0f}%" if reference else "n/a"


def summarize_schedule_file(sf: ScheduleFile, path: str | os.PathLike[str] = "", *, top: int = 15) -> str:
    """A human summary: settings, predictions, blocks, and the largest kept / costliest recomputed values."""
    graph = sf.graph
    chosen = decisions(graph, sf.schedule)
    baseline = decisions(graph, no_remat_schedule(graph))
    rows = [
        ("schedule file", f"{path} (format {sf.format_version}, rematc {sf.rematc_version}, "
                          f"torch {sf.torch_version}, written {sf.created_utc})"),
        ("graph", f"{sf.graph_hash} ({graph.num_ops} ops, {len(graph.values)} values) on {sf.device}"),
        ("budget", f"{format_bytes(sf.budget_bytes)} = {sf.budget_bytes} bytes (given as {sf.budget_given})"),
        ("solver", f"method {sf.method}; profiler {sf.profile} on {sf.device_name or '?'}"),
        ("predicted peak", f"{format_bytes(sf.predicted_peak_bytes)} (no remat: "
                           f"{format_bytes(sf.baseline_peak_bytes)}, "
                           f"{_percent(sf.predicted_peak_bytes, sf.baseline_peak_bytes)})"),
        ("predicted time", f"{sf.predicted_time_ms:.4g} ms (no remat: {sf.baseline_time_ms:.4g} ms, "
                           f"{_percent(sf.predicted_time_ms, sf.baseline_time_ms)})"),
        ("kept", f"{len(chosen.kept)} activations, {format_bytes(chosen.kept_bytes)} "
                 f"(no remat: {len(baseline.kept)}, {format_bytes(baseline.kept_bytes)})"),
        ("recomputed", f"{sum(n for _, n, _ in chosen.recomputed)} op runs of {len(chosen.recomputed)} ops, "
                       f"{chosen.recomputed_time_ms:.4g} ms"),
        ("blocks", f"{len(sf.blocks)}" if sf.blocks else "none (whole-graph plan)"),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    for i, block in enumerate(sf.blocks):
        lines.append(f"  block {i}: " + ", ".join(f"{k}={v}" for k, v in block.items()))
    lines.append("")
    lines.append(f"kept for the backward (largest {min(top, len(chosen.kept))} of {len(chosen.kept)}):")
    lines += [f"  {format_bytes(b):>12}  {name}" for name, b in chosen.kept[:top]]
    lines.append("")
    lines.append(f"recomputed in the backward (costliest {min(top, len(chosen.recomputed))} "
                 f"of {len(chosen.recomputed)}):")
    lines += [f"  {t:10.4f} ms  {n}x {name}" for name, n, t in chosen.recomputed[:top]]
    return "\n".join(lines)


def memory_curve(graph: Graph, schedule: Schedule) -> tuple[list[float], list[int]]:
    """(start time in ms, bytes live while it runs) of every step; the maximum is the simulated peak.

    ``SimulationResult.memory_trace`` is the bytes live after each step; while
    a compute step runs its workspace is held too, so it is added back.
    """
    result = simulate(graph, schedule)
    starts: list[float] = []
    during: list[int] = []
    clock = 0.0
    for (kind, index), live_after in zip(schedule.steps, result.memory_trace):
        starts.append(clock)
        if kind == "compute":
            op = graph.ops[index]
            during.append(live_after + op.workspace_bytes)
            clock += op.time_ms
        else:
            during.append(live_after)
    starts.append(clock)
    during.append(during[-1] if during else 0)
    return starts, during


def plot_schedule_file(sf: ScheduleFile, out: str | os.PathLike[str], title: str = "") -> Path:
    """Plot predicted memory over the step for the schedule and for no remat, with the budget; write a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # explicit Agg: no display needed
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 4.5), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    mib = 2**20
    for label, schedule, color in (
        ("no remat", no_remat_schedule(sf.graph), "tab:gray"),
        ("rematc schedule", sf.schedule, "tab:blue"),
    ):
        starts, during = memory_curve(sf.graph, schedule)
        peak = max(during)
        axes.plot(starts, [b / mib for b in during], drawstyle="steps-post", color=color,
                  label=f"{label} (peak {format_bytes(peak)}, {starts[-1]:.3g} ms)")
        boundary = starts[len(schedule.forward)]
        axes.axvline(boundary, color=color, linestyle=":", linewidth=0.8)
    axes.axhline(sf.budget_bytes / mib, color="tab:red", linestyle="--", label=f"budget {format_bytes(sf.budget_bytes)}")
    axes.set_xlabel("predicted time into the step (ms; dotted: end of the forward)")
    axes.set_ylabel("live memory above the start (MiB)")
    axes.set_title(title or f"rematc schedule {sf.graph_hash[:19]}... on {sf.device}")
    axes.set_ylim(bottom=0)
    axes.legend(loc="upper left", fontsize="small")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, format="png")
    return out
