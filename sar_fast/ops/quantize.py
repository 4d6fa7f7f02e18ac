"""Multi-scale quantisation: latent [B, C, H, W] -> codes per scale, concatenated [B, L].

The C++/CUDA extension (csrc/, issue #4) will take over here; until then every backend
runs the reference. Ties break to the lowest index on every backend.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..schedules import total_length, validate_schedule
from . import reference
from ._checks import FLOAT_DTYPES, INDEX_DTYPES, check_index_range, check_tensor
from .reference import Phi

_MODES = ("flexvar", "var")


def _check_common(codebook: torch.Tensor, mode: str, device: torch.device) -> None:
    check_tensor("codebook", codebook, ndim=2, dtypes=FLOAT_DTYPES, device=device)
    if codebook.shape[0] < 1 or codebook.shape[1] < 1:
        raise ValueError(f"codebook must be non-empty [V, C], got {tuple(codebook.shape)}")
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")


def msq_encode(latent: torch.Tensor, codebook: torch.Tensor, schedule: Sequence[int],
               mode: str = "flexvar", normalize: bool = True, phi: Phi | None = None,
               return_quantized: bool = False):
    """Codes [B, L] (int64) of `latent` at every scale of `schedule` (see reference.msq_encode).

    latent [B, C, H, W] float, H == W == schedule[-1]; codebook [V, C]. mode='flexvar':
    independent area-downsampled scales (FlexVAR); mode='var': VAR's residual quantisation
    with `phi(h, scale_index, num_scales)` applied to each upsampled embedding.
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
    schedule = validate_schedule(schedule, latent_side=H)
    if phi is not None and not callable(phi):
        raise TypeError(f"phi must be callable (h, scale_index, num_scales) -> h, got {type(phi).__name__}")
    with torch.no_grad():
        return reference.msq_encode(latent, codebook, schedule, mode, normalize, phi, return_quantized)


def msq_decode(codes: torch.Tensor, codebook: torch.Tensor, schedule: Sequence[int],
               mode: str = "flexvar", normalize: bool = True, phi: Phi | None = None) -> torch.Tensor:
    """The latent [B, C, s, s] to decode from codes [B, L] (var: f_hat; flexvar: last scale)."""
    check_tensor("codes", codes, ndim=2, dtypes=INDEX_DTYPES)
    _check_common(codebook, mode, codes.device)
    schedule = validate_schedule(schedule)
    if codes.shape[1] != total_length(schedule):
        raise ValueError(f"codes has {codes.shape[1]} tokens per sample but schedule {schedule} "
                         f"has {total_length(schedule)}")
    check_index_range("codes", codes, codebook.shape[0])
    with torch.no_grad():
        return reference.msq_decode(codes.long(), codebook, schedule, mode, normalize, phi)
