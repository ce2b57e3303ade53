"""Measured profiling: costs from real runs, the on-disk profile cache, and the analytic fallback."""

from __future__ import annotations

import json
import operator
import types

import pytest
import torch
from torch.utils._pytree import tree_leaves

from profiler import measure
from profiler.analytic import NodeCost, analytic_costs, is_view_like
from profiler.cache import FORMAT_VERSION, ProfileCache, device_name
from profiler.measure import _TimingInterpreter, calibrate_overhead, graph_key, measure_costs, overhead_nodes

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

    # A fresh code object per capture: Dynamo caches compiled frames per code
    # object, and a new model that reuses a collected one's id would pass the
    # guards and skip the backend.
    step = lambda t: model(t).sum()  # noqa: E731
    step = types.FunctionType(step.__code__.replace(), step.__globals__, "step", None, step.__closure__)
    torch.compile(step, backend=backend, dynamic=False)(x).backward()
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
    assert json.loads(path.read_text())["format_version"] == FORMAT_VERSION


def test_cache_file_of_another_format_version_is_ignored(tmp_path):
    path = tmp_path / "profiles.json"
    joint, primals = capture_joint(mlp(), torch.randn(16, 32))
    measure_costs(joint, primals, "cpu", repeats=1, cache=ProfileCache(path))
    data = json.loads(path.read_text())
    assert data["devices"] and data["overheads"]
    data["format_version"] = FORMAT_VERSION - 1  # times measured under other rules
    path.write_text(json.dumps(data))
    cache = ProfileCache(path)
    measure_costs(joint, primals, "cpu", repeats=1, cache=cache)
    assert cache.hits == 0 and cache.misses > 0


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


# -- the calibrated per-op overhead (NOTE: [Calibrated per-op overhead]) ------------


def mlp_ln() -> torch.nn.Module:
    """An MLP with a LayerNorm: its joint graph has views (``t``) and tuple accesses (``getitem``)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(32, 64), torch.nn.LayerNorm(64), torch.nn.GELU(), torch.nn.Linear(64, 8)
    )


def _fixed_full_run(monkeypatch, ms: float) -> list[int]:
    """Make every timed full run of the graph take ``ms``; returns a list counting the runs."""
    runs = []

    def fake(run, args, device):
        runs.append(1)
        return ms

    monkeypatch.setattr(measure, "_time_full_run", fake)
    return runs


def test_overhead_is_added_once_to_every_dispatched_op(monkeypatch):
    joint, primals = capture_joint(mlp_ln(), torch.randn(16, 32))
    cache = ProfileCache(None)
    raw = measure_costs(joint, primals, "cpu", repeats=2, cache=cache, calibrate=False)
    charged = {n.name for n in overhead_nodes(joint)}
    nodes = list(joint.graph.nodes)
    # The graph exercises every case: views are charged; getitem, placeholders, output are not.
    assert any(is_view_like(n) and n.name in charged for n in nodes)
    assert any(n.target is operator.getitem for n in nodes)
    assert charged == {n.name for n in nodes if n.op == "call_function" and n.target is not operator.getitem}
    # The full run takes 0.5 ms per op more than the per-op times add up to.
    total = sum(c.time_ms for c in raw.values())
    runs = _fixed_full_run(monkeypatch, total + 0.5 * len(charged))
    costs = measure_costs(joint, primals, "cpu", repeats=2, cache=cache)  # per-op times: cache hits
    assert len(runs) == 3  # one warm-up, then `repeats` timed runs
    assert set(costs) == set(raw)
    for name, cost in costs.items():
        assert cost.time_ms == pytest.approx(raw[name].time_ms + (0.5 if name in charged else 0.0), abs=1e-12)
        assert cost.workspace_bytes == raw[name].workspace_bytes
    # The no-remat step (every op once) is now predicted as the full run.
    assert sum(c.time_ms for c in costs.values()) == pytest.approx(total + 0.5 * len(charged))


def test_overhead_is_never_negative(monkeypatch):
    joint, primals = capture_joint(mlp_ln(), torch.randn(16, 32))
    cache = ProfileCache(None)
    raw = measure_costs(joint, primals, "cpu", repeats=2, cache=cache, calibrate=False)
    _fixed_full_run(monkeypatch, 0.0)  # a full run faster than its parts (noise)
    assert measure_costs(joint, primals, "cpu", repeats=2, cache=cache) == raw


def test_calibrate_overhead_runs_the_generated_code():
    joint, primals = capture_joint(mlp_ln(), torch.randn(16, 32))
    args = measure._graph_inputs(joint, primals, torch.device("cpu"))
    # The flat copy computes what the joint graph computes.
    with torch.no_grad():
        expected = tree_leaves(torch.fx.Interpreter(joint).run(*args))
        got = tree_leaves(measure._flat_module(joint)(*args))
    assert len(got) == len(expected) > 1
    assert all(a is None and b is None or torch.equal(a, b) for a, b in zip(got, expected))
    free = {n.name: NodeCost(0.0, 0) for n in joint.graph.nodes}
    overhead = calibrate_overhead(joint, args, free, "cpu", repeats=2)
    assert overhead > 0  # free ops: the whole run is overhead
    huge = {n.name: NodeCost(1e6, 0) for n in joint.graph.nodes}
    assert calibrate_overhead(joint, args, huge, "cpu", repeats=2) == 0.0


def test_cache_hit_reuses_the_overhead_and_runs_nothing(tmp_path, monkeypatch):
    joint, primals = capture_joint(mlp_ln(), torch.randn(16, 32))
    path = tmp_path / "profiles.json"
    raw = measure_costs(joint, primals, "cpu", repeats=2, cache=ProfileCache(None), calibrate=False)
    total = sum(c.time_ms for c in raw.values())
    _fixed_full_run(monkeypatch, total + 100.0)
    first = measure_costs(joint, primals, "cpu", repeats=2, cache=ProfileCache(path))
    stored = json.loads(path.read_text())["overheads"][device_name(torch.device("cpu"))]
    assert list(stored) == [graph_key(joint, "cpu")]
    assert next(iter(stored.values())) > 0

    def must_not_run(*args, **kwargs):
        raise AssertionError("a cache hit ran the graph")

    monkeypatch.setattr(measure, "_time_full_run", must_not_run)
    monkeypatch.setattr(_TimingInterpreter, "_time_once", must_not_run)
    cache = ProfileCache(path)  # a new process reads the same file
    again = measure_costs(joint, primals, "cpu", repeats=2, cache=cache)
    assert cache.misses == 0 and again == first
    # Whatever the fresh per-op times, the no-remat step adds up to the (fixed) full run.
    assert sum(c.time_ms for c in first.values()) == pytest.approx(total + 100.0)


def test_graph_key_tells_graphs_apart():
    joint, _ = capture_joint(mlp_ln(), torch.randn(16, 32))
    same, _ = capture_joint(mlp_ln(), torch.randn(16, 32))
    other, _ = capture_joint(mlp_ln(), torch.randn(24, 32))
    assert graph_key(joint, "cpu") == graph_key(same, "cpu")
    assert graph_key(joint, "cpu") != graph_key(other, "cpu")


def test_simulate_charges_the_overhead_per_executed_op_recomputations_included(monkeypatch):
    import solvers
    from rematc.lower import lower_joint_graph

    joint, primals = capture_joint(mlp_ln(), torch.randn(16, 32))
    cache = ProfileCache(None)
    raw = measure_costs(joint, primals, "cpu", repeats=2, cache=cache, calibrate=False)
    _fixed_full_run(monkeypatch, sum(c.time_ms for c in raw.values()) + 0.25 * len(overhead_nodes(joint)))
    costs = measure_costs(joint, primals, "cpu", repeats=2, cache=cache)
    plain = lower_joint_graph(joint, 1, raw).graph
    charged = lower_joint_graph(joint, 1, costs).graph
    forward_values = [
        v for v, value in enumerate(plain.values)
        if value.producer is not None and not plain.ops[value.producer].is_backward
    ]
    for schedule in (solvers.no_remat_schedule(plain), solvers.build_remat_schedule(plain, forward_values)):
        computed = (*schedule.computes("forward"), *schedule.computes("backward"))
        executed = [i for i in computed if not plain.ops[i].is_input]
        extra = solvers.simulate(charged, schedule).time_ms - solvers.simulate(plain, schedule).time_ms
        assert extra == pytest.approx(0.25 * len(executed))
    recomputing = solvers.build_remat_schedule(plain, forward_values)
    assert len(recomputing.computes("backward")) > len(solvers.no_remat_schedule(plain).computes("backward"))


def test_analytic_mode_has_no_overhead_term(monkeypatch):
    from rematc import Rockmate
    from rematc.api import profile_costs

    def must_not_run(*args, **kwargs):
        raise AssertionError("analytic mode ran the calibration")

    monkeypatch.setattr(measure, "calibrate_overhead", must_not_run)
    monkeypatch.setattr(measure, "_time_full_run", must_not_run)
    joint, _ = capture_joint(mlp_ln(), torch.randn(16, 32))
    analytic = analytic_costs(joint, "cpu")
    assert {k: c.time_ms for k, c in profile_costs(joint, "cpu").items()} == {k: c.time_ms for k, c in analytic.items()}
    rm = Rockmate(mlp_ln(), torch.randn(16, 32), 1.0, profile="analytic", cache=False)
    times = {op.name: op.time_ms for op in rm.plan.lowered.graph.ops if not op.is_input}
    nodes = {n.name: n for n in rm.plan.lowered.op_nodes}
    assert all(t == 0.0 for name, t in times.items() if is_view_like(nodes[name]))


def test_timings_inside_the_partitioner_leave_its_python_dispatch(monkeypatch):
    """NOTE: [Profiling inside the partitioner]: ops are timed as the real step runs them."""
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._functorch.partitioners import default_partition

    tracing = ("Python", "PythonTLSSnapshot", "PythonDispatcher")

    def keys() -> set[str]:
        include = torch._C._dispatch_tls_local_include_set()
        return {k for k in tracing if include.has(getattr(torch._C.DispatchKey, k))}

    seen: dict[str, list[set[str]]] = {"op": [], "full": []}
    time_once = _TimingInterpreter._time_once

    def spy_once(self, n, args, kwargs):
        seen["op"].append(keys())
        return time_once(self, n, args, kwargs)

    def spy_full(run, args, device):
        seen["full"].append(keys())
        return 0.0

    monkeypatch.setattr(_TimingInterpreter, "_time_once", spy_once)
    monkeypatch.setattr(measure, "_time_full_run", spy_full)
    model, x = mlp_ln(), torch.randn(16, 32)

    def backend(gm, example_inputs):
        def partition(joint, inputs, *, num_fwd_outputs, **kw):  # where Rockmate profiles
            seen["partitioner"] = [keys()]
            measure_costs(joint, list(example_inputs), "cpu", repeats=1)
            return default_partition(joint, inputs, num_fwd_outputs=num_fwd_outputs, **kw)

        return aot_module_simplified(gm, example_inputs, fw_compiler=lambda g, i: g, bw_compiler=lambda g, i: g,
                                     partition_fn=partition)

    step = lambda t: model(t).sum()  # noqa: E731
    step = types.FunctionType(step.__code__.replace(), step.__globals__, "step", None, step.__closure__)
    torch.compile(step, backend=backend, dynamic=False)(x).backward()
    assert "PythonDispatcher" in seen["partitioner"][0]  # what the timings must not see
    assert seen["op"] and seen["full"]  # ops and full runs were timed, all without it
    assert all(k == set() for k in seen["op"] + seen["full"])
