"""JSON round-trip for the plain-data dataclasses that travel between stages."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

__all__ = ["JsonMixin"]


class JsonMixin:
    """``to_dict``/``from_dict`` and ``to_json``/``from_json`` for a dataclass of plain fields.

    Example:
        >>> @dataclasses.dataclass
        ... class Point(JsonMixin):
        ...     x: int
        >>> Point.from_json(Point(3).to_json())
        Point(x=3)
    """

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (dicts, lists, numbers, strings)."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        """Inverse of :meth:`to_dict`."""
        return cls(**data)

    def to_json(self, path: str | Path | None = None) -> str:
        """Serialise to a JSON string; also write it to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=False)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> Any:
        """Read from a JSON string or from a path to a JSON file.

        Raises:
            ValueError: the text is not JSON, or not a JSON object of this class's fields; the
                message names the file (or says it was a string) and what is wrong.
        """
        if isinstance(text_or_path, Path) or not str(text_or_path).lstrip().startswith("{"):
            source = str(text_or_path)
            text = Path(text_or_path).read_text()
        else:
            source, text = "the JSON text given", str(text_or_path)
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise TypeError(f"expected a JSON object, found a {type(data).__name__}")
            return cls.from_dict(data)
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            raise ValueError(f"{source}: not a valid {cls.__name__} file ({type(error).__name__}: {error})") from error
