"""Constructs found in real models, one test each (regressions from building out the zoo).

Each was a bug found on a zoo model: logging inside ``forward`` (Hugging Face
GPT-2), tensor constants (GPT-2), views of dropout outputs counted as
allocations (BERT), output gradients pinned to the end of the backward (a model
returning activations), dropout rounding in bfloat16; and the graph-break
error, which must point at the user's line.
"""

from __future__ import annotations

import copy
import inspect
import logging

import pytest
import torch
import torch.nn.functional as F
import transformers.utils.logging  # noqa: F401  (adds logging.Logger.warning_once, as in every HF model)
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

import solvers
from profiler.analytic import NodeCost
from profiler.meter import MemoryMeter
from rematc import GraphBreakError, RematcError, Rockmate
from rematc.lower import lower_joint_graph
from rematc.passes import make_dropout_outputs_recomputable

torch.set_num_threads(1)
aten = torch.ops.aten
_log = logging.getLogger("tests.model_constructs")


def _same_step(model: nn.Module, x: torch.Tensor, budget: float | int = 1.0) -> Rockmate:
    """Plan ``model`` at ``budget``, run one step and check loss and gradients equal eager's."""
    reference = copy.deepcopy(model)
    rm = Rockmate(model, (x,), budget)
    loss, ref_loss = rm(x), reference(x)
    loss.backward()
    ref_loss.backward()
    assert torch.equal(loss, ref_loss)
    for (name, p), rp in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p.grad, rp.grad), name
    return rm


def _smallest_budget(model: nn.Module, x: torch.Tensor) -> int:
    probe = Rockmate(copy.deepcopy(model), (x,), 1.0)
    return solvers.min_feasible_peak(probe.plan.lowered.graph, probe.method)


class Logs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _log.warning("forward called with %s", tuple(x.shape))
        _log.info("and again")
        _log.warning_once("once")  # transformers' addition to logging.Logger
        return self.lin(x).square().mean()


def test_logging_in_forward_is_dropped_instead_of_breaking_the_graph() -> None:
    # Hugging Face GPT2LMHeadModel(labels=...) calls logger.warning_once on every step.
    torch.manual_seed(0)
    _same_step(Logs(), torch.randn(4, 8))


class Constants(nn.Module):
    """``torch.tensor(...)`` in forward becomes a ``get_attr`` tensor constant (GPT-2's attention does this)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 64), nn.Linear(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x)) * torch.tensor(0.5)
        return self.b(torch.tanh(h)).square().mean()


def test_tensor_constants_are_read_by_forward_and_recomputations() -> None:
    torch.manual_seed(0)
    model, x = Constants(), torch.randn(64, 16)
    rm = _same_step(model, x, _smallest_budget(model, x))
    assert rm.plan.modules.recomputed_ops
    for gm in (rm.plan.modules.forward, rm.plan.modules.backward):
        assert any(n.op == "get_attr" for n in gm.graph.nodes), gm.code


def test_views_of_dropout_outputs_share_its_storage() -> None:
    """After the dropout rewrite, a view of the dropout output allocates nothing (BERT's attention does this)."""

    def f(x: torch.Tensor) -> tuple[torch.Tensor]:
        out, _ = aten.native_dropout(x, 0.5, True)
        return (aten.view(out, [-1]) * 2,)

    gm = make_fx(f, tracing_mode="fake")(torch.randn(16, 16))
    assert make_dropout_outputs_recomputable(gm) == 1
    lowered = lower_joint_graph(gm, 1, {n.name: NodeCost(0.0, 0) for n in gm.graph.nodes})
    graph = lowered.graph
    views = [v for v, node in enumerate(lowered.value_nodes) if node is not None and node.target is aten.view.default]
    assert len(views) == 1
    assert graph.values[views[0]].view_of is not None
    assert graph.allocated_bytes(views[0]) == 0


class Wide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(64, 128), nn.Linear(128, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def test_output_gradients_die_at_their_last_use_and_loss_gradients_are_pinned() -> None:
    """NOTE: [Which tangents are pinned]: an output's gradient made by the caller's loss is freed
    by AOTAutograd after its last use; the gradient of a scalar root (``loss.backward()``) is held."""
    torch.manual_seed(0)
    x, weights = torch.randn(128, 64), torch.randn(128, 256)
    rm = Rockmate(Wide(), (x,), 1.0)
    graph = rm.plan.lowered.graph
    tangents = [op.outputs[0] for op in graph.ops if op.is_input]
    assert len(tangents) == 1 and tangents[0] not in graph.required_at_end
    with MemoryMeter() as meter:
        out = rm(x)  # the caller holds the output through the backward, as the model assumes
        (out * weights).sum().backward()
    # The caller's loss and its gradient (4 bytes each) are outside the plan.
    assert rm.predicted_peak_bytes <= meter.peak_bytes <= rm.predicted_peak_bytes + 8
    # Pinning the 128 KiB output gradient would have overestimated by 30%.
    assert graph.values[tangents[0]].bytes > 0.2 * meter.peak_bytes

    with_loss = Rockmate(Wide(), (x,), 1.0, loss_fn=lambda out, w: (out * w).sum(), loss_args=(weights,))
    graph = with_loss.plan.lowered.graph
    (loss_tangent,) = [op.outputs[0] for op in graph.ops if op.is_input]
    assert loss_tangent in graph.required_at_end


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dropout_rewrite_matches_eager_dropout_in_every_dtype(dtype: torch.dtype) -> None:
    """Forward and backward of the rewritten graph equal eager ``F.dropout`` (NOTE: [Dropout backward on CPU])."""
    p = 0.1  # 1/(1-p) is not representable in bfloat16: the rounding matters

    def joint(x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, mask = aten.native_dropout(x, p, True)
        return out, aten.native_dropout_backward(grad, mask, 1.0 / (1.0 - p))

    x, grad = torch.randn(64, 64, dtype=dtype), torch.randn(64, 64, dtype=dtype)
    gm = make_fx(joint, tracing_mode="fake")(x, grad)
    make_dropout_outputs_recomputable(gm)
    assert not any(n.target is aten.native_dropout_backward.default for n in gm.graph.nodes)
    torch.manual_seed(3)
    out, grad_x = gm(x, grad)

    leaf = x.clone().requires_grad_()
    torch.manual_seed(3)
    eager = F.dropout(leaf, p, training=True)
    eager.backward(grad)
    assert torch.equal(out, eager.detach())
    assert torch.equal(grad_x, leaf.grad)


class PrintsInForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        print("hidden", h.shape)  # graph break: Dynamo cannot trace print
        return h.sum()


class BranchesOnValues(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        if h.sum().item() > 0:  # graph break: control flow on a tensor's value
            return (h * 2).sum()
        return h.sum()


@pytest.mark.parametrize(
    "model, construct, code",
    [
        (PrintsInForward, "print", 'print("hidden", h.shape)'),
        (BranchesOnValues, "tensor's value", "if h.sum().item() > 0:"),
    ],
    ids=["print", "item"],
)
def test_graph_break_names_the_construct_and_the_users_line(model, construct: str, code: str) -> None:
    with pytest.raises(GraphBreakError) as info:
        Rockmate(model(), torch.randn(2, 4), 1.0)
    error = info.value
    lines, start = inspect.getsourcelines(model.forward)
    line = start + next(i for i, text in enumerate(lines) if code in text)
    assert error.frame is not None and error.frame.filename == __file__ and error.frame.lineno == line
    assert construct in error.reason
    head = str(error).split("Dynamo's report")[0]  # what the user reads first
    assert f"{__file__}:{line}, in forward" in head and code in head and construct in head


def test_model_without_trainable_outputs_is_refused_by_name() -> None:
    frozen = nn.Linear(8, 8).requires_grad_(False)
    with pytest.raises(RematcError, match="no output requires grad"):
        Rockmate(frozen, torch.randn(4, 8), 1.0)


def test_double_backward_is_refused_by_name() -> None:
    """Unsupported: AOTAutograd's compiled backward is not differentiable; the error says so."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    x = torch.randn(4, 8)
    rm = Rockmate(model, (x,), 1.0)
    # The backward was compiled at construction (NOTE: [Verified plans]), so AOTAutograd
    # refuses the graph-keeping backward by its donated buffers before its double-backward check.
    with pytest.raises(RuntimeError, match="double backward|requires create_graph=False"):
        grads = torch.autograd.grad(rm(x).sum(), list(model.parameters()), create_graph=True)
        sum(g.square().sum() for g in grads).backward()


def test_entering_autocast_after_planning_plans_again_and_matches_eager() -> None:
    """Dynamo guards on the autocast state: a step under autocast is captured (and planned) anew."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))
    reference = copy.deepcopy(model)
    x = torch.randn(8, 16)
    rm = Rockmate(model, (x,), 1.0)  # planned in float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = rm(x), reference(x)
    assert out.dtype == ref.dtype == torch.bfloat16 and torch.equal(out, ref)
    assert rm._step.compilations == 2
    out.float().square().sum().backward()
    ref.float().square().sum().backward()
    for p, rp in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p.grad, rp.grad)



def test_parameters_only_a_recomputation_reads_are_saved_and_gradients_match() -> None:
    """The hierarchical planner recomputes whole ResNet blocks: their BatchNorm reads its bias,
    which AOTAutograd's own backward never reads, so its extraction drops it from the saved
    values; codegen puts it back (regression: "AOTAutograd dropped saved values")."""
    from benchmarks.workloads import resnet

    torch.manual_seed(0)
    workload = resnet(widths=(16, 32, 64), blocks_per_stage=2, image_size=32, batch_size=16)
    model = workload.make_model()
    eager = copy.deepcopy(model)
    args, targets = workload.make_batch(torch.Generator().manual_seed(0))
    rm = Rockmate(model, args, budget=0.5, method="hierarchical", cache=False,
                  loss_fn=workload.loss_fn, loss_args=(targets,))
    assert any(name.startswith("_native_batch_norm_legit_functional") for name in rm.plan.modules.recomputed_ops)
    for _ in range(2):  # the second step also checks the running statistics
        rm(*args, loss_args=(targets,)).backward()
        workload.loss_fn(eager(*args), targets).backward()
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        assert torch.equal(p.grad, q.grad), name
    for b, c in zip(model.buffers(), eager.buffers()):
        assert torch.equal(b, c)
