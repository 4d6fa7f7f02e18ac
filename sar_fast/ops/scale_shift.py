"""Scale shift: the model's input sequence built from per-scale code maps or latents.

Input of scale i+1 = scale i embedded and bicubic-upsampled to side s_{i+1} (FlexVAR), or
VAR's residual variant (f_hat accumulation, area-downsampled; reference path only).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..schedules import total_length, validate_schedule
from . import backend, reference
from ._checks import FLOAT_DTYPES, INDEX_DTYPES, check_index_range, check_tensor
from .reference import Phi


def scale_shift(codes: torch.Tensor | None = None, codebook: torch.Tensor | None = None,
                schedule: Sequence[int] = (), *, scales: Sequence[torch.Tensor] | None = None,
                mode: str = "flexvar", phi: Phi | None = None, check_range: bool = True,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Teacher-forcing input [B, L - first_l, C].

    Either `codes` [B, L] (int, concatenated over scales) with `codebook` [V, C] — pass the
    codebook exactly as the model embeds it (FlexVAR: L2-normalised) — or `scales`, a list
    of dense maps [B, C, s_i, s_i] (differentiable). mode='var' adds VAR's residual
    f_hat accumulation through `phi`. `check_range=False` skips the index range check
    (one host sync) for callers that validated the codes upstream.
    """
    schedule = validate_schedule(schedule)
    if mode not in ("flexvar", "var"):
        raise ValueError(f"mode must be 'flexvar' or 'var', got {mode!r}")
    if (codes is None) == (scales is None):
        raise ValueError("pass either codes (with codebook) or scales, not both or neither")
    if codes is not None:
        check_tensor("codes", codes, ndim=2, dtypes=INDEX_DTYPES)
        if codebook is None:
            raise ValueError("codes need a codebook [V, C]")
        check_tensor("codebook", codebook, ndim=2, dtypes=FLOAT_DTYPES, device=codes.device)
        if codes.shape[1] != total_length(schedule):
            raise ValueError(f"codes has {codes.shape[1]} tokens per sample but schedule {schedule} "
                             f"has {total_length(schedule)}")
        if check_range:
            check_index_range("codes", codes, codebook.shape[0])
        maps = reference.embed_scales(codes.long(), codebook, schedule)
        dtype = out_dtype or codebook.dtype
    else:
        if len(scales) != len(schedule):
            raise ValueError(f"scales has {len(scales)} maps but schedule {schedule} has {len(schedule)}")
        first = scales[0]
        for i, (m, s) in enumerate(zip(scales, schedule)):
            check_tensor(f"scales[{i}]", m, ndim=4, dtypes=FLOAT_DTYPES, device=first.device,
                         shape=(first.shape[0], first.shape[1], s, s))
        maps = list(scales)
        dtype = out_dtype or first.dtype
    backend.select("scale_shift", maps[0], kernel=None)
    return reference.scale_shift(maps, schedule, mode, phi).to(dtype)
