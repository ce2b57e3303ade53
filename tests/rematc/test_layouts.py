"""``make_layouts_faithful``: fake layouts of the joint graph match the kernels that run (NOTE: [Runtime layouts])."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch._functorch.aot_autograd import aot_module_simplified, make_boxed_func
from torch._functorch.partitioners import default_partition
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_flatten

from profiler.tensors import same_storage
from rematc.layouts import make_layouts_faithful

torch.set_num_threads(1)
aten = torch.ops.aten


class ChannelsLastMLP(nn.Module):
    """The tail of a ConvNeXt block: an MLP and dropout on a channels-last view, permuted back."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c, 2 * c), nn.Linear(2 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc2(F.gelu(self.fc1(x.permute(0, 2, 3, 1))))
        h = F.dropout(self.gamma * h, 0.25, self.training).permute(0, 3, 1, 2)
        return (x + h).square().mean()


class GridLogSoftmax(nn.Module):
    """Tokens as a grid, a 1x1 conv, ``log_softmax(dim=1).movedim(1, -1).reshape`` and NLL (fuzz seed 118).

    On CPU, ``_log_softmax_backward_data`` returns a contiguous gradient where
    its meta kernel keeps the permuted layout: every op after it in the
    backward ran on other strides than the graph said.
    """

    def __init__(self, c: int = 8, k: int = 10) -> None:
        super().__init__()
        self.proj, self.conv = nn.Linear(c, c), nn.Conv2d(c, k, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        grid = self.proj(x).transpose(1, 2).reshape(b, c, 2, t // 2)
        logp = F.log_softmax(self.conv(grid), dim=1).movedim(1, -1).reshape(-1, self.conv.out_channels)
        target = torch.arange(logp.shape[0]) % self.conv.out_channels
        return F.nll_loss(logp, target, reduction="sum")


def _compile(model: nn.Module, apply_pass: bool, captured: dict) -> torch.nn.Module:
    """``model`` through Dynamo + AOTAutograd (eager kernels), the pass applied to the joint graph."""

    def backend(gm: fx.GraphModule, example_inputs: list) -> object:
        def partition(joint: fx.GraphModule, joint_inputs: object, **kwargs: object) -> object:
            if apply_pass:
                captured["copies"] = make_layouts_faithful(joint)
            captured["joint"], captured["primals"] = copy.deepcopy(joint), list(example_inputs)
            return default_partition(joint, joint_inputs, **kwargs)

        return aot_module_simplified(gm, example_inputs, fw_compiler=_eager, bw_compiler=_eager, partition_fn=partition)

    torch._dynamo.reset()
    return torch.compile(model, backend=backend, dynamic=False, fullgraph=True)


def _eager(gm: fx.GraphModule, _example_inputs: object) -> object:
    return make_boxed_func(gm.forward)


def _sample() -> torch.Tensor:
    return torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(0))


def test_dropout_on_a_permuted_activation_trains_bitwise_like_eager():
    torch.manual_seed(0)
    model = ChannelsLastMLP()
    compiled_model, captured = copy.deepcopy(model), {}
    compiled = _compile(compiled_model, apply_pass=True, captured=captured)

    torch.manual_seed(1)
    loss = compiled(_sample())
    loss.backward()  # without the pass: "view size is not compatible with input tensor's size and stride"
    torch.manual_seed(1)
    want = model(_sample())
    want.backward()

    assert captured["copies"] >= 1, "the Linear backward's view of the dropout gradient must read a copy"
    assert torch.equal(loss, want)
    for (name, p), q in zip(model.named_parameters(), compiled_model.parameters()):
        assert torch.equal(q.grad, p.grad), name


_MODELS = {
    "channels_last_mlp": (ChannelsLastMLP, _sample),
    "grid_log_softmax": (GridLogSoftmax, lambda: torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(0))),
}


@pytest.mark.parametrize("name", sorted(_MODELS))
def test_every_fake_layout_in_the_joint_graph_matches_the_real_tensor(name: str):
    """Run the rewritten joint graph on real tensors: each node's strides are its fake's strides."""
    make_model, make_sample = _MODELS[name]
    torch.manual_seed(0)
    captured: dict = {}
    _compile(make_model(), apply_pass=True, captured=captured)(make_sample()).backward()
    joint: fx.GraphModule = captured["joint"]
    placeholders = [n for n in joint.graph.nodes if n.op == "placeholder"]
    primals = captured["primals"]
    tangents = []
    for node in placeholders[len(primals):]:
        val = node.meta["val"]
        tangents.append(torch.ones(val.shape, dtype=val.dtype).as_strided(val.shape, val.stride()))

    mismatches: list[str] = []

    class Check(fx.Interpreter):
        def run_node(self, node: fx.Node) -> object:
            out = super().run_node(node)
            reals = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            fakes = [t for t in tree_flatten(node.meta.get("val"))[0] if isinstance(t, torch.Tensor)]
            for real, fake in zip(reals, fakes):
                if real.stride() != fake.stride():
                    mismatches.append(f"%{node.name}: real {real.stride()} fake {fake.stride()}")
            return out

    Check(joint).run(primals, tangents)
    assert not mismatches, mismatches


def test_a_view_its_input_cannot_support_reads_a_contiguous_copy():
    """Any ``view`` whose input's fake strides do not allow it is rewritten, as eager ``reshape`` does."""
    mode = FakeTensorMode()
    real = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 5, 3, 4).permute(0, 2, 3, 1)
    graph = fx.Graph()
    x = graph.placeholder("x")
    x.meta["val"] = mode.from_tensor(real)
    doubled = graph.call_function(aten.mul.Tensor, (x, 2.0))
    flat = graph.call_function(aten.view.default, (doubled, [24, 5]))
    total = graph.call_function(aten.sum.dim_IntList, (flat, [0]))
    graph.output((total, flat))
    with mode:
        doubled.meta["val"] = aten.mul.Tensor(x.meta["val"], 2.0)  # permuted, like the real tensor
        flat.meta["val"] = torch.empty(24, 5)  # traced as if ``doubled`` were contiguous
        total.meta["val"] = torch.empty(5)
    gm = fx.GraphModule(nn.Module(), graph)

    assert make_layouts_faithful(gm) == 1
    copy_node = flat.args[0]
    assert copy_node.target is aten.clone.default and copy_node.args[0] is doubled
    assert copy_node.meta["val"].is_contiguous()
    assert same_storage(flat.meta["val"], copy_node.meta["val"]), "the view aliases the copy"
    assert not same_storage(flat.meta["val"], doubled.meta["val"])
    got_total, got_flat = gm(real)
    assert torch.equal(got_flat, (real * 2.0).reshape(24, 5))
    assert torch.equal(got_total, (real * 2.0).reshape(24, 5).sum(0))
