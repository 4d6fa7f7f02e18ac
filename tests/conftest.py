import importlib
import os
import sys

import pytest

import torch

# Without a GPU, Triton kernels run under the interpreter; it must be chosen before the
# first import of triton (kernel modules are imported lazily by sar_fast.ops).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a source checkout without installing
    sys.path.insert(0, ROOT)

DATA = os.path.join(ROOT, "tests", "data")
# where tests that force backend 'triton' put their tensors: the GPU when there is one,
# else the CPU (kernels under the interpreter)
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# .ci/run exports SAR_FAST_CI=1: there a missing optional module fails the tests that need it
# instead of silently skipping whole files
IN_CI = os.environ.get("SAR_FAST_CI") == "1"


def need_module(name: str):
    """pytest.importorskip on a developer's machine; an import error (a failure) in CI."""
    if IN_CI:
        return importlib.import_module(name)
    return pytest.importorskip(name)


@pytest.fixture(autouse=True)
def _seed_and_backend():
    """Every test starts from a fixed seed and the default backend."""
    from sar_fast import ops
    torch.manual_seed(0)
    ops.set_backend(None)
    yield
    ops.set_backend(None)
