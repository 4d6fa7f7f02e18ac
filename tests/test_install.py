"""Installing sar_fast never replaces the torch it was built against.

The extension is compiled against the installed torch, so the package's requirements pin
that release (`torch==X.Y.Z`, from setup.py); pip then resolves every extra (torchvision,
which torch-fidelity needs, is built for one torch release each) against it instead of
upgrading torch. .ci/run also installs the extras over an older torch in a fresh venv and
runs `test_torch_is_the_one_installed_before` there."""
import importlib.metadata
import os
import re
import sys

import pytest
import torch

from conftest import ROOT


def _release(version: str) -> str:
    return re.match(r"\d+(\.\d+)*", version).group(0)


def _torch_requirements():
    try:
        requires = importlib.metadata.requires("sar_fast") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("sar_fast is not installed (tests run from a bare checkout)")
    return [r for r in requires if re.match(r"torch\b(?![-_.\w])", r)]


def test_installed_package_pins_the_torch_it_was_built_against():
    assert _torch_requirements() == [f"torch=={_release(torch.__version__)}"]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib (the independent TOML reader) needs Python 3.11")
def test_setup_reads_the_requirements_pyproject_declares():
    import tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        declared = tomllib.load(f)
    assert "dependencies" in declared["project"]["dynamic"] and "dependencies" not in declared["project"]
    ours = declared["tool"]["sar_fast"]
    namespace = {"__file__": os.path.join(ROOT, "setup.py"), "__name__": "setup_helpers"}
    with open(os.path.join(ROOT, "setup.py")) as f:  # the helpers only: stop before the build starts
        exec(compile(f.read().split("def _has_nvcc")[0], "setup.py", "exec"), namespace)
    assert namespace["requirements"]("2.11.0") == ["torch==2.11.0", *ours["requirements"]]
    assert f"torch>={namespace['minimum_torch']()}" == ours["torch"]


@pytest.mark.skipif("SAR_FAST_EXPECT_TORCH" not in os.environ,
                    reason="set by .ci/run's older-torch stage: the torch release installed before sar_fast")
def test_torch_is_the_one_installed_before():
    assert _release(torch.__version__) == os.environ["SAR_FAST_EXPECT_TORCH"]
    assert _torch_requirements() == [f"torch=={os.environ['SAR_FAST_EXPECT_TORCH']}"]
