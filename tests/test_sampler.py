import pytest
import torch

from conftest import random_scale_model, toy_phi
from sar_fast.models import build_model
from sar_fast.models.generate import generate
from sar_fast.sampling import guidance_weight, sample_top_k_top_p




@pytest.mark.parametrize("arch", ["flexvar", "var"])
@pytest.mark.parametrize("cfg, top_k, top_p", [(2.0, 10, 0.9), (0.0, 0, 0.0), (1.5, 1, 0.0)])
def test_kv_cache_equals_full_recompute(arch, cfg, top_k, top_p):
    model = random_scale_model(arch)
    book = torch.randn(64, 8)
    labels = torch.tensor([0, 3, 10])
    kw = dict(cfg=cfg, top_k=top_k, top_p=top_p, seed=5, phi=toy_phi if arch == "var" else None)
    cached = generate(model, book, labels, **kw)
    full = generate(model, book, labels, use_cache=False, **kw)
    assert [c.shape for c in cached.codes] == [(3, 1), (3, 4), (3, 9), (3, 25)]
    for a, b in zip(cached.codes, full.codes):
        assert torch.equal(a, b)


def test_same_seed_same_samples_other_seed_differs():
    model = random_scale_model("flexvar")
    book = torch.randn(64, 8)
    labels = torch.arange(4)
    a = generate(model, book, labels, cfg=1.0, seed=1)
    b = generate(model, book, labels, cfg=1.0, seed=1)
    c = generate(model, book, labels, cfg=1.0, seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a.codes, b.codes))
    assert not all(torch.equal(x, y) for x, y in zip(a.codes, c.codes))


def test_any_schedule_and_decoder():
    model = random_scale_model("flexvar")
    out = generate(model, torch.randn(64, 8), torch.tensor([1]), schedule=(1, 4, 7), seed=0,
                   decode=lambda codes: torch.zeros(len(codes[0]), 3, 8, 8))
    assert [c.shape[1] for c in out.codes] == [1, 16, 49] and out.images.shape == (1, 3, 8, 8)


def test_sampler_restores_training_mode():
    model = random_scale_model("flexvar").train()
    generate(model, torch.randn(64, 8), torch.tensor([1]), seed=0)
    assert model.training


def test_top_k_and_top_p_support():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0, 1.0]]).repeat(4000, 1)
    assert set(sample_top_k_top_p(logits, top_k=2, generator=g).tolist()) == {1, 2}
    assert sample_top_k_top_p(logits, top_k=1).unique().tolist() == [1]
    probs = logits[0].softmax(-1)  # 0.47, 0.43, 0.06, ...: top_p=0.8 keeps tokens 1 and 2
    assert set(sample_top_k_top_p(logits, top_p=0.8, generator=g).tolist()) == {1, 2}
    assert probs[1] < 0.8 < probs[1] + probs[2]
    assert set(sample_top_k_top_p(logits, top_p=0.3, generator=g).tolist()) == {1}
    freq = torch.bincount(sample_top_k_top_p(logits, generator=g), minlength=5).float() / 4000
    torch.testing.assert_close(freq, probs, atol=0.03, rtol=0)
    with pytest.raises(ValueError, match="top_p"):
        sample_top_k_top_p(logits, top_p=1.5)
    with pytest.raises(ValueError, match="top_k"):
        sample_top_k_top_p(logits, top_k=-1)


def test_guidance_ramps():
    assert guidance_weight("linear", 2.0, 0, 10) == 0 and guidance_weight("linear", 2.0, 9, 10) == 2.0
    assert guidance_weight("flexvar", 2.0, 9, 13) == 2.0  # ratio capped at 9 steps
    assert guidance_weight("sar", 1.2, 0, 10) == pytest.approx(0.6)
    assert guidance_weight("constant", 2.5, 3, 10) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="cfg_ramp"):
        guidance_weight("cosine", 1.0, 0, 2)


def test_bad_sampler_input():
    model = random_scale_model("flexvar")
    with pytest.raises(ValueError, match="codebook must be"):
        generate(model, torch.randn(63, 8), torch.tensor([1]))
    with pytest.raises(ValueError, match="labels must lie"):
        generate(model, torch.randn(64, 8), torch.tensor([11]))
    with pytest.raises(ValueError, match="cfg_ramp"):
        generate(model, torch.randn(64, 8), torch.tensor([1]), cfg_ramp="x")


def test_sample_cli_writes_png_and_npz(tmp_path):
    import numpy as np

    from sar_fast.models.tokenizers.grey import GreyLevelTokenizer
    from sar_fast.models import save_export
    from sar_fast.sample import main
    tok = GreyLevelTokenizer()
    model = build_model("flexvar-tiny", vocab_size=tok.vocab_size, code_dim=1, schedule=(1, 2, 4, 8))
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    save_export(model, tmp_path / "m.pth")
    out, npz = tmp_path / "grid.png", tmp_path / "s.npz"
    main(["--ckpt", str(tmp_path / "m.pth"), "--vae", "embedded-digits", "--classes", "1,2,3", "--per-class", "2",
          "--cfg", "1.5", "--schedule", "1,2,4,8", "--batch-size", "4", "--out", str(out), "--npz", str(npz),
          "--device", "cpu"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    arr = np.load(npz)["arr_0"]
    assert arr.shape == (6, 8, 8, 3) and arr.dtype == np.uint8
    with pytest.raises(SystemExit, match="--classes must lie"):
        main(["--ckpt", str(tmp_path / "m.pth"), "--vae", "embedded-digits", "--classes", "10", "--device", "cpu"])
    with pytest.raises(SystemExit, match="no such file"):
        main(["--ckpt", str(tmp_path / "nope.pth"), "--vae", "embedded-digits"])


# ------------------------------------------------------------------ draws over the top-k candidates
from sar_fast.rng import sample_keyed_uniform  # noqa: E402
from sar_fast.sampling import sample_survivors, top_k_top_p_filter, top_k_top_p_survivors  # noqa: E402


def _naive_kept(row: list[float], top_k: int, top_p: float) -> set[int]:
    """The public code's kept set, one row, plain Python: top-k keeps every token >= the
    k-th largest; top-p drops the least likely whose ascending cumulative mass <= 1 - p."""
    import math
    V = len(row)
    kept = {i for i in range(V) if row[i] > float("-inf")}
    if 0 < top_k < V:
        kth = sorted(row, reverse=True)[top_k - 1]
        kept = {i for i in kept if row[i] >= kth}
    if 0 < top_p < 1:
        m = max(row[i] for i in kept)
        z = sum(math.exp(row[i] - m) for i in kept)
        ascending = sorted(kept, key=lambda i: row[i])
        mass, dropped = 0.0, set()
        for i in ascending[:-1]:  # the most likely always stays
            mass += math.exp(row[i] - m) / z
            if mass <= 1 - top_p:
                dropped.add(i)
        kept -= dropped
    return kept


def _fast_kept(logits, top_k, top_p) -> list[set[int]]:
    probs, token, keep = top_k_top_p_survivors(logits, top_k, top_p)
    token = torch.arange(logits.shape[1]).expand_as(probs) if token is None else token
    keep = torch.ones_like(probs, dtype=torch.bool) if keep is None else keep
    return [set(t[k].tolist()) for t, k in zip(token, keep)]


CASES = [(k, p) for k in (0, 1, 3, 17, 40) for p in (0.0, 0.3, 0.9, 0.96, 1.0)]


@pytest.mark.parametrize("V", [7, 40, 257])
def test_survivors_equal_the_filter_on_random_logits(V):
    g = torch.Generator().manual_seed(V)
    logits = torch.randn(64, V, generator=g) * torch.rand(64, 1, generator=g) * 4  # flat to peaked rows
    for top_k, top_p in CASES:
        today = [set(torch.nonzero(r > float("-inf")).flatten().tolist())
                 for r in top_k_top_p_filter(logits, top_k, top_p)]
        fast = _fast_kept(logits, top_k, top_p)
        naive = [_naive_kept(r, top_k, top_p) for r in logits.tolist()]
        assert fast == today == naive, (top_k, top_p)


def test_survivors_with_ties_at_the_kth_keep_exactly_k():
    """Tie-heavy logits (5 distinct values): today's filter keeps every token tied with the
    k-th, the fast path exactly k of them; apart from that the kept sets agree, and among
    tokens of equal logit only the count matters (equal probability)."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randint(0, 5, (200, 30), generator=g).float()
    straddling = 0
    for top_k, top_p in [(k, p) for k in (3, 10, 29) for p in (0.0, 0.537, 0.913)]:  # p off exact tie sums
        fast = _fast_kept(logits, top_k, top_p)
        for row, got in zip(logits.tolist(), fast):
            kth = sorted(row, reverse=True)[top_k - 1]
            above = {i for i, v in enumerate(row) if v > kth}
            tied = {i for i, v in enumerate(row) if v == kth}
            straddling += len(above) + len(tied) > top_k
            # today's rule on the fast path's k candidates (ties cut to k by topk): the same
            # number of tokens of each logit value is kept
            cand = sorted(above) + sorted(tied)[:top_k - len(above)]
            restricted = [v if i in cand else float("-inf") for i, v in enumerate(row)]
            want = _naive_kept(restricted, 0, top_p)
            assert sorted(row[i] for i in got) == sorted(row[i] for i in want)
            assert got <= above | tied and (top_p > 0 or above <= got)
            # against the full filter: without a nucleus, what the fast path drops beyond it
            # are ties of the k-th; with one, also the nucleus of rows where ties straddle
            # the k-th may differ (their mass is missing from the candidates' softmax)
            full = _naive_kept(row, top_k, top_p)
            if top_p == 0:
                extra = sorted(row[i] for i in full)
                for v in sorted(row[i] for i in got):
                    extra.remove(v)
                assert all(v == kth for v in extra) and len(extra) == len(above) + len(tied) - top_k
            elif len(above) + len(tied) == top_k:
                assert sorted(row[i] for i in got) == sorted(row[i] for i in full)
    assert straddling > 100  # the case this test is about happened


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum()
    expected = probs * n
    assert (counts[probs == 0] == 0).all(), "drew a token the filter drops"
    m = probs > 0
    return float(((counts[m] - expected[m]) ** 2 / expected[m]).sum())


@pytest.mark.parametrize("top_k, top_p, guidance", [(0, 0.0, 0.0), (5, 0.0, 0.0), (0, 0.8, 0.0), (6, 0.9, 0.0),
                                                    (6, 0.9, 1.5), (9, 0.0, 0.7)])
def test_survivor_draws_have_the_filters_distribution(top_k, top_p, guidance):
    """Empirical frequencies (40k draws, fixed seeds: deterministic) vs the filter's
    softmax, by chi-square: df <= 8, the 1e-4 tail is ~33; both uniform sources."""
    g = torch.Generator().manual_seed(top_k * 100 + int(top_p * 10))
    cond = torch.randn(1, 9, generator=g) * 1.5
    uncond = torch.randn(1, 9, generator=g)
    mixed = (1 + guidance) * cond - guidance * uncond if guidance else cond
    probs = top_k_top_p_filter(mixed, top_k, top_p).softmax(-1)[0].double()
    N = 40_000
    rows = cond.expand(N, 9)
    kw = dict(uncond=uncond.expand(N, 9), guidance=guidance) if guidance else {}
    by_generator = sample_survivors(rows, top_k, top_p, generator=torch.Generator().manual_seed(7), **kw)
    keyed = sample_survivors(rows, top_k, top_p, uniforms=sample_keyed_uniform(3, 11, 1, slice(0, N)), **kw)
    for draws in (by_generator, keyed):
        assert _chi2(torch.bincount(draws, minlength=9).double(), probs) < 33
    # the bound has teeth: the filter's distribution without the nucleus / guidance fails it
    if top_p or guidance:
        assert _chi2(torch.bincount(keyed, minlength=9).double(), cond.softmax(-1)[0].double()) > 100


def test_survivor_draws_shapes_greedy_and_errors():
    logits = torch.randn(2, 3, 11)
    u = torch.rand(2, 3, dtype=torch.float64)
    assert sample_survivors(logits, 4, 0.9, uniforms=u).shape == (2, 3)
    assert torch.equal(sample_survivors(logits, 1, 0.0), logits.argmax(-1))
    # u -> 0 takes the most likely candidate, u -> 1 the least likely kept one
    assert torch.equal(sample_survivors(logits, 4, 0.0, uniforms=torch.zeros(2, 3)), logits.argmax(-1))
    last = sample_survivors(logits, 4, 0.0, uniforms=torch.full((2, 3), 1 - 1e-16, dtype=torch.float64))
    assert torch.equal(last, logits.topk(4).indices[..., -1])
    nuc = sample_survivors(logits, 0, 0.5, uniforms=torch.full((2, 3), 1 - 1e-16, dtype=torch.float64))
    assert (top_k_top_p_filter(logits, 0, 0.5).view(2, 3, 11).gather(-1, nuc.unsqueeze(-1)) > float("-inf")).all()
    with pytest.raises(ValueError, match="uniforms must have shape"):
        sample_survivors(logits, 4, 0.9, uniforms=torch.rand(6))
    with pytest.raises(ValueError, match="uncond must have"):
        sample_survivors(logits, 4, 0.9, uncond=torch.randn(2, 11), guidance=1.0)
    with pytest.raises(ValueError, match="top_p"):
        sample_survivors(logits, 4, 1.5)
    with pytest.raises(ValueError, match="top_k"):
        sample_survivors(logits, -2, 0.5)


# ------------------------------------------------------------------ uniforms keyed by the sample
def _lowbias32(x: int) -> int:  # the hash in plain Python integers, for the tensor version
    M = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M
    x ^= x >> 15
    x = (x * 0x846CA68B) & M
    return x ^ (x >> 16)


def test_keyed_uniform_hash_matches_plain_integers():
    from sar_fast.rng import _mix32
    xs = [0, 1, 2, 12345, 2**31 - 1, 2**31, 2**32 - 1, 0xDEADBEEF]
    xs += torch.randint(0, 2**32, (200,), generator=torch.Generator().manual_seed(0), dtype=torch.int64).tolist()
    assert _mix32(torch.tensor(xs)).tolist() == [_lowbias32(x) for x in xs]


def test_keyed_uniform_is_keyed_by_row_and_uniform():
    u = sample_keyed_uniform(0, 5, (1, 3), slice(0, 4096), (7,))
    assert u.shape == (4096, 7) and u.dtype == torch.float64 and (u >= 0).all() and (u < 1).all()
    # a row's uniforms do not depend on which other rows are drawn, nor on the device argument
    rows = torch.tensor([4095, 17, 3])
    assert torch.equal(sample_keyed_uniform(0, 5, (1, 3), rows, (7,), "cpu"), u[rows])
    # every key component matters
    for other in [(1, 5, (1, 3)), (0, 6, (1, 3)), (0, 5, (1, 4)), (0, 5, (2, 3)), (0, 5, 1)]:
        v = sample_keyed_uniform(*other, slice(0, 4096), (7,))
        assert (v != u).float().mean() > 0.999
    # uniform: 64 bins, chi-square with df 63 (1e-4 tail ~ 110); rows and elements uncorrelated
    counts = torch.bincount((u.flatten() * 64).long(), minlength=64).double()
    assert _chi2(counts, torch.full((64,), 1 / 64, dtype=torch.float64)) < 110
    assert abs(torch.corrcoef(torch.stack((u[:-1, 0], u[1:, 0])))[0, 1]) < 0.06
    assert abs(torch.corrcoef(torch.stack((u[:, 0], u[:, 1])))[0, 1]) < 0.06
    assert sample_keyed_uniform(0, 0, 1, slice(2**40, 2**40 + 3)).shape == (3,)


def test_keyed_uniform_bad_input():
    with pytest.raises(ValueError, match="global_rows"):
        sample_keyed_uniform(0, 0, 1, torch.tensor([0.5]))
    with pytest.raises(ValueError, match="global_rows slice"):
        sample_keyed_uniform(0, 0, 1, slice(0, 10, 2))
    with pytest.raises(ValueError, match="seed, step and stream"):
        sample_keyed_uniform(-1, 0, 1, slice(0, 3))
