"""What the datasets, the cache writer and the sampler share: argument checks, the
per-sample random generator and the batch collate."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch


def check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def _sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index])


def collate(batch: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """[(images [C, H, W] or codes [L], label)] -> (stacked [B, ...], labels int64 [B])."""
    if not batch:
        raise ValueError("collate got an empty batch")
    items, labels = zip(*batch)
    # numpy reads the 0-d labels without a dispatched .item() per sample
    return torch.stack(items), torch.from_numpy(np.array([np.asarray(y) for y in labels], dtype=np.int64))
