"""Measured profiling: costs from real runs, the on-disk profile cache, and the analytic fallback."""

from __future__ import annotations

import json

import pytest
import torch

from profiler.analytic import analytic_costs
from profiler.cache import ProfileCache, device_name
from profiler.measure import _TimingInterpreter, measure_costs

torch.set_num_threads(1)


def capture_joint(model: torch.nn.Module, x: torch.Tensor):
    """(joint graph, real primals) of ``model(x).sum()`` through AOTAutograd."""
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._functorch.partitioners import default_partition

    got = {}

    def partition(joint, inputs, *, num_fwd_outputs, **kw):
        got["joint"] = joint
        return default_partition(joint, inputs, num_fwd_outputs=num_fwd_outputs, **kw)

    def backend(gm, example_inputs):
        got["primals"] = list(example_inputs)
        return aot_module_simplified(gm, example_inputs, fw_compiler=lambda g, i: g, bw_compiler=lambda g, i: g, partition_fn=partition)

    torch.compile(lambda t: model(t).sum(), backend=backend, dynamic=False)(x).backward()
    return got["joint"], got["primals"]


def mlp(width: int = 64) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, width), torch.nn.GELU(), torch.nn.Linear(width, 8))


def test_measured_costs_cover_every_node_and_are_positive_for_compute():
    joint, primals = capture_joint(mlp(), torch.randn(16, 32))
    costs = measure_costs(joint, primals, "cpu", repeats=3)
    assert set(costs) == {n.name for n in joint.graph.nodes}
    mm_like = [n.name for n in joint.graph.nodes if "mm" in str(n.target)]
    assert mm_like and all(costs[name].time_ms > 0 for name in mm_like)


def test_second_run_hits_the_cache_and_measures_nothing(tmp_path):
    joint, primals = capture_joint(mlp(), torch.randn(16, 32))
    path = tmp_path / "profiles.json"
    first = ProfileCache(path)
    costs = measure_costs(joint, primals, "cpu", cache=first)
    assert first.misses > 0 and first.hits == 0
    second = ProfileCache(path)  # a new process would read the same file
    again = measure_costs(joint, primals, "cpu", cache=second)
    assert second.misses == 0 and second.hits == first.misses
    assert again == costs  # cached figures are reused verbatim


def test_cache_misses_on_another_shape_or_device(tmp_path):
    path = tmp_path / "profiles.json"
    joint, primals = capture_joint(mlp(), torch.randn(16, 32))
    measure_costs(joint, primals, "cpu", cache=ProfileCache(path))
    other_shape, other_primals = capture_joint(mlp(), torch.randn(24, 32))
    cache = ProfileCache(path)
    measure_costs(other_shape, other_primals, "cpu", cache=cache)
    assert cache.misses > 0  # batch 24: every matmul signature is new
    # Entries are per device name: another device sees none of them.
    stored = json.loads(path.read_text())["devices"]
    assert list(stored) == [device_name(torch.device("cpu"))]
    signature = next(iter(stored[device_name(torch.device("cpu"))]))
    assert cache.get("cuda:NVIDIA H100|torch x", signature) is None


def test_corrupt_cache_file_is_ignored_and_rewritten(tmp_path):
    path = tmp_path / "profiles.json"
    path.write_text("{not json")
    cache = ProfileCache(path)
    joint, primals = capture_joint(mlp(), torch.randn(16, 32))
    measure_costs(joint, primals, "cpu", cache=cache)
    assert json.loads(path.read_text())["format_version"] == 1


def test_failed_measurement_falls_back_to_analytic(monkeypatch):
    joint, primals = capture_joint(mlp(), torch.randn(16, 32))

    def broken(*args, **kwargs):
        raise RuntimeError("timer unavailable")

    monkeypatch.setattr(_TimingInterpreter, "_time_once", broken)
    costs = measure_costs(joint, primals, "cpu")
    analytic = analytic_costs(joint, "cpu")
    assert {k: c.time_ms for k, c in costs.items()} == {k: c.time_ms for k, c in analytic.items()}


def test_profiling_leaves_the_rng_stream_alone():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Dropout(0.5))
    joint, primals = capture_joint(model, torch.randn(16, 32))
    torch.manual_seed(5)
    measure_costs(joint, primals, "cpu", repeats=2)
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(3))


def test_rockmate_measured_mode_plans_exactly(tmp_path, monkeypatch):
    monkeypatch.setenv("REMATC_CACHE_DIR", str(tmp_path))
    from rematc import Rockmate

    model = mlp(256)
    x = torch.randn(64, 32)
    rm = Rockmate(model, x, 1.0, profile="measure")
    assert rm.profile == "measure" and rm.predicted_step_seconds > 0
    assert (tmp_path / "profiles.json").exists()
    reference = mlp(256)
    rm(x).sum().backward()
    reference(x).sum().backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_profile_argument_is_validated():
    from rematc import Rockmate

    with pytest.raises(ValueError, match="profile must be"):
        Rockmate(mlp(), torch.randn(4, 32), 1.0, profile="fast")
