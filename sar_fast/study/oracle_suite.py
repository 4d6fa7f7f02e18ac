"""The oracle suite: `python -m sar_fast.study --suite oracle --out DIR [--quick]`.

The same design as the digits suite (sar_fast.study), on data whose distribution is known
exactly: a frozen random scale-wise teacher (sar_fast.study.oracle) and a code cache of its
samples, written once under DIR/data. A teacher-forcing base student trains from scratch in
chunks until its coverage NLL on the held-out teacher samples improves by less than 1% over
a chunk (or a step cap); every arm (design.ORACLE_ARMS) then continues from the base for the
same steps, data order and draws per seed. Each (arm, seed) is evaluated by
`oracle.evaluate_student` (precision NLL: the teacher's NLL of the student's samples;
coverage NLL: the student's NLL of held-out teacher samples; exposure gaps) and written as
JSON the moment it exists, so a rerun skips what is done. The report (oracle_report) tests
the claims with paired t-intervals, Holm's correction and a margin fixed before the run.
"""
from __future__ import annotations

import os
import shutil
import sys
import time

import torch

from ..files import write_json_atomic
from . import jobs, oracle
from .design import (BASE_SEED, ORACLE_FULL, PLATEAU, ORACLE_QUICK, OracleSize, _read_json, export_path, oracle_arms,
                     result_path)
from .oracle_report import report
from .jobs import base_sha256, failed_runs, log_line, pending, run_pool, train_once



def data_dir(out: str) -> str:
    return os.path.join(out, "data")


def prepare(out: str, size: OracleSize) -> dict:
    """The teacher, the training cache and the held-out samples in out/data (written once;
    a folder of another request is refused)."""
    try:
        return oracle.prepare_data(data_dir(out), size.teacher, size.n_train, size.n_heldout)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


# ------------------------------------------------------------------------------ training
def _trainer_config(out: str, run_dir: str, size: OracleSize, seed: int, max_steps: int, lr: float, warmup: int,
                    objective: dict, init: str | None, progress: bool, ckpt_every: int):
    """The trainer's config: oracle.trainer_flags (the teacher-sample cache, the codebook-only
    tokenizer) parsed as the command line would, then this run's settings; validated."""
    from ..train.config import PRESETS, build_parser, resolve, validate
    data = data_dir(out)
    flags = vars(build_parser().parse_args(oracle.trainer_flags(os.path.join(data, "cache"),
                                                                  os.path.join(data, "teacher"),
                                                                  size.teacher.schedule)))
    flags.pop("preset", None)
    flags.update(out=run_dir, seed=seed, device="cpu", pretrain_steps=0, max_steps=max_steps, lr=lr,
                 warmup_steps=warmup, batch_size=size.batch_size, ckpt_every=ckpt_every, keep_last=1,
                 progress=progress, resume="auto", **objective)
    if init is None:
        flags.update(depth=size.depth, embed_dim=size.embed_dim, num_heads=size.num_heads)
    else:
        flags["init"] = init
    cfg = resolve(PRESETS["tiny"], flags)
    validate(cfg, "tiny")
    return cfg


@torch.no_grad()
def coverage_nll(export: str, out: str) -> float:
    """The student's NLL per token of the held-out teacher samples (teacher forcing)."""
    from ..models import load_checkpoint
    teacher = oracle.load_teacher(os.path.join(data_dir(out), "teacher"))
    labels, codes = oracle.load_heldout(data_dir(out))
    student = load_checkpoint(export, cond_drop_rate=0.0).eval()
    return float(-oracle.token_log_probs(student, labels, codes, teacher.codebook, teacher.schedule).mean())


def _evaluate(export: str, out: str, size: OracleSize, seed: int) -> dict:
    return oracle.evaluate_student(export, data_dir(out), seed, size.n_samples, size.gap_rows)


def base_state(out: str, size: OracleSize) -> dict:
    """The base's curve so far (out/base/curve.json; empty when none); a base of another
    study (a digits study, another size) is refused."""
    state = _read_json(os.path.join(out, "base", "curve.json")) or {"key": size.key(), "curve": [], "done": False}
    if state.get("key") != size.key():
        raise SystemExit(f"error: {os.path.join(out, 'base')} holds a base of another study or size; use another --out")
    return state


def run_base(out: str, size: OracleSize, log=log_line) -> dict:
    """Teacher forcing from scratch in chunks of base_chunk steps, held-out coverage NLL after
    each, until a chunk improves it by less than 1% (or base_steps). Resumable: the trainer
    resumes its own checkpoint, and the curve is kept in base/curve.json."""
    base_dir, curve_path = os.path.join(out, "base"), os.path.join(out, "base", "curve.json")
    state = base_state(out, size)
    os.makedirs(base_dir, exist_ok=True)
    export = os.path.join(base_dir, "export.pth")
    while not state["done"]:
        steps = (len(state["curve"]) + 1) * size.base_chunk
        train_once(_trainer_config(out, base_dir, size, BASE_SEED, steps, size.base_lr, size.base_warmup,
                                   dict(objective="tf"), None, progress=True, ckpt_every=size.base_chunk))
        nll = coverage_nll(export, out)
        state["curve"].append({"step": steps, "coverage_nll": nll})
        log(f"[study] base step {steps}: held-out coverage NLL {nll:.4f}")
        prev = [c["coverage_nll"] for c in state["curve"][:-1]]
        plateau = bool(prev) and nll > min(prev) * PLATEAU
        state["done"] = plateau or steps >= size.base_steps
        state["plateau"] = plateau
        if state["done"]:  # the starting point of every arm, on the sampling noise of seed 1
            state["metrics"] = _evaluate(export, out, size, 1)
        write_json_atomic(curve_path, state)
    return state


def run_arm(out: str, size: OracleSize, arm: str, seed: int, threads: int = 1) -> dict:
    """Train arm `arm` with seed `seed` from the base, evaluate, write its JSON; returns it."""
    torch.set_num_threads(threads)
    run_dir = os.path.join(out, "runs", f"{arm}__seed{seed}")
    shutil.rmtree(run_dir, ignore_errors=True)  # a half-finished run restarts: no mixed optimiser state
    cfg = _trainer_config(out, run_dir, size, seed, size.arm_steps, size.arm_lr, size.arm_warmup,
                          oracle_arms()[arm], os.path.join(out, "base", "export.pth"), progress=False,
                          ckpt_every=size.arm_steps)
    train_s = train_once(cfg)
    start = time.perf_counter()
    metrics = _evaluate(os.path.join(run_dir, "export.pth"), out, size, seed)
    metrics["tempered"] = oracle.evaluate_tempered(os.path.join(run_dir, "export.pth"), data_dir(out), seed,
                                                   size.n_samples)
    result = {"arm": arm, "seed": seed, "key": size.key(), "base_sha256": base_sha256(out),
              "objective": cfg.objective.to_dict(), "steps": size.arm_steps, "train_s": train_s,
              "eval_s": time.perf_counter() - start, **metrics}
    os.makedirs(os.path.dirname(export_path(out, arm, seed)), exist_ok=True)
    os.replace(os.path.join(run_dir, "export.pth"), export_path(out, arm, seed))  # before the result: never one without
    os.makedirs(os.path.dirname(result_path(out, arm, seed)), exist_ok=True)
    write_json_atomic(result_path(out, arm, seed), result)
    shutil.rmtree(run_dir, ignore_errors=True)  # the training checkpoints are not worth keeping
    return result


def temper_arm(out: str, size: OracleSize, arm: str, seed: int, threads: int = 1) -> dict:
    """Add the tempered metrics (oracle.evaluate_tempered) to the result of (arm, seed) from its
    kept export (results written before they were part of run_arm); returns the result."""
    torch.set_num_threads(threads)
    path = result_path(out, arm, seed)
    result = _read_json(path)
    start = time.perf_counter()
    result["tempered"] = oracle.evaluate_tempered(export_path(out, arm, seed), data_dir(out), seed, size.n_samples)
    result["tempered_eval_s"] = time.perf_counter() - start
    write_json_atomic(path, result)
    return result


def untempered(out: str, names: list[str], seeds: int) -> list[tuple[str, int]]:
    """The (arm, seed) results without tempered metrics whose export is kept."""
    return [(arm, s) for s in range(1, seeds + 1) for arm in names
            if (r := _read_json(result_path(out, arm, s))) is not None and "tempered" not in r
            and os.path.isfile(export_path(out, arm, s))]


# ------------------------------------------------------------------------------ command line
def run_suite(args) -> dict:
    """`python -m sar_fast.study --suite oracle` with the arguments runner.build_parser parsed
    (and runner.main checked)."""
    size, names, start = jobs.start(args, ORACLE_QUICK, ORACLE_FULL, oracle_arms())
    base_state(args.out, size)  # another study's folder is refused before the data are made
    record = prepare(args.out, size)
    log_line(f"[study] oracle data in {data_dir(args.out)}: teacher entropy "
         f"{record['teacher_entropy']['per_token']:.4f} nats/token")
    base = run_base(args.out, size)
    todo, done = pending(args.out, names, size.seeds, size.key(), {None: base_sha256(args.out)})
    log_line(f"[study] base done ({base['curve'][-1]['step']} steps); {done} (arm, seed) results found, "
         f"{len(todo)} to run on {args.workers} workers")
    failed = run_pool(run_arm, args.out, size, todo, args.workers, args.threads,
                      lambda r: f"precision NLL {r['precision_nll']:.4f}, coverage NLL {r['coverage_nll']:.4f}, "
                                f"gap {r['gap_sample']:+.4f}")
    todo = untempered(args.out, names, size.seeds)
    if todo:
        log_line(f"[study] tempered metrics for {len(todo)} earlier results")
        failed += run_pool(temper_arm, args.out, size, todo, args.workers, args.threads,
                           lambda r: "at T " + ", ".join(f"{t[1:]}: precision {m['precision_nll']:.4f}, coverage "
                                                         f"{m['coverage_nll']:.4f}" for t, m in r["tempered"].items()))
    summary = report(args.out, size, names, record)
    summary["wall_s"] = time.perf_counter() - start
    with open(os.path.join(args.out, "study.md")) as f:
        print(f.read())
    print(f"[study] oracle suite: {len(names)} arms x {size.seeds} seeds in {summary['wall_s'] / 60:.1f} min; "
          f"wrote {args.out}/study.md, study.json", file=sys.stderr)
    failed_runs(failed)
    return summary
