"""The package's layers import only downward, with no import cycles, and library code imports medssl modules at
module level (only the CLI defers them, to keep ``medssl --help`` fast). See docs/architecture.md."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "medssl"

#: bottom to top; a module may import its own group and the groups of lower layers only
LAYERS = [
    {"errors"},
    {"registry", "outputs"},
    {"rng", "dist", "config"},
    {"data"},
    {"transforms", "correspondence"},
    {"networks"},
    {"objectives", "metrics"},
    {"matching"},
    {"engine"},
    {"report"},
    {"cli"},
    {"__main__"},
]
LAYER = {group: index for index, groups in enumerate(LAYERS) for group in groups}
DEFERRED_ALLOWED = {"medssl.cli"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, list[tuple[str, bool]]]:
    """module -> [(imported medssl module, imported inside a function)]."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    found: dict[str, list[tuple[str, bool]]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deferred = {id(node) for function in ast.walk(tree)
                    if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
                    for node in ast.walk(function)}
        edges = []
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base])
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            edges += [(target.strip("."), id(node) in deferred) for target in targets
                      if target.startswith("medssl") and target.strip(".") != "medssl"]
        found[name] = edges
    return found


def _group(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def test_layers_import_only_downward():
    upward = [f"{module} -> {target}" for module, edges in _imports().items() for target, _ in edges
              if _group(module) and _group(target) != _group(module)
              and LAYER[_group(target)] >= LAYER[_group(module)]]
    assert not upward, upward
    assert set(LAYER) >= {_group(module) for module in _imports() if _group(module)}, "a new module needs a layer"


def test_no_import_cycles():
    graph = {module: {target for target, _ in edges} for module, edges in _imports().items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target] if target in path else [module, target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


def test_library_code_imports_medssl_at_module_level():
    deferred = sorted(f"{module} -> {target}" for module, edges in _imports().items() for target, inside in edges
                      if inside and module not in DEFERRED_ALLOWED)
    assert not deferred, deferred
