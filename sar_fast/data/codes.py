"""The code cache: the token codes of a dataset precomputed by a tokenizer, so that training
skips the tokenizer. One module for both sides: the writer (`build_cache`, run by
`python -m sar_fast.cache`), the manifest and its keys, the reader (`CodeDataset`) and the
checks that a run matches the cache it reads."""
from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ..cli import InputError, Progress, require_weights_file, resolve_device
from ..files import write_json_atomic
from ..hub import is_hub_id
from ..models.checkpoint import weights_sha256
from ..models.tokenizers import build_tokenizer
from ..models.tokenizers.grey import EMBEDDED
from ..schedules import STANDARD_SCHEDULE, Schedule
from .common import check_int, _sample_rng, collate
from .digits import DIGITS_SIDE, EmbeddedDigitsDataset
from .images import AUGMENTATIONS, DataError, ImageFolderDataset

CACHE_FORMAT = "sar_fast.code_cache.v1"


# ---------------------------------------------------------------------- code cache
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
        schedule = Schedule(m["schedule"])
    except (TypeError, ValueError) as e:
        raise DataError(f"{where}: bad schedule: {e}") from None
    if schedule.total != m["seq_len"]:
        raise DataError(f"{where}: schedule {schedule} has {schedule.total} tokens but seq_len is "
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
    cache_schedule, schedule = Schedule(cache_schedule, name="cache_schedule"), Schedule(schedule)
    missing = sorted(set(schedule) - set(cache_schedule))
    if missing:
        raise ValueError(f"schedule {schedule} has sides {missing} that the cache "
                         f"(schedule {cache_schedule}) does not hold")
    where = {s: i for i, s in enumerate(cache_schedule)}
    return torch.cat([torch.arange(cache_schedule.offsets[where[s]], cache_schedule.offsets[where[s] + 1])
                      for s in schedule])


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
        self.cache_schedule = Schedule(m["schedule"])
        self.schedule = self.cache_schedule if schedule is None else Schedule(schedule)
        if self.schedule != self.cache_schedule and m["quant_mode"] != "flexvar":
            raise ValueError(f"schedule {self.schedule} differs from the cache's {self.cache_schedule}, and "
                             f"{m['quant_mode']!r} codes are residual: they are only valid for the cached schedule")
        self.token_index = (None if self.schedule == self.cache_schedule
                            else schedule_token_index(self.cache_schedule, self.schedule).numpy())
        self.classes: list[str] = list(m["classes"])
        self.num_classes = len(self.classes)
        self.num_views = int(m["views"])
        self.random_flip, self.seed, self.epoch = bool(random_flip), check_int("seed", seed, 0), 0
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
        self.epoch = check_int("epoch", epoch, 0)

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


def check_cache_matches(manifest: dict, cfg, tokenizer) -> None:  # cfg: config.DataConfig
    """Refuse codes made by another tokenizer than --vae (they would train silently wrong)."""
    from ..models.checkpoint import weights_sha256
    if cfg.vae != EMBEDDED and manifest.get("tokenizer_sha256") != weights_sha256(cfg.vae):
        raise SystemExit(f"error: --cache {cfg.cache} was built with tokenizer {manifest.get('tokenizer_path')} "
                         f"but --vae {cfg.vae} is a different file (sha256 differs)")
    if int(manifest.get("vocab_size", -1)) != tokenizer.vocab_size or manifest.get("quant_mode") != tokenizer.mode:
        raise SystemExit(f"error: --cache {cfg.cache} holds {manifest.get('quant_mode')} codes of vocabulary "
                         f"{manifest.get('vocab_size')}, the tokenizer is {tokenizer.mode} with {tokenizer.vocab_size}")


# manifest entries that must agree for an existing cache to be continued
_IDENTITY_KEYS = ("format", "schedule", "quant_mode", "tokenizer_sha256", "tokenizer_class", "vocab_size",
                  "data_sha256", "split", "resolution", "augment", "views", "num_samples", "classes", "dtype")


class CacheError(ValueError):
    """A bad argument or an existing cache that does not fit them."""


def _load_tokenizer(vae: str, device: torch.device):
    """(tokenizer on `device`, its identity) for a checkpoint path or 'embedded-digits'."""
    if vae == EMBEDDED:
        tok = build_tokenizer(EMBEDDED, device)
        ident = dict(tokenizer_path=EMBEDDED, tokenizer_class=type(tok).__name__,
                     tokenizer_sha256=hashlib.sha256(f"GreyLevelTokenizer(levels={tok.levels})".encode()).hexdigest())
    else:
        path = vae if is_hub_id(vae) else os.path.abspath(vae)
        sha = weights_sha256(path)
        tok = build_tokenizer(path, device)
        ident = dict(tokenizer_path=path, tokenizer_class=type(tok).__name__, tokenizer_sha256=sha)
    ident.update(quant_mode=tok.mode, vocab_size=int(tok.vocab_size))
    return tok, ident


def _build_dataset(data: str, resolution: int | None, augment: str, split: str) -> tuple[Dataset, dict[str, Any]]:
    """(dataset yielding centre-cropped images in [-1, 1], its identity for the manifest)."""
    if data == EMBEDDED:
        if resolution not in (None, DIGITS_SIDE):
            raise CacheError(f"--resolution must be {DIGITS_SIDE} (or omitted) for --data {EMBEDDED}, got {resolution}")
        ds = EmbeddedDigitsDataset(split=split)
        digest = hashlib.sha256(ds.images.numpy().tobytes() + ds.labels.numpy().tobytes()).hexdigest()
        return ds, dict(data_path=EMBEDDED, data_sha256=digest, split=split, resolution=DIGITS_SIDE,
                        augment="none", classes=ds.classes)
    ds = ImageFolderDataset(data, resolution=256 if resolution is None else resolution, train=False, augment=augment)
    listing = hashlib.sha256()
    for path, label in ds.samples:
        listing.update(f"{os.path.relpath(path, ds.root)}\t{label}\n".encode())
    return ds, dict(data_path=os.path.abspath(data), data_sha256=listing.hexdigest(), split="folder",
                    resolution=ds.resolution, augment=augment, classes=ds.classes)


def default_schedule(latent_side: int, quant_mode: str) -> Schedule:
    """FlexVAR-style codes: every side 1..latent_side (any sub-schedule can be trained on);
    VAR: the standard 10-scale schedule (its residual codes fit one schedule only)."""
    if quant_mode == "flexvar" and latent_side <= 16:
        return Schedule(range(1, latent_side + 1))
    if quant_mode == "var" and latent_side == STANDARD_SCHEDULE[-1]:
        return STANDARD_SCHEDULE
    raise CacheError(f"no default schedule for a {latent_side}x{latent_side} latent ({quant_mode} codes); "
                     "pass --schedule")


def _open_or_create(out: str, manifest: dict[str, Any], labels: np.ndarray, overwrite: bool):
    """(codes memmap opened r+, manifest with the right `done`): a matching existing cache
    is continued; a different one is refused unless `overwrite`."""
    manifest_path, codes_path = os.path.join(out, "manifest.json"), os.path.join(out, "codes.npy")
    shape = (manifest["num_samples"], manifest["views"], manifest["seq_len"])
    if os.path.exists(manifest_path) and not overwrite:
        with open(manifest_path) as f:
            old = json.load(f)
        diff = [k for k in _IDENTITY_KEYS if old.get(k) != manifest[k]]
        if diff:
            details = "; ".join(f"{k}: cache has {_short(old.get(k))}, now {_short(manifest[k])}" for k in diff)
            raise CacheError(f"--out {out!r} holds a different cache ({details}); pass --overwrite "
                             "to replace it, or choose another --out")
        if not os.path.isfile(codes_path):
            raise CacheError(f"--out {out!r} has a manifest but no codes.npy; pass --overwrite to rebuild it")
        codes = np.lib.format.open_memmap(codes_path, mode="r+")
        if codes.shape != shape or codes.dtype != np.dtype(manifest["dtype"]):
            raise CacheError(f"{codes_path!r} is {codes.shape} {codes.dtype}, expected {shape} {manifest['dtype']}; "
                             "pass --overwrite to rebuild it")
        manifest["done"] = int(old["done"])
        return codes, manifest
    os.makedirs(out, exist_ok=True)
    if os.path.exists(manifest_path):  # overwrite: drop the manifest first so a crash cannot pair it with new arrays
        os.remove(manifest_path)
    np.save(os.path.join(out, "labels.npy"), labels)
    codes = np.lib.format.open_memmap(codes_path, mode="w+", dtype=np.dtype(manifest["dtype"]), shape=shape)
    manifest["done"] = 0
    write_json_atomic(manifest_path, manifest)
    return codes, manifest


def _short(value: Any, n: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= n else text[:n] + "..."


def build_cache(data: str, vae: str, out: str, schedule: Sequence[int] | None = None,
                resolution: int | None = None, augment: str = "flexvar", flip: bool = False,
                batch_size: int = 64, num_workers: int = 0, device: str | None = None,
                split: str = "train", overwrite: bool = False, max_batches: int | None = None,
                progress: bool = True) -> dict[str, Any]:
    """Build (or continue) the code cache `out`; returns its manifest. See the module doc
    and `python -m sar_fast.cache --help` for the arguments."""
    if data != EMBEDDED and not os.path.isdir(data):
        raise CacheError(f"--data {data!r} is not a directory (or {EMBEDDED!r})")
    if vae != EMBEDDED:
        try:
            require_weights_file("--vae", vae, repr(EMBEDDED))
        except InputError as e:
            raise CacheError(str(e.code).removeprefix("error: ")) from None
    if augment not in AUGMENTATIONS:
        raise CacheError(f"--augment must be one of {AUGMENTATIONS}, got {augment!r}")
    for name, value, low in (("--batch-size", batch_size, 1), ("--num-workers", num_workers, 0),
                             ("--max-batches", 1 if max_batches is None else max_batches, 1),
                             ("--resolution", 1 if resolution is None else resolution, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise CacheError(f"{name} must be an int >= {low}, got {value!r}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise CacheError(f"--out {out!r} exists and is not a directory")
    try:
        dev = resolve_device(device)
    except RuntimeError as e:  # also a name torch does not know
        raise CacheError(str(e)) from None

    try:
        dataset, data_ident = _build_dataset(data, resolution, augment, split)
    except CacheError:
        raise
    except (OSError, ValueError) as e:
        raise CacheError(f"--data {data!r}: {e}") from e
    try:
        tok, tok_ident = _load_tokenizer(vae, dev)
    except (OSError, ValueError) as e:  # includes CheckpointError
        raise CacheError(f"--vae {vae!r}: {e}") from e
    res = data_ident["resolution"]
    if res % tok.downsample:
        raise CacheError(f"--resolution {res} must be a multiple of the tokenizer's downsampling {tok.downsample}")
    side = res // tok.downsample
    try:
        schedule = (default_schedule(side, tok.mode) if schedule is None
                    else Schedule(schedule, latent_side=side, name="--schedule"))
    except (TypeError, ValueError) as e:
        raise CacheError(str(e)) from None
    labels = np.asarray([int(dataset[i][1]) for i in range(len(dataset))] if data == EMBEDDED
                        else [label for _, label in dataset.samples], dtype=np.int64)
    manifest = dict(format=CACHE_FORMAT, schedule=list(schedule), seq_len=schedule.total,
                    **tok_ident, **data_ident, views=2 if flip else 1, num_samples=len(dataset),
                    dtype="int16" if tok.vocab_size <= np.iinfo(np.int16).max + 1 else "int32",
                    created=time.strftime("%Y-%m-%dT%H:%M:%S"))
    codes, manifest = _open_or_create(out, manifest, labels, overwrite)
    done, total = manifest["done"], manifest["num_samples"]
    if done >= total:
        return manifest

    loader = DataLoader(Subset(dataset, range(done, total)), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, collate_fn=collate, pin_memory=dev.type == "cuda")
    bar = Progress(total, done, enabled=progress, desc="tokenising", unit="img")
    try:
        for batch_index, (images, _) in enumerate(loader):
            if max_batches is not None and batch_index >= max_batches:
                break
            images = images.to(dev, non_blocking=True)
            views = [images.flip(-1)] if flip else []
            rows = [torch.cat(tok.encode(v, schedule), dim=1) for v in [images] + views]
            block = torch.stack(rows, dim=1).cpu().numpy()  # [B, views, L]
            codes[done:done + len(block)] = block.astype(codes.dtype)
            codes.flush()  # codes reach the file before the manifest says they are done
            done += len(block)
            manifest["done"] = done
            write_json_atomic(os.path.join(out, "manifest.json"), manifest)
            bar.update(len(block))
    finally:
        bar.close()
        del codes
    return manifest
