"""A persistent cache of per-op profiles, keyed by op signature and device name.

A second run of the same model, or of a model sharing layer shapes, does not
measure again. The file is JSON (human-readable) and written atomically
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

FORMAT_VERSION = 1


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

    Args:
        path: the JSON file; ``None`` keeps the cache in memory only.
    """

    def __init__(self, path: Path | str | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._entries: dict[str, dict[str, list[float]]] = {}
        self.hits = 0
        self.misses = 0
        if self.path is not None and self.path.exists():
            try:
                data = json.loads(self.path.read_text())
                if data.get("format_version") == FORMAT_VERSION:
                    self._entries = {k: dict(v) for k, v in data["devices"].items()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                self._entries = {}  # corrupt: start over, rewritten on save

    def get(self, device: str, signature: str) -> tuple[float, int] | None:
        entry = self._entries.get(device, {}).get(signature)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        return float(entry[0]), int(entry[1])

    def put(self, device: str, signature: str, time_ms: float, workspace_bytes: int) -> None:
        self._entries.setdefault(device, {})[signature] = [time_ms, workspace_bytes]

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = json.dumps({"format_version": FORMAT_VERSION, "devices": self._entries}, indent=1, sort_keys=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".profiles-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(payload)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
