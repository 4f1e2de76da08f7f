"""Imports run one way: no cycle between the modules of `sparsevlm_jax` and `convert`.

Every module is parsed with `ast` (nothing is executed). Every import statement counts, the
lazy ones inside functions included; only those under `if TYPE_CHECKING:` do not (they never
run). `import a.b` is an edge to `a.b`; `from a import b` to the submodule `a.b` when there is
one, else to `a` (its `__init__`); relative imports are resolved against the importing
module's package. The parent packages that Python initialises on the way are not edges: a
module's `__init__` may re-export from its submodules.

The same graph checks the layers (`STACKS`): model -> pruning -> generation -> pipeline ->
commands, and checkpoint format -> conversion. No module imports, directly or through other
modules, a module of a layer above its own.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("sparsevlm_jax", "convert")

Edge = tuple[str, str]  # (importer, imported)
Layers = tuple[tuple[str, tuple[str, ...]], ...]  # bottom up: (layer name, module prefixes)

# The layers of each stack, bottom up. A module may import its own layer and those below, never
# a layer above, not even through modules outside the table (those, e.g. config, batch,
# processing, shapes_task, are otherwise free). A prefix names a module and its submodules.
STACKS: dict[str, Layers] = {
    "inference": (
        ("model", ("sparsevlm_jax.model",)),
        ("pruning", ("sparsevlm_jax.sparse",)),
        ("generation", ("sparsevlm_jax.prefill", "sparsevlm_jax.generate")),
        ("pipeline", ("sparsevlm_jax.calibrated", "sparsevlm_jax.pipeline")),
        (
            "commands",
            (
                "sparsevlm_jax.cli",
                "sparsevlm_jax.eval",
                "sparsevlm_jax.demo",
                "sparsevlm_jax.bench",
            ),
        ),
    ),
    "checkpoints": (
        ("format", ("sparsevlm_jax.checkpoint",)),
        ("conversion", ("convert",)),
    ),
}


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


def layer_of(module: str, layers: Layers) -> tuple[int, str] | None:
    """(index from the bottom, name) of the layer holding `module`, or None."""
    for i, (name, prefixes) in enumerate(layers):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i, name
    return None


def reached_above(
    graph: dict[str, set[str]], module: str, layers: Layers
) -> Iterator[tuple[list[str], str]]:
    """(import chain [module, ..., m], m's layer) for each module m of a layer above `module`'s
    that `module` reaches (breadth-first: shortest chains; not searched past such an m)."""
    own = layer_of(module, layers)
    if own is None:
        return
    previous: dict[str, str] = {module: module}
    frontier = [module]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph[node] - previous.keys()):
                previous[child] = node
                theirs = layer_of(child, layers)
                if theirs is None or theirs[0] <= own[0]:
                    nxt.append(child)
                    continue
                chain = [child]
                while chain[-1] != module:
                    chain.append(previous[chain[-1]])
                yield chain[::-1], theirs[1]
        frontier = nxt


def layer_violations(
    graph: dict[str, set[str]], lines: dict[Edge, list[int]], stacks: dict[str, Layers]
) -> list[str]:
    """One line per (module, module of a higher layer it reaches), with the import chain:
    `[stack] a (model) -> b (line 3 of a) -> c (pruning: line 7 of b)`."""
    out = []
    for stack, layers in stacks.items():
        for module in sorted(graph):
            for chain, above in reached_above(graph, module, layers):
                steps = [
                    f"{b} (line {','.join(map(str, lines[(a, b)]))} of {a})"
                    for a, b in zip(chain, chain[1:], strict=False)
                ]
                steps[-1] = steps[-1].replace(" (", f" ({above}: ", 1)
                _, own = layer_of(module, layers) or (0, "")
                out.append(f"[{stack}] {module} ({own}) -> " + " -> ".join(steps))
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


def test_layer_violations_follow_chains():
    """A lower layer reaching a higher one through an unlayered module is caught, with the chain;
    imports downwards and within a layer are not."""
    layers: Layers = (("low", ("p.low",)), ("mid", ("p.mid",)), ("high", ("p.high",)))
    lines = {
        ("p.low.a", "p.low.b"): [1],
        ("p.low.a", "p.util"): [2],
        ("p.util", "p.high"): [3],
        ("p.mid", "p.low.a"): [4],
        ("p.high", "p.mid"): [5],
        ("p.high", "p.util"): [6],
    }
    graph: dict[str, set[str]] = {
        m: set() for m in ("p.low.a", "p.low.b", "p.util", "p.mid", "p.high")
    }
    for x, y in lines:
        graph[x].add(y)
    found = layer_violations(graph, lines, {"s": layers})
    assert found == [
        "[s] p.low.a (low) -> p.util (line 2 of p.low.a) -> p.high (high: line 3 of p.util)",
        "[s] p.mid (mid) -> p.low.a (line 4 of p.mid) -> p.util (line 2 of p.low.a)"
        " -> p.high (high: line 3 of p.util)",
    ]
    assert layer_of("p.lower", layers) is None and layer_of("p.low.x.y", layers) == (0, "low")


def test_layer_table_names_existing_modules():
    """Every prefix of `STACKS` names a module (a renamed one would silently pass otherwise)."""
    modules = module_files()
    missing = [
        p
        for layers in STACKS.values()
        for _, prefixes in layers
        for p in prefixes
        if not any(m == p or m.startswith(p + ".") for m in modules)
    ]
    assert not missing, f"layer table names no module: {missing}"


def test_layers_import_downwards_only():
    graph, lines = import_graph()
    found = layer_violations(graph, lines, STACKS)
    assert not found, "imports from a lower layer into a higher one:\n" + "\n".join(found)
