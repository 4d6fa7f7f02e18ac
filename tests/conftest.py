"""Test setup. The tests run against the sar_fast that Python imports: install it first
(README: `pip install --no-build-isolation -e .`, or a regular `pip install .`).

`python -m pytest` from the repository root puts the root on sys.path, so the checkout's
sar_fast/ is imported; from any other directory the installed package is. Either way
sar_fast.kernels must come from the same tree as sar_fast (the install maps the top-level
kernels/ there); a checkout whose kernels resolve elsewhere (another checkout's editable
install, or none) gets its own kernels/ bound by sar_fast itself, and the header says which
tree is tested.
"""
import ast
import importlib
import importlib.util
import os

import pytest

import torch

# Without a GPU, Triton kernels run under the interpreter; it must be chosen before the
# first import of triton (kernel modules are imported lazily by sar_fast.ops).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")
# where tests that force backend 'kernel' put their tensors: the GPU when there is one,
# else the CPU (Triton kernels under the interpreter)
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# .ci/run exports SAR_FAST_CI=1: there a missing optional module fails the tests that need it
# instead of silently skipping whole files
IN_CI = os.environ.get("SAR_FAST_CI") == "1"


def need_module(name: str):
    """pytest.importorskip on a developer's machine; an import error (a failure) in CI."""
    if IN_CI:
        return importlib.import_module(name)
    return pytest.importorskip(name)


def poison_outputs(monkeypatch, family: str):
    """The kernels of op family `family` ("attention", "cross_entropy", "scale_shift") get
    outputs that start as NaN (integer outputs: -(2**31 - 1)), so an element no program
    writes fails the comparison instead of passing on a lucky zero. On a GPU the
    autotuner's first call benchmarks every config into the outputs, so the launch poisons
    them again after it and reruns the winner (kernels/_tuning.TunedKernel). The scale
    shift allocates its outputs in the op (sar_fast.ops.scale_shift._empty): there the
    allocation is poisoned. Returns the patched module."""
    if family == "scale_shift":
        module = importlib.import_module("sar_fast.ops.scale_shift")
        monkeypatch.setattr(module, "_empty", lambda *shape, dtype=None, device=None:
                            torch.full(shape, float("nan"), dtype=dtype, device=device))
        return module
    from sar_fast.kernels import attention, cross_entropy
    module = {"attention": attention, "cross_entropy": cross_entropy}[family]
    monkeypatch.setattr(module, "POISON_OUTPUTS", True)
    return module


def dotted_name(node) -> str:
    """'a.b.c' for the expression a.b.c (ast Name / Attribute chain); the ast audits use it."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def random_scale_model(arch: str, schedule=(1, 2, 3, 5), seed: int | None = None, **overrides):
    """A tiny ScaleAR ('flexvar' or 'var') with N(0, 0.2) weights instead of the near-identity
    init, so that every block changes the output; `seed` fixes the draw (None: torch's state)."""
    from sar_fast.models import build_model
    if seed is not None:
        torch.manual_seed(seed)
    model = build_model(f"{arch}-tiny", schedule=schedule, **overrides)
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    return model


def toy_phi(h, si, n):
    """A stand-in for VAR's shared Phi convolutions: a per-scale gain."""
    return h * (0.5 + 0.1 * si)


def _package_dir(name: str) -> str | None:
    spec = importlib.util.find_spec(name)
    return None if spec is None or not spec.submodule_search_locations else \
        os.path.realpath(list(spec.submodule_search_locations)[0])


_sar_fast_dir = _package_dir("sar_fast")
if _sar_fast_dir is None:
    raise ImportError("sar_fast is not importable: install it first "
                      "(pip install --no-build-isolation -e . from the repository root; see README.md)")
# the sys.path entry that provides sar_fast; subprocesses (torchrun) get it on PYTHONPATH
PACKAGE_PATH = os.path.dirname(_sar_fast_dir)
_checkout_kernels = os.path.join(PACKAGE_PATH, "kernels")
# a regular install holds sar_fast/kernels; an editable install or a checkout, the top-level kernels/
_expected_kernels = [os.path.join(_sar_fast_dir, "kernels"), _checkout_kernels]


# sar_fast binds a bare checkout's kernels/ itself (sar_fast/__init__.py), ahead of another
# tree's editable install: kernels and package must come from the same tree
if _package_dir("sar_fast.kernels") not in _expected_kernels:
    raise ImportError(f"sar_fast from {_sar_fast_dir} has no matching sar_fast.kernels "
                      f"(found {_package_dir('sar_fast.kernels')}); reinstall sar_fast")
assert _package_dir("sar_fast.kernels") in _expected_kernels


def pytest_report_header(config):
    return [f"sar_fast under test: {_sar_fast_dir} (kernels: {_package_dir('sar_fast.kernels')})"]


@pytest.fixture(autouse=True)
def _seed_and_backend():
    """Every test starts from a fixed seed and the default backend."""
    from sar_fast import ops
    torch.manual_seed(0)
    ops.set_backend(None)
    yield
    ops.set_backend(None)


# The GPU correctness selection of bench/gpu_first.sh (`pytest -m gpu_first`), defined here
# once: every test that skips without a GPU (its skip reason names the GPU or CUDA), the
# matrix of tests/test_gpu_ops.py, and the op tests that switch to d16 shapes on a GPU.
GPU_FIRST_TESTS = (
    "tests/test_gpu_ops.py::",
    "tests/test_attention.py::test_half_precision_no_worse_than_eager",
    "tests/test_attention.py::test_fp16_error_within_twice_torch_own",
    "tests/test_cross_entropy.py::test_half_precision_no_worse_than_eager",
    "tests/test_cross_entropy.py::test_fp16_no_worse_than_eager",
)


def _skips_without_gpu(item) -> bool:
    for mark in item.iter_markers("skipif"):
        reason = str(mark.kwargs.get("reason", ""))
        if "GPU" in reason or "CUDA" in reason:
            return True
    return False


def pytest_collection_modifyitems(config, items):
    for item in items:
        nodeid = item.nodeid.replace(os.sep, "/")
        if not nodeid.startswith("tests/"):
            nodeid = "tests/" + nodeid
        if _skips_without_gpu(item) or nodeid.startswith(GPU_FIRST_TESTS):
            item.add_marker(pytest.mark.gpu_first)
