"""Broken image folders and code caches: a clear error before training, or (a handful of bad
images) skipped, counted and reported, with --bad-images error making them fatal."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from sar_fast import cache
from sar_fast.data.codes import CodeDataset, check_code_cache
from sar_fast.data.images import DataError, ImageFolderDataset
from sar_fast.train import parse_config

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _folder(root, n_per_class=20, side=8):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(root / c / f"{i:03d}.png")
    return root


def _spoil(root):
    """A zero-byte image, a non-image with an image name, and a dangling link (unreadable)."""
    (root / "a" / "zero.png").write_bytes(b"")
    (root / "b" / "corrupt.jpg").write_bytes(os.urandom(300))
    os.symlink(root / "gone.png", root / "b" / "link.png")
    return {"zero.png": "empty file", "corrupt.jpg": "not an image PIL can read", "link.png": "FileNotFoundError"}


def test_a_few_bad_images_are_skipped_counted_and_reported(tmp_path):
    root = _folder(tmp_path / "imgs")
    bad = _spoil(root)
    with pytest.warns(RuntimeWarning, match=r"3 of 43 images are unusable; skipping them"):
        ds = ImageFolderDataset(root, resolution=8)
    assert len(ds) == 40 and ds.num_skipped == 3
    reasons = {os.path.basename(p): r for p, r in ds.skipped}
    for name, reason in bad.items():
        assert reason in reasons[name]
    assert all(os.path.basename(p) not in bad for p, _ in ds.samples)
    # the same folder with --bad-images error: one error naming the files
    with pytest.raises(DataError, match=r"3 of 43 images are unusable \(bad_images='error', --bad-images error\)"
                                        r": .*zero.png: empty file"):
        ImageFolderDataset(root, resolution=8, bad_images="error")


def test_many_bad_images_are_an_error_even_when_skipping(tmp_path):
    root = _folder(tmp_path / "imgs", n_per_class=5)
    for i in range(11):
        (root / "a" / f"z{i}.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"11 of 21 images are unusable, more than 10 and 1%: is this the right folder"):
        ImageFolderDataset(root, resolution=8)


def test_an_image_whose_body_fails_to_decode(tmp_path):
    root = _folder(tmp_path / "imgs", n_per_class=3, side=64)
    victim = root / "a" / "001.png"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # the header parses, the pixels do not
    ds = ImageFolderDataset(root, resolution=8, train=False)
    assert ds.num_skipped == 0 and len(ds) == 6
    with pytest.warns(RuntimeWarning, match=r"skipping an image that fails to decode: cannot read image .*001.png"):
        x, y = ds[1]
    np.testing.assert_array_equal(x.numpy(), ds[2][0].numpy())  # the next sample stands in
    assert ds.num_skipped == 1
    # failures inside DataLoader workers are counted where the trainer reads them
    from torch.utils.data import DataLoader
    fresh = ImageFolderDataset(root, resolution=8, train=False)
    batches = list(DataLoader(fresh, batch_size=2, num_workers=2))  # (workers' warnings go to their stderr)
    assert sum(len(b[1]) for b in batches) == 6 and fresh.num_skipped == 1
    strict = ImageFolderDataset(root, resolution=8, train=False, bad_images="error")
    with pytest.raises(OSError, match=r"cannot read image .*001.png"):
        strict[1]


def _tokenizer_file(path):
    from sar_fast.models.tokenizers import FlexVQ16
    tok = FlexVQ16(vocab_size=64, Cvae=4, z_channels=32, ch=32, ch_mult=(1, 1), num_res_blocks=1)
    torch.save({"model": tok.state_dict()}, path)
    return str(path)


def test_folder_without_images_fails_before_training(tmp_path):
    (tmp_path / "noimg" / "cls").mkdir(parents=True)
    (tmp_path / "noimg" / "cls" / "a.txt").write_text("x")
    with pytest.raises(SystemExit, match=r"error: image folder .*noimg' has 1 class sub-folders but no images"):
        parse_config(["--data", str(tmp_path / "noimg"), "--vae", _tokenizer_file(tmp_path / "tok.pth"),
                      "--max-steps", "1", "--out", str(tmp_path / "run")])


# ---------------------------------------------------------------------- code caches
@pytest.fixture
def good_cache(tmp_path):
    out = tmp_path / "cache"
    root = _folder(tmp_path / "imgs", n_per_class=3)
    assert cache.main(["--data", str(root), "--vae", "embedded-digits", "--out", str(out), "--resolution", "8",
                       "--schedule", "1,2,4,8", "--num-workers", "0", "--no-progress", "--device", "cpu"]) == 0
    return out


def _edit_manifest(out, **changes):
    m = json.loads((out / "manifest.json").read_text())
    m.update(changes)
    (out / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("tamper, msg", [
    (lambda out: _edit_manifest(out, num_samples=7, done=7),
     r"codes.npy is \(6, 1, 85\) int16, but the manifest says \(7, 1, 85\) int16"),
    (lambda out: _edit_manifest(out, dtype="int32"),
     r"codes.npy is \(6, 1, 85\) int16, but the manifest says .* int32"),
    (lambda out: _edit_manifest(out, schedule=[1, 2, 4]), r"schedule \(1, 2, 4\) has 21 tokens but seq_len is 85"),
    (lambda out: _edit_manifest(out, schedule=[1, 2, 3, 4, 7], seq_len=79),
     r"codes.npy is \(6, 1, 85\) int16, but the manifest says \(6, 1, 79\)"),
    (lambda out: (out / "codes.npy").write_bytes((out / "codes.npy").read_bytes()[:-10]),
     r"codes.npy is truncated: \d+ bytes on disk, \d+ expected for \(6, 1, 85\) int16"),
    (lambda out: (out / "labels.npy").write_bytes(b"garbage"), r"labels.npy: not a .npy array file"),
    (lambda out: _edit_manifest(out, classes=["a"]), r"labels span \[0, 1\] but the manifest lists 1 classes"),
    (lambda out: (out / "manifest.json").write_text("{not json"), r"manifest.json: not a valid JSON manifest"),
    (lambda out: _edit_manifest(out, views="1"), r"missing or mistyped entries: views \(int\)"),
    (lambda out: os.remove(out / "codes.npy"), r"has no codes.npy"),
])
def test_cache_whose_arrays_disagree_with_its_manifest(good_cache, tamper, msg):
    CodeDataset(good_cache)  # loads before tampering
    tamper(good_cache)
    with pytest.raises(DataError, match=msg):
        CodeDataset(good_cache)
    # the trainer says the same, before any rank starts
    with pytest.raises(SystemExit, match=msg):
        parse_config(["--cache", str(good_cache), "--max-steps", "1", "--out", str(good_cache / "run")])


def test_cache_built_with_another_tokenizer(good_cache, tmp_path):
    m = check_code_cache(good_cache)
    assert check_code_cache(good_cache, m["tokenizer_sha256"])["num_samples"] == 6
    with pytest.raises(DataError, match=r"was built with another tokenizer .* than --vae"):
        check_code_cache(good_cache, "0" * 64)
    # through the trainer: a real tokenizer file whose hash is not the cache's
    with pytest.raises(SystemExit, match=r"was built with another tokenizer"):
        parse_config(["--cache", str(good_cache), "--vae", _tokenizer_file(tmp_path / "tok.pth"), "--max-steps", "1",
                      "--out", str(tmp_path / "run")])


def test_trainer_reports_skipped_images_in_metrics(tmp_path):
    """--data with a zero-byte image: the run trains on the rest and metrics.jsonl counts it;
    --bad-images error stops before training."""
    root = _folder(tmp_path / "data", n_per_class=8)
    (root / "a" / "zero.png").write_bytes(b"")
    _tokenizer_file(tmp_path / "tok.pth")
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    base = [sys.executable, "-m", "sar_fast.train", "--data", str(root), "--vae", str(tmp_path / "tok.pth"),
            "--resolution", "8", "--schedule", "1,2,4", "--max-steps", "1", "--pretrain-steps", "0",
            "--objective", "tf", "--depth", "1", "--embed-dim", "32", "--num-heads", "2", "--batch-size", "4",
            "--num-samples", "4", "--log-every", "1", "--no-progress", "--workers", "0", "--top-k", "0",
            "--ckpt-every", "100"]
    res = subprocess.run(base + ["--out", str(tmp_path / "run")], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "1 of 17 images are unusable; skipping them" in res.stderr
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert recs and all(r["skipped_images"] == 1 for r in recs)
    res = subprocess.run(base + ["--out", str(tmp_path / "strict"), "--bad-images", "error"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "1 of 17 images are unusable (bad_images='error'" in res.stderr
