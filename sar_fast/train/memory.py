"""Per-rank peak memory of a training step, without a GPU.

One optimiser step of the real code (FSDP2 sharding, the SAR objective with its fused
Triton ops, AdamW) runs on fake CUDA tensors (FakeTensorMode: shapes and dtypes, no data)
over a fake process group of the assumed number of ranks, under torch's memory tracker
(torch.distributed._tools.MemTracker: live tensor storages, FSDP2's resizes included). The
Triton ops run as their registered fake implementations, which allocate
what the kernels return; their transient buffers are added by hand (the fused loss's
backward workspace). One step runs; AdamW's states, which every later step carries, are
added to its peak. `torchrun -m sar_fast.train --preset P --estimate-memory` prints it; `fit` picks
activation checkpointing and micro-batches for a GPU size.

What the tracker cannot see: the CUDA context and NCCL buffers (OVERHEAD_GIB) and the
caching allocator's fragmentation (the 10% headroom of `fit`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from ..schedules import Schedule
from .config import GPU_GIB

GIB = 1024 ** 3
OVERHEAD_GIB = 1.5   # CUDA context + NCCL communicators and buffers, per rank
HEADROOM = 0.10      # allocator fragmentation and spikes the tracker cannot see
GRAD_ACCUMS = (1, 2, 3, 4, 6, 8, 12, 16)


@dataclass
class Estimate:
    peak_gib: float            # tracked peak of one step (parameters, gradients, optimiser, activations)
    params_gib: float          # sharded parameters (fp32 master copy) on this rank
    optimizer_gib: float       # AdamW states on this rank
    micro_batch: int           # per-rank samples in one micro-batch
    grad_accum: int
    activation_checkpointing: bool
    reshard: str = "step"      # the FSDP communication policy (--reshard) the step ran with

    @property
    def total_gib(self) -> float:
        """Peak plus what the tracker cannot see (CUDA context, NCCL)."""
        return self.peak_gib + OVERHEAD_GIB

    def fits(self, gpu_gib: float) -> bool:
        return self.total_gib <= (1.0 - HEADROOM) * gpu_gib


def estimate(cfg, world_size: int = 8, grad_accum: int | None = None,
             activation_checkpointing: bool | None = None, schedule: Sequence[int] | None = None,
             fake: bool = True, reshard: str | None = None) -> Estimate:
    """Peak memory per rank of one step of `cfg` (a sar_fast.train.config.TrainConfig) on
    `world_size` GPUs; grad_accum / activation_checkpointing / reshard override the config's.
    The step is driven as Trainer.train_step drives it (parallel.begin_step,
    set_micro_batch, reduce_gradients), so the 'step' policy's unsharded weights and
    gradients are counted where they are alive.
    fake=False runs the same step for real on the CPU (1 rank, Triton's interpreter, fp32
    parameters only): the measurement the fake estimate is tested against."""
    from .. import ops
    from ..models import ModelConfig, ScaleAR, preset_config
    from . import parallel

    accum = cfg.optim.grad_accum if grad_accum is None else grad_accum
    ac = cfg.system.activation_checkpointing if activation_checkpointing is None else activation_checkpointing
    reshard = cfg.system.reshard if reshard is None else reshard
    if cfg.optim.batch_size % (accum * world_size):
        raise ValueError(f"batch size {cfg.optim.batch_size} does not split into {accum} micro-batches "
                         f"over {world_size} ranks")
    micro = cfg.optim.batch_size // (accum * world_size)
    schedule = Schedule(schedule or cfg.data.schedule)
    mcfg = _model_config(cfg, schedule, ModelConfig, preset_config)
    precision = "bf16" if cfg.system.precision in ("auto", "bf16") else "fp32"
    # fake CPU tensors: FSDP2 on a fake CUDA device would ask the driver for streams; byte
    # counts do not depend on the device, and the Triton ops still run as their fakes
    device = torch.device("cpu")
    L = schedule.total
    if not fake and (world_size != 1 or precision != "fp32"):
        raise ValueError("a real CPU measurement runs 1 rank in fp32 (the interpreter has no bf16)")
    with parallel.local_world(world_size, fake), ops.use_backend("kernel"), _sm_count():
        with torch.device("meta"):  # no values needed: shard on meta, then fake CUDA storage
            model = ScaleAR(mcfg)
        info = parallel.DistInfo(0, world_size, 0, device)
        model = parallel.shard_model(model, info, precision, ac, compile_blocks=False, reshard=reshard)
        # entered with `with`: an exception inside must not leave fake mode on for the process
        with _fake_tensor_mode() if fake else contextlib.nullcontext():
            peak, n_params = _tracked_step(model, cfg, mcfg, micro, L, accum, schedule, device, fake)
        # one step (half the time): AdamW's two fp32 states, created by this first step,
        # live through every later step's peak, so they are added to it
        peak += 8 * n_params // world_size
    # the fused loss's backward writes grad-logit chunks into a bounded workspace the fakes do not allocate
    from sar_fast.kernels import cross_entropy as kern
    itemsize = 2 if precision == "bf16" else 4
    workspace = kern._chunk_rows(micro * L, mcfg.vocab_size, itemsize) * mcfg.vocab_size * itemsize if fake else 0
    return Estimate(peak_gib=(peak + workspace) / GIB, params_gib=4 * n_params / world_size / GIB,
                    optimizer_gib=8 * n_params / world_size / GIB, micro_batch=micro, grad_accum=accum,
                    activation_checkpointing=ac, reshard=reshard)


def _fake_tensor_mode():
    """Torch's fake tensors (shapes, dtypes and devices, no storage). Only a private module
    provides them in torch 2.11 and 2.14 (torch._subclasses.fake_tensor; torch.compile uses
    it): fenced here, with a clear error if a release moves it."""
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode
    except ImportError as e:
        raise RuntimeError(f"torch {torch.__version__} has no torch._subclasses.fake_tensor: the memory "
                           "estimate cannot run its fake step") from e
    return FakeTensorMode(allow_non_fake_inputs=True)


def _memory_tracker():
    """Torch's tracker of live tensor storages by module (FSDP2's storage resizes included).
    No public API counts them (torch.cuda.memory_stats needs a real GPU and sees no fake
    tensors); torch 2.11 and 2.14 keep it in torch.distributed._tools.mem_tracker. Fenced
    here, with a clear error if a release moves it."""
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError as e:
        raise RuntimeError(f"torch {torch.__version__} has no torch.distributed._tools.mem_tracker: the memory "
                           "estimate cannot track the step") from e
    return MemTracker()


def _tracked_step(model, cfg, mcfg, micro, L, accum, schedule, device, fake) -> tuple[int, int]:
    """(tracked peak bytes, parameter count) of one optimiser step of the sharded `model`,
    driven as Trainer.train_step drives it."""
    from . import parallel
    from .build import build_optimizer
    model.to_empty(device=device)
    if not fake:  # real values after to_empty (the meta model's tables hold garbage)
        with torch.no_grad():
            for p in model.parameters():
                torch.nn.init.normal_(p, std=0.02)
    model.set_label_range_check(False)
    optimizer = build_optimizer(model, cfg.optim, torch.device("cuda"))  # fused AdamW, as on the GPU
    codebook = torch.randn(mcfg.vocab_size, mcfg.code_dim, device=device)
    labels = torch.zeros(micro, dtype=torch.long, device=device)
    codes = torch.zeros(micro, L, dtype=torch.long, device=device)
    # MemTracker refuses a top-level module called twice (SAR calls the root 3x per step):
    # the step runs inside a wrapper module whose stats are reset before each call
    tracker = _memory_tracker()
    tracker.track_external(model, optimizer)
    step_module = _Step(model, cfg.objective)
    with tracker:
        parallel.begin_step(model)
        for m in range(accum):
            parallel.set_micro_batch(model, last=m == accum - 1)
            tracker.reset_mod_stats()
            step_module(labels, codes, schedule, codebook, 0).backward()
        parallel.reduce_gradients(model)
        # read before the optimiser step: fused AdamW updates in place and its states are added
        # by the caller, while DTensor's dispatch of the fused op on fake tensors allocates fake
        # copies of parameters, gradients and states (4x the shards on a plain 4-layer FSDP
        # model), which the GPU never holds: on every step in torch 2.11, on a process's first
        # in 2.14. Counting them made the estimate depend on the release and on what ran before.
        peak = tracker.get_tracker_snapshot("peak")[device]["Total"]
        optimizer.step()
    return peak, sum(p.numel() for p in model.parameters())


class _Step(torch.nn.Module):
    def __init__(self, model, objective):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, labels, codes, schedule, codebook, step):
        from ..sar import sar_step
        return sar_step(self.model, labels, codes, schedule, codebook, self.objective, step=step).loss


@contextlib.contextmanager
def _sm_count():
    """(kept for a CUDA device: the fused loss's vocabulary splits ask for the SM count)"""
    yield


def _model_config(cfg, schedule, ModelConfig, preset_config):
    """The preset's architecture at the tokenizer's vocabulary (the presets' real models)."""
    m = cfg.model
    extra = {k: getattr(m, k) for k in ("depth", "embed_dim", "num_heads") if getattr(m, k) is not None}
    mc = preset_config(m.name, **extra, cond_drop_rate=m.cond_drop)
    if m.drop_path is not None:
        mc = replace(mc, drop_path_rate=m.drop_path)
    if mc.arch == "var":
        return replace(mc, schedule=schedule)
    return mc


_ESTIMATES: dict = {}


def fit(cfg, world_size: int = 8, gpu_gib: float = 80.0) -> Estimate:
    """The cheapest (reshard policy, activation checkpointing, grad_accum) that fits `gpu_gib`
    with the headroom. Recompute costs ~1/3 more compute; more micro-batches cost smaller
    GEMMs (and, under 'pass', an all-gather per block each); 'pass' costs ~4 more
    all-gathers per block per step. So: 'step' without checkpointing, fewest micro-batches
    down to 16 samples per rank; then 'pass' the same; then checkpointing ('step', 'pass')."""
    per_rank = cfg.optim.batch_size // world_size
    plain = [a for a in GRAD_ACCUMS if per_rank % a == 0 and per_rank // a >= 16]
    every = [a for a in GRAD_ACCUMS if per_rank % a == 0]
    candidates = [(rs, False, a) for rs in ("step", "pass") for a in plain] + \
                 [(rs, True, a) for rs in ("step", "pass") for a in every]
    last = None
    for reshard, ac, accum in candidates:
        key = (repr(cfg), world_size, reshard, ac, accum)
        if key not in _ESTIMATES:
            _ESTIMATES[key] = estimate(cfg, world_size, grad_accum=accum, activation_checkpointing=ac,
                                       reshard=reshard)
        last = _ESTIMATES[key]
        if last.fits(gpu_gib):
            return last
    raise RuntimeError(f"nothing fits {gpu_gib} GiB on {world_size} ranks (last tried: {last})")


def report(cfg, world_size: int, gpu_gib: float) -> str:
    est = estimate(cfg, world_size)
    verdict = "fits" if est.fits(gpu_gib) else "DOES NOT FIT"
    return (f"[sar_fast] memory estimate, {world_size} ranks: micro-batch {est.micro_batch} x {est.grad_accum} "
            f"accumulation, activation checkpointing {'on' if est.activation_checkpointing else 'off'}, "
            f"--reshard {est.reshard}: "
            f"tracked peak {est.peak_gib:.1f} GiB (parameters {est.params_gib:.2f}, AdamW {est.optimizer_gib:.2f}) "
            f"+ {OVERHEAD_GIB} GiB CUDA/NCCL = {est.total_gib:.1f} GiB per rank; {verdict} {gpu_gib:g} GiB with "
            f"{HEADROOM:.0%} headroom")


def main(argv: list[str] | None = None) -> None:
    """python -m sar_fast.memory [PRESET ...]: the presets' memory table (markdown)."""
    import argparse
    import os

    from ..cli import InputError
    from .config import PRESETS, resolve
    choices = [p for p in PRESETS if p != "tiny"]
    parser = argparse.ArgumentParser(
        prog="python -m sar_fast.memory",
        description="Per-rank peak memory of one training step of each preset on 8 GPUs of each size "
                    f"({', '.join(f'{k} GB' for k in GPU_GIB)}), and the cheapest micro-batch / activation "
                    "checkpointing setting that fits with 10% headroom. Fake tensors: no GPU needed.")
    parser.add_argument("presets", nargs="*", metavar="PRESET",
                        help=f"presets to estimate (default: all of {', '.join(choices)})")
    args = parser.parse_args(argv)
    for name in args.presets:
        if name not in choices:
            raise InputError(f"error: {name!r} is not a preset; expected one of {', '.join(choices)}"
                             + (" (this command reads no files)" if os.sep in name or os.path.exists(name) else ""))
    print("| preset | GPU | reshard | AC | micro x accum | peak GiB | + overhead | limit (90%) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.presets or choices:
        for sold, gib in GPU_GIB.items():
            e = fit(resolve(PRESETS[name], {}), 8, gib)
            print(f"| {name} | 8 x {sold} GB | {e.reshard} | {'on' if e.activation_checkpointing else 'off'} | "
                  f"{e.micro_batch} x {e.grad_accum} | {e.peak_gib:.1f} | {e.total_gib:.1f} | {0.9 * gib:.1f} |",
                  flush=True)
