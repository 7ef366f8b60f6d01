"""The package's layers, as the folders show them: imports point down only, no cycles.

Every ``import`` / ``from ... import`` of a ``redblue`` module anywhere in ``src/redblue``
(module level or inside a function) is read with :mod:`ast`; the test fails on a cycle,
on a module importing a higher layer, and on a ``redblue`` import inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import redblue

PACKAGE = Path(redblue.__file__).resolve().parent

LAYERS: list[tuple[str, ...]] = [
    # 0: shared helpers
    ("redblue._version", "redblue.errors", "redblue.validate", "redblue.utils"),
    # 1: pure algorithms and file formats
    ("redblue.data", "redblue.models", "redblue.onnx_graph", "redblue.attacks", "redblue.poison", "redblue.scan", "redblue.verify"),
    # 2: configuration, training loop, artifacts, metrics, typed results
    ("redblue.config", "redblue.precision", "redblue.train", "redblue.artifacts", "redblue.model_sources", "redblue.cache", "redblue.metrics", "redblue.results"),
    # 3: evaluation with its sanity checks; training recipes and backdoor detectors
    ("redblue.evaluation", "redblue.defenses"),
    # 4: the stages; the report (rendered from JSON, never from a stage)
    ("redblue.stages", "redblue.report"),
    # 5: the workflow
    ("redblue.pipeline", "redblue.sweep"),
    # 6: the command line and the lazy top-level API
    ("redblue.cli", "redblue.__main__", "redblue"),
]
"""Layer of every module, bottom first; a module is in the layer of its longest prefix
(``redblue`` itself names only the package's ``__init__``, the lazy top-level API)."""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _layer(module: str) -> int:
    best, best_len = -1, -1
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            covers = module == prefix or (prefix != "redblue" and module.startswith(prefix + "."))
            if covers and len(prefix) > best_len:
                best, best_len = rank, len(prefix)
    if best < 0:
        raise AssertionError(f"{module}: not in any layer of tests/test_layers.py; add it where it belongs")
    return best


def _imports(path: Path, module: str) -> list[tuple[str, int, bool]]:
    """(imported redblue module, line, inside a function?) for every import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: list[tuple[str, int, bool]] = []
    is_package = path.name == "__init__.py"

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function) for a in child.names if a.name.startswith("redblue"))
            elif isinstance(child, ast.ImportFrom):
                if child.level:  # relative import: resolve against this module's package
                    base = module.split(".")
                    base = base[: len(base) - child.level + (1 if is_package else 0)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                if target.startswith("redblue"):
                    # "from redblue.x import y" may name a submodule y
                    for alias in child.names:
                        sub = f"{target}.{alias.name}"
                        found.append((sub if (PACKAGE.parent / sub.replace(".", "/")).exists()
                                      or (PACKAGE.parent / (sub.replace(".", "/") + ".py")).exists()
                                      else target, child.lineno, in_function))  # fmt: skip
            visit(child, nested)

    visit(tree, False)
    return found


def _graph() -> dict[str, list[tuple[str, int, bool]]]:
    return {_module_name(p): _imports(p, _module_name(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_has_a_layer() -> None:
    for module in _graph():
        _layer(module)
    with pytest.raises(AssertionError, match="not in any layer"):
        _layer("redblue.somewhere_new")


def test_no_import_points_up() -> None:
    upward = [
        f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)}) at line {line}"
        for module, imports in _graph().items()
        for target, line, _ in imports
        if target != module and _layer(target) > _layer(module)
    ]
    assert not upward, "\n".join(upward)


def test_stages_and_report_do_not_import_each_other() -> None:
    crossing = [
        f"{module} imports {target}"
        for module, imports in _graph().items()
        for target, _, _ in imports
        for a, b in (("redblue.stages", "redblue.report"), ("redblue.report", "redblue.stages"))
        if module.startswith(a) and target.startswith(b)
    ]
    assert not crossing, crossing


def test_no_redblue_import_inside_a_function() -> None:
    inside = [
        f"{module}:{line} imports {target} inside a function"
        for module, imports in _graph().items()
        for target, line, in_function in imports
        if in_function
    ]
    assert not inside, "\n".join(inside)


def test_the_import_graph_has_no_cycle() -> None:
    graph = {m: sorted({t for t, _, _ in imports if t != m}) for m, imports in _graph().items()}
    # A package's __init__ re-exports its submodules: "from redblue.x import y" where y is a
    # submodule is an edge to redblue.x.y (resolved above); edges to a package are edges to
    # its __init__ only.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in graph.get(node, []):
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt) :], nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt in graph and state.get(nxt) is None:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in graph:
        if state.get(node) is None:
            visit(node)


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path: Path) -> None:
    """The rules above can fail: a module that imports a higher layer is caught."""
    bad = tmp_path / "redblue" / "models.py"
    bad.parent.mkdir()
    bad.write_text("from redblue.pipeline import run_workflow\n\ndef f():\n    import redblue.stages\n")
    imports = _imports(bad, "redblue.models")
    assert [(t, in_f) for t, _, in_f in imports] == [("redblue.pipeline", False), ("redblue.stages", True)]
    assert _layer("redblue.pipeline") > _layer("redblue.models")
