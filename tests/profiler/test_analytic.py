"""The analytic cost model on real aten graphs, and the tensor helpers."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx
from torch._functorch.aot_autograd import aot_module_simplified, make_boxed_func
from torch._functorch.partitioners import default_partition
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

from profiler.analytic import (
    DeviceModel,
    NodeCost,
    analytic_costs,
    device_model,
    estimate_time_ms,
    is_view_like,
    node_bytes_moved,
    node_flops,
)
from profiler.tensors import same_storage, storage_nbytes, storage_ref, tensor_nbytes

aten = torch.ops.aten


def capture_joint_graph(model: torch.nn.Module, batch: torch.Tensor) -> torch.fx.GraphModule:
    """AOTAutograd's joint forward+backward graph of ``model(batch).sum()``."""
    captured: dict[str, torch.fx.GraphModule] = {}

    def partition(joint: torch.fx.GraphModule, inputs: list, *, num_fwd_outputs: int, **kwargs: object):
        captured["joint"] = joint
        return default_partition(joint, inputs, num_fwd_outputs=num_fwd_outputs, **kwargs)

    def boxed(gm: torch.fx.GraphModule, example_inputs: list):
        return make_boxed_func(gm.forward)

    def backend(gm: torch.fx.GraphModule, example_inputs: list):
        return aot_module_simplified(
            gm, example_inputs, fw_compiler=boxed, bw_compiler=boxed, partition_fn=partition
        )

    torch._dynamo.reset()
    step = torch.compile(lambda x: model(x).sum(), backend=backend, dynamic=False)
    step(batch).backward()
    torch._dynamo.reset()
    return captured["joint"]


@pytest.fixture(scope="module")
def joint() -> torch.fx.GraphModule:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    return capture_joint_graph(model, torch.randn(32, 64))


def fake_graph(fn, *shapes: tuple[int, ...]) -> torch.fx.GraphModule:
    """An aten graph of ``fn`` traced on fake inputs (nodes carry meta["val"])."""
    return make_fx(fn, tracing_mode="fake")(*(torch.empty(shape) for shape in shapes))


def nodes_with(gm: torch.fx.GraphModule, target: object) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


# -------------------------------------------------------------------- flops


def test_mm_and_addmm_flops_are_2mnk(joint: torch.fx.GraphModule) -> None:
    mms, addmms = nodes_with(joint, aten.mm.default), nodes_with(joint, aten.addmm.default)
    assert len(mms) == 3 and len(addmms) == 2  # 2 Linear forwards; 3 weight/input grads
    for node, (a, b) in [(n, n.args[0:2]) for n in mms] + [(n, n.args[1:3]) for n in addmms]:
        (m, k), (k2, n) = a.meta["val"].shape, b.meta["val"].shape
        assert k == k2
        assert node_flops(node) == 2 * m * n * k
    first_linear = next(n for n in addmms if n.meta["val"].shape == (32, 128))
    assert node_flops(first_linear) == 2 * 32 * 128 * 64


def test_ops_without_a_formula_count_zero_flops(joint: torch.fx.GraphModule) -> None:
    for node in nodes_with(joint, aten.relu.default) + nodes_with(joint, aten.threshold_backward.default):
        assert node_flops(node) == 0.0


# -------------------------------------------------------------------- views


def test_views_cost_nothing(joint: torch.fx.GraphModule) -> None:
    views = [
        n
        for n in joint.graph.nodes
        if n.target in (aten.t.default, aten.view.default, aten.expand.default, aten.detach.default)
    ]
    assert len(views) >= 10
    costs = analytic_costs(joint)
    for node in views:
        assert is_view_like(node)
        assert node_bytes_moved(node) == 0
        assert costs[node.name] == NodeCost(time_ms=0.0, workspace_bytes=0)


def test_getitem_alias_and_unsafe_view_are_view_like() -> None:
    def fn(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        var, mean = torch.var_mean(x, dim=0)  # one kernel, a tuple of outputs
        first, second = torch.split(x, 2)  # aliases listed in the schema
        return var, mean, first, second, aten.alias(x), aten._unsafe_view(x * 2, [16])

    gm = fake_graph(fn, (4, 4))
    kinds = {n.target: is_view_like(n) for n in gm.graph.nodes if n.op == "call_function"}
    assert kinds[operator.getitem] and kinds[aten.split.Tensor]
    assert kinds[aten.alias.default] and kinds[aten._unsafe_view.default]
    assert not kinds[aten.var_mean.correction] and not kinds[aten.mul.Tensor]
    # var_mean reads x once and writes two [4] outputs.
    (var_mean,) = nodes_with(gm, aten.var_mean.correction)
    assert node_bytes_moved(var_mean) == 16 * 4 + 2 * 4 * 4
    assert all(node_bytes_moved(n) == 0 for n in nodes_with(gm, operator.getitem))


def test_in_place_ops_are_not_view_like() -> None:
    def fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x.copy_(y)

    gm = make_fx(fn, tracing_mode="fake", pre_dispatch=False)(torch.empty(8), torch.empty(8))
    (copy,) = nodes_with(gm, aten.copy_.default)
    assert not is_view_like(copy)
    assert node_bytes_moved(copy) == 3 * 8 * 4  # reads x and y, writes x


# --------------------------------------------------------------- bytes, time


def test_bytes_moved_are_inputs_plus_outputs(joint: torch.fx.GraphModule) -> None:
    (relu,) = nodes_with(joint, aten.relu.default)
    assert node_bytes_moved(relu) == 2 * 32 * 128 * 4
    (threshold_backward,) = nodes_with(joint, aten.threshold_backward.default)
    assert node_bytes_moved(threshold_backward) == 3 * 32 * 128 * 4


def test_an_input_used_twice_is_read_once() -> None:
    gm = fake_graph(lambda x: x * x, (8,))
    (mul,) = nodes_with(gm, aten.mul.Tensor)
    assert node_bytes_moved(mul) == 2 * 8 * 4


def test_roofline_time() -> None:
    model = DeviceModel(flops_per_second=1e9, bytes_per_second=1e9, floor_ms=0.5)
    gm = fake_graph(lambda a, b: a @ b, (100, 100), (100, 100))
    (mm,) = nodes_with(gm, aten.mm.default)
    # 2e6 FLOPs at 1 GFLOP/s (2 ms) beat 120 kB at 1 GB/s (0.12 ms).
    assert estimate_time_ms(mm, model) == pytest.approx(2.0 + 0.5)
    gm = fake_graph(torch.relu, (1000,))
    (relu,) = nodes_with(gm, aten.relu.default)
    assert estimate_time_ms(relu, model) == pytest.approx(8000 / 1e9 * 1e3 + 0.5)


def test_big_matmul_takes_longer_than_small_elementwise() -> None:
    gm = fake_graph(lambda a, b, c: (a @ b, c.relu()), (512, 512), (512, 512), (16,))
    for device_type in ("cpu", "cuda"):
        costs = analytic_costs(gm, device_type)
        (mm,), (relu,) = nodes_with(gm, aten.mm.default), nodes_with(gm, aten.relu.default)
        assert costs[mm.name].time_ms > costs[relu.name].time_ms >= device_model(device_type).floor_ms


def test_every_node_gets_a_cost(joint: torch.fx.GraphModule) -> None:
    costs = analytic_costs(joint, "cpu")
    assert list(costs) == [n.name for n in joint.graph.nodes]
    assert all(c.time_ms >= 0 and c.workspace_bytes == 0 for c in costs.values())
    placeholders = [n.name for n in joint.graph.nodes if n.op in ("placeholder", "output")]
    assert all(costs[name].time_ms == 0 for name in placeholders)
    assert sum(c.time_ms > 0 for c in costs.values()) >= 8


def test_costs_are_deterministic(joint: torch.fx.GraphModule) -> None:
    assert analytic_costs(joint, "cpu") == analytic_costs(joint, "cpu")
    assert analytic_costs(joint, "cuda") == analytic_costs(joint, "cuda")


# ------------------------------------------------------------- device model


def test_device_models() -> None:
    assert device_model("cpu") == DeviceModel(flops_per_second=50e9, bytes_per_second=10e9, floor_ms=0.005)
    assert device_model("cuda:1") == device_model("cuda")
    with pytest.raises(ValueError, match=r"device_type must be one of \['cpu', 'cuda'\], got 'tpu'"):
        device_model("tpu")
    with pytest.raises(ValueError, match="bytes_per_second must be > 0, got 0"):
        DeviceModel(flops_per_second=1.0, bytes_per_second=0, floor_ms=0.0)


# ----------------------------------------------------------- tensor helpers


@pytest.mark.parametrize("kind", ["real", "fake", "meta"])
def test_tensor_helpers(kind: str) -> None:
    def make() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = torch.empty(4, 8, device="meta" if kind == "meta" else "cpu")
        return x, x[1:].t(), torch.empty_like(x)

    if kind == "fake":
        with FakeTensorMode():
            x, view, other = make()
    else:
        x, view, other = make()
    assert tensor_nbytes(x) == storage_nbytes(x) == 128
    assert (tensor_nbytes(view), storage_nbytes(view)) == (96, 128)
    assert same_storage(x, view) and not same_storage(x, other)
    assert len({storage_ref(x), storage_ref(view), storage_ref(other)}) == 2


def test_storage_helpers_on_graph_values(joint: torch.fx.GraphModule) -> None:
    (t, *_) = nodes_with(joint, aten.t.default)
    weight = t.args[0]
    assert same_storage(t.meta["val"], weight.meta["val"])
    assert storage_nbytes(t.meta["val"]) == 128 * 64 * 4
