"""Teacher-forcing NLL per scale and the exposure gap, on held-out data.

Exposure gap of scale s >= 1: the cross-entropy of the ground-truth codes of scale s when
the input built from scale s-1 is the model's own prediction of s-1 (its argmax, or a
draw from its teacher-forced distribution), minus the same cross-entropy with the
ground-truth map of s-1 as input; averaged over the tokens of scale s. Every other scale's
input stays ground truth, so the gap measures one transition at a time: how much worse the
model does when it has to continue from what it predicted itself (exposure bias).

A smaller gap alone is not a quality gain (every student-forcing variant shrinks it,
including harmful ones); report it next to the NLL and sample metrics.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import ops
from ..schedules import Schedule

PREDICTIONS = ("argmax", "sample")


@dataclass
class ExposureGap:
    gap: torch.Tensor          # [n-1] float64: ce_own - ce_gt, scales 1..n-1
    ce_own: torch.Tensor       # [n-1] mean CE of scale s with the input from the predicted s-1
    ce_gt: torch.Tensor        # [n-1] mean CE of scale s with the ground-truth input
    tokens: torch.Tensor       # [n-1] tokens per image of each scale (s*s)
    predictions: list[torch.Tensor]  # [B, s*s] predicted codes of scales 0..n-2

    @property
    def mean(self) -> float:
        """Token-weighted mean gap over scales 1..n-1."""
        return float((self.gap * self.tokens).sum() / self.tokens.sum())


def _check(model, labels: torch.Tensor, codes: torch.Tensor, schedule) -> Schedule:
    schedule = Schedule(schedule)
    if len(schedule) < 2:
        raise ValueError(f"the exposure gap needs at least two scales, got schedule {schedule}")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
        raise ValueError(f"labels must be a tensor [B], got {getattr(labels, 'shape', labels)}")
    if not isinstance(codes, torch.Tensor) or codes.dim() != 2 or codes.shape[0] != labels.shape[0]:
        raise ValueError(f"codes must be [B, L] with B = {labels.shape[0]}, got {getattr(codes, 'shape', codes)}")
    if codes.shape[1] != schedule.total:
        raise ValueError(f"codes has {codes.shape[1]} tokens but schedule {schedule} has {schedule.total}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= model.vocab_size):
        raise ValueError(f"codes must lie in [0, {model.vocab_size}), got [{int(codes.min())}, {int(codes.max())}]")
    return schedule


def _inputs(model, codes: torch.Tensor, schedule, codebook: torch.Tensor, phi) -> torch.Tensor:
    return ops.scale_shift(codes, codebook, schedule, mode=model.arch, phi=phi, out_dtype=torch.float32)


def _per_token_ce(logits: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).double(), codes.reshape(-1), reduction="none").view(codes.shape)


@torch.no_grad()
def teacher_forcing_nll(model, labels: torch.Tensor, codes: torch.Tensor, schedule, codebook: torch.Tensor,
                        phi=None) -> dict:
    """{'per_token': mean CE over every token, 'per_scale': [n] mean CE of each scale}
    (nats, float) of the model on ground-truth inputs."""
    schedule = _check(model, labels, codes, schedule)
    off = schedule.offsets
    ce = _per_token_ce(model(labels, _inputs(model, codes, schedule, codebook, phi), schedule), codes)
    return {"per_token": float(ce.mean()),
            "per_scale": [float(ce[:, off[i]:off[i + 1]].mean()) for i in range(len(schedule))]}


@torch.no_grad()
def exposure_gap(model, labels: torch.Tensor, codes: torch.Tensor, schedule, codebook: torch.Tensor,
                 phi=None, prediction: str = "argmax", generator: torch.Generator | None = None) -> ExposureGap:
    """The exposure gap of every scale s >= 1 (see the module's docstring).

    prediction: 'argmax' of the teacher-forced logits of scale s-1, or 'sample' (one draw
    per token from their softmax, with `generator`). One forward per scale s on the prefix
    of scales <= s; the model should be in eval mode (no label dropout).
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    schedule = _check(model, labels, codes, schedule)
    n, off, B = len(schedule), schedule.offsets, codes.shape[0]
    x_gt = _inputs(model, codes, schedule, codebook, phi)           # [B, L-1, C]: input of token t+1 at t
    logits = model(labels, x_gt, schedule)
    ce_gt_tok = _per_token_ce(logits, codes)

    preds = []
    for si in range(n - 1):
        scale_logits = logits[:, off[si]:off[si + 1]].float()
        if prediction == "argmax":
            preds.append(scale_logits.argmax(-1))
        else:
            probs = scale_logits.softmax(-1).reshape(-1, scale_logits.shape[-1])
            preds.append(torch.multinomial(probs, 1, generator=generator).view(B, -1))

    # variant s: ground-truth inputs except scale s's, rebuilt with scale s-1 predicted; the
    # block-causal mask lets scale s see scales <= s only, so the prefix up to s suffices
    ce_own = []
    for s in range(1, n):
        mixed = codes.clone()
        mixed[:, off[s - 1]:off[s]] = preds[s - 1]
        x = x_gt[:, :off[s + 1] - 1].clone()
        x[:, off[s] - 1:] = _inputs(model, mixed, schedule, codebook, phi)[:, off[s] - 1:off[s + 1] - 1]
        own_logits = model(labels, x, schedule[:s + 1])[:, off[s]:]
        ce_own.append(_per_token_ce(own_logits, codes[:, off[s]:off[s + 1]]).mean())
    ce_own = torch.stack(ce_own)
    ce_gt = torch.stack([ce_gt_tok[:, off[s]:off[s + 1]].mean() for s in range(1, n)])
    tokens = torch.tensor([float(side * side) for side in schedule[1:]], dtype=torch.float64)
    return ExposureGap(ce_own - ce_gt, ce_own, ce_gt, tokens, preds)
