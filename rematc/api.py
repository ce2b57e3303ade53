"""``Rockmate``: a module that trains exactly like the original under a memory budget."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.fx as fx

import solvers
from profiler.analytic import NodeCost, analytic_costs
from profiler.cache import ProfileCache, default_cache_dir, device_name
from profiler.measure import measure_costs
from profiler.workspace import measure_op_memory
from solvers import BudgetInfeasible, Schedule, SimulationResult

from .budget import parse_budget
from .capture import CompiledStep
from .codegen import GeneratedModules, generate_modules
from .errors import BudgetTooSmall, RematcError, RematcWarning
from .explain import Explanation, explain_plan
from .lower import Lowered, lower_joint_graph
from .layouts import make_layouts_faithful
from .passes import make_dropout_outputs_recomputable
from .rng import make_dropout_replayable
from .graph_hash import graph_hash
from .schedule_cache import PlanKey, ScheduleSource, budget_key, make_schedule_file
from .schedule_file import ScheduleFile, write_schedule_file
from .verify import CUDA_GAP_TOLERANCE, CudaStepWatch, run_planned_step

_log = logging.getLogger("rematc")

# Plans made again, each further below the budget, when verification measures above it.
_MAX_REPLANS = 3


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
    graph_hash: str = ""
    cache_hit: bool = False  # reused from a schedule file or the cache: nothing was profiled or solved


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
        profile: ``"measure"`` times every distinct op on the real sample,
            plus a per-op overhead calibrated on full runs of the graph
            (both cached on disk per op signature, graph and device); ``"analytic"``
            estimates times from FLOPs and bytes (deterministic). Both measure
            op workspace. Default: ``"measure"`` on CUDA, ``"analytic"`` on CPU
            (CPU timings of small ops are noisy and the tests need determinism).
        cache: look for the plan in the schedule cache first and store new
            plans there (keyed by graph hash, budget, device kind, method and
            profiler mode). A hit skips profiling and solving; a bad entry
            warns (``RematcWarning``) and rematc plans again.
        cache_dir: the cache root (schedules go under ``schedules/``, measured
            profiles in ``profiles.json``); default ``$REMATC_CACHE_DIR`` or
            ``~/.cache/rematc``.
        schedule: a schedule file (from ``save_schedule`` or ``rematc plan``)
            to use instead of planning; ``budget`` may then be None (the
            file's budget).
        differentiable_outputs: with no ``loss_fn``, which outputs get
            gradients. ``"auto"``: when the model returns a mapping with a
            ``loss`` tensor (a Hugging Face ``ModelOutput``), the loss alone,
            so the ordinary ``rm(**batch).loss.backward()`` costs what
            ``loss_fn=lambda o: o.loss`` costs; the other outputs come back
            requiring grad, and a backward through one of them raises
            ``RematcError``. Otherwise (and with ``"all"``) every output.
        hold_outputs: whether the caller keeps the outputs that get no
            gradient (the logits beside a loss) until the backward ends.
            False (default): the plan frees them when the backward starts, as
            ``rm(**batch).loss.backward()`` does; if one is still alive then,
            a ``RematcWarning`` says so once. True: the plan counts them to
            the end of the step.
        verify: after planning, run the planned step once on ``sample``
            under the memory meter (one extra forward+backward; gradients,
            buffers and RNG are restored), expose the result as
            ``measured_peak_bytes``, warn (``RematcWarning``) when it differs
            from the prediction, and plan again below the budget while it
            exceeds the budget (see NOTE: [Verified plans]).

    Attributes:
        measured_peak_bytes: the peak measured when the plan was verified on
            ``sample`` (None with ``verify=False``); at most the budget.
        plan_seconds: construction time: capture, profiling, solving, verification.

    Raises:
        BudgetTooSmall: the budget is below the smallest feasible peak, given
            as ``err.min_budget_bytes`` (with ``verify``: also when the plan
            still measures above the budget after planning again; the
            smallest measured peak is then given).
        ScheduleFileError: ``schedule`` is corrupt, of an unknown format
            version, for another graph, or does not fit the budget.
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
        budget: int | float | str | None,
        *,
        loss_fn: Callable[..., Any] | None = None,
        loss_args: tuple = (),
        method: str = "auto",
        profile: str | None = None,
        cache: bool = True,
        cache_dir: str | os.PathLike[str] | None = None,
        schedule: str | os.PathLike[str] | None = None,
        differentiable_outputs: str = "auto",
        hold_outputs: bool = False,
        verify: bool = True,
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
        if not isinstance(cache, bool):
            raise TypeError(f"cache must be a bool, got {type(cache).__name__}")
        if differentiable_outputs not in ("auto", "all"):
            raise ValueError(f"differentiable_outputs must be 'auto' or 'all', got {differentiable_outputs!r}")
        if not isinstance(hold_outputs, bool):
            raise TypeError(f"hold_outputs must be a bool, got {type(hold_outputs).__name__}")
        self.hold_outputs = hold_outputs
        # With a schedule file and no budget, the file's own budget applies.
        self._budget = None if budget is None and schedule is not None else parse_budget(budget)
        self._cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._schedules = ScheduleSource(self._cache_root if cache else None, schedule)
        if not isinstance(verify, bool):
            raise TypeError(f"verify must be a bool, got {type(verify).__name__}")
        self._only_loss_differentiable = differentiable_outputs == "auto" and loss_fn is None
        self._plan: Plan | None = None
        self._margin_bytes = 0  # how far below the budget to solve; see NOTE: [Verified plans]
        self.measured_peak_bytes: int | None = None
        self._cuda_watch: CudaStepWatch | None = None  # set once planned; see forward
        self._step = self._compiled_step()
        args, kwargs = split_sample(sample)
        self._device_type = _device_type(model, args, kwargs)
        self.profile = profile or ("measure" if self._device_type == "cuda" else "analytic")
        self._distributed_warned = False
        started = time.perf_counter()
        self._capture(args, kwargs, loss_args)
        if verify and self._device_type == "cpu" and torch.autograd._profiler_enabled():
            # The CPU meter is built on the profiler, which does not nest.
            warnings.warn("rematc: a torch profiler is running, so the plan is not verified "
                          "(measured_peak_bytes stays None)", RematcWarning, stacklevel=2)
        elif verify:
            self._verify(args, kwargs, loss_args)
        self._store_plan()
        self.plan_seconds = time.perf_counter() - started
        device = _device(model, args, kwargs)
        self._cuda_watch = CudaStepWatch(self.budget_bytes, device) if device.type == "cuda" else None

    def _compiled_step(self) -> CompiledStep:
        return CompiledStep(
            self.model, self.loss_fn, self._plan_joint,
            only_loss_differentiable=self._only_loss_differentiable, hold_outputs=self.hold_outputs,
            on_backward_end=self._backward_ended,
        )

    def _backward_ended(self) -> None:
        if self._cuda_watch is not None:
            self._cuda_watch.finish()

    # -- verification -------------------------------------------------------------
    def _verify(self, args: tuple, kwargs: dict, loss_args: tuple) -> None:
        """Measure the planned step on the sample; plan again below the budget while it measures above.

        See NOTE: [Verified plans] in verify.py.
        """
        lowest_over: int | None = None
        for attempt in range(_MAX_REPLANS + 1):
            measured = self._run_step(args, kwargs, loss_args, measure=True)
            assert measured is not None
            plan = self.plan
            gap = measured - plan.predicted.peak_bytes
            tolerance = CUDA_GAP_TOLERANCE * plan.predicted.peak_bytes if self._device_type == "cuda" else 0
            if abs(gap) > tolerance:
                warnings.warn(
                    f"rematc: the plan measured {solvers.format_bytes(measured)} ({measured} bytes) on the sample, "
                    f"{gap:+d} bytes from its prediction of {plan.predicted.peak_bytes} bytes: a gap in rematc's "
                    "memory model (please report it with the model)"
                    + (f"; the budget holds with a margin of {self._margin_bytes} bytes" if self._margin_bytes else ""),
                    RematcWarning, stacklevel=3,
                )
            if measured <= plan.budget_bytes:
                self.measured_peak_bytes = measured
                return
            lowest_over = measured if lowest_over is None else min(lowest_over, measured)
            if attempt == _MAX_REPLANS:
                break
            # Solve again that much further below the budget (at least the gap just seen).
            self._margin_bytes = max(self._margin_bytes + measured - plan.budget_bytes, gap)
            _log.info("verify: measured %d > budget %d; planning again with a margin of %d bytes",
                      measured, plan.budget_bytes, self._margin_bytes)
            self._plan, self._step = None, self._compiled_step()
            self._capture(args, kwargs, loss_args)
        assert lowest_over is not None
        raise BudgetTooSmall(self.plan.budget_bytes, lowest_over, f"{self.method} (measured)")

    def _run_step(self, args: tuple, kwargs: dict, loss_args: tuple, *, measure: bool) -> int | None:
        return run_planned_step(
            self.model, lambda: self._step(args, kwargs, loss_args), self._device_type,
            loss_given=self.loss_fn is not None, hold_outputs=self.hold_outputs,
            only_loss_differentiable=self._only_loss_differentiable, sample=(args, kwargs, loss_args),
            measure=measure,
        )

    def _store_plan(self) -> None:
        if self.plan.cache_hit and self._margin_bytes == 0:
            return
        stored = self._schedules.store(self._schedule_file(self.plan))
        if stored is not None:
            _log.info("cache: stored %s", stored)

    # -- planning -----------------------------------------------------------------
    def _capture(self, args: tuple, kwargs: dict, loss_args: tuple) -> None:
        """Run the compiled step once on the sample (this plans), backward included, and undo its effects.

        The backward runs too: AOTAutograd compiles it lazily at the first
        backward, and that must not be the training step (or the verified one).
        """
        self._run_step(args, kwargs, loss_args, measure=False)
        if self._plan is None:
            raise RematcError(
                "the sample did not produce a backward graph: no output requires grad "
                "(check that the model has trainable parameters and returns tensors)"
            )

    def _plan_joint(
        self, joint: fx.GraphModule, num_fwd_outputs: int, primals: list[Any]
    ) -> tuple[fx.GraphModule, fx.GraphModule]:
        started = time.perf_counter()
        make_layouts_faithful(joint)  # before the dropout rewrite: it copies dropout_backward's layout
        make_dropout_outputs_recomputable(joint)
        make_dropout_replayable(joint)
        key = self._plan_key(graph_hash(joint, num_fwd_outputs, hold_outputs=self.hold_outputs))
        reused = None
        if self._margin_bytes == 0:  # a plan planned again after verification is never the cached one
            reused = self._schedules.find(
                joint, num_fwd_outputs, key, self._budget, hold_outputs=self.hold_outputs
            )
        if reused is not None:  # a schedule file or cache hit: no profiling, no solving
            _log.info("cache: hit %s", reused.source)
            lowered, schedule, budget_bytes = reused.lowered, reused.schedule, reused.budget_bytes
            baseline, predicted = reused.baseline, reused.predicted  # checked and simulated on this graph
            profiled = solved = time.perf_counter()
        else:
            if self.profile == "measure":
                cache = ProfileCache(self._cache_root / "profiles.json")
                costs = measure_costs(joint, primals, self._device_type, cache=cache)
            else:
                costs = profile_costs(joint, self._device_type)
            lowered = lower_joint_graph(joint, num_fwd_outputs, costs, hold_outputs=self.hold_outputs)
            profiled = time.perf_counter()
            _log.info("profile: %d ops (%s) in %.2f s", lowered.graph.num_ops, self.profile, profiled - started)
            assert self._budget is not None, "a budget is required unless a schedule file is given"
            baseline = solvers.simulate(lowered.graph, solvers.no_remat_schedule(lowered.graph))
            budget_bytes = self._budget.resolve(baseline.peak_bytes)
            try:
                schedule = solvers.solve(lowered.graph, budget_bytes - self._margin_bytes, method=self.method)
            except BudgetInfeasible as error:
                # With a margin, the smallest peak the plan would measure.
                raise BudgetTooSmall(
                    budget_bytes, error.min_feasible_bytes + self._margin_bytes, error.method
                ) from None
            predicted = solvers.simulate(lowered.graph, schedule)
            solved = time.perf_counter()
            _log.info("solve: method %s, predicted peak %s within %s, in %.2f s", self.method,
                      solvers.format_bytes(predicted.peak_bytes), solvers.format_bytes(budget_bytes), solved - profiled)
        modules = generate_modules(joint, lowered, schedule)
        self._plan = Plan(
            lowered, schedule, predicted, baseline, budget_bytes, modules,
            solve_seconds=solved - profiled, profile_seconds=profiled - started,
            graph_hash=key.graph_hash, cache_hit=reused is not None,
        )
        return modules.forward, modules.backward

    # -- schedule files -------------------------------------------------------------
    def _plan_key(self, hash_: str) -> PlanKey:
        budget = budget_key(self._budget) if self._budget is not None else "file"
        return PlanKey(hash_, budget, self._device_type, self.method, self.profile)

    def _schedule_file(self, plan: Plan) -> ScheduleFile:
        key = self._plan_key(plan.graph_hash)
        if self._budget is None:  # planned from a file with its own budget: key by those bytes
            key = PlanKey(key.graph_hash, f"bytes-{plan.budget_bytes}", key.device, key.method, key.profile)
        device = device_name(torch.device(self._device_type))
        sf = make_schedule_file(
            key, self._budget, plan.budget_bytes, plan.lowered.graph, plan.schedule, plan.predicted, plan.baseline,
            device,
        )
        return dataclasses.replace(sf, measured_peak_bytes=self.measured_peak_bytes, margin_bytes=self._margin_bytes)

    def save_schedule(self, path: str | os.PathLike[str]) -> Path:
        """Write the plan to ``path`` as a schedule file (atomically); return the path.

        Reuse it with ``Rockmate(model, sample, budget, schedule=path)``, or
        inspect it with ``rematc show path``.

        Example:
            >>> rm.save_schedule("gpt.schedule.json")                # doctest: +SKIP
            PosixPath('gpt.schedule.json')
        """
        return write_schedule_file(path, self._schedule_file(self.plan))

    # -- running ------------------------------------------------------------------
    def forward(self, *args: Any, loss_args: tuple = (), **kwargs: Any) -> Any:
        if not self.training or not torch.is_grad_enabled():
            output = self.model(*args, **kwargs)
            return output if self.loss_fn is None else self.loss_fn(output, *loss_args)
        self._warn_if_distributed()
        if self._cuda_watch is not None:
            self._cuda_watch.start()
        calls = self._step.forward_calls
        output = self._step(args, kwargs, loss_args)
        if self._step.forward_calls == calls:
            raise RematcError(
                "the training step ran without rematc's plan (TorchDynamo fell back to eager, "
                "for example after too many recompilations); the memory budget is not enforced"
            )
        return output

    def _warn_if_distributed(self) -> None:
        """Warn once when the step runs under data parallelism, whose memory the plan does not count.

        NOTE: [Distributed wrappers] ``DDP(Rockmate(...))`` trains with equal
        gradients, but DDP's gradient buckets and communication (and FSDP's
        unsharded parameters) allocate during the backward, outside the
        planned graph: measured 1.26x the budget on both ranks of a 6-layer
        MLP stack at 0.6 of eager's peak. Until rematc plans them, say so.
        """
        if self._distributed_warned:
            return
        inside_ddp = torch.nn.parallel.DistributedDataParallel._get_active_ddp_module() is not None
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if not inside_ddp and not (distributed and torch.distributed.get_world_size() > 1):
            return
        self._distributed_warned = True
        warnings.warn(
            "rematc: this step runs " + ("inside DistributedDataParallel" if inside_ddp else "in a process group")
            + ". rematc plans one process' forward+backward: DDP's gradient buckets and communication "
            "buffers (FSDP's unsharded parameters) are allocated outside the plan and are not counted, "
            "so the measured peak can exceed the budget. Leave headroom for them (see the README's "
            "'Distributed training')",
            RematcWarning, stacklevel=3,
        )

    # -- figures ------------------------------------------------------------------
    @property
    def plan(self) -> Plan:
        assert self._plan is not None
        return self._plan

    @property
    def cache_hit(self) -> bool:
        """Whether the plan came from a schedule file or the cache (nothing was profiled or solved)."""
        return self.plan.cache_hit

    @property
    def graph_hash(self) -> str:
        """The canonical hash of the captured joint graph (``rematc.graph_hash``): what schedule files key on."""
        return self.plan.graph_hash

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

    def explain(self) -> Explanation:
        """What the plan keeps for the backward, what it recomputes, and where it peaks.

        Returns an :class:`~rematc.explain.Explanation`; ``print(rm.explain())``
        shows each kept or recomputed value with its bytes, the op that makes
        it and the user's source line, grouped by block, and the predicted
        peak with the op and phase where it occurs.

        Example:
            >>> print(rm.explain())                                   # doctest: +SKIP
            rematc plan: budget 1.70 MiB, predicted peak 1.67 MiB (no remat: 2.42 MiB)
            peak: in the backward (step 9 of 642), computing _log_softmax_backward_data (...)
            ...
            block 4 of 12
              recomputed   32.00 KiB  getitem_2  aten.native_layer_norm.default  models.py:62 in forward: ...
        """
        return explain_plan(self.plan)

    def extra_repr(self) -> str:
        if self._plan is None:
            return "unplanned"
        return (
            f"budget={solvers.format_bytes(self.budget_bytes)}, "
            f"predicted_peak={solvers.format_bytes(self.predicted_peak_bytes)}, "
            f"baseline_peak={solvers.format_bytes(self.baseline_peak_bytes)}"
        )


def profile_costs(joint: fx.GraphModule, device_type: str) -> dict[str, NodeCost]:
    """Per-node costs: analytic time, measured workspace and output storages (no formula predicts them)."""
    times = analytic_costs(joint, device_type)
    memory = measure_op_memory(joint, device_type)
    return {
        name: NodeCost(cost.time_ms, memory[name].workspace_bytes, memory[name].output_bytes)
        if name in memory else cost
        for name, cost in times.items()
    }


def split_sample(sample: Any) -> tuple[tuple, dict]:
    """A sample as (args, kwargs): a tensor, a tuple/list of arguments, or a dict of keyword arguments."""
    if isinstance(sample, dict):
        return (), dict(sample)
    if isinstance(sample, (tuple, list)):
        return tuple(sample), {}
    return (sample,), {}


def _device(model: torch.nn.Module, args: tuple, kwargs: dict) -> torch.device:
    for tensor in [*model.parameters(), *args, *kwargs.values()]:
        if isinstance(tensor, torch.Tensor):
            return tensor.device
    return torch.device("cpu")


def _device_type(model: torch.nn.Module, args: tuple, kwargs: dict) -> str:
    return _device(model, args, kwargs).type
