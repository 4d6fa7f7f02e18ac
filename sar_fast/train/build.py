"""The model a run trains (from --init or a preset sized to the tokenizer, built on rank 0
only for a multi-rank start) and its optimiser with parameter groups."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ..models import ScaleAR, load_checkpoint, preset_config
from ..models.tokenizers import check_model_fits_tokenizer
from .config import OptimConfig


def build_run_model(args, schedule: Sequence[int], tokenizer: nn.Module) -> ScaleAR:
    """The model a run trains (`args`: sar_fast.train.config.ModelArgs): the --init checkpoint, or
    a fresh model of the --model preset sized to the tokenizer."""
    overrides = {"cond_drop_rate": args.cond_drop}
    if args.drop_path is not None:
        overrides["drop_path_rate"] = args.drop_path
    if args.init:
        model = load_checkpoint(args.init, **overrides)
    else:
        extra = {k: getattr(args, k) for k in ("depth", "embed_dim", "num_heads") if getattr(args, k) is not None}
        model = ScaleAR(preset_config(args.name, vocab_size=tokenizer.vocab_size, code_dim=tokenizer.Cvae,
                                      schedule=schedule, **extra, **overrides))
    check_model_fits_tokenizer(model, tokenizer, "--init" if args.init else "--model")
    return model


def build_run_model_rank0(args, schedule: Sequence[int], tokenizer: nn.Module, info) -> tuple[ScaleAR, dict | None]:
    """The run's model for a multi-rank start: with --init, only rank 0 reads the file and
    holds the full fp32 weights (returned as a state dict, to be broadcast into the shards
    by `parallel.load_full_state`); every other rank builds the model on the meta device
    (no memory) from the config rank 0 broadcasts. Without --init, or on one rank, the
    model of `build_run_model` (and None)."""
    from ..models import ModelConfig
    from . import parallel
    if not args.init or info.world_size == 1:
        return build_run_model(args, schedule, tokenizer), None
    full, config = None, None
    if info.is_main:
        full = build_run_model(args, schedule, tokenizer)
        config = full.config.to_dict()
    config = parallel.broadcast_object(config)
    with torch.device("meta"):
        model = ScaleAR(ModelConfig(**config))
    check_model_fits_tokenizer(model, tokenizer, "--init")
    return model, (full.state_dict() if full is not None else {})


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices only: not on biases, norms, position/level tables
    or the attention scale (VAR's no-decay set)."""
    no_decay_names = ("pos_start", "pos_1LC", "lvl_embed", "scale_mul_1H11")
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and not any(k in name for k in no_decay_names) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, optim: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW at the objective's --lr (the trainer sets each step's rate), fused (CUDA and
    CPU): one kernel, no per-parameter host reads of the step count, and `found_inf`
    skips a non-finite step on the device."""
    return torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=optim.lr, betas=optim.betas,
                             fused=True)
