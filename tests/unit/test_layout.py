"""The package layout stays what docs/architecture.md says: modules under 500 lines and
functions under 80, no import cycle between modules or between subfolders (module-level
imports; the root package is the hub every folder may use), and the core never naming a
framework's module (it asks mtckpt.frameworks)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = SRC / "mtckpt"
# The adapters and the public modules that re-export them may name their frameworks; so
# may export.py (torch.save and DCP as export formats).
FACES = {"torch.py", "jax.py", "export.py", "orbax.py"}


def modules() -> dict[str, tuple[Path, str]]:
    """Dotted name -> (path, package) of every hand-written module."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        if path.name.endswith("_pb2.py") or path.name.endswith("_pb2_grpc.py"):
            continue
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
            package = ".".join(parts)
        else:
            package = ".".join(parts[:-1])
        found[".".join(parts)] = (path, package)
    return found


def absolute(node: ast.ImportFrom, package: str) -> str:
    """The module a ``from ... import`` statement in ``package`` imports from."""
    if not node.level:
        return node.module or ""
    parts = package.split(".")
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def imports(path: Path, package: str, known: dict) -> set[str]:
    """The modules ``path`` imports at module level (not under TYPE_CHECKING)."""
    out = set()
    for node in ast.parse(path.read_text()).body:
        if not isinstance(node, ast.ImportFrom):
            continue
        base = absolute(node, package)
        for alias in node.names:
            full = f"{base}.{alias.name}"
            out.add(full if full in known else base)
    return out & set(known)


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph``, or None."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def folder(name: str) -> str:
    parts = name.split(".")
    if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()):
        return parts[1]
    return "(root)"


def test_no_import_cycle_between_modules_or_subfolders():
    known = modules()
    graph = {name: imports(path, pkg, known) - {name} for name, (path, pkg) in known.items()}
    assert cycle(graph) is None
    folders: dict[str, set[str]] = {}
    for name, targets in graph.items():
        for target in targets:
            a, b = folder(name), folder(target)
            if a != b and "(root)" not in (a, b):
                folders.setdefault(a, set()).add(b)
    assert cycle(folders) is None


@pytest.mark.parametrize("path", sorted(modules().values()), ids=str)
def test_modules_and_functions_are_short(path):
    path = path[0]
    text = path.read_text()
    assert len(text.splitlines()) <= 500, f"{path.relative_to(SRC)}: split it by concept"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            assert length <= 80, f"{path.relative_to(SRC)}: {node.name} is {length} lines"


def test_the_core_names_no_framework_module():
    """Only the adapters name torch or jax; the rest asks mtckpt.frameworks' table."""
    known = modules()
    framework_modules = {"mtckpt.torch", "mtckpt.jax"} | {
        name for name in known if name.startswith("mtckpt.adapters.")
    }
    for name, (path, package) in known.items():
        top = path.relative_to(PACKAGE).parts
        if top[0] in ("adapters", "integrations") or (len(top) == 1 and top[0] in FACES):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = absolute(node, package)
                names = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for imported in names:
                assert imported.split(".")[0] not in ("torch", "jax", "jaxlib"), (name, imported)
                assert imported not in framework_modules, (name, imported)
