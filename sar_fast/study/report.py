"""The study's report: paired differences against the control, a verdict per claim, the table
(study.md), study.json and the plot."""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from ..files import write_json_atomic
from ..metrics.stats import paired_bootstrap
from .design import CONTROL, GAMMAS, SF_ARMS, StudySize, _gamma_name, _read_json, arms, result_path

MIN_SEEDS_FOR_VERDICT = 5  # fewer pairs make a percentile bootstrap too coarse to decide anything


# lower is better for every compared metric except accuracy
METRICS = {"frechet": "digits Fréchet distance", "accuracy": "class accuracy of samples",
           "nll": "TF NLL (nats/token)", "gap_sample": "exposure gap, sampled inputs (nats/token)",
           "gap_argmax": "exposure gap, argmax inputs (nats/token)"}


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


def fmt_mean_sd(m: dict, digits: int = 3) -> str:
    """'mean ± sd' of a metric over seeds (the mean alone with one seed)."""
    return f"{m['mean']:.{digits}f}" + (f" ± {m['sd']:.{digits}f}" if m.get("sd") is not None else "")


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
        means = " | ".join(fmt_mean_sd(row[m]) for m in ("frechet", "accuracy", "nll", "gap_sample", "gap_argmax"))
        lines.append(f"| {arm} | {len(row['seeds'])} | {means} | "
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
    write_json_atomic(os.path.join(out, "study.json"), summary)
    with open(os.path.join(out, "study.md"), "w") as f:
        f.write(table)
    plot(rows, os.path.join(out, "study.png"))
    return summary
