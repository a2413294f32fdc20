"""The house plan of ARCHITECTURE.md, held against the code's own imports (every import statement,
at module level or inside a function)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("conch_dna", "daemon", "neurons")
APP = {"conch_dna.cli", "conch_dna.cli.main", "conch_dna.cli.__main__", "conch_dna.cli.demo", "conch_dna.lifecycle.report", "conch_dna.cli.progress", "conch_dna.cli.trainer",
       "conch_dna.server.app", "conch_dna.server.wire"}
SERVICES = ("daemon", "neurons")
# The distillation engine, bottom up: a module may import those before it, never those after.
ENGINE = ("conch_dna.training.losses", "conch_dna.training.hidden", "conch_dna.training.kd_config",
          "conch_dna.training.callbacks",
          "conch_dna.training.data", "conch_dna.training.evaluation", "conch_dna.training.on_policy",
          "conch_dna.training.topk_codec", "conch_dna.training.teacher", "conch_dna.training.mixture",
          "conch_dna.training.true_kd")
# What the engine never reaches: it takes prompts and settings, it does not know where they are kept.
ABOVE_ENGINE = {"conch_dna.settings.config", "conch_dna.traces.store", "conch_dna.traces.ingest", "conch_dna.lifecycle.cycle", "conch_dna.lifecycle.status"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def import_graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports."""
    modules = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps.update(resolve(a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps.update(resolve(f"{node.module}.{a.name}") for a in node.names)
        graph[name] = deps - {None, name}
    return graph


def layer(module: str) -> str:
    if module in APP:
        return "app"
    if module.split(".")[0] in SERVICES:
        return "services"
    return "core"


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
def graph():
    return import_graph()


def test_the_graph_sees_function_level_imports(graph):
    # cli imports the daemon inside its commands only: a reader of module-level imports would miss it
    assert "daemon.service" in graph["conch_dna.cli.main"] and "conch_dna.training.true_kd" in graph["conch_dna.lifecycle.cycle"]


def test_cycles_are_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles(graph):
    assert cycles(graph) == []


def test_the_core_never_imports_services_or_the_app(graph):
    upward = {m: sorted(d for d in deps if layer(d) != "core") for m, deps in graph.items() if layer(m) == "core"}
    assert {m: d for m, d in upward.items() if d} == {}


def test_a_service_imports_the_core_and_its_own_package_only(graph):
    strays = {m: sorted(d for d in deps if layer(d) == "app" or (layer(d) == "services"
                                                                 and d.split(".")[0] != m.split(".")[0]))
              for m, deps in graph.items() if layer(m) == "services"}
    assert {m: d for m, d in strays.items() if d} == {}


def test_the_engine_runs_one_way_and_knows_no_store_or_config(graph):
    for i, module in enumerate(ENGINE):
        assert not graph[module] & set(ENGINE[i + 1:]), module
        assert not graph[module] & ABOVE_ENGINE, module


def test_every_module_is_placed(graph):
    """A new module of the app layer must be named in APP (and in ARCHITECTURE.md), not slip into the core."""
    plan = (ROOT / "ARCHITECTURE.md").read_text()
    for module in graph:
        if layer(module) != "core" or module.startswith("conch_dna.kit"):
            continue
        assert f"`{module.removeprefix('conch_dna.').replace('.', '/')}" in plan, f"{module} is not in ARCHITECTURE.md"
