"""The sampler against the independent oracle (tests/oracles.py): generation scale by scale
without a KV cache (guidance mixing, every ramp, FlexVAR's greedy / t = cfg branches, VAR's
residual sum) with the same generator, and top-k / top-p against brute-force enumeration;
the sampling temperature and a given prefix of ground-truth scales against the same oracle
and against one teacher-forced forward."""
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


# ------------------------------------------------------------------ temperature and a given prefix
SCHEDULE = (1, 2, 3, 5)


def _setup(arch: str, seed: int = 0):
    model = random_scale_model(arch, SCHEDULE, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    book = torch.randn(64, 8, generator=g)
    labels = torch.tensor([0, 3, 10])  # 10: the null class itself, a valid label
    return model, book, labels, (toy_phi if arch == "var" else None)


def _noise(B: int, seed: int = 7) -> torch.Tensor:
    return torch.rand(B, sum(s * s for s in SCHEDULE), generator=torch.Generator().manual_seed(seed),
                      dtype=torch.float64)


def _rand(noise: bool) -> dict:
    """Fresh randomness for one call: the uniforms, or a newly seeded generator."""
    return dict(uniforms=_noise(3)) if noise else dict(generator=torch.Generator().manual_seed(5))


def _gt_codes(B: int, seed: int = 11) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (B, s * s), generator=g) for s in SCHEDULE]


def _assert_codes_equal(got, want):
    assert len(got) == len(want)
    for si, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == torch.int64 and torch.equal(a, b), f"scale {si}"


@pytest.mark.parametrize("arch", ["flexvar", "var"])
@pytest.mark.parametrize("cfg, ramp, top_k, top_p, temperature", [
    (2.0, "linear", 10, 0.9, 0.7), (0.0, "linear", 0, 0.0, 1.9), (1.5, "sar", 0, 0.8, 0.5),
    (1.2, "constant", 20, 0.0, 3.0)])
@pytest.mark.parametrize("noise", [False, True])
def test_temperature_matches_oracle(arch, cfg, ramp, top_k, top_p, temperature, noise):
    """The oracle's loop divides the guided logits by T before filtering and drawing, with
    the same generator or the same uniforms, with the KV cache and without; T also really
    changes the draws."""
    model, book, labels, phi = _setup(arch)
    kw = dict(cfg=cfg, cfg_ramp=ramp, top_k=top_k, top_p=top_p, phi=phi)
    want = oracles.generate(model, book, labels, SCHEDULE, cfg, ramp, top_k, top_p, phi=phi,
                            temperature=temperature, **{"generator": None, **_rand(noise)})
    for use_cache in (True, False):
        got = generate(model, book, labels, SCHEDULE, temperature=temperature, use_cache=use_cache,
                       **kw, **_rand(noise))
        _assert_codes_equal(got.codes, want)
    if noise:  # same noise at T = 1 gives other codes: the temperature is not ignored
        plain = generate(model, book, labels, SCHEDULE, **kw, **_rand(noise))
        assert not all(torch.equal(a, b) for a, b in zip(plain.codes, got.codes))


@pytest.mark.parametrize("arch", ["flexvar", "var"])
@pytest.mark.parametrize("cfg", [0.0, 2.0])
def test_temperature_one_is_bit_identical_to_the_default(arch, cfg):
    model, book, labels, phi = _setup(arch)
    kw = dict(cfg=cfg, top_k=12, top_p=0.9, phi=phi)
    for rand in (dict(seed=3), dict(uniforms=_noise(3))):
        base = generate(model, book, labels, **kw, **rand)
        for one in (1.0, 1):
            _assert_codes_equal(generate(model, book, labels, temperature=one, **kw, **rand).codes, base.codes)


@pytest.mark.parametrize("arch", ["flexvar", "var"])
@pytest.mark.parametrize("cfg", [0.0, 1.5])
def test_tiny_temperature_is_greedy(arch, cfg):
    """T -> 0 puts all the mass on the argmax: the draws equal top_k=1's (T = 1), whatever the noise."""
    model, book, labels, phi = _setup(arch)
    greedy = generate(model, book, labels, cfg=cfg, top_k=1, phi=phi, seed=0)
    for rand in (dict(seed=9), dict(uniforms=_noise(3, seed=1)), dict(uniforms=_noise(3, seed=2))):
        cold = generate(model, book, labels, cfg=cfg, phi=phi, temperature=1e-6, **rand)
        _assert_codes_equal(cold.codes, greedy.codes)


@pytest.mark.parametrize("arch", ["flexvar", "var"])
@pytest.mark.parametrize("cfg", [0.0, 2.0])
@pytest.mark.parametrize("k", [0, 1, 2, 3, 4])
def test_prefix_matches_oracle_cached_and_not(arch, cfg, k):
    """Scales < k are the given codes; later ones are the oracle's loop teacher-forced on
    them, with the KV cache and without, by generator and by uniforms, at T != 1."""
    model, book, labels, phi = _setup(arch)
    gt = _gt_codes(3)
    kw = dict(cfg=cfg, top_k=20, top_p=0.95, phi=phi, temperature=0.8)
    for noise in (False, True):
        want = oracles.generate(model, book, labels, SCHEDULE, cfg, "linear", 20, 0.95, phi=phi,
                                temperature=0.8, prefix=gt[:k], **{"generator": None, **_rand(noise)})
        for use_cache in (True, False):
            got = generate(model, book, labels, SCHEDULE, prefix=gt[:k], use_cache=use_cache, **kw, **_rand(noise))
            _assert_codes_equal(got.codes[:k], gt[:k])
            _assert_codes_equal(got.codes, want)


@pytest.mark.parametrize("arch", ["flexvar", "var"])
@pytest.mark.parametrize("cfg", [0.0, 2.5])
def test_first_drawn_scale_is_greedy_on_the_teacher_forced_logits(arch, cfg):
    """Given the GT codes of scales < k, scale k's logits are those of one teacher-forced
    forward over the whole GT sequence (guided by the null-class forward): top_k=1 draws
    their argmax."""
    model, book, labels, phi = _setup(arch)
    gt = _gt_codes(3)
    x = oracles.tf_inputs(oracles.code_maps(torch.cat(gt, 1), book, SCHEDULE), SCHEDULE, arch, phi)
    with torch.no_grad():
        cond = model.eval()(labels, x, SCHEDULE).double()
        uncond = model(torch.full_like(labels, model.num_classes), x, SCHEDULE).double()
    for k in range(len(SCHEDULE)):
        part = oracles.split(cond, SCHEDULE)[k]
        if cfg > 0:
            part = oracles.mix(part, oracles.split(uncond, SCHEDULE)[k], oracles.ramp("linear", cfg, k, len(SCHEDULE)))
        for use_cache in (True, False):
            got = generate(model, book, labels, SCHEDULE, cfg=cfg, top_k=1, phi=phi, prefix=gt[:k],
                           use_cache=use_cache, temperature=0.3)
            assert torch.equal(got.codes[k], part.argmax(-1)), (k, use_cache)


@pytest.mark.parametrize("arch", ["flexvar", "var"])
@pytest.mark.parametrize("cfg", [0.0, 2.0])
def test_own_samples_as_prefix_reproduce_them_with_uniforms(arch, cfg):
    """With uniforms a given scale's noise is skipped, not shifted: feeding a run's own first
    k scales back as the prefix reproduces the whole run, for every k."""
    model, book, labels, phi = _setup(arch)
    kw = dict(cfg=cfg, top_k=30, top_p=0.9, phi=phi, temperature=1.3, uniforms=_noise(3, seed=5))
    run = generate(model, book, labels, SCHEDULE, **kw).codes
    for k in range(len(SCHEDULE) + 1):
        for use_cache in (True, False):
            _assert_codes_equal(generate(model, book, labels, SCHEDULE, prefix=run[:k], use_cache=use_cache,
                                         **kw).codes, run)


def test_empty_and_full_prefix():
    model, book, labels, _ = _setup("flexvar")
    base = generate(model, book, labels, SCHEDULE, seed=2)
    for empty in ([], ()):
        _assert_codes_equal(generate(model, book, labels, SCHEDULE, seed=2, prefix=empty).codes, base.codes)
    gt = _gt_codes(3)
    given = [c.to(torch.int32) for c in gt[:2]] + gt[2:]  # any integer dtype, returned as int64
    for use_cache in (True, False):
        for cfg in (0.0, 2.0):
            out = generate(model, book, labels, SCHEDULE, cfg=cfg, seed=2, prefix=tuple(given), use_cache=use_cache)
            _assert_codes_equal(out.codes, gt)
            assert all(a is not b for a, b in zip(out.codes, given))  # copies, never the caller's tensors
    # ScaleAR.generate forwards both keywords
    kw = dict(cfg=1.5, uniforms=_noise(3), temperature=0.6, prefix=gt[:2])
    _assert_codes_equal(model.generate(book, labels, SCHEDULE, **kw).codes,
                        generate(model, book, labels, SCHEDULE, **kw).codes)


def test_bad_temperature_and_prefix():
    model, book, labels, _ = _setup("flexvar")
    for bad in (0.0, -1.0, float("nan"), float("inf"), "1", True, None, torch.tensor(1.0)):
        with pytest.raises(ValueError, match="temperature"):
            generate(model, book, labels, SCHEDULE, seed=0, temperature=bad)
    gt = _gt_codes(3)
    bad_prefixes = {
        "prefix must be a list or tuple": gt[0],
        r"prefix has 5 scales but the schedule \[1, 2, 3, 5\] only 4": gt + [gt[-1]],
        r"prefix\[1\] must have shape \[3, 4\]": [gt[0], gt[1][:, :3]],
        r"prefix\[0\] must have shape": [gt[0][:2]],
        r"prefix\[1\] must be an integer": [gt[0], gt[1].float()],
        r"prefix\[0\] must be an integer": [gt[0].bool()],
        r"prefix\[2\] must be an integer": [gt[0], gt[1], "codes"],
        r"prefix\[1\] codes must lie in \[0, 64\)": [gt[0], gt[1].clone().fill_(64)],
        r"prefix\[0\] codes must lie in \[0, 64\), got \[-1": [gt[0].clone().fill_(-1)],
    }
    for message, prefix in bad_prefixes.items():
        with pytest.raises(ValueError, match=message):
            generate(model, book, labels, SCHEDULE, seed=0, prefix=prefix)
