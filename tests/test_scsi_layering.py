"""The SCSI layer's import structure (issue 9): imports run one way, none inside
functions, nothing of config/iscsi/server/rest, and no file descriptor use above the
backstores."""

from __future__ import annotations

import ast
from pathlib import Path

import pyscsi_target

ROOT = Path(pyscsi_target.__file__).parent
PACKAGES = ("scsi", "backstore")


def _modules() -> dict[str, ast.Module]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).glob("*.py")):
            out[f"pyscsi_target.{pkg}.{path.stem}"] = ast.parse(path.read_text(), str(path))
    return out


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _runtime_imports(tree: ast.Module) -> set[str]:
    """Modules imported when the module runs (``if TYPE_CHECKING:`` blocks excluded)."""
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and _is_type_checking(node):
            continue
        for sub in ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) else ():
            if isinstance(sub, ast.Import):
                names.update(a.name for a in sub.names)
            elif isinstance(sub, ast.ImportFrom) and sub.module:
                names.add(sub.module)
                names.update(f"{sub.module}.{a.name}" for a in sub.names)
    return names


def test_no_imports_inside_functions() -> None:
    offenders = []
    for name, tree in _modules().items():
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for sub in ast.walk(fn):
                    if isinstance(sub, (ast.Import, ast.ImportFrom)):
                        offenders.append(f"{name}:{sub.lineno}")
    assert not offenders, offenders


def test_scsi_layer_imports_no_upper_layer() -> None:
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                mods = [node.module]
            elif isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            else:
                continue
            for mod in mods:
                for upper in ("config", "iscsi", "server", "rest"):
                    assert not mod.startswith((f"pyscsi_target.{upper}", upper)), f"{name} imports {mod}"


def test_runtime_imports_form_no_cycle() -> None:
    modules = _modules()
    graph = {name: {m for m in _runtime_imports(tree) if m in modules and m != name}
             for name, tree in modules.items()}
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path, node, nxt]))
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [])
    # the transport contract sits at the bottom
    assert graph["pyscsi_target.scsi.task"] == set()


def test_scsi_layer_never_touches_a_file_descriptor() -> None:
    """The LU and the command handlers reach storage through the Backstore interface only
    (an RBD image has no descriptor)."""
    for name, tree in _modules().items():
        if not name.startswith("pyscsi_target.scsi."):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                assert node.attr not in ("fd", "fstat"), f"{name}:{node.lineno} uses .{node.attr}"
