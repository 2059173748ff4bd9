"""reflax's import graph, read statically from the source: no circle, no upward import.

Every `import` / `from ... import` of a reflax module counts, wherever it stands (module
level, inside `if TYPE_CHECKING:`, inside a function): a function-level import still makes
its module depend on the other one. `from reflax.x import y` is an edge to `reflax.x.y`
when that is a module, else to `reflax.x`. Importing a submodule also runs its package's
`__init__`, but that implicit edge is not counted: a package importing its own submodules
would otherwise always be a circle.

The layers, lowest first (`reflax/README.md` says what each module owns). A module may
import modules of its own layer or of lower ones, never of a higher one; in addition:
  * `reflax.sharding` imports nothing of reflax and `reflax.config` only `reflax.sharding`,
    so a config can be read and validated without building anything;
  * `reflax.models` and `reflax.tasks` do not import each other: a task knows text, a model
    knows token ids;
  * `reflax.episodes` (host-side rollouts) does not import `reflax.trainer` (the device
    step), even indirectly;
  * no function-level import of reflax modules: with no circle left, none is needed.
"""

from __future__ import annotations

import ast
import functools
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "reflax"

# (layer, modules): a name ending in ".*" is a package and everything under it. Planned
# modules may be listed before they exist.
LAYERS: list[tuple[str, set[str]]] = [
    (
        "foundation",
        {
            "reflax.sharding",  # mesh axes, logical-axis table
            "reflax.config",  # defaults and validation
            "reflax.distributed",
            "reflax.logs",
            "reflax.storage",  # gs:// and local paths
            "reflax.checkpoint",
            "reflax.results",  # json results
            "reflax.stats",  # paired tests, intervals
            "reflax.metrics",
            "reflax.data",
            "reflax.recipes",
        },
    ),
    (
        "text and models",
        {"reflax.tokenizer", "reflax.tasks", "reflax.tasks.*", "reflax.models", "reflax.models.*"},
    ),
    (
        "device programs",
        {
            "reflax.sampling",  # sampling operations
            "reflax.decoding",  # the decode loop
            "reflax.kv_cache",  # the sampler's KV cache: dtype, bytes, in-place row blocks
            "reflax.sampler",  # the host Sampler
            "reflax.grpo",
            "reflax.batch",
            "reflax.packing",
            "reflax.trainer",
            "reflax.optim",
        },
    ),
    (
        "host phases",
        {
            "reflax.runtime",
            "reflax.episodes",
            "reflax.warm_start",
            "reflax.evaluate",
            "reflax.forgetting",
            "reflax.cli",  # shared CLI set-up
            "reflax.api",
        },
    ),
    ("entry points", {"reflax", "reflax.train", "reflax.collect_failures", "reflax.local_cluster"}),
]
# (importer, imported): never, not even through other modules
NEVER_REACHES = [("reflax.episodes", "reflax.trainer")]
# module -> the only reflax modules it may import
ONLY_IMPORTS = {"reflax.sharding": set(), "reflax.config": {"reflax.sharding"}}
SIBLINGS = [("reflax.models", "reflax.tasks")]  # packages that do not import each other


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


class _Imports(ast.NodeVisitor):
    """(imported module, line, inside a function) for each reflax import of one file."""

    def __init__(self, name: str, is_package: bool, known: set[str]):
        self.package = name if is_package else name.rpartition(".")[0]
        self.known, self.depth, self.found = known, 0, []

    def _add(self, target: str, node: ast.AST) -> None:
        if target in self.known:
            self.found.append((target, node.lineno, self.depth > 0))

    def visit_FunctionDef(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_Lambda = visit_FunctionDef

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:  # relative: from the package `level - 1` above this file's
            base = self.package.split(".")
            base = ".".join(
                base[: len(base) - node.level + 1] + ([node.module] if node.module else [])
            )
        else:
            base = node.module or ""
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            self._add(sub if sub in self.known else base, node)


@functools.cache
def _edges() -> tuple[tuple[str, str, str, bool], ...]:
    """(importer, imported, "file:line", function-level) for every reflax import."""
    modules = _modules()
    known = set(modules)
    edges = []
    for name, path in modules.items():
        visitor = _Imports(name, path.name == "__init__.py", known)
        visitor.visit(ast.parse(path.read_text(), str(path)))
        rel = path.relative_to(ROOT.parent)
        edges += [(name, t, f"{rel}:{line}", fn) for t, line, fn in visitor.found if t != name]
    return tuple(dict.fromkeys(edges))  # `from x import a, b` names x once


def _layer(module: str) -> int | None:
    for i, (_, names) in enumerate(LAYERS):
        for pattern in names:
            if module == pattern or (pattern.endswith(".*") and module.startswith(pattern[:-1])):
                return i
    return None


def _show(edge: tuple[str, str, str, bool]) -> str:
    src, dst, where, fn = edge
    return f"{src} -> {dst} ({where}{', in a function' if fn else ''})"


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in _modules()}
    for src, dst, _, _ in _edges():
        graph[src].add(dst)
    return graph


def _reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_the_graph_is_read():
    """The reader sees the imports it must judge (else every test below passes vacuously)."""
    edges = {(s, d) for s, d, _, _ in _edges()}
    assert ("reflax.models.hf", "reflax.models.safetensors_io") in edges
    assert ("reflax.models.decoder", "reflax.sharding") in edges  # `from reflax.sharding import`
    assert ("reflax.trainer", "reflax.grpo") in edges  # `from reflax import grpo`
    assert ("reflax.tasks.countdown", "reflax.tasks.splits") in edges
    assert ("reflax.models.hf", "reflax.models") in edges  # a name of the package itself
    assert len(edges) > 40


def test_every_module_has_a_layer():
    missing = sorted(m for m in _modules() if _layer(m) is None)
    assert not missing, f"add these modules to a layer in tests/test_imports.py: {missing}"


def test_no_import_circle():
    graph = _graph()
    circles = sorted({m for m in graph if m in _reaches(graph, m)})
    edges = [_show(e) for e in _edges() if e[0] in circles and e[1] in circles]
    assert not circles, "modules on an import circle: " + "; ".join(edges)


def test_no_upward_import():
    bad = []
    for edge in _edges():
        src, dst, _, _ = edge
        low, high = _layer(src), _layer(dst)  # None: reported by test_every_module_has_a_layer
        if low is not None and high is not None and low < high:
            bad.append(f"{_show(edge)}: {LAYERS[low][0]} imports {LAYERS[high][0]}")
        if src in ONLY_IMPORTS and dst not in ONLY_IMPORTS[src]:
            bad.append(
                f"{_show(edge)}: {src} may import of reflax only {sorted(ONLY_IMPORTS[src])}"
            )
        for a, b in SIBLINGS:
            for x, y in ((a, b), (b, a)):
                if (src == x or src.startswith(x + ".")) and (dst == y or dst.startswith(y + ".")):
                    bad.append(f"{_show(edge)}: {x} does not import {y}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(("src", "dst"), NEVER_REACHES)
def test_never_reaches(src, dst):
    graph = _graph()
    before = _reaches(graph, src) | {src}  # modules src loads
    path = [_show(e) for e in _edges() if e[0] in before and dst in _reaches(graph, e[1]) | {e[1]}]
    assert dst not in before, f"{src} imports {dst} through: " + "; ".join(path)


def test_no_function_level_import():
    inside = [_show(e) for e in _edges() if e[3]]
    assert not inside, "reflax imports inside functions (move them to the top): " + "; ".join(
        inside
    )
