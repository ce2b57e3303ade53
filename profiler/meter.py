"""The project's deterministic memory meter.

``MemoryMeter`` measures the peak bytes allocated inside a region of code,
above what was allocated when the region started, on CPU and on CUDA::

    >>> with MemoryMeter("cpu") as meter:
    ...     x = torch.empty(1024)          # 4096 bytes
    ...     y = torch.empty(256)           # 1024 bytes
    ...     del x
    >>> meter.peak_bytes, meter.end_bytes
    (5120, 1024)

CPU: the meter reads the allocation events of the torch profiler
(``profile_memory=True``). The c10 CPU allocator reports every allocation and
free to the profiler: inside ops (oneDNN scratch buffers), inside autograd's
backward and inside code compiled by ``torch.compile``.

NOTE: [No dispatch mode]
A ``TorchDispatchMode`` active while code goes through TorchDynamo makes
Dynamo run that frame eagerly, silently, on that call and every later one; a
dispatch-mode meter around a compiled step would measure the eager model, not
the plan. It would also miss op-internal temporaries. The profiler has
neither problem.

NOTE: [Storage allocated before the region]
The CPU allocator only tells the profiler the size of blocks it saw being
allocated while a profiler was running; a block allocated earlier is freed
silently, or (if an earlier profiled region allocated it) with its size. To
get the same figure on every run the meter counts only storage allocated
inside the region: frees of older storage are ignored. So on CPU
``peak_bytes`` and ``end_bytes`` are never negative, whereas on CUDA freeing
older storage (``zero_grad()`` inside the region) lowers the figures. Keep
such frees outside the region, as the budget semantics of DESIGN.md do.

CUDA: ``torch.cuda.max_memory_allocated`` after resetting the peak, minus
``torch.cuda.memory_allocated`` at the start, both around a synchronize.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import types
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

__all__ = [
    "AllocationEvent",
    "MemoryMeter",
    "live_bytes_from_events",
    "measure_peak_bytes",
    "order_allocation_events",
]


@dataclasses.dataclass(frozen=True, slots=True)
class AllocationEvent:
    """One allocation or free reported by the CPU allocator to the profiler.

    Attributes:
        time_ns: When the allocator reported it (profiler clock).
        ptr: Address of the block.
        size_bytes: Bytes allocated, negative for a free.
        total_allocated_bytes: The allocator's running total right after this
            event; it chains consecutive events (``total - size`` of one event
            is ``total`` of the previous one), which orders events whose
            timestamps tie.
    """

    time_ns: int
    ptr: int
    size_bytes: int
    total_allocated_bytes: int

    @property
    def total_before_bytes(self) -> int:
        """The allocator's running total right before this event."""
        return self.total_allocated_bytes - self.size_bytes


def order_allocation_events(events: Iterable[AllocationEvent]) -> list[AllocationEvent]:
    """Sorts events into the order the allocator produced them.

    Events are sorted by time. Within a group of equal timestamps the
    allocator's running total decides: each event is followed by the one whose
    ``total_before_bytes`` equals its ``total_allocated_bytes``. Where the
    chain leaves a choice (an alloc and a free of one size return the total
    to where it was), an allocation of a block not live yet, or a free of a
    live one, goes first; then the input order decides, so the result is the
    same for the same input.

    Args:
        events: Allocation events in any order.

    Returns:
        The events in allocation order.

    Example::

        >>> a = AllocationEvent(time_ns=5, ptr=1, size_bytes=8, total_allocated_bytes=8)
        >>> b = AllocationEvent(time_ns=5, ptr=1, size_bytes=-8, total_allocated_bytes=0)
        >>> [e.size_bytes for e in order_allocation_events([b, a])]
        [8, -8]
    """
    by_time = sorted(events, key=lambda e: e.time_ns)  # stable: input order breaks ties
    ordered: list[AllocationEvent] = []
    live_ptrs: set[int] = set()
    start = 0
    while start < len(by_time):
        stop = start
        while stop < len(by_time) and by_time[stop].time_ns == by_time[start].time_ns:
            stop += 1
        remaining = by_time[start:stop]
        while remaining:
            total = ordered[-1].total_allocated_bytes if ordered else None
            event = remaining.pop(_next_tied_event(remaining, total, live_ptrs))
            ordered.append(event)
            if event.size_bytes > 0:
                live_ptrs.add(event.ptr)
            else:
                live_ptrs.discard(event.ptr)
        start = stop
    return ordered


def _next_tied_event(
    remaining: Sequence[AllocationEvent], total: int | None, live_ptrs: set[int]
) -> int:
    """Index of the event that comes next among events sharing a timestamp."""
    if total is None:
        # The very first events: the chain starts at a "before" total that is
        # not the "after" total of another event (none in a cycle).
        starts = Counter(e.total_before_bytes for e in remaining) - Counter(
            e.total_allocated_bytes for e in remaining
        )
        chained = [i for i, e in enumerate(remaining) if e.total_before_bytes in starts]
    else:
        chained = [i for i, e in enumerate(remaining) if e.total_before_bytes == total]
    # A broken chain (events of a thread the profiler did not follow) keeps
    # the input order.
    candidates = chained or list(range(len(remaining)))
    consistent = [
        i for i in candidates if (remaining[i].size_bytes > 0) != (remaining[i].ptr in live_ptrs)
    ]
    return (consistent or candidates)[0]


def live_bytes_from_events(events: Iterable[AllocationEvent]) -> tuple[int, int]:
    """Replays allocation events and returns the peak and final live bytes.

    Only storage allocated among ``events`` counts; a free of a block that was
    not allocated among them (storage older than the region) is ignored, see
    NOTE: [Storage allocated before the region].

    Args:
        events: Allocation events of one region, in any order.

    Returns:
        ``(peak_bytes, end_bytes)``: the most bytes live at once and the bytes
        still live after the last event.

    Example::

        >>> events = [
        ...     AllocationEvent(time_ns=1, ptr=10, size_bytes=64, total_allocated_bytes=164),
        ...     AllocationEvent(time_ns=2, ptr=20, size_bytes=32, total_allocated_bytes=196),
        ...     AllocationEvent(time_ns=3, ptr=10, size_bytes=-64, total_allocated_bytes=132),
        ... ]
        >>> live_bytes_from_events(events)
        (96, 32)
    """
    live_sizes: dict[int, int] = {}
    live_bytes = 0
    peak_bytes = 0
    for event in order_allocation_events(events):
        if event.size_bytes > 0:
            # A block at a live address means its free was not reported (freed
            # on a thread the profiler did not follow): it is gone either way.
            live_bytes -= live_sizes.pop(event.ptr, 0)
            live_sizes[event.ptr] = event.size_bytes
            live_bytes += event.size_bytes
            peak_bytes = max(peak_bytes, live_bytes)
        elif event.ptr in live_sizes:
            live_bytes -= live_sizes.pop(event.ptr)
    return peak_bytes, live_bytes


class MemoryMeter:
    """Context manager measuring the peak bytes allocated inside a region.

    After the ``with`` block, ``peak_bytes`` is the most bytes allocated at
    once inside the region above what was allocated when it started, and
    ``end_bytes`` what was allocated at exit above the start. The figure is
    the same on every run of the same code. See the module docstring for how
    each device is measured.

    Args:
        device: ``"cpu"`` or a CUDA device (``"cuda"``, ``"cuda:1"``).

    Raises:
        ValueError: For a device type other than cpu and cuda.
        RuntimeError: On entering, when CUDA is asked for but unavailable, or
            (CPU) when another torch profiler is already running.

    Example::

        >>> model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64),
        ...                       nn.ReLU(), nn.Linear(64, 16))
        >>> with MemoryMeter() as meter:
        ...     model(torch.randn(16, 32)).sum().backward()
        >>> meter.peak_bytes, meter.end_bytes  # end: the parameter gradients
        (33352, 29248)
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(
                f"MemoryMeter: device must be 'cpu' or a CUDA device, got {str(device)!r}"
            )
        self._peak_bytes: int | None = None
        self._end_bytes: int | None = None
        self._profiler: torch.profiler.profile | None = None
        self._cuda_start_bytes = 0

    @property
    def peak_bytes(self) -> int:
        """Peak bytes allocated inside the region above the start."""
        if self._peak_bytes is None:
            raise RuntimeError("MemoryMeter.peak_bytes is only known after the `with` block exits")
        return self._peak_bytes

    @property
    def end_bytes(self) -> int:
        """Bytes allocated at exit above the start."""
        if self._end_bytes is None:
            raise RuntimeError("MemoryMeter.end_bytes is only known after the `with` block exits")
        return self._end_bytes

    def __enter__(self) -> MemoryMeter:
        self._peak_bytes = self._end_bytes = None
        if self.device.type == "cuda":
            self._enter_cuda()
        else:
            self._enter_cpu()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: types.TracebackType | None,
    ) -> None:
        if self.device.type == "cuda":
            self._exit_cuda()
        else:
            self._exit_cpu()

    def _enter_cuda(self) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError(f"MemoryMeter: device {str(self.device)!r} needs CUDA, which is not available")
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self._cuda_start_bytes = torch.cuda.memory_allocated(self.device)

    def _exit_cuda(self) -> None:
        torch.cuda.synchronize(self.device)
        self._peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._cuda_start_bytes
        self._end_bytes = torch.cuda.memory_allocated(self.device) - self._cuda_start_bytes

    def _enter_cpu(self) -> None:
        if torch.autograd._profiler_enabled():
            raise RuntimeError(
                "MemoryMeter: a torch profiler is already running; the CPU meter "
                "is built on the profiler and cannot nest inside another one"
            )
        self._profiler = torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
        )
        with _quiet_stderr():
            self._profiler.__enter__()

    def _exit_cpu(self) -> None:
        profiler, self._profiler = self._profiler, None
        assert profiler is not None, "MemoryMeter: __exit__ without __enter__"
        with _quiet_stderr():
            profiler.__exit__(None, None, None)
        self._peak_bytes, self._end_bytes = live_bytes_from_events(
            _cpu_allocation_events(profiler)
        )


def measure_peak_bytes(fn: Callable[[], object], device: str | torch.device = "cpu") -> int:
    """Runs ``fn()`` once under a :class:`MemoryMeter` and returns its peak.

    Args:
        fn: The code to measure, called with no arguments; its result is
            dropped after the measurement.
        device: ``"cpu"`` or a CUDA device.

    Returns:
        Peak bytes allocated while ``fn`` ran, above the start.

    Example::

        >>> measure_peak_bytes(lambda: torch.ones(256).exp())  # input and result
        2048
    """
    with MemoryMeter(device) as meter:
        fn()
    return meter.peak_bytes


def _cpu_allocation_events(profiler: torch.profiler.profile) -> list[AllocationEvent]:
    """The CPU allocator's events recorded by a finished profiler."""
    try:
        return _read_cpu_allocation_events(profiler)
    except (AttributeError, ImportError) as e:
        raise RuntimeError(
            f"MemoryMeter: this torch ({torch.__version__}) does not expose the profiler's "
            "allocation events as torch 2.11-2.13 do (kineto_results.experimental_event_tree(), "
            f"events tagged _EventType.Allocation with ptr/alloc_size/total_allocated): {e}"
        ) from e


def _read_cpu_allocation_events(profiler: torch.profiler.profile) -> list[AllocationEvent]:
    from torch._C._profiler import _EventType  # private: the meter's one tie to internals

    events: list[AllocationEvent] = []
    stack = list(profiler.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag != _EventType.Allocation:
            continue
        fields = event.extra_fields
        if fields.device.type != "cpu":
            continue
        events.append(
            AllocationEvent(
                time_ns=event.start_time_ns,
                ptr=fields.ptr,
                size_bytes=fields.alloc_size,
                total_allocated_bytes=fields.total_allocated,
            )
        )
    return events


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silences C-level stderr while the profiler starts or stops.

    Kineto prints ``USDT: ... profiler_start`` lines straight to file
    descriptor 2 on every start and stop. Where the descriptor cannot be
    redirected (no real fd 2), the lines are left alone.
    """
    try:
        sys.stderr.flush()
        saved_fd = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
