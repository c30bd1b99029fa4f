"""The layering of the kubetune package (docs/architecture.md), read from its import graph.

The graph is built from the source: every import statement of every module, also those inside functions (the
lazy imports that keep `kubetune operator` light are imports all the same). What a module reaches is what
importing it can load: what it imports, what those import, and the packages around each of them (Python runs
a package's __init__ before any module in it). The rules:

- kopf is imported only in handlers/;
- the pure layers (api/, planner/, render/, status/, and adapters/ but its HTTP client) reach nothing that does
  network I/O: no Kubernetes or HTTP client, no S3 client, no kopf, nothing of k8s/;
- the operator side reaches neither torch, transformers, vllm nor gradio (and nothing of trainer/ or server/);
- no cycle between packages, nor between modules.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

import kubetune

ROOT = Path(kubetune.__file__).parent

PURE = ("api", "planner", "render", "status", "adapters")
# The I/O of a pure package: its HTTP client. Nothing pure may reach it.
IO_INSIDE_PURE = ("kubetune.adapters.http",)
# Names whose import means network I/O (a prefix matches a module and everything under it).
IO_NAMES = (
    "kubernetes",
    "urllib",
    "urllib3",
    "requests",
    "http",
    "socket",
    "boto3",
    "botocore",
    "kopf",
    "kubetune.k8s",
    "kubetune.s3",
    *IO_INSIDE_PURE,
)
# Every top-level package or module of kubetune is on one side; a new one must be placed here.
OPERATOR_SIDE = (
    *PURE,
    "controllers",
    "handlers",
    "k8s",
    "config",
    "storage",
    "signing",
    "faults",
    "crdgen",
    "chart",
)
POD_SIDE = ("trainer", "server", "s3", "hf")  # runs in the training and serving pods
TOOLS = ("cli", "__main__", "validate", "dev", "__init__")  # entry points and the local cluster
HEAVY = ("torch", "transformers", "vllm", "gradio", "kubetune.trainer", "kubetune.server")


@dataclass(frozen=True)
class Import:
    module: str
    line: int
    target: str
    """A kubetune module, or the dotted name of anything else."""


def module_name(path: Path) -> str:
    parts = ["kubetune", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolved(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The module a `from X import ...` names (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join([*base, *([node.module] if node.module else [])])


def imports_of(module: str, source: str | None = None) -> list[Import]:
    """Every import in a module (at any depth: functions, branches), `from X import Y` as X.Y when that is a
    module of kubetune, else as X."""
    path = modules()[module]
    tree = ast.parse(source if source is not None else path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [Import(module, node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolved(module, path, node)
            for alias in node.names:
                target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules() else base
                found.append(Import(module, node.lineno, target))
    return found


@cache
def graph() -> dict[str, tuple[Import, ...]]:
    return {name: tuple(imports_of(name)) for name in modules()}


def unit(module: str) -> str:
    """The top-level package (or module) of kubetune a module belongs to: `kubetune.render.common` -> `render`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def matches(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(f"{p}.") for p in prefixes)


def parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def reached(start: str, imports: dict[str, tuple[Import, ...]]) -> dict[str, list[Import]]:
    """Every kubetune module that importing `start` can load, with the chain of imports that gets there."""
    chains: dict[str, list[Import]] = {start: []}
    queue = deque([start])
    while queue:
        current = queue.popleft()
        nexts = [*imports.get(current, ()), *(Import(current, 0, p) for p in parents(current))]
        for imp in nexts:
            if imp.target in imports and imp.target not in chains:
                chains[imp.target] = [*chains[current], imp]
                queue.append(imp.target)
    return chains


def reaches(start: str, forbidden: Iterable[str], imports: dict[str, tuple[Import, ...]]) -> list[str]:
    """Each forbidden import that importing `start` can run, as the chain that leads to it."""
    forbidden = tuple(forbidden)
    problems = []
    for module, chain in reached(start, imports).items():
        hits = [imp for imp in imports[module] if matches(imp.target, forbidden)]
        if matches(module, forbidden) and module != start:
            hits.append(chain[-1])
        for hit in hits:
            steps = [f"{i.module}:{i.line} imports {i.target}" for i in [*chain, hit] if i.line]
            problems.append(f"{start} reaches {hit.target}: " + " -> ".join(dict.fromkeys(steps)))
    return sorted(set(problems))


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one node (Tarjan's algorithm), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return sorted(groups)


def module_edges(imports: dict[str, tuple[Import, ...]]) -> dict[str, set[str]]:
    return {m: {i.target for i in found if i.target in imports and i.target != m} for m, found in imports.items()}


def package_edges(imports: dict[str, tuple[Import, ...]]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for module, targets in module_edges(imports).items():
        edges.setdefault(unit(module), set()).update(unit(t) for t in targets if unit(t) != unit(module))
    return edges


def in_units(names: Iterable[str]) -> list[str]:
    return [m for m in modules() if unit(m) in names]


# --- the rules -----------------------------------------------------------------------------------------------


def kopf_outside_handlers(imports: dict[str, tuple[Import, ...]]) -> list[str]:
    return [
        f"{i.module}:{i.line} imports {i.target}"
        for m, found in imports.items()
        if unit(m) != "handlers"
        for i in found
        if matches(i.target, ["kopf"])
    ]


def io_in_pure_layers(imports: dict[str, tuple[Import, ...]]) -> list[str]:
    pure = [m for m in in_units(PURE) if not matches(m, IO_INSIDE_PURE)]
    return [problem for m in pure for problem in reaches(m, IO_NAMES, imports)]


def heavy_on_the_operator_side(imports: dict[str, tuple[Import, ...]]) -> list[str]:
    return [problem for m in in_units(OPERATOR_SIDE) for problem in reaches(m, HEAVY, imports)]


def test_kopf_is_imported_only_in_handlers() -> None:
    assert kopf_outside_handlers(graph()) == []


def test_the_pure_layers_reach_no_io() -> None:
    assert io_in_pure_layers(graph()) == []


def test_the_controllers_reach_no_kopf() -> None:
    # They are functions of plain inputs, unit-tested without kopf.
    assert [p for m in in_units(["controllers"]) for p in reaches(m, ["kopf", "kubetune.handlers"], graph())] == []


def test_the_operator_side_reaches_neither_torch_transformers_vllm_nor_gradio() -> None:
    assert heavy_on_the_operator_side(graph()) == []


def test_no_cycle_between_packages() -> None:
    assert cycles(package_edges(graph())) == []


def test_no_cycle_between_modules() -> None:
    assert cycles(module_edges(graph())) == []


def test_every_package_is_on_one_side() -> None:
    sides = [OPERATOR_SIDE, POD_SIDE, TOOLS]
    assert sorted(u for u in {unit(m) for m in modules()} if sum(u in side for side in sides) != 1) == []


def test_the_operator_imports_neither_vllm_nor_torch() -> None:
    code = (
        "import sys, kubetune.handlers.main, kubetune.cli; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('vllm', 'torch', 'gradio', 'transformers')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- the rules catch what they are meant to catch ------------------------------------------------------------


def planted(module: str, code: str) -> dict[str, tuple[Import, ...]]:
    """The import graph with `code` (a function with its imports) appended to `module`."""
    source = modules()[module].read_text() + "\n\n" + code
    return {**graph(), module: tuple(imports_of(module, source))}


LAZY = "def later():\n    {}\n"


def test_a_lazy_kopf_import_outside_handlers_is_found() -> None:
    assert kopf_outside_handlers(planted("kubetune.controllers.serving", LAZY.format("import kopf"))) != []


@pytest.mark.parametrize(
    "module, statement",
    [
        ("kubetune.status.pods", "import urllib.request"),
        ("kubetune.render.common", "from kubetune.k8s.client import Kube"),
        ("kubetune.adapters.sync", "from kubetune.adapters import http"),
        ("kubetune.planner.models", "import requests"),
        ("kubetune.api.v1alpha1.base", "from kubetune.storage import Access\n    from kubetune import s3"),
    ],
)
def test_io_in_a_pure_layer_is_found_also_through_other_modules(module: str, statement: str) -> None:
    assert any(module in p for p in io_in_pure_layers(planted(module, LAZY.format(statement))))


def test_io_reached_through_another_module_is_found() -> None:
    # storage is not a pure layer, but every pure module that uses it would then reach the API client.
    problems = io_in_pure_layers(planted("kubetune.storage", LAZY.format("import kubernetes")))
    assert any(p.startswith("kubetune.render.common reaches kubernetes") for p in problems)


def test_torch_reached_from_the_operator_side_is_found() -> None:
    imports = planted("kubetune.k8s.events", LAZY.format("from kubetune.trainer import tiny"))
    problems = heavy_on_the_operator_side(imports)
    assert any(p.startswith("kubetune.handlers.main reaches kubetune.trainer") for p in problems)


def test_cycles_are_found() -> None:
    imports = planted("kubetune.status.pods", LAZY.format("from kubetune.controllers import metrics"))
    assert any({"controllers", "status"} <= set(c) for c in cycles(package_edges(imports)))
    imports = planted("kubetune.dev.lifecycle", LAZY.format("from kubetune.dev import demo"))
    assert ["kubetune.dev.demo", "kubetune.dev.lifecycle"] in cycles(module_edges(imports))
