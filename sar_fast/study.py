"""The paper's claims in miniature: `python -m sar_fast.study --out DIR [--quick]`.

One teacher-forcing base run of the embedded model (digits + grey-level tokenizer, the
trainer's `tiny` preset), trained in chunks until its held-out NLL stops improving; then
every arm continues from that base for the same number of steps, with the same data order
and draws per seed (the seed is the trainer's --seed, so seed k of every arm sees the same
batches):

- tf: continued teacher forcing (the control);
- sar_published: SAR as the public code runs it (last transition, gamma 0.01, CFG sampling);
- sar_all_{argmax,sample,cfg}_g{0.01,0.1,1}: SAR on all transitions (the paper's Eq. 6);
- sf_full, sf_alternate, sf_interleave, sf_hybrid: naive student forcing (Table 3).

Each (arm, seed) is one `sar_fast.train.Trainer` run (in a worker process, single rank),
then evaluated on the held-out digits ('val' split): TF NLL per token and per scale, the
exposure gap per scale (argmax and sampled inputs; sar_fast.metrics.exposure), and the
digits Fréchet distance and class accuracy of sampled images (sar_fast.metrics.digits, the
same images per seed in every arm: per-image noise as in sar_fast.evaluate). Each result is
written as JSON the moment it exists, so a rerun skips what is done. Then: paired
differences against tf with a seeded bootstrap interval, a table (study.md, study.json),
one plot (study.png) and a verdict per claim, given only where the interval excludes 0.
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from .embedded import DIGITS_SCHEDULE, EMBEDDED
from .metrics.stats import paired_bootstrap
from .sar import OFFICIAL

BASE_SEED = 0
GAMMAS = (0.01, 0.1, 1.0)
SAR_SAMPLINGS = ("argmax", "sample", "cfg")
SF_ARMS = ("sf_full", "sf_alternate", "sf_interleave", "sf_hybrid")
CONTROL = "tf"
MIN_SEEDS_FOR_VERDICT = 5  # fewer pairs make a percentile bootstrap too coarse to decide anything
# lower is better for every compared metric except accuracy
METRICS = {"frechet": "digits Fréchet distance", "accuracy": "class accuracy of samples",
           "nll": "TF NLL (nats/token)", "gap_sample": "exposure gap, sampled inputs (nats/token)",
           "gap_argmax": "exposure gap, argmax inputs (nats/token)"}


def _gamma_name(gamma: float) -> str:
    return f"g{gamma:g}"


def arms() -> dict[str, dict]:
    """Arm name -> the objective fields it sets (the rest: the tiny preset's objective)."""
    out = {CONTROL: dict(objective="tf"),
           # OFFICIAL's loss on the fast path (sar.py tests that objective 'official' gives the same)
    "sar_published": OFFICIAL | dict(objective="sar")}
    for sampling in SAR_SAMPLINGS:
        for gamma in GAMMAS:
            out[f"sar_all_{sampling}_{_gamma_name(gamma)}"] = dict(objective="sar", transitions="all",
                                                                   sampling=sampling, gamma=gamma)
    for name in SF_ARMS:
        out[name] = dict(objective=name)
    return out


@dataclass(frozen=True)
class StudySize:
    """Everything that sizes the study. All but `seeds` make every result's key (results of
    another size are never mixed in; more seeds extend a study)."""
    depth: int
    embed_dim: int
    num_heads: int
    batch_size: int
    base_steps: int           # the most teacher-forcing steps of the base
    base_chunk: int           # held-out NLL is measured after every chunk (the plateau check)
    base_lr: float
    base_warmup: int
    arm_steps: int
    arm_lr: float
    arm_warmup: int
    seeds: int
    samples_per_class: int

    def key(self) -> str:
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k != "seeds"}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


# Sized to fit 60 minutes on 2 quiet CPU cores (docs/study.md has the arithmetic).
FULL = StudySize(depth=3, embed_dim=96, num_heads=4, batch_size=32, base_steps=800, base_chunk=100, base_lr=1e-3,
                 base_warmup=20, arm_steps=100, arm_lr=3e-4, arm_warmup=5, seeds=5, samples_per_class=30)
# A pipeline check, not a result: a model too small and runs too short to mean anything.
QUICK = StudySize(depth=1, embed_dim=32, num_heads=2, batch_size=16, base_steps=8, base_chunk=4, base_lr=1e-3,
                  base_warmup=2, arm_steps=2, arm_lr=3e-4, arm_warmup=1, seeds=2, samples_per_class=2)


# ------------------------------------------------------------------------------ training
def _trainer_config(out: str, size: StudySize, seed: int, max_steps: int, lr: float, warmup: int, objective: dict,
                    init: str | None, progress: bool, ckpt_every: int):
    from .config import PRESETS, resolve
    flags = dict(out=out, seed=seed, device="cpu", pretrain_steps=0, max_steps=max_steps, lr=lr,
                 warmup_steps=warmup, batch_size=size.batch_size, ckpt_every=ckpt_every, keep_last=1,
                 num_samples=0, progress=progress, resume="auto", **objective)
    if init is None:
        flags.update(depth=size.depth, embed_dim=size.embed_dim, num_heads=size.num_heads)
    else:
        flags["init"] = init
    return resolve(PRESETS["tiny"], flags)


def _train(cfg) -> float:
    """One Trainer run in this process (a 1-rank group); its wall seconds."""
    from .train import Trainer
    start = time.perf_counter()
    Trainer(cfg).run()
    return time.perf_counter() - start


def _write_json(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


# ------------------------------------------------------------------------------ evaluation
def _heldout(tok):
    from .data import EmbeddedDigitsDataset
    val = EmbeddedDigitsDataset("val")
    return val.labels, torch.cat(tok.encode(val.images, DIGITS_SCHEDULE), dim=1)


@torch.no_grad()
def heldout_nll(path: str) -> float:
    """TF NLL per token on the held-out digits of the model in export file `path`."""
    from .build import build_tokenizer
    from .metrics.exposure import teacher_forcing_nll
    from .models import load_checkpoint
    model = load_checkpoint(path, cond_drop_rate=0.0).eval()
    tok = build_tokenizer(EMBEDDED, "cpu")
    labels, codes = _heldout(tok)
    return teacher_forcing_nll(model, labels, codes, DIGITS_SCHEDULE, tok.codebook())["per_token"]


@torch.no_grad()
def evaluate_export(path: str, seed: int, samples_per_class: int) -> dict:
    """Held-out metrics of the model in export file `path`; `seed` fixes the exposure
    gap's draws and the sampled images (the same noise for every arm of one seed)."""
    from .build import build_tokenizer
    from .evaluate import PRESETS as SAMPLING, image_identity, image_uniforms
    from .metrics.digits import digits_metrics
    from .metrics.exposure import exposure_gap, teacher_forcing_nll
    from .models import load_checkpoint
    from .models.generate import generate

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
    num_tokens = sum(s * s for s in schedule)
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
def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_base(out: str, size: StudySize, log=_log) -> dict:
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
        _train(cfg)
        nll = heldout_nll(export)
        state["curve"].append({"step": steps, "nll": nll})
        log(f"[study] base step {steps}: held-out TF NLL {nll:.4f}")
        prev = [c["nll"] for c in state["curve"][:-1]]
        plateau = bool(prev) and nll > min(prev) * 0.99
        state["done"] = plateau or steps >= size.base_steps
        state["plateau"] = plateau
        if state["done"]:  # the starting point of every arm, on the sampling noise of seed 1
            state["metrics"] = evaluate_export(export, 1, size.samples_per_class)
        _write_json(curve_path, state)
    return state


# ------------------------------------------------------------------------------ one arm
def result_path(out: str, arm: str, seed: int) -> str:
    return os.path.join(out, "results", f"{arm}__seed{seed}.json")


def base_sha256(out: str) -> str:
    from .data import file_sha256
    return file_sha256(os.path.join(out, "base", "export.pth"))


def run_arm(out: str, size: StudySize, arm: str, seed: int, threads: int = 1) -> dict:
    """Train arm `arm` with seed `seed` from the base, evaluate, write its JSON; returns it."""
    torch.set_num_threads(threads)
    objective = arms()[arm]
    run_dir = os.path.join(out, "runs", f"{arm}__seed{seed}")
    shutil.rmtree(run_dir, ignore_errors=True)  # a half-finished run restarts: no mixed optimiser state
    cfg = _trainer_config(run_dir, size, seed, size.arm_steps, size.arm_lr, size.arm_warmup, objective,
                          os.path.join(out, "base", "export.pth"), progress=False, ckpt_every=size.arm_steps)
    train_s = _train(cfg)
    start = time.perf_counter()
    metrics = evaluate_export(os.path.join(run_dir, "export.pth"), seed, size.samples_per_class)
    result = {"arm": arm, "seed": seed, "key": size.key(), "base_sha256": base_sha256(out),
              "objective": cfg.objective.to_dict(), "steps": size.arm_steps, "train_s": train_s,
              "eval_s": time.perf_counter() - start, **metrics}
    os.makedirs(os.path.dirname(result_path(out, arm, seed)), exist_ok=True)
    _write_json(result_path(out, arm, seed), result)
    shutil.rmtree(run_dir, ignore_errors=True)  # checkpoints of 75 runs are not worth keeping
    return result


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------ analysis
def _better(metric: str, diff: dict) -> str | None:
    """'better' / 'worse' when the interval of arm - control excludes 0 and rests on at
    least MIN_SEEDS_FOR_VERDICT seeds, else None."""
    if not diff["excludes_zero"] or diff["n"] < MIN_SEEDS_FOR_VERDICT:
        return None
    lower_is_better = metric != "accuracy"
    improved = diff["high"] < 0 if lower_is_better else diff["low"] > 0
    return "better" if improved else "worse"


def summarize(results: list[dict], seed: int = 0) -> dict:
    """Per arm: mean and sd of every metric over seeds; paired differences against tf."""
    by_arm: dict[str, dict[int, dict]] = {}
    for r in results:
        by_arm.setdefault(r["arm"], {})[r["seed"]] = r
    control = by_arm.get(CONTROL, {})
    rows = {}
    for arm in [a for a in arms() if a in by_arm]:
        runs = by_arm[arm]
        row = {"seeds": sorted(runs)}
        for m in METRICS:
            values = np.array([runs[s][m] for s in sorted(runs)])
            row[m] = {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if len(values) > 1 else None}
        row["nll_per_scale"] = np.mean([runs[s]["nll_per_scale"] for s in runs], axis=0).tolist()
        row["gap_sample_per_scale"] = np.mean([runs[s]["gaps"]["sample"]["per_scale"] for s in runs], axis=0).tolist()
        paired = sorted(set(runs) & set(control))
        if arm != CONTROL and len(paired) >= 2:
            row["vs_tf"] = {m: paired_bootstrap([runs[s][m] for s in paired], [control[s][m] for s in paired],
                                                seed=seed) for m in METRICS}
            for m, d in row["vs_tf"].items():
                d["direction"] = _better(m, d)
        rows[arm] = row
    return rows


FEW_SEEDS = f"not resolved (fewer than {MIN_SEEDS_FOR_VERDICT} seeds)"


def _verdict_from(direction: str | None, wanted: str) -> str:
    if direction is None:
        return "not resolved at this scale"
    if direction in ("missing", "few"):
        return "not run" if direction == "missing" else FEW_SEEDS
    return "reproduced" if direction == wanted else "contradicted"


def best_sar_all(rows: dict) -> str | None:
    """The CFG-sampled Eq. 6 arm with the lowest mean Fréchet distance (chosen on the same
    seeds it is then compared on, so an optimistic choice: it can only favour SAR)."""
    names = [f"sar_all_cfg_{_gamma_name(g)}" for g in GAMMAS if f"sar_all_cfg_{_gamma_name(g)}" in rows]
    return min(names, key=lambda a: rows[a]["frechet"]["mean"]) if names else None


def verdicts(rows: dict, seed: int = 0, results: list[dict] | None = None) -> list[dict]:
    """One verdict per (claim, arm) on the Fréchet distance (the sample-quality metric; the
    paper's claims are about FID), given only where the paired interval excludes 0."""
    out = []

    def direction(arm: str, metric: str = "frechet") -> str | None:
        diff = rows.get(arm, {}).get("vs_tf", {}).get(metric)
        if diff is None:
            return "missing"
        return "few" if diff["n"] < MIN_SEEDS_FOR_VERDICT else diff["direction"]

    for arm in SF_ARMS:
        if "vs_tf" in rows.get(arm, {}):
            out.append({"claim": "naive student forcing trains worse than teacher forcing", "arm": arm,
                        "evidence": "Fréchet distance vs tf",
                        "verdict": _verdict_from(direction(arm), "worse")})
    best = best_sar_all(rows)
    sar_arms = [a for a in ("sar_published", best) if a and "vs_tf" in rows.get(a, {})]
    for arm in sar_arms:
        out.append({"claim": "SAR improves on teacher forcing", "arm": arm, "evidence": "Fréchet distance vs tf",
                    "verdict": _verdict_from(direction(arm), "better")})
    if best is not None and results is not None:
        gamma = best.rsplit("_", 1)[1]
        by = {(r["arm"], r["seed"]): r["frechet"] for r in results}
        parts = []
        for other in ("argmax", "sample"):
            name = f"sar_all_{other}_{gamma}"
            seeds = sorted(s for (a, s) in by if a == best and (name, s) in by)
            if len(seeds) >= 2:
                d = paired_bootstrap([by[(best, s)] for s in seeds], [by[(name, s)] for s in seeds], seed=seed)
                parts.append((name, d))
        if parts:
            dirs = [_better("frechet", d) for _, d in parts]
            verdict = FEW_SEEDS if any(d["n"] < MIN_SEEDS_FOR_VERDICT for _, d in parts) else \
                "reproduced" if all(x == "better" for x in dirs) else \
                "contradicted" if any(x == "worse" for x in dirs) else "not resolved at this scale"
            out.append({"claim": "CFG sampling of the rollout inputs is the best variant", "arm": best,
                        "evidence": "Fréchet distance of cfg minus " + ", ".join(
                            f"{n}: {d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]" for n, d in parts),
                        "verdict": verdict, "intervals": {n: d for n, d in parts}})
    for arm in sar_arms:
        gain, gap = direction(arm), direction(arm, "gap_sample")
        if gain == "few":
            verdict = FEW_SEEDS
        elif gain != "better":
            verdict = "not resolved at this scale (no quality gain over tf to attribute)" if gain is None else \
                "not resolved at this scale (SAR is worse than tf here)"
        else:
            verdict = "reproduced" if gap == "better" else "contradicted" if gap == "worse" else \
                "not resolved at this scale"
        out.append({"claim": "the gain comes from closing the train-test gap", "arm": arm,
                    "evidence": "Fréchet distance and exposure gap (sampled inputs) vs tf", "verdict": verdict})
    return out


def _fmt(m: dict) -> str:
    return f"{m['mean']:.3f}" + (f" ± {m['sd']:.3f}" if m.get("sd") is not None else "")


def _fmt_diff(d: dict | None) -> str:
    if d is None:
        return "—"
    return f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]" + (" *" if d["excludes_zero"] else "")


def markdown_table(rows: dict, base: dict | None, claims: list[dict], size: StudySize) -> str:
    lines = ["| arm | seeds | Fréchet | accuracy | TF NLL | gap (sampled) | gap (argmax) | ΔFréchet vs tf | "
             "ΔNLL vs tf | Δgap (sampled) vs tf |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for arm, row in rows.items():
        vs = row.get("vs_tf", {})
        lines.append(f"| {arm} | {len(row['seeds'])} | {_fmt(row['frechet'])} | {_fmt(row['accuracy'])} | "
                     f"{_fmt(row['nll'])} | {_fmt(row['gap_sample'])} | {_fmt(row['gap_argmax'])} | "
                     f"{_fmt_diff(vs.get('frechet'))} | {_fmt_diff(vs.get('nll'))} | "
                     f"{_fmt_diff(vs.get('gap_sample'))} |")
    text = ["Mean ± sd over seeds; Δ: paired mean difference arm - tf with its 95% paired bootstrap interval "
            f"(* = excludes 0). Lower is better except accuracy. A verdict needs an interval that excludes 0 "
            f"over at least {MIN_SEEDS_FOR_VERDICT} seeds.", "", *lines, ""]
    if base:
        text += [f"Base: {base['curve'][-1]['step']} teacher-forcing steps, held-out NLL "
                 f"{base['curve'][-1]['nll']:.4f} ({'plateau reached' if base.get('plateau') else 'step limit'}); "
                 f"every arm then trains {size.arm_steps} steps at batch {size.batch_size}.", ""]
    text += ["| claim | arm | verdict | evidence |", "|---|---|---|---|"]
    text += [f"| {c['claim']} | {c['arm']} | {c['verdict']} | {c['evidence']} |" for c in claims]
    return "\n".join(text) + "\n"


def plot(rows: dict, path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = [a for a in rows if "vs_tf" in rows[a]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.35 * len(names) + 1.8), sharey=True)
    for ax, metric in zip(axes, ("frechet", "gap_sample")):
        d = [rows[a]["vs_tf"][metric] for a in names]
        y = np.arange(len(names))
        ax.errorbar([x["mean"] for x in d], y, xerr=[[x["mean"] - x["low"] for x in d],
                                                      [x["high"] - x["mean"] for x in d]], fmt="o", capsize=3)
        ax.axvline(0.0, color="grey", lw=0.8)
        ax.set_title(f"Δ {METRICS[metric]} vs tf (95% paired bootstrap)", fontsize=9)
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3))
    axes[0].set_yticks(np.arange(len(names)), names, fontsize=8)
    axes[0].invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def report(out: str, size: StudySize, arm_names: list[str], seed: int = 0) -> dict:
    results = [r for arm in arm_names for s in range(1, size.seeds + 1)
               if (r := _read_json(result_path(out, arm, s))) is not None and r.get("key") == size.key()]
    rows = summarize(results, seed)
    base = _read_json(os.path.join(out, "base", "curve.json"))
    claims = verdicts(rows, seed, results)
    table = markdown_table(rows, base, claims, size)
    summary = {"size": dataclasses.asdict(size), "base": base, "arms": rows, "claims": claims,
               "best_sar_all": best_sar_all(rows), "arm_objectives": {a: arms()[a] for a in rows}}
    _write_json(os.path.join(out, "study.json"), summary)
    with open(os.path.join(out, "study.md"), "w") as f:
        f.write(table)
    plot(rows, os.path.join(out, "study.png"))
    return summary


# ------------------------------------------------------------------------------ command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sar_fast.study", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="study directory (base/, results/, study.md/.json/.png); a rerun "
                                                "with the same directory skips the finished (arm, seed) runs")
    p.add_argument("--quick", action="store_true", help="a pipeline check (about a minute on 2 quiet cores): "
                                                        "tiny model, a few steps, 2 seeds; its numbers mean nothing")
    p.add_argument("--arms", default="all", help="comma-separated arm names, or 'all' (" + ", ".join(arms()) + ")")
    p.add_argument("--seeds", type=int, default=argparse.SUPPRESS, help="seeds per arm (default: 5, --quick 2)")
    p.add_argument("--workers", type=int, default=2, help="(arm, seed) runs in parallel, one process each")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    return p


def check_out(out: str) -> None:
    """--out must be a folder this study may write (created when missing): not a file, not a
    training run or checkpoint folder."""
    from .cli import InputError
    from .safe_load import describe_folder
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"error: --out {out} exists and is not a directory; expected a study directory "
                         "(created when missing)")
    if os.path.isdir(out) and (os.path.isfile(os.path.join(out, "COMPLETE"))
                               or os.path.isdir(os.path.join(out, "checkpoints"))):
        raise InputError(f"error: --out {describe_folder(out)}; expected a study directory (created when missing)")


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    check_out(args.out)
    size = QUICK if args.quick else FULL
    if "seeds" in vars(args):
        if args.seeds < 2:
            raise SystemExit("error: --seeds must be >= 2 (paired intervals need two seeds)")
        size = dataclasses.replace(size, seeds=args.seeds)
    if args.workers < 1 or args.threads < 1:
        raise SystemExit("error: --workers and --threads must be >= 1")
    names = list(arms()) if args.arms == "all" else [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = sorted(set(names) - set(arms()))
    if unknown:
        raise SystemExit(f"error: --arms: unknown {unknown}; known: {', '.join(arms())}")
    if CONTROL not in names:
        names.insert(0, CONTROL)  # every comparison is against it
    os.makedirs(os.path.join(args.out, "results"), exist_ok=True)
    start = time.perf_counter()
    torch.set_num_threads(args.threads * args.workers)  # the base is one run: give it every core
    base = run_base(args.out, size)
    todo, done, base_id = [], 0, base_sha256(args.out)
    for s in range(1, size.seeds + 1):  # seed-major: an interrupted study leaves whole seeds to compare
        for arm in names:
            r = _read_json(result_path(args.out, arm, s))
            if r is not None and (r.get("key"), r.get("base_sha256")) != (size.key(), base_id):
                raise SystemExit(f"error: {result_path(args.out, arm, s)} is from a study of another size or "
                                 "another base; use another --out")
            if r is None:
                todo.append((arm, s))
            else:
                done += 1
    print(f"[study] base done ({base['curve'][-1]['step']} steps); {done} (arm, seed) results found, "
          f"{len(todo)} to run on {args.workers} workers", file=sys.stderr, flush=True)
    arms_start, failed = time.perf_counter(), []
    ctx = multiprocessing.get_context("spawn")  # fresh processes: no forked torch threads or process group
    with futures.ProcessPoolExecutor(args.workers, mp_context=ctx, initializer=_worker_init,
                                     initargs=(args.threads,)) as pool:
        jobs = {pool.submit(run_arm, args.out, size, arm, s, args.threads): (arm, s) for arm, s in todo}
        for k, job in enumerate(futures.as_completed(jobs), 1):
            arm, s = jobs[job]
            elapsed = time.perf_counter() - arms_start
            eta = elapsed / k * (len(todo) - k)
            try:
                r = job.result()
            except Exception as e:  # keep going: the other runs' results are worth having
                failed.append((arm, s, repr(e)))
                print(f"[study] {k}/{len(todo)} {arm} seed {s} FAILED: {e!r}", file=sys.stderr, flush=True)
                continue
            print(f"[study] {k}/{len(todo)} {arm} seed {s}: Fréchet {r['frechet']:.3f}, NLL {r['nll']:.4f}, "
                  f"gap {r['gap_sample']:+.4f} (train {r['train_s']:.0f}s); elapsed {elapsed / 60:.1f} min, "
                  f"ETA {eta / 60:.1f} min", file=sys.stderr, flush=True)
    summary = report(args.out, size, names)
    summary["wall_s"] = time.perf_counter() - start
    print(open(os.path.join(args.out, "study.md")).read())
    print(f"[study] {len(names)} arms x {size.seeds} seeds in {summary['wall_s'] / 60:.1f} min; "
          f"wrote {args.out}/study.md, study.json, study.png", file=sys.stderr)
    if failed:
        raise SystemExit(f"error: {len(failed)} (arm, seed) runs failed (the table leaves them out; rerun the "
                         f"same command to retry them): " + "; ".join(f"{a} seed {s}: {e}" for a, s, e in failed))
    return summary


if __name__ == "__main__":
    from .cli import run_main
    run_main(main)
