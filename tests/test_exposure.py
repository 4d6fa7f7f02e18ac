"""Exposure gap and TF NLL per scale against a slow per-scale restatement (tests/oracles.py
inputs: F.interpolate in float64, one model call per scale), and the paired bootstrap
against cases whose answer is known."""
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import oracles
from sar_fast.metrics.exposure import exposure_gap, teacher_forcing_nll
from sar_fast.metrics.stats import paired_bootstrap
from sar_fast.models import build_model


def _setup(arch, schedule, B=3, V=11, seed=0):
    torch.manual_seed(seed)
    model = build_model(f"{arch}-tiny", cond_drop_rate=0.0, schedule=schedule, vocab_size=V, code_dim=4).eval()
    for p in model.parameters():  # random weights so that every input matters
        p.data.normal_(0, 0.3)
    book = F.normalize(torch.randn(V, 4), dim=-1)
    codes = torch.randint(0, V, (B, sum(s * s for s in schedule)))
    labels = torch.randint(0, 10, (B,))
    phi = (lambda h, i, n: 0.7 * h + 0.1 * i) if arch == "var" else None
    return model, book, codes, labels, phi


def _oracle(model, labels, codes, schedule, book, phi, preds=None):
    """Per scale: one forward on GT inputs but scale s's input rebuilt from preds[s-1]."""
    maps = oracles.code_maps(codes, book, schedule)
    x_gt = oracles.tf_inputs(maps, schedule, model.arch, phi)
    with torch.no_grad():
        logits = model(labels, x_gt, schedule).double()
    gt_split = oracles.split(codes, schedule)
    logit_split = oracles.split(logits, schedule)
    if preds is None:
        preds = [logit_split[i].argmax(-1) for i in range(len(schedule) - 1)]
    nll = [oracles.ce(logit_split[i], gt_split[i]).mean() for i in range(len(schedule))]
    own, gt = [], []
    for s in range(1, len(schedule)):
        pred_map = oracles.code_maps(preds[s - 1], book, (schedule[s - 1],))[0]
        pieces = [oracles.flat(oracles.input_map(maps, i, schedule, model.arch, phi)) for i in range(1, len(schedule))]
        pieces[s - 1] = oracles.transition_input(maps, pred_map, s - 1, schedule, model.arch, phi)
        with torch.no_grad():
            lg = model(labels, torch.cat(pieces, dim=1), schedule).double()
        own.append(oracles.ce(oracles.split(lg, schedule)[s], gt_split[s]).mean())
        gt.append(oracles.ce(logit_split[s], gt_split[s]).mean())
    return torch.stack(nll), torch.stack(own), torch.stack(gt)


@pytest.mark.parametrize("arch,schedule", [("flexvar", (1, 2, 3, 5)), ("var", (1, 2, 3, 5)), ("flexvar", (1, 3)),
                                           ("var", (1, 3, 4, 7))])
def test_argmax_gap_matches_oracle(arch, schedule):
    model, book, codes, labels, phi = _setup(arch, schedule)
    got = exposure_gap(model, labels, codes, schedule, book, phi=phi, prediction="argmax")
    nll, own, gt = _oracle(model, labels, codes, schedule, book, phi)
    torch.testing.assert_close(got.ce_own, own, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.ce_gt, gt, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.gap, own - gt, atol=1e-5, rtol=1e-5)
    assert got.gap.abs().max() > 1e-3  # random weights: the predicted input must matter
    tf = teacher_forcing_nll(model, labels, codes, schedule, book, phi=phi)
    torch.testing.assert_close(torch.tensor(tf["per_scale"], dtype=torch.float64), nll, atol=1e-5, rtol=1e-5)
    tokens = torch.tensor([s * s for s in schedule], dtype=torch.float64)
    assert tf["per_token"] == pytest.approx(float((nll * tokens).sum() / tokens.sum()), rel=1e-5)
    weights = tokens[1:] / tokens[1:].sum()
    assert got.mean == pytest.approx(float(((own - gt) * weights).sum()), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("arch", ["flexvar", "var"])
def test_sampled_gap_matches_oracle_on_its_draws(arch):
    schedule = (1, 2, 4)
    model, book, codes, labels, phi = _setup(arch, schedule, B=4)
    got = exposure_gap(model, labels, codes, schedule, book, phi=phi, prediction="sample",
                       generator=torch.Generator().manual_seed(3))
    _, own, gt = _oracle(model, labels, codes, schedule, book, phi, preds=got.predictions)
    torch.testing.assert_close(got.ce_own, own, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.gap, own - gt, atol=1e-5, rtol=1e-5)
    again = exposure_gap(model, labels, codes, schedule, book, phi=phi, prediction="sample",
                         generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(got.predictions, again.predictions))
    argmax = exposure_gap(model, labels, codes, schedule, book, phi=phi).predictions
    assert any(not torch.equal(a, b) for a, b in zip(got.predictions, argmax))  # draws, not the argmax


def test_sampled_predictions_follow_the_model_distribution():
    schedule = (1, 2)
    model, book, codes, labels, phi = _setup("flexvar", schedule, B=1, V=5)
    codes, labels = codes.repeat(4000, 1), labels.repeat(4000)
    got = exposure_gap(model, labels, codes, schedule, book, prediction="sample",
                       generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        p = model(labels[:1], oracles.tf_inputs(oracles.code_maps(codes[:1], book, schedule), schedule,
                                                "flexvar", None), schedule)[0, 0].double().softmax(-1)
    freq = torch.bincount(got.predictions[0].view(-1), minlength=5).double() / 4000
    assert (freq - p).abs().max() < 0.03


def test_bad_input_is_named():
    model, book, codes, labels, _ = _setup("flexvar", (1, 2, 3))
    with pytest.raises(ValueError, match="prediction"):
        exposure_gap(model, labels, codes, (1, 2, 3), book, prediction="greedy")
    with pytest.raises(ValueError, match="codes has"):
        exposure_gap(model, labels, codes[:, :-1], (1, 2, 3), book)
    with pytest.raises(ValueError, match="at least two scales"):
        exposure_gap(model, labels, codes[:, :1], (1,), book)
    with pytest.raises(ValueError, match="codes must lie"):
        teacher_forcing_nll(model, labels, codes + 100, (1, 2, 3), book)


# ------------------------------------------------------------------------ the bootstrap
def test_bootstrap_constant_difference_is_a_point():
    out = paired_bootstrap([3.0, 4.5, 1.0, 2.0, 7.0], [2.5, 4.0, 0.5, 1.5, 6.5])
    assert out["mean"] == pytest.approx(0.5) and out["low"] == pytest.approx(0.5) and out["high"] == pytest.approx(0.5)
    assert out["excludes_zero"] and out["n"] == 5


def test_bootstrap_matches_exact_enumeration():
    """With 4 seeds every ordered resample (256) is equally likely: the bootstrap's 2.5% and
    97.5% quantiles land on the atoms of the exact distribution of resampled means (the
    exact CDF jumps over 0.025 from 0.0195 to 0.035 there, so 200k draws cannot miss)."""
    diff = np.array([-1.0, 0.25, 0.5, 2.0])
    exact = [np.mean(c) for c in itertools.product(diff, repeat=4)]
    out = paired_bootstrap(diff + 1.0, np.ones(4), resamples=200_000, seed=1)
    assert out["low"] == pytest.approx(np.quantile(exact, 0.025, method="inverted_cdf"), abs=1e-9)
    assert out["high"] == pytest.approx(np.quantile(exact, 0.975, method="inverted_cdf"), abs=1e-9)
    assert out["mean"] == pytest.approx(0.4375)
    assert not out["excludes_zero"]


def test_bootstrap_approaches_the_normal_interval_and_is_seeded():
    rng = np.random.default_rng(5)
    diff = rng.normal(0.3, 1.0, size=400)
    out = paired_bootstrap(diff, np.zeros_like(diff), resamples=20_000, seed=2)
    half = 1.96 * diff.std(ddof=0) / np.sqrt(diff.size)
    assert out["low"] == pytest.approx(diff.mean() - half, abs=0.01)
    assert out["high"] == pytest.approx(diff.mean() + half, abs=0.01)
    assert out["excludes_zero"]
    assert paired_bootstrap(diff, np.zeros_like(diff), seed=2) == paired_bootstrap(diff, np.zeros_like(diff), seed=2)

