"""The source tree itself. A run from a bare source tree (nothing installed, e.g. the lent
GPU's image): sar_fast imports its Triton kernels from the checkout's top-level kernels/,
even when another tree's editable install of sar_fast is on the path. And the size limits:
no function of sar_fast/, kernels/ or bench/ over 80 lines, no module of sar_fast/ over 500."""
import ast
import os
import shutil
import subprocess
import sys

from conftest import ROOT

PROBE = ("import sar_fast, sar_fast.kernels, sar_fast.kernels._tuning as t; "
         "print(sar_fast.__file__); print(sar_fast.kernels.__file__); print(t.__file__)")


def _bare_copy(dest: str) -> str:
    """The checkout's package sources, kernels/ and setup.py, without the link or build
    outputs a developer tree may hold (sar_fast/kernels, the extension)."""
    skip = shutil.ignore_patterns("__pycache__", "*.so", "kernels")
    shutil.copytree(os.path.join(ROOT, "sar_fast"), os.path.join(dest, "sar_fast"), ignore=skip)
    shutil.copytree(os.path.join(ROOT, "kernels"), os.path.join(dest, "kernels"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(ROOT, "setup.py"), dest)
    return dest


def _run_probe(tree: str, cwd: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = tree
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_bare_checkout_imports_its_own_kernels(tmp_path):
    tree = _bare_copy(str(tmp_path / "tree"))
    os.mkdir(tmp_path / "elsewhere")
    package, kernels, tuning = _run_probe(tree, str(tmp_path / "elsewhere"))
    assert package == os.path.join(tree, "sar_fast", "__init__.py")
    assert kernels == os.path.join(tree, "kernels", "__init__.py")
    assert tuning == os.path.join(tree, "kernels", "_tuning.py")


def test_installed_layout_keeps_its_own_kernels(tmp_path):
    """A tree holding sar_fast/kernels (a regular install's layout) is not rebound."""
    tree = _bare_copy(str(tmp_path / "tree"))
    shutil.move(os.path.join(tree, "kernels"), os.path.join(tree, "sar_fast", "kernels"))
    _, kernels, _ = _run_probe(tree, str(tmp_path))
    assert kernels == os.path.join(tree, "sar_fast", "kernels", "__init__.py")


# ------------------------------------------------------------------ size limits
# A function longer than a screen or two is read in pieces; split it into named steps. A
# module of the package over 500 lines holds more than one subject.
FUNCTION_LINES = 80   # every function of sar_fast/, kernels/ and bench/, decorators and docstring included
MODULE_LINES = 500    # every module of sar_fast/
CHECKED_TREES = ("sar_fast", "kernels", "bench")


def _python_files(top: str) -> list[str]:
    """The .py files under `top`, without caches or a linked or copied sar_fast/kernels
    (kernels/ is checked in its own right)."""
    found = []
    for folder, dirs, names in os.walk(top):  # does not follow links
        dirs[:] = sorted(d for d in dirs if d != "__pycache__"
                         and not (folder == top and os.path.basename(top) == "sar_fast" and d == "kernels"))
        found += [os.path.join(folder, n) for n in sorted(names) if n.endswith(".py")]
    return found


def long_functions(source: str, limit: int = FUNCTION_LINES) -> list[tuple[str, int]]:
    """(name, lines) of every function or method, nested ones too, longer than `limit` lines
    from its first decorator to its last line."""
    over = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            lines = node.end_lineno - first + 1
            if lines > limit:
                over.append((node.name, lines))
    return over


def size_violations(root: str = ROOT) -> list[str]:
    found = []
    for tree in CHECKED_TREES:
        for path in _python_files(os.path.join(root, tree)):
            with open(path, encoding="utf-8") as f:
                source = f.read()
            rel = os.path.relpath(path, root)
            found += [f"{rel}: {name} has {n} lines (limit {FUNCTION_LINES})" for name, n in long_functions(source)]
            lines = len(source.splitlines())
            if tree == "sar_fast" and lines > MODULE_LINES:
                found.append(f"{rel}: {lines} lines (limit {MODULE_LINES})")
    return found


def test_no_long_function_or_module():
    assert size_violations() == []


def _function(name: str, lines: int, indent: str = "", decorated: bool = False) -> list[str]:
    """Source lines of a function of exactly `lines` lines (decorator and docstring included)."""
    head = [f"{indent}@staticmethod"] if decorated else []
    head += [f"{indent}def {name}():", f'{indent}    """doc"""']
    return head + [f"{indent}    x = {i}" for i in range(lines - len(head))]


def test_the_size_check_fails_on_long_functions_and_modules(tmp_path):
    assert long_functions("\n".join(_function("fits", FUNCTION_LINES))) == []
    source = "\n".join(["class A:"] + _function("method", FUNCTION_LINES + 1, "    ", decorated=True)
                       + _function("outer", 5) + _function("inner", FUNCTION_LINES + 1, "    ")
                       + ["async " + line if line.startswith("def") else line
                          for line in _function("coroutine", FUNCTION_LINES + 1)])
    want = [("coroutine", 81), ("inner", 81), ("method", 81), ("outer", 86)]  # outer holds inner
    assert sorted(long_functions(source)) == want

    for tree in CHECKED_TREES:
        os.makedirs(tmp_path / tree)
    big_module = "\n".join(f"x{i} = {i}" for i in range(MODULE_LINES + 1))
    (tmp_path / "sar_fast" / "big.py").write_text(big_module)
    (tmp_path / "kernels" / "big.py").write_text(big_module)  # kernels/ and bench/ have no module limit
    (tmp_path / "bench" / "long.py").write_text(source)
    assert sorted(size_violations(str(tmp_path))) == sorted(
        ["sar_fast/big.py: 501 lines (limit 500)"]
        + [f"bench/long.py: {name} has {n} lines (limit 80)" for name, n in want])


def test_design_doc_draws_every_module():
    """docs/design.md's layout tree has a line for every module of sar_fast/ and kernels/
    (package __init__ / __main__ files aside), so the picture cannot drift from the tree."""
    import re
    with open(os.path.join(ROOT, "docs", "design.md")) as f:
        text = f.read()
    tree = text[text.index("## 2. Layout"):text.index("## 3.")]
    named = set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*\.py)\b", tree))
    missing = []
    for top in ("sar_fast", "kernels"):
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            missing += [os.path.relpath(os.path.join(folder, n), ROOT) for n in files
                        if n.endswith(".py") and n not in ("__init__.py", "__main__.py") and n not in named]
    assert not missing, f"docs/design.md's layout does not name: {sorted(missing)}"
