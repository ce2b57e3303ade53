"""Verified plans: run the planned step once on the sample and measure its peak.

NOTE: [Verified plans] The simulator is the planner's model; the guarantee is
on the measurement. After planning, ``Rockmate`` runs one forward+backward of
the plan on its sample under the project's meter (``profiler.meter``: the CPU
allocator's events, or ``max_memory_allocated`` on CUDA) and compares with the
prediction. A gap is a modelling bug, reported as a ``RematcWarning``; a peak
above the budget makes ``Rockmate`` plan again with the gap as a margin. The
step is run the way the caller is assumed to run it (see NOTE: [Outputs the
caller drops]): a loss is backpropagated from the loss; a model output holding
a ``loss`` is dropped but for the loss (unless the plan holds outputs); other
outputs are held through the backward and backpropagated as ``sum()``.

Everything the step changes is put back: parameters' and inputs' ``.grad``,
buffers (BatchNorm statistics), the RNG states.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Iterator

import torch
from torch.utils._pytree import tree_flatten

from profiler.meter import MemoryMeter

from .errors import RematcWarning
from .outputs import has_loss

__all__ = ["CUDA_GAP_TOLERANCE", "CudaStepWatch", "run_planned_step"]

# On CUDA the caching allocator rounds each block up (512 bytes, or 2 MiB
# segments for large blocks), which the simulator does not model yet: a gap
# up to this fraction of the prediction is not reported there. CPU: exact.
CUDA_GAP_TOLERANCE = 0.01


def run_planned_step(
    module: torch.nn.Module,
    step: Callable[[], Any],
    device: str,
    *,
    loss_given: bool,
    hold_outputs: bool,
    only_loss_differentiable: bool,
    sample: Any,
    measure: bool = True,
) -> int | None:
    """One forward (``step()``) + backward as the caller runs it; the module's state is restored.

    Returns the measured peak bytes, or None with ``measure=False`` (the run
    that compiles the backward: AOTAutograd compiles it lazily at the first
    backward, which allocates, so the measured run must not be the first).

    Args:
        module: the model whose parameters and buffers the step touches.
        step: runs the planned forward and returns its output.
        device: ``"cpu"`` or ``"cuda"``: which meter.
        loss_given: the output is the loss (``Rockmate(loss_fn=...)``).
        hold_outputs: keep every output through the backward.
        only_loss_differentiable: a ``loss`` in a mapping output is the only
            differentiable output (``differentiable_outputs="auto"``).
        sample: the inputs (their ``.grad`` is restored too).
        measure: run under the meter.
    """
    # The gradient of a non-scalar output is a broadcast one, allocated before the
    # meter starts: the harness itself then allocates nothing the plan does not model
    # (a `.sum()` would add its result and its gradient, one element each).
    ones = {dtype: torch.ones((), dtype=dtype, device=device) for dtype in _FLOATING}
    meter = MemoryMeter(device) if measure else contextlib.nullcontext()
    with _restored(module, sample):
        with meter:
            output = step()
            if loss_given:
                roots = [output]
            elif only_loss_differentiable and has_loss(output):
                roots = [output["loss"]]
                if not hold_outputs:
                    output = None  # the ordinary call: `rm(**batch).loss.backward()`
            else:
                roots = [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor)]
            roots = [r for r in roots if isinstance(r, torch.Tensor) and r.requires_grad]
            # A scalar's gradient is made by the engine and held to the end, as the plan pins it.
            grads = [None if r.numel() == 1 else ones[r.dtype].expand_as(r) for r in roots]
            if roots:
                torch.autograd.backward(roots, grads)
            del roots, grads, output
    return meter.peak_bytes if isinstance(meter, MemoryMeter) else None


_FLOATING = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@contextlib.contextmanager
def _restored(module: torch.nn.Module, sample: Any) -> Iterator[None]:
    leaves = [*module.parameters(), *(t for t in tree_flatten(sample)[0] if isinstance(t, torch.Tensor))]
    grads = [t.grad for t in leaves]
    buffers = [b.detach().clone() for b in module.buffers()]
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    was_training = module.training
    try:
        for t in leaves:
            t.grad = None  # the step's gradients are fresh allocations, as in a first micro-batch
        module.train()
        with torch.enable_grad():
            yield
    finally:
        module.train(was_training)
        for t, g in zip(leaves, grads):
            t.grad = g
        with torch.no_grad():
            for saved, buffer in zip(buffers, module.buffers()):
                buffer.copy_(saved)
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


class CudaStepWatch:
    """On CUDA, every training step's measured peak against the budget; a step above it warns once.

    ``max_memory_allocated`` is free to read, so each step is checked, not
    only the verified one: from the forward's start (``start``: the peak
    statistics are reset there, as ``MemoryMeter`` does) to the backward's end
    (``finish``). On CPU no meter is cheap enough to run every step.
    """

    def __init__(self, budget_bytes: int, device: torch.device) -> None:
        self.budget_bytes = budget_bytes
        self.device = device
        self._start: int | None = None
        self._warned = False

    def start(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)
        self._start = torch.cuda.memory_allocated(self.device)

    def finish(self) -> None:
        if self._start is None or self._warned:
            return
        peak = torch.cuda.max_memory_allocated(self.device) - self._start
        self._start = None
        if peak > self.budget_bytes:
            self._warned = True
            warnings.warn(
                f"rematc: a training step measured {peak} bytes on {self.device}, above the budget of "
                f"{self.budget_bytes} bytes (other shapes than the sample's, memory allocated by code "
                "between the forward and the backward, or a gap in rematc's model)",
                RematcWarning, stacklevel=2,
            )
