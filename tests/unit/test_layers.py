"""Imports point down the layers only, and no two modules import each other through any path.

Every module under sora_lightning/ is parsed with `ast`, and every import counts: top-level,
inside functions (lazy), and under `if TYPE_CHECKING:` (a dependency all the same). Layers,
lowest first:

    0 models, and the top-level utils.py, config.py, __init__.py
    1 diffusion
    2 data
    3 parallel, launch (services of train; launch may import parallel, never the reverse)
    4 train
    5 sample, eval (eval may import sample; neither imports train's entry point train.main)
    6 pipeline

A module may import its own layer or a lower one; sideways imports within a layer are fine as long
as they form no cycle. conf/ is data only (YAML; an empty __init__.py makes it a package).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "sora_lightning"
CONF = "sora_lightning.conf"

LAYERS = {
    "models": 0,
    "utils": 0,
    "config": 0,
    "runlock": 0,
    "": 0,  # sora_lightning/__init__.py
    "diffusion": 1,
    "data": 2,
    "parallel": 3,
    "launch": 3,
    "train": 4,
    "sample": 5,
    "eval": 5,
    "pipeline": 6,
}
"""First name under sora_lightning -> layer; a new top-level package must be placed here."""

FORBIDDEN = {
    ("parallel", "launch"): "parallel builds strategies inside a run; launch starts runs",
    ("sample", "train.main"): "sample uses trained weights, never train's entry point",
    ("eval", "train.main"): "eval uses trained weights, never train's entry point",
}
"""(importer prefix, imported prefix) pairs refused although the layers would allow them."""


def module_name(path: Path) -> str:
    """sora_lightning/data/clips.py -> sora_lightning.data.clips (a package is its __init__)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = all_modules()


def layer_key(module: str) -> str:
    """sora_lightning.train.main -> "train"; sora_lightning.utils -> "utils"; root -> ""."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def layer_of(module: str) -> int:
    key = layer_key(module)
    if key not in LAYERS:
        raise AssertionError(f"{module}: top-level name {key!r} has no layer in LAYERS")
    return LAYERS[key]


def _resolve(name: str) -> str | None:
    """The module an import names: itself if it is one, else its nearest module parent; None
    outside sora_lightning."""
    if name != "sora_lightning" and not name.startswith("sora_lightning."):
        return None
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def import_names(module: str, path: Path) -> set[str]:
    """Every absolute dotted name `module` imports, anywhere in its source (relative resolved)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: climb level - 1 packages above this one
                parts = package.split(".")
                anchor = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def imported_modules(module: str, path: Path) -> set[str]:
    """The sora_lightning modules `module` imports (`from pkg import name`: pkg.name if that is
    a module, else pkg)."""
    found = {_resolve(name) for name in import_names(module, path)}
    return {target for target in found if target is not None and target != module}


GRAPH = {module: imported_modules(module, path) for module, path in MODULES.items()}


def _short(module: str) -> str:
    return module.removeprefix("sora_lightning.")


def test_every_module_has_a_layer() -> None:
    for module in MODULES:
        layer_of(module)


def test_imports_point_down_the_layers() -> None:
    upward = [
        f"{_short(a)} (layer {layer_of(a)}) imports {_short(b)} (layer {layer_of(b)})"
        for a, targets in sorted(GRAPH.items())
        for b in sorted(targets)
        if layer_of(b) > layer_of(a)
    ]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_forbidden_sideways_imports() -> None:
    def within(module: str, prefix: str) -> bool:
        short = _short(module)
        return short == prefix or short.startswith(prefix + ".")

    refused = [
        f"{_short(a)} imports {_short(b)}: {why}"
        for a, targets in sorted(GRAPH.items())
        for b in sorted(targets)
        for (src, dst), why in FORBIDDEN.items()
        if within(a, src) and within(b, dst)
    ]
    assert not refused, "\n".join(refused)


def tangles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node: nodes that reach each other."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan; the graph is small, recursion depth is fine
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a closed path) per tangle, e.g. ["a", "b", "a"]."""
    return [_cycle_in(graph, set(component)) for component in tangles(graph)]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A closed path a -> ... -> a through a strongly connected component (shortest from a)."""
    start = min(component)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for succ in sorted(graph[node] & component):
                if succ == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if succ not in previous:
                    previous[succ] = node
                    following.append(succ)
        frontier = following
    raise AssertionError(f"no cycle through {start}")  # unreachable for a real component


def _describe(graph: dict[str, set[str]], short=lambda name: name) -> list[str]:
    """Each tangle as one of its cycles plus all its members."""
    return [
        " -> ".join(short(m) for m in _cycle_in(graph, set(component)))
        + f"   (tangle: {', '.join(short(m) for m in component)})"
        for component in tangles(graph)
    ]


def test_no_import_cycles() -> None:
    cycles = _describe(GRAPH, _short)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_cycles_between_packages() -> None:
    """Sideways imports within a layer (eval -> sample, launch -> parallel) go one way only."""
    packages: dict[str, set[str]] = {}
    for module, targets in GRAPH.items():
        key = layer_key(module) or "__init__"
        others = {layer_key(t) or "__init__" for t in targets}
        packages.setdefault(key, set()).update(others - {key})
    cycles = _describe(packages)
    assert not cycles, "packages importing each other:\n" + "\n".join(cycles)


def test_conf_is_data_only() -> None:
    code = [p for p in (ROOT / "conf").rglob("*.py") if p.name != "__init__.py" or p.read_text()]
    assert not code, f"conf/ holds YAML only, found code in {code}"
    importers = [
        module
        for module, path in MODULES.items()
        for name in import_names(module, path)
        if name == CONF or name.startswith(CONF + ".")
    ]
    assert not importers, f"{importers} import sora_lightning.conf; compose it with Hydra instead"


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": {"a"}}, [["a", "b", "a"]]),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c", "a"]]),
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
    ],
)
def test_find_cycles_reports_the_path(graph: dict, expected: list) -> None:
    assert find_cycles(graph) == expected


def test_lazy_and_relative_imports_are_seen(tmp_path: Path) -> None:
    """An import inside a function counts like one at the top; relative imports resolve."""
    source = (
        "from __future__ import annotations\n"
        "def f():\n    from sora_lightning.train.main import train\n"
        "from . import world\n"
        "from .packing import PackedBatch\n"
        "import sora_lightning.models.dit\n"
    )
    path = tmp_path / "fake.py"
    path.write_text(source)
    found = imported_modules("sora_lightning.data.fake", path)
    expected = {
        "sora_lightning.train.main",
        "sora_lightning.data.world",
        "sora_lightning.data.packing",
        "sora_lightning.models.dit",
    }
    assert found == expected
