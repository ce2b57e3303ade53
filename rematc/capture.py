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

import types
from typing import Any, Callable

import torch
import torch.fx as fx
from torch._functorch.aot_autograd import aot_module_simplified

from .errors import CaptureError, GraphBreakError

PlanJoint = Callable[[fx.GraphModule, int, list[Any]], tuple[fx.GraphModule, fx.GraphModule]]


def _make_step_function(model: torch.nn.Module, loss_fn: Callable[..., Any] | None) -> Callable[..., Any]:
    def rematc_step(args, kwargs, loss_args):
        output = model(*args, **kwargs)
        if loss_fn is None:
            return output
        return loss_fn(output, *loss_args)

    # A private code object so Dynamo's per-code cache belongs to this step alone.
    code = rematc_step.__code__.replace()
    return types.FunctionType(code, rematc_step.__globals__, "rematc_step", None, rematc_step.__closure__)


class CompiledStep:
    """``model`` (plus ``loss_fn``) compiled so that ``plan_joint`` partitions its joint graph.

    Attributes:
        forward_calls: how many times a generated forward graph ran (a call
            that leaves it unchanged did not run the plan).
        compilations: how many joint graphs were partitioned.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[..., Any] | None, plan_joint: PlanJoint):
        self.forward_calls = 0
        self.compilations = 0
        self._plan_joint = plan_joint
        self._compiled = torch.compile(
            _make_step_function(model, loss_fn), backend=self._backend, dynamic=False, fullgraph=True
        )

    def __call__(self, args: tuple, kwargs: dict, loss_args: tuple) -> Any:
        try:
            return self._compiled(args, kwargs, loss_args)
        except torch._dynamo.exc.BackendCompilerFailed as error:
            raise error.inner_exception from None
        except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError) as error:
            raise GraphBreakError(
                "TorchDynamo cannot capture the training step as one graph; rematc needs the "
                f"whole forward in one graph. Dynamo says:\n{error}"
            ) from error

    def _backend(self, gm: fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        def partition(joint: fx.GraphModule, _joint_inputs: Any, *, num_fwd_outputs: int, **_: Any):
            self.compilations += 1
            # Dynamo's example inputs are the real tensors; they are the joint
            # graph's primals, in order (the measured profiler runs on them).
            return self._plan_joint(joint, num_fwd_outputs, example_inputs)

        try:
            return aot_module_simplified(
                gm,
                example_inputs,
                fw_compiler=self._boxed_forward,
                bw_compiler=_boxed,
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


def _boxed(gm: fx.GraphModule, _example_inputs: Any) -> Callable[..., Any]:
    """Run ``gm`` with the boxed convention: its code clears the argument list it receives."""
    gm.graph.set_codegen(torch.fx.graph._BoxedCodeGen())
    gm.recompile()

    def run(args: list[Any]) -> Any:
        return gm(args)

    run._boxed_call = True  # type: ignore[attr-defined]
    return run
