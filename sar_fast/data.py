"""Training data: an ImageNet-style image folder, a code cache, the embedded digits, a
resumable distributed sampler, and the trainer's DataSource that turns them into batches
of (labels, codes, schedule). No torchvision: images go through PIL and numpy.

Augmentation is reproducible: the random crop/flip of sample i in epoch e is drawn from a
generator seeded by (seed, e, i), so it does not depend on worker count or on where a run
was resumed. Call `set_epoch` on the dataset (before the DataLoader's iterator is made) and
on the sampler at the start of every epoch.
"""
from __future__ import annotations

import json
import math
import os
import random
import warnings
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .embedded import DIGITS_NUM_CLASSES, DIGITS_SCHEDULE, EMBEDDED, digits_to_images, load_digits_dataset
from .parallel import DistInfo
from .schedules import random_flexvar_schedule, scale_offsets, validate_schedule

# the file types torchvision's ImageFolder accepts
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
AUGMENTATIONS = ("flexvar", "var")
VAR_MID_RESO = 1.125          # VAR: resize the short side to 1.125 x resolution, then crop
ADM_MIN_CROP_FRAC = 0.88      # FlexVAR/SAR (ADM's random_crop_arr): crop covers 88..100% of the short side
CACHE_FORMAT = "sar_fast.code_cache.v1"
BAD_IMAGE_POLICIES = ("skip", "error")
# skipping bad images is for a handful in a large folder; beyond this many, and this share,
# the folder itself is wrong and the run stops
MAX_SKIPPED_IMAGES, MAX_SKIPPED_FRACTION = 10, 0.01


class DataError(ValueError):
    """A data folder or code cache that cannot be trained on; the message names the path and
    what was expected."""


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def _sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index])


# ---------------------------------------------------------------------- image folder
def scan_image_folder(root: str | os.PathLike) -> tuple[list[tuple[str, int]], list[str]]:
    """(samples [(path, label)], class names) of an ImageNet-style folder: one sub-folder
    per class (sorted names -> labels 0..K-1), images found recursively in each, sorted;
    files without an image extension and hidden entries are skipped. Classes without
    images keep their label, so ids stay those of the full class list."""
    root = os.fspath(root)
    if not os.path.exists(root):
        raise FileNotFoundError(f"image folder {root!r} does not exist")
    if not os.path.isdir(root):
        raise NotADirectoryError(f"image folder {root!r} is not a directory")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"image folder {root!r} has no class sub-folders (expected root/<class>/<image>)")
    samples = []
    for label, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, name), followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for f in sorted(filenames):
                if not f.startswith(".") and f.lower().endswith(IMG_EXTENSIONS):
                    samples.append((os.path.join(dirpath, f), label))
    if not samples:
        raise ValueError(f"image folder {root!r} has {len(classes)} class sub-folders but no images "
                         f"(extensions {', '.join(IMG_EXTENSIONS)})")
    return samples, classes


def _resize(img, size: tuple[int, int], resample):
    return img if img.size == size else img.resize(size, resample=resample)


def _halve_while_large(img, target_short: int):
    """ADM's pre-shrink: BOX-halve while the short side is >= 2x the target (less aliasing)."""
    from PIL import Image
    while min(img.size) >= 2 * target_short:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    return img


def _resize_short_side_adm(img, short: int):
    """FlexVAR/ADM: BOX halving, then bicubic so the short side is `short` (sides rounded)."""
    from PIL import Image
    img = _halve_while_large(img, short)
    scale = short / min(img.size)
    return _resize(img, tuple(round(x * scale) for x in img.size), Image.BICUBIC)


def _resize_short_side_var(img, short: int):
    """VAR (torchvision Resize(int), Lanczos): short side `short`, long side truncated."""
    from PIL import Image
    w, h = img.size
    size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    return _resize(img, size, Image.LANCZOS)


def transform_image(img, resolution: int, train: bool, augment: str = "flexvar", hflip: bool = True,
                    rng: np.random.Generator | None = None) -> torch.Tensor:
    """PIL image -> float32 [3, resolution, resolution] in [-1, 1].

    augment='flexvar' (FlexVAR and SAR training): train: flip with p=0.5, short side
    resized to a random size in [resolution, ceil(resolution / 0.88)], random crop;
    eval: short side resized to `resolution`, centre crop.
    augment='var' (VAR): short side resized to round(1.125 * resolution) (Lanczos), random
    crop (train) / centre crop (eval); flip with p=0.5 in train when `hflip`.
    """
    from PIL import Image
    if train and rng is None:
        raise ValueError("a training transform needs rng (a numpy Generator)")
    img = img.convert("RGB")
    if train and hflip and rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    if augment == "flexvar":
        short = int(rng.integers(resolution, math.ceil(resolution / ADM_MIN_CROP_FRAC) + 1)) if train else resolution
        img = _resize_short_side_adm(img, short)
    elif augment == "var":
        img = _resize_short_side_var(img, round(VAR_MID_RESO * resolution))
    else:
        raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {augment!r}")
    arr = np.asarray(img)
    h, w = arr.shape[:2]
    if train:
        top, left = int(rng.integers(0, h - resolution + 1)), int(rng.integers(0, w - resolution + 1))
    elif augment == "flexvar":  # ADM floors the offsets, torchvision's CenterCrop rounds them
        top, left = (h - resolution) // 2, (w - resolution) // 2
    else:
        top, left = int(round((h - resolution) / 2)), int(round((w - resolution) / 2))
    crop = np.array(arr[top:top + resolution, left:left + resolution])  # a writable copy
    return torch.from_numpy(crop).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def find_bad_images(samples: Sequence[tuple[str, int]], threads: int = 8) -> list[tuple[str, str]]:
    """(path, reason) of every image that is empty, unreadable, or whose header PIL cannot
    parse. Headers only (cheap on a large folder); a body that fails to decode later is
    handled where it is loaded."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    def problem(path: str) -> str | None:
        try:
            if os.path.getsize(path) == 0:
                return "empty file (0 bytes)"
            with Image.open(path) as img:
                if min(img.size) < 1:
                    return f"image of size {img.size}"
        except PermissionError:
            return "unreadable (permission denied)"
        except Image.UnidentifiedImageError:
            return "not an image PIL can read (corrupt or wrong extension)"
        except Exception as e:  # OSError, decompression bombs, parser errors of damaged headers
            return f"{type(e).__name__}: {e}"
        return None

    paths = [p for p, _ in samples]
    with ThreadPoolExecutor(max(1, min(threads, len(paths)))) as pool:
        reasons = list(pool.map(problem, paths, chunksize=256))
    return [(p, r) for p, r in zip(paths, reasons) if r is not None]


def _describe(bad: Sequence[tuple[str, str]], n: int = 5) -> str:
    return "; ".join(f"{p}: {r}" for p, r in bad[:n]) + (f"; ... (+{len(bad) - n} more)" if len(bad) > n else "")


class ImageFolderDataset(Dataset):
    """ImageNet-style folder -> (image float32 [3, R, R] in [-1, 1], label int64).

    train=True: random crop + horizontal flip (see `transform_image`; `hflip` defaults to
    True, as FlexVAR/SAR always flip; VAR's default is no flip). train=False: centre crop.
    """

    def __init__(self, root: str | os.PathLike, resolution: int = 256, train: bool = True,
                 augment: str = "flexvar", hflip: bool = True, seed: int = 0, bad_images: str = "skip"):
        if augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {augment!r}")
        if bad_images not in BAD_IMAGE_POLICIES:
            raise ValueError(f"bad_images must be one of {BAD_IMAGE_POLICIES}, got {bad_images!r}")
        self.resolution = _check_int("resolution", resolution, 1)
        self.seed = _check_int("seed", seed, 0)
        self.root, self.train, self.augment, self.hflip = os.fspath(root), bool(train), augment, bool(hflip)
        self.bad_images = bad_images
        samples, self.classes = scan_image_folder(root)
        self.num_classes = len(self.classes)
        self.epoch = 0
        # empty, unreadable or unidentifiable files: found before training, skipped or fatal
        self.skipped = find_bad_images(samples)
        if self.skipped:
            where = f"image folder {self.root!r}: {len(self.skipped)} of {len(samples)} images are unusable"
            if bad_images == "error":
                raise DataError(f"{where} (bad_images='error', --bad-images error): {_describe(self.skipped)}")
            if len(self.skipped) == len(samples):
                raise DataError(f"{where}: no readable images left: {_describe(self.skipped)}")
            if len(self.skipped) > max(MAX_SKIPPED_IMAGES, MAX_SKIPPED_FRACTION * len(samples)):
                raise DataError(f"{where}, more than {MAX_SKIPPED_IMAGES} and {MAX_SKIPPED_FRACTION:.0%}: is this "
                                f"the right folder? {_describe(self.skipped)}")
            warnings.warn(f"{where}; skipping them: {_describe(self.skipped)}", RuntimeWarning, stacklevel=2)
            bad = {p for p, _ in self.skipped}
            samples = [(p, y) for p, y in samples if p not in bad]
        self.samples = samples
        # bodies that failed to decode at load time; in shared memory, so DataLoader workers'
        # counts reach the trainer's metrics
        self._load_failures = torch.zeros(1, dtype=torch.int64).share_memory_()

    @property
    def load_failures(self) -> int:
        return int(self._load_failures)

    @property
    def num_skipped(self) -> int:
        """Images left out: found bad before training, plus decode failures since (all workers)."""
        return len(self.skipped) + self.load_failures

    def set_epoch(self, epoch: int) -> None:
        self.epoch = _check_int("epoch", epoch, 0)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int, train: bool | None = None) -> torch.Tensor:
        """The image of sample `index`, transformed (train=None: the dataset's mode)."""
        from PIL import Image
        path = self.samples[index][0]
        train = self.train if train is None else train
        rng = _sample_rng(self.seed, self.epoch, index) if train else None
        try:
            with Image.open(path) as img:
                return transform_image(img, self.resolution, train, self.augment, self.hflip, rng)
        except (OSError, ValueError) as e:
            raise type(e)(f"cannot read image {path!r}: {e}") from e

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        # a body that fails to decode (a truncated JPEG passes the header check): in skip
        # mode the next readable sample takes its place, so batches keep their size
        for attempt in range(min(len(self.samples), MAX_SKIPPED_IMAGES + 1)):
            i = (index + attempt) % len(self.samples)
            try:
                return self.load(i), torch.tensor(self.samples[i][1], dtype=torch.int64)
            except (OSError, ValueError) as e:
                if self.bad_images == "error":
                    raise
                self._load_failures += 1
                warnings.warn(f"skipping an image that fails to decode: {e}", RuntimeWarning, stacklevel=2)
        raise DataError(f"image folder {self.root!r}: {MAX_SKIPPED_IMAGES + 1} images in a row from index {index} "
                        f"fail to decode")


# ---------------------------------------------------------------------- embedded digits
class EmbeddedDigitsDataset(Dataset):
    """scikit-learn's digits: (image float32 [1, 8, 8] in [-1, 1], label int64), no
    augmentation. Tokenise with sar_fast.embedded.GreyLevelTokenizer."""

    schedule = DIGITS_SCHEDULE
    num_classes = DIGITS_NUM_CLASSES

    def __init__(self, split: str = "train", val_fraction: float = 0.1, seed: int = 0):
        grey, self.labels = load_digits_dataset(split, val_fraction, seed)
        self.images = digits_to_images(grey)
        self.classes = [str(c) for c in range(DIGITS_NUM_CLASSES)]

    def set_epoch(self, epoch: int) -> None:
        """Nothing is random per epoch; present so every dataset here takes the same calls."""

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]


# ---------------------------------------------------------------------- code cache
def file_sha256(path: str, block: int = 1 << 20) -> str:
    from .models.checkpoint import files_sha256
    return files_sha256([path], block)


def read_cache_manifest(cache_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest.json of a code cache written by `python -m sar_fast.cache`."""
    path = os.path.join(os.fspath(cache_dir), "manifest.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{os.fspath(cache_dir)!r} is not a code cache (no manifest.json); "
                                "build one with python -m sar_fast.cache")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a valid JSON manifest ({e})") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    return manifest


_MANIFEST_KEYS = {"format": str, "schedule": list, "seq_len": int, "num_samples": int, "done": int, "views": int,
                  "dtype": str, "classes": list, "vocab_size": int, "quant_mode": str}


def _npy_header(path: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of a .npy file, read without loading or mapping it."""
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                     else np.lib.format.read_array_header_2_0(f))
        except ValueError as e:
            raise DataError(f"{path}: not a .npy array file ({e})") from None
        if fortran or dtype.hasobject:
            raise DataError(f"{path}: expected a C-ordered numeric array, got "
                            f"{'Fortran order' if fortran else 'an object array'}")
        return tuple(shape), dtype, f.tell()


def check_code_cache(cache_dir: str | os.PathLike, tokenizer_sha256: str | None = None) -> dict[str, Any]:
    """The manifest of a complete cache whose arrays agree with it: keys and types, the
    schedule's length, codes.npy [N, views, L] of the manifest's dtype and labels.npy [N]
    integer, both complete on disk (a truncated copy is caught here, not mid-run), labels
    within the class list; with `tokenizer_sha256`, the tokenizer it was built with.
    Raises DataError naming the file and what was expected."""
    from .schedules import total_length
    root = os.fspath(cache_dir)
    m = read_cache_manifest(root)
    where = os.path.join(root, "manifest.json")
    wrong = [f"{k} ({t.__name__})" for k, t in _MANIFEST_KEYS.items() if not isinstance(m.get(k), t)]
    if wrong:
        raise DataError(f"{where}: missing or mistyped entries: {', '.join(wrong)}")
    if m["format"] != CACHE_FORMAT:
        raise DataError(f"{where}: unknown cache format {m['format']!r} (expected {CACHE_FORMAT!r})")
    if m["done"] < m["num_samples"]:
        raise DataError(f"code cache {root!r} is incomplete ({m['done']}/{m['num_samples']} images); re-run "
                        "python -m sar_fast.cache with the same arguments to finish it")
    try:
        schedule = validate_schedule(m["schedule"])
    except (TypeError, ValueError) as e:
        raise DataError(f"{where}: bad schedule: {e}") from None
    if total_length(schedule) != m["seq_len"]:
        raise DataError(f"{where}: schedule {schedule} has {total_length(schedule)} tokens but seq_len is "
                        f"{m['seq_len']}")
    if tokenizer_sha256 is not None and m.get("tokenizer_sha256") != tokenizer_sha256:
        raise DataError(f"code cache {root!r} was built with another tokenizer ({m.get('tokenizer_path', '?')}, "
                        f"sha256 {str(m.get('tokenizer_sha256'))[:12]}...) than --vae (sha256 "
                        f"{tokenizer_sha256[:12]}...): its codes mean nothing to this tokenizer")
    expected = {"codes.npy": ((m["num_samples"], m["views"], m["seq_len"]), np.dtype(m["dtype"])),
                "labels.npy": ((m["num_samples"],), None)}
    for name, (shape, dtype) in expected.items():
        path = os.path.join(root, name)
        if not os.path.isfile(path):
            raise DataError(f"code cache {root!r} has no {name}")
        got_shape, got_dtype, offset = _npy_header(path)
        if got_shape != shape or (dtype is not None and got_dtype != dtype) or got_dtype.kind not in "iu":
            raise DataError(f"{path} is {got_shape} {got_dtype}, but the manifest says {shape} "
                            f"{dtype or 'integer'}")
        need, size = offset + int(np.prod(shape)) * got_dtype.itemsize, os.path.getsize(path)
        if size != need:
            raise DataError(f"{path} is {'truncated' if size < need else 'longer than its header says'}: "
                            f"{size} bytes on disk, {need} expected for {shape} {got_dtype}")
    labels = np.load(os.path.join(root, "labels.npy"), mmap_mode="r")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(m["classes"])):
        raise DataError(f"{os.path.join(root, 'labels.npy')}: labels span [{int(labels.min())}, {int(labels.max())}] "
                        f"but the manifest lists {len(m['classes'])} classes")
    return m


def schedule_token_index(cache_schedule: Sequence[int], schedule: Sequence[int]) -> torch.Tensor:
    """Positions [L] in a cached code row (of `cache_schedule`) of the tokens of `schedule`.

    Only valid for FlexVAR-style codes, whose scales are quantised independently: a scale's
    codes do not depend on which other scales are in the schedule (VAR's residual codes do).
    """
    cache_schedule, schedule = validate_schedule(cache_schedule), validate_schedule(schedule)
    missing = sorted(set(schedule) - set(cache_schedule))
    if missing:
        raise ValueError(f"schedule {schedule} has sides {missing} that the cache "
                         f"(schedule {cache_schedule}) does not hold")
    off = scale_offsets(cache_schedule)
    where = {s: i for i, s in enumerate(cache_schedule)}
    return torch.cat([torch.arange(off[where[s]], off[where[s] + 1]) for s in schedule])


class CodeDataset(Dataset):
    """A code cache -> (codes int64 [L], label int64).

    `schedule` (default: the cache's) may be any subset of the cached sides when the cache
    holds FlexVAR-style codes (quant_mode 'flexvar'): cache all sides 1..16 once and train
    on any schedule. Caches built with --flip hold two views (centre crop, its mirror);
    `random_flip` then picks one per sample and epoch (p=0.5, seeded), else view 0.
    """

    def __init__(self, cache_dir: str | os.PathLike, schedule: Sequence[int] | None = None,
                 random_flip: bool = True, seed: int = 0):
        self.cache_dir = os.fspath(cache_dir)
        self.manifest = m = check_code_cache(cache_dir)
        self.cache_schedule = tuple(m["schedule"])
        self.schedule = self.cache_schedule if schedule is None else validate_schedule(schedule)
        if self.schedule != self.cache_schedule and m["quant_mode"] != "flexvar":
            raise ValueError(f"schedule {self.schedule} differs from the cache's {self.cache_schedule}, and "
                             f"{m['quant_mode']!r} codes are residual: they are only valid for the cached schedule")
        self.token_index = (None if self.schedule == self.cache_schedule
                            else schedule_token_index(self.cache_schedule, self.schedule).numpy())
        self.classes: list[str] = list(m["classes"])
        self.num_classes = len(self.classes)
        self.num_views = int(m["views"])
        self.random_flip, self.seed, self.epoch = bool(random_flip), _check_int("seed", seed, 0), 0
        self._codes: np.ndarray | None = None
        self._labels = np.load(os.path.join(self.cache_dir, "labels.npy"))

    @property
    def codes(self) -> np.ndarray:
        """The memory-mapped codes [N, views, L_cache], opened lazily in each worker."""
        if self._codes is None:
            self._codes = np.load(os.path.join(self.cache_dir, "codes.npy"), mmap_mode="r")
        return self._codes

    def __getstate__(self) -> dict[str, Any]:  # workers re-open the memmap instead of pickling it
        state = dict(self.__dict__)
        state["_codes"] = None
        return state

    def set_epoch(self, epoch: int) -> None:
        self.epoch = _check_int("epoch", epoch, 0)

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        view = 0
        if self.random_flip and self.num_views > 1:
            view = int(_sample_rng(self.seed, self.epoch, index).random() < 0.5)
        row = self.codes[index, view]
        if self.token_index is not None:
            row = row[self.token_index]
        return torch.from_numpy(row.astype(np.int64)), torch.tensor(int(self._labels[index]), dtype=torch.int64)



# ---------------------------------------------------------------------- sampler
class ResumableDistributedSampler(Sampler[int]):
    """Per-epoch permutation (torch.Generator seeded with seed + epoch) split over ranks
    as rank::world_size, resumable mid-epoch.

    The position is what the trainer has consumed, not what was iterated (a DataLoader
    prefetches ahead): call `advance(n)` after each batch of n samples; `state_dict()`
    then holds (epoch, position), and after `load_state_dict` the next `__iter__` yields
    exactly the rest of that epoch. `set_epoch(e)` with a new epoch restarts at position
    0; with the current epoch (as a resumed loop does) it keeps the position.
    drop_last=True drops the permutation's tail so every rank gets length // world_size;
    False pads by repeating its head (as torch's DistributedSampler).
    """

    def __init__(self, length: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True):
        self.length = _check_int("length", length, 1)
        self.world_size = _check_int("world_size", world_size, 1)
        self.rank = _check_int("rank", rank, 0)
        if self.rank >= self.world_size:
            raise ValueError(f"rank must be < world_size ({self.world_size}), got {rank}")
        self.seed = _check_int("seed", seed, 0)
        self.shuffle, self.drop_last = bool(shuffle), bool(drop_last)
        if self.drop_last and self.length < self.world_size:
            raise ValueError(f"length {self.length} < world_size {self.world_size}: with drop_last "
                             "some ranks would get no samples")
        self.num_samples = (self.length // self.world_size if self.drop_last
                            else math.ceil(self.length / self.world_size))
        self.epoch, self.position = 0, 0

    def epoch_indices(self, epoch: int | None = None) -> list[int]:
        """This rank's whole index list for `epoch` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        if self.shuffle:
            order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        else:
            order = list(range(self.length))
        total = self.num_samples * self.world_size
        if total > len(order):
            order += (order * math.ceil(total / len(order)))[:total - len(order)]
        return order[:total][self.rank::self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices()[self.position:])

    def global_positions(self, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """int64 [count] on `device`: where this rank's positions start..start+count-1 of the
        epoch sit in the epoch's global order (rank r holds global positions r, r + W, ...).
        The same sample has the same global position on any number of ranks. Built on the
        device (an arange): no host-to-device copy per batch."""
        return torch.arange(start, start + count, dtype=torch.int64, device=device) * self.world_size + self.rank

    def __len__(self) -> int:
        """What the next `__iter__` yields: the rest of the current epoch."""
        return self.num_samples - self.position

    def set_epoch(self, epoch: int) -> None:
        epoch = _check_int("epoch", epoch, 0)
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def advance(self, num_samples: int) -> None:
        """Record that `num_samples` more samples of this epoch were consumed."""
        num_samples = _check_int("num_samples", num_samples, 0)
        if self.position + num_samples > self.num_samples:
            raise ValueError(f"advance({num_samples}) would pass the end of the epoch "
                             f"(position {self.position} of {self.num_samples})")
        self.position += num_samples

    def state_dict(self) -> dict[str, int | bool]:
        return dict(epoch=self.epoch, position=self.position, seed=self.seed, length=self.length,
                    world_size=self.world_size, shuffle=self.shuffle, drop_last=self.drop_last)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "length", "world_size", "shuffle", "drop_last"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]!r} but this sampler has "
                                 f"{key}={getattr(self, key)!r}; the data order would not continue")
        epoch, position = _check_int("epoch", state["epoch"], 0), _check_int("position", state["position"], 0)
        if position > self.num_samples:
            raise ValueError(f"sampler state position {position} > samples per epoch {self.num_samples}")
        self.epoch, self.position = epoch, position


def collate(batch: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """[(images [C, H, W] or codes [L], label)] -> (stacked [B, ...], labels int64 [B])."""
    if not batch:
        raise ValueError("collate got an empty batch")
    items, labels = zip(*batch)
    # numpy reads the 0-d labels without a dispatched .item() per sample
    return torch.stack(items), torch.from_numpy(np.array([np.asarray(y) for y in labels], dtype=np.int64))


# ---------------------------------------------------------------------- the trainer's batches
class DataSource:
    """Batches of (labels, codes [B, L], schedule) for the local rank, resumable."""

    # cfg: the run's config.DataConfig (not imported: config validates through this module)
    def __init__(self, cfg, seed: int, info: DistInfo, tokenizer, local_batch: int, num_classes: int):
        self.cfg, self.seed, self.info, self.tok, self.local_batch = cfg, seed, info, tokenizer, local_batch
        self.num_classes = num_classes
        if cfg.cache:
            self.dataset = CodeDataset(cfg.cache, seed=seed)
            self.cache_schedule = tuple(self.dataset.cache_schedule)
            check_cache_matches(self.dataset.manifest, cfg, tokenizer)
        elif cfg.folder:
            self.dataset = ImageFolderDataset(cfg.folder, resolution=cfg.resolution, train=True, seed=seed,
                                              bad_images=cfg.bad_images)
            self.cache_schedule = None
        else:
            self.dataset = EmbeddedDigitsDataset("train", seed=0)
            self.cache_schedule = None
        self.sampler = ResumableDistributedSampler(len(self.dataset), info.rank, info.world_size, seed=seed)
        if self.sampler.num_samples < local_batch:
            raise SystemExit(f"error: {len(self.dataset)} samples cannot fill a per-rank batch of {local_batch}")
        self._iter = None
        self.rows: torch.Tensor | None = None  # global rows of the batch `next` returned last

    @property
    def skipped_images(self) -> int:
        """Unusable images of --data skipped so far (0 for caches and the embedded digits)."""
        return getattr(self.dataset, "num_skipped", 0)

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.num_samples // self.local_batch

    def _loader(self):
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.sampler.epoch)
        return iter(DataLoader(self.dataset, batch_size=self.local_batch, sampler=self.sampler, drop_last=True,
                               num_workers=self.cfg.workers, collate_fn=collate,
                               pin_memory=self.info.device.type == "cuda", persistent_workers=False,
                               # its own generator: the loader must not draw from the global RNG
                               # (label dropout's), or a resumed run would drift from a straight one
                               generator=torch.Generator().manual_seed(self.seed + self.sampler.epoch)))

    def next(self, step: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
        if self._iter is None:
            self._iter = self._loader()
        if self.sampler.num_samples - self.sampler.position < self.local_batch:  # epoch done
            self.sampler.set_epoch(self.sampler.epoch + 1)
            self._iter = self._loader()
        x, labels = next(self._iter)
        # each row's position in the epoch's global order: the key of its randomness
        # (SSR draws), so it does not depend on the number of ranks or micro-batches
        self.rows = self.sampler.global_positions(self.sampler.position, self.local_batch, self.info.device)
        self.sampler.advance(self.local_batch)
        check_batch_ranges(labels, x if self.cache_schedule is not None else None, self.num_classes,
                           self.tok.vocab_size)
        schedule = self.schedule_for(step)
        x, labels = x.to(self.info.device, non_blocking=True), labels.to(self.info.device, non_blocking=True)
        if self.cache_schedule is not None:
            codes = select_scales(x.long(), self.cache_schedule, schedule, self.dataset.manifest["quant_mode"])
        else:
            with torch.no_grad():
                codes = torch.cat(self.tok.encode(x.float(), schedule), dim=1)
        return labels, codes, schedule

    def schedule_for(self, step: int) -> tuple[int, ...]:
        """The same on every rank: derived from (seed, step) only."""
        if not self.cfg.random_schedules:
            return self.cfg.schedule
        return random_flexvar_schedule(random.Random(self.seed * 1_000_003 + step), last=self.cfg.schedule[-1])

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict, saved_world_size: int | None) -> None:
        """Continue where `state` stopped. Saved by another number of ranks, the shards
        differ and cannot be continued: the next epoch's order starts instead."""
        if saved_world_size != self.info.world_size:
            self.sampler.set_epoch(state["epoch"] + 1)
        else:
            self.sampler.load_state_dict(state)
        self._iter = None


def check_batch_ranges(labels: torch.Tensor, codes: torch.Tensor | None, num_classes: int, vocab: int) -> None:
    """On the host, before the batch moves to the device: labels in [0, num_classes) and
    cached codes in [0, vocab) (codes the tokenizer makes on the fly are valid by construction)."""
    labels = labels.numpy()  # host tensors: numpy reads them without dispatching .item()
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"a batch holds labels in [{labels.min()}, {labels.max()}] but the model "
                         f"has {num_classes} classes")
    codes = None if codes is None else codes.numpy()
    if codes is not None and codes.size and (codes.min() < 0 or codes.max() >= vocab):
        raise ValueError(f"a batch holds codes in [{codes.min()}, {codes.max()}] but the tokenizer "
                         f"has {vocab} codes (a cache from another tokenizer?)")


def select_scales(codes: torch.Tensor, cache_schedule: tuple[int, ...], schedule: tuple[int, ...],
                  quant_mode: str) -> torch.Tensor:
    """Pick the scales of `schedule` out of codes cached for `cache_schedule`. Only FlexVAR's
    scales are independent (a cache holding every side serves any schedule); VAR's residual
    codes are valid for the cached schedule alone."""
    if schedule == cache_schedule:
        return codes
    if quant_mode != "flexvar":
        raise ValueError(f"this cache holds VAR residual codes for {cache_schedule}; they cannot serve schedule "
                         f"{schedule} (train with --schedule matching the cache, without --random-schedules)")
    return codes.index_select(1, _device_token_index(tuple(cache_schedule), tuple(schedule), codes.device))


_TOKEN_INDEX: dict = {}


def _device_token_index(cache_schedule: tuple[int, ...], schedule: tuple[int, ...],
                        device: torch.device) -> torch.Tensor:
    """schedule_token_index on `device`, kept per schedule (random schedules number a few
    thousand, each a few KB) and copied once, pinned and non-blocking."""
    key = (cache_schedule, schedule, device)
    if key not in _TOKEN_INDEX:
        index = schedule_token_index(cache_schedule, schedule)
        _TOKEN_INDEX[key] = index.pin_memory().to(device, non_blocking=True) if device.type == "cuda" \
            else index.to(device)
    return _TOKEN_INDEX[key]


def check_cache_matches(manifest: dict, cfg, tokenizer) -> None:  # cfg: config.DataConfig
    """Refuse codes made by another tokenizer than --vae (they would train silently wrong)."""
    from .models.checkpoint import weights_sha256
    if cfg.vae != EMBEDDED and manifest.get("tokenizer_sha256") != weights_sha256(cfg.vae):
        raise SystemExit(f"error: --cache {cfg.cache} was built with tokenizer {manifest.get('tokenizer_path')} "
                         f"but --vae {cfg.vae} is a different file (sha256 differs)")
    if int(manifest.get("vocab_size", -1)) != tokenizer.vocab_size or manifest.get("quant_mode") != tokenizer.mode:
        raise SystemExit(f"error: --cache {cfg.cache} holds {manifest.get('quant_mode')} codes of vocabulary "
                         f"{manifest.get('vocab_size')}, the tokenizer is {tokenizer.mode} with {tokenizer.vocab_size}")
