"""Imports run one way: the package's layers, read from the source with :mod:`ast` (nothing is
imported), have no upward import and no cycle, the library imports torch only and never the
applications (``bame_apps``, installed beside it).

Layers, lowest first (a module may import its own layer and those below)::

    core (pure tensor math, shared argument checks)
    groups (which parameters are sparse)
    kernels (native and Triton steps)
    optim (engine, rules, optimizers) and the package facade ``bame_optim``
    peers (straight-through methods, bidirectional masks)
    methods (the registry: factory, settings, FLOPs profile of each method)
    flops (counting, profiles, their composition)
    bame_apps.integrations, bame_apps.console (the applications around the library)
    bame_apps.examples, bame_apps.benchmarks (scripts on top of both)

``bame_optim.reference`` (the float64 reference optimizers) imports nothing of the package
outside itself. Imports under ``if TYPE_CHECKING:`` are not imports at run time and are
skipped; imports inside functions count (they are still dependencies).
"""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

LAYERS: tuple[tuple[str, ...], ...] = (
    ("bame_optim.core",),
    ("bame_optim.groups",),
    ("bame_optim.kernels",),
    ("bame_optim.optim", "bame_optim"),
    ("bame_optim.peers",),
    ("bame_optim.methods",),
    ("bame_optim.flops",),
    ("bame_apps.integrations", "bame_apps.console", "bame_apps"),
    ("bame_apps.examples", "bame_apps.benchmarks"),
)
"""Prefixes of each layer; ``bame_optim`` and ``bame_apps`` themselves match only exactly."""
APPS = "bame_apps"
"""The applications' package: the library (``bame_optim``) must not import it."""

ALLOWED_UPWARD: dict[tuple[str, str], str] = {
    ("bame_optim.kernels.ops", "bame_optim.optim.functional"): (
        "the CPU implementation of the torch.library ops is the eager update function; "
        "functional reaches ops (lazily) only for CUDA tensors"
    ),
}
"""Upward (hence cycle-closing) edges that are known and deliberate, with the reason."""

INDEPENDENT = ("bame_optim.reference",)
"""Packages that import nothing of the rest (oracles independent of the code under test)."""


def independent(name: str) -> str | None:
    """The package of :data:`INDEPENDENT` that ``name`` is in, if any."""
    return next((p for p in INDEPENDENT if name == p or name.startswith(p + ".")), None)

LIBRARY_THIRD_PARTY = {"torch"}
"""What the library (every layer below integrations) imports besides the standard library."""
OPTIONAL = {
    "bame_optim.kernels._triton_kept_kernels": {"triton"},
    "bame_optim.kernels._triton_evolve_kernels": {"triton"},
}
"""Modules that may import an optional package (only ever imported lazily themselves)."""


def _package_files() -> dict[str, Path]:
    """Every module of ``bame_optim`` and ``bame_apps`` (whose subpackages live in the
    repository's own folders)."""
    files = {}
    packages = ("bame_optim", APPS, f"{APPS}.integrations", f"{APPS}.examples",
                f"{APPS}.benchmarks")
    for package in packages:
        root = Path(importlib.import_module(package).__file__).parent
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([package, *parts])
            files.setdefault(name, path)
    return files


FILES = _package_files()


def _is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(name: str, path: Path) -> list[tuple[str, bool]]:
    """``(imported module, at module level)`` for every import of the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, top) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub if sub in FILES else base, top))
        inner = top and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(ast.parse(path.read_text()), True)
    return found


GRAPH = {name: _imports(name, path) for name, path in FILES.items()}
EDGES = {
    (name, target)
    for name, imports in GRAPH.items()
    for target, _ in imports
    if target.split(".")[0] in ("bame_optim", APPS)
}


def layer_of(name: str) -> int:
    best, level = -1, None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            inside = name.startswith(prefix + ".") and prefix not in ("bame_optim", APPS)
            if (name == prefix or inside) and len(prefix) > best:
                best, level = len(prefix), index
    assert level is not None, f"{name} is in no layer: add it to LAYERS"
    return level


def test_every_module_has_a_layer_and_the_graph_was_read():
    assert {"bame_optim.methods", "bame_optim.flops.breakdown", "bame_optim.core.nm"} <= set(FILES)
    for name in FILES:
        if not independent(name):
            layer_of(name)
    assert ("bame_optim.flops.profiles", "bame_optim.methods") in EDGES


def test_the_library_never_imports_the_applications():
    assert any(name.startswith(APPS + ".") for name in FILES), "the apps were not read"
    found = sorted(
        f"{source} imports {target}"
        for source, target in EDGES
        if source.split(".")[0] == "bame_optim" and target.split(".")[0] == APPS
    )
    assert not found, found


def test_no_upward_import():
    upward = sorted(
        f"{source} (layer {layer_of(source)}) imports {target} (layer {layer_of(target)})"
        for source, target in EDGES
        if not independent(source) and layer_of(target) > layer_of(source)
        and (source, target) not in ALLOWED_UPWARD
    )
    assert not upward, "\n".join(upward)
    for edge in ALLOWED_UPWARD:
        assert edge in EDGES, f"{edge} is allowed but no longer imported: remove it"


def test_no_cycle():
    """No strongly connected component of more than one module (Tarjan), the known edges of
    :data:`ALLOWED_UPWARD` left out."""
    graph: dict[str, set[str]] = {name: set() for name in FILES}
    for source, target in EDGES - set(ALLOWED_UPWARD):
        if target in graph and target != source:
            graph[source].add(target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            connect(node)
    assert not cycles, cycles


@pytest.mark.parametrize("package", INDEPENDENT)
def test_independent_packages_import_nothing_of_the_rest(package):
    assert package in FILES
    assert not [(source, target) for source, target in EDGES
                if independent(source) == package and independent(target) != package]


def test_the_library_imports_torch_only():
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    found = []
    for name, imports in GRAPH.items():
        if not independent(name) and name.split(".")[0] == APPS:
            continue  # the applications may use their extras
        for target, _ in imports:
            top = target.split(".")[0]
            allowed = stdlib | LIBRARY_THIRD_PARTY | {"bame_optim"} | OPTIONAL.get(name, set())
            if top not in allowed:
                found.append(f"{name} imports {target}")
    assert not found, found
