"""Class-conditional sampling: `python -m sar_fast.sample --ckpt ... --vae ... --out grid.png`.

Writes a PNG grid and, with --npz, the uint8 [N, H, W, 3] array (key 'arr_0') that the
standard ImageNet FID evaluator (ADM's evaluator.py) reads.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from .cli import require_weights_file, resolve_device, run_main
from .models import load_checkpoint
from .models.generate import generate
from .models.tokenizers import build_tokenizer, check_model_fits_tokenizer
from .models.tokenizers.grey import EMBEDDED
from .sampling import CFG_RAMPS
from .schedules import parse_schedule
from . import files


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sar_fast.sample", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="model: a sar_fast export, FlexVAR/SAR ar-ckpt-*.pth, a flat "
                                                 "state dict or VAR var_d*.pth; .pth, .safetensors, sharded "
                                                 "*.safetensors.index.json or hf://OWNER/REPO/FILE[@REVISION]")
    p.add_argument("--vae", required=True, help="tokenizer: FlexVAE.pth, vae_ch160v4096z32.pth (or their "
                                                f".safetensors, or an hf:// id) or {EMBEDDED}")
    p.add_argument("--classes", default="0,1,2,3,4,5,6,7", help="comma-separated class ids")
    p.add_argument("--per-class", type=int, default=1, help="images per class")
    p.add_argument("--cfg", type=float, default=1.5, help="classifier-free guidance (0 = off)")
    p.add_argument("--cfg-ramp", choices=CFG_RAMPS, default=None,
                   help="guidance ramp over scales (default: flexvar for FlexVAR models, linear for VAR)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.0)
    p.add_argument("--schedule", type=parse_schedule, default=None,
                   help="scale sides (default: the model's); FlexVAR models take any schedule")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--out", default="grid.png", help="PNG grid")
    p.add_argument("--npz", default=None, help="also write all images as uint8 [N, H, W, 3] (key arr_0)")
    p.add_argument("--nrow", type=int, default=8)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    require_weights_file("--ckpt", args.ckpt)
    if args.vae != EMBEDDED:
        require_weights_file("--vae", args.vae, EMBEDDED)
    try:
        classes = [int(c) for c in args.classes.split(",") if c.strip()]
    except ValueError:
        raise SystemExit(f"error: --classes must be comma-separated ints, got {args.classes!r}") from None
    if not classes or args.per_class < 1 or args.batch_size < 1:
        raise SystemExit("error: need at least one class, --per-class >= 1 and --batch-size >= 1")
    try:
        device = resolve_device(args.device)
    except RuntimeError as e:
        raise SystemExit(f"error: {e}") from None
    model = load_checkpoint(args.ckpt).to(device).eval()
    tok = build_tokenizer(args.vae, device)
    check_model_fits_tokenizer(model, tok, "--ckpt")
    if max(classes) >= model.num_classes or min(classes) < 0:
        raise SystemExit(f"error: --classes must lie in [0, {model.num_classes - 1}], got {classes}")
    labels = torch.tensor([c for c in classes for _ in range(args.per_class)], device=device)
    ramp = args.cfg_ramp or ("flexvar" if model.arch == "flexvar" else "linear")
    generator = torch.Generator(device=device).manual_seed(args.seed)
    images = []
    for start in range(0, len(labels), args.batch_size):
        out = generate(model, tok.codebook().to(device), labels[start:start + args.batch_size], args.schedule,
                       cfg=args.cfg, cfg_ramp=ramp, top_k=args.top_k, top_p=args.top_p, generator=generator,
                       phi=tok.phi, decode=tok.decode)
        images.append(out.images.float().cpu())
        print(f"[sample] {min(start + args.batch_size, len(labels))}/{len(labels)}", file=sys.stderr, flush=True)
    images = torch.cat(images)
    files.write_png(args.out, files.image_grid(images, nrow=args.nrow))
    if args.npz:
        arr = (images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)
        np.savez(args.npz, arr_0=arr)
    print(f"[sample] wrote {args.out}" + (f" and {args.npz}" if args.npz else ""), file=sys.stderr)


if __name__ == "__main__":
    run_main(main)
