"""sar_fast.evaluate: images belong to (class, index) whatever the ranks and batch size, a
killed run resumes without losing or duplicating an image, errors come before sampling, and
the embedded default runs end to end."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from sar_fast import evaluate
from sar_fast.models.generate import generate
from sar_fast.sampling import sample_top_k_top_p

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)  # the CLI as users run it
    return env


def _tiny_export(path, depth=2, embed_dim=32, num_heads=2, seed=0):
    from sar_fast.models import ScaleAR, preset_config, save_export
    torch.manual_seed(seed)
    config = preset_config("flexvar-tiny", depth=depth, embed_dim=embed_dim, num_heads=num_heads, vocab_size=17,
                           code_dim=1, schedule=(1, 2, 3, 4, 6, 8))
    save_export(ScaleAR(config), path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return _tiny_export(tmp_path_factory.mktemp("ckpt") / "export.pth")


def _run(ckpt, out, *extra):
    return evaluate.main(["--ckpt", ckpt, "--out", str(out), "--device", "cpu", "--classes", "5", "--per-class", "3",
                          "--shard-size", "4", "--metric", "none", *extra])


def _samples(out):
    with np.load(os.path.join(out, "samples.npz")) as z:
        return z["arr_0"], z["labels"]


def test_inverse_cdf_draw_matches_a_plain_loop_and_respects_top_k():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 33, generator=gen) * 3
    uniforms = torch.rand(7, generator=gen, dtype=torch.float64)
    drawn = sample_top_k_top_p(logits, uniforms=uniforms)
    probs = logits.double().softmax(-1)
    for r in range(7):  # the smallest index whose cumulative probability exceeds u
        acc, expected = 0.0, None
        for i, p in enumerate(probs[r].tolist()):
            acc += p
            if acc > uniforms[r].item() * probs[r].sum().item():
                expected = i
                break
        assert drawn[r].item() == expected
    many = torch.rand(4000, generator=gen, dtype=torch.float64)
    row = logits[:1].expand(4000, -1)
    topk = sample_top_k_top_p(row, top_k=5, uniforms=many)
    assert set(topk.tolist()) <= set(logits[0].topk(5).indices.tolist())
    freq = torch.bincount(sample_top_k_top_p(row, uniforms=many), minlength=33).double() / 4000
    assert (freq - probs[0]).abs().max() < 0.04
    with pytest.raises(ValueError, match="uniforms"):
        sample_top_k_top_p(logits, uniforms=uniforms[:3])


def test_generate_with_uniforms_depends_on_the_row_only(tiny_ckpt):
    from sar_fast.models.tokenizers.grey import GreyLevelTokenizer
    from sar_fast.models import load_checkpoint
    model, tok = load_checkpoint(tiny_ckpt).eval(), GreyLevelTokenizer()
    labels = torch.tensor([3, 1, 4, 1, 5])
    noise = torch.rand(5, sum(s * s for s in model.config.schedule), generator=torch.Generator().manual_seed(1))
    kwargs = dict(cfg=1.5, top_k=6, top_p=0.9, decode=tok.decode)
    whole = generate(model, tok.codebook(), labels, uniforms=noise, **kwargs).codes
    for r in (0, 3, 4):
        alone = generate(model, tok.codebook(), labels[r:r + 1], uniforms=noise[r:r + 1], **kwargs).codes
        for s_whole, s_alone in zip(whole, alone):
            assert torch.equal(s_whole[r:r + 1], s_alone)
    no_cache = generate(model, tok.codebook(), labels, uniforms=noise, use_cache=False, **kwargs).codes
    assert all(torch.equal(a, b) for a, b in zip(whole, no_cache))
    with pytest.raises(ValueError, match="uniforms must be"):
        generate(model, tok.codebook(), labels, uniforms=noise[:, :-1], **kwargs)


def test_same_images_for_any_batch_size(tiny_ckpt, tmp_path):
    _run(tiny_ckpt, tmp_path / "b2", "--batch-size", "2")
    _run(tiny_ckpt, tmp_path / "b5", "--batch-size", "5", "--shard-size", "7")
    a, la = _samples(tmp_path / "b2")
    b, lb = _samples(tmp_path / "b5")
    assert a.shape == (15, 8, 8, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(la, np.arange(15) % 5)
    np.testing.assert_array_equal(la, lb)
    np.testing.assert_array_equal(a, b)
    assert len({img.tobytes() for img in a}) > 10  # not one image repeated
    # another seed gives other images
    _run(tiny_ckpt, tmp_path / "s1", "--seed", "1")
    assert not np.array_equal(_samples(tmp_path / "s1")[0], a)


def test_same_images_for_one_and_two_ranks(tiny_ckpt, tmp_path):
    _run(tiny_ckpt, tmp_path / "one", "--batch-size", "3")
    env = _env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m",
           "sar_fast.evaluate", "--ckpt", tiny_ckpt, "--out", str(tmp_path / "two"), "--device", "cpu",
           "--classes", "5",
           "--per-class", "3", "--shard-size", "4", "--metric", "none", "--batch-size", "3"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_array_equal(_samples(tmp_path / "one")[0], _samples(tmp_path / "two")[0])
    np.testing.assert_array_equal(_samples(tmp_path / "one")[1], _samples(tmp_path / "two")[1])


def test_killed_run_resumes_without_losing_or_duplicating(tiny_ckpt, tmp_path, monkeypatch):
    _run(tiny_ckpt, tmp_path / "full")
    reference = _samples(tmp_path / "full")

    class Killed(BaseException):
        pass

    writes = []
    real_save = evaluate.save_npz_atomic

    def dying_save(path, **arrays):
        if len(writes) == 2:  # killed while writing the third shard: a partial temporary file stays
            with open(f"{path}.tmp999", "wb") as f:
                f.write(b"PK\x03\x04 cut short")
            raise Killed()
        writes.append(path)
        real_save(path, **arrays)

    monkeypatch.setattr(evaluate, "save_npz_atomic", dying_save)
    with pytest.raises(Killed):
        _run(tiny_ckpt, tmp_path / "resumed")
    monkeypatch.setattr(evaluate, "save_npz_atomic", real_save)
    assert sorted(os.listdir(tmp_path / "resumed" / "shards")) == \
        ["shard_000000.npz", "shard_000001.npz", "shard_000002.npz.tmp999"]

    sampled = []
    real_sample = evaluate.sample_shard
    monkeypatch.setattr(evaluate, "sample_shard",
                        lambda model, tok, settings, indices, *a: sampled.append(indices.tolist())
                        or real_sample(model, tok, settings, indices, *a))
    _run(tiny_ckpt, tmp_path / "resumed")
    assert sampled == [[8, 9, 10, 11], [12, 13, 14]]  # only the unfinished shards
    resumed = _samples(tmp_path / "resumed")
    np.testing.assert_array_equal(resumed[0], reference[0])
    np.testing.assert_array_equal(resumed[1], reference[1])

    # a damaged shard (e.g. a copy cut short) is sampled again; other settings are refused
    with open(tmp_path / "resumed" / "shards" / "shard_000001.npz", "wb") as f:
        f.write(b"garbage")
    sampled.clear()
    _run(tiny_ckpt, tmp_path / "resumed")
    assert sampled == [[4, 5, 6, 7]]
    np.testing.assert_array_equal(_samples(tmp_path / "resumed")[0], reference[0])
    with pytest.raises(SystemExit, match="other settings.*cfg"):
        _run(tiny_ckpt, tmp_path / "resumed", "--cfg", "3")


def test_missing_inception_weights_fail_before_sampling(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(evaluate, "sample_shard", lambda *a: pytest.fail("sampling started"))
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(SystemExit, match="weights-inception-2015-12-05-6726825d.pth.*torch_home"):
        evaluate.main(["--ckpt", tiny_ckpt, "--metric", "inception", "--reference", str(ref),
                       "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="--inception .*nope.pth: no such file"):
        evaluate.main(["--ckpt", tiny_ckpt, "--metric", "inception", "--reference", str(ref),
                       "--inception", str(tmp_path / "nope.pth"), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_inception_metric_through_the_cli(tiny_ckpt, tmp_path):
    from sar_fast import files
    pytest.importorskip("torch_fidelity")
    weights = _random_inception_file(tmp_path)
    folder = tmp_path / "real"
    folder.mkdir()
    for i, img in enumerate(np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)):
        files.write_png(str(folder / f"{i}.png"), img)
    record = evaluate.main(["--ckpt", tiny_ckpt, "--out", str(tmp_path / "o"), "--device", "cpu", "--classes", "2",
                            "--per-class", "2", "--metric", "inception", "--reference", str(folder),
                            "--inception", weights])
    assert set(record["metrics"]) == {"fid", "inception_score", "inception_score_std", "precision", "recall"}
    assert all(np.isfinite(v) for v in record["metrics"].values())
    assert os.listdir(tmp_path / "reference_cache")


def _random_inception_file(tmp_path):
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
    patch = pytest.MonkeyPatch()
    patch.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: {})
    patch.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
    try:
        net = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        patch.undo()
    path = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(net.state_dict(), path)
    return str(path)


def test_embedded_default_end_to_end_under_three_minutes(tmp_path):
    # the tiny preset's model shape (sar_fast.train's 'tiny'), untrained
    ckpt = _tiny_export(tmp_path / "export.pth", depth=3, embed_dim=96, num_heads=4)
    env = _env()
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "sar_fast.evaluate", "--ckpt", ckpt], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=180)
    elapsed = time.time() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert elapsed < 180
    out = tmp_path / "eval"
    record = json.loads((out / "metrics.json").read_text())
    assert record["metric"] == "digits" and record["num_images"] == 500
    assert set(record["metrics"]) >= {"frechet", "accuracy"}
    assert record["settings"]["preset"] == "digits" and len(record["settings"]["checkpoint_sha256"]) == 64
    assert (out / "grid.png").stat().st_size > 0 and (out / "summary.txt").read_text().strip() in proc.stdout
    assert "img/s" in proc.stderr and "ETA" in proc.stderr
