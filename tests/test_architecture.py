"""The module graph of ``ether_diffusion``: no import cycles, no upward imports, and docs/architecture.md's picture of
it is the graph the code has.

Every ``import`` counts, at the top of a module or inside a function (a lazy import does not hide a cycle). The rooms
below are the layers docs/architecture.md describes, lowest first; a module imports from its own room or lower ones.
"""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ether_diffusion"

#: the layers, lowest first: (room, module-name prefixes relative to the package)
ROOMS = [
    (
        "core",
        [
            "_version",
            "reflection",
            "config",
            "mixed",
            "slots",
            "layers",
            "delta",
            "coexist",
            "inject",
            "io",
            "files",
            "finite",
            "images",
            "assets",
            "sources",
            "families",
            "architectures",
            "checkpoints",
            "directions",
            "quantize",
        ],
    ),  # fmt: skip
    ("diffusers", ["models", "pipeline", "export", "sampling"]),
    ("world", ["world", "evaluation"]),
    ("training", ["training"]),
    ("control", ["control"]),
    ("registry", ["registry", "jobs"]),
    ("apps", ["demo", "bench", "studio", "cli"]),
    ("package", [""]),  # ether_diffusion/__init__.py: the public names, imported by nothing inside
]


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def import_edges(found: dict[str, Path]) -> set[tuple[str, str]]:
    """(importer, imported) for every import of a package module, resolved to the module it names."""
    edges = set()
    for name, path in found.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([node.module] if node.module else [])])
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in found else base for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in found:
                    target = target.rpartition(".")[0]
                if target.startswith("ether_diffusion") and target != name:
                    edges.add((name, target))
    return edges


def room(module: str) -> int:
    relative = module.removeprefix("ether_diffusion").removeprefix(".")
    for index, (_, prefixes) in enumerate(ROOMS):
        for prefix in prefixes:
            if relative == prefix or (prefix and relative.startswith(prefix + ".")):
                return index
    raise AssertionError(f"{module} belongs to no room of ROOMS: add it to the layer it serves")


def cycles(edges: set[tuple[str, str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    graph: dict[str, list[str]] = {}
    for a, b in edges:
        graph.setdefault(a, []).append(b)
        graph.setdefault(b, [])
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.fixture(scope="module")
def edges():
    return import_edges(modules())


def test_the_graph_is_read_from_the_code(edges):
    """The reader finds imports of every form (a guard against a check that passes because it sees nothing)."""
    assert ("ether_diffusion.layers", "ether_diffusion.reflection") in edges  # from .reflection import ...
    assert ("ether_diffusion.training.trainer", "ether_diffusion.training.task") in edges  # from .task import ...
    assert ("ether_diffusion.registry", "ether_diffusion.training.sdxl") in edges  # from .training.sdxl import ...
    assert ("ether_diffusion.cli", "ether_diffusion.registry") in edges  # an import inside a function
    planted = {("ether_diffusion.layers", "ether_diffusion.inject"), *edges}
    assert cycles(planted), "a planted cycle must be found"


def test_no_import_cycles(edges):
    assert cycles(edges) == [], "cut each cycle at its cause (a smaller module below both), not with a lazy import"


def test_no_upward_imports(edges):
    upward = sorted(f"{a} ({ROOMS[room(a)][0]}) imports {b} ({ROOMS[room(b)][0]})" for a, b in edges
                    if room(b) > room(a))  # fmt: skip
    assert upward == []


def room_graph(edges) -> str:
    """The rooms and the imports between them, as the mermaid diagram docs/architecture.md shows."""
    pairs = sorted({(room(a), room(b)) for a, b in edges if room(a) != room(b)})
    lines = ["flowchart BT"]
    lines += [f"    {ROOMS[a][0]} --> {ROOMS[b][0]}" for a, b in pairs]
    return "\n".join(lines)


def test_the_architecture_page_draws_this_graph(edges):
    page = (ROOT / "docs" / "architecture.md").read_text()
    drawn = re.search(r"```mermaid\n(.*?)\n```", page, re.S)
    assert drawn, "docs/architecture.md has no mermaid block"
    assert drawn.group(1) == room_graph(edges), (
        "docs/architecture.md's module graph is stale; replace its mermaid block with:\n" + room_graph(edges)
    )
    for name, _ in ROOMS:
        assert f"**{name}**" in page, f"docs/architecture.md does not describe the {name} room"
