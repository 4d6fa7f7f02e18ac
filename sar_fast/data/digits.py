"""The embedded default's data: scikit-learn's 8x8 handwritten digits (1797 images, grey
levels 0..16, 10 classes), which ship inside the scikit-learn wheel, so no download is
needed. Its tokenizer is sar_fast.models.tokenizers.GreyLevelTokenizer."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from ..models.tokenizers.grey import DIGITS_MAX_GREY
from ..schedules import DIGITS_SCHEDULE

DIGITS_SIDE = 8
DIGITS_NUM_CLASSES = 10
SPLITS = ("train", "val", "all")


def load_digits_dataset(split: str = "train", val_fraction: float = 0.1,
                        seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 [N, 1, 8, 8] with grey levels 0..16, labels int64 [N]).

    The split is stratified and deterministic: within each class a permutation seeded by
    `seed` puts round(val_fraction * class size) images in 'val', the rest in 'train';
    'all' is the whole set in its original order. Samples keep the original order.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) \
            or not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the embedded digits dataset needs scikit-learn "
                          "(pip install scikit-learn, or pip install 'sar_fast[train]')") from e
    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.uint8)).unsqueeze(1)  # [N, 1, 8, 8]
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    if split == "all":
        return images, labels
    rng = np.random.default_rng(seed)
    is_val = np.zeros(len(labels), dtype=bool)
    for c in range(DIGITS_NUM_CLASSES):
        members = np.flatnonzero(bunch.target == c)
        n_val = int(round(val_fraction * len(members)))
        is_val[rng.permutation(members)[:n_val]] = True
    keep = torch.from_numpy(is_val if split == "val" else ~is_val)
    if not bool(keep.any()):
        raise ValueError(f"split {split!r} is empty with val_fraction={val_fraction}")
    return images[keep], labels[keep]


# ---------------------------------------------------------------------- embedded digits
class EmbeddedDigitsDataset(Dataset):
    """scikit-learn's digits: (image float32 [1, 8, 8] in [-1, 1], label int64), no
    augmentation. Tokenise with sar_fast.models.tokenizers.GreyLevelTokenizer."""

    schedule = DIGITS_SCHEDULE
    num_classes = DIGITS_NUM_CLASSES

    def __init__(self, split: str = "train", val_fraction: float = 0.1, seed: int = 0):
        grey, self.labels = load_digits_dataset(split, val_fraction, seed)
        self.images = digits_to_images(grey)
        self.classes = [str(c) for c in range(DIGITS_NUM_CLASSES)]

    def set_epoch(self, epoch: int) -> None:
        """Nothing is random per epoch; present so every dataset here takes the same calls."""

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

def digits_to_images(grey: torch.Tensor) -> torch.Tensor:
    """Digits grey levels 0..16 (any dtype) -> float32 images in [-1, 1], same shape."""
    return grey.float().mul(2.0 / DIGITS_MAX_GREY).sub(1.0)
