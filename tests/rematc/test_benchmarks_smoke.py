"""Smoke test of benchmarks/compare.py: the machinery runs (no time is asserted; the README's figures come from real runs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from benchmarks import compare
from benchmarks.report import goal_checks, markdown_table, plot
from benchmarks.workloads import workloads

ROOT = Path(__file__).resolve().parents[2]


def test_one_method_one_step_on_a_tiny_model(tmp_path):
    torch.set_num_threads(1)
    resnet = next(w for w in workloads("tiny") if w.name == "resnet")
    options = compare.parse_arguments(["--tiny", "--device", "cpu", "--out", str(tmp_path)])
    bench = compare.WorkloadBench(resnet, torch.device("cpu"), options)
    plain = bench.add(compare.Row("resnet", "plain", "plain autograd", "", "plain"),
                      lambda: compare.M.plain(bench.copy_model(), resnet, bench.args, bench.targets))
    bench.plain_peak_bytes = plain.peak_bytes
    sac = bench.add(compare.Row("resnet", "sac", "selective checkpoint (SAC)", "", "SAC"),
                    lambda: compare.M.selective(bench.copy_model(), resnet, bench.args, bench.targets))
    planned = bench.add(compare.Row("resnet", "rematc", "rematc", "budget = plain peak", "rematc@plain"),
                        lambda: compare.M.rematc(bench.copy_model(), resnet, bench.args, bench.targets,
                                                 budget_bytes=plain.peak_bytes, label="budget = plain peak"))
    bench.time_round_robin(repetitions=1)

    assert plain.ok and sac.ok and planned.ok, (plain.status, sac.status, planned.status)
    assert planned.peak_bytes <= planned.budget_bytes
    assert plain.peak_bytes > 0 and plain.time_ratio == 1.0
    assert sac.grad_max_diff == 0.0  # checkpointing recomputes the same kernels
    assert "selective checkpoint" in markdown_table(bench.rows)
    goal_checks(bench.rows)
    plot({"resnet": bench.rows}, tmp_path / "plot.png", "smoke")
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_script_runs_from_the_repo_root_without_shadowing_packages():
    # Run as a script, benchmarks/ is first on sys.path; compare.py must still import the real packages.
    done = subprocess.run(
        [sys.executable, "benchmarks/compare.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "--quick" in done.stdout
