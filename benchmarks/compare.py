"""rematc against PyTorch's own memory-saving tools: peak memory against step time.

Usage::

    python benchmarks/compare.py --quick                  # 2-core CPU, a few minutes
    python benchmarks/compare.py --device cuda            # GPU, GPT-2 small's 12 layers

For each model, in one process and with one meter (``profiler.meter.MemoryMeter``:
the profiler's allocation events on CPU, ``max_memory_allocated`` on CUDA), it
builds plain autograd, ``torch.utils.checkpoint`` per block, selective
activation checkpointing, ``torch.compile`` at ``activation_memory_budget``
0.8/0.5/0.2 (``aot_eager``, then ``inductor``), and rematc at the peaks those
reach, at 50/33/20% of the plain peak and at its minimum feasible peak. Each
method runs one warm-up step and one metered step (peak, gradients compared
with plain autograd's), then all methods are timed round-robin, one step each
per round, so that drift hits them all alike; the median is reported as a
ratio to plain autograd's. Outputs: ``OUT/results_<device>[_quick].md`` and
``.json``, and the plot (``--plot``).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import copy  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402

import solvers  # noqa: E402
from benchmarks import methods as M  # noqa: E402
from benchmarks.report import (  # noqa: E402
    README_BEGIN, README_END, Row, git_revision, goal_checks, machine_description, markdown_table, mib, plot,
    update_readme,
)
from benchmarks.workloads import Workload, workloads  # noqa: E402
from profiler.meter import MemoryMeter  # noqa: E402

COMPILE_MEMORY_BUDGETS = (0.8, 0.5, 0.2)
REMATC_PLAIN_FRACTIONS = (0.5, 0.33, 0.2)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _error_text(error: BaseException) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    first = lines[0] if lines else ""
    return f"failed: {type(error).__name__}: {first[:160]}"


class WorkloadBench:
    """All methods on one model: build, meter, compare gradients, then time round-robin."""

    def __init__(self, workload: Workload, device: torch.device, options: argparse.Namespace) -> None:
        self.workload = workload
        self.device = device
        self.options = options
        torch.manual_seed(0)
        self.base = workload.make_model().to(device).train()
        args, targets = workload.make_batch(torch.Generator().manual_seed(0))
        self.args = tuple(a.to(device) for a in args)
        self.targets = targets.to(device)
        self.rows: list[Row] = []
        self.methods: list[tuple[Row, M.Method]] = []
        self.reference_grads: list[torch.Tensor | None] | None = None
        self.plain_peak_bytes: int | None = None
        self.twins: list[tuple[Row, Row]] = []  # (row, the row whose measurement it shares)

    def copy_model(self) -> torch.nn.Module:
        return copy.deepcopy(self.base)

    # -- one method: build, warm up, meter ------------------------------------------------
    def add(self, row: Row, build: Callable[[], M.Method]) -> Row:
        """Build a method, run a warm-up and a metered step; record a failure instead of raising."""
        self.rows.append(row)
        log(f"{self.workload.name}: {row.label} {row.setting}")
        try:
            method = build()
            row.setup_seconds = method.setup_seconds
            row.budget_bytes = method.budget_bytes
            row.predicted_peak_bytes = method.predicted_peak_bytes
            row.predicted_time_ratio = method.predicted_time_ratio
            self.run_step(method)  # warm-up (compile and planning already ran one step)
            row.peak_bytes = self.metered_step(method)
            row.grad_max_diff = self.grad_max_diff(method.model)
        except Exception as error:  # noqa: BLE001 - a failing method is a result, not a crash
            if isinstance(error, M.BudgetTooSmall):
                row.status = f"infeasible (min {mib(error.min_budget_bytes)} MiB)"
                row.min_feasible_bytes = error.min_budget_bytes
            else:
                row.status = _error_text(error)
                if self.options.verbose:
                    traceback.print_exc()
            log(f"  -> {row.status}")
            return row
        self.methods.append((row, method))
        log(f"  -> peak {mib(row.peak_bytes)} MiB, grad diff {row.grad_max_diff}, setup {row.setup_seconds}")
        return row

    def run_step(self, method: M.Method) -> None:
        method.model.zero_grad(set_to_none=True)
        method.step()

    def metered_step(self, method: M.Method) -> int:
        method.model.zero_grad(set_to_none=True)
        synchronize(self.device)
        with MemoryMeter(self.device) as meter:
            method.step()
        return meter.peak_bytes

    def grad_max_diff(self, model: torch.nn.Module) -> float:
        grads = [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]
        if self.reference_grads is None:  # this is plain autograd: the reference
            self.reference_grads = grads
            return 0.0
        if len(grads) != len(self.reference_grads):
            return math.inf
        worst = 0.0
        for got, want in zip(grads, self.reference_grads):
            if got is None and want is None:
                continue
            if got is None or want is None:
                return math.inf
            worst = max(worst, (got.float() - want.float()).abs().max().item())
        return worst

    # -- the methods ------------------------------------------------------------------------
    def run_baselines(self) -> None:
        w, args, targets = self.workload, self.args, self.targets
        plain = self.add(
            Row(w.name, "plain", "plain autograd", "", "plain"),
            lambda: M.plain(self.copy_model(), w, args, targets),
        )
        if not plain.ok and plain.peak_bytes is None:
            raise RuntimeError(f"plain autograd failed on {w.name}: {plain.status}")
        self.plain_peak_bytes = plain.peak_bytes
        self.add(
            Row(w.name, "checkpoint", "checkpoint every block", "use_reentrant=False", "checkpoint"),
            lambda: M.checkpointed(self.copy_model(), w, args, targets),
        )
        self.add(
            Row(w.name, "sac", "selective checkpoint (SAC)", "save mm/attention/conv", "SAC"),
            lambda: M.selective(self.copy_model(), w, args, targets),
        )
        for backend in self.compile_backends():
            for budget in self.compile_budgets(backend):
                self.add(
                    Row(
                        w.name, "compile", f"torch.compile {backend}", f"activation_memory_budget={budget}",
                        f"{backend}@{budget}",
                    ),
                    functools.partial(
                        self.compiled, backend=backend, memory_budget=budget, use_caches=self.options.inductor_cache
                    ),
                )

    def compiled(self, *, backend: str, memory_budget: float, use_caches: bool) -> M.Method:
        return M.compiled(
            self.copy_model(), self.workload, self.args, self.targets,
            backend=backend, memory_budget=memory_budget, use_caches=use_caches,
        )

    def compile_backends(self) -> list[str]:
        return ["aot_eager"] if self.options.inductor == "none" else ["aot_eager", "inductor"]

    def compile_budgets(self, backend: str) -> tuple[float, ...]:
        if backend == "inductor" and self.options.inductor == "one":
            return (0.5,) if self.workload.name == self.options.inductor_model else ()
        return COMPILE_MEMORY_BUDGETS

    def rematc_budgets(self) -> list[tuple[str, str, int]]:
        """(setting, short name, budget bytes): the baselines' measured peaks, then fractions of plain."""
        assert self.plain_peak_bytes is not None
        budgets: list[tuple[str, str, int]] = []
        for row in self.rows:
            if row.family != "plain" and row.status == "ok" and row.peak_bytes is not None:
                budgets.append((f"budget = {row.short} peak", f"rematc@{row.short}", row.peak_bytes))
        for fraction in REMATC_PLAIN_FRACTIONS:
            budgets.append(
                (f"budget = {fraction:.0%} of plain", f"rematc@{fraction:.0%}", int(fraction * self.plain_peak_bytes))
            )
        if self.options.rematc_budgets:
            budgets = [b for b in budgets if b[1].removeprefix("rematc@") in self.options.rematc_budgets]
        return budgets

    def run_rematc(self) -> None:
        """rematc at every budget, largest first; then at its minimum feasible budget.

        A budget below rematc's minimum raises ``BudgetTooSmall`` naming that
        minimum; once it is known, smaller budgets are recorded as infeasible
        without planning again (same graph, same solver). Only when every budget
        fits is the minimum asked for with a 1-byte budget.
        """
        w, args, targets = self.workload, self.args, self.targets
        method_name = self.options.rematc_method
        shared = self.copy_model()  # every budget plans the same module; gradients are zeroed per step
        first_row = len(self.rows)
        budgets = self.rematc_budgets()
        rows_by_index: dict[int, Row] = {}
        planned: dict[int, Row] = {}  # budget bytes -> row
        min_bytes: int | None = None

        def plan(setting: str, short: str, budget: int) -> Row:
            twin = planned.get(budget)
            if twin is not None and twin.status == "ok":
                # The same budget twice (the minimum is a baseline's peak): one plan, measured once.
                row = Row(w.name, "rematc", "rematc", setting, short, budget_bytes=budget, same_as=twin.setting)
                self.rows.append(row)
                self.twins.append((row, twin))
                return row
            row = self.add(
                Row(w.name, "rematc", "rematc", setting, short, budget_bytes=budget),
                lambda: M.rematc(shared, w, args, targets, budget_bytes=budget, label=setting, method=method_name),
            )
            planned[budget] = row
            return row

        for index in sorted(range(len(budgets)), key=lambda i: -budgets[i][2]):
            setting, short, budget = budgets[index]
            if min_bytes is not None and budget < min_bytes:
                row = Row(w.name, "rematc", "rematc", setting, short, f"infeasible (min {mib(min_bytes)} MiB)",
                          budget_bytes=budget, min_feasible_bytes=min_bytes)
                self.rows.append(row)
            else:
                row = plan(setting, short, budget)
                min_bytes = row.min_feasible_bytes if row.min_feasible_bytes is not None else min_bytes
            rows_by_index[index] = row
        if self.options.rematc_budgets and "min" not in self.options.rematc_budgets:
            self.rows[first_row:] = [rows_by_index[i] for i in sorted(rows_by_index)]
            return
        if min_bytes is None:
            log(f"{w.name}: rematc minimum feasible budget (1-byte probe)")
            try:
                min_bytes = M.min_feasible_budget(shared, w, args, targets, method_name)
            except Exception as error:  # noqa: BLE001
                self.rows.append(Row(w.name, "rematc", "rematc", "minimum feasible budget", "rematc@min", _error_text(error)))
                log(f"  -> {_error_text(error)}")
                return
        rows_by_index[len(budgets)] = plan("minimum feasible budget", "rematc@min", min_bytes)
        # The table lists rematc's rows in the order of the budgets above, not the order planned.
        self.rows[first_row:] = [rows_by_index[i] for i in sorted(rows_by_index)]

    # -- timing -----------------------------------------------------------------------------
    def time_round_robin(self, repetitions: int) -> None:
        """One step of every method per round, starting one method later each round; median per method.

        NOTE: [CPU time on a shared CPU] On CPU the step time is the process's
        CPU time (``time.process_time``), the wall-clock time is kept beside
        it. With one thread, a step's CPU time is what its wall-clock time
        would be on an idle machine; on a shared one (other jobs on the same
        cores) the wall clock also counts the time spent waiting for a core,
        which is noise. On CUDA the step time is the wall clock around a
        synchronize.
        """
        cpu_seconds: list[list[float]] = [[] for _ in self.methods]
        wall_seconds: list[list[float]] = [[] for _ in self.methods]
        count = len(self.methods)
        log(f"{self.workload.name}: timing {count} methods x {repetitions} rounds")
        gc.collect()
        gc.disable()  # a collection inside one method's step would be charged to it
        try:
            for repetition in range(repetitions):
                for offset in range(count):
                    index = (repetition + offset) % count
                    row, method = self.methods[index]
                    method.model.zero_grad(set_to_none=True)
                    synchronize(self.device)
                    started_wall, started_cpu = time.perf_counter(), time.process_time()
                    method.step()
                    synchronize(self.device)
                    cpu_seconds[index].append(time.process_time() - started_cpu)
                    wall_seconds[index].append(time.perf_counter() - started_wall)
        finally:
            gc.enable()
        for (row, _), cpu, wall in zip(self.methods, cpu_seconds, wall_seconds):
            row.wall_ms = statistics.median(wall) * 1e3
            row.step_ms = statistics.median(cpu) * 1e3 if self.device.type == "cpu" else row.wall_ms
        plain_index = next(i for i, (row, _) in enumerate(self.methods) if row.family == "plain")
        plain = self.methods[plain_index][0]
        step_seconds = cpu_seconds if self.device.type == "cpu" else wall_seconds
        for (row, _), samples in zip(self.methods, step_seconds):
            # Noise: spread of the ratio to plain autograd's step in the same round.
            ratios = [a / b for a, b in zip(samples, step_seconds[plain_index])]
            if len(ratios) >= 2:
                low, _, high = statistics.quantiles(ratios, n=4)
                row.time_ratio_iqr = high - low
        assert plain.step_ms is not None and plain.wall_ms is not None and self.plain_peak_bytes is not None
        for row, _ in self.methods:
            assert row.step_ms is not None and row.wall_ms is not None and row.peak_bytes is not None
            row.time_ratio = row.step_ms / plain.step_ms
            if self.device.type == "cpu":
                row.wall_ratio = row.wall_ms / plain.wall_ms
            row.peak_fraction = row.peak_bytes / self.plain_peak_bytes
        for row, twin in self.twins:
            for field in ("peak_bytes", "peak_fraction", "step_ms", "time_ratio", "time_ratio_iqr", "wall_ms", "wall_ratio",
                          "grad_max_diff", "setup_seconds", "predicted_peak_bytes", "predicted_time_ratio"):
                setattr(row, field, getattr(twin, field))
        self.methods.clear()  # drop the models and compiled graphs before the next workload


def run(options: argparse.Namespace) -> dict[str, list[Row]]:
    device = torch.device(options.device)
    if device.type == "cpu":
        torch.set_num_threads(options.threads)
    size = "tiny" if options.tiny else ("quick" if options.quick else "full")
    selected = [w for w in workloads(size) if not options.models or w.name in options.models]
    results: dict[str, list[Row]] = {}
    descriptions: dict[str, str] = {}
    for workload in selected:
        bench = WorkloadBench(workload, device, options)
        bench.run_baselines()
        if not options.no_rematc:
            bench.run_rematc()
        bench.time_round_robin(options.reps)
        results[workload.name] = bench.rows
        descriptions[workload.name] = workload.description
        del bench
        gc.collect()
    options.descriptions = descriptions
    return results


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _format_load(load: float | None) -> str:
    return "unknown" if load is None else f"{load:.1f}"


def write_report(results: dict[str, list[Row]], options: argparse.Namespace, seconds: float) -> str:
    device = torch.device(options.device)
    command = "python benchmarks/compare.py " + " ".join(shlex.quote(a) for a in options.argv)
    auto_order = getattr(importlib.import_module("solvers.solve"), "AUTO_ORDER", [])
    auto = next((m for m in auto_order if m in solvers.METHODS), "?")
    lines = [
        f"Command: `{command.strip()}` ({seconds / 60:.1f} min, {datetime.date.today().isoformat()}, "
        f"git {git_revision()})",
        "",
        f"Machine: {machine_description(device, options.threads)}. 1-minute load average "
        f"{_format_load(getattr(options, 'load_before', None))} at the start and {_format_load(getattr(options, 'load_after', None))} at the end "
        f"on {os.cpu_count()} cores (other processes running at the same time make step times noisier).",
        "",
        f"rematc solver: `{options.rematc_method}` (auto picks `{auto}`; registered: {sorted(solvers.METHODS)}). "
        f"Step time: median of {options.reps} interleaved rounds"
        + (" of the process's CPU time (one thread; the wall clock, also shown, counts waits for a shared core)"
           if device.type == "cpu" else " (wall clock)")
        + "; ± is half the interquartile range of the per-round ratios (step time over plain autograd's in the "
        "same round), a measure of the timing noise. Peak: bytes allocated during one "
        "forward+backward above the start (parameters, inputs excluded; activations, temporaries, "
        "gradients included), measured by `profiler.meter.MemoryMeter`.",
    ]
    for name, rows in results.items():
        lines += ["", f"### {name}", "", options.descriptions[name] + ".", "", markdown_table(rows), ""]
        lines += goal_checks(rows)
    text = "\n".join(lines) + "\n"
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"results_{device.type}" + ("_tiny" if options.tiny else "_quick" if options.quick else "")
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(
        json.dumps(
            {
                "command": command, "machine": machine_description(device, options.threads),
                "seconds": seconds, "rows": {n: [r.to_json() for r in rows] for n, rows in results.items()},
            },
            indent=1,
        )
    )
    plot_path = Path(options.plot) if options.plot else out / f"benchmark_{device.type}{'_quick' if options.quick else ''}.png"
    plot(
        results, plot_path,
        f"rematc vs PyTorch baselines: {machine_description(device, options.threads)}\n{command.strip()}",
        time_label="step CPU time" if device.type == "cpu" else "step time",
    )
    log(f"wrote {out / (stem + '.md')}, {out / (stem + '.json')}, {plot_path}")
    return text


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small models, for a 2-core CPU (a few minutes)")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # smoke tests
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for the .md and .json")
    parser.add_argument("--plot", default=None, help="PNG path (default OUT/benchmark_<device>[_quick].png)")
    parser.add_argument("--models", nargs="*", default=None, help="subset of: gpt2 llama resnet")
    parser.add_argument("--reps", type=int, default=None, help="timing rounds (default 9 quick, 15 full)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads on CPU (default 1)")
    parser.add_argument(
        "--inductor", choices=["all", "one", "none"], default=None,
        help="torch.compile inductor rows: all budgets, 'one' (budget 0.5 on --inductor-model only;\n"
        "default with --quick: a cold Inductor compile takes about a minute on a 2-core CPU), none",
    )
    parser.add_argument("--inductor-model", default="gpt2", help="the model of --inductor one")
    parser.add_argument("--inductor-cache", action="store_true", help="let Inductor use its on-disk caches")
    parser.add_argument("--rematc-method", default="auto", help="solver passed to Rockmate(method=...)")
    parser.add_argument(
        "--rematc-budgets", nargs="*", default=None,
        help="plan rematc only at these budgets (default all): baselines' short names\n"
        "(checkpoint SAC aot_eager@0.5 inductor@0.5 ...), 50%%, 33%%, 20%%, min",
    )
    parser.add_argument("--no-rematc", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--readme", default=None,
        help="also write the results into this file between the lines\n"
        f"{README_BEGIN} and {README_END} (the README's Benchmarks section)",
    )
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failing methods")
    options = parser.parse_args(argv)
    options.argv = argv
    if options.reps is None:
        options.reps = 9 if options.quick or options.tiny else 15
    if options.inductor is None:
        options.inductor = "none" if options.tiny else "one" if options.quick else "all"
    if options.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")
    return options


def main(argv: list[str] | None = None) -> int:
    options = parse_arguments(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    options.load_before = _load_average()
    results = run(options)
    options.load_after = _load_average()
    seconds = time.perf_counter() - started
    text = write_report(results, options, seconds)
    print(text)
    if options.readme:
        update_readme(Path(options.readme), text, Path(options.plot) if options.plot else None)
        log(f"updated the results in {options.readme}")
    return 0




if __name__ == "__main__":
    sys.exit(main())