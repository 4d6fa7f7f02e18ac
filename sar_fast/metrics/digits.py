"""The embedded default's sanity metric: a small digits classifier (sklearn's 8x8 digits)
trained deterministically on the CPU in about a second.

- `frechet`: Fréchet distance between the classifier's penultimate features (32-d) of the
  samples and of the held-out real digits (the 'val' split of sar_fast.data.digits, which the
  generator never trains on) - an FID in miniature;
- `accuracy`: the fraction of samples the classifier assigns to the class they were
  generated for (its own accuracy on real held-out digits is reported as `real_accuracy`);
- `precision`, `recall`: k-NN precision and recall (k=3, sar_fast.metrics.knn_prc) of the
  samples' features against the same held-out real digits' features - how many samples look
  real, and how much of the real digits the samples cover.

A sanity check that the whole loop works and moves the right way, not a quality claim: the
features are those of a 64-128-32 MLP, and the reference set is 180 images.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

from .frechet import feature_statistics, frechet_distance
from .knn_prc import precision_recall

FEATURE_DIM = 32
_TRAIN_SEED = 0
_TRAIN_STEPS = 300
PRC_K = 3  # the paper's and torch-fidelity's default neighbourhood size


class DigitsClassifier(nn.Module):
    """64 -> 128 -> 32 (the features, tanh so no unit is dead) -> 10 logits."""

    def __init__(self, generator: torch.Generator | None = None):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, FEATURE_DIM), nn.Tanh())
        self.head = nn.Linear(FEATURE_DIM, 10)
        for layer in (self.body[1], self.body[3], self.head):
            nn.init.normal_(layer.weight, std=layer.in_features ** -0.5, generator=generator)
            nn.init.zeros_(layer.bias)

    def forward(self, grey01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """grey images [B, 1, 8, 8] in [0, 1] -> (features [B, 32], logits [B, 10])."""
        features = self.body(grey01 * 2.0 - 1.0)
        return features, self.head(features)


def to_grey01(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Float grey [B, 1, 8, 8] in [0, 1] from float [B, 1 or 3, 8, 8] in [0, 1] (what the
    tokenizer decodes) or uint8 [B, 8, 8, 1 or 3] (the ADM npz layout)."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a tensor or array, got {type(images).__name__}")
    if images.dtype == torch.uint8:
        if images.dim() != 4 or images.shape[1:3] != (8, 8) or images.shape[3] not in (1, 3):
            raise ValueError(f"uint8 images must be [B, 8, 8, 1 or 3] (the npz layout), got {tuple(images.shape)}")
        images = images.permute(0, 3, 1, 2).float() / 255.0
    elif not images.is_floating_point() or images.dim() != 4 or images.shape[1] not in (1, 3) \
            or images.shape[2:] != (8, 8):
        raise ValueError(f"float images must be [B, 1 or 3, 8, 8] in [0, 1], got {images.dtype} {tuple(images.shape)}")
    return images.detach().cpu().float().mean(dim=1, keepdim=True).clamp(0.0, 1.0)


@functools.lru_cache(maxsize=1)
def digits_classifier() -> DigitsClassifier:
    """The classifier, trained once per process: full-batch Adam on the 'train' split with a
    fixed seed (about a second on one core; the same weights on every run of one machine)."""
    from ..data.digits import load_digits_dataset
    from ..models.tokenizers.grey import DIGITS_MAX_GREY
    grey, labels = load_digits_dataset("train")
    x = grey.float() / DIGITS_MAX_GREY
    generator = torch.Generator().manual_seed(_TRAIN_SEED)
    model = DigitsClassifier(generator)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same float sums (so weights) whatever the machine
    try:
        with torch.enable_grad():
            for _ in range(_TRAIN_STEPS):
                # light pixel noise so the features do not hinge on the exact grey quantisation
                noisy = (x + 0.05 * torch.randn(x.shape, generator=generator)).clamp(0.0, 1.0)
                loss = nn.functional.cross_entropy(model(noisy)[1], labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def digits_features(images) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [B, 32] float64, predicted class [B] int64) of digit images (see to_grey01)."""
    features, logits = digits_classifier()(to_grey01(images))
    return features.double(), logits.argmax(-1)


@functools.lru_cache(maxsize=1)
def _reference_features() -> tuple[torch.Tensor, float]:
    """(features [N, 32] float64, classifier accuracy) of the held-out real digits, once per
    process: the Fréchet statistics and the precision/recall balls both come from them."""
    from ..data.digits import load_digits_dataset
    from ..models.tokenizers.grey import DIGITS_MAX_GREY
    grey, labels = load_digits_dataset("val")
    features, predicted = digits_features(grey.float() / DIGITS_MAX_GREY)
    return features, float((predicted == labels).double().mean())


@functools.lru_cache(maxsize=1)
def _reference() -> tuple[np.ndarray, np.ndarray, float]:
    features, real_accuracy = _reference_features()
    mu, sigma = feature_statistics(features)
    return mu, sigma, real_accuracy


def digits_metrics(images, labels) -> dict:
    """{frechet, accuracy, real_accuracy, precision, recall, num_images} of generated digits
    `images` (float [B, 1|3, 8, 8] in [0, 1] or uint8 [B, 8, 8, 3]) that were generated for
    `labels` [B], against the held-out real digits. precision and recall need a k-th other
    sample (B > PRC_K); with fewer images they are NaN (the rest is still measured)."""
    labels = torch.as_tensor(labels).long().cpu()
    features, predicted = digits_features(images)
    if labels.shape != predicted.shape:
        raise ValueError(f"labels must be [{predicted.shape[0]}] (one per image), got {tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > 9):
        raise ValueError(f"labels must lie in [0, 9], got [{int(labels.min())}, {int(labels.max())}]")
    mu_ref, sigma_ref, real_accuracy = _reference()
    mu, sigma = feature_statistics(features)
    if features.shape[0] > PRC_K:
        prc = precision_recall(_reference_features()[0], features, k=PRC_K)
    else:
        prc = {"precision": float("nan"), "recall": float("nan")}
    return {"frechet": frechet_distance(mu, sigma, mu_ref, sigma_ref),
            "accuracy": float((predicted == labels).double().mean()),
            "real_accuracy": real_accuracy, "precision": prc["precision"], "recall": prc["recall"],
            "num_images": int(labels.numel())}
