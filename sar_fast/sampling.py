"""Sampling helpers shared by generation (models/generate.py) and SAR's rollout (sar.py):
the classifier-free-guidance weight of each scale, top-k / top-p draws (over the whole
vocabulary as the public code, or over the k candidates only), driven by a generator or by
given uniforms (the keyed streams of sar_fast.rng). A leaf module: it imports only torch,
so anything may use it.

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


def _check_top_k_top_p(top_k: int, top_p: float) -> None:
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1], got {top_p}")


def top_k_top_p_filter(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """fp32 logits [R, V] with every token that top-k / nucleus filtering drops set to -inf
    (the filter of `sample_top_k_top_p`, which VAR, FlexVAR and SAR's public code use)."""
    _check_top_k_top_p(top_k, top_p)
    V = logits.shape[-1]
    flat = logits.reshape(-1, V).float()
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
    return flat


def sample_top_k_top_p(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0,
                       generator: torch.Generator | None = None,
                       uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """One draw per row of logits [..., V] after top-k / nucleus filtering -> int64 [...].

    top_k > 0 keeps the k largest logits (ties at the k-th are kept); 0 < top_p < 1 drops
    the least likely tokens whose total probability stays within 1 - top_p, so the kept
    set is the smallest whose mass reaches top_p. top_k == 1 is greedy (argmax).

    Sorts and draws over the whole vocabulary (multinomial): the public code's draw, kept
    draw for draw by the `official` objective and by generation. `sample_survivors` draws
    from the same distribution touching the vocabulary once per row.
    `uniforms` ([...], values in [0, 1)) replaces the generator: row r takes the token where
    the cumulative probability first exceeds uniforms[r] (inverse CDF), so each row's draw
    depends on its own noise only, never on the batch it is in (sar_fast.evaluate).
    """
    _check_top_k_top_p(top_k, top_p)
    shape, V = logits.shape[:-1], logits.shape[-1]
    if top_k == 1:
        return logits.reshape(-1, V).float().argmax(-1).view(shape)
    probs = top_k_top_p_filter(logits, top_k, top_p).softmax(-1)
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


# ------------------------------------------------------------------ draws over the survivors
def top_k_top_p_survivors(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0):
    """The candidates of a top-k / top-p draw from fp32 logits [R, V], in one pass over V.

    Returns (probs [R, K] fp32, token [R, K] int64 or None, keep [R, K] bool or None):
    probs are the softmax over the K candidates, most likely first when `token` is given
    (token = their vocabulary ids; None means the candidates are the whole vocabulary in
    order, K = V, nothing to sort); keep (None: all) is a prefix of each row: the
    candidates that nucleus filtering keeps.

    Candidates: torch.topk's k (one pass over V; already sorted), or, with top_k == 0 and
    a nucleus, the sorted vocabulary. The nucleus rule is `top_k_top_p_filter`'s, applied
    to the k candidates only: a token is kept when its probability plus that of every less
    likely candidate exceeds 1 - top_p; the most likely one always is.

    Ties at the k-th logit: the filter keeps every token equal to the k-th largest (k + t
    tokens), this keeps exactly k, which of the tied ones being torch.topk's choice. The
    two differ only on rows where the k-th logit is tied with a token outside the top k:
    there the t extra tied tokens (each no more likely than the k-th) are never drawn,
    and their mass is missing from the softmax that the nucleus is cut on, so the nucleus
    may end one candidate earlier. With fp32 logits such rows are rare; with bf16 logits
    common, the mass at stake at most t times the k-th probability (tested both ways).
    Among equal logits only the count kept matters (equal probabilities).
    """
    _check_top_k_top_p(top_k, top_p)
    if logits.dim() != 2:
        raise ValueError(f"logits must be [rows, vocab], got shape {tuple(logits.shape)}")
    flat = logits.float()
    V = flat.shape[-1]
    nucleus = 0.0 < top_p < 1.0
    token = None
    if 0 < top_k < V:
        flat, token = flat.topk(top_k, dim=-1)  # sorted, descending
    elif nucleus:
        flat, token = flat.sort(dim=-1, descending=True)
    probs = flat.softmax(-1)
    keep = None
    if nucleus:
        # tail mass of each candidate: itself + every less likely one (an ascending cumsum
        # over K, as the filter's over V, whose extra terms are exact zeros)
        tail = probs.flip(-1).cumsum(-1).flip(-1)
        keep = tail > 1.0 - top_p
        keep[:, 0] = True
    return probs, token, keep


def draw_from_survivors(probs: torch.Tensor, token: torch.Tensor | None, keep: torch.Tensor | None,
                        uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw -> int64 [R]: row r takes the first candidate whose cumulative
    (kept) probability exceeds uniforms[r] * the kept total (uniforms in [0, 1), [R])."""
    R, K = probs.shape
    if uniforms.shape != (R,):
        raise ValueError(f"uniforms must be [{R}] (one per row), got shape {tuple(uniforms.shape)}")
    weight = probs if keep is None else probs * keep
    cdf = weight.cumsum(-1, dtype=torch.float64)  # fp64: a token of probability 1e-9 is drawn as often as it should be
    target = (uniforms.to(cdf.device, torch.float64) * cdf[:, -1]).unsqueeze(-1)
    pick = torch.searchsorted(cdf, target, right=True)
    # u * total can round up to total: fall back on the last kept candidate, never a dropped one
    pick = pick.clamp_(max=K - 1) if keep is None else torch.minimum(pick, keep.sum(-1, keepdim=True) - 1)
    pick = pick.squeeze(-1)
    return pick if token is None else token.gather(-1, pick.unsqueeze(-1)).squeeze(-1)


def check_draw_arguments(logits, uniforms=None, uncond=None) -> None:
    """The shape checks of one draw per row of logits [..., V] (this module's draws and
    ops.sample_survivors): uniforms [...] one per row, uncond the logits' shape."""
    def describe(x):
        return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__
    if not isinstance(logits, torch.Tensor) or logits.dim() < 1:
        raise ValueError(f"logits must be a tensor [..., V], got {describe(logits)}")
    if uncond is not None and (not isinstance(uncond, torch.Tensor) or uncond.shape != logits.shape):
        raise ValueError(f"uncond must have the logits' shape {tuple(logits.shape)}, got {describe(uncond)}")
    if uniforms is not None and (not isinstance(uniforms, torch.Tensor) or uniforms.shape != logits.shape[:-1]):
        raise ValueError(f"uniforms must have shape {tuple(logits.shape[:-1])} (one per row of logits), "
                         f"got {describe(uniforms)}")


def sample_survivors(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0,
                     uniforms: torch.Tensor | None = None, generator: torch.Generator | None = None,
                     uncond: torch.Tensor | None = None, guidance: float = 0.0) -> torch.Tensor:
    """`sample_top_k_top_p`'s distribution, drawn over the top-k candidates only (one
    topk over V per row; the nucleus cumsum, the softmax and the draw over k): int64 [...].

    uncond (same shape as logits) mixes classifier-free guidance first, in fp32:
    (1 + guidance) * logits - guidance * uncond. uniforms [...] in [0, 1): the draws'
    randomness (e.g. sar_fast.rng.sample_keyed_uniform), so a caller or a test can fix it; without
    them, torch.rand with `generator`. top_k == 1 is greedy. Ties at the k-th: see
    `top_k_top_p_survivors`.
    """
    check_draw_arguments(logits, uniforms, uncond)
    shape, V = logits.shape[:-1], logits.shape[-1]
    flat = logits.reshape(-1, V).float()
    if uncond is not None:
        flat = torch.lerp(uncond.reshape(-1, V).float(), flat, 1.0 + guidance)  # (1+t)*cond - t*uncond
    if top_k == 1:
        _check_top_k_top_p(top_k, top_p)
        return flat.argmax(-1).view(shape)
    probs, token, keep = top_k_top_p_survivors(flat, top_k, top_p)
    if uniforms is None:
        uniforms = torch.rand(flat.shape[0], generator=generator, device=flat.device, dtype=torch.float64)
    return draw_from_survivors(probs, token, keep, uniforms.reshape(-1)).view(shape)
