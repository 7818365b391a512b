"""The package's layout holds: a small shared base in ``dss/`` and wings by stage, every import
arrow pointing the way the wings' docstrings say, and no import circle anywhere (type-only and
function-level imports included: a circle read by a newcomer is a circle however it is spelt).

Reads the source with ``ast``; imports nothing of the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "dss"
# What each wing may import besides itself (the base, ``dss/*.py``, is open to every wing).
ALLOWED = {
    "base": set(),
    "data": set(),
    "ingest": {"data"},
    "models": {"data"},
    "predict": {"data", "models"},
    "train": {"data", "models", "predict"},
    "demo": set(),
}
MAX_BASE_MODULES = 8


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def wing_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()) else "base"


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The package modules ``path`` imports, wherever the import statement stands."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name in known}


def graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    known = {module_name(path) for path in paths}
    # A package's own __init__ is not an arrow worth counting: ``from dss.train import x`` names x.
    return {module_name(path): imports_of(path, known) - {"dss"} - {module_name(path)} for path in paths}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_circle_anywhere_in_the_package():
    edges = {node: {target for target in targets if not target.endswith("__init__")} for node, targets in graph().items()}
    packages = {node for node in edges if (REPO_ROOT / node.replace(".", "/")).is_dir()}
    edges = {node: targets - packages for node, targets in edges.items() if node not in packages}
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def test_every_arrow_runs_the_way_its_wing_allows():
    wrong = []
    for node, targets in graph().items():
        wing = wing_of(node)
        for target in targets:
            other = wing_of(target)
            if other not in ("base", wing) and other not in ALLOWED[wing]:
                wrong.append(f"{node} ({wing}) imports {target} ({other})")
            if wing == "base" and other != "base":
                wrong.append(f"{node} (base) imports {target} ({other})")
    assert not wrong, "\n".join(wrong)


def test_the_base_is_small_and_every_wing_says_what_it_owns_and_may_import():
    base = [path for path in PACKAGE.glob("*.py") if path.name != "__init__.py"]
    assert len(base) <= MAX_BASE_MODULES, sorted(path.name for path in base)
    for wing in ALLOWED:
        if wing == "base":
            continue
        doc = ast.get_docstring(ast.parse((PACKAGE / wing / "__init__.py").read_text(encoding="utf-8"))) or ""
        assert "Owns" in doc and "May import" in doc, wing
