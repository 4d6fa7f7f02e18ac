"""The sampler against the independent oracle (tests/oracles.py): generation scale by scale
without a KV cache (guidance mixing, every ramp, FlexVAR's greedy / t = cfg branches, VAR's
residual sum) with the same generator, and top-k / top-p against brute-force enumeration."""
import pytest
import torch

import oracles
from conftest import random_scale_model, toy_phi
from sar_fast.models.generate import generate
from sar_fast.sampling import CFG_RAMPS, guidance_weight, sample_top_k_top_p


@pytest.mark.parametrize("arch", ["flexvar", "var"])
@pytest.mark.parametrize("cfg, ramp, top_k, top_p", [
    (2.0, "linear", 10, 0.9), (1.5, "sar", 0, 0.8), (1.2, "constant", 20, 0.0), (0.0, "linear", 0, 0.0),
    (3.0, "flexvar", 5, 0.0), (1.5, "linear", 1, 0.0)])
def test_generate_matches_oracle(arch, cfg, ramp, top_k, top_p):
    schedule = (1, 2, 3, 5)
    model = random_scale_model(arch, schedule, seed=0)
    book = torch.randn(64, 8)
    labels = torch.tensor([0, 3, 10, 7])
    phi = toy_phi if arch == "var" else None
    got = generate(model, book, labels, schedule, cfg=cfg, cfg_ramp=ramp, top_k=top_k, top_p=top_p,
                   generator=torch.Generator().manual_seed(5), phi=phi)
    want = oracles.generate(model, book, labels, schedule, cfg, ramp, top_k, top_p,
                            torch.Generator().manual_seed(5), phi)
    for si, (a, b) in enumerate(zip(got.codes, want)):
        assert torch.equal(a, b), f"scale {si}"


def test_generate_flexvar_branches_match_oracle():
    """Side 7 is not a FlexVAR training side and 17 is above 16: both greedy, 17 with t = cfg."""
    schedule = (1, 2, 7, 17)
    model = random_scale_model("flexvar", schedule, seed=0)
    book = torch.randn(64, 8)
    labels = torch.tensor([2, 5])
    got = generate(model, book, labels, schedule, cfg=2.5, cfg_ramp="flexvar", top_k=30, top_p=0.0,
                   generator=torch.Generator().manual_seed(1))
    want = oracles.generate(model, book, labels, schedule, 2.5, "flexvar", 30, 0.0, torch.Generator().manual_seed(1))
    for si, (a, b) in enumerate(zip(got.codes, want)):
        assert torch.equal(a, b), f"scale {si}"
    # the branches matter here: sampling at side 7 or the plain ramp at 17 would change the codes
    with torch.no_grad():
        sampled = oracles.generate(model, book, labels, schedule[:3], 2.5, "linear", 30, 0.0,
                                   torch.Generator().manual_seed(1))
    assert not torch.equal(sampled[2], want[2])


@pytest.mark.parametrize("ramp", CFG_RAMPS)
@pytest.mark.parametrize("n", [2, 4, 10, 13])
def test_guidance_weight_matches_oracle(ramp, n):
    for si in range(n):
        assert guidance_weight(ramp, 1.7, si, n) == pytest.approx(oracles.ramp(ramp, 1.7, si, n), abs=1e-12)
    if ramp == "sar":  # SAR's ramp: cfg/2 at the first scale, cfg at the last
        assert guidance_weight(ramp, 1.7, 0, n) == pytest.approx(0.85)
        assert guidance_weight(ramp, 1.7, n - 1, n) == pytest.approx(1.7)


@pytest.mark.parametrize("V", [2, 5, 7])
def test_oracle_filter_equals_brute_force(V):
    g = torch.Generator().manual_seed(V)
    for _ in range(40):
        row = torch.randn(V, generator=g) * 2
        for top_k in (0, 1, 2, V - 1, V):
            for top_p in (0.0, 0.3, 0.6, 0.9, 0.99):
                assert oracles.kept_tokens(row, top_k, top_p) == oracles.kept_tokens_brute_force(row, top_k, top_p), \
                    (row, top_k, top_p)


@pytest.mark.parametrize("top_k, top_p", [(0, 0.5), (0, 0.8), (0, 0.95), (3, 0.0), (4, 0.7), (2, 0.99), (0, 0.0)])
def test_top_k_top_p_draws_exactly_the_brute_force_set(top_k, top_p):
    """Many draws of a few rows: the set drawn is the brute-force kept set, and the
    frequencies are the renormalised probabilities."""
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(4, 6, generator=g) * 1.5
    draws = sample_top_k_top_p(rows.repeat_interleave(3000, 0), top_k, top_p, torch.Generator().manual_seed(0))
    for r in range(rows.shape[0]):
        kept = oracles.kept_tokens_brute_force(rows[r], top_k, top_p)
        got = draws[r * 3000:(r + 1) * 3000]
        assert set(got.tolist()) == kept, (r, sorted(kept))
        p = torch.full((6,), float("-inf"))
        p[sorted(kept)] = rows[r, sorted(kept)]
        freq = torch.bincount(got, minlength=6).float() / 3000
        torch.testing.assert_close(freq, p.softmax(0), atol=0.035, rtol=0)


def test_top_p_boundary_keeps_the_token_that_reaches_the_mass():
    """p = (0.5, 0.3, 0.2): top_p 0.79 needs the second token, 0.81 the third."""
    logits = torch.tensor([0.5, 0.3, 0.2]).log().view(1, 3).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_top_k_top_p(logits, 0, 0.79, g).tolist()) == {0, 1}
    assert set(sample_top_k_top_p(logits, 0, 0.81, g).tolist()) == {0, 1, 2}
    assert set(sample_top_k_top_p(logits, 0, 0.49, g).tolist()) == {0}
