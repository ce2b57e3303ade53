"""The ``rematc`` CLI: plan and show, help on every command, exit codes, one-line errors."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

from rematc import Rockmate
from rematc.cli import main
from rematc.schedule_commands import load_factory
from rematc.schedule_file import read_schedule_file

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = f"{ROOT / 'examples' / 'tiny_gpt.py'}:factory"
BUDGET = "0.5"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """``rematc plan`` of the example factory: (schedule file, cache dir, its stdout, its stderr)."""
    work = tmp_path_factory.mktemp("cli")
    out, cache_dir = work / "tiny_gpt.schedule.json", work / "cache"
    stdout, stderr = io.StringIO(), io.StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr):
        code = main(["plan", EXAMPLE, "--budget", BUDGET, "--out", str(out), "--cache-dir", str(cache_dir)])
    assert code == 0, stderr.getvalue()
    return out, cache_dir, stdout.getvalue(), stderr.getvalue()


def test_plan_writes_the_file_fills_the_cache_and_reports_progress(planned):
    out, cache_dir, stdout, stderr = planned
    sf = read_schedule_file(out)
    assert sf.budget_given == "0.5" and sf.predicted_peak_bytes <= sf.budget_bytes
    [entry] = (cache_dir / "schedules").glob("*.json")
    assert read_schedule_file(entry).schedule == sf.schedule
    assert f"wrote {out}" in stdout and sf.graph_hash in stdout
    for stage in ("capture:", "profile:", "solve:", "cache: stored"):
        assert stage in stderr, stage


def test_training_run_reuses_the_planned_schedule(planned):
    """The README workflow: plan ahead with the CLI, then the training script hits the cache."""
    out, cache_dir, _, _ = planned
    model, sample, loss_fn, loss_args = load_factory(str(ROOT / "examples" / "tiny_gpt.py"), "factory")()
    rm = Rockmate(model, sample, float(BUDGET), loss_fn=loss_fn, loss_args=loss_args, cache_dir=cache_dir)
    assert rm.cache_hit and rm.plan.schedule == read_schedule_file(out).schedule
    rm(sample, loss_args=loss_args).backward()  # and it trains


def test_show_summarizes_and_plots(planned, tmp_path, capsys):
    out, _, _, _ = planned
    png = tmp_path / "plot.png"
    assert main(["show", str(out), "--plot", str(png), "--top", "3"]) == 0
    text = capsys.readouterr().out
    for line in ("predicted peak", "predicted time", "kept for the backward", "recomputed in the backward",
                 "budget", "whole-graph plan"):
        assert line in text, line
    assert png.read_bytes().startswith(PNG_MAGIC) and png.stat().st_size > 10_000


def test_console_entry_point_shows_and_plots(planned, tmp_path):
    """``python -m rematc`` (what the ``rematc`` console script runs) in a fresh process."""
    out, _, _, _ = planned
    png = tmp_path / "cli.png"
    done = subprocess.run(
        [sys.executable, "-m", "rematc", "show", str(out), "--plot", str(png)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr
    assert "predicted peak" in done.stdout and png.read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize("command", [[], ["demo"], ["plan"], ["show"]])
def test_help_on_every_command(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    assert "usage: rematc" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [
    ["plan", "examples/tiny_gpt.py:factory"],                      # --budget missing
    ["plan", "examples/tiny_gpt.py", "--budget", "0.5"],             # no :FACTORY
    ["plan", "examples/tiny_gpt.py:factory", "--budget", "lots"],    # unparsable budget
    ["plan", "examples/tiny_gpt.py:factory", "--budget", "1.5"],     # fraction out of range
    ["show"],                                                        # FILE missing
    ["frobnicate"],                                                  # no such command
])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def _one_line_error(capsys, argv: list[str]) -> str:
    """The error line (after any progress lines); no traceback without --debug."""
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if ": error: " in line]
    assert len(errors) == 1 and err[-1] == errors[0] and not any("Traceback" in line for line in err), err
    return errors[0]


def test_failures_exit_1_with_one_clear_line(tmp_path, capsys):
    missing = _one_line_error(capsys, ["show", str(tmp_path / "nope.json")])
    assert missing.startswith("rematc show: error: ScheduleFileError") and "no such file" in missing

    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"format": "rematc-schedule", "format_version": 1, "graph": [')
    assert "not valid JSON" in _one_line_error(capsys, ["show", str(corrupt)])

    other = tmp_path / "other.json"
    other.write_text(json.dumps({"format": "something-else"}))
    assert "not a rematc schedule file" in _one_line_error(capsys, ["show", str(other)])

    factory = tmp_path / "factories.py"
    factory.write_text("def bad():\n    return 42\n")
    assert "must return (model, sample)" in _one_line_error(capsys, ["plan", f"{factory}:bad", "--budget", "0.5"])
    assert "has no attribute 'absent'" in _one_line_error(capsys, ["plan", f"{factory}:absent", "--budget", "0.5"])
    assert "No module named" in _one_line_error(capsys, ["plan", "no_such_module_xyz:make", "--budget", "0.5"])


def test_debug_prints_the_traceback(tmp_path, capsys):
    assert main(["show", str(tmp_path / "nope.json"), "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "rematc show: error:" in err
