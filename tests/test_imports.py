"""The library's import graph: layers import downward only. Every import counts — at module
level, inside a function, under ``TYPE_CHECKING`` — and importing ``a.b.c`` also runs ``a`` and
``a.b`` (a package's ``__init__``), so those count too. No cycle may remain, and the whole-config
module sits on top: no library module imports ``mergeflow.config``."""

import ast
from pathlib import Path

LIBRARY = Path(__file__).resolve().parents[1] / "workflow"


def module_files() -> dict[str, Path]:
    """Module name -> file, for every module of the ``mergeflow`` package."""
    modules = {}
    for file in sorted((LIBRARY / "mergeflow").rglob("*.py")):
        parts = list(file.relative_to(LIBRARY).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
    return modules


def imported_names(module: str, file: Path) -> set[str]:
    """Every dotted name ``module`` imports anywhere in its file (relative imports resolved)."""
    names: set[str] = set()
    package = module.split(".") if file.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    """Module -> the library modules that importing it runs: each imported module and its
    packages, leaving out the module's own packages (Python has run them already)."""
    modules = module_files()
    graph = {}
    for module, file in modules.items():
        own = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
        targets = set()
        for name in imported_names(module, file):
            parts = name.split(".")
            targets.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        graph[module] = {t for t in targets if t in modules and t != module and t not in own}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_library_s_imports_have_no_cycle():
    assert cycles(import_graph()) == []


def test_no_library_module_imports_the_whole_config_check():
    """Only the top may: the workflow, the CLI (``mergeflow.cli``, ``mergeflow.commands``), benches, tests."""
    importers = [m for m, targets in import_graph().items() if "mergeflow.config" in targets]
    assert [m for m in importers if m != "mergeflow.cli" and not m.startswith("mergeflow.commands")] == []


def test_the_checker_sees_a_cycle_through_a_function_local_import(tmp_path, monkeypatch):
    """The check itself: a function-local import closing a circle is found."""
    package = tmp_path / "mergeflow"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from mergeflow.b import x\n")
    (package / "b.py").write_text("x = 1\n\ndef f():\n    from mergeflow import a\n")
    (package / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import mergeflow.a\n")
    monkeypatch.setattr(__import__(__name__), "LIBRARY", tmp_path)
    assert cycles(import_graph()) == [["mergeflow.a", "mergeflow.b"]]
