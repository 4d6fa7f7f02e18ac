"""Multi-scale quantisation: latent [B, C, H, W] -> codes per scale, concatenated [B, L].

Which implementation runs `msq_encode` (backend from sar_fast.ops.backend):
- 'auto': the C++/CUDA extension sar_fast._C (csrc/msq*.cpp, msq_cuda.cu) when it is
  built (and, for CUDA tensors, built with its CUDA kernels), else the reference;
- 'kernel': the extension, and an error if it cannot run (never a silent fallback; the op
  has no Triton kernel, the extension is its kernel);
- 'reference': sar_fast.ops.reference.msq_encode.
flexvar runs all scales in one extension call; var runs one extension call per scale
(pool + nearest code + embed + bicubic upsample, and the f_hat / residual update when
there is no `phi`), with the Phi convolutions in PyTorch between the calls.
The extension gives the reference's codes and f_hat bit for bit on CPU (x86-64, PyTorch's
AVX2/AVX-512 kernels); on CUDA the codes can differ only where two codes' fp32 scores tie
to within rounding. Ties break to the lowest index on every backend.
`msq_decode` (an embedding gather and bicubic resizes) always runs the reference.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .. import _C_loader
from ..schedules import Schedule
from . import backend, reference
from ._checks import FLOAT_DTYPES, INDEX_DTYPES, check_index_range, check_tensor
from .reference import Phi

_MODES = ("flexvar", "var")


def _check_common(codebook: torch.Tensor, mode: str, device: torch.device) -> None:
    check_tensor("codebook", codebook, ndim=2, dtypes=FLOAT_DTYPES, device=device)
    if codebook.shape[0] < 1 or codebook.shape[1] < 1:
        raise ValueError(f"codebook must be non-empty [V, C], got {tuple(codebook.shape)}")
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")


def use_extension(latent: torch.Tensor) -> bool:
    """True when msq_encode on `latent` runs the C++/CUDA extension under the current backend."""
    return backend.select("msq_encode", latent, kernel=backend.EXTENSION) == "kernel"


def msq_encode(latent: torch.Tensor, codebook: torch.Tensor, schedule: Sequence[int],
               mode: str = "flexvar", normalize: bool = True, phi: Phi | None = None,
               return_quantized: bool = False):
    """Codes [B, L] (int64) of `latent` at every scale of `schedule` (see reference.msq_encode).

    latent [B, C, H, W] float, H == W == schedule[-1]; codebook [V, C]. mode='flexvar':
    independent area-downsampled scales (FlexVAR); mode='var': VAR's residual quantisation
    with `phi(h, scale_index, num_scales)` applied to each upsampled embedding.
    return_quantized: also the list of per-scale maps (flexvar: [B, C, s, s] code vectors;
    var: f_hat after each scale).
    """
    check_tensor("latent", latent, ndim=4, dtypes=FLOAT_DTYPES)
    _check_common(codebook, mode, latent.device)
    B, C, H, W = latent.shape
    if B < 1:
        raise ValueError("latent must hold at least one sample")
    if codebook.shape[1] != C:
        raise ValueError(f"codebook has code dim {codebook.shape[1]} but latent has {C} channels")
    if H != W:
        raise ValueError(f"latent must be square (H == W), got {H}x{W}")
    schedule = Schedule(schedule, latent_side=H)
    if phi is not None and not callable(phi):
        raise TypeError(f"phi must be callable (h, scale_index, num_scales) -> h, got {type(phi).__name__}")
    with torch.no_grad():
        if not use_extension(latent):
            return reference.msq_encode(latent, codebook, schedule, mode, normalize, phi, return_quantized)
        if mode == "flexvar":
            return _flexvar_encode(latent, codebook, schedule, normalize, return_quantized)
        return _var_encode(latent, codebook, schedule, normalize, phi, return_quantized)


def _flexvar_encode(latent: torch.Tensor, codebook: torch.Tensor, schedule: Schedule,
                    normalize: bool, return_quantized: bool):
    codes = _C_loader.msq_encode_flexvar(latent, codebook, schedule, normalize)
    if not return_quantized:
        return codes
    B, C = latent.shape[:2]
    book = F.normalize(codebook.float(), dim=-1) if normalize else codebook.float()
    per_scale = codes.split(schedule.lengths, dim=1)
    return codes, [book[idx].transpose(1, 2).reshape(B, C, s, s) for idx, s in zip(per_scale, schedule)]


def _var_encode(latent: torch.Tensor, codebook: torch.Tensor, schedule: Schedule,
                normalize: bool, phi: Phi | None, return_quantized: bool):
    z = latent.float()
    rest, f_hat = z.clone(), torch.zeros_like(z)
    n = len(schedule)
    codes, quantized = [], []
    for i, side in enumerate(schedule):
        upsample = i != n - 1  # the last scale is already at full resolution
        if phi is None:  # the kernel adds h to f_hat and subtracts it from rest in place
            idx, _ = _C_loader.msq_var_step(rest, f_hat, codebook, side, normalize, upsample)
        else:
            idx, h = _C_loader.msq_var_step(rest, None, codebook, side, normalize, upsample)
            h = phi(h, i, n)
            f_hat = f_hat + h  # out of place, as the reference: keeps its memory formats
            rest = rest - h
        codes.append(idx)
        if return_quantized:
            quantized.append(f_hat.clone())
    out = torch.cat(codes, dim=1)
    return (out, quantized) if return_quantized else out


def msq_decode(codes: torch.Tensor, codebook: torch.Tensor, schedule: Sequence[int],
               mode: str = "flexvar", normalize: bool = True, phi: Phi | None = None) -> torch.Tensor:
    """The latent [B, C, s, s] to decode from codes [B, L] (var: f_hat; flexvar: last scale).
    Always the reference (a gather and bicubic resizes; nothing to fuse worth the code)."""
    check_tensor("codes", codes, ndim=2, dtypes=INDEX_DTYPES)
    _check_common(codebook, mode, codes.device)
    schedule = Schedule(schedule)
    if codes.shape[1] != schedule.total:
        raise ValueError(f"codes has {codes.shape[1]} tokens per sample but schedule {tuple(schedule)} "
                         f"has {schedule.total}")
    check_index_range("codes", codes, codebook.shape[0])
    with torch.no_grad():
        return reference.msq_decode(codes.long(), codebook, schedule, mode, normalize, phi)
