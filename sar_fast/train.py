"""SAR post-training: `torchrun [--nproc_per_node N] -m sar_fast.train [--preset P] [flags]`.

With no flags, the `tiny` preset trains a small FlexVAR-style model on scikit-learn's
8x8 digits with a grey-level tokenizer (no downloads, runs on a CPU): teacher forcing
first, then SAR post-training, writing checkpoints, metrics, a loss plot and samples.
The real presets (flexvar-d16 ... var-d30) start from a user's checkpoint (--init), a
tokenizer (--vae) and an ImageNet folder (--data) or a code cache (--cache).

The loop, in one sitting: build data + tokenizer + model, shard it (FSDP2, parallel.py),
then per step: (maybe random) schedule -> codes -> sar_step (sar.py) -> backward ->
clip -> AdamW; log, checkpoint (checkpointing.py), sample. Faults: a non-finite loss
skips the step; --max-nonfinite in a row checkpoints and aborts; SIGTERM checkpoints and
exits cleanly.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist

from . import checkpointing, logs, parallel
from .models import ModelConfig, ScaleAR, load_checkpoint, preset_config, save_export
from .sar import CSF_TARGETS, OBJECTIVES, OFFICIAL, SAMPLINGS, SCALE_WEIGHTINGS, TRANSITIONS, SARConfig, sar_step
from .schedules import STANDARD_SCHEDULE, parse_schedule, random_flexvar_schedule, total_length

EMBEDDED = "embedded-digits"


@dataclass
class TrainConfig:
    # run
    out: str = ""
    seed: int = 0
    device: str = "auto"
    # model
    init: str | None = None              # a checkpoint in any format load_checkpoint reads
    model: str = "flexvar-tiny"          # model preset when training from scratch
    depth: int | None = None             # overrides for a from-scratch model
    embed_dim: int | None = None
    num_heads: int | None = None
    cond_drop: float = 0.1
    drop_path: float | None = None
    # data
    data: str | None = None              # ImageNet-style folder
    cache: str | None = None             # code cache from `python -m sar_fast.cache`
    vae: str = EMBEDDED                  # tokenizer checkpoint, or embedded-digits
    resolution: int = 256
    schedule: tuple[int, ...] = STANDARD_SCHEDULE
    random_schedules: bool = False       # FlexVAR's random schedule each step
    workers: int = 2
    bad_images: str = "skip"             # unusable images in --data: skip (counted, reported) or error
    # objective
    objective: str = "sar"
    pretrain_steps: int = 0              # teacher-forcing steps before the objective
    transitions: str = "last"
    sampling: str = "cfg"
    csf_target: str = "sampled"
    gamma: float = 0.01
    cfg: float = 1.2
    top_k: int = 900
    top_p: float = 0.96
    scale_weighting: str = "token"
    label_smoothing: float = 0.0
    hybrid_k: int = 4
    # optimisation
    batch_size: int = 768                # global, per optimiser step
    grad_accum: int = 1
    lr: float = 1e-4
    pretrain_lr: float | None = None     # lr of the --pretrain-steps phase (default: --lr)
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 0
    clip: float = 2.0
    max_steps: int | None = None         # steps of the objective (after pretrain_steps)
    epochs: float | None = None          # alternative to max_steps
    # system
    precision: str = "auto"              # auto: bf16 on CUDA, fp32 on CPU
    activation_checkpointing: bool = False
    compile: bool = False
    # checkpoints and logs
    ckpt_every: int = 1000
    keep_last: int = 3
    resume: str = "auto"
    export: bool = True
    log_every: int = 10
    num_samples: int = 16
    sample_cfg: float = 2.0
    sample_top_k: int = 0
    sample_top_p: float = 0.0
    progress: bool = True
    max_nonfinite: int = 20

    def objective_config(self, objective: str | None = None) -> SARConfig:
        return SARConfig(objective=objective or self.objective, transitions=self.transitions, sampling=self.sampling,
                         csf_target=self.csf_target, gamma=self.gamma, cfg=self.cfg, top_k=self.top_k,
                         top_p=self.top_p, scale_weighting=self.scale_weighting,
                         label_smoothing=self.label_smoothing, hybrid_k=self.hybrid_k, seed=self.seed)


_SAR_OFFICIAL = {k: v for k, v in OFFICIAL.items() if k != "objective"}
PRESETS: dict[str, dict] = {
    # The embedded default: digits + grey levels, a ~0.2M-parameter FlexVAR-style model.
    "tiny": dict(model="flexvar-tiny", depth=3, embed_dim=96, num_heads=4, vae=EMBEDDED, schedule=(1, 2, 3, 4, 6, 8),
                 pretrain_steps=300, max_steps=150, batch_size=64, pretrain_lr=1e-3, lr=3e-4, warmup_steps=20,
                 clip=2.0,
                 objective="sar", transitions="all", sampling="cfg", gamma=0.1, cfg=1.2, top_k=0, top_p=0.96,
                 ckpt_every=150, keep_last=2, log_every=10, num_samples=20, sample_cfg=1.5, workers=0, out="runs/tiny"),
}
for _d in (16, 20, 24, 30):
    PRESETS[f"flexvar-d{_d}"] = dict(model=f"flexvar-d{_d}", random_schedules=True, batch_size=768, epochs=10,
                                     objective="sar", **_SAR_OFFICIAL, out=f"runs/sar-flexvar-d{_d}")
    PRESETS[f"var-d{_d}"] = dict(model=f"var-d{_d}", batch_size=768, epochs=10, objective="sar", **_SAR_OFFICIAL,
                                 out=f"runs/sar-var-d{_d}")


# ------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="torchrun [--nproc_per_node N] -m sar_fast.train",
        description="SAR post-training (and teacher-forcing training) of FlexVAR/VAR models on FSDP2. "
                    "Every option overrides the chosen preset.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, argument_default=argparse.SUPPRESS)
    g = p.add_argument_group("run")
    g.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                   help="tiny: embedded digits on a CPU in minutes; flexvar-d*/var-d*: SAR on a user's checkpoint "
                        "with the public SAR settings (need --init, --vae and --data or --cache)")
    g.add_argument("--out", help="run directory (checkpoints/, metrics.jsonl, loss.png, samples/)")
    g.add_argument("--seed", type=int, help="seed of data order, init, sampling")
    g.add_argument("--device", choices=["auto", "cuda", "cpu"])
    g = p.add_argument_group("model")
    g.add_argument("--init", help="initial weights: FlexVAR/SAR ar-ckpt-*.pth, flat state dict, VAR var_d*.pth, "
                                  "or a sar_fast export; architecture inferred from the weights")
    g.add_argument("--model", help="model preset for a from-scratch model (flexvar-d16, var-d24, flexvar-tiny, ...)")
    g.add_argument("--depth", type=int, help="from-scratch model: number of blocks")
    g.add_argument("--embed-dim", type=int, help="from-scratch model: width")
    g.add_argument("--num-heads", type=int, help="from-scratch model: attention heads")
    g.add_argument("--cond-drop", type=float, help="label dropout to the null class (classifier-free guidance)")
    g.add_argument("--drop-path", type=float, help="stochastic depth rate (default: the checkpoint's/preset's)")
    g = p.add_argument_group("data")
    g.add_argument("--data", help="ImageNet-style folder (class sub-folders); tokenised on the fly with --vae")
    g.add_argument("--cache", help="code cache from `python -m sar_fast.cache` (read instead of running the VAE)")
    g.add_argument("--vae", help=f"tokenizer checkpoint (FlexVAE.pth, vae_ch160v4096z32.pth) or {EMBEDDED}")
    g.add_argument("--resolution", type=int, help="image side for --data")
    g.add_argument("--schedule", type=parse_schedule, help="scale sides, e.g. 1,2,3,4,5,6,8,10,13,16 or 'standard'")
    g.add_argument("--random-schedules", action=argparse.BooleanOptionalAction,
                   help="FlexVAR's random schedule every step (FlexVAR models; needs on-the-fly tokenisation or a "
                        "cache holding every side)")
    g.add_argument("--workers", type=int, help="data loader workers per rank")
    g.add_argument("--bad-images", choices=("skip", "error"),
                   help="empty/unreadable/corrupt images in --data: skip a handful (counted in the log and in "
                        "metrics.jsonl as skipped_images; more than 10 and 1%% of the folder is an error) or "
                        "stop with an error (default skip)")
    g = p.add_argument_group("objective (sar_fast.sar)")
    g.add_argument("--objective", choices=OBJECTIVES, help="tf: teacher forcing; sar: TF + SSR + CSFL; official: the "
                   "public SAR step as written (slower, same result); sf_*: naive student-forcing ablations")
    g.add_argument("--pretrain-steps", type=int, help="teacher-forcing steps before the objective")
    g.add_argument("--transitions", choices=TRANSITIONS, help="SSR transitions: last (public code), random, all (Eq. 6)")
    g.add_argument("--sampling", choices=SAMPLINGS, help="how SSR samples the TF predictions")
    g.add_argument("--csf-target", choices=CSF_TARGETS, help="CSF target: TF-sampled codes, TF distribution (KL), GT")
    g.add_argument("--gamma", type=float, help="weight of the CSF loss")
    g.add_argument("--cfg", type=float, help="guidance for SSR sampling (ramp cfg*(1+si/(n-1))/2)")
    g.add_argument("--top-k", type=int, help="SSR top-k (0 = off)")
    g.add_argument("--top-p", type=float, help="SSR top-p (0 = off)")
    g.add_argument("--scale-weighting", choices=SCALE_WEIGHTINGS, help="token: 1/L per token; scale: 1/n per scale")
    g.add_argument("--label-smoothing", type=float)
    g.add_argument("--hybrid-k", type=int, help="sf_hybrid: teacher-forced scales before the rollout")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, help="global batch per optimiser step (split over ranks and --grad-accum)")
    g.add_argument("--grad-accum", type=int, help="micro-batches per optimiser step")
    g.add_argument("--lr", type=float, help="learning rate of the objective's steps (constant after warm-up)")
    g.add_argument("--pretrain-lr", type=float, help="learning rate of the --pretrain-steps phase (default: --lr)")
    g.add_argument("--weight-decay", type=float, help="AdamW decay on weight matrices only")
    g.add_argument("--betas", type=lambda s: tuple(float(x) for x in s.split(",")), help="AdamW betas, e.g. 0.9,0.95")
    g.add_argument("--warmup-steps", type=int, help="linear warm-up, then constant")
    g.add_argument("--clip", type=float, help="gradient-norm clipping (0 = off)")
    g.add_argument("--max-steps", type=int, help="optimiser steps of the objective (after --pretrain-steps)")
    g.add_argument("--epochs", type=float, help="alternative to --max-steps: passes over the data")
    g = p.add_argument_group("system")
    g.add_argument("--precision", choices=["auto", "bf16", "fp32"], help="FSDP parameter dtype (reduction in fp32)")
    g.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction)
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile every block")
    g = p.add_argument_group("checkpoints and logs")
    g.add_argument("--ckpt-every", type=int, help="steps between sharded checkpoints (also loss plot + samples)")
    g.add_argument("--keep-last", type=int, help="checkpoints kept")
    g.add_argument("--resume", help="auto (newest in --out), none, or a checkpoint directory")
    g.add_argument("--export", action=argparse.BooleanOptionalAction,
                   help="with each checkpoint, a flat state dict the original FlexVAR/VAR code loads (export.pth)")
    g.add_argument("--log-every", type=int)
    g.add_argument("--num-samples", type=int, help="images in each sample grid")
    g.add_argument("--sample-cfg", type=float, help="guidance for the sample grids")
    g.add_argument("--sample-top-k", type=int)
    g.add_argument("--sample-top-p", type=float)
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, help="rank-0 progress bar")
    g.add_argument("--max-nonfinite", type=int, help="non-finite steps in a row before checkpoint + abort")
    return p


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Preset defaults, overridden by the flags given; validated before any work."""
    ns = vars(build_parser().parse_args(argv))
    preset = ns.pop("preset", "tiny")
    values = dict(PRESETS[preset])
    values.update({k: v for k, v in ns.items()})
    known = {f.name for f in fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in values.items() if k in known})
    validate(cfg, preset)
    return cfg


def validate(cfg: TrainConfig, preset: str) -> None:
    """Fail fast, naming the flag, before any process group or model exists."""
    def need_path(flag: str, path: str | None, kind: str) -> None:
        if path is not None and not (os.path.isdir(path) if kind == "dir" else os.path.isfile(path)):
            raise SystemExit(f"error: {flag} {path}: no such {'directory' if kind == 'dir' else 'file'}")

    need_path("--init", cfg.init, "file")
    need_path("--data", cfg.data, "dir")
    need_path("--cache", cfg.cache, "dir")
    if cfg.vae != EMBEDDED:
        need_path("--vae", cfg.vae, "file")
    if cfg.data and cfg.cache:
        raise SystemExit("error: give --data or --cache, not both")
    if cfg.vae == EMBEDDED and cfg.data:
        raise SystemExit(f"error: --data needs a real tokenizer (--vae FlexVAE.pth ...), not {EMBEDDED}")
    if preset != "tiny" and cfg.vae == EMBEDDED and not cfg.cache:
        raise SystemExit(f"error: preset {preset} needs --vae (the tokenizer checkpoint) and --data or --cache")
    if preset != "tiny" and not (cfg.data or cfg.cache):
        raise SystemExit(f"error: preset {preset} needs --data DIR or --cache DIR")
    if preset != "tiny" and not cfg.init:
        raise SystemExit(f"error: preset {preset} post-trains a checkpoint: give --init PATH")
    for name in ("batch_size", "grad_accum", "ckpt_every", "log_every", "max_nonfinite", "keep_last"):
        if getattr(cfg, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("lr", "clip", "weight_decay") + (("pretrain_lr",) if cfg.pretrain_lr is not None else ()):
        if getattr(cfg, name) < 0:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 0")
    if cfg.max_steps is None and cfg.epochs is None:
        raise SystemExit("error: give --max-steps or --epochs")
    if cfg.max_steps is not None and cfg.max_steps < 0:
        raise SystemExit("error: --max-steps must be >= 0")
    if len(cfg.betas) != 2 or not all(0 <= b < 1 for b in cfg.betas):
        raise SystemExit(f"error: --betas must be two numbers in [0, 1), got {cfg.betas}")
    if not cfg.resume in ("auto", "none") and not os.path.isdir(cfg.resume):
        raise SystemExit(f"error: --resume {cfg.resume}: no such checkpoint directory")
    if not cfg.out:
        raise SystemExit("error: --out is required")
    preflight_inputs(cfg)
    try:
        cfg.objective_config()
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def preflight_inputs(cfg: TrainConfig) -> None:
    """Read the headers of every input file before any rank starts work (safe_load.py)."""
    from .models.checkpoint import preflight_checkpoint
    from .models.tokenizers import preflight_tokenizer
    from .safe_load import CheckpointError, exit_once
    try:
        if cfg.init:
            preflight_checkpoint(cfg.init)
        if cfg.vae != EMBEDDED:
            preflight_tokenizer(cfg.vae)
        if cfg.data:
            from .data import scan_image_folder
            scan_image_folder(cfg.data)
        if cfg.cache:
            from .cache import file_sha256
            from .data import check_code_cache
            check_code_cache(cfg.cache, None if cfg.vae == EMBEDDED else file_sha256(cfg.vae))
    except (CheckpointError, ValueError, OSError) as e:  # DataError is a ValueError
        exit_once(f"error: {e}")


# ------------------------------------------------------------------------------- data
class DataSource:
    """Batches of (labels, codes [B, L], schedule) for the local rank, resumable."""

    def __init__(self, cfg: TrainConfig, info: parallel.DistInfo, tokenizer, local_batch: int, num_classes: int):
        from .data import CodeDataset, EmbeddedDigitsDataset, ImageFolderDataset, ResumableDistributedSampler, collate
        self.cfg, self.info, self.tok, self.local_batch = cfg, info, tokenizer, local_batch
        self.num_classes = num_classes
        if cfg.cache:
            self.dataset = CodeDataset(cfg.cache, seed=cfg.seed)
            self.cache_schedule = tuple(self.dataset.cache_schedule)
            check_cache_matches(self.dataset.manifest, cfg, tokenizer)
        elif cfg.data:
            self.dataset = ImageFolderDataset(cfg.data, resolution=cfg.resolution, train=True, seed=cfg.seed,
                                              bad_images=cfg.bad_images)
            self.cache_schedule = None
        else:
            self.dataset = EmbeddedDigitsDataset("train", seed=0)
            self.cache_schedule = None
        self.sampler = ResumableDistributedSampler(len(self.dataset), info.rank, info.world_size, seed=cfg.seed)
        if self.sampler.num_samples < local_batch:
            raise SystemExit(f"error: {len(self.dataset)} samples cannot fill a per-rank batch of {local_batch}")
        self._collate = collate
        self._iter = None

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.num_samples // self.local_batch

    def _loader(self):
        from torch.utils.data import DataLoader
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.sampler.epoch)
        return iter(DataLoader(self.dataset, batch_size=self.local_batch, sampler=self.sampler, drop_last=True,
                               num_workers=self.cfg.workers, collate_fn=self._collate,
                               pin_memory=self.info.device.type == "cuda", persistent_workers=False,
                               # its own generator: the loader must not draw from the global RNG
                               # (label dropout's), or a resumed run would drift from a straight one
                               generator=torch.Generator().manual_seed(self.cfg.seed + self.sampler.epoch)))

    def next(self, step: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
        if self._iter is None:
            self._iter = self._loader()
        if self.sampler.num_samples - self.sampler.position < self.local_batch:  # epoch done
            self.sampler.set_epoch(self.sampler.epoch + 1)
            self._iter = self._loader()
        x, labels = next(self._iter)
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
        return random_flexvar_schedule(random.Random(self.cfg.seed * 1_000_003 + step), last=self.cfg.schedule[-1])

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
        self._iter = None


def check_batch_ranges(labels: torch.Tensor, codes: torch.Tensor | None, num_classes: int, vocab: int) -> None:
    """On the host, before the batch moves to the device: labels in [0, num_classes) and
    cached codes in [0, vocab) (codes the tokenizer makes on the fly are valid by construction)."""
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"a batch holds labels in [{int(labels.min())}, {int(labels.max())}] but the model "
                         f"has {num_classes} classes")
    if codes is not None and codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= vocab):
        raise ValueError(f"a batch holds codes in [{int(codes.min())}, {int(codes.max())}] but the tokenizer "
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
    from .data import schedule_token_index
    return codes.index_select(1, schedule_token_index(cache_schedule, schedule).to(codes.device))


def check_cache_matches(manifest: dict, cfg: TrainConfig, tokenizer) -> None:
    """Refuse codes made by another tokenizer than --vae (they would train silently wrong)."""
    from .cache import file_sha256
    if cfg.vae != EMBEDDED and manifest.get("tokenizer_sha256") != file_sha256(cfg.vae):
        raise SystemExit(f"error: --cache {cfg.cache} was built with tokenizer {manifest.get('tokenizer_path')} "
                         f"but --vae {cfg.vae} is a different file (sha256 differs)")
    if int(manifest.get("vocab_size", -1)) != tokenizer.vocab_size or manifest.get("quant_mode") != tokenizer.mode:
        raise SystemExit(f"error: --cache {cfg.cache} holds {manifest.get('quant_mode')} codes of vocabulary "
                         f"{manifest.get('vocab_size')}, the tokenizer is {tokenizer.mode} with {tokenizer.vocab_size}")


def build_tokenizer(cfg: TrainConfig, device: torch.device):
    if cfg.vae == EMBEDDED:
        from .embedded import GreyLevelTokenizer
        tok = GreyLevelTokenizer()
    else:
        from .models.tokenizers import load_tokenizer
        tok = load_tokenizer(cfg.vae)
    return tok.to(device).eval() if hasattr(tok, "to") else tok


# ------------------------------------------------------------------------------- model
def build_model(cfg: TrainConfig, tokenizer) -> ScaleAR:
    overrides = {"cond_drop_rate": cfg.cond_drop}
    if cfg.drop_path is not None:
        overrides["drop_path_rate"] = cfg.drop_path
    if cfg.init:
        model = load_checkpoint(cfg.init, **overrides)
    else:
        extra = {k: getattr(cfg, k) for k in ("depth", "embed_dim", "num_heads") if getattr(cfg, k) is not None}
        model_cfg = preset_config(cfg.model, vocab_size=tokenizer.vocab_size, code_dim=tokenizer.Cvae,
                                  schedule=cfg.schedule, **extra, **overrides)
        model = ScaleAR(model_cfg)
    if (model.vocab_size, model.code_dim) != (tokenizer.vocab_size, tokenizer.Cvae):
        raise SystemExit(f"error: the model predicts {model.vocab_size} codes of dim {model.code_dim} but the tokenizer "
                         f"has {tokenizer.vocab_size} codes of dim {tokenizer.Cvae}; --init and --vae do not match")
    if tokenizer.mode != model.arch:
        raise SystemExit(f"error: a {model.arch} model needs a {model.arch} tokenizer, got a {tokenizer.mode} one (--vae)")
    return model


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices only: not on biases, norms, position/level tables
    or the attention scale (VAR's no-decay set)."""
    no_decay_names = ("pos_start", "pos_1LC", "lvl_embed", "scale_mul_1H11")
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and not any(k in name for k in no_decay_names) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ------------------------------------------------------------------------------- loop
@dataclass
class LoopState:
    step: int = 0
    nonfinite_total: int = 0
    nonfinite_streak: int = 0


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.info = info = parallel.init_distributed(cfg.device)
        if not dist.is_initialized():  # plain `python -m sar_fast.train`: a 1-rank group
            dist.init_process_group("gloo" if info.device.type == "cpu" else "nccl",
                                     store=dist.HashStore(), rank=0, world_size=1)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.precision = cfg.precision if cfg.precision != "auto" else ("bf16" if info.device.type == "cuda" else "fp32")
        micro = cfg.batch_size // cfg.grad_accum
        if cfg.batch_size % cfg.grad_accum or micro % info.world_size:
            raise SystemExit(f"error: --batch-size {cfg.batch_size} must split evenly into --grad-accum "
                             f"{cfg.grad_accum} micro-batches over {info.world_size} ranks")
        self.local_batch = micro // info.world_size
        self.tok = build_tokenizer(cfg, info.device)
        model = build_model(cfg, self.tok)
        model.check_label_range = False  # DataSource checks every batch on the host instead
        self.data = DataSource(cfg, info, self.tok, self.local_batch, model.num_classes)
        self.model_config: ModelConfig = model.config
        self.num_params = sum(p.numel() for p in model.parameters())
        model.to(info.device)
        self.model = parallel.shard_model(model, info, self.precision, cfg.activation_checkpointing, cfg.compile)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                                           fused=info.device.type == "cuda")
        self.codebook = self.tok.codebook().detach().to(info.device, torch.float32)
        self.phi = self.tok._phi()
        steps_main = cfg.max_steps if cfg.max_steps is not None else math.ceil(cfg.epochs * self.data.steps_per_epoch
                                                                              / cfg.grad_accum)
        self.total_steps = cfg.pretrain_steps + steps_main
        self.ckpt_root = os.path.join(cfg.out, "checkpoints")
        self.state = LoopState()
        self._stop_signal: int | None = None

    # ---------------------------------------------------------------- helpers
    def lr_at(self, step: int) -> float:
        pretraining = step < self.cfg.pretrain_steps and self.cfg.pretrain_lr is not None
        lr = self.cfg.pretrain_lr if pretraining else self.cfg.lr
        if self.cfg.warmup_steps > 0 and step < self.cfg.warmup_steps:
            return lr * (step + 1) / self.cfg.warmup_steps
        return lr

    def objective_at(self, step: int) -> SARConfig:
        return self.cfg.objective_config("tf" if step < self.cfg.pretrain_steps else None)

    def trainer_state(self) -> dict:
        return {"step": self.state.step, "nonfinite_total": self.state.nonfinite_total,
                "data": self.data.state_dict(), "world_size": self.info.world_size,
                "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(self.cfg).items()},
                "model_config": self.model_config.to_dict()}

    def save(self) -> None:
        path = checkpointing.save_checkpoint(self.ckpt_root, self.state.step, self.model, self.optimizer,
                                             self.trainer_state(), self.info, self.cfg.keep_last)
        if self.cfg.export:
            full = checkpointing.full_model_state(self.model)
            if self.info.is_main:
                save_export(full, os.path.join(self.cfg.out, "export.pth"), config=self.model_config)
        self.write_samples()
        if self.info.is_main:
            logs.plot_losses(os.path.join(self.cfg.out, "metrics.jsonl"), os.path.join(self.cfg.out, "loss.png"))
            print(f"[sar_fast] step {self.state.step}: checkpoint {path}", file=sys.stderr, flush=True)

    def resume(self) -> None:
        path = checkpointing.resolve_resume(self.cfg.resume, self.ckpt_root)
        if path is None:
            return
        state = checkpointing.load_checkpoint(path, self.model, self.optimizer, self.info)
        self.state.step, self.state.nonfinite_total = state["step"], state.get("nonfinite_total", 0)
        if state.get("world_size") == self.info.world_size:
            self.data.load_state_dict(state["data"])
        else:  # a different rank count cannot continue the same shards: restart the epoch order
            epoch = state["data"]["epoch"]
            self.data.sampler.set_epoch(epoch + 1)
        if self.info.is_main:
            print(f"[sar_fast] resumed from {path} at step {self.state.step}", file=sys.stderr, flush=True)

    @torch.no_grad()
    def write_samples(self) -> None:
        n = self.cfg.num_samples
        if n <= 0:
            return
        labels = (torch.arange(n, device=self.info.device) % self.model_config.num_classes)
        out = self.model.generate(self.codebook, labels, self.cfg.schedule, cfg=self.cfg.sample_cfg,
                                  cfg_ramp="linear", top_k=self.cfg.sample_top_k, top_p=self.cfg.sample_top_p,
                                  seed=self.cfg.seed, phi=self.phi)
        if self.info.is_main:
            images = self.tok.decode(out.codes)
            folder = os.path.join(self.cfg.out, "samples")
            os.makedirs(folder, exist_ok=True)
            grid = logs.image_grid(images, nrow=min(10, n))
            logs.write_png(os.path.join(folder, f"step_{self.state.step:08d}.png"), grid)
            logs.write_png(os.path.join(self.cfg.out, "samples.png"), grid)

    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum

    # ---------------------------------------------------------------- the loop
    def run(self) -> None:
        cfg, info = self.cfg, self.info
        if info.is_main:
            os.makedirs(cfg.out, exist_ok=True)
            with open(os.path.join(cfg.out, "config.json"), "w") as f:
                json.dump(self.trainer_state()["config"], f, indent=1)
        self.resume()
        signal.signal(signal.SIGTERM, self._on_signal)
        metrics_log = logs.JsonlLogger(os.path.join(cfg.out, "metrics.jsonl")) if info.is_main else None
        progress = logs.Progress(self.total_steps, self.state.step, enabled=info.is_main and cfg.progress)
        gpu = logs.GpuMonitor(info.device)
        peak = logs.peak_flops(info.device)
        mc = self.model_config
        t_last, imgs_since, tokens_since, flops_since = time.time(), 0, 0, 0.0
        try:
            while self.state.step < self.total_steps:
                step = self.state.step
                for group in self.optimizer.param_groups:
                    group["lr"] = self.lr_at(step)
                objective = self.objective_at(step)
                sums = torch.zeros(4, device=info.device)  # loss, tf, csf, nonfinite
                scale_stats = None
                logging = (step + 1) % cfg.log_every == 0 or step + 1 == self.total_steps
                for micro in range(cfg.grad_accum):
                    labels, codes, schedule = self.data.next(step)
                    last = micro == cfg.grad_accum - 1
                    self.model.set_requires_gradient_sync(last)
                    out = sar_step(self.model, labels, codes, schedule, self.codebook, objective, step=step,
                                   phi=self.phi)
                    finite = torch.isfinite(out.loss)
                    (torch.where(finite, out.loss, torch.zeros_like(out.loss)) / cfg.grad_accum).backward()
                    m = out.metrics
                    sums += torch.stack([m["loss"], m.get("tf_loss", m.get("sf_loss", m["loss"])),
                                         m.get("csf_loss", torch.zeros_like(m["loss"])), (~finite).float()]) \
                        .nan_to_num(0.0, 0.0, 0.0) / cfg.grad_accum
                    if logging:  # per-scale statistics only for the steps that are logged
                        stats = out.scale_stats
                        scale_stats = stats if scale_stats is None or scale_stats.shape != stats.shape \
                            else scale_stats + stats
                    L = total_length(schedule)
                    passes = 3.0 + (3.0 if objective.objective != "tf" else 0.0)  # rough: TF fwd+bwd (+ SF)
                    flops_since += passes * logs.flops_per_token(mc.depth, mc.embed_dim, mc.vocab_size, mc.mlp_ratio,
                                                                 logs.mean_visible_keys(schedule)) * L * len(labels)
                    tokens_since += L * len(labels)
                    imgs_since += len(labels)
                stop_flag = torch.tensor([float(self._stop_signal is not None)], device=info.device)
                reduced = parallel.all_reduce_sum(torch.cat([sums, stop_flag]))
                nonfinite = bool(reduced[3] > 0)
                if nonfinite:  # skip: no update from a step whose loss is not finite on some rank
                    self.optimizer.zero_grad(set_to_none=True)
                    self.state.nonfinite_total += 1
                    self.state.nonfinite_streak += 1
                    grad_norm = torch.tensor(float("nan"))
                else:
                    grad_norm = parallel.clip_grad_norm(self.model, cfg.clip)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.state.nonfinite_streak = 0
                self.state.step += 1
                avg = reduced[:3] / info.world_size

                if logging:
                    dt = max(time.time() - t_last, 1e-9)
                    world_imgs = imgs_since * info.world_size
                    record = {"step": self.state.step, "objective": objective.objective,
                              "loss": float(avg[0]), "tf_loss": float(avg[1]),
                              "csf_loss": float(avg[2]) if objective.objective in ("sar", "official") else None,
                              "grad_norm": float(grad_norm), "lr": self.lr_at(step),
                              "img_per_s": world_imgs / dt, "tokens_per_s": tokens_since * info.world_size / dt,
                              "mfu": (flops_since / dt / peak) if peak else None,
                              "nonfinite_total": self.state.nonfinite_total, "schedule": list(schedule),
                              "skipped_images": getattr(self.data.dataset, "num_skipped", 0)}
                    if scale_stats is not None:
                        st = parallel.all_reduce_sum(scale_stats.clone()).cpu()
                        for s, (ce, correct, count) in zip(schedule, st.tolist()):
                            record[f"loss_s{s}"] = ce / max(count, 1)
                            record[f"acc_s{s}"] = correct / max(count, 1)
                    if info.device.type == "cuda":
                        record["peak_mem_gb"] = torch.cuda.max_memory_allocated(info.device) / 2**30
                        record.update(gpu.read())
                    if metrics_log:
                        metrics_log.write(record)
                    t_last, imgs_since, tokens_since, flops_since = time.time(), 0, 0, 0.0
                    progress.update(self.state.step - progress.n, loss=record["loss"], img_s=record["img_per_s"])
                if self.state.nonfinite_streak >= cfg.max_nonfinite:
                    self.save()
                    raise RuntimeError(f"{self.state.nonfinite_streak} non-finite losses in a row at step "
                                       f"{self.state.step} (lr {self.lr_at(step):g}); checkpoint written to "
                                       f"{self.ckpt_root}. Lower --lr or check the data, then --resume auto.")
                if bool(reduced[4] > 0):
                    self.save()
                    if info.is_main:
                        print(f"[sar_fast] signal received: checkpointed at step {self.state.step}, exiting",
                              file=sys.stderr, flush=True)
                    return
                if self.state.step % cfg.ckpt_every == 0 or self.state.step == self.total_steps:
                    self.save()
        finally:
            progress.close()
            if metrics_log:
                metrics_log.close()


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(argv)
    trainer = Trainer(cfg)
    try:
        trainer.run()
    except BaseException:
        parallel.shutdown(clean=False)
        raise
    parallel.shutdown(clean=True)


if __name__ == "__main__":
    main()
