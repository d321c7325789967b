"""The package's layers, read from its import graph: a lower layer never imports an upper one.

    errors, defaults, names, registry, atomic  <  core  <  io  <  train  <  applications  <  cli

Lazy imports inside functions count too, so an import circle cannot come back hidden in a body.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dacnn_convert"
BASE, CORE, IO, TRAIN, APPS, CLI = range(6)
LAYER_NAMES = ["errors/defaults", "core", "io", "train", "applications", "cli"]


def layer_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    layers = {
        "errors": BASE,
        "defaults": BASE,
        "registry": BASE,
        "atomic": BASE,
        "validate": BASE,
        "names": BASE,
        "amounts": BASE,
        "core": CORE,
        "io": IO,
        "train": TRAIN,
        "cli": CLI,
    }
    return layers.get(top, APPS)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = sorted(PACKAGE.rglob("*.py"))
NAMES = {module_name(p) for p in MODULES}


def imports_of(path: Path) -> set[str]:
    """Every dacnn_convert module that ``path`` imports, at any depth of its body."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            if not target.startswith("dacnn_convert"):
                continue
            if node.module is None:  # from . import a: a submodule, or a name of the package itself
                found |= {f"{target}.{a.name}" if f"{target}.{a.name}" in NAMES else target for a in node.names}
            else:
                found.add(target)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("dacnn_convert")}
    return found


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_no_module_imports_a_layer_above_its_own(path: Path) -> None:
    own = layer_of(module_name(path))
    upward = sorted(m for m in imports_of(path) if m != "dacnn_convert" and layer_of(m) > own)
    assert not upward, f"{module_name(path)} ({LAYER_NAMES[own]}) imports {upward} from a higher layer"


def test_the_package_root_imports_no_cli_and_there_are_no_circles() -> None:
    graph = {module_name(p): {m for m in imports_of(p) if m != "dacnn_convert"} for p in MODULES}
    assert not any(layer_of(m) == CLI for m in graph["dacnn_convert"])
    # a package's __init__ importing its own submodules is not a circle; anything else is
    edges = {
        a: {b for b in deps if b in graph and not b.startswith(a + ".") and not a.startswith(b + ".")}
        for a, deps in graph.items()
    }
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join([*path[path.index(nxt) :], nxt]))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
