"""``Rockmate``: a module that trains exactly like the original under a memory budget."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx

import solvers
from profiler.analytic import NodeCost, analytic_costs
from profiler.cache import ProfileCache, default_cache_dir
from profiler.measure import measure_costs
from profiler.workspace import measure_workspace
from solvers import BudgetInfeasible, Schedule, SimulationResult

from .budget import parse_budget
from .capture import CompiledStep
from .codegen import GeneratedModules, generate_modules
from .errors import BudgetTooSmall, RematcError
from .lower import Lowered, lower_joint_graph
from .passes import make_dropout_outputs_recomputable


@dataclass(frozen=True)
class Plan:
    """Everything decided for one captured joint graph (kept for inspection)."""

    lowered: Lowered
    schedule: Schedule
    predicted: SimulationResult
    baseline: SimulationResult
    budget_bytes: int
    modules: GeneratedModules
    solve_seconds: float
    profile_seconds: float


class Rockmate(torch.nn.Module):
    """Wrap ``model`` so that one forward+backward stays under ``budget``.

    The module shares ``model``'s parameters (any optimizer built on
    ``model.parameters()`` keeps working), returns outputs with the original
    structure, and gives the same outputs and gradients as ``model``. In
    ``eval()`` mode or under ``torch.no_grad()`` it simply runs ``model``.

    Planning happens in the constructor: the step is captured on ``sample``
    (TorchDynamo + AOTAutograd), costed, scheduled and compiled. The model's
    buffers and the RNG state are restored afterwards, so construction does
    not change training.

    Args:
        model: the module to train.
        sample: example inputs: a tensor, a tuple of positional arguments, or a
            dict of keyword arguments. Later calls must use the same shapes and
            dtypes (another shape is captured and planned again).
        budget: peak bytes allowed during forward+backward above what is
            allocated when the forward starts: an int (bytes), a string such as
            ``"512MiB"``, ``"3GB"``, ``"1.5GiB"``, or a float in (0, 1] meaning
            that fraction of the no-remat peak.
        loss_fn: optional ``loss_fn(output, *loss_args) -> loss`` computed
            inside the planned region; the module then returns the loss.
        loss_args: example extra arguments of ``loss_fn`` (e.g. targets); at
            call time pass them as ``module(x, loss_args=(y,))``.
        method: solver name from ``solvers.METHODS`` (``"auto"`` picks).
        profile: ``"measure"`` times every distinct op on the real sample
            (cached on disk per op signature and device); ``"analytic"``
            estimates times from FLOPs and bytes (deterministic). Both measure
            op workspace. Default: ``"measure"`` on CUDA, ``"analytic"`` on CPU
            (CPU timings of small ops are noisy and the tests need determinism).

    Raises:
        BudgetTooSmall: the budget is below the smallest feasible peak, given
            as ``err.min_budget_bytes``.
        ValueError: ``budget`` or another argument is malformed.

    Example:
        >>> rm = Rockmate(model, torch.randn(8, 64), budget=0.5)   # doctest: +SKIP
        >>> rm.predicted_peak_bytes <= rm.budget_bytes              # doctest: +SKIP
        True
    """

    def __init__(
        self,
        model: torch.nn.Module,
        sample: Any,
        budget: int | float | str,
        *,
        loss_fn: Callable[..., Any] | None = None,
        loss_args: tuple = (),
        method: str = "auto",
        profile: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if method != "auto" and method not in solvers.METHODS:
            raise ValueError(f"method must be 'auto' or one of {sorted(solvers.METHODS)}, got {method!r}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable or None, got {type(loss_fn).__name__}")
        if not isinstance(loss_args, tuple):
            raise TypeError(f"loss_args must be a tuple, got {type(loss_args).__name__}")
        self.model = model
        self.loss_fn = loss_fn
        self.method = method
        if profile not in (None, "measure", "analytic"):
            raise ValueError(f"profile must be 'measure', 'analytic' or None (device default), got {profile!r}")
        self._budget = parse_budget(budget)
        self._plan: Plan | None = None
        self._step = CompiledStep(model, loss_fn, self._plan_joint)
        args, kwargs = split_sample(sample)
        self._device_type = _device_type(model, args, kwargs)
        self.profile = profile or ("measure" if self._device_type == "cuda" else "analytic")
        started = time.perf_counter()
        self._capture(args, kwargs, loss_args)
        self.plan_seconds = time.perf_counter() - started

    # -- planning -----------------------------------------------------------------
    def _capture(self, args: tuple, kwargs: dict, loss_args: tuple) -> None:
        """Run the compiled step once on the sample (this plans) and undo its side effects."""
        buffers = [b.detach().clone() for b in self.model.buffers()]
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        was_training = self.model.training
        try:
            self.model.train()
            with torch.enable_grad():
                output = self._step(args, kwargs, loss_args)
            del output
        finally:
            self.model.train(was_training)
            with torch.no_grad():
                for saved, buffer in zip(buffers, self.model.buffers()):
                    buffer.copy_(saved)
            torch.set_rng_state(rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
        if self._plan is None:
            raise RematcError(
                "the sample did not produce a backward graph: no output requires grad "
                "(check that the model has trainable parameters and returns tensors)"
            )

    def _plan_joint(
        self, joint: fx.GraphModule, num_fwd_outputs: int, primals: list[Any]
    ) -> tuple[fx.GraphModule, fx.GraphModule]:
        started = time.perf_counter()
        make_dropout_outputs_recomputable(joint)
        if self.profile == "measure":
            cache = ProfileCache(default_cache_dir() / "profiles.json")
            costs = measure_costs(joint, primals, self._device_type, cache=cache)
        else:
            costs = profile_costs(joint, self._device_type)
        lowered = lower_joint_graph(joint, num_fwd_outputs, costs)
        profiled = time.perf_counter()
        graph = lowered.graph
        baseline = solvers.simulate(graph, solvers.no_remat_schedule(graph))
        budget_bytes = self._budget.resolve(baseline.peak_bytes)
        try:
            schedule = solvers.solve(graph, budget_bytes, method=self.method)
        except BudgetInfeasible as error:
            raise BudgetTooSmall(budget_bytes, error.min_feasible_bytes, error.method) from None
        predicted = solvers.simulate(graph, schedule)
        modules = generate_modules(joint, lowered, schedule)
        self._plan = Plan(
            lowered, schedule, predicted, baseline, budget_bytes, modules,
            solve_seconds=time.perf_counter() - profiled, profile_seconds=profiled - started,
        )
        return modules.forward, modules.backward

    # -- running ------------------------------------------------------------------
    def forward(self, *args: Any, loss_args: tuple = (), **kwargs: Any) -> Any:
        if not self.training or not torch.is_grad_enabled():
            output = self.model(*args, **kwargs)
            return output if self.loss_fn is None else self.loss_fn(output, *loss_args)
        calls = self._step.forward_calls
        output = self._step(args, kwargs, loss_args)
        if self._step.forward_calls == calls:
            raise RematcError(
                "the training step ran without rematc's plan (TorchDynamo fell back to eager, "
                "for example after too many recompilations); the memory budget is not enforced"
            )
        return output

    # -- figures ------------------------------------------------------------------
    @property
    def plan(self) -> Plan:
        assert self._plan is not None
        return self._plan

    @property
    def budget_bytes(self) -> int:
        """The budget in bytes (fractions resolved against the no-remat peak)."""
        return self.plan.budget_bytes

    @property
    def predicted_peak_bytes(self) -> int:
        """Peak bytes of one forward+backward under the plan, predicted by ``solvers.simulate``."""
        return self.plan.predicted.peak_bytes

    @property
    def baseline_peak_bytes(self) -> int:
        """Predicted peak bytes without rematerialization (what autograd does)."""
        return self.plan.baseline.peak_bytes

    @property
    def predicted_step_seconds(self) -> float:
        """Predicted time of one forward+backward under the plan (``solvers.simulate``)."""
        return self.plan.predicted.time_ms / 1e3

    @property
    def baseline_step_seconds(self) -> float:
        """Predicted time of one forward+backward without rematerialization."""
        return self.plan.baseline.time_ms / 1e3

    def extra_repr(self) -> str:
        if self._plan is None:
            return "unplanned"
        return (
            f"budget={solvers.format_bytes(self.budget_bytes)}, "
            f"predicted_peak={solvers.format_bytes(self.predicted_peak_bytes)}, "
            f"baseline_peak={solvers.format_bytes(self.baseline_peak_bytes)}"
        )


def profile_costs(joint: fx.GraphModule, device_type: str) -> dict[str, NodeCost]:
    """Per-node costs: analytic time, measured workspace (no formula predicts kernels' temporaries)."""
    times = analytic_costs(joint, device_type)
    workspace = measure_workspace(joint, device_type)
    return {
        name: NodeCost(cost.time_ms, workspace.get(name, 0)) for name, cost in times.items()
    }


def split_sample(sample: Any) -> tuple[tuple, dict]:
    """A sample as (args, kwargs): a tensor, a tuple/list of arguments, or a dict of keyword arguments."""
    if isinstance(sample, dict):
        return (), dict(sample)
    if isinstance(sample, (tuple, list)):
        return tuple(sample), {}
    return (sample,), {}


def _device_type(model: torch.nn.Module, args: tuple, kwargs: dict) -> str:
    for tensor in [*model.parameters(), *args, *kwargs.values()]:
        if isinstance(tensor, torch.Tensor):
            return tensor.device.type
    return "cpu"
