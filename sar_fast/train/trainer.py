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

No host sync in a step that is not logged: a non-finite step is skipped on the device (the
fused AdamW's `found_inf`: parameters and optimiser state unchanged), and the host learns
of it (and of a SIGTERM on any rank) one step late, from a pinned copy.

SIGTERM: the signal is noticed by the end of the next step; then the trainer waits for an
asynchronous save in flight and writes one checkpoint (no export, no samples), so the exit
takes at most two steps + two checkpoint writes (tests/test_train.py measures the write of
a d16-sized model). The export (export.pth and the same tensors as export.safetensors), the
sample grid and loss.png are written at the end of the run (or with every checkpoint under
--extras-every-ckpt).
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

from .. import ops
from ..cli import one_line
from ..data.loader import DataSource
from ..models import ModelConfig, save_export
from ..models.tokenizers import build_tokenizer
from ..rng import SampleKey
from ..safe_load import CheckpointError, exit_once
from ..sar import SARConfig, sar_step
from ..schedules import Schedule
from .. import cli, files
from . import checkpointing, flops, gpu_monitor, logs, parallel
from .build import build_optimizer, build_run_model_rank0, param_groups
from .config import TrainConfig, parse_config

__all__ = ["Trainer", "main", "param_groups", "parse_config"]


@dataclass
class LoopState:
    step: int = 0
    nonfinite_total: int = 0
    nonfinite_streak: int = 0


@dataclass
class StepResult:
    objective: SARConfig
    schedule: Schedule
    samples: int                       # images this rank trained on (all micro-batches)
    losses: torch.Tensor               # [3]: loss, TF (or SF) loss, CSF loss, averaged over ranks
    grad_norm: torch.Tensor            # before clipping; NaN when the step was skipped
    flags: torch.Tensor                # host [2]: step skipped (non-finite), some rank got SIGTERM
    flags_ready: object                # CUDA event after which `flags` may be read (None: now)
    scale_stats: torch.Tensor | None   # [n, 3] of this rank (only when asked for)


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.info = info = parallel.init_distributed(cfg.run.device, cfg.system.startup_timeout)
        parallel.ensure_process_group(info)  # plain `python -m sar_fast.train`: a 1-rank group
        if cfg.system.deterministic:
            ops.set_deterministic(True)
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
        model, full_state = build_run_model_rank0(cfg.model, cfg.data.schedule, self.tok, info)
        model.set_label_range_check(False)  # DataSource checks every batch on the host instead
        self.data = DataSource(cfg.data, cfg.run.seed, info, self.tok, self.local_batch, model.num_classes)
        self.model_config: ModelConfig = model.config
        if full_state is None:
            model.to(info.device)
        self.pass_flops = flops.PassFlops(model.blocks[0], model.config)
        self.model = parallel.shard_model(model, info, self.precision, cfg.system.activation_checkpointing,
                                          cfg.system.compile, reshard=cfg.system.reshard,
                                          replicas=cfg.system.replicas)
        if full_state is not None:  # --init on several ranks: rank 0 read it, the shards get it
            parallel.load_full_state(self.model, full_state, info.device)
            del full_state
        self.optimizer = build_optimizer(self.model, optim, info.device)
        self.codebook = self.tok.codebook().detach().to(info.device, torch.float32)
        self.phi = self.tok.phi
        steps_main = optim.max_steps if optim.max_steps is not None else \
            math.ceil(optim.epochs * self.data.steps_per_epoch / optim.grad_accum)
        self.total_steps = optim.pretrain_steps + steps_main
        self.ckpt_root = os.path.join(cfg.run.out, "checkpoints")
        self.state = LoopState()
        self._stop_signal: int | None = None
        self._pending_save: checkpointing.PendingSave | None = None

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
        parallel.begin_step(self.model)
        self.pass_flops.enabled = True
        for micro in range(accum):
            labels, codes, schedule = self.data.next(step)
            parallel.set_micro_batch(self.model, last=micro == accum - 1)
            # every draw of the step (label dropout, drop-path, SSR) keyed by the samples' global
            # rows (data.DataSource.rows): the same on any number of ranks or micro-batches
            rows = self.data.rows
            self.model.set_sample_key(SampleKey(self.cfg.run.seed, step, rows))
            out = sar_step(self.model, labels, codes, schedule, self.codebook, objective, step=step, phi=self.phi,
                           rows=rows)
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
        self.pass_flops.enabled = False
        parallel.reduce_gradients(self.model)
        # a fill on the device, not a host->device copy
        stop_flag = torch.full((1,), float(self._stop_signal is not None), device=info.device)
        reduced = parallel.all_reduce_sum(torch.cat([sums, stop_flag]))
        skip = reduced[3] > 0  # no update from a step whose loss is not finite on some rank
        grad_norm = parallel.clip_grad_norm(self.model, self.cfg.optim.clip)
        self.optimizer.found_inf = skip.float()  # fused AdamW: the whole update is skipped on the device
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        grad_norm = torch.where(skip, torch.full_like(grad_norm, float("nan")), grad_norm)
        flags, ready = self._to_host(torch.stack([skip, reduced[4] > 0]))
        return StepResult(objective, schedule, samples, reduced[:3] / info.world_size, grad_norm, flags, ready,
                          scale_stats)

    def _to_host(self, t: torch.Tensor):
        """A pinned, non-blocking copy to the host and the event that says it has landed."""
        if t.device.type != "cuda":
            return t.clone(), None
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event

    def settle(self, result: StepResult) -> bool:
        """Bring a step's outcome to the host (waiting for that step only): update the
        non-finite counters; True when some rank asked to stop."""
        if result.flags_ready is not None:
            result.flags_ready.synchronize()
        skipped, stop = (bool(x) for x in result.flags.numpy())  # numpy: host memory, no dispatch
        if skipped:
            self.state.nonfinite_total += 1
            self.state.nonfinite_streak += 1
        else:
            self.state.nonfinite_streak = 0
        return stop

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
        self.progress = cli.Progress(self.total_steps, self.state.step, enabled=info.is_main and every.progress)
        self.throughput = flops.Throughput(self.model_config, info.device, info.world_size)
        self.gpu = gpu_monitor.GpuMonitor(info.device)
        first_step, unsettled = self.state.step, None
        try:
            while self.state.step < self.total_steps:
                step = self.state.step
                last = step + 1 == self.total_steps
                logging = (step + 1) % every.log_every == 0 or last
                result = self.train_step(step, with_stats=logging)
                self.state.step += 1
                self.throughput.add(result.samples, *self.pass_flops.take())
                # the host reads the previous step's flags (long done), the current one's
                # only when it syncs anyway (logging) or must know (first and last step)
                settle = [r for r in (unsettled, result) if r is not None]
                unsettled = None if logging or last or step == first_step else settle.pop()
                stops = [self.settle(r) for r in settle]  # settle all of them, then decide
                stop = any(stops)
                if step == first_step:  # compile and warm-up are over: fail fast from now on
                    parallel.set_collective_timeout(cfg.system.collective_timeout)
                if logging:
                    self.log(step, result)
                if self.state.nonfinite_streak >= every.max_nonfinite:
                    self.save(final=False)
                    raise RuntimeError(f"{self.state.nonfinite_streak} non-finite losses in a row at step "
                                       f"{self.state.step} (lr {self.lr_at(step):g}); checkpoint written to "
                                       f"{self.ckpt_root}. Lower --lr or check the data, then --resume auto.")
                if stop:
                    if unsettled is not None:
                        self.settle(unsettled)
                    self.save(final=False, blocking=True)
                    if info.is_main:
                        print(f"[sar_fast] signal received: checkpointed at step {self.state.step}, exiting",
                              file=sys.stderr, flush=True)
                    return
                if self.state.step == self.total_steps:
                    self.save(final=True, blocking=True)
                elif self.state.step % every.ckpt_every == 0:
                    if unsettled is not None:  # the checkpoint's counters must be exact
                        self.settle(unsettled)
                        unsettled = None
                    self.save(final=cfg.checkpoint.extras_every_ckpt)
        finally:
            self.wait_for_save()
            self.progress.close()
            if self.metrics_log:
                self.metrics_log.close()

    def log(self, step: int, result: StepResult) -> None:
        totals = None if result.scale_stats is None else parallel.all_reduce_sum(result.scale_stats.clone()).cpu()
        record = logs.step_record(self.state.step, result.objective.objective, result.losses, result.grad_norm,
                                  self.lr_at(step), self.throughput.read(), self.state.nonfinite_total,
                                  result.schedule, totals, skipped_images=self.data.skipped_images)
        record.update(self.gpu.read())
        if self.metrics_log:
            self.metrics_log.write(record)
        self.progress.update(self.state.step - self.progress.n, loss=record["loss"], img_s=record["img_per_s"])

    # ---------------------------------------------------------------- checkpoints and samples
    def trainer_state(self) -> dict:
        return {"step": self.state.step, "nonfinite_total": self.state.nonfinite_total,
                "data": self.data.state_dict(), "world_size": self.info.world_size,
                "config": self.cfg.to_dict(), "model_config": self.model_config.to_dict()}

    def wait_for_save(self) -> None:
        if self._pending_save is not None:
            pending, self._pending_save = self._pending_save, None
            pending.wait()

    def save(self, final: bool, blocking: bool = False) -> None:
        """A sharded checkpoint (in the background unless `blocking` or --no-async-save);
        with `final`, also the flat export, the sample grid and the loss plot."""
        out = self.cfg.run.out
        self.wait_for_save()
        pending = checkpointing.save_checkpoint(self.ckpt_root, self.state.step, self.model, self.optimizer,
                                                self.trainer_state(), self.info, self.cfg.checkpoint.keep_last,
                                                async_=self.cfg.checkpoint.async_save and not blocking)
        self._pending_save = pending
        if final:
            if self.cfg.checkpoint.export:
                full = checkpointing.full_model_state(self.model)
                if self.info.is_main:
                    save_export(full, [os.path.join(out, "export.pth"), os.path.join(out, "export.safetensors")],
                                config=self.model_config)
            self.write_samples()
            if self.info.is_main:
                logs.plot_losses(os.path.join(out, "metrics.jsonl"), os.path.join(out, "loss.png"))
        if self.info.is_main:
            print(f"[sar_fast] step {self.state.step}: checkpoint {pending.final}"
                  f"{' (writing in the background)' if not pending.done() else ''}", file=sys.stderr, flush=True)

    def resume(self) -> None:
        path = checkpointing.resolve_resume_everywhere(self.cfg.checkpoint.resume, self.ckpt_root, self.info)
        if path is None:
            return
        try:
            state = checkpointing.load_checkpoint(path, self.model, self.optimizer, self.info)
        except CheckpointError as e:  # every rank raised the same error: say it once
            exit_once(f"error: {one_line(e)}")
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
        parallel.reshard_all(self.model)  # the 'step' policy keeps gathered weights after a forward
        if self.info.is_main:
            grid = files.image_grid(self.tok.decode(samples.codes), nrow=min(10, opts.num_samples))
            os.makedirs(os.path.join(out, "samples"), exist_ok=True)
            files.write_png(os.path.join(out, "samples", f"step_{self.state.step:08d}.png"), grid)
            files.write_png(os.path.join(out, "samples.png"), grid)


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
