"""Block-causal scale attention: a token of scale s attends to every token of scales <= s."""
from __future__ import annotations

from typing import Sequence

import torch

from . import backend, reference
from ._checks import check_tensor

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, same_len: bool) -> None:
    check_tensor("q", q, ndim=4, dtypes=_DTYPES)
    B, H, L, D = q.shape
    check_tensor("k", k, ndim=4, dtypes=(q.dtype,), device=q.device,
                 shape=(B, H, L if same_len else None, D))
    check_tensor("v", v, ndim=4, dtypes=(q.dtype,), device=q.device, shape=tuple(k.shape))


def scale_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           scale_lens: Sequence[int], softmax_scale: float | None = None) -> torch.Tensor:
    """q, k, v [B, H, L, D] -> [B, H, L, D]; scale_lens = tokens per scale, summing to L."""
    _check_qkv(q, k, v, same_len=True)
    lens = tuple(int(n) for n in scale_lens)
    if not lens or min(lens) < 1:
        raise ValueError(f"scale_lens must be positive token counts, got {lens}")
    if sum(lens) != q.shape[2]:
        raise ValueError(f"scale_lens sum to {sum(lens)} but q has L={q.shape[2]} tokens")
    backend.select("scale_causal_attention", q, kernel=None)
    return reference.scale_causal_attention(q, k, v, lens, softmax_scale)


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     softmax_scale: float | None = None) -> torch.Tensor:
    """Sampling: the newest scale's queries [B, H, l, D] against the KV cache [B, H, L', D]
    (all earlier scales plus this one); no mask is needed."""
    _check_qkv(q, k, v, same_len=False)
    backend.select("cached_attention", q, kernel=None)
    return reference.cached_attention(q, k, v, softmax_scale)
