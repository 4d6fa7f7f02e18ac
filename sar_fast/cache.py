"""Tokenise an image folder once into a memory-mapped code cache (the tokenizer is frozen,
so training can read codes instead of running the VAE every step).

    python -m sar_fast.cache --data DIR --vae FlexVAE.pth --out CACHE [--flip]
    python -m sar_fast.cache --data embedded-digits --vae embedded-digits --out CACHE

Layout of CACHE: codes.npy [N, views, L] int16/int32 (np.lib.format.open_memmap),
labels.npy [N] int64, manifest.json (schedule, tokenizer path + sha256, resolution, class
names, dtype, `done`: how many images are written). Images are written in order, one
batch at a time, and the manifest is replaced atomically after each, so an interrupted
run continues from `done` when re-run with the same arguments.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from .build import build_tokenizer
from .cli import InputError, one_line, require_weights_file, run_main
from .data import CACHE_FORMAT, AUGMENTATIONS, EmbeddedDigitsDataset, ImageFolderDataset, collate
from .hub import is_hub_id
from .models.checkpoint import weights_sha256
from .embedded import DIGITS_SIDE, EMBEDDED
from .logs import Progress
from .parallel import resolve_device
from .schedules import STANDARD_SCHEDULE, parse_schedule, total_length, validate_schedule
# manifest entries that must agree for an existing cache to be continued
_IDENTITY_KEYS = ("format", "schedule", "quant_mode", "tokenizer_sha256", "tokenizer_class", "vocab_size",
                  "data_sha256", "split", "resolution", "augment", "views", "num_samples", "classes", "dtype")


class CacheError(ValueError):
    """A bad argument or an existing cache that does not fit them."""


def _write_json_atomic(path: str, obj: dict[str, Any]) -> None:
    """Write to a temp file, fsync, then os.replace: a crash leaves the old or the new file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def default_schedule(latent_side: int, quant_mode: str) -> tuple[int, ...]:
    """FlexVAR-style codes: every side 1..latent_side (any sub-schedule can be trained on);
    VAR: the standard 10-scale schedule (its residual codes fit one schedule only)."""
    if quant_mode == "flexvar" and latent_side <= 16:
        return tuple(range(1, latent_side + 1))
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
    _write_json_atomic(manifest_path, manifest)
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
                    else validate_schedule(schedule, latent_side=side, name="--schedule"))
    except (TypeError, ValueError) as e:
        raise CacheError(str(e)) from None
    labels = np.asarray([int(dataset[i][1]) for i in range(len(dataset))] if data == EMBEDDED
                        else [label for _, label in dataset.samples], dtype=np.int64)
    manifest = dict(format=CACHE_FORMAT, schedule=list(schedule), seq_len=total_length(schedule),
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
            _write_json_atomic(os.path.join(out, "manifest.json"), manifest)
            bar.update(len(block))
    finally:
        bar.close()
        del codes
    return manifest


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sar_fast.cache",
        description="Tokenise an ImageNet-style folder (class sub-folders) once into a memory-mapped code "
                    "cache for `sar_fast.train --cache CACHE`. Random crops cannot be cached: each image is "
                    "stored as its centre crop (the eval transform of --augment), and with --flip also as "
                    "that crop mirrored (training then picks one of the two per sample, as VAR-style caches "
                    "do). Re-running with the same arguments continues an interrupted cache.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help=f"image folder root/<class>/<image>, or {EMBEDDED!r} "
                   "(scikit-learn's 8x8 digits)")
    p.add_argument("--vae", required=True, help="tokenizer checkpoint (FlexVAE.pth or vae_ch160v4096z32.pth, their "
                   f".safetensors, or an hf:// id of one), or {EMBEDDED!r} (the weight-free GreyLevelTokenizer)")
    p.add_argument("--out", required=True, help="cache directory (created; continued if it holds this cache)")
    p.add_argument("--schedule", default=None, help="comma-separated scale sides ending at the latent side; "
                   "default: every side 1..16 for FlexVAR codes (any schedule can then be read back), "
                   "the standard 10 scales for VAR")
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (default 256; 8 for "
                   f"--data {EMBEDDED})")
    p.add_argument("--augment", choices=AUGMENTATIONS, default="flexvar",
                   help="whose centre crop: flexvar (short side -> resolution) or var (short side -> 1.125 x)")
    p.add_argument("--flip", action="store_true", help="also store the mirrored crop (2 views per image)")
    p.add_argument("--batch-size", type=int, default=64, help="images per chunk written")
    p.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1) - 1,
                   help="DataLoader workers decoding images")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--split", choices=("train", "val", "all"), default="train",
                   help=f"which split of --data {EMBEDDED} to cache")
    p.add_argument("--overwrite", action="store_true", help="replace a different cache found at --out")
    p.add_argument("--max-batches", type=int, default=None,
                   help="stop after this many batches (time-limited jobs); re-run to continue")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        schedule = None if args.schedule is None else parse_schedule(args.schedule)
    except (TypeError, ValueError) as e:
        parser.error(f"--schedule: {e}")
    try:
        manifest = build_cache(args.data, args.vae, args.out, schedule=schedule, resolution=args.resolution,
                               augment=args.augment, flip=args.flip, batch_size=args.batch_size,
                               num_workers=args.num_workers, device=args.device, split=args.split,
                               overwrite=args.overwrite, max_batches=args.max_batches,
                               progress=not args.no_progress)
    except CacheError as e:  # one line, argparse's exit code for a bad argument
        print(f"{parser.prog}: error: {one_line(e)}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    state = "complete" if manifest["done"] >= manifest["num_samples"] else "partial (re-run to continue)"
    print(f"{args.out}: {manifest['done']}/{manifest['num_samples']} images, {manifest['views']} view(s), "
          f"schedule {tuple(manifest['schedule'])}, {state}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
