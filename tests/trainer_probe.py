"""Run under torchrun by tests/test_train_scale.py: builds a Trainer from the flags after
`--`, runs one warm-up step, then 2 x `--steps` more steps as the loop runs them (not logged),
and writes to --json (rank 0) what happened inside those steps:

- collectives: c10d ops seen by the profiler (FSDP's all-gathers and reduce-scatters, and
  the all-reduces, also those DTensor issues for the gradient norm), per step;
- host syncs: aten._local_scalar_dense (what .item(), bool(tensor), int(tensor) call),
  recorded by a TorchDispatchMode, with the source line that made each;
- with --nan-step K: the loss of step K is made NaN on rank 0; the parameters and the
  optimiser state before and after it (they must not change), and the counters;
- with --public-fallback: the start-up probe of FSDP2's internals is made to fail, so the
  'step' policy runs on FSDP2's public controls only;
- with --params FILE: the full parameters after the last step (rank 0).
"""
import argparse
import collections
import json
import os
import sys
import traceback

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sar_fast.train import parallel
from sar_fast.train import trainer as train


class HostSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.where: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            frames = [f for f in traceback.extract_stack()[:-1] if "sar_fast" in f.filename]
            self.where.append(f"{os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else "?")
        return func(*args, **(kwargs or {}))


def flat_state(trainer) -> list[torch.Tensor]:
    out = [p.detach().full_tensor().clone() for p in trainer.model.parameters()]
    for p in trainer.model.parameters():
        for v in trainer.optimizer.state[p].values():
            out.append((v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone())
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--nan-step", type=int, default=-1)
    ap.add_argument("--public-fallback", action="store_true")
    ap.add_argument("--params")
    args, flags = ap.parse_known_args()
    flags = [f for f in flags if f != "--"]
    if args.public_fallback:
        parallel._probe_reduce_now = lambda *a, **k: "made to fail by trainer_probe --public-fallback"
    trainer = train.Trainer(train.parse_config(flags))
    real_step = train.sar_step

    def maybe_nan_step(*a, step=0, **kw):
        out = real_step(*a, step=step, **kw)
        if step == args.nan_step and trainer.info.rank == 0:
            out.loss = out.loss * float("nan")
        return out
    train.sar_step = maybe_nan_step

    trainer.settle(trainer.train_step(0))
    syncs, collectives, results = HostSyncs(), collections.Counter(), []
    before = after = None
    # the profiler and the dispatch mode in separate steps (under the mode, each op the
    # profiler sees would be recorded twice)
    for step in range(1, 1 + 2 * args.steps):
        if step == args.nan_step:
            before = flat_state(trainer)
        if step <= args.steps:
            with syncs:
                results.append(trainer.train_step(step))
        else:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                results.append(trainer.train_step(step))
            collectives.update(e.name for e in prof.events() if e.name.startswith("c10d::"))
        if step == args.nan_step:
            after = flat_state(trainer)
    for r in results:
        trainer.settle(r)
    report = {"collectives_per_step": {k: v / args.steps for k, v in collectives.items()},
              "host_syncs": syncs.where, "nonfinite_total": trainer.state.nonfinite_total,
              "units": len(parallel.fsdp_units(trainer.model)),
              "reduce_now": bool(getattr(trainer.model, "_sar_reduce_now", False))}
    if before is not None:
        report["state_unchanged_by_nan_step"] = all(torch.equal(a, b) for a, b in zip(before, after))
        report["grad_norm_nan"] = bool(torch.isnan(results[args.nan_step - 1].grad_norm))
    params = {n: p.detach().full_tensor().clone() for n, p in trainer.model.named_parameters()}
    if trainer.info.is_main:
        if args.params:
            torch.save(params, args.params)
        with open(args.json, "w") as f:
            json.dump(report, f)
    parallel.shutdown(clean=True)
    parallel.exit_process(0)  # past gloo's teardown race at interpreter exit (see exit_process)


if __name__ == "__main__":
    main()
