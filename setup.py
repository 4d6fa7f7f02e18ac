"""Build sar_fast and its C++/CUDA extension sar_fast._C.

    pip install --no-build-isolation -e .      # editable install against the installed torch
    python setup.py build_ext --inplace        # extension only, written into sar_fast/

--no-build-isolation is required: the extension must be compiled against the torch that
is already installed (an isolated build would fetch a second, possibly different, torch).

Environment knobs:
    SAR_FAST_NO_CUDA=1      build the C++ (CPU) operators only
    TORCH_CUDA_ARCH_LIST    GPU architectures to compile for (default "8.0;9.0")
    MAX_JOBS                parallel compile jobs (ninja)
    CUDA_HOME / CUDA_PATH   CUDA toolkit root; otherwise taken from `nvcc --dryrun`, then
                            /usr/local/cuda
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
# the Python binding of the extension; the operator sources are listed in csrc/sources.txt
PYTHON_MODULE = "csrc/python_module.cpp"


def read_sources() -> tuple[list[str], list[str]]:
    """(C++ sources, CUDA sources) from csrc/sources.txt, the list CMakeLists.txt also reads.
    A source file in csrc/ that the list forgets is an error, not a silently missing op."""
    listed = [line.strip() for line in (CSRC / "sources.txt").read_text().splitlines()]
    listed = [line for line in listed if line and not line.startswith("#")]
    on_disk = {str(p.relative_to(ROOT)) for p in (*CSRC.glob("*.cpp"), *CSRC.glob("*.cu"))}
    unlisted = sorted(on_disk - set(listed) - {PYTHON_MODULE})
    missing = sorted(set(listed) - on_disk)
    if unlisted or missing:
        sys.exit(f"csrc/sources.txt is out of date: unlisted {unlisted}, missing {missing}")
    return [s for s in listed if not s.endswith(".cu")], [s for s in listed if s.endswith(".cu")]


def minimum_torch() -> str:
    """The oldest supported torch, from pyproject.toml's [tool.sar_fast] (its one definition), e.g. '2.11'."""
    found = re.search(r'^torch = "torch>=([0-9.]+)"', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    if found is None:
        sys.exit('pyproject.toml: no `torch = "torch>=X.Y"` in [tool.sar_fast]')
    return found.group(1)


def requirements(torch_version: str) -> list[str]:
    """pyproject.toml's [tool.sar_fast] requirements, and torch pinned to `torch_version`: the
    extension is compiled against that torch's ABI, and with the pin pip resolves every extra
    (torchvision through torch-fidelity, say) against it instead of upgrading torch."""
    block = re.search(r"^requirements = \[(.*?)^\]", (ROOT / "pyproject.toml").read_text(), re.MULTILINE | re.DOTALL)
    if block is None:
        sys.exit("pyproject.toml: no `requirements = [...]` in [tool.sar_fast]")
    listed = re.findall(r'^\s*"([^"]+)",?\s*$', block.group(1), re.MULTILINE)
    return [f"torch=={torch_version}"] + listed


def installed_torch_release() -> str:
    """The installed torch's public version (2.11.0 for 2.11.0+cu130: the pin must also match
    the same release from another index)."""
    from importlib.metadata import version
    found = re.match(r"\d+(\.\d+)*", version("torch"))
    if found is None:
        sys.exit(f"cannot read the installed torch's version ({version('torch')!r})")
    return found.group(0)


def _has_nvcc(root: str | os.PathLike | None) -> bool:
    return bool(root) and Path(root, "bin", "nvcc").is_file()


def _cuda_home_from_nvcc(nvcc: str) -> str | None:
    """Ask nvcc where it lives. The `nvcc` on PATH may be a wrapper script, in which case
    dirname(dirname(nvcc)) (torch's guess) is not the toolkit; the dry run prints the
    real one as `_HERE_=<root>/bin`."""
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp, "probe.cu")
        probe.write_text("int main() { return 0; }\n")
        try:
            result = subprocess.run(
                [nvcc, "--dryrun", str(probe)],
                capture_output=True, text=True, timeout=120, cwd=tmp,
            )
        except (OSError, subprocess.SubprocessError):
            return None
    for line in (result.stdout + result.stderr).splitlines():
        if "_HERE_=" in line:
            root = Path(line.split("_HERE_=", 1)[1].strip()).parent
            if _has_nvcc(root):
                return str(root)
    return None


def find_cuda_home() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if _has_nvcc(os.environ.get(var)):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        root = _cuda_home_from_nvcc(nvcc)
        if root is not None:
            return root
    return "/usr/local/cuda" if _has_nvcc("/usr/local/cuda") else None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


want_cuda = not _env_flag("SAR_FAST_NO_CUDA")
cuda_home = find_cuda_home() if want_cuda else None
if cuda_home is not None:
    # torch.utils.cpp_extension reads CUDA_HOME once, at import time.
    os.environ["CUDA_HOME"] = cuda_home
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
except ImportError as err:
    sys.exit(
        f"sar_fast builds against an installed PyTorch, which could not be imported ({err}).\n"
        f"Install torch>={minimum_torch()} first, then run `pip install --no-build-isolation -e .` "
        "(or `python setup.py build_ext --inplace`)."
    )

_have = tuple(int(part) for part in re.findall(r"\d+", torch.__version__)[:2])
_need = tuple(int(part) for part in minimum_torch().split(".")[:2])
if _have < _need:
    sys.exit(f"sar_fast needs torch>={minimum_torch()} (pyproject.toml); torch {torch.__version__} is installed")

build_cuda = want_cuda and cuda_home is not None and torch.version.cuda is not None

op_sources, cuda_sources = read_sources()
cpp_sources = op_sources + [PYTHON_MODULE]
# -ffp-contract=off: the quantisation kernels reproduce PyTorch's rounding operation by
# operation (csrc/msq_common.h); the compiler must not fuse a multiply and an add on its own.
cxx_flags = ["-O3", "-ffp-contract=off"]
link_flags: list[str] = []
if sys.platform.startswith("linux"):
    # at::parallel_for only runs in parallel when the caller is compiled with OpenMP; the
    # libgomp that torch already loaded is reused at run time.
    cxx_flags.append("-fopenmp")
    link_flags.append("-fopenmp")

if build_cuda:
    extension = CUDAExtension(
        name="sar_fast._C",
        sources=cpp_sources + cuda_sources,
        include_dirs=[str(CSRC)],
        define_macros=[("SAR_FAST_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
        extra_link_args=link_flags,
    )
else:
    extension = CppExtension(
        name="sar_fast._C",
        sources=cpp_sources,
        include_dirs=[str(CSRC)],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )

print(
    f"sar_fast: building sar_fast._C with CUDA={'on' if build_cuda else 'off'}"
    f" (CUDA_HOME={cuda_home}, TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']},"
    f" torch {torch.__version__})",
    file=sys.stderr,
)

# kernels/ sits at the top level of the repository and is installed as sar_fast.kernels.
kernel_packages = ["sar_fast.kernels"] + [
    f"sar_fast.kernels.{name}" for name in find_packages(where="kernels")
]

setup(
    install_requires=requirements(installed_torch_release()),
    packages=find_packages(include=["sar_fast", "sar_fast.*"]) + kernel_packages,
    package_dir={"sar_fast": "sar_fast", "sar_fast.kernels": "kernels"},
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
