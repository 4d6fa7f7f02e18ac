import pytest
import torch

from sar_fast.models import build_model
from sar_fast.sampler import guidance_weight, generate, sample_top_k_top_p


def _random_model(arch, **kw):
    model = build_model(f"{arch}-tiny", schedule=(1, 2, 3, 5), **kw)
    for p in model.parameters():  # random, not the near-identity init, so every block matters
        p.data.normal_(0, 0.2)
    return model


def _phi(h, si, n):
    return h * (0.5 + 0.1 * si)


@pytest.mark.parametrize("arch", ["flexvar", "var"])
@pytest.mark.parametrize("cfg, top_k, top_p", [(2.0, 10, 0.9), (0.0, 0, 0.0), (1.5, 1, 0.0)])
def test_kv_cache_equals_full_recompute(arch, cfg, top_k, top_p):
    model = _random_model(arch)
    book = torch.randn(64, 8)
    labels = torch.tensor([0, 3, 10])
    kw = dict(cfg=cfg, top_k=top_k, top_p=top_p, seed=5, phi=_phi if arch == "var" else None)
    cached = generate(model, book, labels, **kw)
    full = generate(model, book, labels, use_cache=False, **kw)
    assert [c.shape for c in cached.codes] == [(3, 1), (3, 4), (3, 9), (3, 25)]
    for a, b in zip(cached.codes, full.codes):
        assert torch.equal(a, b)


def test_same_seed_same_samples_other_seed_differs():
    model = _random_model("flexvar")
    book = torch.randn(64, 8)
    labels = torch.arange(4)
    a = generate(model, book, labels, cfg=1.0, seed=1)
    b = generate(model, book, labels, cfg=1.0, seed=1)
    c = generate(model, book, labels, cfg=1.0, seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a.codes, b.codes))
    assert not all(torch.equal(x, y) for x, y in zip(a.codes, c.codes))


def test_any_schedule_and_decoder():
    model = _random_model("flexvar")
    out = generate(model, torch.randn(64, 8), torch.tensor([1]), schedule=(1, 4, 7), seed=0,
                   decode=lambda codes: torch.zeros(len(codes[0]), 3, 8, 8))
    assert [c.shape[1] for c in out.codes] == [1, 16, 49] and out.images.shape == (1, 3, 8, 8)


def test_sampler_restores_training_mode():
    model = _random_model("flexvar").train()
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
    model = _random_model("flexvar")
    with pytest.raises(ValueError, match="codebook must be"):
        generate(model, torch.randn(63, 8), torch.tensor([1]))
    with pytest.raises(ValueError, match="labels must lie"):
        generate(model, torch.randn(64, 8), torch.tensor([11]))
    with pytest.raises(ValueError, match="cfg_ramp"):
        generate(model, torch.randn(64, 8), torch.tensor([1]), cfg_ramp="x")


def test_sample_cli_writes_png_and_npz(tmp_path):
    import numpy as np

    from sar_fast.embedded import GreyLevelTokenizer
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
