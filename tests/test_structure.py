"""The package layout: no import cycles (lazy imports included), inference apart from training, the public API."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import lageo_utils

PACKAGE_DIR = Path(lageo_utils.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE_DIR.rglob("*.py")}


def imports_of(module: str) -> set[str]:
    """The package's modules that ``module`` imports anywhere in its source (function bodies too)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in MODULES}
    # A module's own parent packages are imported before it; that is no edge of its own making.
    return {name for name in found if not module.startswith(name + ".") and name != module}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_import_graph_sees_lazy_imports():
    assert "lageo_utils.predict" in imports_of("lageo_utils.cli.predict")  # imported inside a function
    assert "lageo_utils.steps" in imports_of("lageo_utils.pipeline")


def test_no_import_cycles_anywhere_in_the_package():
    graph = {module: imports_of(module) for module in MODULES}
    assert find_cycles(graph) == []


def test_training_imports_inference_never_the_reverse():
    graph = {module: imports_of(module) for module in MODULES}

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    assert not {m for m in reachable("lageo_utils.predict") if m.startswith("lageo_utils.training")}
    assert "lageo_utils.predict" in reachable("lageo_utils.training.loop")


def test_importing_predict_loads_no_training_module():
    code = ("import lageo_utils.predict, sys; "
            "print(sorted(m for m in sys.modules if m.startswith('lageo_utils')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "lageo_utils.predict" in loaded and "training" not in loaded and "finetune" not in loaded


def test_public_api_names_resolve():
    for name in lageo_utils.__all__:
        assert getattr(lageo_utils, name) is not None
    assert lageo_utils.train.__module__ == "lageo_utils.training.loop"
    assert lageo_utils.load_predictor.__module__ == "lageo_utils.predict"
