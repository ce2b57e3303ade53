"""Checkmate's published graphs load into valid Graphs (skipped when the shared data is absent)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from solvers import check, simulate
from solvers.checkmate_data import DATA_DIR_ENV, checkmate_graph_path, data_dir, load_checkmate_graph
from solvers.recompute import no_remat_schedule

EXPECTED = {"vgg16": (45, 23), "mobilenet": (185, 93), "resnet50": (353, 177)}  # (ops, backward ops) per README


@pytest.mark.parametrize("model", sorted(EXPECTED))
def test_published_graph_loads(model: str) -> None:
    path = checkmate_graph_path(model)
    if path is None:
        pytest.skip("shared data folder not found (set REMATC_DATA_DIR or place it at ../shared/data)")
    graph = load_checkmate_graph(path)
    n_ops, n_backward = EXPECTED[model]
    assert graph.num_ops == n_ops
    assert sum(op.is_backward for op in graph.ops) == n_backward
    assert graph.resident_values == (0,)
    assert len(graph.forward_outputs) == 1 and len(graph.required_at_end) == 1
    first_backward = next(op for op in graph.ops if op.is_backward)
    assert first_backward.name == "Loss" and not first_backward.is_input
    schedule = no_remat_schedule(graph)
    check(graph, schedule)
    sim = simulate(graph, schedule)
    # The no-remat peak holds at least the biggest activation and at most all of them.
    biggest = max(v.bytes for v in graph.values)
    assert biggest <= sim.peak_bytes <= sum(v.bytes for v in graph.values)
    assert sim.time_ms == pytest.approx(sum(op.time_ms for op in graph.ops))


def _write(path: Path, nodes: list[dict], links: list[dict]) -> Path:
    path.write_text(json.dumps({"directed": True, "multigraph": False, "graph": {}, "nodes": nodes,
                                "links": links}))
    return path


def _tiny_nodes() -> tuple[list[dict], list[dict]]:
    nodes = [
        {"id": 0, "name": "conv", "backward": False, "cost_cpu": 5, "cost_ram": 100},
        {"id": 1, "name": "fc", "backward": False, "cost_cpu": 3, "cost_ram": 10},
        {"id": 2, "name": "Loss", "backward": True, "cost_cpu": 2, "cost_ram": 10},
        {"id": 3, "name": "fc_backward", "backward": True, "cost_cpu": 3, "cost_ram": 100},
        {"id": 4, "name": "conv_backward", "backward": True, "cost_cpu": 5, "cost_ram": 8},
    ]
    links = [{"source": s, "target": t} for s, t in [(0, 1), (1, 2), (2, 3), (0, 3), (3, 4), (0, 4)]]
    return nodes, links


def test_mapping_on_a_tiny_file(tmp_path: Path) -> None:
    graph = load_checkmate_graph(_write(tmp_path / "tiny.json", *_tiny_nodes()))
    names = [op.name for op in graph.ops]
    assert names == ["conv", "fc", "Loss", "fc_backward", "conv_backward"]
    assert graph.ops[0].inputs == (0,)  # the resident input batch
    assert graph.ops[3].inputs == (1 + 0, 1 + 2)  # conv output and the Loss gradient
    assert [graph.values[v].name for v in graph.forward_outputs] == ["fc"]
    assert [graph.values[v].name for v in graph.required_at_end] == ["conv_backward"]
    assert graph.ops[0].time_ms == 5.0 and graph.values[1].bytes == 100
    check(graph, no_remat_schedule(graph))


def test_env_var_names_the_data_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "data" / "checkmate"
    folder.mkdir(parents=True)
    _write(folder / "vgg16_train.json", *_tiny_nodes())
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "data"))
    assert data_dir() == tmp_path / "data"
    assert checkmate_graph_path("vgg16") == folder / "vgg16_train.json"
    assert checkmate_graph_path("mobilenet") is None or "shared" in str(checkmate_graph_path("mobilenet"))
    with pytest.raises(ValueError, match="model must be one of"):
        checkmate_graph_path("alexnet")


def test_malformed_files_are_refused(tmp_path: Path) -> None:
    nodes, links = _tiny_nodes()
    with pytest.raises(ValueError, match="not in id order"):
        load_checkmate_graph(_write(tmp_path / "a.json", nodes, [*links, {"source": 3, "target": 1}]))
    bad = [dict(n, backward=(n["id"] == 1)) for n in nodes]
    with pytest.raises(ValueError, match="forward nodes must come before"):
        load_checkmate_graph(_write(tmp_path / "b.json", bad, links))
    (tmp_path / "c.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="node-link"):
        load_checkmate_graph(tmp_path / "c.json")
