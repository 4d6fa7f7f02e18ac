"""The cache command: tokenise an image folder once into a memory-mapped code cache (the
tokenizer is frozen, so training can read codes instead of running the VAE every step). The
writer and reader are sar_fast.data.codes.

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
import os
import sys
from typing import Sequence

from .cli import one_line, run_main
from .data.codes import CacheError, build_cache
from .data.images import AUGMENTATIONS
from .models.tokenizers.grey import EMBEDDED
from .schedules import parse_schedule


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
