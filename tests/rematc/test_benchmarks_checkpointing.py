"""Smoke test of benchmarks/checkpointing.py: it runs end to end on a tiny model (no time is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks import checkpointing

ROOT = Path(__file__).resolve().parents[2]

README = """# project

## Benchmarks

Some text.

### Older results

| a |
|---|

## Tests

More text.
"""


def test_quick_run_writes_the_table_json_and_readme_section(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    out = tmp_path / "out.json"
    done = subprocess.run(
        [sys.executable, "benchmarks/checkpointing.py", "--quick", "--models", "hf_bert", "--reps", "1",
         "--json", str(out), "--readme", str(readme)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    data = json.loads(out.read_text())
    assert data["columns"] == list(checkpointing.COLUMNS)
    assert [row[0] for row in data["table"]] == ["hf_bert"]
    assert all(len(row) == len(checkpointing.COLUMNS) for row in data["table"])
    results = data["models"]["hf_bert"]["results"]
    assert set(results) == {"plain", "checkpoint", "rematc_min", "rematc_at_checkpoint", "rematc_no_remat",
                            "rematc_loss_fn_min", "rematc_loss_fn_at_checkpoint"}
    assert results["plain"]["status"] == "ok" and results["plain"]["peak_bytes"] > 0
    assert results["plain"]["time_ratio"] == 1.0
    for key in ("checkpoint", "rematc_min", "rematc_no_remat", "rematc_loss_fn_min"):
        assert results[key]["status"] == "ok", (key, results[key]["status"])
        assert results[key]["peak_bytes"] > 0 and results[key]["time_ratio"] > 0
    # The minimum is planned at BudgetTooSmall's own figure and stays within it.
    assert results["rematc_min"]["peak_bytes"] <= results["rematc_min"]["budget_bytes"]

    text = readme.read_text()
    begin, end = checkpointing.README_BEGIN, checkpointing.README_END
    section = text.split(begin, 1)[1].split(end, 1)[0]
    assert "| hf_bert |" in section and "| model | plain peak (MiB) |" in section
    assert "Command: `python benchmarks/checkpointing.py --quick --models hf_bert" in section
    # Inserted at the end of the Benchmarks section: after its last subsection, before "## Tests".
    assert text.index("### Older results") < text.index(begin) < text.index(end) < text.index("## Tests")
    assert text.startswith(README.split("## Tests")[0]) and text.endswith("## Tests\n\nMore text.\n")


def test_readme_section_is_replaced_in_place(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    checkpointing.update_readme(readme, "first\n")
    checkpointing.update_readme(readme, "second\n")
    text = readme.read_text()
    assert text.count(checkpointing.README_BEGIN) == 1 and text.count(checkpointing.README_END) == 1
    assert "second\n" in text and "first" not in text
    assert text.replace(f"{checkpointing.README_BEGIN}\nsecond\n{checkpointing.README_END}\n\n", "") == README


def test_infeasible_rows_say_so():
    plain = checkpointing.Measured("plain", peak_bytes=1000, time_ratio=1.0)
    rows = {key: checkpointing.Measured(key, peak_bytes=500, time_ratio=1.2) for key in (
        "checkpoint", "rematc_min", "rematc_no_remat", "rematc_loss_fn_min", "rematc_loss_fn_at_checkpoint")}
    rows["plain"] = plain
    rows["rematc_at_checkpoint"] = checkpointing.Measured("rematc_at_checkpoint", status="infeasible",
                                                          budget_bytes=500, min_budget_bytes=530)
    cells = checkpointing.table_row("m", rows)
    assert cells[checkpointing.COLUMNS.index("rematc overhead at checkpointing's peak")] == "infeasible (min 0.530)"
    assert cells[checkpointing.COLUMNS.index("checkpointing peak / plain")] == "0.500"
    assert cells[checkpointing.COLUMNS.index("rematc min overhead")] == "1.20x"
