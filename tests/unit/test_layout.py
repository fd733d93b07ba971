"""The house rules of the code layout (docs/layout.md), read from the source with `ast`:
imports only go down (launch -> trainer -> parallel -> models), no import circles, and the
config modules that the recipe loader reads import no torch."""
import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGES = ("models", "parallel", "trainer", "launch")
LAYER = {name: i for i, name in enumerate(PACKAGES)}  # a package may import those below it


def _modules() -> dict[str, str]:
    """Dotted module name -> file, for every module of the four packages."""
    out = {}
    for package in PACKAGES:
        for directory, _, files in os.walk(os.path.join(ROOT, package)):
            for file in files:
                if file.endswith(".py"):
                    path = os.path.join(directory, file)
                    name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    out[name.removesuffix(".__init__")] = path
    return out


def _imports(path: str, known: set[str], top_level_only: bool) -> set[str]:
    """Our modules that `path` imports (at module level only, or anywhere)."""
    tree = ast.parse(open(path).read())
    for node in ast.walk(tree):  # `if TYPE_CHECKING:` imports are for annotations, never run
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            node.body = []
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import submodule` imports the submodule.
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def test_imports_only_go_down():
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        layer = LAYER[name.split(".")[0]]
        for dep in _imports(path, set(modules), top_level_only=False):
            if LAYER[dep.split(".")[0]] > layer:
                wrong.append(f"{name} imports {dep}")
    assert not wrong, wrong


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph, or None (depth-first search with colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circles():
    """Module-level imports form no cycle (a package's __init__ counts as importing what it
    imports), so every module imports cleanly whatever is imported first."""
    modules = _modules()
    graph = {name: _imports(path, set(modules), top_level_only=True) - {name} for name, path in modules.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_no_import_circles_through_deferred_imports():
    """Imports inside functions too (imported where used, e.g. heavy or optional ones): still no
    cycle between modules, so no module depends on one that depends back on it."""
    modules = _modules()
    graph = {name: _imports(path, set(modules), top_level_only=False) - {name} for name, path in modules.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_recipe_loading_imports_no_torch():
    """A recipe is loaded and checked without torch: a bad one is refused in well under a second."""
    code = ("import sys; from trainer.recipe import load_config; "
            "load_config('recipes/llm/pretrain_tiny.yaml', ['train.steps=3'], world_size=2); "
            "load_config('recipes/dit/pretrain_digits_moe.yaml'); "
            "bad = [m for m in ('torch', 'numpy', 'datasets', 'wandb') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
