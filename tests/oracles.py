"""Slow, obviously correct restatements of the SAR objective and the sampler.

Written from the method's definition, independently of sar_fast/sar.py and sampler.py:
explicit per-scale loops, F.interpolate for every input map (float64), one model call per
scale or pass, dense logits and float64 losses. Only the model's own `forward` /
`forward_student` are shared with the code under test.

Two contracts of sar_fast are restated here because a random draw can only be compared
exactly when both sides consume the same stream:
- the `official` objective: every scale `si` of step `step` draws from its own generator
  seeded (seed * 1_000_003 + step) * 1_009 + si;
- a full rollout (the sf_* objectives) takes one uniform per token of each row from
  sar_fast.rng.sample_keyed_uniform (seed, step, STREAM_ROLLOUT, global row, token)
  and draws by inverse CDF over the kept tokens in vocabulary order (generation's draw);
- transitions='random' picks j = random.Random(seed * 7_919 + step).randrange(n - 1);
- the default `sar` objective's SSR draws take their noise from
  sar_fast.rng.sample_keyed_uniform (seed, step, (STREAM_SSR, scale), global row):
  the noise is an input here (its hash is tested against a plain-integer reference in
  test_sampler.py); what is restated is the draw it feeds (draw_inverse_cdf).
"""
from __future__ import annotations

import itertools
import random

import torch
import torch.nn.functional as F

from sar_fast.rng import STREAM_ROLLOUT, STREAM_SSR, sample_keyed_uniform

FLEXVAR_TRAINED = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 23, 24, 32)


def stream(seed: int, step: int, si: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + si)


def random_transition(seed: int, step: int, n: int) -> int:
    return random.Random(seed * 7_919 + step).randrange(n - 1)


# ------------------------------------------------------------------------- inputs
def code_maps(codes: torch.Tensor, book: torch.Tensor, schedule) -> list[torch.Tensor]:
    """Per scale, the embedded code map [B, C, s, s] in float64."""
    maps, start = [], 0
    for s in schedule:
        idx = codes[:, start:start + s * s]
        start += s * s
        emb = book.double()[idx]                                     # B, s*s, C
        maps.append(emb.permute(0, 2, 1).reshape(codes.shape[0], book.shape[1], s, s))
    return maps


def input_map(maps: list[torch.Tensor], i: int, schedule, arch: str, phi) -> torch.Tensor:
    """The input map of scale i >= 1 from the maps of scales < i.

    flexvar: scale i-1 bicubic-upsampled to s_i (non-residual).
    var: the residual sum f = sum_{k<i} phi(bicubic(map_k -> last side), k, n), area-resized to s_i.
    """
    side, n, last = schedule[i], len(schedule), schedule[-1]
    if arch == "flexvar":
        return F.interpolate(maps[i - 1], size=(side, side), mode="bicubic", align_corners=False)
    total = 0
    for k in range(i):
        up = F.interpolate(maps[k], size=(last, last), mode="bicubic", align_corners=False)
        total = total + (phi(up, k, n) if phi is not None else up)
    return F.interpolate(total, size=(side, side), mode="area")


def flat(m: torch.Tensor) -> torch.Tensor:
    """[B, C, s, s] -> [B, s*s, C] float32 (the model's input layout)."""
    return m.flatten(2).transpose(1, 2).float()


def tf_inputs(maps, schedule, arch, phi, num_scales: int | None = None) -> torch.Tensor:
    """Inputs of scales 1 .. num_scales-1 (default: all) of the full `schedule`."""
    B, C = maps[0].shape[:2]
    pieces = [flat(input_map(maps, i, schedule, arch, phi)) for i in range(1, num_scales or len(schedule))]
    return torch.cat(pieces, dim=1) if pieces else torch.zeros(B, 0, C)


def transition_input(gt_maps, pred_map, j, schedule, arch, phi) -> torch.Tensor:
    """Input of scale j+1 when scale j is replaced by the model's prediction (scales < j
    stay ground truth: they matter for VAR's residual sum only)."""
    maps = list(gt_maps[:j]) + [pred_map]
    return flat(input_map(maps, j + 1, schedule, arch, phi))


# ------------------------------------------------------------------------- losses
def ce(logits: torch.Tensor, target: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Per-token cross-entropy [B, l] in float64, with label smoothing eps:
    (1 - eps) * -log p_target + eps * mean_v -log p_v."""
    logp = logits.double().log_softmax(-1)
    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return (1 - smoothing) * nll - smoothing * logp.mean(-1)


def kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Per-token KL(teacher || student) [B, l] in float64; the teacher is a constant."""
    logq = teacher_logits.detach().double().log_softmax(-1)
    return (logq.exp() * (logq - student_logits.double().log_softmax(-1))).sum(-1)


def combine(per_scale: list[torch.Tensor], weighting: str) -> torch.Tensor:
    """token: the mean over every token of every scale; scale: the mean over scales of each
    scale's mean (every scale counts the same however many tokens it has)."""
    if weighting == "token":
        return torch.cat([p.reshape(-1) for p in per_scale]).mean()
    return torch.stack([p.mean() for p in per_scale]).mean()


def split(t: torch.Tensor, schedule) -> list[torch.Tensor]:
    out, start = [], 0
    for s in schedule:
        out.append(t[:, start:start + s * s])
        start += s * s
    return out


# ------------------------------------------------------------------------- sampling
# deliberate repeat: of sar_fast.sampling.guidance_weight: the oracle restates the library instead of calling it
def ramp(kind: str, cfg: float, si: int, n: int) -> float:  # restates sampling.guidance_weight on purpose
    last = max(n - 1, 1)
    if kind == "linear":
        return cfg * si / last
    if kind == "flexvar":
        return cfg * si / min(last, 9)
    if kind == "sar":
        return cfg * 0.5 * (1 + si / last)
    if kind == "constant":
        return cfg - 1.0
    raise ValueError(kind)


def mix(cond: torch.Tensor, uncond: torch.Tensor, t: float) -> torch.Tensor:
    return (1 + t) * cond - t * uncond


def kept_tokens(logits_row: torch.Tensor, top_k: int, top_p: float) -> set[int]:
    """The tokens a draw may return, by a per-row loop: top-k (ties with the k-th kept),
    then on the renormalised rest the smallest most-likely-first prefix of mass >= top_p."""
    vals = logits_row.double().tolist()
    V = len(vals)
    keep = set(range(V))
    if 0 < top_k < V:
        kth = sorted(vals, reverse=True)[top_k - 1]
        keep = {v for v in range(V) if vals[v] >= kth}
    if 0.0 < top_p < 1.0:
        z = max(vals[v] for v in keep)
        w = {v: pow(2.718281828459045, vals[v] - z) for v in keep}
        total = sum(w.values())
        order = sorted(keep, key=lambda v: -w[v])
        mass, prefix = 0.0, []
        for v in order:
            prefix.append(v)
            mass += w[v] / total
            if mass >= top_p:
                break
        keep = set(prefix)
    return keep


def kept_tokens_brute_force(logits_row: torch.Tensor, top_k: int, top_p: float) -> set[int]:
    """Enumerate every subset (small V only): top-k is the set of tokens no more than k-1
    others beat; top-p is the subset of least size, then greatest mass, whose mass
    (renormalised over the top-k set) reaches top_p."""
    vals = logits_row.double()
    V = len(vals)
    allowed = [v for v in range(V) if top_k <= 0 or top_k >= V or int((vals > vals[v]).sum()) < top_k]
    if not 0.0 < top_p < 1.0:
        return set(allowed)
    p = torch.zeros(V, dtype=torch.float64)
    p[allowed] = vals[allowed].softmax(0)
    best = None
    for size in range(1, len(allowed) + 1):
        for subset in itertools.combinations(allowed, size):
            mass = float(p[list(subset)].sum())
            if mass >= top_p - 1e-12 and (best is None or mass > best[0]):
                best = (mass, subset)
        if best is not None:
            return set(best[1])
    return set(allowed)


def draw(logits: torch.Tensor, top_k: int, top_p: float, generator) -> torch.Tensor:
    """One draw per row of logits [..., V]: greedy for top_k == 1, else multinomial over the
    kept tokens' renormalised probabilities (float32, as the model's logits are)."""
    shape, V = logits.shape[:-1], logits.shape[-1]
    rows = logits.reshape(-1, V).float()
    if top_k == 1:
        return rows.argmax(-1).view(shape)
    mask = torch.zeros_like(rows, dtype=torch.bool)
    for r in range(rows.shape[0]):
        mask[r, sorted(kept_tokens(rows[r], top_k, top_p))] = True
    probs = rows.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).view(shape)


def draw_inverse_cdf(logits: torch.Tensor, top_k: int, top_p: float, uniforms: torch.Tensor,
                     order: str = "likely") -> torch.Tensor:
    """The default `sar` objective's draw, per row by a loop: the kept tokens (kept_tokens),
    most likely first when a top-k or nucleus filter is on (vocabulary order otherwise),
    and the first whose cumulative renormalised probability (float64) exceeds u.
    order='vocab': always in vocabulary order (generation's draw with given uniforms)."""
    shape, V = logits.shape[:-1], logits.shape[-1]
    rows, us = logits.reshape(-1, V).double(), uniforms.reshape(-1).double()
    if top_k == 1:
        return rows.argmax(-1).view(shape)
    filtered = (0 < top_k < V) or 0.0 < top_p < 1.0
    out = []
    for r in range(rows.shape[0]):
        kept = kept_tokens(rows[r], top_k, top_p)
        ranked = sorted(kept, key=lambda v: (-float(rows[r, v]), v)) if filtered and order == "likely" else sorted(kept)
        w = torch.stack([rows[r, v] for v in ranked]).softmax(0)
        mass, pick = 0.0, ranked[-1]
        for v, p in zip(ranked, w.tolist()):
            mass += p
            if mass > float(us[r]):
                pick = v
                break
        out.append(pick)
    return torch.tensor(out, dtype=torch.int64).view(shape)


# ------------------------------------------------------------------------- generation
@torch.no_grad()
def generate(model, book, labels, schedule, cfg: float, cfg_ramp: str, top_k: int, top_p: float,
             generator, phi=None, uniforms: torch.Tensor | None = None, temperature: float = 1.0,
             prefix=None) -> list[torch.Tensor]:
    """Scale by scale, no KV cache: one full teacher-forcing pass over the prefix for the
    conditional logits (and one for the null class when guided) per scale. uniforms
    [B, sum(s*s)] replace the generator (inverse CDF in vocabulary order). The guided
    logits are divided by `temperature` (always: x / 1.0 == x) before filtering. `prefix`:
    the codes of the first len(prefix) scales, taken as they are (no model call, no draw)."""
    was_training = model.training
    model.eval()
    B, n = labels.shape[0], len(schedule)
    null = torch.full_like(labels, model.num_classes)
    maps, codes = [], []
    try:
        for si, side in enumerate(schedule):
            if si < len(prefix or ()):
                idx = prefix[si].long()
                codes.append(idx)
                maps.append(book.double()[idx].permute(0, 2, 1).reshape(B, book.shape[1], side, side))
                continue
            sides = schedule[:si + 1]
            x = tf_inputs(maps, schedule, model.arch, phi, si + 1) if si else torch.zeros(B, 0, book.shape[1])
            logits = model(labels, x, sides)[:, -side * side:]
            k = top_k
            if cfg_ramp == "flexvar" and (side > 16 or side not in FLEXVAR_TRAINED):
                k = 1
            if cfg > 0:
                t = cfg if (cfg_ramp == "flexvar" and side > 16) else ramp(cfg_ramp, cfg, si, n)
                logits = mix(logits, model(null, x, sides)[:, -side * side:], t)
            logits = logits.float() / temperature
            if uniforms is None:
                idx = draw(logits, k, top_p, generator)
            else:
                done = sum(s * s for s in schedule[:si])
                idx = draw_inverse_cdf(logits, k, top_p, uniforms[:, done:done + side * side], order="vocab")
            codes.append(idx)
            maps.append(book.double()[idx].permute(0, 2, 1).reshape(B, book.shape[1], side, side))
    finally:
        model.train(was_training)
    return codes


# ------------------------------------------------------------------------- one SAR step
def sar_loss(model, labels, codes, schedule, book, config, step: int = 0, phi=None) -> dict[str, torch.Tensor]:
    """The loss of one training step (with autograd), from the method's definition:

    tf: CE on ground-truth inputs. sar/official: tf + gamma * CSF, where the TF logits of
    every scale are sampled (argmax / top-k-top-p / top-k-top-p on (1+t)c - t u with
    t = cfg (1 + si/(n-1)) / 2), the inputs of the chosen transitions are rebuilt from the
    samples and supervised by the sample of the next scale, the TF distribution (KL) or the
    ground truth. sf_*: one TF-style pass on codes where some scales come from a full
    rollout, supervised by the ground truth.
    """
    schedule = tuple(schedule)
    n, arch, obj = len(schedule), model.arch, config.objective
    gt = split(codes, schedule)
    gt_maps = code_maps(codes, book, schedule)
    eps = config.label_smoothing

    def tf_pass(maps):
        return split(model(labels, tf_inputs(maps, schedule, arch, phi), schedule), schedule)

    if obj == "tf" or (obj == "sf_alternate" and step % 2 == 0):
        logits = tf_pass(gt_maps)
        loss = combine([ce(lg, g, eps) for lg, g in zip(logits, gt)], config.scale_weighting)
        return {"loss": loss, "tf_loss": loss}

    if obj.startswith("sf_"):
        guided = config.sampling == "cfg" and config.cfg > 0
        greedy = config.sampling == "argmax"
        uniforms = None if greedy else sample_keyed_uniform(config.seed, step, STREAM_ROLLOUT,
                                                            torch.arange(labels.shape[0]), (codes.shape[1],))
        rollout = generate(model, book, labels, schedule, config.cfg if guided else 0.0, "sar",
                           1 if greedy else config.top_k, config.top_p, None, phi, uniforms)
        if obj == "sf_interleave":
            from_rollout = [si % 2 == 1 for si in range(n)]
        elif obj == "sf_hybrid":
            from_rollout = [si >= config.hybrid_k for si in range(n)]
        else:
            from_rollout = [True] * n
        mixed = torch.cat([rollout[si] if from_rollout[si] else gt[si] for si in range(n)], dim=1)
        logits = tf_pass(code_maps(mixed, book, schedule))
        loss = combine([ce(lg, g, eps) for lg, g in zip(logits, gt)], config.scale_weighting)
        return {"loss": loss, "sf_loss": loss}

    # sar / official
    x_tf = tf_inputs(gt_maps, schedule, arch, phi)
    tf_logits = split(model(labels, x_tf, schedule), schedule)
    tf_loss = combine([ce(lg, g, eps) for lg, g in zip(tf_logits, gt)], config.scale_weighting)
    guided = config.sampling == "cfg" and (config.cfg > 1.0 if obj == "official" else config.cfg > 0.0)
    with torch.no_grad():
        uncond = split(model(torch.full_like(labels, model.num_classes), x_tf, schedule), schedule) if guided else None
        sampled = []
        for si in range(n):
            logits = tf_logits[si].detach()
            if config.sampling == "argmax":
                sampled.append(logits.argmax(-1))
                continue
            if guided:
                logits = mix(logits, uncond[si], ramp("sar", config.cfg, si, n))
            if obj == "official":  # the public code: multinomial, one generator per (seed, step, scale)
                sampled.append(draw(logits, config.top_k, config.top_p, stream(config.seed, step, si)))
            else:  # sar: inverse CDF with noise keyed by (seed, step, global row, scale); rows 0..B-1 here
                u = sample_keyed_uniform(config.seed, step, (STREAM_SSR, si), torch.arange(logits.shape[0]),
                                         logits.shape[1:-1])
                sampled.append(draw_inverse_cdf(logits, config.top_k, config.top_p, u))

    def csf_term(student_logits, si):
        if config.csf_target == "sampled":
            return ce(student_logits, sampled[si], eps)
        if config.csf_target == "gt":
            return ce(student_logits, gt[si], eps)
        return kl(student_logits, tf_logits[si])

    if config.transitions == "all":
        pieces = [transition_input(gt_maps, code_maps(sampled[si - 1], book, (schedule[si - 1],))[0], si - 1,
                                   schedule, arch, phi) for si in range(1, n)]
        student = split(model(labels, torch.cat(pieces, dim=1), schedule), schedule)
        csf_loss = combine([csf_term(student[si], si) for si in range(1, n)], config.scale_weighting)
    else:
        j = n - 2 if config.transitions == "last" else random_transition(config.seed, step, n)
        pred_map = code_maps(sampled[j], book, (schedule[j],))[0]
        x = transition_input(gt_maps, pred_map, j, schedule, arch, phi)
        student = model.forward_student(labels, x, schedule[j + 1], scale_index=j + 1)
        csf_loss = csf_term(student, j + 1).mean()
    return {"loss": tf_loss + config.gamma * csf_loss, "tf_loss": tf_loss, "csf_loss": csf_loss}
