"""The house rules of docs/architecture.md that import-linter does not check, checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "ohq_lightning"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60  # the body after the docstring
# imports of our own modules that may stay inside a function, and why
DEFERRED_IMPORTS = {
    ("__init__.py", "ohq_lightning.lightning"): "importing lightning costs seconds; only OHQCallback users pay it",
}


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _own(module: str | None) -> bool:
    return module is not None and (module == "ohq_lightning" or module.startswith("ohq_lightning."))


@pytest.mark.parametrize("path", _modules(), ids=lambda path: str(path.relative_to(PACKAGE)))
def test_no_module_is_longer_than_a_room(path: Path) -> None:
    assert len(path.read_text().splitlines()) <= MAX_MODULE_LINES


def test_no_function_is_longer_than_a_screen() -> None:
    long = []
    for path in _modules():
        for node in ast.walk(_tree(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body[1:] if ast.get_docstring(node) is not None else node.body
                if body and body[-1].end_lineno - body[0].lineno + 1 > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.name}")
    assert long == []


def test_our_modules_are_imported_at_the_top_of_a_module() -> None:
    inside = []
    for path in _modules():
        for function in ast.walk(_tree(path)):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                names = []
                if isinstance(node, ast.ImportFrom):
                    names = [node.module] if node.level == 0 else ["ohq_lightning (relative)"]
                elif isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                for name in names:
                    key = (str(path.relative_to(PACKAGE)), name)
                    if (_own(name) or "relative" in str(name)) and key not in DEFERRED_IMPORTS:
                        inside.append(f"{key[0]}:{function.name} imports {name}")
    assert inside == []


def test_no_private_name_is_imported_from_another_module() -> None:
    crossing = []
    for path in _modules():
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.ImportFrom) and _own(node.module):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                crossing += [f"{path.relative_to(PACKAGE)} imports {node.module}.{name}" for name in private]
    assert crossing == []


def test_every_package_ships_in_the_wheel() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    listed = set(tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {".".join(init.parent.relative_to(PACKAGE.parent).parts) for init in PACKAGE.rglob("__init__.py")}
    assert packages - listed == set()
