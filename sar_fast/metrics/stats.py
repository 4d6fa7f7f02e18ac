"""Paired comparisons over seeds: mean differences with a paired bootstrap and a paired
t-interval, Holm's correction over the arms of one claim, and the pre-registered verdict rule
with an equivalence margin."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def _paired_differences(arm: Sequence[float], control: Sequence[float], level: float, what: str) -> np.ndarray:
    """arm - control per seed, in float64, once the inputs are checked."""
    a, c = np.asarray(arm, dtype=np.float64), np.asarray(control, dtype=np.float64)
    if a.ndim != 1 or a.shape != c.shape:
        raise ValueError(f"arm and control must be 1-d and of the same length (one value per seed), "
                         f"got shapes {a.shape} and {c.shape}")
    if a.size < 2:
        raise ValueError(f"{what} needs at least 2 seeds, got {a.size}")
    if not (np.isfinite(a).all() and np.isfinite(c).all()):
        raise ValueError("arm and control must be finite")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return a - c


def paired_bootstrap(arm: Sequence[float], control: Sequence[float], resamples: int = 10_000,
                     level: float = 0.95, seed: int = 0) -> dict:
    """Mean of arm[i] - control[i] over seeds i and its percentile bootstrap interval.

    The pairs (one seed: the same data order, draws and evaluation noise in both runs) are
    resampled with replacement `resamples` times with a generator seeded by `seed`, so the
    interval is reproducible. With few seeds the interval is coarse (5 seeds have only 126
    distinct resamples) and tends to be narrow; it is a descriptive interval, not a test.
    Returns {mean, low, high, n, excludes_zero}.
    """
    diff = _paired_differences(arm, control, level, "a paired bootstrap")
    if resamples < 100:
        raise ValueError(f"resamples must be >= 100, got {resamples}")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, diff.size, size=(resamples, diff.size))
    means = diff[picks].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return {"mean": float(diff.mean()), "low": float(low), "high": float(high), "n": int(diff.size),
            "excludes_zero": bool(low > 0.0 or high < 0.0)}


def paired_t(arm: Sequence[float], control: Sequence[float], level: float = 0.95) -> dict:
    """Mean of arm[i] - control[i] over seeds i, its paired t-interval and two-sided p-value.

    With n seeds the interval is mean +- t_{n-1, (1+level)/2} * sd / sqrt(n): at 5 seeds
    +-2.78 standard errors, where a percentile bootstrap spans about +-1.75 (it ignores that
    the standard deviation itself is estimated). Returns {mean, se, low, high, n, df, p}.
    """
    from scipy import stats as _scipy_stats

    diff = _paired_differences(arm, control, level, "a paired t-interval")
    n, mean = diff.size, float(diff.mean())
    se = float(diff.std(ddof=1) / np.sqrt(n))
    df = n - 1
    half = float(_scipy_stats.t.ppf(0.5 + level / 2.0, df)) * se
    if se > 0.0:
        p = float(2.0 * _scipy_stats.t.sf(abs(mean) / se, df))
    else:  # every pair differs by the same amount: no spread to test against
        p = 1.0 if mean == 0.0 else 0.0
    return {"mean": mean, "se": se, "low": mean - half, "high": mean + half, "n": int(n), "df": int(df), "p": p}


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order: the i-th smallest of m is
    multiplied by (m - i + 1) (i from 1), made non-decreasing, and capped at 1. Comparing the
    adjusted values with alpha controls the family-wise error rate of the m comparisons."""
    p = np.asarray(pvalues, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"pvalues must be 1-d, got shape {p.shape}")
    if not ((p >= 0.0) & (p <= 1.0)).all():
        raise ValueError(f"pvalues must lie in [0, 1], got {p.tolist()}")
    m = p.size
    order = np.argsort(p, kind="stable")
    scaled = p[order] * (m - np.arange(m))
    adjusted = np.minimum(np.maximum.accumulate(scaled), 1.0)
    out = np.empty(m)
    out[order] = adjusted
    return out.tolist()


VERDICTS = ("reproduced", "contradicted at this scale (opposite effect)",
            "contradicted at this scale (no effect of the paper's size)", "not resolved")


def verdict(low: float, high: float, mean: float, adjusted_p: float, margin: float, wanted: str,
            alpha: float = 0.05) -> str:
    """The pre-registered rule for one claim. `wanted` is the paper's direction of the
    arm-minus-control difference ('lower' or 'higher'); `margin` (> 0) the smallest effect
    that would matter, fixed before the run. In order:
    - 'reproduced': the Holm-adjusted p-value is below alpha and the mean goes the wanted way;
    - 'contradicted ... (opposite effect)': adjusted p below alpha, the other way;
    - 'contradicted ... (no effect of the paper's size)': the interval lies inside
      (-margin, +margin), so an effect as large as the margin is ruled out;
    - 'not resolved' otherwise."""
    if wanted not in ("lower", "higher"):
        raise ValueError(f"wanted must be 'lower' or 'higher', got {wanted!r}")
    if not margin > 0.0:
        raise ValueError(f"margin must be > 0, got {margin}")
    if not low <= mean <= high:
        raise ValueError(f"mean {mean} must lie in its interval [{low}, {high}]")
    if adjusted_p < alpha and mean != 0.0:
        return VERDICTS[0] if (mean < 0.0) == (wanted == "lower") else VERDICTS[1]
    if -margin < low and high < margin:
        return VERDICTS[2]
    return VERDICTS[3]
