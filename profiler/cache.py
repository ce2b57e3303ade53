"""A persistent cache of per-op profiles, keyed by op signature and device name.

A second run of the same model, or of a model sharing layer shapes, does not
measure again. Besides the per-op entries it keeps each graph's calibrated
per-op overhead (:func:`profiler.measure.calibrate_overhead`), keyed by a
fingerprint of the graph, so a second run of the same graph runs nothing.
The file is JSON (human-readable) and written atomically
(temporary file + ``os.replace``), so two processes starting together never
leave a torn file; a corrupt file is ignored (and rewritten), never fatal.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path

import torch

# 2: per-op times taken outside the partitioner's Python dispatch (NOTE:
# [Profiling inside the partitioner] in profiler/measure.py; version 1 times
# include it) and calibrated per-graph overheads. Older files are ignored.
FORMAT_VERSION = 2


def default_cache_dir() -> Path:
    """``$REMATC_CACHE_DIR`` or ``~/.cache/rematc``."""
    return Path(os.environ.get("REMATC_CACHE_DIR") or Path.home() / ".cache" / "rematc")


def device_name(device: torch.device) -> str:
    """What the measurements depend on: the device model, threads, torch version."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}|torch {torch.__version__}"
    return f"cpu:{platform.processor() or platform.machine()}|threads {torch.get_num_threads()}|torch {torch.__version__}"


class ProfileCache:
    """``{device name: {op signature: [time_ms, workspace_bytes]}}`` on disk.

    Calibrated overheads live beside them as ``{device name: {graph key:
    overhead_ms}}`` (the file's ``"overheads"`` entry). ``hits`` and
    ``misses`` count both kinds of lookup.

    Args:
        path: the JSON file; ``None`` keeps the cache in memory only.
    """

    def __init__(self, path: Path | str | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._entries: dict[str, dict[str, list[float]]] = {}
        self._overheads: dict[str, dict[str, float]] = {}
        self.hits = 0
        self.misses = 0
        if self.path is not None and self.path.exists():
            try:
                data = json.loads(self.path.read_text())
                if data.get("format_version") == FORMAT_VERSION:
                    self._entries = {k: dict(v) for k, v in data["devices"].items()}
                    self._overheads = {
                        k: {key: float(ms) for key, ms in v.items()} for k, v in data.get("overheads", {}).items()
                    }
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                self._entries, self._overheads = {}, {}  # corrupt: start over, rewritten on save

    def get(self, device: str, signature: str) -> tuple[float, int] | None:
        entry = self._entries.get(device, {}).get(signature)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        return float(entry[0]), int(entry[1])

    def put(self, device: str, signature: str, time_ms: float, workspace_bytes: int) -> None:
        self._entries.setdefault(device, {})[signature] = [time_ms, workspace_bytes]

    def get_overhead(self, device: str, graph_key: str) -> float | None:
        """The calibrated per-op overhead (ms) of a graph, or None if never calibrated here."""
        overhead = self._overheads.get(device, {}).get(graph_key)
        if overhead is None:
            self.misses += 1
            return None
        self.hits += 1
        return float(overhead)

    def put_overhead(self, device: str, graph_key: str, overhead_ms: float) -> None:
        self._overheads.setdefault(device, {})[graph_key] = overhead_ms

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = json.dumps(
            {"format_version": FORMAT_VERSION, "devices": self._entries, "overheads": self._overheads},
            indent=1, sort_keys=True,
        )
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".profiles-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(payload)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
