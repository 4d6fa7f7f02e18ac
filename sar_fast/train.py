"""SAR post-training: `torchrun [--nproc_per_node N] -m sar_fast.train [--preset P] [flags]`.

With no flags, the `tiny` preset trains a small FlexVAR-style model on scikit-learn's
8x8 digits with a grey-level tokenizer (no downloads, runs on a CPU): teacher forcing
first, then SAR post-training, writing checkpoints, metrics, a loss plot and samples.
The real presets (flexvar-d16 ... var-d30) start from a user's checkpoint (--init), a
tokenizer (--vae) and an ImageNet folder (--data) or a code cache (--cache). Flags and
presets: config.py.

The loop, in one sitting: build data (data.py) + tokenizer + model (build.py), shard it
(FSDP2, parallel.py); then `Trainer.train_step`: (maybe random) schedule -> codes ->
`sar_step` (sar.py, the SAR objective) -> backward -> clip -> AdamW; and `Trainer.run`
around it: log (logs.py), checkpoint (checkpointing.py), sample. Faults: a non-finite loss
skips the step; --max-nonfinite in a row checkpoints and aborts; SIGTERM checkpoints and
exits cleanly.
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from . import checkpointing, logs, parallel
from .build import build_optimizer, build_run_model, build_tokenizer, param_groups
from .config import TrainConfig, parse_config
from .data import DataSource
from .models import ModelConfig, save_export
from .rng import SampleKey, local_rows
from .sar import SARConfig, sar_step

__all__ = ["Trainer", "main", "param_groups", "parse_config"]


@dataclass
class LoopState:
    step: int = 0
    nonfinite_total: int = 0
    nonfinite_streak: int = 0


@dataclass
class StepResult:
    objective: SARConfig
    schedule: tuple[int, ...]
    samples: int                       # images this rank trained on (all micro-batches)
    losses: torch.Tensor               # [3]: loss, TF (or SF) loss, CSF loss, averaged over ranks
    grad_norm: torch.Tensor            # before clipping; NaN when the step was skipped
    stop: bool                         # some rank received SIGTERM
    scale_stats: torch.Tensor | None   # [n, 3] of this rank (only when asked for)


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.info = info = parallel.init_distributed(cfg.run.device)
        if not dist.is_initialized():  # plain `python -m sar_fast.train`: a 1-rank group
            dist.init_process_group("gloo" if info.device.type == "cpu" else "nccl",
                                    store=dist.HashStore(), rank=0, world_size=1)
        torch.manual_seed(cfg.run.seed)
        random.seed(cfg.run.seed)
        precision = cfg.system.precision
        self.precision = precision if precision != "auto" else ("bf16" if info.device.type == "cuda" else "fp32")
        if info.device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 for the fp32 GEMMs (and the fused loss's)
        optim = cfg.optim
        micro = optim.batch_size // optim.grad_accum
        if optim.batch_size % optim.grad_accum or micro % info.world_size:
            raise SystemExit(f"error: --batch-size {optim.batch_size} must split evenly into --grad-accum "
                             f"{optim.grad_accum} micro-batches over {info.world_size} ranks")
        self.local_batch = micro // info.world_size
        self.tok = build_tokenizer(cfg.data.vae, info.device)
        model = build_run_model(cfg.model, cfg.data.schedule, self.tok)
        model.set_label_range_check(False)  # DataSource checks every batch on the host instead
        self.data = DataSource(cfg.data, cfg.run.seed, info, self.tok, self.local_batch, model.num_classes)
        self.model_config: ModelConfig = model.config
        model.to(info.device)
        self.model = parallel.shard_model(model, info, self.precision, cfg.system.activation_checkpointing,
                                          cfg.system.compile)
        self.optimizer = build_optimizer(self.model, optim, info.device)
        self.codebook = self.tok.codebook().detach().to(info.device, torch.float32)
        self.phi = self.tok.phi
        steps_main = optim.max_steps if optim.max_steps is not None else \
            math.ceil(optim.epochs * self.data.steps_per_epoch / optim.grad_accum)
        self.total_steps = optim.pretrain_steps + steps_main
        self.ckpt_root = os.path.join(cfg.run.out, "checkpoints")
        self.state = LoopState()
        self._stop_signal: int | None = None

    def lr_at(self, step: int) -> float:
        optim = self.cfg.optim
        lr = optim.pretrain_lr if step < optim.pretrain_steps and optim.pretrain_lr is not None else optim.lr
        return lr * (step + 1) / optim.warmup_steps if step < optim.warmup_steps else lr

    def objective_at(self, step: int) -> SARConfig:
        return replace(self.cfg.objective, objective="tf") if step < self.cfg.optim.pretrain_steps \
            else self.cfg.objective

    # ---------------------------------------------------------------- one optimiser step
    def train_step(self, step: int, with_stats: bool = False) -> StepResult:
        """Micro-batches -> sar_step -> backward, then (unless some rank's loss is not
        finite) clip and step AdamW. The same on every rank; updates the fault counters."""
        accum, info = self.cfg.optim.grad_accum, self.info
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(step)
        objective = self.objective_at(step)
        sums = torch.zeros(4, device=info.device)  # loss, tf, csf, nonfinite
        scale_stats, samples = None, 0
        for micro in range(accum):
            labels, codes, schedule = self.data.next(step)
            self.model.set_requires_gradient_sync(micro == accum - 1)
            # label dropout / drop-path keyed by the samples' global rows: the same on any number of ranks
            rows = local_rows(micro, len(labels), info.rank, info.world_size, info.device)
            self.model.set_sample_key(SampleKey(self.cfg.run.seed, step, rows))
            out = sar_step(self.model, labels, codes, schedule, self.codebook, objective, step=step, phi=self.phi)
            finite = torch.isfinite(out.loss)
            (torch.where(finite, out.loss, torch.zeros_like(out.loss)) / accum).backward()
            m = out.metrics
            sums += torch.stack([m["loss"], m.get("tf_loss", m.get("sf_loss", m["loss"])),
                                 m.get("csf_loss", torch.zeros_like(m["loss"])), (~finite).float()]) \
                .nan_to_num(0.0, 0.0, 0.0) / accum
            if with_stats:
                stats = out.scale_stats
                scale_stats = stats if scale_stats is None or scale_stats.shape != stats.shape else scale_stats + stats
            samples += len(labels)
        stop_flag = torch.tensor([float(self._stop_signal is not None)], device=info.device)
        reduced = parallel.all_reduce_sum(torch.cat([sums, stop_flag]))
        if bool(reduced[3] > 0):  # skip: no update from a step whose loss is not finite on some rank
            self.optimizer.zero_grad(set_to_none=True)
            self.state.nonfinite_total += 1
            self.state.nonfinite_streak += 1
            grad_norm = torch.tensor(float("nan"))
        else:
            grad_norm = parallel.clip_grad_norm(self.model, self.cfg.optim.clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.state.nonfinite_streak = 0
        return StepResult(objective, schedule, samples, reduced[:3] / info.world_size, grad_norm,
                          bool(reduced[4] > 0), scale_stats)

    # ---------------------------------------------------------------- the loop
    def run(self) -> None:
        cfg, info, every = self.cfg, self.info, self.cfg.checkpoint
        if info.is_main:
            os.makedirs(cfg.run.out, exist_ok=True)
            with open(os.path.join(cfg.run.out, "config.json"), "w") as f:
                json.dump(cfg.to_dict(), f, indent=1)
        self.resume()
        signal.signal(signal.SIGTERM, lambda signum, frame: setattr(self, "_stop_signal", signum))
        self.metrics_log = logs.JsonlLogger(os.path.join(cfg.run.out, "metrics.jsonl")) if info.is_main else None
        self.progress = logs.Progress(self.total_steps, self.state.step, enabled=info.is_main and every.progress)
        self.throughput = logs.Throughput(self.model_config, info.device, info.world_size)
        self.gpu = logs.GpuMonitor(info.device)
        try:
            while self.state.step < self.total_steps:
                step = self.state.step
                logging = (step + 1) % every.log_every == 0 or step + 1 == self.total_steps
                result = self.train_step(step, with_stats=logging)
                self.state.step += 1
                # rough FLOPs: TF forward + backward, plus the same again for the SF pass
                self.throughput.add(result.schedule, result.samples, 3.0 + 3.0 * (result.objective.objective != "tf"))
                if logging:
                    self.log(step, result)
                if self.state.nonfinite_streak >= every.max_nonfinite:
                    self.save()
                    raise RuntimeError(f"{self.state.nonfinite_streak} non-finite losses in a row at step "
                                       f"{self.state.step} (lr {self.lr_at(step):g}); checkpoint written to "
                                       f"{self.ckpt_root}. Lower --lr or check the data, then --resume auto.")
                if result.stop:
                    self.save()
                    if info.is_main:
                        print(f"[sar_fast] signal received: checkpointed at step {self.state.step}, exiting",
                              file=sys.stderr, flush=True)
                    return
                if self.state.step % every.ckpt_every == 0 or self.state.step == self.total_steps:
                    self.save()
        finally:
            self.progress.close()
            if self.metrics_log:
                self.metrics_log.close()

    def log(self, step: int, result: StepResult) -> None:
        totals = None if result.scale_stats is None else parallel.all_reduce_sum(result.scale_stats.clone()).cpu()
        record = logs.step_record(self.state.step, result.objective.objective, result.losses, result.grad_norm,
                                  self.lr_at(step), self.throughput.read(), self.state.nonfinite_total,
                                  result.schedule, totals)
        record.update(self.gpu.read())
        if self.metrics_log:
            self.metrics_log.write(record)
        self.progress.update(self.state.step - self.progress.n, loss=record["loss"], img_s=record["img_per_s"])

    # ---------------------------------------------------------------- checkpoints and samples
    def trainer_state(self) -> dict:
        return {"step": self.state.step, "nonfinite_total": self.state.nonfinite_total,
                "data": self.data.state_dict(), "world_size": self.info.world_size,
                "config": self.cfg.to_dict(), "model_config": self.model_config.to_dict()}

    def save(self) -> None:
        out = self.cfg.run.out
        path = checkpointing.save_checkpoint(self.ckpt_root, self.state.step, self.model, self.optimizer,
                                             self.trainer_state(), self.info, self.cfg.checkpoint.keep_last)
        if self.cfg.checkpoint.export:
            full = checkpointing.full_model_state(self.model)
            if self.info.is_main:
                save_export(full, os.path.join(out, "export.pth"), config=self.model_config)
        self.write_samples()
        if self.info.is_main:
            logs.plot_losses(os.path.join(out, "metrics.jsonl"), os.path.join(out, "loss.png"))
            print(f"[sar_fast] step {self.state.step}: checkpoint {path}", file=sys.stderr, flush=True)

    def resume(self) -> None:
        path = checkpointing.resolve_resume(self.cfg.checkpoint.resume, self.ckpt_root)
        if path is None:
            return
        state = checkpointing.load_checkpoint(path, self.model, self.optimizer, self.info)
        self.state.step, self.state.nonfinite_total = state["step"], state.get("nonfinite_total", 0)
        self.data.load_state_dict(state["data"], saved_world_size=state.get("world_size"))
        if self.info.is_main:
            print(f"[sar_fast] resumed from {path} at step {self.state.step}", file=sys.stderr, flush=True)

    @torch.no_grad()
    def write_samples(self) -> None:
        opts, out = self.cfg.checkpoint, self.cfg.run.out
        if opts.num_samples <= 0:
            return
        labels = torch.arange(opts.num_samples, device=self.info.device) % self.model_config.num_classes
        samples = self.model.generate(self.codebook, labels, self.cfg.data.schedule, cfg=opts.sample_cfg,
                                      cfg_ramp="linear", top_k=opts.sample_top_k, top_p=opts.sample_top_p,
                                      seed=self.cfg.run.seed, phi=self.phi)
        if self.info.is_main:
            grid = logs.image_grid(self.tok.decode(samples.codes), nrow=min(10, opts.num_samples))
            os.makedirs(os.path.join(out, "samples"), exist_ok=True)
            logs.write_png(os.path.join(out, "samples", f"step_{self.state.step:08d}.png"), grid)
            logs.write_png(os.path.join(out, "samples.png"), grid)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(argv)
    if cfg.system.estimate_memory:  # before any process group: the estimate makes a fake one
        if int(os.environ.get("RANK", "0")) == 0:
            from .memory import report
            print(report(cfg, cfg.system.estimate_ranks, cfg.system.gpu_memory), flush=True)
        return
    trainer = Trainer(cfg)
    try:
        trainer.run()
    except BaseException:
        parallel.shutdown(clean=False)
        raise
    parallel.shutdown(clean=True)


if __name__ == "__main__":
    main()
