"""The memory meter against hand-computed peaks, to the byte.

Every expected figure below is derived from which tensors are alive at the
peak, not pasted from a measurement.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func

from profiler.meter import (
    AllocationEvent,
    MemoryMeter,
    live_bytes_from_events,
    measure_peak_bytes,
    order_allocation_events,
)

FLOAT32_BYTES = 4


def f32_bytes(*shape: int) -> int:
    return math.prod(shape) * FLOAT32_BYTES


# ---------------------------------------------------------------- simple cases


def test_two_tensors_free_one() -> None:
    with MemoryMeter() as meter:
        a = torch.empty(1000)
        b = torch.empty(500)
        del a
    assert meter.peak_bytes == f32_bytes(1000) + f32_bytes(500)
    assert meter.end_bytes == f32_bytes(500)
    del b


def test_views_allocate_nothing() -> None:
    x = torch.empty(32, 32)
    with MemoryMeter() as meter:
        views = [x.view(1024), x.t(), x[::2], x[3], x.expand(4, 32, 32), x.unsqueeze(0), x.reshape(16, 64)]
    assert (meter.peak_bytes, meter.end_bytes) == (0, 0)
    del views


def test_storage_counted_once_when_shared_by_views() -> None:
    with MemoryMeter() as meter:
        x = torch.empty(1024)
        first_half, square, transposed = x[:512], x.view(32, 32), x.view(32, 32).t()
        del x  # the views keep the one storage alive
    assert (meter.peak_bytes, meter.end_bytes) == (f32_bytes(1024), f32_bytes(1024))

    with MemoryMeter() as meter:
        del first_half, square
        y = transposed.clone()  # contiguous copy: a second storage
        del transposed  # last alias of the first storage: it dies now
    # Nothing allocated before the region counts (it never did), so the
    # region holds only the clone.
    assert (meter.peak_bytes, meter.end_bytes) == (f32_bytes(1024), f32_bytes(1024))
    del y


def test_storage_from_before_the_region_is_ignored() -> None:
    # Allocated with no profiler running: the allocator never tells the
    # profiler its size, so its free inside the region is silent.
    old = torch.empty(1000)
    with MemoryMeter() as meter:
        del old
        new = torch.empty(10)
    assert (meter.peak_bytes, meter.end_bytes) == (f32_bytes(10), f32_bytes(10))

    # Allocated inside an earlier region: the allocator does report its free
    # (with its size) in the next region; the meter must still ignore it, or
    # the second figure would depend on what the first region left behind.
    with MemoryMeter() as first:
        kept = torch.empty(2000)
    with MemoryMeter() as second:
        del kept, new
    assert (first.peak_bytes, first.end_bytes) == (f32_bytes(2000), f32_bytes(2000))
    assert (second.peak_bytes, second.end_bytes) == (0, 0)


def test_op_internal_temporaries_are_seen() -> None:
    # mm of a stride-0 (expanded) matrix first copies it to a contiguous
    # [16, 16] buffer inside the kernel, after allocating its output: a
    # temporary no dispatch mode sees. The loss gradient of `.sum()` is such
    # an expanded tensor, so this happens in every Linear's backward.
    expanded = torch.ones(()).expand(16, 16)
    weight = torch.empty(16, 64)
    with MemoryMeter() as meter:
        out = expanded @ weight
    assert meter.peak_bytes == f32_bytes(16, 64) + f32_bytes(16, 16)
    assert meter.end_bytes == f32_bytes(16, 64)
    del out


def test_measure_peak_bytes() -> None:
    # The input and the result of exp are alive together.
    assert measure_peak_bytes(lambda: torch.ones(256).exp()) == 2 * f32_bytes(256)
    # A Python scalar operand is wrapped in an int64 tensor (8 bytes), then
    # converted to float32 (4 bytes) for type promotion: allocations a
    # shape-level count would miss.
    assert measure_peak_bytes(lambda: torch.ones(256) + 1) == 2 * f32_bytes(256) + 8 + 4


def test_region_that_raises_is_still_measured() -> None:
    meter = MemoryMeter()
    with pytest.raises(ZeroDivisionError):
        with meter:
            kept = torch.empty(100)
            1 / 0
    assert (meter.peak_bytes, meter.end_bytes) == (f32_bytes(100), f32_bytes(100))
    del kept


# ------------------------------------------------- Linear+ReLU chain, by hand

BATCH = 16
WIDTHS = (32, 64, 64, 16)


def make_mlp() -> torch.nn.Sequential:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for fan_in, fan_out in zip(WIDTHS[:-1], WIDTHS[1:]):
        layers += [torch.nn.Linear(fan_in, fan_out), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])  # no ReLU after the last Linear


def metered_step(model: torch.nn.Module, batch: torch.Tensor) -> MemoryMeter:
    model.zero_grad(set_to_none=True)
    with MemoryMeter() as meter:
        model(batch).sum().backward()
    return meter


def param_grad_bytes(layer: int) -> int:
    """Bytes of the weight and bias gradients of Linear number `layer` (1-based)."""
    fan_in, fan_out = WIDTHS[layer - 1], WIDTHS[layer]
    return f32_bytes(fan_out, fan_in) + f32_bytes(fan_out)


# NOTE: [What is alive in a Linear+ReLU chain]
# Linear l computes h_l = addmm(b_l, in_l, W_l^T); ReLU l computes r_l.
# Forward: ReluBackward0 saves its output r_l and the next AddmmBackward0
# saves r_l as mat1, so every r_l lives until the backward reaches it; h_l is
# saved by nobody and dies as soon as ReLU has read it. h_3 dies after the
# sum (SumBackward0 keeps only a size). The batch x predates the region.
# Backward:
# - The loss (4 bytes, held by the caller) and its gradient, ones_like(loss)
#   (4 bytes, held by `Tensor.backward` until it returns), live throughout.
# - SumBackward0 expands the loss gradient to [16, 16]: a view, 0 bytes.
# - AddmmBackward0 of layer l allocates grad_in (if in_l needs a gradient),
#   W_l.grad and b_l.grad. W_l.grad is computed as (grad^T @ in_l), which is
#   already in W_l's layout, so AccumulateGrad steals it (no copy); bias
#   grads are fresh sums. Then the incoming gradient and the saved in_l die.
#   In layer 3 each mm also copies the stride-0 loss gradient to a [16, 16]
#   temporary (see test_op_internal_temporaries_are_seen), far below the peak.
# - ReluBackward0 allocates grad_h = threshold_backward(grad_r, r); then
#   grad_r and the saved r die.
ACT = f32_bytes(BATCH, 64)  # every hidden activation and its gradient: [16, 64]
LOSS_AND_GRAD = 4 + 4


def test_mlp_peak_all_trainable_matches_hand_count() -> None:
    moments = {
        "relu2 forward: r1, h2, r2": 3 * ACT,
        "layer3 backward mm: r1, r2, grad_r2, W3.grad, mm's [16,16] copy": (
            2 * ACT + LOSS_AND_GRAD + ACT + f32_bytes(16, 64) + f32_bytes(16, 16)
        ),
        "relu2 backward: r1, r2, grad_r2, grad_h2, grads3": (
            4 * ACT + LOSS_AND_GRAD + param_grad_bytes(3)
        ),
        "layer2 backward: r1, grad_h2, grad_r1, grads3, grads2": (
            3 * ACT + LOSS_AND_GRAD + param_grad_bytes(3) + param_grad_bytes(2)
        ),
        "relu1 backward: r1, grad_r1, grad_h1, grads3, grads2": (
            3 * ACT + LOSS_AND_GRAD + param_grad_bytes(3) + param_grad_bytes(2)
        ),
        "layer1 backward: grad_h1, all grads": (
            ACT + LOSS_AND_GRAD + sum(param_grad_bytes(l) for l in (1, 2, 3))
        ),
    }
    meter = metered_step(make_mlp(), torch.randn(BATCH, WIDTHS[0]))
    assert max(moments, key=moments.get) == "layer1 backward: grad_h1, all grads"
    assert meter.peak_bytes == max(moments.values()) == 33352
    # Left at exit: the parameter gradients, nothing else.
    assert meter.end_bytes == sum(param_grad_bytes(l) for l in (1, 2, 3)) == 29248


def test_mlp_peak_first_layer_frozen_matches_hand_count() -> None:
    # Layer 1 frozen: r1 needs no gradient, so there is no ReluBackward0 for
    # it and layer 2 computes no grad_r1; r1 is still saved as layer 2's
    # mat1 (for W2.grad). No backward runs for layer 1 at all.
    moments = {
        "relu2 forward: r1, h2, r2": 3 * ACT,
        "relu2 backward: r1, r2, grad_r2, grad_h2, grads3": (
            4 * ACT + LOSS_AND_GRAD + param_grad_bytes(3)
        ),
        "layer2 backward: r1, grad_h2, grads3, grads2": (
            2 * ACT + LOSS_AND_GRAD + param_grad_bytes(3) + param_grad_bytes(2)
        ),
    }
    model = make_mlp()
    model[0].requires_grad_(False)
    meter = metered_step(model, torch.randn(BATCH, WIDTHS[0]))
    assert max(moments, key=moments.get) == "layer2 backward: r1, grad_h2, grads3, grads2"
    assert meter.peak_bytes == max(moments.values()) == 29000
    assert meter.end_bytes == param_grad_bytes(2) + param_grad_bytes(3) == 20800


def test_same_figure_on_repeated_runs() -> None:
    model, batch = make_mlp(), torch.randn(BATCH, WIDTHS[0])
    figures = [
        (meter.peak_bytes, meter.end_bytes)
        for meter in (metered_step(model, batch) for _ in range(3))
    ]
    assert figures[0][0] > 0
    assert figures == [figures[0]] * 3


# ------------------------------------------------------------ torch.compile


def test_meter_sees_through_torch_compile() -> None:
    # A backend that counts compilations and the runs of the compiled graphs:
    # if the meter forced Dynamo to run the frame eagerly (as a dispatch mode
    # does), the compiled forward would not run under it.
    compiles = {"forward": 0, "backward": 0}
    runs = {"forward": 0, "backward": 0}

    def counting_compiler(kind: str):
        def compile_graph(gm: torch.fx.GraphModule, example_inputs: list) -> object:
            compiles[kind] += 1
            boxed = make_boxed_func(gm.forward)

            def run(args: list) -> object:
                runs[kind] += 1
                return boxed(args)

            run._boxed_call = True  # type: ignore[attr-defined]
            return run

        return compile_graph

    torch._dynamo.reset()
    model, batch = make_mlp(), torch.randn(BATCH, WIDTHS[0])
    backend = aot_autograd(fw_compiler=counting_compiler("forward"), bw_compiler=counting_compiler("backward"))
    compiled_loss = torch.compile(lambda x: model(x).sum(), backend=backend, dynamic=False)

    def metered_compiled_step() -> MemoryMeter:
        model.zero_grad(set_to_none=True)
        with MemoryMeter() as meter:
            compiled_loss(batch).backward()
        return meter

    peaks = [metered_compiled_step().peak_bytes for _ in range(3)]
    assert peaks[0] > 0 and peaks == [peaks[0]] * 3
    assert compiles == {"forward": 1, "backward": 1}, "recompiled or fell back"
    assert runs == {"forward": 3, "backward": 3}, "the compiled graphs did not run under the meter"
    torch._dynamo.reset()


# ------------------------------------------------------------ API and errors


def test_meter_rejects_unknown_device() -> None:
    with pytest.raises(ValueError, match="device must be 'cpu' or a CUDA device, got 'meta'"):
        MemoryMeter("meta")


def test_figures_are_unknown_before_exit() -> None:
    meter = MemoryMeter()
    with pytest.raises(RuntimeError, match="after the `with` block"):
        meter.peak_bytes
    with meter:
        with pytest.raises(RuntimeError, match="after the `with` block"):
            meter.end_bytes


def test_refuses_to_nest_inside_another_profiler() -> None:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        with pytest.raises(RuntimeError, match="already running"):
            with MemoryMeter():
                pass


def test_profiler_noise_is_silenced(capfd: pytest.CaptureFixture[str]) -> None:
    with MemoryMeter():
        torch.empty(10)
    assert "USDT" not in capfd.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_meter_without_cuda_raises() -> None:
    with pytest.raises(RuntimeError, match="needs CUDA"):
        with MemoryMeter("cuda"):
            pass


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_meter_two_tensors_free_one() -> None:
    # Sizes are multiples of 512 bytes, the caching allocator's rounding.
    with MemoryMeter("cuda") as meter:
        a = torch.empty(1024, device="cuda")
        b = torch.empty(2048, device="cuda")
        del a
    assert meter.peak_bytes == f32_bytes(1024) + f32_bytes(2048)
    assert meter.end_bytes == f32_bytes(2048)
    del b


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_meter_same_figure_on_repeated_runs() -> None:
    model, batch = make_mlp().cuda(), torch.randn(BATCH, WIDTHS[0], device="cuda")
    model(batch).sum().backward()  # warm up cuBLAS (its workspace persists)

    def step() -> tuple[int, int]:
        model.zero_grad(set_to_none=True)
        with MemoryMeter("cuda") as meter:
            model(batch).sum().backward()
        return meter.peak_bytes, meter.end_bytes

    figures = [step() for _ in range(3)]
    assert figures[0][0] > 0 and figures == [figures[0]] * 3


# --------------------------------------------- event ordering (tied timestamps)


def alloc(time_ns: int, ptr: int, size_bytes: int, total_bytes: int) -> AllocationEvent:
    return AllocationEvent(time_ns=time_ns, ptr=ptr, size_bytes=size_bytes, total_allocated_bytes=total_bytes)


def test_no_events_measure_zero() -> None:
    assert live_bytes_from_events([]) == (0, 0)


def test_events_are_ordered_by_time() -> None:
    events = [alloc(3, 1, -64, 100), alloc(1, 1, 64, 164), alloc(2, 2, 32, 196)]
    assert [e.time_ns for e in order_allocation_events(events)] == [1, 2, 3]
    assert live_bytes_from_events(events) == (96, 32)


def test_tied_events_follow_the_running_total() -> None:
    # A block freed and another allocated at the same timestamp, listed in
    # the wrong order: the running total (100 -> 92 -> 108) puts the free
    # first, so the two blocks are never counted together.
    events = [
        alloc(1, ptr=1, size_bytes=8, total_bytes=100),
        alloc(2, ptr=2, size_bytes=16, total_bytes=108),
        alloc(2, ptr=1, size_bytes=-8, total_bytes=92),
    ]
    assert [e.ptr for e in order_allocation_events(events)] == [1, 1, 2]
    assert live_bytes_from_events(events) == (16, 16)


def test_tied_first_events_start_where_the_chain_starts() -> None:
    # The very first events tie: no earlier total says where the chain
    # starts, so it starts at the event whose "before" total (50) is not the
    # "after" total of another one. Free listed first, then its allocation.
    events = [alloc(7, ptr=3, size_bytes=-40, total_bytes=50), alloc(7, ptr=3, size_bytes=40, total_bytes=90)]
    assert [e.size_bytes for e in order_allocation_events(events)] == [40, -40]
    assert live_bytes_from_events(events) == (40, 0)


def test_broken_chain_keeps_the_input_order() -> None:
    # Totals that do not chain (events from an unfollowed thread): the input
    # order decides, so the result is still the same on every call.
    events = [alloc(5, ptr=1, size_bytes=8, total_bytes=1000), alloc(5, ptr=2, size_bytes=8, total_bytes=2000)]
    assert order_allocation_events(events) == events
    assert order_allocation_events(list(reversed(events))) == list(reversed(events))


def test_free_of_unknown_block_is_ignored() -> None:
    events = [alloc(1, ptr=9, size_bytes=-4000, total_bytes=0), alloc(2, ptr=1, size_bytes=8, total_bytes=8)]
    assert live_bytes_from_events(events) == (8, 8)
