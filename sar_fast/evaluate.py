"""Sample a class-balanced set and measure it: `torchrun --nproc_per_node=N -m sar_fast.evaluate
--ckpt ... --vae ... --reference VIRTUAL_imagenet256_labeled.npz --out DIR`.

- The set: --per-class images of each class (ImageNet: 50 x 1000 = 50k). Image k of the set
  is (class k % C, index k // C); its sampling noise comes from a generator seeded with
  sha256("seed:class:index"), so the set is the same for any number of ranks and any batch
  size. Shards of --shard-size images are dealt round-robin to the ranks and written
  atomically (temporary file, then rename); a rerun with the same --out and settings keeps
  the finished shards and samples only the rest (a killed run loses at most one shard per rank).
- The output: DIR/samples.npz (`arr_0`, uint8 [N, H, W, 3], what ADM's evaluator reads, plus
  `labels`), DIR/metrics.json (metrics, settings, checkpoint sha256, versions, seeds),
  DIR/grid.png and DIR/summary.txt (the one-line summary, also printed).
- The metrics: for ImageNet models, FID / IS / precision / recall through torch-fidelity
  against --reference (sar_fast.metrics.inception); for the embedded digits model, a digits
  classifier's Fréchet distance and class accuracy (sar_fast.metrics.digits, a sanity metric).

Presets (--preset) follow the published evaluation scripts; any flag overrides its value:
  var     cfg 1.5, top-k 900, top-p 0.96, linear ramp, the model's schedule
          (VAR's README: "cfg=1.5, top_p=0.96, top_k=900, more_smooth=False" for FID)
  flexvar cfg 2.5, top-k 900, top-p 0.95, FlexVAR ramp, schedule 1,2,3,4,5,6,8,10,13,16
          (FlexVAR scripts/evaluate_c2i.sh and eval_c2i.py: --cfg 2.5 --top_k 900, top_p=0.95)
  sar     cfg 2.2 (d16; d20 2.6, d24 3.3), top-k 900, top-p 0.95, FlexVAR ramp, same schedule
          (SAR scripts/eval_SAR_d{16,20,24}.sh; eval_c2i.py samples through FlexVAR's
          autoregressive_infer_cfg with top_p=0.95)
  digits  cfg 1.5, no top-k/top-p, linear ramp, schedule 1,2,3,4,6,8 (the embedded default's
          training sample grids)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from . import __version__
from .models.generate import PRESETS, generate
from .models.tokenizers.grey import EMBEDDED
from .rng import image_identity, image_uniforms
from .sampling import CFG_RAMPS
from .schedules import Schedule, parse_schedule
from . import files

SAR_CFG_BY_DEPTH = {16: 2.2, 20: 2.6, 24: 3.3}
METRICS = ("auto", "digits", "inception", "none")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="torchrun --nproc_per_node=N -m sar_fast.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True,
                   help="model: a sar_fast export, FlexVAR/SAR ar-ckpt-*.pth or VAR var_d*.pth; .pth, .safetensors, "
                        "sharded *.safetensors.index.json or hf://OWNER/REPO/FILE[@REVISION]")
    p.add_argument("--vae", default=EMBEDDED, help=f"tokenizer: FlexVAE.pth, vae_ch160v4096z32.pth (or their "
                                                   f".safetensors, or an hf:// id) or {EMBEDDED} "
                                                   "(default: %(default)s)")
    p.add_argument("--out", default=None, help="output folder (default: eval/ next to --ckpt; for an hf:// id, "
                                               "eval-<file name>/ here); rerun with the same folder to resume")
    g = p.add_argument_group("sampling (a preset sets cfg/ramp/top-k/top-p/schedule; flags override it)")
    g.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="default: digits for the embedded tokenizer, var for VAR models, flexvar for FlexVAR models")
    g.add_argument("--cfg", type=float, default=None, help="classifier-free guidance (0 = off)")
    g.add_argument("--cfg-ramp", choices=CFG_RAMPS, default=None, help="guidance ramp over the scales")
    g.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (0 = all)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus mass (0 = off)")
    g.add_argument("--schedule", type=parse_schedule, default=None, help="scale sides, e.g. 1,2,3,4,5,6,8,10,13,16")
    g.add_argument("--per-class", type=int, default=50, help="images per class (default: %(default)s)")
    g.add_argument("--classes", type=int, default=None, help="use classes 0..C-1 (default: all the model's classes)")
    g.add_argument("--seed", type=int, default=0, help="base seed; image (c, i) is seeded from (seed, c, i)")
    g.add_argument("--deterministic", action="store_true",
                   help="the fused ops launch their first admitted config (no autotuning): the same images "
                        "bit for bit on any GPU count (also $SAR_FAST_DETERMINISTIC=1)")
    g.add_argument("--batch-size", type=int, default=64, help="images per forward pass (per rank)")
    g.add_argument("--shard-size", type=int, default=500, help="images per shard file (the unit of resuming)")
    g.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="autocast dtype (default: bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    m = p.add_argument_group("metrics")
    m.add_argument("--metric", choices=METRICS, default="auto",
                   help="auto: digits for the embedded tokenizer, inception otherwise")
    m.add_argument("--reference", default=None, help="inception: ADM's VIRTUAL_imagenet256_labeled.npz (mu/sigma "
                                                     "and arr_0) or a folder of real images")
    m.add_argument("--inception", default=None, help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth "
                                                     "(default: torch hub's checkpoints folder)")
    m.add_argument("--stats-cache", default=None, help="cache folder for reference features/statistics "
                                                       "(default: OUT/../reference_cache)")
    m.add_argument("--metric-batch-size", type=int, default=64, help="Inception batch size")
    return p


@dataclass
class SamplingSettings:
    """Everything that decides the images; a resumed run must match it exactly."""
    checkpoint_sha256: str
    tokenizer: str
    preset: str
    cfg: float
    cfg_ramp: str
    top_k: int
    top_p: float
    schedule: list[int]
    num_classes: int
    per_class: int
    seed: int
    shard_size: int
    dtype: str


def shard_path(out: str, shard: int) -> str:
    return os.path.join(out, "shards", f"shard_{shard:06d}.npz")


def save_npz_atomic(path: str, **arrays: np.ndarray) -> None:
    """Write to a temporary file in the same folder, flush it to disk, then rename: a
    reader (or a resumed run) sees the whole file or none."""
    with files.atomic_write(path) as f:
        np.savez(f, **arrays)


def shard_is_complete(path: str, indices: np.ndarray) -> bool:
    if not os.path.isfile(path):
        return False
    try:
        with np.load(path) as z:
            return np.array_equal(z["indices"], indices) and len(z["images"]) == len(indices)
    except (OSError, ValueError, KeyError, EOFError):
        return False  # a damaged file (e.g. a copy cut short) is sampled again


def to_uint8_nhwc(images: torch.Tensor) -> np.ndarray:
    return (images.float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)


class RateMeter:
    """Rank-0 progress line: done/total, images/s (this rank and all ranks) and ETA."""

    def __init__(self, total: int, done: int, world: int, enabled: bool, every_s: float = 2.0):
        self.total, self.done, self.world, self.enabled, self.every_s = total, done, world, enabled, every_s
        self.new, self.t0, self.last = 0, time.time(), 0.0

    def rate(self) -> float:
        return self.new / max(time.time() - self.t0, 1e-9)

    def update(self, n: int, force: bool = False) -> None:
        self.new += n
        self.done += n
        now = time.time()
        if not self.enabled or (now - self.last < self.every_s and not force):
            return
        self.last = now
        rate = self.rate()
        eta = (self.total - self.done) / (rate * self.world) if rate > 0 else float("inf")
        eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta != float("inf") else "?"
        print(f"[evaluate] rank 0: {self.done}/{self.total} images | {rate:.1f} img/s "
              f"(~{rate * self.world:.1f} on {self.world} ranks) | ETA {eta_text}", file=sys.stderr, flush=True)


def resolve_settings(args, model, tokenizer_spec: str) -> tuple[str, dict]:
    preset = args.preset or ("digits" if tokenizer_spec == EMBEDDED else
                             ("flexvar" if model.arch == "flexvar" else "var"))
    values = dict(PRESETS[preset])
    if preset == "sar":
        values["cfg"] = SAR_CFG_BY_DEPTH.get(len(model.blocks), values["cfg"])
    for key in ("cfg", "cfg_ramp", "top_k", "top_p", "schedule"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    values["schedule"] = list(model.check_schedule(values["schedule"]))
    return preset, values


def sample_shard(model, tok, settings: SamplingSettings, indices: np.ndarray, batch_size: int,
                 device: torch.device, autocast_dtype, meter: RateMeter) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [n, H, W, 3], labels [n]) of the given image indices of the set."""
    num_tokens = Schedule(settings.schedule).total
    codebook = tok.codebook().to(device)
    images, labels = [], []
    for start in range(0, len(indices), batch_size):
        ids = [image_identity(int(k), settings.num_classes) for k in indices[start:start + batch_size]]
        batch_labels = torch.tensor([c for c, _ in ids], dtype=torch.long)
        uniforms = torch.stack([image_uniforms(settings.seed, c, i, num_tokens) for c, i in ids])
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = generate(model, codebook, batch_labels.to(device), settings.schedule, cfg=settings.cfg,
                           cfg_ramp=settings.cfg_ramp, top_k=settings.top_k, top_p=settings.top_p,
                           uniforms=uniforms, phi=tok.phi, decode=tok.decode)
        images.append(to_uint8_nhwc(out.images))
        labels.append(batch_labels.numpy())
        meter.update(len(ids))
    return np.concatenate(images), np.concatenate(labels)


def pick_grid(labels: np.ndarray, num_classes: int, classes: int = 8, per_class: int = 8) -> np.ndarray:
    """Indices of up to `per_class` images of up to `classes` evenly spread classes, row by class."""
    chosen = np.unique(np.linspace(0, num_classes - 1, min(classes, num_classes)).round().astype(int))
    return np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in chosen])


def versions() -> dict:
    out = {"sar_fast": __version__, "torch": torch.__version__, "numpy": np.__version__,
           "python": platform.python_version()}
    try:
        import torch_fidelity
        out["torch_fidelity"] = torch_fidelity.__version__
    except ImportError:
        pass
    return out


def check_metric_inputs(args, metric: str) -> str | None:
    """Fail before sampling when the metric cannot run: the Inception weights path (or
    cache file), the reference, torch-fidelity. Returns the weights path."""
    if metric != "inception":
        return None
    from .metrics.inception import (
        check_reference,
        require_torch_fidelity,
        resolve_inception_weights,
    )
    try:
        require_torch_fidelity()
        weights = resolve_inception_weights(args.inception)
        check_reference(args.reference)
    except (ImportError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    return weights


def check_args(args) -> None:
    """Bad arguments fail here, before any process group or model (hf:// ids are fetched)."""
    from .cli import require_weights_file
    from .models.checkpoint import preflight_checkpoint
    from .models.tokenizers import preflight_tokenizer
    from .safe_load import CheckpointError, exit_once
    require_weights_file("--ckpt", args.ckpt)
    if args.vae != EMBEDDED:
        require_weights_file("--vae", args.vae, EMBEDDED)
    try:  # the headers only; every rank finds the same, rank 0 says it
        preflight_checkpoint(args.ckpt)
        if args.vae != EMBEDDED:
            preflight_tokenizer(args.vae)
    except CheckpointError as e:
        exit_once(f"error: {e}")
    for name in ("per_class", "batch_size", "shard_size", "metric_batch_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.classes is not None and args.classes < 1:
        raise SystemExit(f"error: --classes must be >= 1, got {args.classes}")
    if args.top_k is not None and args.top_k < 0:
        raise SystemExit(f"error: --top-k must be >= 0, got {args.top_k}")
    if args.top_p is not None and not 0.0 <= args.top_p <= 1.0:
        raise SystemExit(f"error: --top-p must be in [0, 1], got {args.top_p}")
    if args.seed < 0:
        raise SystemExit(f"error: --seed must be >= 0, got {args.seed}")


def default_out(ckpt: str) -> str:
    """Where results go without --out: eval-<file> for a hub id, else eval/ beside the checkpoint."""
    from .hub import is_hub_id, parse_hub_id
    if is_hub_id(ckpt):
        return f"eval-{os.path.basename(parse_hub_id(ckpt).filename)}"
    return os.path.join(os.path.dirname(os.path.abspath(ckpt)), "eval")


def build_settings(args, model, device: torch.device) -> tuple[SamplingSettings, torch.dtype | None]:
    """The settings that decide the images (preset, flags, the weights' sha256) and the
    autocast dtype (None: fp32)."""
    from .models.checkpoint import weights_sha256
    num_classes = args.classes or model.num_classes
    if num_classes > model.num_classes:
        raise SystemExit(f"error: --classes {num_classes} exceeds the model's {model.num_classes} classes")
    try:
        preset, values = resolve_settings(args, model, args.vae)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    settings = SamplingSettings(
        checkpoint_sha256=weights_sha256(args.ckpt), tokenizer=args.vae if args.vae == EMBEDDED else
        f"{os.path.basename(args.vae)}:{weights_sha256(args.vae)}", preset=preset, cfg=float(values["cfg"]),
        cfg_ramp=values["cfg_ramp"], top_k=int(values["top_k"]), top_p=float(values["top_p"]),
        schedule=values["schedule"], num_classes=num_classes, per_class=args.per_class, seed=args.seed,
        shard_size=args.shard_size, dtype=dtype_name)
    return settings, autocast_dtype


def claim_output(out: str, settings: SamplingSettings, rank: int, world: int) -> None:
    """Rank 0 records the settings in a new folder, or checks a resumed folder's against
    them; every rank learns the verdict and stops on a mismatch (its shards would mix sets)."""
    import torch.distributed as dist
    verdict = [""]
    if rank == 0:
        os.makedirs(os.path.join(out, "shards"), exist_ok=True)
        settings_file = os.path.join(out, "settings.json")
        if os.path.isfile(settings_file):
            with open(settings_file) as f:
                previous = json.load(f)
            changed = {k: (previous.get(k), v) for k, v in asdict(settings).items() if previous.get(k) != v}
            if changed:
                verdict[0] = (f"error: {out} holds samples made with other settings ({changed}; "
                              "old, new); use another --out or delete the folder")
        else:
            files.write_json_atomic(settings_file, asdict(settings))
    if world > 1:
        dist.broadcast_object_list(verdict, src=0)
    if verdict[0]:
        raise SystemExit(verdict[0])


@dataclass
class ShardPlan:
    """This rank's share of the set: shards dealt round-robin, those already on disk skipped."""
    total: int                          # images in the whole set
    num_shards: int                     # shards in the whole set
    indices: dict[int, np.ndarray]      # this rank's shards: shard -> its image indices
    todo: list[int]                     # this rank's shards still to sample

    @property
    def images(self) -> int:
        return sum(len(v) for v in self.indices.values())

    @property
    def done(self) -> int:
        return sum(len(v) for s, v in self.indices.items() if s not in self.todo)


def plan_shards(out: str, total: int, shard_size: int, rank: int, world: int) -> ShardPlan:
    num_shards = -(-total // shard_size)
    mine = list(range(rank, num_shards, world))
    indices = {s: np.arange(s * shard_size, min((s + 1) * shard_size, total)) for s in mine}
    todo = [s for s in mine if not shard_is_complete(shard_path(out, s), indices[s])]
    return ShardPlan(total, num_shards, indices, todo)


def announce(settings: SamplingSettings, plan: ShardPlan, world: int) -> None:
    print(f"[evaluate] {plan.total} images ({settings.num_classes} classes x {settings.per_class}), preset "
          f"{settings.preset}: cfg {settings.cfg} ramp {settings.cfg_ramp} top-k {settings.top_k} top-p "
          f"{settings.top_p} schedule {settings.schedule}; {plan.num_shards} shards on {world} rank(s)"
          + (f"; resuming, {plan.done} of this rank's {plan.images} already done" if plan.done else ""),
          file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> dict | None:
    args = build_parser().parse_args(argv)
    check_args(args)
    metric = args.metric if args.metric != "auto" else ("digits" if args.vae == EMBEDDED else "inception")
    if metric == "digits" and args.vae != EMBEDDED:
        raise SystemExit(f"error: --metric digits needs --vae {EMBEDDED}")
    weights = check_metric_inputs(args, metric)  # before anything slow
    if args.deterministic:
        from . import ops
        ops.set_deterministic(True)

    import torch.distributed as dist

    from .models import load_checkpoint
    from .models.tokenizers import build_tokenizer, check_model_fits_tokenizer
    from .train.parallel import init_distributed, shutdown
    out = args.out or default_out(args.ckpt)
    info = init_distributed(args.device)
    device, world, rank = info.device, info.world_size, info.rank
    clean = False
    try:
        model = load_checkpoint(args.ckpt).to(device).eval()
        tok = build_tokenizer(args.vae, device)
        check_model_fits_tokenizer(model, tok, "--ckpt")
        settings, autocast_dtype = build_settings(args, model, device)
        claim_output(out, settings, rank, world)
        plan = plan_shards(out, settings.num_classes * args.per_class, args.shard_size, rank, world)
        if rank == 0:
            announce(settings, plan, world)
        meter = RateMeter(plan.images, plan.done, world, enabled=rank == 0)
        t_start = time.time()
        for s in plan.todo:
            images, labels = sample_shard(model, tok, settings, plan.indices[s], args.batch_size, device,
                                          autocast_dtype, meter)
            save_npz_atomic(shard_path(out, s), images=images, labels=labels, indices=plan.indices[s])
        meter.update(0, force=bool(plan.todo))
        sampling_s = time.time() - t_start
        if world > 1:
            dist.barrier()
        result = None
        if rank == 0:
            result = gather_and_measure(args, out, settings, metric, weights, plan.total, plan.num_shards, device,
                                        sampling_s, meter.rate() * world)
        clean = True
        return result
    finally:
        shutdown(clean)


def gather_and_measure(args, out: str, settings: SamplingSettings, metric: str, weights: str | None,
                       total: int, num_shards: int, device: torch.device, sampling_s: float,
                       images_per_s: float) -> dict:
    images, labels, indices = [], [], []
    for s in range(num_shards):
        with np.load(shard_path(out, s)) as z:
            images.append(z["images"])
            labels.append(z["labels"])
            indices.append(z["indices"])
    images, labels, indices = np.concatenate(images), np.concatenate(labels), np.concatenate(indices)
    if not np.array_equal(indices, np.arange(total)):
        raise RuntimeError(f"the shards in {out}/shards do not hold images 0..{total - 1} exactly once")
    save_npz_atomic(os.path.join(out, "samples.npz"), arr_0=images, labels=labels)

    t0 = time.time()
    if metric == "digits":
        from .metrics.digits import digits_metrics
        metrics = digits_metrics(images, labels)
        metrics_about = ("digits sanity metric: Fréchet distance and k-NN precision/recall (k=3) of a small digits "
                         "classifier's features vs the held-out real digits, and its class accuracy on the samples "
                         "(not a quality claim)")
    elif metric == "inception":
        from .metrics.inception import InceptionMetrics
        cache = args.stats_cache or os.path.join(os.path.dirname(os.path.abspath(out)), "reference_cache")
        metrics = InceptionMetrics(weights, device, args.metric_batch_size, cache).compute(images, args.reference)
        metrics_about = (f"torch-fidelity TF-Inception port ({os.path.basename(weights)}): FID vs {args.reference}, "
                         "IS (10 splits), precision/recall (k=3) vs the reference images")
    else:
        metrics, metrics_about = {}, "none"
    metric_s = time.time() - t0

    grid = torch.from_numpy(images[pick_grid(labels, settings.num_classes)]).permute(0, 3, 1, 2).float() / 255
    files.write_png(os.path.join(out, "grid.png"), files.image_grid(grid, nrow=min(8, settings.per_class)))
    shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float))
    summary = (f"{os.path.basename(args.ckpt)} [{settings.preset}: cfg {settings.cfg} {settings.cfg_ramp} top-k "
               f"{settings.top_k} top-p {settings.top_p}] {total} images: {shown or 'no metric'}")
    record = {"summary": summary, "metrics": metrics, "metric": metric, "metric_about": metrics_about,
              "settings": asdict(settings),
              "checkpoint": args.ckpt if args.ckpt.startswith("hf://") else os.path.abspath(args.ckpt),
              "reference": args.reference, "inception_weights": weights, "num_images": total,
              "seeds": {"base": settings.seed,
                        "image": "torch.Generator().manual_seed(int.from_bytes(sha256(f'{seed}:{class}:{index}')"
                                 "[:8], 'little') >> 1), then torch.rand(tokens, float64): one uniform per token"},
              "image_order": "image k = (class k % C, index k // C)",
              "timing": {"sampling_s": sampling_s, "images_per_s": images_per_s, "metric_s": metric_s},
              "versions": versions(), "device": str(device)}
    files.write_json_atomic(os.path.join(out, "metrics.json"), record)
    with open(os.path.join(out, "summary.txt"), "w") as f:
        f.write(summary + "\n")
    print(summary)
    print(f"[evaluate] wrote {out}/samples.npz, metrics.json, grid.png, summary.txt", file=sys.stderr)
    return record


if __name__ == "__main__":
    from .cli import run_main
    run_main(main)
