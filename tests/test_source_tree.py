"""A run from a bare source tree (nothing installed, e.g. the lent GPU's image): sar_fast
imports its Triton kernels from the checkout's top-level kernels/, even when another tree's
editable install of sar_fast is on the path."""
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
