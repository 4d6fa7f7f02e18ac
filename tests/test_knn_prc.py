"""k-NN precision and recall (sar_fast.metrics.knn_prc) against a brute-force oracle written
here as plain loops over points, constructed layouts with known answers, the tie at a radius,
bad input, and the digits metric's precision/recall."""
import math
import random

import numpy as np
import pytest
import torch

from sar_fast.metrics.knn_prc import knn_radii, precision_recall


# ------------------------------------------------------------------ the oracle (no shared code)
def oracle_radii(points, k, dist=math.dist):
    """For each point, the k-th smallest of its distances to the other points (by index)."""
    radii = []
    for i, p in enumerate(points):
        others = sorted(dist(p, q) for j, q in enumerate(points) if j != i)
        radii.append(others[k - 1])
    return radii


def oracle_precision_recall(real, fake, k, dist=math.dist):
    rad_real, rad_fake = oracle_radii(real, k, dist), oracle_radii(fake, k, dist)
    inside = 0
    for f in fake:
        if any(dist(f, r) <= rad_real[j] for j, r in enumerate(real)):
            inside += 1
    covered = 0
    for r in real:
        if any(dist(r, f) <= rad_fake[j] for j, f in enumerate(fake)):
            covered += 1
    return inside / len(fake), covered / len(real)


def exact_sq_dist(a, b):
    """Squared distance in exact integer arithmetic (for integer points: ties are exact)."""
    return sum((int(x) - int(y)) ** 2 for x, y in zip(a, b))


def _points(rng, num, dim, scale=1.0):
    return [[rng.gauss(0.0, scale) for _ in range(dim)] for _ in range(num)]


# ------------------------------------------------------------------ against the oracle
SIZES = [(13, 17, 3), (29, 11, 1), (31, 31, 7), (6, 9, 2)]
KS = [1, 2, 3, 5]


def _random_pair(num_real, num_fake, dim, k):
    """Seeded real and fake sets; the fake one is shifted by 1 in every coordinate, so
    precision and recall mostly land strictly inside (0, 1)."""
    rng = random.Random(num_real * 1000 + num_fake * 10 + dim + 7 * k)
    return _points(rng, num_real, dim), [[x + 1.0 for x in p] for p in _points(rng, num_fake, dim)]


@pytest.mark.parametrize("num_real,num_fake,dim", SIZES)
@pytest.mark.parametrize("k", KS)
def test_random_inputs_match_the_loop_oracle_for_every_chunk(num_real, num_fake, dim, k):
    real, fake = _random_pair(num_real, num_fake, dim, k)
    want_p, want_r = oracle_precision_recall(real, fake, k)
    want_radii = oracle_radii(real, k)
    for chunk in (1, 2, 4, num_real, num_fake + 3, 512):
        got = precision_recall(torch.tensor(real), np.array(fake), k=k, chunk=chunk)
        assert got == {"precision": want_p, "recall": want_r, "k": k, "num_real": num_real, "num_fake": num_fake}
        radii = knn_radii(real, k, chunk=chunk)
        assert radii.dtype == torch.float64 and radii.shape == (num_real,)
        assert radii.tolist() == pytest.approx(want_radii, rel=1e-12, abs=0)


def test_random_inputs_are_not_trivial():
    """The parametrised cases above mostly exercise partial coverage, not only 0 and 1."""
    results = [oracle_precision_recall(*_random_pair(*size, k), k) for size in SIZES for k in KS]
    assert sum(0 < p < 1 for p, _ in results) >= 10 and sum(0 < r < 1 for _, r in results) >= 10


@pytest.mark.parametrize("k", [1, 2, 4])
def test_integer_grid_with_duplicates_and_ties_matches_exact_oracle(k):
    # small integer coordinates: many duplicate points and equal distances; squared distances
    # of integers are exact in both the module (float64) and the oracle (Python ints)
    rng = random.Random(11 + k)
    real = [[rng.randint(0, 3) for _ in range(3)] for _ in range(23)]
    fake = [[rng.randint(1, 4) for _ in range(3)] for _ in range(19)]
    assert len({tuple(p) for p in real}) < len(real)  # duplicates present
    want = oracle_precision_recall(real, fake, k, dist=exact_sq_dist)  # squares order like distances
    for chunk in (1, 5, 64):
        got = precision_recall(np.array(real, dtype=np.int64), torch.tensor(fake, dtype=torch.int32), k=k, chunk=chunk)
        assert (got["precision"], got["recall"]) == want
        assert knn_radii(real, k, chunk).tolist() == [math.sqrt(s) for s in oracle_radii(real, k, dist=exact_sq_dist)]


def test_mid_size_matches_a_full_matrix_numpy_computation():
    """Larger than the loop oracle can afford: a full (unchunked) numpy distance matrix."""
    rng = np.random.default_rng(5)
    real, fake = rng.standard_normal((613, 16)), rng.standard_normal((487, 16)) * 1.2 + 0.3
    k = 3

    def radii(x):
        d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
        np.fill_diagonal(d, np.inf)
        return np.sort(d, axis=1)[:, k - 1]

    cross = np.sqrt(((fake[:, None, :] - real[None, :, :]) ** 2).sum(-1))
    want_p = (cross <= radii(real)[None, :]).any(1).mean()
    want_r = (cross <= radii(fake)[:, None]).any(0).mean()
    got = precision_recall(real, fake, k=k, chunk=100)
    assert 0 < want_p < 1 and 0 < want_r < 1
    assert (got["precision"], got["recall"]) == (want_p, want_r)
    assert knn_radii(real, k, chunk=37).numpy() == pytest.approx(radii(real), rel=1e-12, abs=0)


# ------------------------------------------------------------------ layouts with known answers
def test_identical_sets_give_one_and_one():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((37, 5))
    assert precision_recall(x, x.copy(), k=3, chunk=8) == {"precision": 1.0, "recall": 1.0, "k": 3,
                                                           "num_real": 37, "num_fake": 37}
    dup = np.concatenate([x[:10]] * 4)  # every point four times: radius 0 for k <= 3
    assert knn_radii(dup, 3).abs().max() == 0
    assert precision_recall(dup, dup, k=3) == {"precision": 1.0, "recall": 1.0, "k": 3, "num_real": 40,
                                               "num_fake": 40}


def test_far_away_fake_cluster_gives_zero_and_zero():
    rng = np.random.default_rng(1)
    real = rng.standard_normal((41, 4))
    fake = rng.standard_normal((23, 4)) + 1000.0
    got = precision_recall(real, fake, k=3, chunk=5)
    assert (got["precision"], got["recall"]) == (0.0, 0.0)


def test_fake_in_one_mode_of_two_gives_full_precision_half_recall():
    # real: two modes of 10 points on a line, at x = 0..9 and x = 100..109; fake: the even
    # points of the first mode. Real radii (k=3) are 2 or 3, so each fake point (equal to a
    # real one) is inside: precision 1. Fake radii (3rd nearest of {0,2,4,6,8}) are 4 or 6:
    # every first-mode real point is within 1 of a fake one, every second-mode point >= 92
    # away: recall 10/20.
    line = [[float(x), 0.0] for x in range(10)]
    real = line + [[x + 100.0, y] for x, y in line]
    fake = line[::2]
    assert knn_radii(real, 3).tolist() == [3, 2, 2, 2, 2, 2, 2, 2, 2, 3] * 2
    assert knn_radii(fake, 3).tolist() == [6, 4, 4, 4, 6]
    for chunk in (1, 3, 100):
        got = precision_recall(real, fake, k=3, chunk=chunk)
        assert (got["precision"], got["recall"]) == (1.0, 0.5)
    assert oracle_precision_recall(real, fake, 3) == (1.0, 0.5)


def test_a_point_exactly_at_the_radius_is_inside():
    # real {(0,0), (-5,0)}, k=1: both radii 5. Fake (3,4) is exactly 5 from (0,0) (and 8.9 from
    # (-5,0)); fake (30,40) is far. Fake radii (k=1) are |(27,36)| = 45 each.
    real = [[0.0, 0.0], [-5.0, 0.0]]
    got = precision_recall(real, [[3.0, 4.0], [30.0, 40.0]], k=1)
    assert (got["precision"], got["recall"]) == (0.5, 1.0)
    # nudged just past the radius, it is outside
    got = precision_recall(real, [[3.0, 4.0 + 1e-9], [30.0, 40.0]], k=1)
    assert got["precision"] == 0.0
    # the recall side: fake {(0,0), (6,8)} has radii 10; real (-6,-8) is exactly 10 from (0,0)
    # and 20 from (6,8); real (60, 80) is far from both
    fake = [[0.0, 0.0], [6.0, 8.0]]
    assert precision_recall([[-6.0, -8.0], [60.0, 80.0]], fake, k=1)["recall"] == 0.5
    assert precision_recall([[-6.0, -8.0 - 1e-9], [60.0, 80.0]], fake, k=1)["recall"] == 0.0


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("real,fake,kwargs,match", [
    (np.zeros(5), np.zeros((5, 2)), {}, "real must be 2-d"),
    (np.zeros((5, 2)), np.zeros((5, 2, 1)), {}, "fake must be 2-d"),
    (np.zeros((5, 0)), np.zeros((5, 0)), {}, "real must be 2-d"),
    (np.zeros((5, 2)), np.zeros((5, 3)), {}, "real and fake must have one feature dim"),
    (np.full((5, 2), np.nan), np.zeros((5, 2)), {}, "real contains NaN or inf"),
    (np.zeros((5, 2)), np.array([[0.0, np.inf]] * 5), {}, "fake contains NaN or inf"),
    (np.zeros((5, 2), dtype=bool), np.zeros((5, 2)), {}, "real must hold real numbers"),
    (np.zeros((5, 2)), np.zeros((5, 2), dtype=np.complex128), {}, "fake must hold real numbers"),
    ("abc", np.zeros((5, 2)), {}, "real must"),
    (np.zeros((5, 2)), np.zeros((5, 2)), {"k": 0}, "k must be an int >= 1"),
    (np.zeros((5, 2)), np.zeros((5, 2)), {"k": True}, "k must be an int"),
    (np.zeros((5, 2)), np.zeros((5, 2)), {"k": 2.0}, "k must be an int"),
    (np.zeros((3, 2)), np.zeros((5, 2)), {"k": 3}, r"k must be smaller than the number of points in real \(3\)"),
    (np.zeros((9, 2)), np.zeros((4, 2)), {"k": 4}, r"k must be smaller than the number of points in fake \(4\)"),
    (np.zeros((0, 2)), np.zeros((4, 2)), {"k": 1}, "k must be smaller than the number of points in real"),
    (np.zeros((5, 2)), np.zeros((5, 2)), {"chunk": 0}, "chunk must be an int >= 1"),
    (np.zeros((5, 2)), np.zeros((5, 2)), {"chunk": 2.5}, "chunk must be an int >= 1"),
])
def test_bad_input_raises_naming_the_argument(real, fake, kwargs, match):
    with pytest.raises(ValueError, match=match):
        precision_recall(real, fake, **kwargs)


def test_knn_radii_bad_input():
    with pytest.raises(ValueError, match="points must be 2-d"):
        knn_radii(np.zeros(4), 1)
    with pytest.raises(ValueError, match="points contains NaN"):
        knn_radii(np.array([[0.0], [np.nan]]), 1)
    with pytest.raises(ValueError, match=r"k must be smaller than the number of points in points \(4\)"):
        knn_radii(np.zeros((4, 2)), 4)
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        knn_radii(np.zeros((4, 2)), 0)
    with pytest.raises(ValueError, match="chunk must be an int >= 1"):
        knn_radii(np.zeros((4, 2)), 1, chunk=0)


def test_inputs_are_not_modified_and_any_device_dtype_reads():
    x = torch.randn(12, 3, generator=torch.Generator().manual_seed(0))
    before = x.clone()
    got32 = precision_recall(x, x * 1.1, k=2)
    got64 = precision_recall(x.double(), (x * 1.1).double().numpy(), k=2)
    assert torch.equal(x, before) and got32 == got64


# ------------------------------------------------------------------ the digits metric
def _digits(split):
    from sar_fast.data.digits import load_digits_dataset
    grey, labels = load_digits_dataset(split)
    return grey.float() / 16, labels


def test_digits_metrics_precision_recall_of_real_and_bad_samples():
    from sar_fast.metrics.digits import digits_metrics
    held_out, y_held_out = _digits("val")
    train, y_train = _digits("train")
    # the held-out digits themselves: the very set the balls are built from
    same = digits_metrics(held_out, y_held_out)
    assert (same["precision"], same["recall"]) == (1.0, 1.0)
    # other real digits (the whole train split): high both
    other = digits_metrics(train, y_train)
    assert other["precision"] > 0.8 and other["recall"] > 0.8
    # one class only: the samples look real but cover a tenth of the real digits
    threes = y_train == 3
    one_class = digits_metrics(train[threes], y_train[threes])
    assert one_class["precision"] > 0.8 and one_class["recall"] < 0.2
    # noise: few samples look real
    noise = digits_metrics(torch.rand(400, 3, 8, 8, generator=torch.Generator().manual_seed(0)), y_train[:400])
    assert noise["precision"] < 0.5
    for m in (same, other, one_class, noise):
        assert 0.0 <= m["precision"] <= 1.0 and 0.0 <= m["recall"] <= 1.0
        assert set(m) == {"frechet", "accuracy", "real_accuracy", "precision", "recall", "num_images"}


def test_digits_metrics_precision_recall_nan_below_k_plus_one_images():
    from sar_fast.metrics.digits import PRC_K, digits_metrics
    train, y = _digits("train")
    few = digits_metrics(train[:PRC_K], y[:PRC_K])
    assert math.isnan(few["precision"]) and math.isnan(few["recall"]) and math.isfinite(few["frechet"])
    enough = digits_metrics(train[:PRC_K + 1], y[:PRC_K + 1])
    assert 0.0 <= enough["precision"] <= 1.0 and 0.0 <= enough["recall"] <= 1.0
