"""Data side: embedded digits + grey-level tokenizer, image folder, sampler, collate."""
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from conftest import need_module

from sar_fast.data.digits import EmbeddedDigitsDataset
from sar_fast.data.images import ImageFolderDataset, scan_image_folder
from sar_fast.data.loader import ResumableDistributedSampler, collate
from sar_fast.data.codes import schedule_token_index
from sar_fast.data.digits import DIGITS_SCHEDULE, digits_to_images, load_digits_dataset
from sar_fast.models.tokenizers.grey import GreyLevelTokenizer
from sar_fast.schedules import scale_offsets

PIL = need_module("PIL")
from PIL import Image  # noqa: E402

need_module("sklearn")


# ---------------------------------------------------------------------- digits
def test_digits_split_sizes_disjoint_stratified_deterministic():
    all_x, all_y = load_digits_dataset("all")
    assert all_x.shape == (1797, 1, 8, 8) and all_x.dtype == torch.uint8 and int(all_x.max()) == 16
    tx, ty = load_digits_dataset("train", val_fraction=0.1, seed=3)
    vx, vy = load_digits_dataset("val", val_fraction=0.1, seed=3)
    assert len(tx) + len(vx) == 1797 and ty.dtype == torch.int64
    for c in range(10):  # every class is split ~10% / 90%
        n_c = int((all_y == c).sum())
        assert int((vy == c).sum()) == round(0.1 * n_c)
    # train and val are disjoint and together the whole set (as a multiset of image+label rows)
    def rows(x, y):
        return sorted(a.numpy().tobytes() + bytes([int(b)]) for a, b in zip(x, y))
    assert sorted(rows(tx, ty) + rows(vx, vy)) == rows(all_x, all_y)
    assert torch.equal(load_digits_dataset("val", 0.1, 3)[0], vx)
    assert not torch.equal(load_digits_dataset("val", 0.1, 4)[0], vx)


@pytest.mark.parametrize("kwargs, match", [(dict(split="test"), "split"), (dict(val_fraction=1.0), "val_fraction"),
                                           (dict(val_fraction=-0.1), "val_fraction"), (dict(seed=-1), "seed"),
                                           (dict(split="val", val_fraction=0.0), "empty")])
def test_digits_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_digits_dataset(**kwargs)


def test_embedded_digits_dataset_items():
    ds = EmbeddedDigitsDataset("val")
    x, y = ds[5]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and -1 <= float(x.min()) and float(x.max()) <= 1
    assert y.dtype == torch.int64 and ds.num_classes == 10 and ds.schedule == DIGITS_SCHEDULE
    images, labels = collate([ds[i] for i in range(4)])
    assert images.shape == (4, 1, 8, 8) and labels.tolist() == ds.labels[:4].tolist()


# ---------------------------------------------------------------------- grey-level tokenizer
def _nearest_level(v: torch.Tensor, levels: int) -> torch.Tensor:
    grid = torch.linspace(0, 1, levels)
    return (v.unsqueeze(-1) - grid).abs().argmin(-1)  # first index on ties, like the ops


def test_grey_tokenizer_round_trip_exact_on_digit_levels():
    tok = GreyLevelTokenizer()
    grey = torch.randint(0, 17, (5, 1, 8, 8), dtype=torch.uint8)
    codes = tok.encode(digits_to_images(grey), DIGITS_SCHEDULE)
    assert [tuple(c.shape) for c in codes] == [(5, s * s) for s in DIGITS_SCHEDULE]
    assert all(c.dtype == torch.int64 for c in codes)
    assert torch.equal(codes[-1].view(5, 8, 8), grey[:, 0].long())  # code k <=> grey level k
    out = tok.decode(codes)
    assert out.shape == (5, 3, 8, 8)
    assert torch.equal(out, (grey.float() / 16).expand(-1, 3, -1, -1))


def test_grey_tokenizer_per_scale_codes_and_continuous_input():
    tok = GreyLevelTokenizer(levels=9)
    images = torch.rand(3, 3, 8, 8) * 2 - 1  # RGB in [-1, 1]: averaged to grey
    schedule = (1, 3, 5, 8)
    codes = tok.encode(images, schedule)
    latent = (images.mean(1, keepdim=True) + 1) / 2
    for s, c in zip(schedule, codes):
        want = _nearest_level(F.adaptive_avg_pool2d(latent, s).flatten(1), 9)
        assert torch.equal(c, want), s
    expect = torch.linspace(0, 1, 9)[_nearest_level(latent, 9)]
    torch.testing.assert_close(tok.decode(codes)[:, :1], expect, rtol=0, atol=0)
    flat = torch.cat(codes, 1)
    torch.testing.assert_close(tok.decode(flat, schedule), tok.decode(codes[-1]))


def test_grey_tokenizer_interface_and_tf_inputs():
    tok = GreyLevelTokenizer()
    assert (tok.Cvae, tok.vocab_size, tok.downsample, tok.mode, tok.quant_mode) == (1, 17, 1, "flexvar", "flexvar")
    assert tok.normalize_codes is False and tok.normalize_codebook is False and tok.phi is None
    torch.testing.assert_close(tok.codebook()[:, 0], torch.linspace(0, 1, 17))
    codes = tok.encode(torch.rand(2, 1, 8, 8) * 2 - 1, DIGITS_SCHEDULE)
    x = tok.tf_inputs(codes)
    assert x.shape == (2, sum(s * s for s in DIGITS_SCHEDULE) - 1, 1)
    # scale 2's input is the 1x1 map upsampled: a constant equal to scale 1's grey value
    torch.testing.assert_close(x[:, :4, 0], tok.codebook()[codes[0][:, 0], 0].unsqueeze(1).expand(-1, 4))


def test_grey_tokenizer_errors():
    tok = GreyLevelTokenizer()
    with pytest.raises(TypeError, match="images"):
        tok.encode(torch.zeros(1, 1, 8, 8, dtype=torch.uint8), DIGITS_SCHEDULE)
    with pytest.raises(ValueError, match="images"):
        tok.encode(torch.zeros(1, 2, 8, 8), DIGITS_SCHEDULE)
    with pytest.raises(ValueError, match="schedule"):
        tok.encode(torch.zeros(1, 1, 8, 8), (1, 2, 4))
    with pytest.raises(ValueError, match="levels"):
        GreyLevelTokenizer(levels=1)
    with pytest.raises(ValueError, match="schedule"):
        tok.decode(torch.zeros(1, 5, dtype=torch.long))


# ---------------------------------------------------------------------- image folder
def _write_image(path: str, w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return arr


@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.default_rng(int(torch.randint(0, 2**31, ())))
    root = tmp_path / "imgs"
    for name in ("b_cat", "a_dog", "c_empty"):
        (root / name).mkdir(parents=True)
    arrays = {}
    arrays["a_dog/1.png"] = _write_image(str(root / "a_dog" / "1.png"), 16, 16, rng)
    arrays["a_dog/2.PNG"] = _write_image(str(root / "a_dog" / "2.PNG"), 23, 17, rng)
    (root / "a_dog" / "sub").mkdir()
    arrays["a_dog/sub/3.bmp"] = _write_image(str(root / "a_dog" / "sub" / "3.bmp"), 40, 20, rng)
    arrays["b_cat/x.png"] = _write_image(str(root / "b_cat" / "x.png"), 16, 33, rng)
    (root / "b_cat" / "notes.txt").write_text("not an image")
    (root / "b_cat" / ".hidden.png").write_bytes(b"junk")
    (root / "c_empty" / "readme.md").write_text("no images here")
    return root, arrays


def test_image_folder_labels_and_skipping(image_folder):
    root, _ = image_folder
    samples, classes = scan_image_folder(root)
    assert classes == ["a_dog", "b_cat", "c_empty"]
    rel = [(os.path.relpath(p, root), y) for p, y in samples]
    assert rel == [("a_dog/1.png", 0), ("a_dog/2.PNG", 0), (os.path.join("a_dog", "sub", "3.bmp"), 0),
                   ("b_cat/x.png", 1)]


@pytest.mark.parametrize("augment", ["flexvar", "var"])
def test_image_folder_output_shape_range_and_determinism(image_folder, augment):
    root, _ = image_folder
    ds = ImageFolderDataset(root, resolution=16, train=True, augment=augment, seed=7)
    assert len(ds) == 4 and ds.num_classes == 3
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert -1 <= float(x.min()) and float(x.max()) <= 1
    first = [ds[i][0] for i in range(len(ds))]
    assert all(torch.equal(a, ds[i][0]) for i, a in enumerate(first))  # same epoch, same crop/flip
    changed = False
    for epoch in range(1, 6):
        ds.set_epoch(epoch)
        changed |= any(not torch.equal(a, ds[i][0]) for i, a in enumerate(first))
    assert changed
    images, labels = collate([ds[i] for i in range(4)])
    assert images.shape == (4, 3, 16, 16) and labels.tolist() == [0, 0, 0, 1]


def test_image_folder_eval_centre_crop_is_exact(image_folder):
    root, arrays = image_folder
    ds = ImageFolderDataset(root, resolution=16, train=False)  # flexvar eval: short side -> 16, centre crop
    want = torch.from_numpy(arrays["a_dog/1.png"]).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(ds[0][0], want, rtol=0, atol=0)
    tall = arrays["b_cat/x.png"]  # 16 wide, 33 high: no resize, rows 8..23
    want = torch.from_numpy(tall[8:24]).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(ds[3][0], want, rtol=0, atol=0)


def test_image_folder_train_flips(tmp_path):
    root = tmp_path / "flip"
    (root / "k").mkdir(parents=True)
    arr = np.zeros((32, 32, 3), dtype=np.uint8)
    arr[:, :16] = 255  # white left half
    Image.fromarray(arr).save(root / "k" / "a.png")
    ds = ImageFolderDataset(root, resolution=28, train=True, seed=int(torch.randint(0, 1000, ())))
    left_brighter = []
    for epoch in range(40):
        ds.set_epoch(epoch)
        x = ds[0][0]
        left_brighter.append(bool(x[:, :, :14].mean() > x[:, :, 14:].mean()))
    assert any(left_brighter) and not all(left_brighter)
    ds_noflip = ImageFolderDataset(root, resolution=28, train=True, hflip=False)
    for epoch in range(10):
        ds_noflip.set_epoch(epoch)
        x = ds_noflip[0][0]
        assert x[:, :, :14].mean() > x[:, :, 14:].mean()


def test_image_folder_errors(tmp_path, image_folder):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(NotADirectoryError):
        ImageFolderDataset(tmp_path / "file.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        ImageFolderDataset(tmp_path / "empty")
    (tmp_path / "noimg" / "cls").mkdir(parents=True)
    (tmp_path / "noimg" / "cls" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="no images"):
        ImageFolderDataset(tmp_path / "noimg")
    with pytest.raises(ValueError, match="augment"):
        ImageFolderDataset(image_folder[0], augment="adm")
    with pytest.raises(ValueError, match="resolution"):
        ImageFolderDataset(image_folder[0], resolution=0)
    (tmp_path / "bad" / "cls").mkdir(parents=True)
    (tmp_path / "bad" / "cls" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="1 of 1 images are unusable: no readable images left: .*broken.png"):
        ImageFolderDataset(tmp_path / "bad")


# ---------------------------------------------------------------------- sampler
@pytest.mark.parametrize("drop_last", [True, False])
def test_sampler_rank_sharding_covers_each_index_once(drop_last):
    length, world = 23, 3
    shards = [list(ResumableDistributedSampler(length, r, world, seed=5, drop_last=drop_last)) for r in range(world)]
    sizes = {len(s) for s in shards}
    merged = [i for s in shards for i in s]
    if drop_last:
        assert sizes == {7} and len(set(merged)) == 21  # 2 dropped, none repeated
    else:
        assert sizes == {8} and set(merged) == set(range(length)) and len(merged) == 24  # 1 padded
    assert all(0 <= i < length for i in merged)


def test_sampler_permutation_deterministic_per_epoch():
    seed = int(torch.randint(0, 10_000, ()))
    a, b = ResumableDistributedSampler(50, seed=seed), ResumableDistributedSampler(50, seed=seed)
    assert list(a) == list(b) and sorted(a) == list(range(50))
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    assert list(ResumableDistributedSampler(50, shuffle=False)) == list(range(50))


def _consume(sampler, loader_len_steps, batch):
    """Run `loader_len_steps` steps over epochs like a trainer; returns the batches seen."""
    ds = torch.arange(sampler.length)
    seen, steps = [], 0
    epoch = sampler.epoch
    while steps < loader_len_steps:
        sampler.set_epoch(epoch)
        loader = DataLoader(ds, batch_size=batch, sampler=sampler, drop_last=True)
        for x in loader:
            seen.append(x.tolist())
            sampler.advance(len(x))
            steps += 1
            if steps == loader_len_steps:
                return seen
        epoch += 1
    return seen


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("batch, stop", [(2, 6), (3, 6), (3, 5)])
def test_sampler_resume_equality(rank, batch, stop):
    """N steps == stop steps, state_dict, fresh sampler, load_state_dict, N - stop steps."""
    seed, n = int(torch.randint(0, 10_000, ())), 11  # 17 samples over 2 ranks: 8 per rank and epoch
    full = _consume(ResumableDistributedSampler(17, rank, 2, seed=seed), n, batch)
    first = ResumableDistributedSampler(17, rank, 2, seed=seed)
    head = _consume(first, stop, batch)
    resumed = ResumableDistributedSampler(17, rank, 2, seed=seed)
    resumed.load_state_dict(first.state_dict())
    tail = _consume(resumed, n - stop, batch)
    assert head + tail == full
    assert len(set(map(tuple, full[:8 // batch]))) == 8 // batch  # sanity: batches of an epoch differ


def test_sampler_state_and_errors():
    s = ResumableDistributedSampler(10, 1, 2, seed=3)
    s.advance(2)
    s.set_epoch(0)  # same epoch: keeps the position (a resumed loop calls this)
    assert s.position == 2 and len(s) == 3 and list(s) == s.epoch_indices()[2:]
    s.set_epoch(1)
    assert s.position == 0 and len(s) == 5
    with pytest.raises(ValueError, match="advance"):
        s.advance(6)
    with pytest.raises(ValueError, match="world_size"):
        ResumableDistributedSampler(10, 2, 2)
    with pytest.raises(ValueError, match="length"):
        ResumableDistributedSampler(0)
    with pytest.raises(ValueError, match="world_size"):
        state = dict(ResumableDistributedSampler(10, 0, 4, seed=3).state_dict())
        ResumableDistributedSampler(10, 0, 2, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        ResumableDistributedSampler(10, seed=4).load_state_dict(ResumableDistributedSampler(10, seed=3).state_dict())


def test_collate_codes_and_errors():
    batch = [(torch.randint(0, 9, (30,)), torch.tensor(i)) for i in range(3)]
    codes, labels = collate(batch)
    assert codes.shape == (3, 30) and codes.dtype == torch.int64 and labels.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="empty"):
        collate([])


def test_schedule_token_index():
    cache = (1, 2, 3, 4)
    idx = schedule_token_index(cache, (1, 3, 4))
    off = scale_offsets(cache)
    assert idx.tolist() == [0] + list(range(off[2], off[3])) + list(range(off[3], off[4]))
    with pytest.raises(ValueError, match="does not hold"):
        schedule_token_index(cache, (1, 5))
    assert math.isclose(len(schedule_token_index(cache, cache)), off[-1])
