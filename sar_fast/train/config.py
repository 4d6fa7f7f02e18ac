"""The trainer's configuration: sections of dataclasses whose fields carry their help text,
presets as data, the command line generated from both, and the checks that run before
any process group or model exists.

Each section is one `--help` group; each field one flag, named after the field unless
its metadata says `flag`. The objective is sar_fast.sar.SARConfig itself, nested as it is.
A preset names section -> field -> value; the flags given override it; the dataclass
defaults fill the rest.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field, fields, replace
from typing import Any

from ..data.digits import DIGITS_SCHEDULE
from ..models.tokenizers.grey import EMBEDDED
from ..sar import OFFICIAL, SARConfig
from ..schedules import STANDARD_SCHEDULE, Schedule, parse_schedule

# what torch reports as total memory of the GPUs sold as 80 GB (H100/A100) and 141 GB (H200)
GPU_GIB = {"80": 79.2, "141": 139.8}


def option(default: Any, help: str, **cli: Any) -> Any:
    """A config field and its flag: `help` for --help; `choices`, `parse` (the argparse type),
    `flag` (another name) and `group` (another --help group) when needed."""
    return field(default=default, metadata={"help": help, **cli})


def parse_betas(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 0.9,0.95, got {text!r}") from None


@dataclass
class RunConfig:
    out: str = option("", "run directory (checkpoints/, metrics.jsonl, loss.png, samples/)")
    seed: int = option(0, "seed of data order, init, sampling")
    device: str = option("auto", "where to train (auto: CUDA when available)", choices=("auto", "cuda", "cpu"))


@dataclass
class ModelArgs:
    init: str | None = option(None, "initial weights: FlexVAR/SAR ar-ckpt-*.pth, flat state dict, VAR var_d*.pth, "
                                    "or a sar_fast export; a .pth, .safetensors, sharded *.safetensors.index.json "
                                    "or hf://OWNER/REPO/FILE[@REVISION] (through the HF cache); architecture "
                                    "inferred from the weights")
    name: str = option("flexvar-tiny", "model preset for a from-scratch model (flexvar-d16, var-d24, flexvar-tiny, "
                                       "...)", flag="--model")
    depth: int | None = option(None, "from-scratch model: number of blocks")
    embed_dim: int | None = option(None, "from-scratch model: width")
    num_heads: int | None = option(None, "from-scratch model: attention heads")
    cond_drop: float = option(0.1, "label dropout to the null class (classifier-free guidance)")
    drop_path: float | None = option(None, "stochastic depth rate (default: the checkpoint's/preset's)")


@dataclass
class DataConfig:
    folder: str | None = option(None, "ImageNet-style folder (class sub-folders); tokenised on the fly with --vae",
                                flag="--data")
    cache: str | None = option(None, "code cache from `python -m sar_fast.cache` (read instead of running the VAE)")
    vae: str = option(EMBEDDED, f"tokenizer checkpoint (FlexVAE.pth, vae_ch160v4096z32.pth, their .safetensors "
                                f"conversions, or an hf:// id of one) or {EMBEDDED}")
    resolution: int = option(256, "image side for --data")
    schedule: Schedule = option(STANDARD_SCHEDULE, "scale sides, e.g. 1,2,3,4,5,6,8,10,13,16 or 'standard'",
                                       parse=parse_schedule)
    random_schedules: bool = option(False, "FlexVAR's random schedule every step (FlexVAR models; needs on-the-fly "
                                           "tokenisation or a cache holding every side)")
    workers: int = option(2, "data loader workers per rank")
    bad_images: str = option("skip", "empty/unreadable/corrupt images in --data: skip a handful (counted in the log "
                                     "and in metrics.jsonl as skipped_images; more than 10 and 1%% of the folder is "
                                     "an error) or stop with an error", choices=("skip", "error"))

    def __post_init__(self) -> None:
        self.schedule = Schedule(self.schedule, name="--schedule")


@dataclass
class OptimConfig:
    # listed with the objective in --help: it says when the objective starts
    pretrain_steps: int = option(0, "teacher-forcing steps before the objective", group="objective (sar_fast.sar)")
    batch_size: int = option(768, "global batch per optimiser step (split over ranks and --grad-accum)")
    grad_accum: int = option(1, "micro-batches per optimiser step")
    lr: float = option(1e-4, "learning rate of the objective's steps (constant after warm-up)")
    pretrain_lr: float | None = option(None, "learning rate of the --pretrain-steps phase (default: --lr)")
    weight_decay: float = option(0.05, "AdamW decay on weight matrices only")
    betas: tuple[float, ...] = option((0.9, 0.95), "AdamW betas, e.g. 0.9,0.95", parse=parse_betas)
    warmup_steps: int = option(0, "linear warm-up, then constant")
    clip: float = option(2.0, "gradient-norm clipping (0 = off)")
    max_steps: int | None = option(None, "optimiser steps of the objective (after --pretrain-steps)")
    epochs: float | None = option(None, "alternative to --max-steps: passes over the data")


@dataclass
class SystemConfig:
    precision: str = option("auto", "FSDP parameter dtype (reduction in fp32)", choices=("auto", "bf16", "fp32"))
    activation_checkpointing: bool = option(False, "recompute each block's activations in the backward pass "
                                                   "(less memory, more compute)")
    compile: bool = option(False, "torch.compile every block")
    deterministic: bool = option(False, "bit-identical runs: the fused ops launch their first admitted config "
                                        "and split by vocabulary size only (no autotuning; also "
                                        "$SAR_FAST_DETERMINISTIC=1 or torch.use_deterministic_algorithms)")
    reshard: str = option("step", "FSDP communication per optimiser step: 'step' gathers each block once and "
                                  "reduce-scatters its gradient once (weights + fp32 grads unsharded during the "
                                  "step, as DDP); 'pass' reshards after every forward/backward (least memory, "
                                  "~5 all-gathers + 2 reduce-scatters per block)", choices=("step", "pass"))
    replicas: int = option(1, "HSDP: replicate over this many groups of ranks (one per node), shard within a "
                              "group; 1 = shard over all ranks")
    startup_timeout: float = option(1800.0, "collective timeout in seconds until the first step is done "
                                           "(loading, compilation, warm-up)")
    collective_timeout: float = option(300.0, "collective timeout in seconds after the first step (a hung rank "
                                              "fails the run this soon)")
    estimate_memory: bool = option(False, "print the per-rank peak memory of one step of this config on "
                                          "--estimate-ranks GPUs (fake tensors: no GPU, data or checkpoint needed) "
                                          "and exit")
    estimate_ranks: int = option(8, "ranks --estimate-memory assumes")
    gpu_memory: float = option(GPU_GIB["80"], f"GiB per GPU --estimate-memory checks against ({GPU_GIB['80']}: an "
                                              f"80 GB H100; {GPU_GIB['141']}: H200)")


@dataclass
class CheckpointConfig:
    ckpt_every: int = option(1000, "steps between sharded checkpoints")
    keep_last: int = option(3, "checkpoints kept")
    resume: str = option("auto", "auto (newest in --out), none, or a checkpoint directory")
    export: bool = option(True, "at the end of the run, a flat state dict the original FlexVAR/VAR code loads "
                                "(export.pth) and the same tensors as export.safetensors")
    extras_every_ckpt: bool = option(False, "also write the export, the sample grid and loss.png with every "
                                            "periodic checkpoint (default: only at the end; never on SIGTERM)")
    async_save: bool = option(True, "write checkpoints in the background (torch.distributed.checkpoint "
                                    "async_save); the next save and the exit wait for it")
    log_every: int = option(10, "steps between records in metrics.jsonl")
    num_samples: int = option(16, "images in each sample grid")
    sample_cfg: float = option(2.0, "guidance for the sample grids")
    sample_top_k: int = option(0, "top-k of the sample grids (0 = off)")
    sample_top_p: float = option(0.0, "top-p of the sample grids (0 = off)")
    progress: bool = option(True, "rank-0 progress bar")
    max_nonfinite: int = option(20, "non-finite steps in a row before checkpoint + abort")


def section(cls: type, title: str) -> Any:
    return field(default_factory=cls, metadata={"group": title})


@dataclass
class TrainConfig:
    run: RunConfig = section(RunConfig, "run")
    model: ModelArgs = section(ModelArgs, "model")
    data: DataConfig = section(DataConfig, "data")
    objective: SARConfig = section(SARConfig, "objective (sar_fast.sar)")
    optim: OptimConfig = section(OptimConfig, "optimisation")
    system: SystemConfig = section(SystemConfig, "system")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "checkpoints and logs")

    def __post_init__(self) -> None:
        self.objective = replace(self.objective, seed=self.run.seed)  # SSR draws from the run's one seed

    def to_dict(self) -> dict:
        """JSON-ready (tuples as lists), section by section."""
        def plain(v):
            return [plain(x) for x in v] if isinstance(v, (tuple, list)) else \
                {k: plain(x) for k, x in v.items()} if isinstance(v, dict) else v
        return plain(dataclasses.asdict(self))


PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # The embedded default: digits + grey levels, a ~0.2M-parameter FlexVAR-style model.
    "tiny": {
        "run": dict(out="runs/tiny"),
        "model": dict(name="flexvar-tiny", depth=3, embed_dim=96, num_heads=4),
        "data": dict(vae=EMBEDDED, schedule=DIGITS_SCHEDULE, workers=0),
        "objective": dict(objective="sar", transitions="all", sampling="cfg", gamma=0.1, cfg=1.2, top_k=0, top_p=0.96),
        "optim": dict(pretrain_steps=300, max_steps=150, batch_size=64, pretrain_lr=1e-3, lr=3e-4, warmup_steps=20,
                      clip=2.0),
        "checkpoint": dict(ckpt_every=150, keep_last=2, log_every=10, num_samples=20, sample_cfg=1.5),
    },
}
# Micro-batches per step so that one step fits an 80 GB GPU with 10% headroom on 8 GPUs
# (96 samples x 680 tokens per GPU; `python -m sar_fast.memory` / --estimate-memory, table in
# bench/RESULTS.md): accumulation rather than activation checkpointing while a micro-batch
# keeps >= 16 samples per GPU. A 141 GB GPU needs about half as many (--grad-accum).
GRAD_ACCUM_8X80GB = {16: 2, 20: 3, 24: 4, 30: 6}
for _d in (16, 20, 24, 30):  # SAR on a user's checkpoint with the public SAR code's settings
    for _arch, _extra in (("flexvar", dict(random_schedules=True)), ("var", {})):
        PRESETS[f"{_arch}-d{_d}"] = {
            "run": dict(out=f"runs/sar-{_arch}-d{_d}"), "model": dict(name=f"{_arch}-d{_d}"), "data": _extra,
            "objective": dict(OFFICIAL, objective="sar"),
            "optim": dict(batch_size=768, epochs=10, grad_accum=GRAD_ACCUM_8X80GB[_d])}


# ------------------------------------------------------------------------------- generation
def sections() -> list[tuple[str, type, str]]:
    """(field name, dataclass, --help group) of each section of TrainConfig, in order."""
    hints = typing.get_type_hints(TrainConfig)
    return [(f.name, hints[f.name], f.metadata["group"]) for f in fields(TrainConfig)]


def flag_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of a section that are flags (SARConfig.seed is the run's --seed)."""
    return [f for f in fields(cls) if f.metadata.get("cli", True)]


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def dest(f: dataclasses.Field) -> str:
    """The argparse destination of a field's flag (argparse's own rule)."""
    return flag_name(f)[2:].replace("-", "_")


def _argparse_kind(f: dataclasses.Field, annotation: Any) -> dict[str, Any]:
    args = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else ()
    base = next(a for a in args if a is not type(None)) if args else annotation
    if base is bool:
        return {"action": argparse.BooleanOptionalAction}
    if "choices" in f.metadata:
        return {"choices": f.metadata["choices"]}
    if "parse" in f.metadata:
        return {"type": f.metadata["parse"]}
    if base in (int, float):
        return {"type": base}
    if base is str:
        return {}
    raise TypeError(f"field {f.name}: give a `parse` function for type {annotation}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="torchrun [--nproc_per_node N] -m sar_fast.train",
        description="SAR post-training (and teacher-forcing training) of FlexVAR/VAR models on FSDP2. "
                    "Every option overrides the chosen preset.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, argument_default=argparse.SUPPRESS)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, cls, title in sections():
        if title not in groups:
            groups[title] = p.add_argument_group(title)
        if name == "run":
            groups[title].add_argument(
                "--preset", default="tiny", choices=sorted(PRESETS),
                help="tiny: embedded digits on a CPU in minutes; flexvar-d*/var-d*: SAR on a user's checkpoint "
                     "with the public SAR settings (need --init, --vae and --data or --cache)")
        hints = typing.get_type_hints(cls)
        for f in flag_fields(cls):
            group = groups[f.metadata.get("group", title)]
            group.add_argument(flag_name(f), help=f.metadata["help"], **_argparse_kind(f, hints[f.name]))
    return p


def check_preset(name: str, values: dict[str, dict[str, Any]]) -> None:
    """A preset may name only sections and flag fields that exist."""
    known = {sec: (cls, {f.name for f in flag_fields(cls)}) for sec, cls, _ in sections()}
    for sec, entries in values.items():
        if sec not in known:
            raise ValueError(f"preset {name!r}: no config section {sec!r} (sections: {sorted(known)})")
        unknown = sorted(set(entries) - known[sec][1])
        if unknown:
            raise ValueError(f"preset {name!r}: {known[sec][0].__name__} has no flag field {unknown}")


for _name, _values in PRESETS.items():
    check_preset(_name, _values)


def resolve(preset: dict[str, dict[str, Any]], flags: dict[str, Any]) -> TrainConfig:
    """The config of a preset overridden by parsed flags (argparse destinations -> values)."""
    built = {}
    for name, cls, _ in sections():
        values = dict(preset.get(name, {}))
        values.update({f.name: flags[dest(f)] for f in flag_fields(cls) if dest(f) in flags})
        try:
            built[name] = cls(**values)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    return TrainConfig(**built)


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Preset defaults, overridden by the flags given; validated before any work."""
    ns = vars(build_parser().parse_args(argv))
    preset = ns.pop("preset", "tiny")
    cfg = resolve(PRESETS[preset], ns)
    validate(cfg, preset)
    return cfg


def validate(cfg: TrainConfig, preset: str) -> None:
    """Fail fast, naming the flag, before any process group or model exists."""
    from ..cli import InputError, require_weights_file

    def need_dir(flag: str, path: str | None) -> None:
        if path is not None and not os.path.isdir(path):
            raise InputError(f"error: {flag} {path}: " + ("not a directory" if os.path.exists(path)
                                                          else "no such directory"))

    data, optim, ckpt = cfg.data, cfg.optim, cfg.checkpoint
    if cfg.system.estimate_memory:  # shapes only: no files needed
        if cfg.system.estimate_ranks < 1 or cfg.system.gpu_memory <= 0:
            raise SystemExit("error: --estimate-ranks must be >= 1 and --gpu-memory > 0")
        return
    if cfg.model.init is not None:  # hf:// ids are fetched here, before any process group (hub.py)
        require_weights_file("--init", cfg.model.init)
    need_dir("--data", data.folder)
    need_dir("--cache", data.cache)
    if data.vae != EMBEDDED:
        require_weights_file("--vae", data.vae, EMBEDDED)
    if data.folder and data.cache:
        raise SystemExit("error: give --data or --cache, not both")
    if data.vae == EMBEDDED and data.folder:
        raise SystemExit(f"error: --data needs a real tokenizer (--vae FlexVAE.pth ...), not {EMBEDDED}")
    if preset != "tiny" and data.vae == EMBEDDED and not data.cache:
        raise SystemExit(f"error: preset {preset} needs --vae (the tokenizer checkpoint) and --data or --cache")
    if preset != "tiny" and not (data.folder or data.cache):
        raise SystemExit(f"error: preset {preset} needs --data DIR or --cache DIR")
    if preset != "tiny" and not cfg.model.init:
        raise SystemExit(f"error: preset {preset} post-trains a checkpoint: give --init PATH")
    for section_cfg, names in ((optim, ("batch_size", "grad_accum")),
                               (ckpt, ("ckpt_every", "log_every", "max_nonfinite", "keep_last"))):
        for name in names:
            if getattr(section_cfg, name) < 1:
                raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1, got {getattr(section_cfg, name)}")
    if cfg.system.replicas < 1:
        raise SystemExit(f"error: --replicas must be >= 1, got {cfg.system.replicas}")
    if cfg.system.startup_timeout <= 0 or cfg.system.collective_timeout <= 0:
        raise SystemExit("error: --startup-timeout and --collective-timeout must be > 0 seconds")
    for name in ("lr", "clip", "weight_decay") + (("pretrain_lr",) if optim.pretrain_lr is not None else ()):
        if getattr(optim, name) < 0:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 0")
    if optim.max_steps is None and optim.epochs is None:
        raise SystemExit("error: give --max-steps or --epochs")
    if optim.max_steps is not None and optim.max_steps < 0:
        raise SystemExit("error: --max-steps must be >= 0")
    if len(optim.betas) != 2 or not all(0 <= b < 1 for b in optim.betas):
        raise SystemExit(f"error: --betas must be two numbers in [0, 1), got {optim.betas}")
    if cfg.checkpoint.resume not in ("auto", "none") and not os.path.isdir(cfg.checkpoint.resume):
        raise InputError(f"error: --resume {cfg.checkpoint.resume}: no such checkpoint directory")
    if not cfg.run.out:
        raise SystemExit("error: --out is required")
    preflight_inputs(cfg)


def preflight_inputs(cfg: TrainConfig) -> None:
    """Read the headers of every input file before any rank starts work (safe_load.py), so a
    bad file is one message from rank 0 and a non-zero exit on every rank, not a hang."""
    from ..data.codes import check_code_cache
    from ..data.images import scan_image_folder
    from ..models.checkpoint import preflight_checkpoint, weights_sha256
    from ..models.tokenizers import preflight_tokenizer
    from ..safe_load import CheckpointError, exit_once
    data = cfg.data
    try:
        if cfg.model.init:
            preflight_checkpoint(cfg.model.init)
        if data.vae != EMBEDDED:  # a codebook-only tokenizer has no images: a cache, no sample grids
            preflight_tokenizer(data.vae, images=not data.cache or cfg.checkpoint.num_samples > 0)
        if data.folder:
            scan_image_folder(data.folder)
        if data.cache:
            check_code_cache(data.cache, None if data.vae == EMBEDDED else weights_sha256(data.vae))
    except (CheckpointError, ValueError, OSError) as e:  # DataError is a ValueError
        exit_once(f"error: {e}")
