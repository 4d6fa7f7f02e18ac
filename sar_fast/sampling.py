"""Sampling helpers shared by generation (models/generate.py) and SAR's rollout (sar.py):
the classifier-free-guidance weight of each scale and top-k / top-p draws. A leaf module:
it imports only torch, so anything may use it.

Guidance mixes the conditional and null-class logits as (1 + t) * cond - t * uncond, with
the weight t ramped over the scales:

- 'linear'  (VAR):      t = cfg * si / (n - 1)
- 'flexvar' (FlexVAR):  t = cfg * si / min(n - 1, 9); sides beyond 16 get t = cfg, and
  sides beyond 16 or outside FlexVAR's list (1..6, 8, 10, 13, 16, 23, 24, 32) are greedy
- 'sar'     (SAR's SSR sampling during training): t = cfg * (1 + si / (n - 1)) / 2
- 'constant' (LlamaGen-style): t = cfg - 1, i.e. uncond + cfg * (cond - uncond)
"""
from __future__ import annotations

import torch

CFG_RAMPS = ("linear", "flexvar", "sar", "constant")
FLEXVAR_TRAINED_SIDES = frozenset((1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 23, 24, 32))


def guidance_weight(ramp: str, cfg: float, si: int, num_scales: int) -> float:
    """t for scale `si` of `num_scales` (see the module docstring)."""
    last = max(num_scales - 1, 1)
    if ramp == "linear":
        return cfg * si / last
    if ramp == "flexvar":
        return cfg * si / min(last, 9)
    if ramp == "sar":
        return cfg * 0.5 * (1 + si / last)
    if ramp == "constant":
        return cfg - 1.0
    raise ValueError(f"cfg_ramp must be one of {CFG_RAMPS}, got {ramp!r}")


def sample_top_k_top_p(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0,
                       generator: torch.Generator | None = None,
                       uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """One draw per row of logits [..., V] after top-k / nucleus filtering -> int64 [...].

    top_k > 0 keeps the k largest logits (ties at the k-th are kept); 0 < top_p < 1 drops
    the least likely tokens whose total probability stays within 1 - top_p, so the kept
    set is the smallest whose mass reaches top_p. top_k == 1 is greedy (argmax).
    `uniforms` ([...], values in [0, 1)) replaces the generator: row r takes the token where
    the cumulative probability first exceeds uniforms[r] (inverse CDF), so each row's draw
    depends on its own noise only, never on the batch it is in.
    """
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1], got {top_p}")
    shape, V = logits.shape[:-1], logits.shape[-1]
    flat = logits.reshape(-1, V).float()
    if top_k == 1:
        return flat.argmax(-1).view(shape)
    if 0 < top_k < V:
        kth = flat.topk(top_k, dim=-1).values[:, -1:]
        flat = flat.masked_fill(flat < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, order = flat.sort(dim=-1)  # ascending
        tail_mass = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = tail_mass <= 1.0 - top_p
        drop_sorted[:, -1] = False  # always keep the most likely token
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        flat = flat.masked_fill(drop, float("-inf"))
    probs = flat.softmax(-1)
    if uniforms is not None:
        if uniforms.shape != shape:
            raise ValueError(f"uniforms must have shape {tuple(shape)} (one per row of logits), "
                             f"got {tuple(uniforms.shape)}")
        cdf = probs.double().cumsum(-1)
        target = uniforms.reshape(-1, 1).to(cdf) * cdf[:, -1:]
        # right=True skips zero-probability tokens (their cdf equals their predecessor's)
        idx = torch.searchsorted(cdf, target, right=True).clamp_(max=V - 1)
        return idx.view(shape)
    return torch.multinomial(probs, 1, generator=generator).view(shape)
