"""The schedule cache, and binding a schedule file to a captured joint graph.

``Rockmate`` asks a :class:`ScheduleSource` for a plan before it profiles and
solves. The source looks at an explicitly given file (``schedule=``), else at
the cache directory (``cache_dir=``, ``$REMATC_CACHE_DIR`` or
``~/.cache/rematc``; files under ``schedules/``), keyed by :class:`PlanKey`:
graph hash, budget as given, device kind, solver method and profiler mode.

A file found is *bound* to the captured graph before use
(:func:`bind_schedule_file`): its graph hash must match, the joint graph is
lowered with the file's per-op costs (no profiling) and must give exactly the
file's IR, and the schedule must pass ``solvers.check`` with a simulated peak
within the budget. Anything wrong with an explicit file raises
:class:`~rematc.errors.ScheduleFileError`; anything wrong with a cache entry
warns (:class:`~rematc.errors.RematcWarning`) and the caller plans again, so
a bad cache never stops training and never runs a wrong schedule.

Example:
    >>> source = ScheduleSource(cache_dir=Path("/tmp/rematc"))            # doctest: +SKIP
    >>> source.find(joint, 1, key, budget) is None    # a miss: plan, then source.store(file)  # doctest: +SKIP
    True
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.fx as fx

from profiler.analytic import NodeCost
from solvers import Graph, Schedule, ScheduleError, SimulationResult, check, no_remat_schedule, simulate

from .budget import Budget
from .errors import RematcWarning, ScheduleFileError
from .lower import Lowered, lower_joint_graph
from .schedule_file import ScheduleFile, read_schedule_file, write_schedule_file

__all__ = [
    "BoundSchedule", "PlanKey", "ScheduleCache", "ScheduleSource", "bind_schedule_file", "budget_key",
    "make_schedule_file", "planner_fingerprint",
]


@functools.cache
def planner_fingerprint() -> str:
    """A digest of the code that decides plans: ``solvers/``, ``profiler/``, lowering, passes, hashing.

    Stored in every schedule file; a cache entry whose fingerprint differs is
    a miss (see NOTE: [Cache entries of other versions]). Constant for an
    installed release; it changes when a developer edits a solver, so the
    cache never hands back a plan the current code would not make.
    """
    import profiler
    import solvers

    here = Path(__file__).resolve().parent
    files = [
        *sorted(Path(solvers.__file__).resolve().parent.glob("*.py")),
        *sorted(Path(profiler.__file__).resolve().parent.glob("*.py")),
        *(here / name for name in ("lower.py", "passes.py", "graph_hash.py")),
    ]
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.parent.name}/{path.name}\0".encode())
        digest.update(path.read_bytes())
    return "sha256:" + digest.hexdigest()[:16]


def budget_key(budget: Budget) -> str:
    """The canonical form of a budget in cache keys: ``"fraction-0.4"`` or ``"bytes-536870912"``.

    ``"512MiB"`` and ``536870912`` are the same key; ``0.4`` and ``0.40`` too.
    """
    if budget.fraction is not None:
        return f"fraction-{budget.fraction!r}"
    return f"bytes-{budget.bytes}"


@dataclass(frozen=True, slots=True)
class PlanKey:
    """What a cached plan is looked up by (everything that changes the plan)."""

    graph_hash: str
    budget_key: str
    device: str
    method: str
    profile: str

    @property
    def file_name(self) -> str:
        """``<hash prefix>_<device>_<budget>_<method>_<profile>.json``: readable in ``ls``."""
        digest = self.graph_hash.partition(":")[2] or self.graph_hash
        return f"{digest[:32]}_{self.device}_{self.budget_key}_{self.method}_{self.profile}.json"


class ScheduleCache:
    """Schedule files in ``directory``, one per :class:`PlanKey`; writes are atomic."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    def path(self, key: PlanKey) -> Path:
        return self.directory / key.file_name

    def load(self, key: PlanKey) -> ScheduleFile | None:
        """The file stored under ``key``; None when there is none or another rematc version wrote it.

        NOTE: [Cache entries of other versions] an entry written by another
        rematc version, or by other planning code (:func:`planner_fingerprint`),
        is a plain miss, not an error: it is still a valid plan, but a newer
        solver may find a better one, and the user upgraded (or, working on
        rematc, edited a solver) to get it. The new plan overwrites the entry.
        Explicit files have no such rule.

        Raises:
            ScheduleFileError: the entry exists but is unreadable, corrupt, of
                another format version, or was written for another key.
        """
        path = self.path(key)
        if not path.exists():
            return None
        sf = read_schedule_file(path)
        from . import __version__  # late: rematc/__init__ imports the API, which imports this module

        if sf.rematc_version != __version__ or sf.planner_fingerprint != planner_fingerprint():
            return None
        # The graph hash is compared when binding (with its own message); the rest of the key here.
        stored = (sf.budget_key, sf.device, sf.method, sf.profile)
        wanted = (key.budget_key, key.device, key.method, key.profile)
        if stored != wanted:  # e.g. a file copied in by hand under another entry's name
            raise ScheduleFileError(path, f"it was written for key {stored}, not {wanted}", wanted, stored)
        return sf

    def store(self, sf: ScheduleFile) -> Path:
        key = PlanKey(sf.graph_hash, sf.budget_key, sf.device, sf.method, sf.profile)
        return write_schedule_file(self.path(key), sf)


@dataclass(frozen=True)
class BoundSchedule:
    """A schedule file checked against a captured graph, ready for codegen.

    Attributes:
        file: the file's contents.
        lowered: the captured graph lowered with the file's costs (its IR equals the file's).
        schedule: the plan (indices into ``lowered.graph``).
        budget_bytes: the budget it was checked against.
        source: the path it came from.
        predicted: ``simulate`` of the schedule on the captured graph.
        baseline: ``simulate`` of the no-remat schedule on the captured graph.
    """

    file: ScheduleFile
    lowered: Lowered
    schedule: Schedule
    budget_bytes: int
    source: Path
    predicted: SimulationResult
    baseline: SimulationResult


def bind_schedule_file(
    sf: ScheduleFile, joint: fx.GraphModule, num_fwd_outputs: int, key: PlanKey, budget: Budget | None,
    source: str | os.PathLike[str], *, hold_outputs: bool = False,
) -> BoundSchedule:
    """Check ``sf`` against the captured ``joint`` graph and lower the graph with the file's costs.

    Args:
        sf: the file's contents (already internally consistent).
        joint: the captured joint graph, after rematc's passes.
        num_fwd_outputs: how many joint outputs belong to the forward.
        key: the captured graph's key (its hash and device kind are compared).
        hold_outputs: lower as ``lower_joint_graph`` does for the planning ``Rockmate``.
        budget: the budget to check against; None uses the file's own.
        source: the file, for messages.

    Raises:
        ScheduleFileError: another graph or device, or the plan does not fit
            the budget; the message says what differs.
    """
    if sf.graph_hash != key.graph_hash:
        raise ScheduleFileError(
            source,
            f"it belongs to another graph: the captured graph hashes to {key.graph_hash} but the file is for "
            f"{sf.graph_hash} (another model, sample shape or dtype, loss, or torch/rematc version)",
            expected=key.graph_hash, found=sf.graph_hash,
        )
    if sf.device != key.device:
        raise ScheduleFileError(
            source, f"it was planned for device {sf.device!r}, the model runs on {key.device!r}",
            expected=key.device, found=sf.device,
        )
    costs = {
        op.name: NodeCost(op.time_ms, op.workspace_bytes, tuple(sf.graph.values[v].bytes for v in op.outputs))
        for op in sf.graph.ops
    }
    lowered = lower_joint_graph(joint, num_fwd_outputs, costs, hold_outputs=hold_outputs)
    if lowered.graph != sf.graph:  # a hash collision, or a lowering that changed without a hash change
        raise ScheduleFileError(
            source, f"its graph differs from the captured one ({_first_difference(sf.graph, lowered.graph)})",
        )
    baseline = simulate(lowered.graph, no_remat_schedule(lowered.graph), validate=False)
    budget_bytes = sf.budget_bytes if budget is None else budget.resolve(baseline.peak_bytes)
    try:
        check(lowered.graph, sf.schedule)
    except ScheduleError as error:
        raise ScheduleFileError(source, f"its steps do not run on the captured graph: {error}") from None
    predicted = simulate(lowered.graph, sf.schedule, validate=False)
    peak = predicted.peak_bytes
    if peak > budget_bytes:
        raise ScheduleFileError(
            source, f"its plan peaks at {peak} bytes, above the budget of {budget_bytes} bytes "
            f"(it was made for {sf.budget_bytes} bytes); plan again for this budget",
            expected=budget_bytes, found=peak,
        )
    return BoundSchedule(sf, lowered, sf.schedule, budget_bytes, Path(source), predicted, baseline)


def _first_difference(want: Graph, got: Graph) -> str:
    for i, (a, b) in enumerate(zip(want.ops, got.ops)):
        if a != b:
            return f"op {i}: file {a.name!r}, captured {b.name!r}"
    for i, (a, b) in enumerate(zip(want.values, got.values)):
        if a != b:
            return f"value {i}: file {a}, captured {b}"
    return f"file has {want.num_ops} ops and {len(want.values)} values, captured {got.num_ops} and {len(got.values)}"


def make_schedule_file(
    key: PlanKey, budget: Budget | None, budget_bytes: int, graph: Graph, schedule: Schedule,
    predicted: SimulationResult, baseline: SimulationResult, device_name: str,
    blocks: Sequence[Mapping[str, Any]] = (),
) -> ScheduleFile:
    """The :class:`ScheduleFile` of a plan (stamped with the rematc and torch versions and the time)."""
    from . import __version__  # late: rematc/__init__ imports the API, which imports this module

    return ScheduleFile(
        graph_hash=key.graph_hash,
        device=key.device,
        budget_bytes=budget_bytes,
        budget_given=budget.given if budget is not None else str(budget_bytes),
        budget_key=key.budget_key,
        method=key.method,
        profile=key.profile,
        graph=graph,
        schedule=schedule,
        predicted_peak_bytes=predicted.peak_bytes,
        predicted_time_ms=predicted.time_ms,
        baseline_peak_bytes=baseline.peak_bytes,
        baseline_time_ms=baseline.time_ms,
        blocks=tuple(blocks),
        device_name=device_name,
        rematc_version=__version__,
        torch_version=torch.__version__,
        created_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        planner_fingerprint=planner_fingerprint(),
    )


class ScheduleSource:
    """Where a ``Rockmate`` looks for a plan before solving: an explicit file, else the cache.

    Args:
        cache_dir: the cache root (schedules go under ``schedules/``); None disables the cache.
        schedule_path: a file to use instead of planning (errors raise).

    Raises:
        ScheduleFileError: ``schedule_path`` is missing, corrupt, or of an unknown format version.
    """

    def __init__(self, cache_dir: Path | None, schedule_path: str | os.PathLike[str] | None = None) -> None:
        self.cache = ScheduleCache(cache_dir / "schedules") if cache_dir is not None else None
        self.schedule_path = Path(schedule_path) if schedule_path is not None else None
        # Read an explicit file now: a corrupt or foreign-version file fails before the (slow) capture.
        self.explicit = read_schedule_file(self.schedule_path) if self.schedule_path is not None else None

    def find(
        self, joint: fx.GraphModule, num_fwd_outputs: int, key: PlanKey, budget: Budget | None,
        *, hold_outputs: bool = False,
    ) -> BoundSchedule | None:
        """A bound plan for ``key``, or None (cache miss, or a bad cache entry: warned).

        Raises:
            ScheduleFileError: the explicit file cannot be used.
        """
        if self.explicit is not None:
            assert self.schedule_path is not None
            return bind_schedule_file(
                self.explicit, joint, num_fwd_outputs, key, budget, self.schedule_path, hold_outputs=hold_outputs
            )
        if self.cache is None:
            return None
        try:
            sf = self.cache.load(key)
            if sf is None:
                return None
            return bind_schedule_file(
                sf, joint, num_fwd_outputs, key, budget, self.cache.path(key), hold_outputs=hold_outputs
            )
        except ScheduleFileError as error:
            warnings.warn(f"{error}; ignoring this cache entry and planning again", RematcWarning, stacklevel=2)
            return None

    def store(self, sf: ScheduleFile) -> Path | None:
        """Write ``sf`` to the cache (when on and no explicit file is used); a failed write only warns."""
        if self.cache is None or self.schedule_path is not None:
            return None
        try:
            return self.cache.store(sf)
        except OSError as error:
            warnings.warn(f"could not write the schedule cache entry: {error}", RematcWarning, stacklevel=2)
            return None
