"""Solver benchmark: the hierarchical planner against greedy and the whole-graph MILP (torch-free).

Usage::

    python benchmarks/planners.py                      # Checkmate graphs + synthetic transformers
    python benchmarks/planners.py --quick              # 20 s MILP limit, 12 layers only
    python benchmarks/planners.py --transformers-only  # just the planning-time table

For Checkmate's published graphs (VGG16, MobileNet, ResNet50; skipped when the
shared data folder is absent) at 90/80/70/60/50% of the no-remat peak it
prints: the hierarchical planner's solve time (the first budget includes the
menus, later ones reuse them), its cost ratio to no-remat, greedy's, the
whole-graph MILP's (time-limited) with its proved lower bound, and the gap of
the hierarchical plan to the MILP's incumbent and to the bound. Then the
planning time and cost of GPT-2-like chains of 12 and 48 identical layers.
Every number is measured on this machine when the script runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from solvers import BudgetInfeasible, Graph, simulate  # noqa: E402
from solvers.checkmate_data import checkmate_graph_path, load_checkmate_graph  # noqa: E402
from solvers.greedy import greedy_schedule  # noqa: E402
from solvers.hierarchical import ChainSolver, clear_menu_cache  # noqa: E402
from solvers.ilp import solve_ilp  # noqa: E402
from solvers.milp import MilpSettings  # noqa: E402
from solvers.recompute import no_remat_schedule  # noqa: E402
from solvers.synthetic import transformer_graph  # noqa: E402

FRACTIONS = (0.9, 0.8, 0.7, 0.6, 0.5)


def _ratio(value: float | None, base: float) -> str:
    return "-" if value is None else f"{value / base:.4f}"


def _gap(ours: float | None, reference: float | None) -> str:
    if ours is None or reference is None or reference <= 0:
        return "-"
    return f"{100 * (ours / reference - 1):+.2f}%"


def _greedy_ms(graph: Graph, budget: int) -> float | None:
    try:
        return simulate(graph, greedy_schedule(graph, budget)).time_ms
    except BudgetInfeasible:
        return None


def bench_checkmate(ilp_limit_s: float) -> None:
    header = (f"{'graph':10} {'ops':>4} {'budget':>6} {'hier s':>7} {'hier':>7} {'greedy':>7} "
              f"{'ilp':>7} {'ilp s':>6} {'bound':>7} {'vs ilp':>8} {'vs bound':>8}")
    print("Checkmate graphs (time ratios to no-remat; 'vs' = hierarchical cost above the reference)")
    print(header)
    print("-" * len(header))
    for model in ("vgg16", "mobilenet", "resnet50"):
        path = checkmate_graph_path(model)
        if path is None:
            print(f"{model:10} skipped: shared data folder not found")
            continue
        graph = load_checkmate_graph(path)
        base = simulate(graph, no_remat_schedule(graph))
        began = time.perf_counter()
        clear_menu_cache()
        solver = ChainSolver(graph)
        setup_s = time.perf_counter() - began
        for i, fraction in enumerate(FRACTIONS):
            budget = int(base.peak_bytes * fraction)
            began = time.perf_counter()
            try:
                ours: float | None = solver.solve(budget).time_ms
            except BudgetInfeasible:
                ours = None
            hier_s = time.perf_counter() - began + (setup_s if i == 0 else 0.0)
            greedy = _greedy_ms(graph, budget)
            began = time.perf_counter()
            try:
                result = solve_ilp(graph, budget, settings=MilpSettings(time_limit_s=ilp_limit_s))
                ilp, bound = result.time_ms, result.lower_bound_time_ms
                ilp_tag = "" if result.optimal else "*"
            except BudgetInfeasible:
                ilp = bound = None
                ilp_tag = ""
            ilp_s = time.perf_counter() - began
            print(f"{model:10} {graph.num_ops:>4} {fraction:>6.0%} {hier_s:>7.1f} {_ratio(ours, base.time_ms):>7} "
                  f"{_ratio(greedy, base.time_ms):>7} {_ratio(ilp, base.time_ms) + ilp_tag:>7} {ilp_s:>6.1f} "
                  f"{_ratio(bound, base.time_ms):>7} {_gap(ours, ilp):>8} {_gap(ours, bound):>8}")
        print(f"{model:10} smallest feasible peak: hierarchical {solver.min_feasible_peak() / base.peak_bytes:.3f} "
              f"of no-remat; chains of {[len(v.blocks) for v in solver.variants]} blocks, "
              f"{solver.n_distinct_blocks} distinct")
    print("(* = MILP stopped at its time limit: incumbent, not proved optimal; '-' = none found)")


def bench_transformers(layer_counts: tuple[int, ...]) -> None:
    header = (f"{'layers':>6} {'ops':>5} {'blocks':>7} {'distinct':>8} {'menus s':>8} "
              f"{'budget':>6} {'plan s':>7} {'total s':>8} {'hier':>7} {'greedy':>7}")
    print("\nGPT-2-like chains (n_embd 768, seq 512, batch 4, float32; time ratios to no-remat)")
    print(header)
    print("-" * len(header))
    for n_layers in layer_counts:
        graph = transformer_graph(n_layers)
        base = simulate(graph, no_remat_schedule(graph))
        for fraction in (0.9, 0.8, 0.7, 0.5):
            budget = int(base.peak_bytes * fraction)
            began = time.perf_counter()
            clear_menu_cache()
            solver = ChainSolver(graph)  # cold: every row is the planning time of a first call
            menus_s = time.perf_counter() - began
            began = time.perf_counter()
            try:
                ours: float | None = solver.solve(budget).time_ms
            except BudgetInfeasible:
                ours = None
            plan_s = time.perf_counter() - began
            blocks = "/".join(str(len(v.blocks)) for v in solver.variants)
            print(f"{n_layers:>6} {graph.num_ops:>5} {blocks:>7} {solver.n_distinct_blocks:>8} {menus_s:>8.1f} "
                  f"{fraction:>6.0%} {plan_s:>7.1f} {menus_s + plan_s:>8.1f} {_ratio(ours, base.time_ms):>7} "
                  f"{_ratio(_greedy_ms(graph, budget), base.time_ms):>7}")
    print("(each row starts cold: total s = menus + plan, the planning time of a first call; below 75% of the\n"
          " no-remat peak the plan completes the menus (lower peaks, tail runs), which later budgets reuse)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 s MILP limit, 12 layers only")
    parser.add_argument("--ilp-time-limit", type=float, default=None, help="seconds per whole-graph MILP")
    parser.add_argument("--transformers-only", action="store_true", help="skip the Checkmate graphs")
    args = parser.parse_args(argv)
    limit = args.ilp_time_limit if args.ilp_time_limit is not None else (20.0 if args.quick else 120.0)
    if not args.transformers_only:
        bench_checkmate(limit)
    bench_transformers((12,) if args.quick else (12, 48))


if __name__ == "__main__":
    main()
