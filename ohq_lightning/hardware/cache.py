"""On-disk cache of measured operation timings, keyed by device fingerprint and layer signature."""

from __future__ import annotations

import hashlib
import json
import math
import platform
import warnings
from pathlib import Path
from typing import Any

from ohq_lightning._util.cache import atomic_write
from ohq_lightning._util.timing import Timing

__all__ = ["TimingCache", "cpu_model_name"]

_FORMAT = "ohq-timing-cache-v1"


def cpu_model_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _usable(timing: Timing) -> bool:
    """A timing a cost can rest on: its median is a finite number of milliseconds (or millijoules) above 0."""
    median = timing.median_ms
    return isinstance(median, int | float) and not isinstance(median, bool) and math.isfinite(median) and median > 0


class TimingCache:
    """Measured timings of one device configuration, persisted as one JSON file.

    The file name is a hash of ``fingerprint`` (CPU or GPU model, runtime and versions, threads),
    so each configuration has its own file; entries are keyed by operation (a layer signature
    plus the kernel it ran). Writes are atomic (temporary file, then rename). A file that
    cannot be read, or that holds a timing whose median is not a finite number > 0 (NaN, 0 or
    infinity: a broken or hand-edited file, never a measurement), is rebuilt with a warning
    rather than trusted; a directory that cannot be written keeps the cache in memory with a
    warning.

    Example:
        >>> import tempfile
        >>> cache = TimingCache(tempfile.mkdtemp(), {"cpu": "x", "threads": 1})
        >>> cache.get("conv|fp32") is None
        True
    """

    def __init__(self, directory: str | Path | None, fingerprint: dict[str, Any]) -> None:
        self.fingerprint = dict(fingerprint)
        key = json.dumps(self.fingerprint, sort_keys=True)
        name = f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"
        self.path = None if directory is None else Path(directory) / name
        self._entries: dict[str, Timing] = {}
        self._writable = self.path is not None
        if self.path is not None and self.path.exists():
            self._load()

    def _load(self) -> None:
        assert self.path is not None
        try:
            data = json.loads(self.path.read_text())
            if data.get("format") != _FORMAT or data.get("fingerprint") != self.fingerprint:
                raise ValueError("format or fingerprint does not match")
            entries = {key: Timing(**value) for key, value in data["entries"].items()}
            bad = [key for key, timing in entries.items() if not _usable(timing)]
            if bad:
                raise ValueError(f"{len(bad)} timing(s) without a finite median > 0, e.g. {bad[0]!r}")
            self._entries = entries
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
            warnings.warn(f"timing cache {self.path} is unreadable or invalid ({error}); rebuilding it", stacklevel=3)
            self._entries = {}

    def get(self, key: str) -> Timing | None:
        """The cached timing of one operation, or None."""
        return self._entries.get(key)

    def put(self, key: str, timing: Timing) -> None:
        """Remember one timing (call :meth:`save` to persist)."""
        self._entries[key] = timing

    def clear(self) -> None:
        """Forget every timing (call :meth:`save` to persist): for a caller that finds the entries inconsistent."""
        self._entries = {}

    def __len__(self) -> int:
        return len(self._entries)

    def save(self) -> None:
        """Write the cache atomically; on an unwritable directory warn once and keep it in memory."""
        if self.path is None or not self._writable:
            return
        payload = {
            "format": _FORMAT,
            "fingerprint": self.fingerprint,
            "entries": {key: timing.to_dict() for key, timing in sorted(self._entries.items())},
        }
        try:
            atomic_write(self.path, lambda stream: json.dump(payload, stream, indent=1))
        except OSError as error:
            self._writable = False
            warnings.warn(
                f"cannot write the timing cache to {self.path.parent} ({error}); keeping measurements in memory only",
                stacklevel=2,
            )
