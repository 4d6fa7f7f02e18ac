"""Training and evaluating the digits suite's base and arms (resumable per result file) and the
command line of both suites (`--suite oracle`: oracle_suite.py); the design is in
sar_fast/study/__init__.py."""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import torch

from ..data.digits import DIGITS_SCHEDULE
from ..files import write_json_atomic
from ..models.tokenizers.grey import EMBEDDED
from .design import BASE_SEED, FULL, ORACLE_ARMS, QUICK, StudySize, _read_json, arms, result_path
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


# ------------------------------------------------------------------------------ evaluation
def _heldout(tok):
    from ..data.digits import EmbeddedDigitsDataset
    val = EmbeddedDigitsDataset("val")
    return val.labels, torch.cat(tok.encode(val.images, DIGITS_SCHEDULE), dim=1)


@torch.no_grad()
def heldout_nll(path: str) -> float:
    """TF NLL per token on the held-out digits of the model in export file `path`."""
    from ..metrics.exposure import teacher_forcing_nll
    from ..models import load_checkpoint
    from ..models.tokenizers import build_tokenizer
    model = load_checkpoint(path, cond_drop_rate=0.0).eval()
    tok = build_tokenizer(EMBEDDED, "cpu")
    labels, codes = _heldout(tok)
    return teacher_forcing_nll(model, labels, codes, DIGITS_SCHEDULE, tok.codebook())["per_token"]


@torch.no_grad()
def evaluate_export(path: str, seed: int, samples_per_class: int) -> dict:
    """Held-out metrics of the model in export file `path`; `seed` fixes the exposure
    gap's draws and the sampled images (the same noise for every arm of one seed)."""
    from ..metrics.digits import digits_metrics
    from ..metrics.exposure import exposure_gap, teacher_forcing_nll
    from ..models import load_checkpoint
    from ..models.generate import PRESETS as SAMPLING
    from ..models.generate import generate
    from ..rng import image_identity, image_uniforms
    from ..models.tokenizers import build_tokenizer

    model = load_checkpoint(path, cond_drop_rate=0.0).eval()
    tok = build_tokenizer(EMBEDDED, "cpu")
    book, schedule = tok.codebook(), DIGITS_SCHEDULE
    labels, codes = _heldout(tok)
    nll = teacher_forcing_nll(model, labels, codes, schedule, book)
    gaps = {}
    for prediction in ("argmax", "sample"):
        gen = torch.Generator().manual_seed(seed * 7_777 + 1)
        g = exposure_gap(model, labels, codes, schedule, book, prediction=prediction, generator=gen)
        gaps[prediction] = {"mean": g.mean, "per_scale": g.gap.tolist(), "ce_own": g.ce_own.tolist(),
                            "ce_gt": g.ce_gt.tolist()}
    settings = SAMPLING["digits"]
    num = 10 * samples_per_class
    ids = [image_identity(k, 10) for k in range(num)]
    sample_labels = torch.tensor([c for c, _ in ids])
    num_tokens = schedule.total
    uniforms = torch.stack([image_uniforms(seed, c, i, num_tokens) for c, i in ids])
    images = generate(model, book, sample_labels, schedule, cfg=settings["cfg"], cfg_ramp=settings["cfg_ramp"],
                      top_k=settings["top_k"], top_p=settings["top_p"], uniforms=uniforms,
                      decode=tok.decode).images
    digits = digits_metrics(images, sample_labels)
    return {"nll": nll["per_token"], "nll_per_scale": nll["per_scale"],
            "gap_argmax": gaps["argmax"]["mean"], "gap_sample": gaps["sample"]["mean"], "gaps": gaps,
            "frechet": digits["frechet"], "accuracy": digits["accuracy"], "num_images": digits["num_images"],
            "sampling": dict(settings, schedule=list(schedule))}


# ------------------------------------------------------------------------------ the base
def run_base(out: str, size: StudySize, log=log_line) -> dict:
    """Teacher forcing from scratch in chunks of base_chunk steps, held-out NLL after each,
    until the NLL improves by less than 1% over a chunk (or base_steps). Resumable: the
    trainer resumes its own checkpoint, and the curve is kept in base/curve.json."""
    base_dir = os.path.join(out, "base")
    curve_path = os.path.join(base_dir, "curve.json")
    state = _read_json(curve_path) or {"key": size.key(), "curve": [], "done": False}
    if state["key"] != size.key():
        raise SystemExit(f"error: {base_dir} holds a base of another study size; use another --out")
    os.makedirs(base_dir, exist_ok=True)
    export = os.path.join(base_dir, "export.pth")
    while not state["done"]:
        steps = (len(state["curve"]) + 1) * size.base_chunk
        cfg = _trainer_config(base_dir, size, BASE_SEED, steps, size.base_lr, size.base_warmup,
                              dict(objective="tf"), None, progress=True, ckpt_every=size.base_chunk)
        train_once(cfg)
        nll = heldout_nll(export)
        state["curve"].append({"step": steps, "nll": nll})
        log(f"[study] base step {steps}: held-out TF NLL {nll:.4f}")
        prev = [c["nll"] for c in state["curve"][:-1]]
        plateau = bool(prev) and nll > min(prev) * 0.99
        state["done"] = plateau or steps >= size.base_steps
        state["plateau"] = plateau
        if state["done"]:  # the starting point of every arm, on the sampling noise of seed 1
            state["metrics"] = evaluate_export(export, 1, size.samples_per_class)
        write_json_atomic(curve_path, state)
    return state


def run_arm(out: str, size: StudySize, arm: str, seed: int, threads: int = 1) -> dict:
    """Train arm `arm` with seed `seed` from the base, evaluate, write its JSON; returns it."""
    torch.set_num_threads(threads)
    objective = arms()[arm]
    run_dir = os.path.join(out, "runs", f"{arm}__seed{seed}")
    shutil.rmtree(run_dir, ignore_errors=True)  # a half-finished run restarts: no mixed optimiser state
    cfg = _trainer_config(run_dir, size, seed, size.arm_steps, size.arm_lr, size.arm_warmup, objective,
                          os.path.join(out, "base", "export.pth"), progress=False, ckpt_every=size.arm_steps)
    train_s = train_once(cfg)
    start = time.perf_counter()
    metrics = evaluate_export(os.path.join(run_dir, "export.pth"), seed, size.samples_per_class)
    result = {"arm": arm, "seed": seed, "key": size.key(), "base_sha256": base_sha256(out),
              "objective": cfg.objective.to_dict(), "steps": size.arm_steps, "train_s": train_s,
              "eval_s": time.perf_counter() - start, **metrics}
    os.makedirs(os.path.dirname(result_path(out, arm, seed)), exist_ok=True)
    write_json_atomic(result_path(out, arm, seed), result)
    shutil.rmtree(run_dir, ignore_errors=True)  # checkpoints of 75 runs are not worth keeping
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
    p.add_argument("--arms", default="all", help="comma-separated arm names, or 'all' (digits: " + ", ".join(arms())
                   + "; oracle: " + ", ".join(ORACLE_ARMS) + ")")
    p.add_argument("--seeds", type=int, default=argparse.SUPPRESS, help="seeds per arm (default: 5, --quick 2)")
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
    if "seeds" in vars(args) and args.seeds < 2:
        raise SystemExit("error: --seeds must be >= 2 (paired intervals need two seeds)")
    if args.workers < 1 or args.threads < 1:
        raise SystemExit("error: --workers and --threads must be >= 1")
    if args.suite == "oracle":
        from .oracle_suite import run_suite
        return run_suite(args)
    size, names, start = jobs.start(args, QUICK, FULL, arms())
    base = run_base(args.out, size)
    todo, done = pending(args.out, names, size.seeds, size.key(), base_sha256(args.out))
    print(f"[study] base done ({base['curve'][-1]['step']} steps); {done} (arm, seed) results found, "
          f"{len(todo)} to run on {args.workers} workers", file=sys.stderr, flush=True)
    failed = run_pool(run_arm, args.out, size, todo, args.workers, args.threads,
                      lambda r: f"Fréchet {r['frechet']:.3f}, NLL {r['nll']:.4f}, gap {r['gap_sample']:+.4f}")
    summary = report(args.out, size, names)
    summary["wall_s"] = time.perf_counter() - start
    print(open(os.path.join(args.out, "study.md")).read())
    print(f"[study] {len(names)} arms x {size.seeds} seeds in {summary['wall_s'] / 60:.1f} min; "
          f"wrote {args.out}/study.md, study.json, study.png", file=sys.stderr)
    failed_runs(failed)
    return summary
