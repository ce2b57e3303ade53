"""Schedule files: a plan as versioned, human-readable, self-describing JSON.

A file holds everything needed to reuse a plan without profiling or solving:
the graph hash it belongs to (:mod:`rematc.graph_hash`), the device kind, the
budget (bytes and as given), the solver and profiler settings, the predicted
peak and time, per-block choices when the planner has blocks, the lowered IR
with its per-op costs (``time_ms``, ``workspace_bytes``: a cache hit lowers the
captured graph with them instead of profiling), and the ordered steps by
stable node identity (fx node names of the joint graph)::

    {
      "format": "rematc-schedule",
      "format_version": 1,
      "graph_hash": "sha256:9c0e...",
      "device": "cpu",
      "budget": {"bytes": 1258291, "given": "0.4", "key": "fraction-0.4"},
      ...
      "steps": {"forward": ["compute addmm", "compute relu", "free addmm", ...],
                "backward": ["compute tangents_1", "compute addmm", ...]}
    }

This module is torch-free: it reads and writes files and checks that a file
is internally consistent (its steps run on its graph and simulate to the
stored peak, within the stored budget). Binding a file to a captured graph is
:mod:`rematc.schedule_cache`'s job.

NOTE: [Atomic writes] Files are written to a temporary file in the same
directory and moved into place with ``os.replace``, which is atomic on POSIX
and Windows: two training processes writing the same entry at once leave one
complete file, never a torn one (as :mod:`profiler.cache` does).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from solvers import Graph, GraphError, Op, Schedule, ScheduleError, Step, Value, check, simulate

from .errors import ScheduleFileError

__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "ScheduleFile", "dumps_schedule_file", "loads_schedule_file",
    "read_schedule_file", "write_schedule_file",
]

FORMAT_NAME = "rematc-schedule"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ScheduleFile:
    """The contents of a schedule file.

    Attributes:
        graph_hash: :func:`rematc.graph_hash.graph_hash` of the joint graph the plan is for.
        device: device kind (``"cpu"``, ``"cuda"``).
        budget_bytes: the budget the plan was made for, in bytes.
        budget_given: the budget as the user gave it (``"0.4"``, ``"512MiB"``).
        budget_key: the canonical budget used in cache keys (``"fraction-0.4"``, ``"bytes-1000"``).
        method: the solver method asked for.
        profile: the profiler mode (``"analytic"`` or ``"measure"``).
        graph: the lowered IR, costs included.
        schedule: the plan on ``graph``.
        predicted_peak_bytes: ``simulate(graph, schedule).peak_bytes``.
        predicted_time_ms: ``simulate(graph, schedule).time_ms``.
        baseline_peak_bytes: the predicted peak of the no-remat schedule.
        baseline_time_ms: the predicted time of the no-remat schedule.
        blocks: per-block choices of a block-based planner, one JSON object a
            block, e.g. ``{"block": 3, "option": 2, "kept_bytes": 65536,
            "time_ms": 1.5}`` (free-form: ``rematc show`` prints every key);
            empty for whole-graph plans.
        device_name: the device model and settings the costs were measured on.
        rematc_version: the rematc that wrote the file.
        torch_version: the torch that captured the graph.
        created_utc: when the file was written (ISO 8601).
        planner_fingerprint: digest of the planning code that made it
            (``rematc.schedule_cache.planner_fingerprint``).
        measured_peak_bytes: the peak measured when ``Rockmate`` verified the
            plan on its sample (None: not verified).
        margin_bytes: how far below the budget the plan was solved, after a
            verification measured more than the prediction (0: none needed).
    """

    graph_hash: str
    device: str
    budget_bytes: int
    budget_given: str
    budget_key: str
    method: str
    profile: str
    graph: Graph
    schedule: Schedule
    predicted_peak_bytes: int
    predicted_time_ms: float
    baseline_peak_bytes: int
    baseline_time_ms: float
    blocks: tuple[Mapping[str, Any], ...] = ()
    device_name: str = ""
    rematc_version: str = ""
    torch_version: str = ""
    created_utc: str = ""
    planner_fingerprint: str = ""
    measured_peak_bytes: int | None = None
    margin_bytes: int = 0
    format_version: int = field(default=FORMAT_VERSION)


# -- writing -----------------------------------------------------------------------------
def dumps_schedule_file(sf: ScheduleFile) -> str:
    """The JSON text of ``sf``: one op, value or step a line, so that diffs and ``less`` work."""
    graph = sf.graph
    names = [v.name for v in graph.values]
    document = {
        "format": FORMAT_NAME,
        "format_version": sf.format_version,
        "rematc_version": sf.rematc_version,
        "torch_version": sf.torch_version,
        "created_utc": sf.created_utc,
        "graph_hash": sf.graph_hash,
        "device": sf.device,
        "budget": {"bytes": sf.budget_bytes, "given": sf.budget_given, "key": sf.budget_key},
        "predicted": {
            "peak_bytes": sf.predicted_peak_bytes,
            "time_ms": sf.predicted_time_ms,
            "no_remat_peak_bytes": sf.baseline_peak_bytes,
            "no_remat_time_ms": sf.baseline_time_ms,
        },
        "measured": {"peak_bytes": sf.measured_peak_bytes, "margin_bytes": sf.margin_bytes},
        "solver": {"method": sf.method, "planner_fingerprint": sf.planner_fingerprint},
        "profiler": {"mode": sf.profile, "device_name": sf.device_name},
        "blocks": [dict(b) for b in sf.blocks],
        "graph": {
            "values": [
                {"name": v.name, "bytes": v.bytes, "view_of": None if v.view_of is None else names[v.view_of]}
                for v in graph.values
            ],
            "ops": [_op_record(op, names) for op in graph.ops],
            "forward_outputs": [names[v] for v in graph.forward_outputs],
            "required_at_end": [names[v] for v in graph.required_at_end],
        },
        "steps": {
            "forward": [_step_text(s, graph) for s in sf.schedule.forward],
            "backward": [_step_text(s, graph) for s in sf.schedule.backward],
        },
    }
    return _format_json(document) + "\n"


def write_schedule_file(path: str | os.PathLike[str], sf: ScheduleFile) -> Path:
    """Write ``sf`` to ``path`` atomically (see NOTE: [Atomic writes]); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = dumps_schedule_file(sf)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())  # the rename must not land before the bytes do
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a cache file is not a secret
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _op_record(op: Op, names: list[str]) -> dict[str, Any]:
    record: dict[str, Any] = {
        "name": op.name,
        "inputs": [names[v] for v in op.inputs],
        "outputs": [names[v] for v in op.outputs],
        "time_ms": op.time_ms,
        "workspace_bytes": op.workspace_bytes,
    }
    # Flags only when they differ from the common case, to keep lines short.
    if op.is_backward:
        record["backward"] = True
    if not op.recomputable:
        record["recomputable"] = False
    if op.is_input:
        record["input"] = True
    return record


def _step_text(step: Step, graph: Graph) -> str:
    if step.kind == "compute":
        return f"compute {graph.ops[step.index].name}"
    return f"free {graph.values[step.index].name}"


def _format_json(obj: Any, indent: int = 0) -> str:
    """JSON with containers of scalars on one line and everything else expanded."""
    if _is_flat(obj):
        return json.dumps(obj, separators=(", ", ": "))
    inner = " " * (indent + 2)
    if isinstance(obj, dict):
        body = ",\n".join(f"{inner}{json.dumps(k)}: {_format_json(v, indent + 2)}" for k, v in obj.items())
        return "{\n" + body + "\n" + " " * indent + "}"
    body = ",\n".join(f"{inner}{_format_json(v, indent + 2)}" for v in obj)
    return "[\n" + body + "\n" + " " * indent + "]"


def _is_flat(obj: Any, depth: int = 0) -> bool:
    # Short rows (an op, a value, the budget) stay on one line; long lists (steps) get one item a line.
    if not isinstance(obj, (dict, list)) or not obj:
        return True
    if depth >= 2:
        return False
    items = obj.values() if isinstance(obj, dict) else obj
    return all(_is_flat(item, depth + 1) for item in items) and len(json.dumps(obj)) <= _ROW_CHARS


_ROW_CHARS = 200


# -- reading -----------------------------------------------------------------------------
def read_schedule_file(path: str | os.PathLike[str]) -> ScheduleFile:
    """Read and validate a schedule file.

    Raises:
        ScheduleFileError: the file is missing, unreadable, not JSON (corrupt
            or truncated), not a rematc schedule, of an unknown format
            version, or internally inconsistent. The message says which.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScheduleFileError(path, "no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ScheduleFileError(path, f"cannot be read: {error}") from error
    return loads_schedule_file(text, source=path)


def loads_schedule_file(text: str, source: object = "<string>") -> ScheduleFile:
    """Parse and validate the text of a schedule file (see :func:`read_schedule_file`)."""
    try:
        document = json.loads(text)
    except ValueError as error:
        raise ScheduleFileError(
            source, f"not valid JSON (corrupt or truncated; {error}); delete it or plan again"
        ) from None
    if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
        found = document.get("format") if isinstance(document, dict) else type(document).__name__
        raise ScheduleFileError(
            source, f"not a rematc schedule file (format {found!r}, expected {FORMAT_NAME!r})",
            expected=FORMAT_NAME, found=found,
        )
    version = document.get("format_version")
    if version != FORMAT_VERSION:
        raise ScheduleFileError(
            source,
            f"format version {version!r} is not supported: this rematc reads version {FORMAT_VERSION} "
            f"(the file was written by rematc {document.get('rematc_version', '?')}); plan again to rewrite it",
            expected=FORMAT_VERSION, found=version,
        )
    try:
        sf = _from_document(document)
    except ScheduleFileError as error:
        raise ScheduleFileError(source, error.reason, error.expected, error.found) from None
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as error:
        detail = f"missing field {error}" if isinstance(error, KeyError) else str(error)
        raise ScheduleFileError(source, f"malformed ({detail}); plan again to rewrite it") from None
    _check_consistent(sf, source)
    return sf


def _from_document(document: dict[str, Any]) -> ScheduleFile:
    graph = _graph_from_record(document["graph"])
    schedule = _schedule_from_record(document["steps"], graph)
    budget, predicted = document["budget"], document["predicted"]
    measured = document.get("measured") or {}  # absent in files written before verification existed
    measured_peak = measured.get("peak_bytes")
    blocks = document.get("blocks") or []
    if not isinstance(blocks, list) or not all(isinstance(b, dict) for b in blocks):
        raise ValueError("'blocks' must be a list of objects")
    return ScheduleFile(
        graph_hash=_typed(document["graph_hash"], str, "graph_hash"),
        device=_typed(document["device"], str, "device"),
        budget_bytes=_typed(budget["bytes"], int, "budget.bytes"),
        budget_given=str(budget.get("given", "")),
        budget_key=_typed(budget["key"], str, "budget.key"),
        method=_typed(document["solver"]["method"], str, "solver.method"),
        profile=_typed(document["profiler"]["mode"], str, "profiler.mode"),
        graph=graph,
        schedule=schedule,
        predicted_peak_bytes=_typed(predicted["peak_bytes"], int, "predicted.peak_bytes"),
        predicted_time_ms=float(predicted["time_ms"]),
        baseline_peak_bytes=_typed(predicted["no_remat_peak_bytes"], int, "predicted.no_remat_peak_bytes"),
        baseline_time_ms=float(predicted["no_remat_time_ms"]),
        blocks=tuple(blocks),
        device_name=str(document["profiler"].get("device_name", "")),
        rematc_version=str(document.get("rematc_version", "")),
        torch_version=str(document.get("torch_version", "")),
        created_utc=str(document.get("created_utc", "")),
        planner_fingerprint=str(document["solver"].get("planner_fingerprint", "")),
        measured_peak_bytes=None if measured_peak is None else _typed(measured_peak, int, "measured.peak_bytes"),
        margin_bytes=_typed(measured.get("margin_bytes", 0), int, "measured.margin_bytes"),
        format_version=document["format_version"],
    )


def _typed(value: Any, kind: type, name: str) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"field {name!r} must be {kind.__name__}, got {value!r}")
    return value


def _graph_from_record(record: dict[str, Any]) -> Graph:
    value_records = record["values"]
    index_of = {}
    for i, v in enumerate(value_records):
        if v["name"] in index_of:
            raise ValueError(f"value name {v['name']!r} appears twice")
        index_of[v["name"]] = i

    def value_index(name: str) -> int:
        if name not in index_of:
            raise ValueError(f"unknown value {name!r}")
        return index_of[name]

    producer: dict[int, int] = {}
    ops = []
    for i, o in enumerate(record["ops"]):
        outputs = tuple(value_index(n) for n in o["outputs"])
        producer.update((v, i) for v in outputs)
        ops.append(Op(
            _typed(o["name"], str, "op name"),
            tuple(value_index(n) for n in o["inputs"]),
            outputs,
            float(o["time_ms"]),
            _typed(o["workspace_bytes"], int, "workspace_bytes"),
            is_backward=bool(o.get("backward", False)),
            recomputable=bool(o.get("recomputable", True)),
            is_input=bool(o.get("input", False)),
        ))
    values = tuple(
        Value(
            _typed(v["name"], str, "value name"), _typed(v["bytes"], int, "bytes"), producer.get(i),
            None if v.get("view_of") is None else value_index(v["view_of"]),
        )
        for i, v in enumerate(value_records)
    )
    try:
        return Graph(
            tuple(ops), values,
            tuple(value_index(n) for n in record["forward_outputs"]),
            tuple(value_index(n) for n in record["required_at_end"]),
        )
    except GraphError as error:
        raise ScheduleFileError("", f"its graph is not a valid IR ({error}); plan again to rewrite it") from None


def _schedule_from_record(record: dict[str, Any], graph: Graph) -> Schedule:
    op_index = {op.name: i for i, op in enumerate(graph.ops)}
    value_index = {v.name: i for i, v in enumerate(graph.values)}

    def parse(text: str) -> Step:
        kind, _, name = _typed(text, str, "step").partition(" ")
        table = {"compute": op_index, "free": value_index}.get(kind)
        if table is None or name not in table:
            raise ValueError(f"bad step {text!r} (expected 'compute OP' or 'free VALUE' of the file's graph)")
        return Step(kind, table[name])  # type: ignore[arg-type]

    return Schedule(tuple(map(parse, record["forward"])), tuple(map(parse, record["backward"])))


def _check_consistent(sf: ScheduleFile, source: object) -> None:
    """The steps run on the graph and simulate to the stored figures: nothing was edited out of sync."""
    try:
        check(sf.graph, sf.schedule)
    except ScheduleError as error:
        raise ScheduleFileError(source, f"its steps do not run on its graph: {error}") from None
    predicted = simulate(sf.graph, sf.schedule, validate=False)
    if predicted.peak_bytes != sf.predicted_peak_bytes:
        raise ScheduleFileError(
            source, f"inconsistent: its steps simulate to a peak of {predicted.peak_bytes} bytes but it "
            f"records {sf.predicted_peak_bytes}", expected=predicted.peak_bytes, found=sf.predicted_peak_bytes,
        )
    if not math.isclose(predicted.time_ms, sf.predicted_time_ms, rel_tol=1e-9, abs_tol=1e-12):
        raise ScheduleFileError(
            source, f"inconsistent: its steps simulate to {predicted.time_ms} ms but it records "
            f"{sf.predicted_time_ms} ms", expected=predicted.time_ms, found=sf.predicted_time_ms,
        )
    if predicted.peak_bytes > sf.budget_bytes:
        raise ScheduleFileError(
            source, f"inconsistent: its peak of {predicted.peak_bytes} bytes exceeds its own budget of "
            f"{sf.budget_bytes} bytes", expected=sf.budget_bytes, found=predicted.peak_bytes,
        )
