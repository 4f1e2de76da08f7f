"""Imports run one way: no cycle between the modules of `sparsevlm_jax` and `convert`.

Every module is parsed with `ast` (nothing is executed). Every import statement counts, the
lazy ones inside functions included; only those under `if TYPE_CHECKING:` do not (they never
run). `import a.b` is an edge to `a.b`; `from a import b` to the submodule `a.b` when there is
one, else to `a` (its `__init__`); relative imports are resolved against the importing
module's package. The parent packages that Python initialises on the way are not edges: a
module's `__init__` may re-export from its submodules.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("sparsevlm_jax", "convert")

Edge = tuple[str, str]  # (importer, imported)


def module_files() -> dict[str, Path]:
    """Dotted module name -> source file, for every .py file of the packages."""
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            if "__pycache__" in parts:
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_nodes(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth, except under `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """`name` or its longest prefix that is one of our modules (None: outside the packages)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def _base(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module a `from ... import` statement imports from."""
    if not node.level:
        return node.module or ""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    parts = package.split(".")
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join([*parts, node.module] if node.module else parts)


def edges_of(module: str, path: Path, modules: dict[str, Path]) -> dict[Edge, list[int]]:
    """(module, imported module) -> line numbers of the imports that make that edge."""
    out: dict[Edge, list[int]] = {}
    for node in import_nodes(ast.parse(path.read_text(), str(path))):
        targets: list[str | None] = []
        if isinstance(node, ast.Import):
            targets = [_known(a.name, modules) for a in node.names]
        else:
            base = _base(module, path, node)
            for a in node.names:
                sub = f"{base}.{a.name}"
                targets.append(sub if sub in modules else _known(base, modules))
        for target in set(targets) - {None, module}:
            out.setdefault((module, target), []).append(node.lineno)
    return out


def import_graph() -> tuple[dict[str, set[str]], dict[Edge, list[int]]]:
    """Adjacency sets and the import lines behind each edge."""
    modules = module_files()
    lines: dict[Edge, list[int]] = {}
    for module, path in modules.items():
        lines.update(edges_of(module, path, modules))
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for a, b in lines:
        graph[a].add(b)
    return graph, lines


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative): the components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    component.append(m)
                    if m == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def a_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One cycle through the component's first module: [m0, m1, ..., m0] (breadth-first)."""
    members, start = set(component), component[0]
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph[node] & members):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if child not in previous:
                    previous[child] = node
                    nxt.append(child)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")


def describe_cycles(graph: dict[str, set[str]], lines: dict[Edge, list[int]]) -> list[str]:
    """One line per cycle: `a -> b (line 12) -> a (line 3)`, plus the component's modules."""
    out = []
    for component in strongly_connected(graph):
        cycle = a_cycle(graph, component)
        steps = [cycle[0]] + [
            f"{b} (line {','.join(map(str, lines[(a, b)]))} of {a})"
            for a, b in zip(cycle, cycle[1:], strict=False)
        ]
        line = " -> ".join(steps)
        if len(component) > len(cycle) - 1:
            line += f"  [component: {', '.join(component)}]"
        out.append(line)
    return out


def test_graph_sees_lazy_relative_and_submodule_imports():
    """The graph itself: known edges of this checkout are found (guards against an empty graph)."""
    graph, _ = import_graph()
    assert "sparsevlm_jax.cli.app" in graph and "convert.llava" in graph
    assert (
        "sparsevlm_jax.checkpoint" in graph["convert.llava"]
    )  # `from sparsevlm_jax import checkpoint`
    assert "convert.llava" in graph["sparsevlm_jax.loading"]  # lazy, inside functions
    assert "sparsevlm_jax.cli.info" in graph["sparsevlm_jax.cli.app"]  # `from pkg import submodule`


def test_relative_imports_are_resolved(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "pkg/__init__.py": "from .sub import b\n",
        "pkg/a.py": "def f():\n    from . import sub\n    from .sub.b import g\n",
        "pkg/sub/__init__.py": "from ..a import f\n",
        "pkg/sub/b.py": "from .. import a\nif TYPE_CHECKING:\n    from pkg.sub import c\n",
        "pkg/sub/c.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    modules = {
        name[:-3].replace("/", ".").removesuffix(".__init__"): tmp_path / name for name in files
    }
    edges = {}
    for module, path in modules.items():
        edges.update(edges_of(module, path, modules))
    assert set(edges) == {
        ("pkg", "pkg.sub.b"),
        ("pkg.a", "pkg.sub"),
        ("pkg.a", "pkg.sub.b"),
        ("pkg.sub", "pkg.a"),
        ("pkg.sub.b", "pkg.a"),
    }
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for a, b in edges:
        graph[a].add(b)
    assert strongly_connected(graph) == [["pkg.a", "pkg.sub", "pkg.sub.b"]]
    assert a_cycle(graph, ["pkg.a", "pkg.sub", "pkg.sub.b"]) == ["pkg.a", "pkg.sub", "pkg.a"]


def test_no_import_cycles():
    graph, lines = import_graph()
    cycles = describe_cycles(graph, lines)
    assert not cycles, "import cycles between modules:\n" + "\n".join(cycles)
