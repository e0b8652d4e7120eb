"""Where caches live on disk, and the one atomic write every cache and export uses."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

__all__ = ["atomic_write", "cache_root", "default_cache_dir"]


def default_cache_dir() -> Path:
    """``$OHQ_CACHE_DIR``, else ``~/.cache/ohq_lightning``."""
    env = os.environ.get("OHQ_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "ohq_lightning"


def cache_root(cache_dir: str | Path | bool | None) -> Path | None:
    """Where a cache lives: ``None``/``True`` -> :func:`default_cache_dir`, ``False`` -> no disk cache."""
    if cache_dir is False:
        return None
    return default_cache_dir() if cache_dir in (None, True) else Path(cache_dir)  # type: ignore[arg-type]


def atomic_write(path: Path, write: Callable[[IO[str]], None]) -> None:
    """Write text through ``write`` into a temporary file beside ``path``, then move it over ``path``.

    A reader never sees a half-written file: if ``write`` (or the disk) fails, the file at ``path``
    is left as it was and the temporary file is removed. An existing file keeps its permissions.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temp, mode)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
