"""Head + cross-entropy with per-token weights, label smoothing and ignore_index."""
from __future__ import annotations

import torch

from . import backend, reference
from ._checks import FLOAT_DTYPES, INDEX_DTYPES, check_index_range, check_tensor


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                               target: torch.Tensor, token_weight: torch.Tensor | None = None,
                               label_smoothing: float = 0.0, ignore_index: int = -100,
                               reduction: str = "mean", return_stats: bool = False):
    """CE of hidden [N, C] @ weight[V, C].T + bias [V] against target [N] (see
    reference.linear_cross_entropy for the exact reductions and stats)."""
    check_tensor("hidden", hidden, ndim=2, dtypes=FLOAT_DTYPES)
    N, C = hidden.shape
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES, device=hidden.device, shape=(None, C))
    V = weight.shape[0]
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES, device=hidden.device, shape=(V,))
    check_tensor("target", target, ndim=1, dtypes=INDEX_DTYPES, device=hidden.device, shape=(N,))
    if token_weight is not None:
        check_tensor("token_weight", token_weight, ndim=1, dtypes=FLOAT_DTYPES, device=hidden.device, shape=(N,))
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")
    kept = target[target != ignore_index]
    check_index_range("target", kept, V, what="vocabulary size")
    backend.select("fused_linear_cross_entropy", hidden, kernel=None)
    return reference.linear_cross_entropy(hidden, weight, bias, target.long(), token_weight,
                                          label_smoothing, ignore_index, reduction, return_stats)
