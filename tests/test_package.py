"""The package's shape: no import cycles inside sar_fast (module-level and function-level
imports alike), read from the source with `ast` so that nothing is imported to check it."""
import ast
import os


from conftest import ROOT

PACKAGE = "sar_fast"


def _modules(root: str) -> dict[str, str]:
    """Dotted module name -> file, for every .py file under the package."""
    found = {}
    for folder, _, files in os.walk(os.path.join(root, PACKAGE)):
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, name), root)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                found[".".join(rel)] = os.path.join(folder, name)
    return found


def _ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(modules: dict[str, str]) -> dict[str, set[str]]:
    """Module -> the package modules it imports, anywhere in its body. Importing a.b.c also
    runs a.b's __init__ unless the importer sits inside a.b (then it is already running)."""
    graph = {}
    for module, path in modules.items():
        is_package = path.endswith("__init__.py")
        package = module if is_package else module.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - node.level + 1]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module
                # `from a import b` imports a.b when b is a module, else a
                names = [f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in modules else prefix
                         for alias in node.names]
            else:
                continue
            for name in names:
                if name not in modules:
                    continue
                targets.add(name)
                targets.update(a for a in _ancestors(name) if a not in _ancestors(module) and a != module)
        targets.discard(module)
        graph[module] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle (as a path that starts and ends at the same module), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_no_import_cycles_in_the_package():
    graph = import_graph(_modules(ROOT))
    assert len(graph) > 20 and "sar_fast.models.generate" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_sees_function_level_imports_and_package_inits(tmp_path):
    """The checker itself: a function-level import that closes a loop is a cycle, and so is
    one that closes only through a package's __init__."""
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .a import g\n")
    (pkg / "sub" / "__init__.py").write_text("from .c import x\n")
    (pkg / "sub" / "c.py").write_text("x = 1\n")
    (pkg / "d.py").write_text("from .sub.c import x\n")
    graph = import_graph(_modules(str(tmp_path)))
    assert find_cycle(graph) == ["sar_fast.a", "sar_fast.b", "sar_fast.a"]
    (pkg / "b.py").write_text("x = 1\n")
    assert find_cycle(import_graph(_modules(str(tmp_path)))) is None
    (pkg / "sub" / "__init__.py").write_text("from .c import x\nfrom ..d import x as y\n")
    assert find_cycle(import_graph(_modules(str(tmp_path)))) == ["sar_fast.d", "sar_fast.sub", "sar_fast.d"]


def test_sampling_helpers_are_a_leaf():
    graph = import_graph(_modules(ROOT))
    assert graph["sar_fast.sampling"] == set()


# The layers, lowest first: a module may import its own layer and those below it, never one
# above. The library is what other VAR projects use; data and metrics serve the trainer and
# the applications; the applications are entry modules that nothing imports.
LIBRARY = ("sar_fast", "sar_fast.ops", "sar_fast.models", "sar_fast.patch", "sar_fast.kernels", "sar_fast.sar",
           "sar_fast.schedules", "sar_fast.sampling", "sar_fast.rng", "sar_fast.nn", "sar_fast.safe_load",
           "sar_fast.hub", "sar_fast.cli", "sar_fast.files", "sar_fast._C_loader")
APPLICATIONS = ("sar_fast.evaluate", "sar_fast.sample", "sar_fast.cache", "sar_fast.memory", "sar_fast.study",
                "sar_fast.convert")
LAYERS = [LIBRARY, ("sar_fast.data",), ("sar_fast.metrics",), ("sar_fast.train",), APPLICATIONS]


def layer_of(module: str) -> int:
    """The layer of a module: that of the longest listed prefix naming it or a package above it."""
    best, depth = None, -1
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and prefix.count(".") > depth:
                best, depth = i, prefix.count(".")
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Imports of a higher layer, and of an application from outside it."""
    top = len(LAYERS) - 1
    return sorted(f"{m} -> {t}" for m, targets in graph.items() for t in targets
                  if layer_of(t) > layer_of(m)
                  or (layer_of(t) == top and t.split(".")[:2] != m.split(".")[:2]))


def test_layers():
    found = upward_imports(import_graph(_modules(ROOT)))
    assert not found, "imports from a higher layer or of an application:\n" + "\n".join(found)


def test_layers_check_can_fail():
    assert upward_imports({"sar_fast.ops.attention": {"sar_fast.train.parallel"}})
    assert upward_imports({"sar_fast.study.runner": {"sar_fast.evaluate"}})
    assert not upward_imports({"sar_fast.study.runner": {"sar_fast.study.design", "sar_fast.train"}})
