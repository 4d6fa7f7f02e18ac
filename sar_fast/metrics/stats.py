"""Paired comparisons over seeds: the mean difference and its paired bootstrap interval."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def paired_bootstrap(arm: Sequence[float], control: Sequence[float], resamples: int = 10_000,
                     level: float = 0.95, seed: int = 0) -> dict:
    """Mean of arm[i] - control[i] over seeds i and its percentile bootstrap interval.

    The pairs (one seed: the same data order, draws and evaluation noise in both runs) are
    resampled with replacement `resamples` times with a generator seeded by `seed`, so the
    interval is reproducible. With few seeds the interval is coarse (5 seeds have only 126
    distinct resamples) and tends to be narrow; it is a descriptive interval, not a test.
    Returns {mean, low, high, n, excludes_zero}.
    """
    a, c = np.asarray(arm, dtype=np.float64), np.asarray(control, dtype=np.float64)
    if a.ndim != 1 or a.shape != c.shape:
        raise ValueError(f"arm and control must be 1-d and of the same length (one value per seed), "
                         f"got shapes {a.shape} and {c.shape}")
    if a.size < 2:
        raise ValueError(f"a paired bootstrap needs at least 2 seeds, got {a.size}")
    if not (np.isfinite(a).all() and np.isfinite(c).all()):
        raise ValueError("arm and control must be finite")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if resamples < 100:
        raise ValueError(f"resamples must be >= 100, got {resamples}")
    diff = a - c
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, diff.size, size=(resamples, diff.size))
    means = diff[picks].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return {"mean": float(diff.mean()), "low": float(low), "high": float(high), "n": int(diff.size),
            "excludes_zero": bool(low > 0.0 or high < 0.0)}
