"""SSR's draw: guidance mixing, top-k, top-p and an inverse-CDF draw, one token per row.

`sample_survivors(logits, top_k, top_p, uniforms, uncond=None, guidance=0.0)` returns the
tokens of `sar_fast.sampling.sample_survivors` (its PyTorch path is the reference). Which
implementation runs (backend from sar_fast.ops.backend):
- 'auto': on CPU tensors the C++ extension's fused op (csrc/sample_cpu.cpp: one read of
  the vocabulary per row, a radix select of the k candidates and a radix sort of those
  only) when the extension is built; elsewhere the reference (on CUDA, torch.topk and
  the draw over k are already a few kernels over the k candidates);
- 'kernel': the extension's op, an error for CUDA tensors or without the extension;
- 'reference': sar_fast.sampling.sample_survivors.
Both give the same token for the same uniforms except where rounding moves a cumulative
probability across u * total or a tail mass across 1 - top_p (tested on random rows).
"""
from __future__ import annotations

import torch

from .. import _C_loader
from ..sampling import check_draw_arguments
from ..sampling import sample_survivors as reference_sample_survivors
from . import backend
from ._checks import FLOAT_DTYPES


def use_extension(logits: torch.Tensor) -> bool:
    """True when sample_survivors on `logits` runs the extension's fused op under the current backend."""
    return backend.select("sample_survivors", logits, kernel=backend.EXTENSION_CPU) == "kernel"


def sample_survivors(logits: torch.Tensor, top_k: int, top_p: float, uniforms: torch.Tensor,
                     uncond: torch.Tensor | None = None, guidance: float = 0.0) -> torch.Tensor:
    """One draw per row of logits [..., V] -> int64 [...] (see the module docstring).

    uniforms [...] in [0, 1) (e.g. sar_fast.rng.sample_keyed_uniform): row r takes the
    first kept candidate, most likely first, whose cumulative probability exceeds
    uniforms[r] * the kept total. uncond (logits' shape and dtype): classifier-free guidance
    mixed first in fp32, (1 + guidance) * logits - guidance * uncond. top_k == 1 is greedy.
    """
    check_draw_arguments(logits, uniforms, uncond)
    # the fused op takes the ops' float dtypes; float64 logits take the reference
    if (top_k == 1 or logits.dtype not in FLOAT_DTYPES or backend.any_fake(logits, uniforms, uncond)
            or not use_extension(logits)):
        return reference_sample_survivors(logits, top_k, top_p, uniforms=uniforms, uncond=uncond, guidance=guidance)
    shape, V = logits.shape[:-1], logits.shape[-1]
    flat, flat_uncond = logits.reshape(-1, V), None
    if uncond is not None:
        flat_uncond = uncond.reshape(-1, V)
        if flat_uncond.dtype != flat.dtype:  # mix in fp32, as the reference does
            flat, flat_uncond = flat.float(), flat_uncond.float()
    tokens = _C_loader.sample_survivors(flat, flat_uncond, float(guidance), int(top_k),
                                        float(top_p), uniforms.reshape(-1).to(torch.float64))
    return tokens.view(shape)
