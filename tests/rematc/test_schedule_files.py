"""Schedule files and the schedule cache: round trips, cross-process hits, bad files, concurrent writers."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from rematc import Rockmate
from rematc.errors import RematcWarning, ScheduleFileError
from rematc.graph_hash import describe_graph
from rematc.schedule_file import (
    FORMAT_VERSION,
    dumps_schedule_file,
    loads_schedule_file,
    read_schedule_file,
    write_schedule_file,
)
from solvers import check, simulate

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]
BUDGET = 0.6  # forces recomputation on the MLP below


def make_mlp(width: int = 64, depth: int = 4) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(width, 8))


def make_batch(batch: int = 512, width: int = 64, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(batch, width, generator=torch.Generator().manual_seed(1), dtype=dtype)


def train_step(module: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The gradients of one step, in parameter order (a Rockmate's parameters are its model's)."""
    module(x).square().mean().backward()
    return [p.grad.clone() for p in module.parameters()]


def entries(cache_dir: Path) -> list[Path]:
    return sorted((cache_dir / "schedules").glob("*.json"))


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """One plan of the MLP, saved: (Rockmate, schedule file path)."""
    path = tmp_path_factory.mktemp("planned") / "mlp.schedule.json"
    rm = Rockmate(make_mlp(), make_batch(), BUDGET, cache=False)
    assert rm.plan.modules.recomputed_ops, "the budget must force recomputation for these tests to mean anything"
    rm.save_schedule(path)
    return rm, path


# -- round trip -------------------------------------------------------------------------
def test_round_trip_gives_the_same_schedule_and_bitwise_equal_gradients(planned):
    rm, path = planned
    sf = read_schedule_file(path)
    assert sf.format_version == FORMAT_VERSION and sf.graph_hash == rm.graph_hash
    assert sf.graph == rm.plan.lowered.graph and sf.schedule == rm.plan.schedule
    assert (sf.predicted_peak_bytes, sf.budget_bytes) == (rm.predicted_peak_bytes, rm.budget_bytes)
    assert loads_schedule_file(dumps_schedule_file(sf)) == sf  # text round trip is lossless

    model = make_mlp()
    loaded = Rockmate(model, make_batch(), None, schedule=path)  # budget None: the file's budget
    assert loaded.cache_hit and loaded.plan.profile_seconds < 5 and loaded.plan.solve_seconds == 0
    assert loaded.plan.schedule == rm.plan.schedule
    assert loaded.budget_bytes == rm.budget_bytes and loaded.predicted_peak_bytes == rm.predicted_peak_bytes
    assert loaded.plan.modules.saved == rm.plan.modules.saved

    fresh = Rockmate(make_mlp(), make_batch(), BUDGET, cache=False)
    got, want, eager = train_step(loaded, make_batch()), train_step(fresh, make_batch()), train_step(make_mlp(), make_batch())
    assert len(got) == len(want) == len(eager) > 0
    for g, w, e in zip(got, want, eager):
        assert torch.equal(g, w) and torch.equal(g, e)


def test_file_is_readable_and_self_describing(planned):
    _, path = planned
    text = path.read_text()
    document = json.loads(text)
    for field in ("format", "format_version", "rematc_version", "graph_hash", "device", "budget", "predicted",
                  "solver", "profiler", "blocks", "graph", "steps"):
        assert field in document, field
    assert document["budget"]["given"] == "0.6" and document["budget"]["key"] == "fraction-0.6"
    assert all(op.keys() >= {"name", "time_ms", "workspace_bytes"} for op in document["graph"]["ops"])
    steps = document["steps"]["forward"] + document["steps"]["backward"]
    assert all(s.split(" ")[0] in ("compute", "free") for s in steps)
    assert len(text.splitlines()) > len(steps)  # one step a line, not one giant line


def test_graph_hash_is_canonical_and_sensitive(monkeypatch):
    import rematc.api as api

    descriptions: list[str] = []
    real = api.graph_hash

    def spy(joint, num_fwd_outputs, **options):
        descriptions.append(json.dumps(describe_graph(joint, num_fwd_outputs)))
        return real(joint, num_fwd_outputs, **options)

    monkeypatch.setattr(api, "graph_hash", spy)

    def hash_of(model, x) -> str:
        return Rockmate(model, x, 1.0, cache=False).graph_hash

    base = hash_of(make_mlp(), make_batch())
    assert base.startswith("sha256:") and hash_of(make_mlp(), make_batch()) == base
    assert hash_of(make_mlp(), make_batch(batch=256)) != base  # another shape
    assert hash_of(make_mlp().double(), make_batch(dtype=torch.float64)) != base  # another dtype
    # Nothing that identifies the process or the source location is hashed.
    assert descriptions[0] == descriptions[1]
    assert "0x" not in descriptions[0] and "test_schedule_files" not in descriptions[0]


# -- the cache across processes -----------------------------------------------------------
SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {root!r})
    import torch
    import solvers
    import rematc.api as api
    from tests.rematc.test_schedule_files import make_mlp, make_batch

    torch.set_num_threads(1)
    # Teammates edit solvers/ while the suite runs; a changed fingerprint between the two
    # processes is a (correct) miss, tested on its own in this file. Pin it here.
    import rematc.schedule_cache
    rematc.schedule_cache.planner_fingerprint = lambda: "sha256:pinned-for-this-test"
    calls = {{"profile": 0, "solve": 0}}
    def counting(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper
    api.profile_costs = counting("profile", api.profile_costs)
    solvers.solve = counting("solve", solvers.solve)

    rm = api.Rockmate(make_mlp(), make_batch(), {budget!r})
    loss = rm(make_batch()).square().mean()
    loss.backward()
    print("REMATC_RESULT " + json.dumps({{
        "cache_hit": rm.cache_hit, "calls": calls, "graph_hash": rm.graph_hash,
        "planning_seconds": rm.plan.profile_seconds + rm.plan.solve_seconds, "loss": loss.item(),
    }}))
""")


def run_script(tmp_path: Path, cache_dir: Path) -> dict:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(root=str(ROOT), budget=BUDGET))
    env = {**os.environ, "REMATC_CACHE_DIR": str(cache_dir)}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(l for l in done.stdout.splitlines() if l.startswith("REMATC_RESULT "))
    return {**json.loads(line.removeprefix("REMATC_RESULT ")), "stderr": done.stderr[-3000:]}


def test_second_process_hits_the_cache_and_skips_profiling_and_solving(tmp_path):
    cache_dir = tmp_path / "cache"
    first = run_script(tmp_path, cache_dir)
    assert not first["cache_hit"] and first["calls"]["profile"] == 1 and first["calls"]["solve"] == 1
    assert len(entries(cache_dir)) == 1
    second = run_script(tmp_path, cache_dir)
    assert second["cache_hit"], second["stderr"]
    assert second["calls"] == {"profile": 0, "solve": 0}
    assert second["graph_hash"] == first["graph_hash"]  # canonical across processes
    assert second["loss"] == first["loss"]
    print(f"planning: first {first['planning_seconds']:.3f} s, cached {second['planning_seconds']:.3f} s")


# -- bad files ----------------------------------------------------------------------------
def _corrupt(text: str) -> str:
    return "{\x00 not json at all"


def _truncated(text: str) -> str:
    return text[: len(text) // 2]


def _wrong_version(text: str) -> str:
    return text.replace(f'"format_version": {FORMAT_VERSION}', '"format_version": 999', 1)


def _other_model(text: str) -> str:
    document = json.loads(text)
    document["graph_hash"] = "sha256:" + "0" * 64  # a file of another graph
    return json.dumps(document)


BAD_FILES = {
    "corrupt": (_corrupt, "not valid JSON"),
    "truncated": (_truncated, "not valid JSON"),
    "wrong_version": (_wrong_version, "format version 999 is not supported"),
    "other_model": (_other_model, "belongs to another graph"),
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_cache_entry_warns_and_replans(planned, tmp_path, kind):
    rm, path = planned
    damage, message = BAD_FILES[kind]
    cache_dir = tmp_path / "cache"
    # Put the damaged file exactly where this model's entry lives.
    Rockmate(make_mlp(), make_batch(), BUDGET, cache_dir=cache_dir)
    [entry] = entries(cache_dir)
    entry.write_text(damage(path.read_text()))

    with pytest.warns(RematcWarning, match=message):
        replanned = Rockmate(make_mlp(), make_batch(), BUDGET, cache_dir=cache_dir)
    assert not replanned.cache_hit and replanned.plan.schedule == rm.plan.schedule
    assert read_schedule_file(entry).graph_hash == rm.graph_hash  # the entry was rewritten
    got, want = train_step(replanned, make_batch()), train_step(make_mlp(), make_batch())
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_entry_from_other_planning_code_is_a_silent_miss(planned, tmp_path, recwarn):
    _, path = planned
    cache_dir = tmp_path / "cache"
    Rockmate(make_mlp(), make_batch(), BUDGET, cache_dir=cache_dir)
    [entry] = entries(cache_dir)
    document = json.loads(entry.read_text())
    document["solver"]["planner_fingerprint"] = "sha256:an-older-solver"
    entry.write_text(json.dumps(document))
    again = Rockmate(make_mlp(), make_batch(), BUDGET, cache_dir=cache_dir)
    assert not again.cache_hit and not [w for w in recwarn if issubclass(w.category, RematcWarning)]
    assert read_schedule_file(entry).planner_fingerprint != "sha256:an-older-solver"  # replaced
    assert Rockmate(make_mlp(), make_batch(), BUDGET, cache_dir=cache_dir).cache_hit


@pytest.mark.parametrize("kind", ["corrupt", "truncated", "wrong_version"])
def test_bad_explicit_file_raises_before_capture(planned, tmp_path, kind):
    _, path = planned
    damage, message = BAD_FILES[kind]
    bad = tmp_path / "bad.json"
    bad.write_text(damage(path.read_text()))
    with pytest.raises(ScheduleFileError, match=message) as info:
        Rockmate(make_mlp(), make_batch(), BUDGET, schedule=bad)
    assert str(bad) in str(info.value)
    if kind == "wrong_version":
        assert (info.value.expected, info.value.found) == (FORMAT_VERSION, 999)


def test_explicit_file_of_another_model_names_both_hashes(planned):
    rm, path = planned
    with pytest.raises(ScheduleFileError, match="belongs to another graph") as info:
        Rockmate(make_mlp(width=32), make_batch(width=32), BUDGET, schedule=path)
    assert info.value.found == rm.graph_hash and info.value.expected != rm.graph_hash
    assert rm.graph_hash in str(info.value) and info.value.expected in str(info.value)


def test_explicit_file_over_the_budget_is_refused(planned):
    rm, path = planned
    with pytest.raises(ScheduleFileError, match="above the budget"):
        Rockmate(make_mlp(), make_batch(), rm.predicted_peak_bytes - 1, schedule=path)


def test_missing_explicit_file_and_missing_budget():
    with pytest.raises(ScheduleFileError, match="no such file"):
        Rockmate(make_mlp(), make_batch(), 0.5, schedule="/nonexistent/plan.json")
    with pytest.raises(ValueError, match="budget must be"):
        Rockmate(make_mlp(), make_batch(), None)


def test_edited_steps_are_refused(planned):
    _, path = planned
    document = json.loads(path.read_text())
    document["steps"]["backward"] = document["steps"]["backward"][::-1]
    with pytest.raises(ScheduleFileError, match="steps do not run"):
        loads_schedule_file(json.dumps(document))
    document = json.loads(path.read_text())
    document["predicted"]["peak_bytes"] -= 1
    with pytest.raises(ScheduleFileError, match="inconsistent"):
        loads_schedule_file(json.dumps(document))


def test_random_damage_never_escapes_as_another_error(planned):
    """Flip bytes anywhere in a file: it still parses to a consistent plan, or ScheduleFileError says why."""
    import random

    _, path = planned
    text = path.read_text()
    rng = random.Random(0)
    for _ in range(200):
        chars = list(text)
        for _ in range(rng.randint(1, 3)):
            chars[rng.randrange(len(chars))] = rng.choice('{}[]",:0123456789abcdefx -')
        try:
            sf = loads_schedule_file("".join(chars))
        except ScheduleFileError:
            continue
        check(sf.graph, sf.schedule)
        assert simulate(sf.graph, sf.schedule).peak_bytes <= sf.budget_bytes


# -- concurrent writers -------------------------------------------------------------------
def test_concurrent_writers_leave_a_valid_file(planned, tmp_path):
    _, path = planned
    sf = read_schedule_file(path)
    other = dataclasses.replace(sf, budget_given="writer two")  # tell the writers apart
    target = tmp_path / "cache" / "entry.json"
    write_schedule_file(target, sf)
    errors: list[BaseException] = []
    stop = threading.Event()

    def write(contents) -> None:
        try:
            for _ in range(20):
                write_schedule_file(target, contents)
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    def read() -> None:
        try:
            while not stop.is_set():
                got = read_schedule_file(target)  # never torn: always one writer's whole file
                assert got.budget_given in (sf.budget_given, "writer two")
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    writers = [threading.Thread(target=write, args=(c,)) for c in (sf, other)]
    reader = threading.Thread(target=read)
    reader.start()
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    reader.join()
    assert not errors, errors
    final = read_schedule_file(target)
    check(final.graph, final.schedule)
    assert simulate(final.graph, final.schedule).peak_bytes <= final.budget_bytes
    assert [p.name for p in target.parent.iterdir()] == ["entry.json"]  # no temporary files left
