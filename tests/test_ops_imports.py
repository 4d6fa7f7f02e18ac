"""How the ops reach their kernels, read from the source with `ast`: each op module imports
its kernel modules by name (`from sar_fast.kernels import attention`, which a reader or an
IDE can follow), inside the function that launches them (importing triton is slow and
triton may be absent), never through importlib or a module name in a string; and
`import sar_fast` with the ops, models and patches imports no triton."""
import ast
import os
import subprocess
import sys

from conftest import ROOT

OPS = os.path.join(ROOT, "sar_fast", "ops")
KERNELS = os.path.join(ROOT, "kernels")
# kernel modules that import no triton: the ops may import them at their own import
TRITON_FREE = {"support"}


def _sources(folder: str) -> dict[str, ast.Module]:
    return {name[:-3]: ast.parse(open(os.path.join(folder, name)).read(), name)
            for name in sorted(os.listdir(folder)) if name.endswith(".py")}


def _kernel_imports(tree: ast.Module) -> list[tuple[str, bool]]:
    """(kernel module, imported inside a function) for every import of sar_fast.kernels."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom):
                # absolute, or relative from sar_fast.ops (level 2: `from ..kernels import x`)
                module = child.module or ""
                if child.level == 2:
                    module = "sar_fast." + module
                if module == "sar_fast.kernels":
                    found.extend((alias.name, nested) for alias in child.names)
                elif module.startswith("sar_fast.kernels."):
                    found.append((module.split(".")[2], nested))
            elif isinstance(child, ast.Import):
                found.extend((alias.name.split(".")[2], nested) for alias in child.names
                             if alias.name.startswith("sar_fast.kernels."))
            visit(child, nested)

    visit(tree, False)
    return found


def _string_loading(tree: ast.Module) -> list[str]:
    """importlib.import_module, __import__ and the removed load_kernels: a module named by a
    string (importlib.util.find_spec, asking whether triton is installed, loads nothing)."""
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "importlib":
            bad += [f"line {node.lineno}: from importlib import {a.name}" for a in node.names
                    if a.name in ("import_module", "__import__")]
        elif isinstance(node, ast.Name) and node.id in ("__import__", "load_kernels", "import_module"):
            bad.append(f"line {node.lineno}: {node.id}")
        elif isinstance(node, ast.Attribute) and node.attr in ("load_kernels", "import_module", "__import__"):
            bad.append(f"line {node.lineno}: .{node.attr}")
    return bad


def problems(ops: dict[str, ast.Module], kernel_modules: set[str]) -> list[str]:
    found = []
    imported = set()
    for name, tree in ops.items():
        found += [f"ops/{name}.py {b}" for b in _string_loading(tree)]
        for module, in_function in _kernel_imports(tree):
            imported.add(module)
            if module not in kernel_modules:
                found.append(f"ops/{name}.py imports sar_fast.kernels.{module}, which does not exist")
            elif not in_function and module not in TRITON_FREE:
                found.append(f"ops/{name}.py imports sar_fast.kernels.{module} at its import (triton): "
                             f"import it in the function that launches it")
    launchers = {m for m in kernel_modules if not m.startswith("_") and m not in TRITON_FREE}
    found += [f"no op imports sar_fast.kernels.{m} by name" for m in sorted(launchers - imported)]
    return found


def test_ops_import_their_kernels_by_name_and_lazily():
    kernel_modules = set(_sources(KERNELS))
    assert {"attention", "attention_backward", "cross_entropy", "scale_shift"} <= kernel_modules
    found = problems(_sources(OPS), kernel_modules)
    assert not found, "\n".join(found)


def test_the_import_check_can_fail():
    kernels = {"attention", "attention_backward", "support", "_tuning"}

    def check(**sources):
        return problems({name: ast.parse(src) for name, src in sources.items()}, kernels)

    good = "from sar_fast.kernels.support import HEAD_DIMS\ndef f():\n    from sar_fast.kernels import attention\n"
    good_bwd = "def g():\n    from ..kernels import attention_backward as b\n"
    assert check(a=good, b=good_bwd) == []
    assert check(a=good) == ["no op imports sar_fast.kernels.attention_backward by name"]
    assert check(a=good, b="from sar_fast.kernels import attention_backward\n")[0].endswith("at its import (triton): "
                                                                                          "import it in the function "
                                                                                          "that launches it")
    assert "load_kernels" in check(a=good, b=good_bwd, c="def f():\n    return backend.load_kernels('x')\n")[0]
    assert "import_module" in check(a=good, b=good_bwd, c="import importlib\nimportlib.import_module('x')\n")[0]
    assert "import_module" in check(a=good, b=good_bwd, c="from importlib import import_module\n")[0]
    assert check(a=good, b=good_bwd, c="import importlib.util\nimportlib.util.find_spec('triton')\n") == []
    assert "does not exist" in check(a=good, b=good_bwd, c="def f():\n    from sar_fast.kernels import nothing\n")[0]


def test_importing_the_library_imports_no_triton():
    code = ("import sys; import sar_fast, sar_fast.ops, sar_fast.models, sar_fast.patch; "
            "print('triton' in sys.modules, sar_fast.ops.__file__)")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    loaded, path = res.stdout.split()
    assert os.path.dirname(os.path.dirname(path)) == os.path.join(ROOT, "sar_fast")
    assert loaded == "False"
