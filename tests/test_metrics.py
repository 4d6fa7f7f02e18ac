"""Fréchet distance (vs float64 oracles), the digits sanity metric, and the torch-fidelity
integration with a randomly initialised Inception of the right architecture."""
import os

import numpy as np
import pytest
import torch

from sar_fast.metrics.frechet import feature_statistics, frechet_distance


def _random_rotation(rng, dim):
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    return q * np.sign(np.diag(r))


def test_frechet_commuting_covariances_match_closed_form_even_near_singular():
    # S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T commute: tr sqrt(S1 S2) = sum sqrt(a b) exactly
    rng = np.random.default_rng(0)
    dim = 37
    q = _random_rotation(rng, dim)
    a = rng.uniform(0.5, 2.0, dim)
    b = rng.uniform(0.5, 2.0, dim)
    a[:12] = 10.0 ** rng.uniform(-14, -9, 12)  # near-singular S1 (rank ~25)
    b[5:9] = 0.0                               # exactly singular S2
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    expected = np.sum((mu1 - mu2) ** 2) + a.sum() + b.sum() - 2 * np.sqrt(a * b).sum()
    # sqrt is not Lipschitz at 0: an eigenvalue off by eps*|S| moves its root by ~sqrt(eps*|S|),
    # so any float64 method is good to about dim * 3e-8 here (numpy's eigvals(S1 S2): 5e-8)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-12, abs=1e-6)
    # well-conditioned, the same construction is exact to rounding
    a[:12], b[5:9] = 1.0, 1.0
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    expected = np.sum((mu1 - mu2) ** 2) + a.sum() + b.sum() - 2 * np.sqrt(a * b).sum()
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-12, abs=1e-10)


def test_frechet_general_case_matches_scipy_sqrtm():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    for dim, n in ((5, 400), (19, 60), (33, 20)):  # the last: fewer samples than dims (singular)
        f1 = rng.standard_normal((n, dim)) @ rng.standard_normal((dim, dim))
        f2 = rng.standard_normal((n, dim)) * rng.uniform(0.1, 3, dim) + 0.3
        mu1, s1 = feature_statistics(f1)
        mu2, s2 = feature_statistics(torch.from_numpy(f2))
        covmean = scipy_linalg.sqrtm(s1 @ s2)
        expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6, abs=1e-6)
        assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8 * np.trace(s1))


def test_frechet_rejects_bad_shapes():
    with pytest.raises(ValueError, match="sigma2"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
    with pytest.raises(ValueError, match="features"):
        feature_statistics(np.zeros((1, 4)))


def test_digits_metric_ranks_real_digits_above_noise_and_shuffled_labels():
    from sar_fast.data.digits import load_digits_dataset
    from sar_fast.metrics.digits import digits_metrics
    grey, labels = load_digits_dataset("train")
    real, y = grey[:400].float() / 16, labels[:400]
    gen = torch.Generator().manual_seed(0)
    m_real = digits_metrics(real, y)
    m_shuffled = digits_metrics(real, y[torch.randperm(len(y), generator=gen)])
    m_noise = digits_metrics(torch.rand(400, 3, 8, 8, generator=gen), y)
    m_uint8 = digits_metrics((real * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).expand(-1, -1, -1, 3).numpy(), y)
    assert m_real["accuracy"] > 0.9 and m_real["real_accuracy"] > 0.9
    assert m_shuffled["accuracy"] < 0.3
    assert m_noise["accuracy"] < 0.3
    assert m_noise["frechet"] > 5 * m_real["frechet"]
    assert m_uint8["frechet"] == pytest.approx(m_real["frechet"], rel=0.05)  # the npz layout reads the same
    with pytest.raises(ValueError, match="labels"):
        digits_metrics(real, y[:3])


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    """torch-fidelity's Inception with random weights, saved as the weights file (the real
    ones cannot be downloaded here): the architecture and the loading path are the real ones."""
    pytest.importorskip("torch_fidelity")
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
    patch = pytest.MonkeyPatch()
    # no download, no loading: keep the default (random) initialisation
    patch.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: {})
    patch.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
    try:
        torch.manual_seed(0)
        net = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        patch.undo()
    path = tmp_path_factory.mktemp("inception") / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(net.state_dict(), path)
    return str(path)


def test_inception_metrics_end_to_end_with_random_weights(random_inception, tmp_path):
    # few images: each costs a 299x299 Inception pass on the CPU
    from sar_fast import files
    from sar_fast.metrics.inception import InceptionMetrics
    rng = np.random.default_rng(0)
    gen = rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    real = rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8) // 2
    folder = tmp_path / "real"
    folder.mkdir()
    for i, img in enumerate(real):
        files.write_png(str(folder / f"{i:03d}.png"), img)
    metrics = InceptionMetrics(random_inception, "cpu", batch_size=6, cache_dir=str(tmp_path / "cache"))
    seen = []
    extract = metrics.features
    metrics.features = lambda images, progress=None: seen.append(extract(images, progress)) or seen[-1]
    from_folder = metrics.compute(gen, str(folder), is_splits=2)
    assert set(from_folder) == {"fid", "inception_score", "inception_score_std", "precision", "recall"}
    assert all(np.isfinite(v) for v in from_folder.values())
    f_real, f_gen = seen[0]["2048"], seen[1]["2048"]
    # an ADM-style statistics npz (mu/sigma only) of the same reference: the same FID, no P/R
    mu_ref, sigma_ref = feature_statistics(f_real)
    np.savez(tmp_path / "ref.npz", mu=mu_ref, sigma=sigma_ref)
    from_npz = metrics.compute(gen, str(tmp_path / "ref.npz"), is_splits=2)
    assert set(from_npz) == {"fid", "inception_score", "inception_score_std"}
    for key in from_npz:
        assert from_npz[key] == pytest.approx(from_folder[key], rel=1e-4)
    # the library's FID agrees with our own Fréchet distance on the same features
    ours = frechet_distance(*feature_statistics(f_gen), *feature_statistics(f_real))
    assert from_folder["fid"] == pytest.approx(ours, rel=1e-3)
    # the reference statistics are cached: no Inception pass the second time
    metrics.features = lambda images, progress=None: pytest.fail("the cached reference was recomputed")
    cached = metrics.reference_statistics(str(folder), 16)
    np.testing.assert_allclose(cached["features"], f_real.numpy())
    assert len(os.listdir(tmp_path / "cache")) == 2


def test_missing_inception_weights_name_the_file(tmp_path, monkeypatch):
    from sar_fast.metrics.inception import (
        INCEPTION_WEIGHTS_FILE,
        resolve_inception_weights,
    )
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    with pytest.raises(FileNotFoundError, match=INCEPTION_WEIGHTS_FILE) as e:
        resolve_inception_weights(None)
    assert str(tmp_path / "empty_torch_home" / "hub" / "checkpoints") in str(e.value)
    with pytest.raises(FileNotFoundError, match="--inception .*no such file"):
        resolve_inception_weights(str(tmp_path / "nope.pth"))


def test_crafted_inception_weights_run_nothing(tmp_path):
    """torch-fidelity unpickles its weights file with torch.load(weights_only=False); the
    metrics hand it only a copy of what safe_load accepted."""
    pytest.importorskip("torch_fidelity")
    from test_safe_load import payloads, write_crafted

    from sar_fast.metrics.inception import InceptionMetrics
    from sar_fast.safe_load import CheckpointError
    marker = tmp_path / "ran"
    payload, refused = payloads(str(marker))["os.system"]
    path = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    write_crafted(path, payload, "zip", 2)
    with pytest.raises(CheckpointError, match=rf"{path}.*refused.*{refused}"):
        InceptionMetrics(str(path), "cpu")
    assert not marker.exists()
