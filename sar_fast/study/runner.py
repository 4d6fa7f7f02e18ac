"""Training and evaluating the digits suite's base and arms (resumable per result file) and the
command line of both suites (`--suite oracle`: oracle_suite.py); the design is in
sar_fast/study/__init__.py."""
from __future__ import annotations

import argparse
import math
import os
import shutil
import time

import torch

from ..files import write_json_atomic
from .design import (ARM_GROUPS, BASE_SEED, FULL, ORACLE_ARMS, ORACLE_FULL, PLATEAU, QUICK, StudySize, _read_json, arms,
                     base_dir, result_path)
from .digits_eval import evaluate_export, heldout_nll
from . import jobs
from .jobs import base_sha256, failed_runs, log_line, pending, run_pool, train_once
from .report import report
from . import __doc__ as _STUDY_DOC  # the command's help is the package's docstring


# ------------------------------------------------------------------------------ training
def _trainer_config(out: str, size: StudySize, seed: int, max_steps: int, lr: float, warmup: int, objective: dict,
                    init: str | None, progress: bool, ckpt_every: int):
    from ..train.config import PRESETS, resolve
    flags = dict(out=out, seed=seed, device="cpu", pretrain_steps=0, max_steps=max_steps, lr=lr,
                 warmup_steps=warmup, batch_size=size.batch_size, ckpt_every=ckpt_every, keep_last=1,
                 num_samples=0, progress=progress, resume="auto", **objective)
    if init is None:
        flags.update(depth=size.depth, embed_dim=size.embed_dim, num_heads=size.num_heads)
    else:
        flags["init"] = init
    return resolve(PRESETS["tiny"], flags)


CURVE_METRICS = ("nll", "frechet", "accuracy", "precision", "recall")


# ------------------------------------------------------------------------------ the bases
def base_seed(base: int) -> int:
    return BASE_SEED + base - 1


def _train_to_plateau(run_dir: str, size: StudySize, base: int, lr: float, cap: int, init: str | None,
                      curve: list, stage: int, save, log) -> bool:
    """Teacher forcing in chunks of base_chunk steps from `init` (None: from scratch), the
    held-out NLL after each chunk appended to `curve`, until a chunk improves the stage's best
    by less than 1% (True) or `cap` steps (False). Resumable: the trainer resumes its own
    checkpoint and the chunks already in `curve` are not rerun; `save()` after every chunk."""
    done = [c for c in curve if c["stage"] == stage]
    while True:
        prev = [c["nll"] for c in done]
        if len(prev) >= 2 and prev[-1] > min(prev[:-1]) * PLATEAU:
            return True
        if done and done[-1]["step"] >= cap:
            return False
        steps = min((len(done) + 1) * size.base_chunk, cap)
        cfg = _trainer_config(run_dir, size, base_seed(base), steps, lr, size.base_warmup, dict(objective="tf"),
                              init, progress=True, ckpt_every=size.base_chunk)
        train_once(cfg)
        entry = {"stage": stage, "lr": lr, "step": steps, "nll": heldout_nll(os.path.join(run_dir, "export.pth"))}
        done.append(entry)
        curve.append(entry)
        save()
        log(f"[study] base {base} stage {stage} (lr {lr:g}) step {steps}: held-out TF NLL {entry['nll']:.4f}")


def run_base(out: str, size: StudySize, base: int = 1, log=log_line) -> dict:
    """Base `base` (seed base-1): teacher forcing from scratch at base_lr to a plateau (held-out
    NLL improving by less than 1% over a chunk) or base_steps, then each `anneal` stage from the
    previous stage's model, the same way. Its final model is bases/base<k>/export.pth and its
    curve bases/base<k>/curve.json. Resumable per chunk."""
    folder = base_dir(out, base)
    curve_path = os.path.join(folder, "curve.json")
    state = _read_json(curve_path) or {"key": size.key(), "curve": [], "stages": [], "done": False}
    if state.get("key") != size.key():
        raise SystemExit(f"error: {folder} holds a base of another study size; use another --out")
    os.makedirs(folder, exist_ok=True)
    init = None
    for stage, (lr, cap) in enumerate(size.stages()):
        run_dir = os.path.join(folder, f"stage{stage}")
        if stage >= len(state["stages"]):
            plateau = _train_to_plateau(run_dir, size, base, lr, cap, init, state["curve"], stage,
                                        lambda: write_json_atomic(curve_path, state), log)
            state["stages"].append({"lr": lr, "cap": cap, "plateau": plateau,
                                    "steps": state["curve"][-1]["step"], "nll": state["curve"][-1]["nll"]})
            write_json_atomic(curve_path, state)
        init = os.path.join(run_dir, "export.pth")
    if not state["done"]:
        shutil.copyfile(init, os.path.join(folder, "export.pth"))
        state["metrics"] = evaluate_export(os.path.join(folder, "export.pth"), 1, size.samples_per_class,
                                           rollout_images=size.rollout_images)
        state["done"] = True
        write_json_atomic(curve_path, state)
    return state


# ------------------------------------------------------------------------------ the arms
def run_arm(out: str, size: StudySize, arm: str, seed: int, base: int, threads: int = 1) -> dict:
    """Train arm `arm` with seed `seed` from base `base`, measured at every curve step (the
    plain setting) and fully at the last; write its JSON; returns it."""
    torch.set_num_threads(threads)
    objective = arms()[arm]
    run_dir = os.path.join(out, "runs", f"{arm}__base{base}__seed{seed}")
    shutil.rmtree(run_dir, ignore_errors=True)  # a half-finished run restarts: no mixed optimiser state
    export, curve, train_s, eval_s = os.path.join(run_dir, "export.pth"), [], 0.0, 0.0
    chunk = math.gcd(*size.curve_steps)
    for steps in size.curve_steps:  # the trainer resumes its checkpoint: one run, measured on the way
        cfg = _trainer_config(run_dir, size, seed, steps, size.arm_lr, size.arm_warmup, objective,
                              os.path.join(base_dir(out, base), "export.pth"), progress=False, ckpt_every=chunk)
        train_s += train_once(cfg)
        start = time.perf_counter()
        metrics = evaluate_export(export, seed, size.samples_per_class, full=steps == size.arm_steps,
                                  rollout_images=size.rollout_images)
        eval_s += time.perf_counter() - start
        curve.append({"step": steps, **{k: metrics[k] for k in CURVE_METRICS}})
    result = {"arm": arm, "seed": seed, "base": base, "key": size.key(), "base_sha256": base_sha256(out, base),
              "objective": cfg.objective.to_dict(), "steps": size.arm_steps, "train_s": train_s, "eval_s": eval_s,
              **metrics, "curve": curve}
    os.makedirs(os.path.dirname(result_path(out, arm, seed, base)), exist_ok=True)
    write_json_atomic(result_path(out, arm, seed, base), result)
    shutil.rmtree(run_dir, ignore_errors=True)  # checkpoints of hundreds of runs are not worth keeping
    return result


# ------------------------------------------------------------------------------ command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sar_fast.study", description=_STUDY_DOC.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="study directory (base/, results/, study.md/.json/.png); a rerun "
                                                "with the same directory skips the finished (arm, seed) runs")
    p.add_argument("--suite", default="digits", choices=("digits", "oracle"),
                   help="digits: the embedded digits and their grey tokenizer (Fréchet distance, TF NLL); oracle: "
                        "a frozen random teacher whose likelihood is exact (precision and coverage NLL; "
                        "docs/study.md)")
    p.add_argument("--quick", action="store_true", help="a pipeline check (about a minute on 2 quiet cores): "
                                                        "tiny model, a few steps, 2 seeds; its numbers mean nothing")
    p.add_argument("--arms", default="all", help="comma-separated arm names or digits groups, or 'all' (digits "
                   "groups: " + "; ".join(f"{g}: {', '.join(a)}" for g, a in ARM_GROUPS.items())
                   + "; oracle: " + ", ".join(ORACLE_ARMS) + ")")
    p.add_argument("--seeds", type=int, default=argparse.SUPPRESS,
                   help=f"seeds per arm and base (default: digits {FULL.seeds}, oracle {ORACLE_FULL.seeds}, --quick 2)")
    p.add_argument("--bases", type=int, default=argparse.SUPPRESS,
                   help=f"digits: independently trained bases, each with every arm and seed (default {FULL.bases})")
    p.add_argument("--workers", type=int, default=2, help="(arm, seed) runs in parallel, one process each")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    return p


def check_out(out: str) -> None:
    """--out must be a folder this study may write (created when missing): not a file, not a
    training run or checkpoint folder."""
    from ..cli import InputError
    from ..safe_load import describe_folder
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"error: --out {out} exists and is not a directory; expected a study directory "
                         "(created when missing)")
    if os.path.isdir(out) and (os.path.isfile(os.path.join(out, "COMPLETE"))
                               or os.path.isdir(os.path.join(out, "checkpoints"))):
        raise InputError(f"error: --out {describe_folder(out)}; expected a study directory (created when missing)")


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    check_out(args.out)
    for name in ("seeds", "bases"):
        low = 2 if name == "seeds" else 1
        if name in vars(args) and getattr(args, name) < low:
            raise SystemExit(f"error: --{name} must be >= {low}" + (" (paired intervals need two seeds)"
                                                                     if name == "seeds" else ""))
    if args.workers < 1 or args.threads < 1:
        raise SystemExit("error: --workers and --threads must be >= 1")
    if args.suite == "oracle":
        if "bases" in vars(args):
            raise SystemExit("error: --bases: the oracle suite has one base")
        from .oracle_suite import run_suite
        return run_suite(args)
    size, names, start = jobs.start(args, QUICK, FULL, arms(), ARM_GROUPS)
    bases = {b: run_base(args.out, size, b) for b in range(1, size.bases + 1)}
    todo, done = pending(args.out, names, size.seeds, size.key(), {b: base_sha256(args.out, b) for b in bases})
    log_line(f"[study] {len(bases)} bases done ({', '.join(str(s['stages'][-1]['steps']) for s in bases.values())} "
             f"steps in their last stage); {done} results found, {len(todo)} to run on {args.workers} workers")
    failed = run_pool(run_arm, args.out, size, todo, args.workers, args.threads,
                      lambda r: f"Fréchet {r['frechet']:.3f}, NLL {r['nll']:.4f}, gap {r['gap_sample']:+.4f}")
    summary = report(args.out, size, list(arms()))  # every group's results in the folder, not just this run's
    summary["wall_s"] = time.perf_counter() - start
    with open(os.path.join(args.out, "study.md")) as f:
        print(f.read())
    log_line(f"[study] {len(names)} arms x {size.seeds} seeds x {size.bases} bases in {summary['wall_s'] / 60:.1f} "
             f"min; wrote {args.out}/study.md, study.json, study.png")
    failed_runs(failed)
    return summary
