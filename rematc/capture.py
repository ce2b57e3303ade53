"""Capture a training step with TorchDynamo + AOTAutograd and plug in our partitioner.

:class:`CompiledStep` wraps ``model(*args, **kwargs)`` (and optionally a loss)
in ``torch.compile`` with a backend that hands AOTAutograd our ``partition_fn``.
AOTAutograd calls it with the joint forward+backward graph; the callback the
API gives (``plan_joint``) returns the forward and backward GraphModules. Both
are run with fx's boxed calling convention (see NOTE: [Boxed calling
convention] in codegen.py).

NOTE: [One code object per step] Dynamo caches compiled frames on the code
object and stops compiling a code object after ``recompile_limit`` entries,
silently running it eagerly afterwards. Every :class:`CompiledStep` therefore
gets its own copy of the step's code object, and counts forward calls so the
API can prove the plan ran.
"""

from __future__ import annotations

import logging
import re
import types
from typing import Any, Callable

import torch
import torch.fx as fx
from torch._functorch.aot_autograd import aot_module_simplified

from .eager_kernels import eager_kernels
from .errors import CaptureError, GraphBreakError
from .outputs import DroppedOutputs, detach_all_but_loss, has_loss, mark_no_gradient_planned

PlanJoint = Callable[[fx.GraphModule, int, list[Any]], tuple[fx.GraphModule, fx.GraphModule]]


def _make_step_function(
    model: torch.nn.Module, loss_fn: Callable[..., Any] | None, only_loss_differentiable: bool
) -> Callable[..., Any]:
    def rematc_step(args, kwargs, loss_args):
        output = model(*args, **kwargs)
        if loss_fn is not None:
            return loss_fn(output, *loss_args)
        if only_loss_differentiable and has_loss(output):  # NOTE: [Outputs the caller drops]
            return detach_all_but_loss(output)
        return output

    # A private code object so Dynamo's per-code cache belongs to this step alone.
    code = rematc_step.__code__.replace()
    return types.FunctionType(code, rematc_step.__globals__, "rematc_step", None, rematc_step.__closure__)


class CompiledStep:
    """``model`` (plus ``loss_fn``) compiled so that ``plan_joint`` partitions its joint graph.

    With ``only_loss_differentiable`` (and no ``loss_fn``), a model output
    holding a ``loss`` gives gradients through the loss alone, and its other
    outputs are assumed dropped by the caller before the backward, unless
    ``hold_outputs``; see NOTE: [Outputs the caller drops] in outputs.py.

    Attributes:
        forward_calls: how many times a generated forward graph ran (a call
            that leaves it unchanged did not run the plan).
        compilations: how many joint graphs were partitioned.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: Callable[..., Any] | None,
        plan_joint: PlanJoint,
        *,
        only_loss_differentiable: bool = True,
        hold_outputs: bool = False,
        on_backward_end: Callable[[], None] | None = None,
    ):
        self.forward_calls = 0
        self._on_backward_end = on_backward_end
        self.compilations = 0
        self._plan_joint = plan_joint
        self._only_loss_differentiable = only_loss_differentiable and loss_fn is None
        self._dropped = None if hold_outputs else DroppedOutputs()
        self._compiled = torch.compile(
            _make_step_function(model, loss_fn, self._only_loss_differentiable),
            backend=self._backend, dynamic=False, fullgraph=True,
        )

    def __call__(self, args: tuple, kwargs: dict, loss_args: tuple) -> Any:
        compilations = self.compilations
        output = self._run(args, kwargs, loss_args)
        if self._only_loss_differentiable and has_loss(output):
            output = mark_no_gradient_planned(output)
            if self._dropped is not None:
                # The compiling call's outputs are referenced by the compiler for a while.
                self._dropped.watch(output if self.compilations == compilations else {})
        return output

    def _run(self, args: tuple, kwargs: dict, loss_args: tuple) -> Any:
        try:
            with torch._dynamo.config.patch(ignore_logging_functions=_logging_functions()):
                return self._compiled(args, kwargs, loss_args)
        except torch._dynamo.exc.BackendCompilerFailed as error:
            raise error.inner_exception from None
        except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError) as error:
            raise graph_break_error(error) from error

    def _backend(self, gm: fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        def partition(joint: fx.GraphModule, _joint_inputs: Any, *, num_fwd_outputs: int, **_: Any):
            self.compilations += 1
            # Dynamo's example inputs are the real tensors; they are the joint
            # graph's primals, in order (the measured profiler runs on them).
            return self._plan_joint(joint, num_fwd_outputs, example_inputs)

        try:
            with eager_kernels():  # NOTE: [Eager kernels while tracing]
                return aot_module_simplified(
                    gm,
                    example_inputs,
                    fw_compiler=self._boxed_forward,
                    bw_compiler=self._boxed_backward,
                    partition_fn=partition,
                )
        except Exception as error:
            if isinstance(error, (CaptureError, ValueError)):
                raise
            raise CaptureError(f"AOTAutograd failed on the captured step: {error}") from error

    def _boxed_forward(self, gm: fx.GraphModule, _example_inputs: Any) -> Callable[..., Any]:
        run = _boxed(gm, _example_inputs)

        def counted(args: list[Any]) -> Any:
            self.forward_calls += 1
            return run(args)

        counted._boxed_call = True  # type: ignore[attr-defined]
        return counted

    def _boxed_backward(self, gm: fx.GraphModule, _example_inputs: Any) -> Callable[..., Any]:
        run = _boxed(gm, _example_inputs)

        def checked(args: list[Any]) -> Any:
            if self._dropped is not None:
                self._dropped.check()
            grads = run(args)
            if self._on_backward_end is not None:
                self._on_backward_end()
            return grads

        checked._boxed_call = True  # type: ignore[attr-defined]
        return checked


def graph_break_error(error: Exception) -> GraphBreakError:
    """A :class:`GraphBreakError` naming what Dynamo could not trace and the user's source line.

    The message leads with the reason and the innermost frame of the user's
    code (Dynamo's ``real_stack``, rematc's own step function left out), then
    gives Dynamo's full report.
    """
    text = str(getattr(error, "msg", "") or error).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = getattr(error, "gb_type", None) or (lines[0] if lines else type(error).__name__)
    explanation = next((line for line in lines if line.startswith("Explanation:")), None)
    if explanation:
        reason = f"{reason}: {explanation.removeprefix('Explanation:').strip()}"
    guard = re.search(r"Could not guard on data-dependent expression [^(]*", text)
    if guard:  # Dynamo's first line here is advice about torch._check, not the cause
        reason = f"Python control flow on a tensor's value (.item(), bool(tensor)): {guard.group(0).strip()}"
    stack = [f for f in getattr(error, "real_stack", None) or () if f.filename != __file__]
    frame = stack[-1] if stack else None
    where = ""
    if frame is not None:
        where = f"\n  at {frame.filename}:{frame.lineno}, in {frame.name}"
        if frame.line:
            where += f"\n      {frame.line.strip()}"
        if len(stack) > 1:
            callers = " <- ".join(f"{f.name} ({f.filename.rsplit('/', 1)[-1]}:{f.lineno})" for f in reversed(stack[:-1]))
            where += f"\n  called from {callers}"
    message = (
        "TorchDynamo cannot capture the training step as one graph, and rematc plans the "
        f"whole forward+backward as one graph.\n  graph break: {reason}{where}\n"
        "Remove or rewrite that construct (data-dependent Python control flow such as "
        "`if t.item() > 0`, printing, calls Dynamo cannot trace), or move it out of the "
        f"module given to Rockmate.\n\nDynamo's report:\n{error}"
    )
    return GraphBreakError(message, reason, frame)


def _logging_functions() -> set[Callable[..., Any]]:
    """``logging.Logger`` methods Dynamo should treat as no-ops inside the step.

    NOTE: [Logging in the forward] Dynamo cannot put a log call in a graph, so
    one in the forward breaks the one-graph capture. Hugging Face models log
    from inside ``forward`` (``GPT2LMHeadModel(labels=...)`` calls
    ``logger.warning_once`` on every step), so the captured step drops log
    calls instead, as ``torch.export`` does; they carry no computation.
    """
    names = ("debug", "info", "warning", "warn", "error", "critical", "exception", "log")
    extra = ("info_once", "warning_once", "warning_advice")  # added by transformers.utils.logging
    functions = {getattr(logging.Logger, n) for n in (*names, *extra) if hasattr(logging.Logger, n)}
    return {*torch._dynamo.config.ignore_logging_functions, *functions}


def _boxed(gm: fx.GraphModule, _example_inputs: Any) -> Callable[..., Any]:
    """Run ``gm`` with the boxed convention: its code clears the argument list it receives."""
    gm.graph.set_codegen(torch.fx.graph._BoxedCodeGen())
    gm.recompile()

    def run(args: list[Any]) -> Any:
        return gm(args)

    run._boxed_call = True  # type: ignore[attr-defined]
    return run
