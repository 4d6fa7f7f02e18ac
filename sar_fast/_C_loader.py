"""Lazy access to the compiled extension sar_fast._C and the Python wrappers of its ops.

The extension registers its operators with the dispatcher as torch.ops.sar_fast.*; the
import happens on first use so that the rest of sar_fast works without a compiled build.
"""

from __future__ import annotations

import contextlib
import importlib
from types import ModuleType
from typing import Iterator, Sequence

import torch

BUILD_HINT = (
    "build it from the repository root with `pip install --no-build-isolation -e .` "
    "or `python setup.py build_ext --inplace`"
)

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
    @torch.library.register_fake("sar_fast::msq_encode_flexvar")
    def _msq_encode_flexvar_fake(latent: torch.Tensor, codebook: torch.Tensor,
                                 schedule: list[int], normalize: bool) -> torch.Tensor:
        return latent.new_empty((latent.shape[0], sum(s * s for s in schedule)), dtype=torch.int64)

    @torch.library.register_fake("sar_fast::msq_var_step")
    def _msq_var_step_fake(rest: torch.Tensor, f_hat: torch.Tensor | None, codebook: torch.Tensor,
                           side: int, normalize: bool, upsample: bool) -> tuple[torch.Tensor, torch.Tensor]:
        B, C, H, W = rest.shape
        codes = rest.new_empty((B, side * side), dtype=torch.int64)
        if f_hat is not None:
            return codes, rest.new_empty((0,))
        # the layout msq_var_step gives h: that of codebook[codes] viewed as [B, C, side, side]
        h = rest.new_empty((B, side * side, C)).transpose(1, 2).reshape(B, C, side, side)
        if upsample:
            h = rest.new_empty((B, C, H, W)).contiguous(memory_format=_memory_format_of(h))
        return codes, h


    @torch.library.register_fake("sar_fast::sample_survivors")
    def _sample_survivors_fake(logits: torch.Tensor, uncond: torch.Tensor | None, guidance: float, top_k: int,
                               top_p: float, uniforms: torch.Tensor) -> torch.Tensor:
        return logits.new_empty((logits.shape[0],), dtype=torch.int64)


def _memory_format_of(t: torch.Tensor) -> torch.memory_format:
    """ATen's suggest_memory_format (what the C++ op uses to lay out h)."""
    from torch._prims_common import suggest_memory_format
    return suggest_memory_format(t)


def _extension_for(op: str, device: torch.device) -> ModuleType:
    module = load_extension()
    if device.type == "cuda" and not module.cuda_compiled():
        raise RuntimeError(
            f"{op}: the tensors are on CUDA but sar_fast._C was built without CUDA kernels; "
            "rebuild with a CUDA toolkit present (and SAR_FAST_NO_CUDA unset): " + BUILD_HINT
        )
    return module


def msq_encode_flexvar(latent: torch.Tensor, codebook: torch.Tensor, schedule: Sequence[int],
                       normalize: bool) -> torch.Tensor:
    """FlexVAR codes [B, L] (int64) of every scale of `schedule` in one call of the extension.

    latent [B, C, H, W] and codebook [V, C] (float32/float16/bfloat16, one device); each side
    in [1, min(H, W)]. Same codes as sar_fast.ops.reference.msq_encode(mode='flexvar').
    The C++ side validates and raises ValueError/TypeError on bad input.
    """
    _extension_for("msq_encode_flexvar", latent.device)
    return torch.ops.sar_fast.msq_encode_flexvar(latent, codebook, [int(s) for s in schedule], bool(normalize))


def msq_var_step(rest: torch.Tensor, f_hat: torch.Tensor | None, codebook: torch.Tensor, side: int,
                 normalize: bool, upsample: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale of VAR's residual quantiser (pool rest, nearest code, embed, bicubic upsample).

    rest [B, C, H, W] float32. With f_hat: f_hat += h and rest -= h in place, h comes back
    empty; without: h [B, C, H, W] (or [B, C, side, side] when not upsampling) is returned.
    Returns (codes [B, side * side] int64, h).
    """
    _extension_for("msq_var_step", rest.device)
    return torch.ops.sar_fast.msq_var_step(rest, f_hat, codebook, int(side), bool(normalize), bool(upsample))


def sample_survivors(logits: torch.Tensor, uncond: torch.Tensor | None, guidance: float, top_k: int,
                     top_p: float, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row of CPU logits [R, V] (int64 [R]): guidance mixing, top-k, top-p and
    the inverse-CDF draw with uniforms [R] (float64) fused per row (csrc/sample_cpu.cpp);
    the distribution of sar_fast.sampling.sample_survivors. The C++ side validates."""
    _extension_for("sample_survivors", logits.device)
    return torch.ops.sar_fast.sample_survivors(logits, uncond, float(guidance), int(top_k), float(top_p), uniforms)


def cpu_isas() -> list[str]:
    """Instruction-set variants of the CPU quantisation kernels this CPU supports, best first."""
    return list(load_extension().cpu_isas())


def cpu_isa() -> str:
    """The CPU kernel variant in use (all variants give identical results)."""
    return str(load_extension().cpu_isa())


@contextlib.contextmanager
def use_cpu_isa(name: str) -> Iterator[None]:
    """Run the CPU quantisation kernels with another supported variant (tests, benchmarks)."""
    module = load_extension()
    previous = module.cpu_isa()
    module.set_cpu_isa(name)
    try:
        yield
    finally:
        module.set_cpu_isa(previous)
