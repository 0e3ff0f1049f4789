"""The house rules of docs/ARCHITECTURE.md, checked on the source tree: imports only go down the rooms,
siblings (fanout, diffusion) do not import each other, and no module grows past ~600 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "python" / "r4t_fast"

# room -> floor; a module may import its own room and any lower floor
FLOORS = {
    "_internal": 0,
    "_threads": 0,
    "_config": 0,
    "_C": 0,
    "_version": 0,
    "kernels": 1,
    "data": 2,
    "objectives": 3,
    "fanout": 4,
    "diffusion": 4,
    "eval": 5,
    "train": 6,
    "pipeline_presets": 7,
    "pipeline": 8,
    "serve": 9,
    "cli": 10,
}
# deliberate exceptions, each with its reason
ALLOWED_UP = {
    # deprecated 0.1 names (LLMFanOutBaseline, ...) resolved lazily on attribute access, for one release
    ("fanout/__init__.py", "eval"),
}
MAX_LINES = 640  # "~600": a little slack, no more


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "r4t_fast" else ""


def _modules() -> list[Path]:
    return sorted(
        p for p in PKG.rglob("*.py") if p.name not in ("_compat.py",) and p.parent.name != "__pycache__"
    )


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "r4t_fast":
                out.update(f"r4t_fast.{a.name}" for a in node.names)
            elif node.module.startswith("r4t_fast."):
                out.add(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(
                f"{path.relative_to(PKG)}: relative import (use absolute r4t_fast.* imports)"
            )
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("r4t_fast"))
    return out


def _own_room(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_imports_only_go_down(path: Path) -> None:
    rel = str(path.relative_to(PKG))
    own = _own_room(path)
    if own == "__init__":  # the top-level package: lazy public names only
        return
    assert own in FLOORS, f"{rel}: room {own!r} is not in docs/ARCHITECTURE.md (FLOORS)"
    for mod in _imports(path):
        room = _room(mod)
        if room == own or (rel, room) in ALLOWED_UP:
            continue
        if room == "":
            raise AssertionError(f"{rel}: imports the top-level package ({mod}); import the module instead")
        assert room in FLOORS, f"{rel}: imports {mod}, whose room {room!r} is unknown"
        assert FLOORS[room] < FLOORS[own], (
            f"{rel} (room {own!r}, floor {FLOORS[own]}) imports {mod} (room {room!r}, floor {FLOORS[room]}):"
            " imports must only go down"
        )


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_module_size(path: Path) -> None:
    n = len(path.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(PKG)}: {n} lines (house rule: at most ~600); split it"


def test_architecture_doc_names_every_module() -> None:
    doc = (PKG.parents[1] / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    for path in _modules():
        if path.name == "__init__.py":
            continue
        assert f"`{path.stem}`" in doc or f"{path.stem}.py" in doc, (
            f"docs/ARCHITECTURE.md does not mention {path.relative_to(PKG)}"
        )
