"""One training step (forward + backward of the loss) per method the benchmark compares.

Every builder takes its own copy of the model (or, for rematc, one copy shared
by all budgets) and returns a :class:`Method`: a ``step()`` that runs forward
and backward, the model whose ``.grad`` it fills, and the seconds spent before
the first step (rematc's planning, ``torch.compile``'s compilation).

- ``plain``: eager autograd, the reference.
- ``checkpoint``: ``torch.utils.checkpoint(use_reentrant=False)`` around every block.
- ``sac``: the same with selective activation checkpointing; the policy saves
  matmul, attention and convolution outputs and recomputes the rest.
- ``compile``: ``torch.compile`` with ``torch._functorch.config.activation_memory_budget``.
- ``rematc``: :class:`rematc.Rockmate` at a budget in bytes.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import time
import types
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from rematc import BudgetTooSmall, Rockmate

from .workloads import Workload


@dataclass
class Method:
    """A ready-to-run training step.

    Attributes:
        family: ``plain``, ``checkpoint``, ``sac``, ``compile`` or ``rematc``.
        label: the row's name in the table (``torch.compile aot_eager``).
        setting: its parameter in words (``budget 0.5``), or ``""``.
        model: the module whose parameters receive the gradients.
        step: runs one forward and backward on the benchmark batch.
        setup_seconds: planning (rematc) or compilation (torch.compile: the
            first call, which compiles and runs one step), else None.
        budget_bytes: rematc's budget; None for baselines.
        predicted_peak_bytes: rematc's predicted peak; None for baselines.
        predicted_time_ratio: rematc's predicted step time over its predicted
            no-remat step time (``solvers.simulate``); None for baselines.
    """

    family: str
    label: str
    setting: str
    model: nn.Module
    step: Callable[[], None]
    setup_seconds: float | None = None
    budget_bytes: int | None = None
    predicted_peak_bytes: int | None = None
    predicted_time_ratio: float | None = None


def eager_step(model: nn.Module, workload: Workload, args: tuple, targets: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        workload.loss_fn(model(*args), targets).backward()

    return step


def plain(model: nn.Module, workload: Workload, args: tuple, targets: torch.Tensor) -> Method:
    return Method("plain", "plain autograd", "", model, eager_step(model, workload, args, targets))


# -- activation checkpointing ---------------------------------------------------------------

aten = torch.ops.aten

# Selective activation checkpointing keeps the outputs of the expensive ops and
# recomputes the cheap ones (norms, activations, adds, views). Convolution is
# the CNN's matmul, so it is kept too (without it the policy would save nothing
# in a ResNet and be plain checkpointing).
SAVED_BY_SAC_POLICY: frozenset[Any] = frozenset(
    getattr(aten, name).default
    for name in (
        "mm", "addmm", "bmm", "convolution",
        "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    )
    if hasattr(aten, name)
)


def save_matmul_attention_and_convolution(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """SAC policy: save matmul / attention / convolution outputs, recompute everything else."""
    return CheckpointPolicy.MUST_SAVE if op in SAVED_BY_SAC_POLICY else CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_blocks_in_place(model: nn.Module, workload: Workload, selective: bool) -> None:
    """Wrap every block's forward in ``torch.utils.checkpoint`` (non-reentrant), as users do by hand.

    The block's ``forward`` is replaced on the instance, so parameter names
    and order stay those of the original model.
    """
    context_fn = None
    if selective:
        context_fn = functools.partial(create_selective_checkpoint_contexts, save_matmul_attention_and_convolution)
    for block in workload.blocks(model):
        original = block.forward

        def checkpointed(*args: Any, _forward: Callable[..., Any] = original, **kwargs: Any) -> Any:
            if context_fn is None:
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, context_fn=context_fn, **kwargs)

        block.forward = checkpointed  # type: ignore[method-assign]


def checkpointed(model: nn.Module, workload: Workload, args: tuple, targets: torch.Tensor) -> Method:
    checkpoint_blocks_in_place(model, workload, selective=False)
    step = eager_step(model, workload, args, targets)
    return Method("checkpoint", "checkpoint every block", "use_reentrant=False", model, step)


def selective(model: nn.Module, workload: Workload, args: tuple, targets: torch.Tensor) -> Method:
    checkpoint_blocks_in_place(model, workload, selective=True)
    step = eager_step(model, workload, args, targets)
    return Method("sac", "selective checkpoint (SAC)", "save mm/attention/conv", model, step)


# -- torch.compile --------------------------------------------------------------------------


def _private_step_function(model: nn.Module, workload: Workload) -> Callable[..., torch.Tensor]:
    """``loss_fn(model(*args), targets)`` with a code object of its own.

    Dynamo caches compiled frames per code object; one per compiled method keeps
    each setting's graphs apart (no recompile limit, no cache entry reused
    across memory budgets).
    """
    loss_fn = workload.loss_fn

    def compiled_step(args: tuple, targets: torch.Tensor) -> torch.Tensor:
        return loss_fn(model(*args), targets)

    code = compiled_step.__code__.replace()
    return types.FunctionType(code, compiled_step.__globals__, "compiled_step", None, compiled_step.__closure__)


def compiled(
    model: nn.Module, workload: Workload, args: tuple, targets: torch.Tensor, *,
    backend: str, memory_budget: float, use_caches: bool = False,
) -> Method:
    """``torch.compile`` with ``activation_memory_budget``; compiles now (first step) and times it.

    The budget is read by AOTAutograd's partitioner when the graph is compiled,
    so the config is patched around the first call only. With ``use_caches``
    False, Inductor's on-disk caches are bypassed so the compile time is a
    cold compile.
    """
    function = torch.compile(_private_step_function(model, workload), backend=backend)

    def step() -> None:
        function(args, targets).backward()

    patches = [torch._functorch.config.patch(activation_memory_budget=memory_budget)]
    if backend == "inductor" and not use_caches:
        patches.append(torch._inductor.config.patch(force_disable_caches=True))
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        step()
    _synchronize(args)
    seconds = time.perf_counter() - started
    return Method(
        "compile", f"torch.compile {backend}", f"activation_memory_budget={memory_budget}", model, step,
        setup_seconds=seconds,
    )


# -- rematc ---------------------------------------------------------------------------------


# Planning time is measured cold: a schedule-cache hit would skip profiling and solving.
_NO_CACHE: dict[str, Any] = {"cache": False} if "cache" in inspect.signature(Rockmate.__init__).parameters else {}


def rematc(
    model: nn.Module, workload: Workload, args: tuple, targets: torch.Tensor, *,
    budget_bytes: int, label: str, method: str = "auto",
) -> Method:
    """``Rockmate(model, args, budget_bytes)`` with the loss inside the planned region.

    Raises:
        rematc.BudgetTooSmall: the budget is below rematc's minimum feasible peak.
    """
    rm = Rockmate(
        model, args, budget_bytes, loss_fn=workload.loss_fn, loss_args=(targets,), method=method, **_NO_CACHE
    )

    def step() -> None:
        rm(*args, loss_args=(targets,)).backward()

    return Method(
        "rematc", "rematc", label, model, step, setup_seconds=rm.plan_seconds,
        budget_bytes=rm.budget_bytes, predicted_peak_bytes=rm.predicted_peak_bytes,
        predicted_time_ratio=rm.predicted_step_seconds / rm.baseline_step_seconds,
    )


def min_feasible_budget(model: nn.Module, workload: Workload, args: tuple, targets: torch.Tensor, method: str) -> int:
    """rematc's smallest feasible peak for this model, from the error a 1-byte budget raises."""
    try:
        Rockmate(model, args, 1, loss_fn=workload.loss_fn, loss_args=(targets,), method=method, **_NO_CACHE)
    except BudgetTooSmall as error:
        return error.min_budget_bytes
    return 1


def _synchronize(args: tuple) -> None:
    if any(isinstance(a, torch.Tensor) and a.is_cuda for a in args):
        torch.cuda.synchronize()
