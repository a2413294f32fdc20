"""The house plan of ARCHITECTURE.md, held against the code's own imports (every import statement, at module
level or inside a function): a module's layer is its folder, and a folder imports only its own and those below."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("conch_dna", "daemon", "neurons")
# bottom up: a module may import its own layer's and the layers before it, never those after it
LAYERS = ("conch_dna.system", "conch_dna.models", "conch_dna.kit", "conch_dna.training", "conch_dna.settings",
          "conch_dna.traces", "conch_dna.lifecycle", "services", "conch_dna.server", "conch_dna.cli")
SERVICES = ("neurons", "daemon")  # one layer, two packages that never import each other
FACE = "conch_dna"  # the package itself: its names for agent code, loaded on first use


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


def layer(module: str) -> int | None:
    """The floor of a module's folder (None for the package's face)."""
    if module == FACE:
        return None
    if module.split(".")[0] in SERVICES:
        return LAYERS.index("services")
    for floor, folder in enumerate(LAYERS):
        if module == folder or module.startswith(folder + "."):
            return floor
    raise AssertionError(f"{module} is in no layer's folder: put it in one (see ARCHITECTURE.md)")


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
    # the cli imports the daemon inside its commands only: a reader of module-level imports would miss it
    assert "daemon.service" in graph["conch_dna.cli.daemon"]
    assert "conch_dna.training.true_kd" in graph["conch_dna.lifecycle.cycle"]


def test_cycles_are_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_layers_are_read_from_folders():
    assert layer("conch_dna.models.gguf.reader") == layer("conch_dna.models.chat") < layer("conch_dna.training.losses")
    assert layer("neurons.registry") == layer("daemon.worker") < layer("conch_dna.server.app")
    with pytest.raises(AssertionError, match="no layer's folder"):
        layer("conch_dna.stray")


def test_no_import_cycles(graph):
    assert cycles(graph) == []


def test_every_import_runs_down_or_within_its_own_folder(graph):
    upward = {m: sorted(d for d in deps if layer(d) is not None and layer(m) is not None and layer(d) > layer(m))
              for m, deps in graph.items()}
    assert {m: d for m, d in upward.items() if d} == {}


def test_a_service_never_imports_the_other(graph):
    strays = {m: sorted(d for d in deps if d.split(".")[0] in SERVICES and d.split(".")[0] != m.split(".")[0])
              for m, deps in graph.items() if m.split(".")[0] in SERVICES}
    assert {m: d for m, d in strays.items() if d} == {}


def test_nothing_imports_the_face(graph):
    """The package's face (Ego, record for agent code) loads the traces layer: the layers below import
    the modules themselves."""
    assert sorted(m for m, deps in graph.items() if FACE in deps) == []


def test_the_engine_knows_no_store_no_config_and_no_home(graph):
    """The engine takes prompts, a KDConfig and a KDCallback: it never reaches the settings or the traces."""
    for module, deps in graph.items():
        if layer(module) == LAYERS.index("conch_dna.training"):
            assert not [d for d in deps if layer(d) is not None and layer(d) >= LAYERS.index("conch_dna.settings")]


def test_every_folder_is_in_the_plan():
    plan = (ROOT / "ARCHITECTURE.md").read_text()
    for folder in [f for f in LAYERS if f != "services"] + list(SERVICES):
        assert f"{folder.removeprefix('conch_dna.').replace('.', '/')}/" in plan, f"{folder} is not in ARCHITECTURE.md"


def test_modules_and_folders_stay_small():
    """A module you can describe in one sentence, in a folder you can read at a glance."""
    big = {str(p.relative_to(ROOT)): n for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
           if (n := len(p.read_text().splitlines())) > 500}
    assert big == {}
    crowded = {str(d.relative_to(ROOT)): n for pkg in PACKAGES for d in [ROOT / pkg, *(ROOT / pkg).rglob("*")]
               if d.is_dir() and (n := len(list(d.glob("*.py")))) > 13}
    assert crowded == {}
