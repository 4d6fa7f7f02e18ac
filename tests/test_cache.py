"""Code cache CLI (python -m sar_fast.cache) and CodeDataset, in-process on tiny data."""
import json

import numpy as np
import pytest
import torch

from conftest import need_module

from sar_fast import cache
from sar_fast.data.codes import CodeDataset, read_cache_manifest
from sar_fast.models.checkpoint import files_sha256
from sar_fast.data.digits import EmbeddedDigitsDataset
from sar_fast.data.images import ImageFolderDataset
from sar_fast.models.tokenizers.grey import GreyLevelTokenizer

need_module("PIL")
from PIL import Image  # noqa: E402

SCHEDULE = (1, 2, 4, 8)


@pytest.fixture
def folder(tmp_path):
    """5 random 8x8..12x8 RGB images in two classes."""
    rng = np.random.default_rng(int(torch.randint(0, 2**31, ())))
    root = tmp_path / "imgs"
    for cls, sizes in (("zebra", [(8, 8), (12, 8), (8, 9)]), ("ant", [(8, 8), (10, 10)])):
        (root / cls).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


def _run(*args: str) -> None:
    assert cache.main([*args, "--num-workers", "0", "--no-progress", "--device", "cpu"]) == 0


def _expected_codes(root, schedule, flip=False):
    ds = ImageFolderDataset(root, resolution=8, train=False)
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    tok = GreyLevelTokenizer()
    views = [images] + ([images.flip(-1)] if flip else [])
    return torch.stack([torch.cat(tok.encode(v, schedule), 1) for v in views], 1).numpy(), \
        [label for _, label in ds.samples]


def test_cache_folder_with_grey_tokenizer(folder, tmp_path):
    out = tmp_path / "cache"
    _run("--data", str(folder), "--vae", "embedded-digits", "--out", str(out), "--resolution", "8",
         "--schedule", ",".join(map(str, SCHEDULE)), "--batch-size", "2")
    m = read_cache_manifest(out)
    assert m["done"] == m["num_samples"] == 5 and m["schedule"] == list(SCHEDULE) and m["views"] == 1
    assert m["classes"] == ["ant", "zebra"] and m["dtype"] == "int16" and m["resolution"] == 8
    want, labels = _expected_codes(folder, SCHEDULE)
    codes = np.load(out / "codes.npy")
    assert codes.shape == (5, 1, 85) and codes.dtype == np.int16
    np.testing.assert_array_equal(codes, want)
    np.testing.assert_array_equal(np.load(out / "labels.npy"), labels)
    ds = CodeDataset(out)
    assert len(ds) == 5 and ds.schedule == SCHEDULE and ds.num_classes == 2
    for i in range(5):
        c, y = ds[i]
        assert c.dtype == torch.int64 and c.shape == (85,) and int(y) == labels[i]
        np.testing.assert_array_equal(c.numpy(), want[i, 0])


def test_cache_resume_after_interruption(folder, tmp_path, monkeypatch):
    args = ["--data", str(folder), "--vae", "embedded-digits", "--resolution", "8", "--schedule", "1,2,4,8",
            "--batch-size", "2"]
    encoded = []
    real_encode = GreyLevelTokenizer.encode
    monkeypatch.setattr(GreyLevelTokenizer, "encode",
                        lambda self, im, s: encoded.append(len(im)) or real_encode(self, im, s))
    _run(*args, "--out", str(tmp_path / "part"), "--max-batches", "1")
    m = read_cache_manifest(tmp_path / "part")
    assert m["done"] == 2 and encoded == [2]
    with pytest.raises(ValueError, match="incomplete"):
        CodeDataset(tmp_path / "part")
    codes = np.lib.format.open_memmap(tmp_path / "part" / "codes.npy", mode="r+")
    codes[2:] = -1  # whatever a killed run left past `done` must be rewritten
    codes.flush()
    del codes
    encoded.clear()
    _run(*args, "--out", str(tmp_path / "part"))
    assert encoded == [2, 1]  # only the 3 images past `done`
    _run(*args, "--out", str(tmp_path / "full"))
    np.testing.assert_array_equal(np.load(tmp_path / "part" / "codes.npy"), np.load(tmp_path / "full" / "codes.npy"))
    assert read_cache_manifest(tmp_path / "part")["done"] == 5
    encoded.clear()
    _run(*args, "--out", str(tmp_path / "full"))  # complete: nothing to do
    assert encoded == []


def test_cache_refuses_a_different_cache_unless_overwrite(folder, tmp_path, capsys):
    out = str(tmp_path / "cache")
    base = ["--data", str(folder), "--vae", "embedded-digits", "--resolution", "8", "--out", out]
    _run(*base, "--schedule", "1,2,4,8")
    with pytest.raises(SystemExit) as e:
        _run(*base, "--schedule", "1,3,8")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "schedule" in err and "--overwrite" in err
    (folder / "ant" / "extra.png").write_bytes((folder / "ant" / "0.png").read_bytes())
    with pytest.raises(SystemExit):  # the folder changed
        _run(*base, "--schedule", "1,2,4,8")
    assert "data_sha256" in capsys.readouterr().err
    _run(*base, "--schedule", "1,3,8", "--overwrite")
    m = read_cache_manifest(out)
    assert m["schedule"] == [1, 3, 8] and m["done"] == m["num_samples"] == 6


@pytest.mark.parametrize("args, match", [
    (["--data", "MISSING", "--vae", "embedded-digits"], "--data"),
    (["--data", "FOLDER", "--vae", "MISSING"], "--vae"),
    (["--data", "FOLDER", "--vae", "embedded-digits", "--schedule", "1,2,4"], "--schedule"),
    (["--data", "FOLDER", "--vae", "embedded-digits", "--schedule", "1,x"], "--schedule"),
    (["--data", "FOLDER", "--vae", "embedded-digits", "--batch-size", "0"], "--batch-size"),
    (["--data", "embedded-digits", "--vae", "embedded-digits", "--resolution", "16"], "--resolution"),
])
def test_cache_bad_arguments_fail_fast(folder, tmp_path, capsys, args, match):
    args = [str(tmp_path / "nope") if a == "MISSING" else str(folder) if a == "FOLDER" else a for a in args]
    if "--resolution" not in args:
        args += ["--resolution", "8"]
    with pytest.raises(SystemExit) as e:
        _run(*args, "--out", str(tmp_path / "cache"))
    assert e.value.code == 2 and match in capsys.readouterr().err
    assert not (tmp_path / "cache" / "manifest.json").exists()


def test_cache_flip_views_and_code_dataset_sampling(folder, tmp_path):
    out = tmp_path / "cache"
    _run("--data", str(folder), "--vae", "embedded-digits", "--resolution", "8", "--out", str(out), "--flip")
    m = read_cache_manifest(out)
    assert m["views"] == 2 and m["schedule"] == list(range(1, 9))  # default: every side for flexvar codes
    want, _ = _expected_codes(folder, tuple(range(1, 9)), flip=True)
    np.testing.assert_array_equal(np.load(out / "codes.npy"), want)
    ds = CodeDataset(out, schedule=SCHEDULE, seed=int(torch.randint(0, 1000, ())))
    sub, _ = _expected_codes(folder, SCHEDULE, flip=True)  # a sub-schedule read back == encoded directly
    views_seen = set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            c = ds[i][0].numpy()
            matches = [v for v in range(2) if np.array_equal(c, sub[i, v])]
            assert matches
            views_seen.update(matches)
            assert np.array_equal(c, ds[i][0].numpy())  # deterministic within an epoch
    assert views_seen == {0, 1}
    no_flip = CodeDataset(out, random_flip=False)
    np.testing.assert_array_equal(no_flip[3][0].numpy(), want[3, 0])


def test_cache_embedded_digits_split(tmp_path):
    need_module("sklearn")
    out = tmp_path / "digits"
    _run("--data", "embedded-digits", "--vae", "embedded-digits", "--out", str(out), "--split", "val",
         "--schedule", "1,2,3,4,6,8", "--batch-size", "64")
    ds, ref = CodeDataset(out), EmbeddedDigitsDataset("val")
    assert len(ds) == len(ref) == 179
    tok = GreyLevelTokenizer()
    want = torch.cat(tok.encode(ref.images, (1, 2, 3, 4, 6, 8)), 1)
    got = torch.stack([ds[i][0] for i in range(len(ds))])
    assert torch.equal(got, want)
    assert torch.equal(torch.stack([ds[i][1] for i in range(len(ds))]), ref.labels)


def test_code_dataset_refuses_residual_sub_schedule(tmp_path):
    out = tmp_path / "c"
    _run("--data", "embedded-digits", "--vae", "embedded-digits", "--out", str(out), "--split", "val",
         "--schedule", "1,2,4,8")
    manifest_path = out / "manifest.json"
    m = json.loads(manifest_path.read_text())
    m["quant_mode"] = "var"
    manifest_path.write_text(json.dumps(m))
    assert len(CodeDataset(out)) == 179  # its own schedule is fine
    with pytest.raises(ValueError, match="residual"):
        CodeDataset(out, schedule=(1, 2, 8))
    with pytest.raises(FileNotFoundError, match="manifest"):
        CodeDataset(tmp_path)


def test_cache_with_a_tiny_flexvq16(folder, tmp_path):
    tokenizers = need_module("sar_fast.models.tokenizers")
    model = tokenizers.FlexVQ16(vocab_size=64, Cvae=4, z_channels=32, ch=32, ch_mult=(1, 1), num_res_blocks=1)
    path = tmp_path / "vq.pth"
    torch.save(model.state_dict(), path)
    out = tmp_path / "cache"
    _run("--data", str(folder), "--vae", str(path), "--out", str(out), "--resolution", "8", "--batch-size", "3")
    m = read_cache_manifest(out)
    assert m["tokenizer_class"] == "FlexVQ16" and m["tokenizer_sha256"] == files_sha256([str(path)])
    assert m["schedule"] == [1, 2, 3, 4] and m["vocab_size"] == 64  # 8 px / downsample 2
    ds = ImageFolderDataset(folder, resolution=8, train=False)
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    tok = tokenizers.load_tokenizer(str(path))
    want = torch.cat(tok.encode(images, (1, 2, 3, 4)), 1)
    assert torch.equal(torch.from_numpy(np.load(out / "codes.npy")[:, 0].astype(np.int64)), want)
    torch.save({k: v + 1 for k, v in model.state_dict().items()}, path)  # another tokenizer, same path
    with pytest.raises(SystemExit):
        _run("--data", str(folder), "--vae", str(path), "--out", str(out), "--resolution", "8")
