"""k-NN precision and recall of generated samples (Kynkäänniemi et al. 2019, "Improved
precision and recall metric for assessing generative models"), on feature vectors.

Each point of a set gets a ball whose radius is the distance to its k-th nearest neighbour
among the OTHER points of the same set; the union of a set's balls estimates the support
(manifold) of its distribution.

- precision: the fraction of generated points that lie in at least one real ball - how many
  samples look real (low precision: samples off the real data, e.g. artifacts, noise);
- recall: the fraction of real points that lie in at least one generated ball - how much of
  the real distribution the samples cover (low recall: missing modes, too little variety).

Fréchet distance folds both failures into one number; these two keep them apart.

Conventions: distances are Euclidean, computed in float64 by direct differences (torch.cdist
without the |a|^2 + |b|^2 - 2ab shortcut, whose cancellation could move a point across a
radius), so the same pair gives the same distance wherever it appears. A point exactly at a
ball's radius counts as inside (<=). Duplicate points are allowed and are distinct points:
a duplicate is an "other" point at distance 0, so k duplicates of a point give it radius 0
(its ball then holds only points equal to it). Work is chunked over rows: memory is about
chunk x (largest set) float64 values, whatever the sizes.
"""
from __future__ import annotations

import numpy as np
import torch

from ..data.common import check_int as _check_int

DEFAULT_K = 3
DEFAULT_CHUNK = 512
# exact differences, not the matmul expansion: ties at a radius must be decided consistently
_CDIST_MODE = "donot_use_mm_for_euclid_dist"


def _as_points(name: str, points) -> torch.Tensor:
    """points [N, D] as a float64 CPU tensor, or a ValueError naming `name`."""
    if isinstance(points, torch.Tensor):
        points = points.detach().cpu()
    else:
        try:
            points = torch.as_tensor(np.asarray(points))
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"{name} must be a numeric tensor or array [N, D], got {type(points).__name__}") from err
    if points.dtype == torch.bool or points.is_complex():
        raise ValueError(f"{name} must hold real numbers, got dtype {points.dtype}")
    if points.dim() != 2 or points.shape[1] == 0:
        raise ValueError(f"{name} must be 2-d [N, D] with D >= 1 (one feature vector a row), "
                         f"got shape {tuple(points.shape)}")
    points = points.to(torch.float64)
    if not torch.isfinite(points).all():
        raise ValueError(f"{name} contains NaN or inf")
    return points


def _check_k(k, num: int, name: str) -> int:
    k = _check_int("k", k, 1)
    if k >= num:
        raise ValueError(f"k must be smaller than the number of points in {name} ({num}): a k-th nearest OTHER "
                         f"point must exist, got k={k}")
    return k


def _radii(points: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance of every row to its k-th nearest other row (validated float64 input)."""
    radii = torch.full((points.shape[0],), float("nan"), dtype=torch.float64)  # a missed row shows
    for start in range(0, points.shape[0], chunk):
        stop = min(start + chunk, points.shape[0])
        dist = torch.cdist(points[start:stop], points, compute_mode=_CDIST_MODE)
        # a point is not its own neighbour: its own column is pushed past every other
        rows = torch.arange(stop - start)
        dist[rows, rows + start] = float("inf")
        radii[start:stop] = dist.kthvalue(k, dim=1).values
    return radii


def knn_radii(points, k: int = DEFAULT_K, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """float64 [N]: the Euclidean distance from each row of `points` [N, D] to its k-th
    nearest neighbour among the other rows (duplicates count; 1 <= k < N)."""
    points = _as_points("points", points)
    k = _check_k(k, points.shape[0], "points")
    return _radii(points, k, _check_int("chunk", chunk, 1))


def precision_recall(real, fake, k: int = DEFAULT_K, chunk: int = DEFAULT_CHUNK) -> dict:
    """{precision, recall, k, num_real, num_fake} of generated features `fake` [N_f, D]
    against real features `real` [N_r, D] (tensors or arrays; 1 <= k < min(N_r, N_f)).

    precision = #{f : exists r, |f - r| <= rad_R(r)} / N_f,
    recall    = #{r : exists f, |r - f| <= rad_F(f)} / N_r,
    with rad_X(x) the distance from x to its k-th nearest other point of X.
    """
    real, fake = _as_points("real", real), _as_points("fake", fake)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and fake must have one feature dim, got {real.shape[1]} and {fake.shape[1]}")
    k = _check_k(k, real.shape[0], "real")
    k = _check_k(k, fake.shape[0], "fake")
    chunk = _check_int("chunk", chunk, 1)
    rad_real, rad_fake = _radii(real, k, chunk), _radii(fake, k, chunk)
    fake_inside = torch.zeros(fake.shape[0], dtype=torch.bool)
    real_covered = torch.zeros(real.shape[0], dtype=torch.bool)
    # one pass over fake-to-real distances serves both: rows give precision, columns recall
    for start in range(0, fake.shape[0], chunk):
        stop = min(start + chunk, fake.shape[0])
        dist = torch.cdist(fake[start:stop], real, compute_mode=_CDIST_MODE)
        fake_inside[start:stop] = (dist <= rad_real[None, :]).any(dim=1)
        real_covered |= (dist <= rad_fake[start:stop, None]).any(dim=0)
    return {"precision": float(fake_inside.double().mean()), "recall": float(real_covered.double().mean()),
            "k": k, "num_real": int(real.shape[0]), "num_fake": int(fake.shape[0])}
