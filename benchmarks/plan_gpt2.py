"""Planning time on rematc's own captured GPT-2 graphs (the issue's speed goal).

Usage::

    python benchmarks/plan_gpt2.py                 # 12 layers, n_embd 768, seq 512, batch 4
    python benchmarks/plan_gpt2.py --layers 48

Captures a randomly initialised Hugging Face GPT-2 (capture and profiling are
timed and printed separately), then plans the captured graph with the
hierarchical planner at 90/70/50% of the no-remat peak (the first budget
pays for the chain and the block menus; a budget below 75% completes the
menus), and with greedy for comparison. Prints solve seconds and the
simulated step time relative to no-remat. Capturing runs one real step on
the CPU: about a minute for 12 layers and several GB of memory.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import solvers  # noqa: E402
from rematc import Rockmate  # noqa: E402
from solvers.hierarchical import ChainSolver, clear_menu_cache  # noqa: E402


def captured_gpt2_graph(layers: int, n_embd: int, seq: int, batch: int) -> tuple[solvers.Graph, float, float]:
    """(lowered graph, capture seconds, profile seconds) of a GPT-2 training step."""
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=layers, n_embd=n_embd, n_head=12, n_positions=seq, use_cache=False)
    model = transformers.GPT2LMHeadModel(config).train()
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    began = time.perf_counter()
    rm = Rockmate(model, {"input_ids": ids, "labels": ids}, budget=1.0, method="none", cache=False)
    return rm.plan.lowered.graph, time.perf_counter() - began, rm.plan.profile_seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--n-embd", type=int, default=768)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    graph, capture_s, profile_s = captured_gpt2_graph(args.layers, args.n_embd, args.seq, args.batch)
    base = solvers.simulate(graph, solvers.no_remat_schedule(graph))
    print(f"GPT-2 {args.layers} layers, n_embd {args.n_embd}, seq {args.seq}, batch {args.batch}: "
          f"{graph.num_ops} ops; capture {capture_s:.1f} s (profiling {profile_s:.1f} s of it)")
    clear_menu_cache()  # cold: capturing planned nothing (method "none"), but be explicit
    began = time.perf_counter()
    solver = ChainSolver(graph)
    setup_s = time.perf_counter() - began
    print(f"chain + loose menus: {setup_s:.2f} s, chains of {[len(v.blocks) for v in solver.variants]} blocks, "
          f"{solver.n_distinct_blocks} distinct blocks")
    print(f"{'budget':>6} {'hier s':>7} {'hier cost':>9} {'greedy s':>8} {'greedy cost':>11}")
    for fraction in (0.9, 0.7, 0.5):
        budget = int(base.peak_bytes * fraction)
        began = time.perf_counter()
        ours = solver.solve(budget).time_ms / base.time_ms
        hier_s = time.perf_counter() - began
        began = time.perf_counter()
        greedy = solvers.simulate(graph, solvers.greedy_schedule(graph, budget)).time_ms / base.time_ms
        greedy_s = time.perf_counter() - began
        print(f"{fraction:>6.0%} {hier_s:>7.2f} {ours:>9.4f} {greedy_s:>8.2f} {greedy:>11.4f}")
    began = time.perf_counter()
    minimum = solver.min_feasible_peak()
    print(f"smallest feasible peak: hierarchical {minimum / base.peak_bytes:.3f} of no-remat "
          f"({time.perf_counter() - began:.2f} s), greedy {solvers.min_feasible_peak_greedy(graph) / base.peak_bytes:.3f}")


if __name__ == "__main__":
    main()
