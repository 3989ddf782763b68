"""Data flows one way through the modules: no import cycles, counting imports inside functions too."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "pinsface"


def imports() -> dict[str, set[str]]:
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pinsface"):
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("pinsface"))
        graph[name] = found
    return {k: {m for m in v if m in graph and m != k and m != "pinsface"} for k, v in graph.items()}


def test_no_module_imports_one_that_imports_it_back():
    graph = imports()
    cycles = []

    def visit(node, stack):
        for nxt in sorted(graph[node]):
            if nxt in stack:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif len(stack) < 12:
                visit(nxt, stack + [nxt])

    for start in sorted(graph):
        visit(start, [start])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles[:5])


def test_lower_stages_never_import_higher_ones():
    order = [
        "pinsface.errors",
        "pinsface.console",
        "pinsface.files",
        "pinsface.settings",
        "pinsface.clock",
        "pinsface.dataset",
        "pinsface.images",
        "pinsface.detector_boxes",
        "pinsface.detector_nets",
        "pinsface.faces",
        "pinsface.finding",
        "pinsface.face_records",
        "pinsface.cache",
        "pinsface.embeddings",
        "pinsface.ray_engine",
        "pinsface.prepare",
        "pinsface.face_index",
        "pinsface.api",
        "pinsface.head",
        "pinsface.models",
        "pinsface.scoring",
        "pinsface.fitting",
        "pinsface.gallery",
        "pinsface.enrol",
        "pinsface.runfolder",
        "pinsface.evaluate",
        "pinsface.pipeline",
        "pinsface.predict",
        "pinsface.library_db",
        "pinsface.library_index",
        "pinsface.library_cluster",
        "pinsface.library_sheet",
        "pinsface.library_export",
        "pinsface.serve.errors",
        "pinsface.serve.auth",
        "pinsface.serve.limits",
        "pinsface.serve.batcher",
        "pinsface.serve.state",
        "pinsface.serve.uploads",
        "pinsface.serve.guard",
        "pinsface.serve.identify",
        "pinsface.serve.identities",
        "pinsface.serve.people",
        "pinsface.serve.health",
        "pinsface.serve.page",
        "pinsface.serve.app",
        "pinsface.serve",
        "pinsface.cli_library",
        "pinsface.cli",
        "pinsface.testing.servers",
        "pinsface.testing.badinput",
        "pinsface.testing.photos",
        "pinsface.testing",
    ]
    graph = imports()
    rank = {name: i for i, name in enumerate(order)}
    upward = [(a, b) for a in order for b in graph.get(a, ()) if b in rank and rank[b] > rank[a]]
    assert upward == []
    # The testing builders serve the tests and bench/ only: nothing in pinsface imports them.
    assert [
        a
        for a, deps in graph.items()
        if not a.startswith("pinsface.testing") and any(b.startswith("pinsface.testing") for b in deps)
    ] == []
