"""No import cycles among qcompiler's modules: the graph of imports, read with `ast` from every
module of the package (`qcompiler/`, and `passes/`, `codegen/`, `models/`, which ship as
`qcompiler.passes`, `.codegen`, `.models`), has no cycle. Imports inside functions count too: a
late import hides a cycle, it does not break it."""

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).parent.parent
PACKAGES = {"qcompiler": ROOT / "qcompiler", "qcompiler.passes": ROOT / "passes",
            "qcompiler.codegen": ROOT / "codegen", "qcompiler.models": ROOT / "models"}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def import_graph() -> nx.DiGraph:
    """Module -> the qcompiler modules it imports (`from qcompiler.x import y` names module
    `qcompiler.x.y` when that is a module, else `qcompiler.x`). A package's `__init__` importing
    its submodules counts; a module importing the package it lives in does not (Python runs the
    package before any of its modules anyway)."""
    known = modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(known)
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
            for target in targets:
                while target and target not in known:
                    target = target.rpartition(".")[0]
                if not target or target == name:
                    continue
                if name.startswith(target + "."):
                    continue  # a module and the package it lives in (Python runs the package first anyway)
                graph.add_edge(name, target)
    return graph


def test_import_graph_reads_the_real_imports():
    graph = import_graph()
    assert graph.has_edge("qcompiler.tools.report", "qcompiler.ir")
    assert graph.has_edge("qcompiler.passes.calibrate", "qcompiler.analysis.calibration")
    assert len(graph) > 40


def test_there_are_no_import_cycles():
    cycles = sorted(nx.simple_cycles(import_graph()), key=lambda c: (len(c), c))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c + c[:1]) for c in cycles[:10])
