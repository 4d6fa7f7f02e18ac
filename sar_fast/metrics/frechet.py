"""Fréchet distance between two Gaussians, in float64, stable for singular covariances.

d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).

tr((S1 S2)^(1/2)) is computed as tr((A S2 A)^(1/2)) with A = S1^(1/2): A S2 A is symmetric
positive semi-definite and has the eigenvalues of S1 S2, so two symmetric eigen-decompositions
give it without the complex square roots (and the eps fudge) that a general sqrtm of the
non-symmetric product S1 S2 needs when a covariance is (near-)singular, e.g. features from
fewer samples than dimensions or from dead units.
"""
from __future__ import annotations

import numpy as np


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], unbiased covariance [D, D]) of features [N, D] (N >= 2), in float64."""
    feats = np.asarray(features.detach().cpu() if hasattr(features, "detach") else features, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"features must be [N, D] with N >= 2, got shape {feats.shape}")
    if not np.isfinite(feats).all():
        raise ValueError("features contain NaN or inf")
    return feats.mean(axis=0), np.cov(feats, rowvar=False).reshape(feats.shape[1], feats.shape[1])


def _psd_eigvals_floor(eigvals: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with those below its rounding noise (dim * eps * max) set
    to 0: their square roots would otherwise be ~sqrt(eps) * scale of pure noise."""
    noise = eigvals.shape[0] * np.finfo(np.float64).eps * max(float(np.abs(eigvals).max(initial=0.0)), 1e-300)
    return np.where(eigvals > noise, eigvals, 0.0)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    eigvals, eigvecs = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigvecs * np.sqrt(_psd_eigvals_floor(eigvals))) @ eigvecs.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (the 'FID' value)."""
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    sigma1, sigma2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"mu1 and mu2 must be vectors of one length, got {mu1.shape} and {mu2.shape}")
    dim = mu1.shape[0]
    for name, sigma in (("sigma1", sigma1), ("sigma2", sigma2)):
        if sigma.shape != (dim, dim):
            raise ValueError(f"{name} must be [{dim}, {dim}] to match the means, got {sigma.shape}")
        if not np.isfinite(sigma).all():
            raise ValueError(f"{name} contains NaN or inf")
    root1 = _psd_sqrt(sigma1)
    inner = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(_psd_eigvals_floor(np.linalg.eigvalsh((inner + inner.T) / 2))).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)
