"""Loss modules a trainer calls with hidden states instead of `head(x)` followed by a loss:
the [N, V] logits are never materialised on the fused path.

    loss_fn = FusedLinearCrossEntropy(model.head, label_smoothing=0.1)
    with sar_fast.patch.hidden_states(model):       # the model returns the head's input
        h = model(label_B, x_BLCv)                  # [B, L, C]
    loss_BL = loss_fn(h, gt_BL)                     # == CrossEntropyLoss(reduction='none') on head(h)

The head is referenced, not registered: the loss module owns no parameters, so the model's
parameters, optimiser groups and state_dict() stay exactly as they were.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import ops as _ops

__all__ = ["FusedLinearCrossEntropy", "FusedLinearKLDiv"]

_REDUCTIONS = ("none", "mean", "sum")


def _check_head(head) -> nn.Linear:
    if not isinstance(head, nn.Linear):
        raise TypeError(f"head must be a torch.nn.Linear (the classifier), got {type(head).__name__}")
    return head


def _check_reduction(reduction: str) -> str:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    return reduction


def _flat_hidden(head: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    if hidden.dim() < 1 or hidden.shape[-1] != head.in_features:
        raise ValueError(f"hidden must be [..., {head.in_features}] (the head's in_features), "
                         f"got {tuple(hidden.shape)}")
    return hidden.reshape(-1, head.in_features)


def _flat_weight(name: str, w: torch.Tensor | None, lead: torch.Size) -> torch.Tensor | None:
    if w is None:
        return None
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != tuple(lead):
        got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"{name} must have shape {tuple(lead)} (one weight per token), got {got}")
    return w.reshape(-1)


def _shaped(loss: torch.Tensor, lead: torch.Size, reduction: str) -> torch.Tensor:
    return loss.view(lead) if reduction == "none" else loss


class FusedLinearCrossEntropy(nn.Module):
    """CE of `head(hidden)` against `target`, as nn.CrossEntropyLoss(label_smoothing,
    ignore_index, reduction) on the logits would give it, times per-token weights.

    forward(hidden [..., C], target [...], token_weight [...] | None) -> per-token loss [...]
    (reduction 'none', the default: w_i * CE_i, 0 where target == ignore_index), or the sum,
    or the weighted mean sum_i w_i CE_i / sum_i w_i over the tokens not ignored ('mean').
    """

    def __init__(self, head: nn.Linear, label_smoothing: float = 0.0, ignore_index: int = -100,
                 reduction: str = "none"):
        super().__init__()
        self._head = (_check_head(head),)  # a tuple: referenced, not registered
        if not 0.0 <= float(label_smoothing) < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing, self.ignore_index = float(label_smoothing), int(ignore_index)
        self.reduction = _check_reduction(reduction)

    @property
    def head(self) -> nn.Linear:
        return self._head[0]

    def forward(self, hidden: torch.Tensor, target: torch.Tensor,
                token_weight: torch.Tensor | None = None) -> torch.Tensor:
        h = _flat_hidden(self.head, hidden)
        lead = hidden.shape[:-1]
        if not isinstance(target, torch.Tensor) or tuple(target.shape) != tuple(lead):
            got = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
            raise ValueError(f"target must have shape {tuple(lead)} (hidden's leading dims), got {got}")
        loss = _ops.fused_linear_cross_entropy(
            h, self.head.weight, self.head.bias, target.reshape(-1), _flat_weight("token_weight", token_weight, lead),
            label_smoothing=self.label_smoothing, ignore_index=self.ignore_index, reduction=self.reduction)
        return _shaped(loss, lead, self.reduction)

    def extra_repr(self) -> str:
        return (f"head={self.head.in_features}->{self.head.out_features}, label_smoothing={self.label_smoothing}, "
                f"ignore_index={self.ignore_index}, reduction={self.reduction!r}")


class FusedLinearKLDiv(nn.Module):
    """KL(p_teacher || p_student) per token with the student's logits = head(hidden) / T and the
    teacher's given as logits [..., V] or as hidden states [..., C] through the same head
    (then never materialised either); the teacher side gets no gradient.

    forward(hidden, target_logits=None, target_hidden=None, token_weight=None): reduction as
    FusedLinearCrossEntropy. No T^2 factor.
    """

    def __init__(self, head: nn.Linear, temperature: float = 1.0, reduction: str = "none"):
        super().__init__()
        self._head = (_check_head(head),)
        self.temperature = float(temperature)
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.reduction = _check_reduction(reduction)

    @property
    def head(self) -> nn.Linear:
        return self._head[0]

    def forward(self, hidden: torch.Tensor, target_logits: torch.Tensor | None = None,
                target_hidden: torch.Tensor | None = None, token_weight: torch.Tensor | None = None) -> torch.Tensor:
        h = _flat_hidden(self.head, hidden)
        lead = hidden.shape[:-1]
        if (target_logits is None) == (target_hidden is None):
            raise ValueError("pass exactly one of target_logits [..., V] or target_hidden [..., C]")
        t_logits = None if target_logits is None else target_logits.reshape(-1, target_logits.shape[-1])
        t_hidden = None if target_hidden is None else target_hidden.reshape(-1, target_hidden.shape[-1])
        loss = _ops.fused_linear_kl_div(h, self.head.weight, self.head.bias, target_logits=t_logits,
                                        target_hidden=t_hidden,
                                        token_weight=_flat_weight("token_weight", token_weight, lead),
                                        reduction=self.reduction, temperature=self.temperature)
        return _shaped(loss, lead, self.reduction)

    def extra_repr(self) -> str:
        return f"head={self.head.in_features}->{self.head.out_features}, temperature={self.temperature}, " \
               f"reduction={self.reduction!r}"
