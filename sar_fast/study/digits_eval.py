"""The digits suite's evaluation of one exported model on the held-out digits ('val' split):
TF NLL, the exposure gap with its two CE terms, sampled images under every setting of the
evaluation grid (Fréchet distance, class accuracy, k-NN precision and recall), and the
generation-level exposure curve (images rolled out from the ground truth's first k scales).

Every image's sampling noise is a function of (seed, class, index) (sar_fast.rng), so every
arm of one seed draws from the same noise (common random numbers), under every setting."""
from __future__ import annotations

import torch

from ..data.digits import DIGITS_SCHEDULE
from ..models.tokenizers.grey import EMBEDDED
from .design import EVAL_GRID

ROLLOUT_INDEX = 100_000  # the rollouts' noise indices start here: never an index of the grid's images


def heldout(tok):
    """(labels [N], codes [N, L]) of the held-out digits under tokenizer `tok`."""
    from ..data.digits import EmbeddedDigitsDataset
    val = EmbeddedDigitsDataset("val")
    return val.labels, torch.cat(tok.encode(val.images, DIGITS_SCHEDULE), dim=1)


def _load(path: str):
    from ..models import load_checkpoint
    from ..models.tokenizers import build_tokenizer
    return load_checkpoint(path, cond_drop_rate=0.0).eval(), build_tokenizer(EMBEDDED, "cpu")


@torch.no_grad()
def heldout_nll(path: str) -> float:
    """TF NLL per token on the held-out digits of the model in export file `path`."""
    from ..metrics.exposure import teacher_forcing_nll
    model, tok = _load(path)
    labels, codes = heldout(tok)
    return teacher_forcing_nll(model, labels, codes, DIGITS_SCHEDULE, tok.codebook())["per_token"]


def _token_weighted(per_scale: torch.Tensor, tokens: torch.Tensor) -> float:
    return float((per_scale * tokens).sum() / tokens.sum())


def _gaps(model, labels, codes, book, seed: int) -> dict:
    """The exposure gap (argmax and sampled inputs) per scale, its token-weighted mean and the
    two CE terms it is the difference of: with the model's own input ('ce_own') and with
    the ground-truth input ('ce_gt'), also token-weighted over scales 1..n-1."""
    from ..metrics.exposure import exposure_gap
    out = {}
    for prediction in ("argmax", "sample"):
        gen = torch.Generator().manual_seed(seed * 7_777 + 1)
        g = exposure_gap(model, labels, codes, DIGITS_SCHEDULE, book, prediction=prediction, generator=gen)
        out[prediction] = {"mean": g.mean, "per_scale": g.gap.tolist(), "ce_own": g.ce_own.tolist(),
                           "ce_gt": g.ce_gt.tolist(), "ce_own_mean": _token_weighted(g.ce_own, g.tokens),
                           "ce_gt_mean": _token_weighted(g.ce_gt, g.tokens)}
    return out


def _images(model, tok, labels: torch.Tensor, ids: list[tuple[int, int]], seed: int, setting: dict,
            prefix: list[torch.Tensor] | None = None) -> torch.Tensor:
    from ..models.generate import generate
    from ..rng import image_uniforms
    uniforms = torch.stack([image_uniforms(seed, c, i, DIGITS_SCHEDULE.total) for c, i in ids])
    return generate(model, tok.codebook(), labels, DIGITS_SCHEDULE, uniforms=uniforms, decode=tok.decode,
                    prefix=prefix, **setting).images


def sample_metrics(model, tok, seed: int, samples_per_class: int, setting: dict) -> dict:
    """Fréchet distance, accuracy, precision and recall of samples_per_class images per class."""
    from ..metrics.digits import digits_metrics
    from ..rng import image_identity
    ids = [image_identity(k, 10) for k in range(10 * samples_per_class)]
    labels = torch.tensor([c for c, _ in ids])
    m = digits_metrics(_images(model, tok, labels, ids, seed, setting), labels)
    return {k: m[k] for k in ("frechet", "accuracy", "precision", "recall")}


def rollout_curve(model, tok, labels: torch.Tensor, codes: torch.Tensor, seed: int) -> list[dict]:
    """Generation-level exposure: for k = 0 .. n-1, each given held-out digit's first k scales
    are its ground truth and the rest are sampled (the 'plain' setting); the Fréchet distance
    and accuracy of those images. k = 0 is free generation for the held-out labels."""
    from ..metrics.digits import digits_metrics
    offsets = DIGITS_SCHEDULE.offsets
    ids = [(int(c), ROLLOUT_INDEX + j) for j, c in enumerate(labels.tolist())]
    curve = []
    for k in range(len(DIGITS_SCHEDULE)):
        prefix = [codes[:, offsets[i]:offsets[i + 1]] for i in range(k)]
        m = digits_metrics(_images(model, tok, labels, ids, seed, EVAL_GRID["plain"], prefix), labels)
        curve.append({"k": k, "frechet": m["frechet"], "accuracy": m["accuracy"]})
    return curve


@torch.no_grad()
def evaluate_export(path: str, seed: int, samples_per_class: int, full: bool = True,
                    rollout_images: int | None = None) -> dict:
    """Held-out metrics of the model in export file `path`. `full`: the exposure gaps, every
    setting of the grid and the rollout curve (of the first `rollout_images` held-out digits;
    None: all); otherwise (a learning-curve point) TF NLL and the 'plain' setting's sample
    metrics only."""
    from ..metrics.exposure import teacher_forcing_nll
    model, tok = _load(path)
    book = tok.codebook()
    labels, codes = heldout(tok)
    nll = teacher_forcing_nll(model, labels, codes, DIGITS_SCHEDULE, book)
    names = list(EVAL_GRID) if full else ["plain"]
    grid = {name: sample_metrics(model, tok, seed, samples_per_class, EVAL_GRID[name]) for name in names}
    out = {"nll": nll["per_token"], "nll_per_scale": nll["per_scale"], **grid["plain"], "grid": grid,
           "num_images": 10 * samples_per_class}
    if full:
        gaps = _gaps(model, labels, codes, book, seed)
        out.update(gap_argmax=gaps["argmax"]["mean"], gap_sample=gaps["sample"]["mean"],
                   ce_own=gaps["sample"]["ce_own_mean"], ce_gt=gaps["sample"]["ce_gt_mean"], gaps=gaps,
                   rollout=rollout_curve(model, tok, labels[:rollout_images], codes[:rollout_images], seed))
    return out
