"""The benchmark's outputs: rows, the Markdown table, the goal checks, the memory-vs-time plot.

Nothing here measures; every figure comes from the :class:`Row` records that
``compare.py`` fills from one run.
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MIB = 1024 * 1024
README_BEGIN = "<!-- benchmarks/compare.py results: begin -->"
README_END = "<!-- benchmarks/compare.py results: end -->"

# The goals stated next to the README's table (no test asserts a time).
GOAL_CHECKPOINT_OVERHEAD_SHARE = 0.5   # rematc's overhead <= half of checkpointing's, at its memory
GOAL_OVERHEAD_AT_HALF_PEAK = 0.05      # rematc's overhead at 50% of the plain peak


@dataclass
class Row:
    """One line of the table: a method at one setting on one model.

    ``status`` is ``"ok"``, ``"failed: <error>"`` or ``"infeasible (min X)"``;
    the figures are None unless it is ``"ok"`` (``budget_bytes`` excepted).
    Peaks and times are measured; ``predicted_peak_bytes`` is rematc's model.
    """

    model: str
    family: str
    label: str
    setting: str
    short: str
    status: str = "ok"
    peak_bytes: int | None = None
    peak_fraction: float | None = None
    step_ms: float | None = None
    time_ratio: float | None = None
    time_ratio_iqr: float | None = None
    wall_ms: float | None = None
    wall_ratio: float | None = None
    grad_max_diff: float | None = None
    setup_seconds: float | None = None
    budget_bytes: int | None = None
    predicted_peak_bytes: int | None = None
    predicted_time_ratio: float | None = None
    min_feasible_bytes: int | None = None
    same_as: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.peak_fraction is not None and self.time_ratio is not None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def mib(num_bytes: int | None) -> str:
    return "" if num_bytes is None else f"{num_bytes / MIB:.2f}"


def _diff(value: float | None) -> str:
    if value is None:
        return ""
    return "0 (bitwise)" if value == 0 else f"{value:.1e}"


def markdown_table(rows: list[Row]) -> str:
    """One Markdown table for one model's rows."""
    wall = any(row.wall_ratio is not None for row in rows)
    header = (
        "| method | setting | peak MiB | peak / plain | step time / plain | "
        + ("wall clock / plain | " if wall else "")
        + "max abs grad diff | plan / compile s | notes |\n|---|---|--:|--:|--:|"
        + ("--:|" if wall else "")
        + "--:|--:|---|"
    )
    lines = [header]
    for row in rows:
        notes = [] if row.status == "ok" else [row.status]
        if row.same_as is not None:
            notes.append(f"same budget as '{row.same_as}': one plan, measured once")
        if row.family == "rematc" and row.budget_bytes is not None:
            notes.append(f"budget {mib(row.budget_bytes)} MiB")
            if row.predicted_peak_bytes is not None:
                notes.append(f"predicted {mib(row.predicted_peak_bytes)} MiB")
            if row.predicted_time_ratio is not None:
                notes.append(f"predicted time {row.predicted_time_ratio:.2f}x")
            if row.peak_bytes is not None and row.peak_bytes > row.budget_bytes:
                notes.append("**measured peak exceeds the budget**")
        lines.append(
            "| "
            + " | ".join(
                [
                    row.label,
                    row.setting,
                    mib(row.peak_bytes),
                    "" if row.peak_fraction is None else f"{row.peak_fraction:.2f}",
                    _ratio_cell(row),
                    *([("" if row.wall_ratio is None else f"{row.wall_ratio:.2f}x")] if wall else []),
                    _diff(row.grad_max_diff),
                    "" if row.setup_seconds is None else f"{row.setup_seconds:.1f}",
                    "; ".join(notes).replace("|", "/"),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def _ratio_cell(row: Row) -> str:
    if row.time_ratio is None:
        return ""
    if row.family == "plain" or row.time_ratio_iqr is None:
        return f"{row.time_ratio:.2f}x"
    return f"{row.time_ratio:.2f}x ±{row.time_ratio_iqr / 2:.2f}"


def _overhead(ratio: float) -> str:
    return f"{(ratio - 1) * 100:+.0f}%"


def goal_checks(rows: list[Row]) -> list[str]:
    """The README's goals for one model, each as a bullet with the figures behind it."""
    rematc = [r for r in rows if r.family == "rematc"]
    baselines = [r for r in rows if r.family not in ("plain", "rematc") and r.ok]
    by_short = {r.short: r for r in rematc}
    checks: list[str] = []

    checkpoint = next((r for r in baselines if r.family == "checkpoint"), None)
    at_checkpoint = by_short.get("rematc@checkpoint")
    if checkpoint is None or at_checkpoint is None or not at_checkpoint.ok:
        status = "not measured" if at_checkpoint is None else at_checkpoint.status
        verdict = "MISSED: " if status.startswith("infeasible") else ""
        checks.append(f"- {verdict}rematc at checkpointing's peak: {status}.")
    else:
        assert checkpoint.time_ratio is not None and at_checkpoint.time_ratio is not None
        limit = 1 + GOAL_CHECKPOINT_OVERHEAD_SHARE * (checkpoint.time_ratio - 1)
        met = at_checkpoint.time_ratio <= limit
        checks.append(
            f"- {'MET' if met else 'MISSED'}: at checkpointing's peak ({mib(checkpoint.peak_bytes)} MiB), rematc's "
            f"overhead is {_overhead(at_checkpoint.time_ratio)} against checkpointing's "
            f"{_overhead(checkpoint.time_ratio)} (goal: at most half)."
        )

    half = by_short.get("rematc@50%")
    if half is None or not half.ok:
        status = "not measured" if half is None else half.status
        verdict = "MISSED: " if status.startswith("infeasible") else ""
        checks.append(f"- {verdict}rematc at 50% of the plain peak: {status}.")
    else:
        assert half.time_ratio is not None
        met = half.time_ratio - 1 <= GOAL_OVERHEAD_AT_HALF_PEAK
        checks.append(
            f"- {'MET' if met else 'MISSED'}: at 50% of the plain peak rematc's overhead is "
            f"{_overhead(half.time_ratio)} (goal: at most +{GOAL_OVERHEAD_AT_HALF_PEAK:.0%})."
        )

    smallest = by_short.get("rematc@min")
    if smallest is not None and smallest.status.startswith("infeasible"):
        checks.append(
            f"- BUG: planning at the minimum budget rematc reported ({mib(smallest.budget_bytes)} MiB, "
            f"{smallest.budget_bytes} bytes) raised BudgetTooSmall again ({smallest.min_feasible_bytes} bytes)."
        )
    elif smallest is None or not smallest.ok or not baselines:
        checks.append("- rematc's minimum feasible peak: not measured.")
    else:
        lowest = min(baselines, key=lambda r: r.peak_bytes or 0)
        assert smallest.peak_bytes is not None and lowest.peak_bytes is not None
        met = smallest.peak_bytes < lowest.peak_bytes
        checks.append(
            f"- {'MET' if met else 'MISSED'}: rematc's minimum feasible peak is {mib(smallest.peak_bytes)} MiB "
            f"({smallest.peak_fraction:.2f} of plain); the lowest baseline is {lowest.label} "
            f"{lowest.setting} at {mib(lowest.peak_bytes)} MiB ({lowest.peak_fraction:.2f})."
        )

    measured = [r for r in rematc if r.ok]
    if measured:
        worst = max(r.grad_max_diff if r.grad_max_diff is not None else math.inf for r in measured)
        met = worst == 0
        checks.append(
            f"- {'MET' if met else 'MISSED'}: gradients of all {len(measured)} rematc rows vs plain autograd: "
            + ("bitwise equal." if met else f"max abs difference {worst:.1e}.")
        )
    over = [r for r in measured if r.budget_bytes is not None and (r.peak_bytes or 0) > r.budget_bytes]
    if over:
        checks.append(f"- BUG: {len(over)} rematc rows measured above their budget: " + ", ".join(r.setting for r in over))
    checks.extend(losses_to_baselines(rows))
    return checks


def losses_to_baselines(rows: list[Row]) -> list[str]:
    """Baselines that the rematc curve does not dominate (no rematc point as small and as fast)."""
    rematc = [r for r in rows if r.family == "rematc" and r.ok]
    found: list[str] = []
    for baseline in rows:
        if baseline.family in ("plain", "rematc") or not baseline.ok:
            continue
        assert baseline.peak_bytes is not None and baseline.time_ratio is not None
        fitting = [r for r in rematc if r.peak_bytes is not None and r.peak_bytes <= baseline.peak_bytes]
        name = f"{baseline.label} ({baseline.setting})" if baseline.setting else baseline.label
        if not fitting:
            found.append(
                f"- rematc LOSES to {name}: it reaches {baseline.peak_fraction:.2f} of the plain peak, "
                "below every rematc point."
            )
            continue
        best = min(fitting, key=lambda r: r.time_ratio or math.inf)
        assert best.time_ratio is not None
        if best.time_ratio > baseline.time_ratio:
            found.append(
                f"- rematc LOSES to {name}: at <= {mib(baseline.peak_bytes)} MiB its best step time is "
                f"{best.time_ratio:.2f}x ({best.setting}) against {baseline.time_ratio:.2f}x."
            )
    return found


# tab10 without red, which is rematc's curve.
BASELINE_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:gray",
                   "tab:olive", "tab:cyan")


def plot(rows_by_model: dict[str, list[Row]], path: Path, title: str, time_label: str = "step time") -> None:
    """Peak (fraction of plain) against step-time ratio: one subplot per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows_by_model)
    figure, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 4.4), squeeze=False)
    markers = {"plain": "*", "checkpoint": "s", "sac": "D", "compile": "^"}
    for axis, name in zip(axes[0], names):
        rows = rows_by_model[name]
        curve = sorted((r for r in rows if r.family == "rematc" and r.ok), key=lambda r: r.peak_fraction or 0)
        if curve:
            axis.plot(
                [r.peak_fraction for r in curve], [r.time_ratio for r in curve],
                "-o", color="tab:red", label="rematc", zorder=3,
            )
        for index, row in enumerate(r for r in rows if r.family != "rematc" and r.ok):
            label = row.short
            axis.scatter(
                [row.peak_fraction], [row.time_ratio], marker=markers.get(row.family, "o"), s=70,
                color=BASELINE_COLORS[index % len(BASELINE_COLORS)], label=label, zorder=4,
            )
        axis.axhline(1.0, color="grey", lw=0.6, ls=":")
        axis.set_title(name)
        axis.set_xlabel("peak memory / plain autograd")
        axis.set_ylabel(f"{time_label} / plain autograd")
        axis.set_xlim(left=0)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, loc="lower left")  # low memory at low time: the corner no method reaches
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def machine_description(device: Any, threads: int) -> str:
    """The machine in words: the GPU, or the CPU model, its cores and the threads used."""
    import torch

    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        return f"{properties.name} ({properties.total_memory / 2**30:.0f} GiB), torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = "a GPU was available but not used" if torch.cuda.is_available() else "no GPU available"
    return (
        f"CPU: {cpu}, {os.cpu_count()} cores, torch.set_num_threads({threads}); {gpu}; "
        f"torch {torch.__version__}, Python {platform.python_version()}"
    )


def git_revision() -> str:
    """The checkout's short commit, and whether the tree has uncommitted changes."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True)
    except OSError:
        return "unknown"
    return head.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")


def update_readme(path: Path, results_text: str, plot_path: Path | None) -> None:
    """Replace what lies between the two marker lines of ``path`` with this run's results.

    Headings are moved two levels down (the results sit inside the README's
    Benchmarks section) and the plot is linked.
    """
    readme = path.read_text()
    if README_BEGIN not in readme or README_END not in readme:
        raise SystemExit(f"--readme {path}: the marker lines {README_BEGIN!r} and {README_END!r} are missing")
    before, rest = readme.split(README_BEGIN, 1)
    _, after = rest.split(README_END, 1)
    body = results_text.replace("\n### ", "\n#### ")
    if plot_path is not None:
        plot = plot_path.resolve()
        try:
            link = plot.relative_to(path.resolve().parent)
        except ValueError:
            link = plot
        body = f"![memory against step time]({link.as_posix()})\n\n" + body
    path.write_text(before + README_BEGIN + "\n" + body + README_END + after)
