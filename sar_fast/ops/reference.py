"""Pure-PyTorch references: the oracles every fast kernel is tested against.

They favour clarity over speed and do no input validation (the public wrappers in
sar_fast.ops validate). Semantics follow FlexVAR/VAR exactly: bicubic is PyTorch's
`F.interpolate(mode='bicubic', align_corners=False)`, area is `mode='area'`.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Callable, Sequence, Union

import torch
import torch.nn.functional as F

from ..schedules import Schedule

# phi(h_BChw, scale_index, num_scales) -> h_BChw: VAR's shared 3x3 convs for one scale.
Phi = Callable[[torch.Tensor, int, int], torch.Tensor]
Transitions = Union[str, int, Sequence[int]]


# ----------------------------------------------------------------------------------------
# scale shift: the teacher-forcing input built from per-scale code maps
# ----------------------------------------------------------------------------------------
def embed_scales(codes_BL: torch.Tensor, codebook: torch.Tensor,
                 schedule: Sequence[int]) -> list[torch.Tensor]:
    """Split concatenated codes [B, L] by scale and embed them: list of [B, C, s, s]."""
    B = codes_BL.shape[0]
    maps, start = [], 0
    for s in schedule:
        emb = codebook[codes_BL[:, start:start + s * s]]  # B, s*s, C
        maps.append(emb.transpose(1, 2).reshape(B, codebook.shape[1], s, s))
        start += s * s
    return maps


def scale_shift(scales: list[torch.Tensor], schedule: Sequence[int], mode: str = "flexvar",
                phi: Phi | None = None) -> torch.Tensor:
    """Teacher-forcing input [B, L - first_l, C] from per-scale maps [B, C, s_i, s_i].

    flexvar: the input of scale i+1 is scale i bicubic-upsampled to s_{i+1}.
    var: f_hat accumulates phi(bicubic(scale i -> last side)) and the input of scale i+1
    is f_hat area-downsampled to s_{i+1} (VAR's idxBl_to_var_input).
    """
    B, C = scales[0].shape[:2]
    n, last = len(schedule), schedule[-1]
    pieces = []
    if mode == "flexvar":
        for i in range(n - 1):
            up = F.interpolate(scales[i].float(), size=(schedule[i + 1],) * 2, mode="bicubic")
            pieces.append(up.flatten(2).transpose(1, 2))
    elif mode == "var":
        f_hat = scales[0].new_zeros(B, C, last, last, dtype=torch.float32)
        for i in range(n - 1):
            h = F.interpolate(scales[i].float(), size=(last, last), mode="bicubic")
            f_hat = f_hat + (phi(h, i, n) if phi is not None else h)
            nxt = F.interpolate(f_hat, size=(schedule[i + 1],) * 2, mode="area")
            pieces.append(nxt.flatten(2).transpose(1, 2))
    else:
        raise ValueError(f"mode must be 'flexvar' or 'var', got {mode!r}")
    if not pieces:
        return scales[0].new_zeros(B, 0, C, dtype=torch.float32)
    return torch.cat(pieces, dim=1)


# ----------------------------------------------------------------------------------------
# block-causal scale attention
# ----------------------------------------------------------------------------------------
@lru_cache(maxsize=64)
def _scale_mask_cpu(scale_lens: tuple[int, ...]) -> torch.Tensor:
    scale_id = torch.repeat_interleave(torch.arange(len(scale_lens)), torch.tensor(scale_lens))
    return scale_id[:, None] >= scale_id[None, :]  # L x L, True = may attend


def scale_causal_mask(scale_lens: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean [L, L] mask: a token of scale s may attend to every token of scales <= s."""
    return _scale_mask_cpu(tuple(int(n) for n in scale_lens)).to(device)


def scale_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           scale_lens: Sequence[int], softmax_scale: float | None = None) -> torch.Tensor:
    """q, k, v [B, H, L, D] -> [B, H, L, D] under the block-causal scale mask (dense SDPA)."""
    mask = scale_causal_mask(scale_lens, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=softmax_scale)


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     softmax_scale: float | None = None) -> torch.Tensor:
    """Inference: one scale's queries [B, H, l, D] against every cached key [B, H, L', D]."""
    return F.scaled_dot_product_attention(q, k, v, scale=softmax_scale)


def padded_scale_causal_mask(scale_lens: Sequence[int], pad: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean [L + pad, L + pad] mask of Infinity's SDPA bias: the block-causal mask over the
    real tokens, then `pad` rows that see token 0 only; no real row sees a padded key."""
    L = sum(int(n) for n in scale_lens)
    mask = torch.zeros(L + pad, L + pad, dtype=torch.bool)
    mask[:L, :L] = _scale_mask_cpu(tuple(int(n) for n in scale_lens))
    mask[L:, 0] = True
    return mask.to(device)


def padded_scale_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale_lens: Sequence[int],
                                  pad: int, softmax_scale: float | None = None) -> torch.Tensor:
    """Infinity's padded layout through dense SDPA (see padded_scale_causal_mask)."""
    mask = padded_scale_causal_mask(scale_lens, pad, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=softmax_scale)


def padded_cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pad: int,
                            softmax_scale: float | None = None) -> torch.Tensor:
    """Sampling with a padded query block: the first rows see every cached key, the last
    `pad` rows key 0 only."""
    mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device)
    if pad:
        mask[-pad:] = False
        mask[-pad:, 0] = True
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=softmax_scale)


# ----------------------------------------------------------------------------------------
# head + cross-entropy
# ----------------------------------------------------------------------------------------
def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         target: torch.Tensor, token_weight: torch.Tensor | None = None,
                         label_smoothing: float = 0.0, ignore_index: int = -100,
                         reduction: str = "mean", return_stats: bool = False):
    """Cross-entropy of logits = hidden @ weight.T + bias, computed in fp32.

    Per token: loss_i = w_i * CE_i (0 where target == ignore_index). Reductions:
    'none' -> [N]; 'sum' -> sum_i loss_i; 'mean' -> sum_i loss_i / sum_i w_i over the
    tokens not ignored (the plain mean without weights; VAR's 1/L weights give the mean).
    return_stats adds (per-token unweighted CE, argmax, log-sum-exp), each [N].
    """
    logits = F.linear(hidden.float(), weight.float(), None if bias is None else bias.float())
    ce = F.cross_entropy(logits, target, ignore_index=ignore_index,
                         label_smoothing=label_smoothing, reduction="none")
    valid = target != ignore_index
    w = torch.ones_like(ce) if token_weight is None else token_weight.float()
    w = torch.where(valid, w, torch.zeros_like(w))
    per_token = ce * w
    if reduction == "none":
        loss = per_token
    elif reduction == "sum":
        loss = per_token.sum()
    elif reduction == "mean":
        loss = per_token.sum() / w.sum()
    else:
        raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")
    if not return_stats:
        return loss
    with torch.no_grad():
        stats = (ce.detach(), logits.argmax(dim=-1), torch.logsumexp(logits, dim=-1))
    return loss, stats


# ----------------------------------------------------------------------------------------
# multi-scale quantisation
# ----------------------------------------------------------------------------------------
def nearest_code(z_NC: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook row (squared L2, fp32); ties -> lowest index."""
    z, e = z_NC.float(), codebook.float()
    d = z.square().sum(1, keepdim=True) + e.square().sum(1) - 2.0 * (z @ e.T)
    return d.argmin(dim=1)  # argmin returns the first minimum


def msq_encode(latent: torch.Tensor, codebook: torch.Tensor, schedule: Sequence[int],
               mode: str = "flexvar", normalize: bool = True, phi: Phi | None = None,
               return_quantized: bool = False):
    """Multi-scale codes [B, L] (int64, concatenated over scales) of a latent [B, C, H, W].

    flexvar: every scale is the area-downsampled latent, quantised on its own; with
    `normalize`, latent vectors and codebook rows are L2-normalised first (FlexVAR's VQ).
    var: VAR's residual quantisation: scale i quantises the area-downsampled residual; its
    embedding (the raw codebook row; `normalize` only changes the matching), bicubic-upsampled
    to H x W (not at the last scale) and passed through phi, is added to f_hat and subtracted
    from the residual.
    return_quantized: also a list per scale of the quantised maps [B, C, s, s] (flexvar) or
    of f_hat after that scale [B, C, H, W] (var).
    """
    B, C, H, W = latent.shape
    z = latent.float()
    book = F.normalize(codebook.float(), dim=-1) if normalize else codebook.float()
    n = len(schedule)
    codes, quantized = [], []
    if mode == "flexvar":
        for s in schedule:
            zs = F.interpolate(z, size=(s, s), mode="area").permute(0, 2, 3, 1).reshape(-1, C)
            if normalize:
                zs = F.normalize(zs, dim=-1)
            idx = nearest_code(zs, book).view(B, s * s)
            codes.append(idx)
            if return_quantized:
                quantized.append(book[idx].transpose(1, 2).reshape(B, C, s, s))
    elif mode == "var":
        raw_book = codebook.float()
        rest, f_hat = z.clone(), torch.zeros_like(z)
        for i, s in enumerate(schedule):
            last = i == n - 1
            zs = rest if last else F.interpolate(rest, size=(s, s), mode="area")
            zs = zs.permute(0, 2, 3, 1).reshape(-1, C)
            if normalize:
                zs = F.normalize(zs, dim=-1)
            idx = nearest_code(zs, book).view(B, s * s)
            codes.append(idx)
            h = raw_book[idx].transpose(1, 2).reshape(B, C, s, s)  # VAR embeds the raw rows
            if not last:
                h = F.interpolate(h, size=(H, W), mode="bicubic")
            if phi is not None:
                h = phi(h, i, n)
            f_hat = f_hat + h
            rest = rest - h
            if return_quantized:
                quantized.append(f_hat.clone())
    else:
        raise ValueError(f"mode must be 'flexvar' or 'var', got {mode!r}")
    out = torch.cat(codes, dim=1)
    return (out, quantized) if return_quantized else out


def msq_decode(codes_BL: torch.Tensor, codebook: torch.Tensor, schedule: Sequence[int],
               mode: str = "flexvar", normalize: bool = True, phi: Phi | None = None) -> torch.Tensor:
    """The latent the decoder takes: flexvar = the last scale's embedding map; var = f_hat.

    flexvar embeds with the normalised codebook when `normalize`; var always with raw rows.
    """
    book = F.normalize(codebook.float(), dim=-1) if (normalize and mode == "flexvar") else codebook.float()
    maps = embed_scales(codes_BL, book, schedule)
    if mode == "flexvar":
        return maps[-1].contiguous()  # a channels-last view would make the decoder's convs round differently
    if mode != "var":
        raise ValueError(f"mode must be 'flexvar' or 'var', got {mode!r}")
    n, last = len(schedule), schedule[-1]
    f_hat = torch.zeros_like(maps[-1])
    for i, h in enumerate(maps):
        if i != n - 1:
            h = F.interpolate(h, size=(last, last), mode="bicubic")
        f_hat = f_hat + (phi(h, i, n) if phi is not None else h)
    return f_hat


# ----------------------------------------------------------------------------------------
# head + KL divergence to a teacher distribution (the soft-target CSFL loss)
# ----------------------------------------------------------------------------------------
def linear_kl_div(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  target_logits: torch.Tensor | None = None, target_hidden: torch.Tensor | None = None,
                  token_weight: torch.Tensor | None = None, reduction: str = "mean",
                  temperature: float = 1.0) -> torch.Tensor:
    """KL(p_teacher || p_student) per token, computed in fp32.

    Student logits = (hidden @ weight.T + bias) / temperature; teacher logits =
    target_logits / temperature, or (target_hidden @ weight.T + bias) / temperature through
    the same head. The teacher side is detached. Teacher logits may hold -inf (a filtered
    vocabulary): those entries contribute 0. Per token: loss_i = w_i * KL_i; 'none' -> [N];
    'sum' -> sum_i loss_i; 'mean' -> sum_i loss_i / sum_i w_i. No temperature**2 factor.
    """
    b = None if bias is None else bias.float()
    student = F.linear(hidden.float(), weight.float(), b) / temperature
    with torch.no_grad():
        if target_logits is not None:
            teacher = target_logits.float() / temperature
        else:
            teacher = F.linear(target_hidden.float(), weight.float(), b) / temperature
        logp_teacher = teacher.log_softmax(-1)
        p_teacher = logp_teacher.exp()
    terms = p_teacher * (logp_teacher - student.log_softmax(-1))
    kl = torch.where(p_teacher > 0, terms, torch.zeros_like(terms)).sum(-1)
    w = torch.ones_like(kl) if token_weight is None else token_weight.float()
    per_token = kl * w
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    if reduction == "mean":
        return per_token.sum() / w.sum()
    raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")


def parse_transitions(transitions: Transitions, n: int) -> tuple[int, ...]:
    """Transition indices j (scale j -> j+1), increasing, each in [0, n-2]."""
    if isinstance(transitions, str):
        if transitions == "all":
            return tuple(range(n - 1))
        if transitions == "last":
            if n < 2:
                raise ValueError("transitions='last' needs a schedule of at least 2 scales")
            return (n - 2,)
        raise ValueError(f"transitions must be 'all', 'last', an int or a list of ints, got {transitions!r}")
    chosen = [transitions] if not isinstance(transitions, Sequence) else list(transitions)
    for j in chosen:
        if isinstance(j, bool) or not isinstance(j, int):
            raise TypeError(f"transitions must hold ints, got {j!r} ({type(j).__name__})")
        if not 0 <= j <= n - 2:
            raise ValueError(f"transition {j} (scale {j} -> {j + 1}) is outside [0, {n - 2}] "
                             f"for a schedule of {n} scales")
    if any(b <= a for a, b in zip(chosen, chosen[1:])):
        raise ValueError(f"transitions must be distinct and increasing, got {tuple(chosen)}")
    return tuple(chosen)


def ssr_inputs(pred_codes: torch.Tensor, codebook: torch.Tensor, schedule: Sequence[int],
                  transitions: Transitions = "all", mode: str = "flexvar",
                  phi: Phi | None = None) -> torch.Tensor:
    """Pure-PyTorch ops.ssr_inputs (fp32): the oracle and the CPU path."""
    schedule = Schedule(schedule)
    chosen = parse_transitions(transitions, len(schedule))
    maps = embed_scales(pred_codes.long(), codebook, schedule)
    if mode == "var":  # residual inputs depend on every earlier scale: build all, then pick
        full = scale_shift(maps, schedule, "var", phi)
        if len(chosen) == len(schedule) - 1:
            return full
        first = schedule.lengths[0]  # full starts at scale 1
        blocks = [full[:, schedule.offsets[j + 1] - first:schedule.offsets[j + 2] - first] for j in chosen]
    else:
        blocks = [scale_shift([maps[j], maps[j + 1]], schedule[j:j + 2]) for j in chosen]
    if not blocks:
        return maps[0].new_zeros(maps[0].shape[0], 0, codebook.shape[1], dtype=torch.float32)
    return torch.cat(blocks, dim=1)
