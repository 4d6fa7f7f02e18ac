"""ImageNet-style image folders: scanning, bad-image detection, and the resize / crop /
flip of VAR and FlexVAR. No torchvision: images go through PIL and numpy.

Augmentation is reproducible: the random crop/flip of sample i in epoch e is drawn from a
generator seeded by (seed, e, i), so it does not depend on worker count or on where a run
was resumed. Call `set_epoch` on the dataset (before the DataLoader's iterator is made) and
on the sampler at the start of every epoch.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .common import check_int, _sample_rng

# the file types torchvision's ImageFolder accepts
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
AUGMENTATIONS = ("flexvar", "var")
VAR_MID_RESO = 1.125          # VAR: resize the short side to 1.125 x resolution, then crop
ADM_MIN_CROP_FRAC = 0.88      # FlexVAR/SAR (ADM's random_crop_arr): crop covers 88..100% of the short side
BAD_IMAGE_POLICIES = ("skip", "error")
# skipping bad images is for a handful in a large folder; beyond this many, and this share,
# the folder itself is wrong and the run stops
MAX_SKIPPED_IMAGES, MAX_SKIPPED_FRACTION = 10, 0.01


class DataError(ValueError):
    """A data folder or code cache that cannot be trained on; the message names the path and
    what was expected."""


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
        self.resolution = check_int("resolution", resolution, 1)
        self.seed = check_int("seed", seed, 0)
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
        self.epoch = check_int("epoch", epoch, 0)

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


