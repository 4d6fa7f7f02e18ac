"""Class-conditional generation, scale by scale, with a per-scale KV cache.

Each scale's tokens attend to the cached keys/values of every earlier scale plus their own,
so the block-causal mask is never needed at inference. Classifier-free guidance runs the
conditional and the null-class batch together and mixes their logits with the guidance
ramps of sar_fast.sampling. `ScaleAR.generate` calls this on its own model.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.reference import Phi
from ..sampling import CFG_RAMPS, FLEXVAR_TRAINED_SIDES, guidance_weight, sample_top_k_top_p
from ..schedules import DIGITS_SCHEDULE, STANDARD_SCHEDULE, Schedule
from .blocks import KVCache, apply_head


# The published sampling settings of each model family (guidance, its ramp, top-k, top-p and
# the schedule; None: the model's own), sources in sar_fast.evaluate's docstring (--preset).
PRESETS = {
    "var": dict(cfg=1.5, cfg_ramp="linear", top_k=900, top_p=0.96, schedule=None),
    "flexvar": dict(cfg=2.5, cfg_ramp="flexvar", top_k=900, top_p=0.95, schedule=STANDARD_SCHEDULE),
    "sar": dict(cfg=2.2, cfg_ramp="flexvar", top_k=900, top_p=0.95, schedule=STANDARD_SCHEDULE),
    "digits": dict(cfg=1.5, cfg_ramp="linear", top_k=0, top_p=0.0, schedule=DIGITS_SCHEDULE),
}


@dataclass
class Samples:
    codes: list[torch.Tensor]        # per scale, [B, s*s] int64
    images: torch.Tensor | None      # [B, 3, H, W] in [0, 1] when a decoder was given


def _check_arguments(model: nn.Module, codebook: torch.Tensor, labels: torch.Tensor, cfg_ramp: str) -> None:
    """Labels [B] within the model's classes (the null class included), a codebook of the
    model's shape and a known guidance ramp; a clear error naming the argument otherwise."""
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
        raise ValueError(f"labels must be an int64 tensor [B], got {getattr(labels, 'shape', labels)}")
    if codebook.dim() != 2 or codebook.shape != (model.vocab_size, model.code_dim):
        raise ValueError(f"codebook must be [{model.vocab_size}, {model.code_dim}] to match the model, "
                         f"got {tuple(codebook.shape)}")
    if cfg_ramp not in CFG_RAMPS:
        raise ValueError(f"cfg_ramp must be one of {CFG_RAMPS}, got {cfg_ramp!r}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > model.num_classes):
        raise ValueError(f"labels must lie in [0, {model.num_classes}], got [{int(labels.min())}, {int(labels.max())}]")


def _checked_uniforms(uniforms: torch.Tensor, generator: torch.Generator | None, batch: int,
                      schedule: Schedule, device) -> torch.Tensor:
    """`uniforms` on `device` once it is known to be [batch, tokens] and alone (no generator)."""
    if generator is not None:
        raise ValueError("pass either uniforms or seed/generator, not both")
    if uniforms.shape != (batch, schedule.total):
        raise ValueError(f"uniforms must be [{batch}, {schedule.total}] (batch, tokens of schedule {list(schedule)}), "
                         f"got {tuple(uniforms.shape)}")
    return uniforms.to(device)


def _checked_temperature(temperature) -> float:
    """A finite temperature > 0, as a float; a clear error naming `temperature` otherwise."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return float(temperature)


def _checked_prefix(prefix, model: nn.Module, batch: int, schedule: Schedule, device) -> list[torch.Tensor]:
    """The given codes of the first len(prefix) scales as int64 copies on `device`, once each
    is known to be an integer tensor [batch, side*side] of its scale with values in
    [0, vocab_size); a clear error naming `prefix` otherwise. None: no given scale."""
    if prefix is None:
        return []
    if not isinstance(prefix, (list, tuple)):
        raise ValueError(f"prefix must be a list or tuple of int64 tensors [B, side*side], one per leading scale, "
                         f"got {type(prefix).__name__}")
    if len(prefix) > len(schedule):
        raise ValueError(f"prefix has {len(prefix)} scales but the schedule {list(schedule)} only {len(schedule)}")
    given = []
    for i, codes in enumerate(prefix):
        want = (batch, schedule.lengths[i])
        if not isinstance(codes, torch.Tensor) or codes.dtype == torch.bool or codes.is_floating_point() \
                or codes.is_complex():
            raise ValueError(f"prefix[{i}] must be an integer tensor {list(want)} (scale {i}, side {schedule[i]}), "
                             f"got {getattr(codes, 'dtype', type(codes).__name__)}")
        if tuple(codes.shape) != want:
            raise ValueError(f"prefix[{i}] must have shape {list(want)} (batch, tokens of scale {i}, side "
                             f"{schedule[i]}), got {list(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= model.vocab_size):
            raise ValueError(f"prefix[{i}] codes must lie in [0, {model.vocab_size}), "
                             f"got [{int(codes.min())}, {int(codes.max())}]")
        given.append(codes.to(device=device, dtype=torch.int64, copy=True))  # a copy: never the caller's tensor
    return given


def _guided(logits: torch.Tensor, batch: int, cfg: float, cfg_ramp: str, si: int, n: int, side: int) -> torch.Tensor:
    """Classifier-free guidance: the conditional half pushed away from the null-class half
    by the ramp's weight at scale `si` (FlexVAR: the full cfg beyond its trained sides)."""
    t = guidance_weight(cfg_ramp, cfg, si, n)
    if cfg_ramp == "flexvar" and side > 16:
        t = cfg
    return (1 + t) * logits[:batch] - t * logits[batch:]


def _scale_top_k(top_k: int, cfg_ramp: str, side: int) -> int:
    """FlexVAR samples greedily at sides it was not trained on."""
    if cfg_ramp == "flexvar" and (side > 16 or side not in FLEXVAR_TRAINED_SIDES):
        return 1
    return top_k


def _next_scale_input(model: nn.Module, book: torch.Tensor, idx: torch.Tensor, si: int,
                      schedule: Schedule, f_hat: torch.Tensor, phi: Phi | None):
    """(the latent map the next scale's tokens embed, VAR's updated running sum f_hat) from
    scale `si`'s sampled codes: FlexVAR upsamples this scale's embedding; VAR adds its
    upsampled (phi-refined) embedding to f_hat and area-downsamples that."""
    batch, side, last, n = idx.shape[0], schedule[si], schedule[-1], len(schedule)
    emb = book[idx].transpose(1, 2).reshape(batch, model.code_dim, side, side)
    nxt = schedule[si + 1]
    if model.arch == "flexvar":
        return F.interpolate(emb, size=(nxt, nxt), mode="bicubic"), f_hat
    up = F.interpolate(emb, size=(last, last), mode="bicubic")
    f_hat = f_hat + (phi(up, si, n) if phi is not None else up)
    return F.interpolate(f_hat, size=(nxt, nxt), mode="area"), f_hat


def _scale_logits(model: nn.Module, tokens: list[torch.Tensor], cond: torch.Tensor, caches: list[KVCache],
                  schedule: Schedule, si: int, use_cache: bool) -> torch.Tensor:
    """Scale `si`'s logits: its tokens against the KV cache (which they extend), or the whole
    prefix recomputed under the block-causal mask (use_cache=False)."""
    if use_cache:
        return model.step_with_cache(tokens[-1], cond, caches)
    hidden = model.trunk(torch.cat(tokens, dim=1), cond, schedule.lengths[:si + 1])
    return apply_head(model.head, hidden[:, schedule.offsets[si]:])


def _draw_scale(logits: torch.Tensor, batch: int, si: int, schedule: Schedule, cfg: float, cfg_ramp: str,
                top_k: int, top_p: float, temperature: float, generator: torch.Generator | None,
                uniforms: torch.Tensor | None) -> torch.Tensor:
    """Scale `si`'s codes [batch, s*s]: guidance, then temperature, then top-k / top-p and the draw."""
    side = schedule[si]
    if cfg > 0:
        logits = _guided(logits, batch, cfg, cfg_ramp, si, len(schedule), side)
    if temperature != 1.0:  # skipped at 1.0, so the default draws exactly as before
        logits = logits.float() / temperature
    noise = uniforms[:, schedule.scale(si)] if uniforms is not None else None
    return sample_top_k_top_p(logits, _scale_top_k(top_k, cfg_ramp, side), top_p, generator, noise)


@torch.no_grad()
def generate(model: nn.Module, codebook: torch.Tensor, labels: torch.Tensor,
             schedule: Sequence[int] | None = None, cfg: float = 1.5, cfg_ramp: str = "linear",
             top_k: int = 0, top_p: float = 0.0, seed: int | None = None,
             generator: torch.Generator | None = None,
             phi: Phi | None = None,
             decode: Callable[[list[torch.Tensor]], torch.Tensor] | None = None,
             use_cache: bool = True, uniforms: torch.Tensor | None = None,
             temperature: float = 1.0, prefix: Sequence[torch.Tensor] | None = None) -> Samples:
    """Generate one image per label with `model`, a ScaleAR.

    codebook [V, Cv]: the embedding the model's inputs are built from (FlexVAR: the
    L2-normalised VQ codebook; VAR: the raw one, with `phi` its shared convs). `decode`
    maps the per-scale codes to images. cfg <= 0 disables guidance (no null-class batch).
    `seed` (or a `generator`) makes the draw reproducible. use_cache=False recomputes the
    whole prefix under the block-causal mask at every scale (slow; the test oracle).
    `uniforms` [B, sum(s*s)] in [0, 1) (one per token of each image, scales concatenated)
    replaces `seed`/`generator`: each image is then a function of its label and its own row
    of noise, whatever the batch (sar_fast.evaluate seeds a row per (class, index)).
    Each scale's logits are guided (cfg), then divided by `temperature` (finite, > 0; 1.0
    changes nothing), then top-k / top-p filtered, then drawn.
    `prefix`: given codes of the first k = len(prefix) scales (0 <= k <= len(schedule)),
    prefix[i] an integer tensor [B, s_i*s_i]; they are not drawn but returned as they are,
    and the model runs on them (KV cache, next input) as on drawn ones, so scales k.. are
    sampled teacher-forced on them; with guidance both halves see them. `uniforms` still
    cover every token: the given scales' are unused, so an image's later scales draw with
    the same noise whatever k (a generator draws nothing for the given scales).
    """
    schedule = model.check_schedule(schedule)
    _check_arguments(model, codebook, labels, cfg_ramp)
    temperature = _checked_temperature(temperature)
    device = model.head.weight.device
    labels = labels.to(device)
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    guided = cfg > 0
    B, n, last = labels.shape[0], len(schedule), schedule[-1]
    given = _checked_prefix(prefix, model, B, schedule, device)
    if uniforms is not None:
        uniforms = _checked_uniforms(uniforms, generator, B, schedule, device)
    book = codebook.to(device=device, dtype=torch.float32)

    all_labels = torch.cat((labels, torch.full_like(labels, model.num_classes))) if guided else labels
    cond = model.class_emb(all_labels.long())
    pos = model.pos_embed(schedule)
    offsets = schedule.offsets
    tokens = [cond.unsqueeze(1) + model.pos_start + pos[:, :1]]  # embedded inputs per scale
    caches = [KVCache() for _ in model.blocks]
    f_hat = torch.zeros(B, model.code_dim, last, last, device=device)  # VAR's running sum
    codes: list[torch.Tensor] = []
    was_training = model.training
    model.eval()
    try:
        for si in range(n):
            if si < len(given):  # given: not drawn, but the cache must still hold its keys/values
                idx = given[si]
                if use_cache and len(given) < n:
                    model.step_with_cache(tokens[-1], cond, caches)
            else:
                logits = _scale_logits(model, tokens, cond, caches, schedule, si, use_cache)
                idx = _draw_scale(logits, B, si, schedule, cfg, cfg_ramp, top_k, top_p, temperature,
                                  generator, uniforms)
            codes.append(idx)
            if si == n - 1:
                break
            inp, f_hat = _next_scale_input(model, book, idx, si, schedule, f_hat, phi)
            x = model.embed_inputs(inp.flatten(2).transpose(1, 2)) + pos[:, offsets[si + 1]:offsets[si + 2]]
            tokens.append(x.repeat(2, 1, 1) if guided else x)
    finally:
        model.train(was_training)
    images = decode(codes) if decode is not None else None
    return Samples(codes=codes, images=images)
