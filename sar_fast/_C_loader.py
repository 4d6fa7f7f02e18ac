"""Lazy access to the compiled extension sar_fast._C and the Python wrappers of its ops.

The extension registers its operators with the dispatcher as torch.ops.sar_fast.*; the
import happens on first use so that the rest of sar_fast works without a compiled build.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

BUILD_HINT = (
    "build it from the repository root with `pip install --no-build-isolation -e .` "
    "or `python setup.py build_ext --inplace`"
)
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_extension: ModuleType | None = None
_import_error: ImportError | None = None


def load_extension() -> ModuleType:
    """Import sar_fast._C (once) and return it; ImportError with build instructions if absent."""
    global _extension, _import_error
    if _extension is not None:
        return _extension
    if _import_error is None:
        try:
            module = importlib.import_module("sar_fast._C")
        except ImportError as err:
            _import_error = err
        else:
            _register_fake_kernels()
            _extension = module
            return module
    raise ImportError(
        f"the sar_fast C++/CUDA extension (sar_fast._C) is not available: {_import_error}; "
        + BUILD_HINT
    ) from _import_error


def has_extension() -> bool:
    """True when sar_fast._C can be imported."""
    try:
        load_extension()
    except ImportError:
        return False
    return True


def cuda_compiled() -> bool:
    """True when the extension exists and was built with its CUDA kernels."""
    return has_extension() and bool(load_extension().cuda_compiled())


def _register_fake_kernels() -> None:
    # Shape-only implementations, so the ops trace under torch.compile / FakeTensor.
    @torch.library.register_fake("sar_fast::nearest_code")
    def _nearest_code_fake(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        _check_nearest_code_inputs(x, codebook)
        return x.new_empty((x.shape[0],), dtype=torch.int64)


def _check_nearest_code_inputs(x: torch.Tensor, codebook: torch.Tensor) -> None:
    for name, value in (("x", x), ("codebook", codebook)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"nearest_code: {name} must be a torch.Tensor, got {type(value).__name__}")
    if x.dim() != 2:
        raise ValueError(f"nearest_code: x must be 2-D [N, C], got shape {tuple(x.shape)}")
    if codebook.dim() != 2:
        raise ValueError(f"nearest_code: codebook must be 2-D [V, C], got shape {tuple(codebook.shape)}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"nearest_code: x must be float32, float16 or bfloat16, got {x.dtype}")
    if codebook.dtype != x.dtype:
        raise TypeError(f"nearest_code: codebook dtype {codebook.dtype} must match x dtype {x.dtype}")
    if x.device != codebook.device:
        raise ValueError(
            f"nearest_code: x and codebook must be on the same device, got x on {x.device} "
            f"and codebook on {codebook.device}"
        )
    if x.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"nearest_code: x has C={x.shape[1]} features per row but codebook has C={codebook.shape[1]}"
        )
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"nearest_code: x must be non-empty (N >= 1, C >= 1), got shape {tuple(x.shape)}")
    if codebook.shape[0] < 1:
        raise ValueError(
            f"nearest_code: codebook must have at least one row (V >= 1), got shape {tuple(codebook.shape)}"
        )


def nearest_code(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook row for every row of x (squared L2, fp32 accumulation).

    x: [N, C], codebook: [V, C], same dtype (float32/float16/bfloat16) and device.
    Returns int64 [N]; ties go to the lowest index. Runs the C++ kernel on CPU tensors and
    the CUDA kernel on CUDA tensors.
    """
    _check_nearest_code_inputs(x, codebook)
    module = load_extension()
    if x.device.type == "cuda" and not module.cuda_compiled():
        raise RuntimeError(
            "nearest_code: x is a CUDA tensor but sar_fast._C was built without CUDA kernels; "
            "rebuild with a CUDA toolkit present (and SAR_FAST_NO_CUDA unset): " + BUILD_HINT
        )
    return torch.ops.sar_fast.nearest_code(x, codebook)
