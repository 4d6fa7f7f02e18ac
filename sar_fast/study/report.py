"""The digits suite's analysis: every result flattened to named numbers, paired differences
against the control per base (t-interval and p-value, the bootstrap beside it), and the
claims' verdicts by the rule fixed before the run (sar_fast.metrics.stats.verdict: Holm over
the comparisons of a claim per metric, a margin of 5% of the control's mean), per base and
combined over bases. The tables and the plot: report_md."""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from ..files import write_json_atomic
from ..metrics.stats import holm, paired_bootstrap, paired_t, verdict
from .design import (CONTROL, EVAL_GRID, GAMMAS, SF_ARMS, TEMPERATURE_SETTINGS, StudySize, _gamma_name, _read_json,
                     arms, result_path)
from .report_md import arm_order, markdown, mean_sd, plot

# name -> lower is better
METRICS = {"frechet": True, "accuracy": False, "precision": False, "recall": False, "nll": True,
           "gap_sample": True, "gap_argmax": True, "ce_own": True, "ce_gt": True}
SAMPLE_METRICS = ("frechet", "accuracy", "precision", "recall")

ALPHA = 0.05
MARGIN_FRACTION = 0.05
SAR_ARMS = ("sar_published", "sar_published_ssr_paper", *(f"sar_all_cfg_{_gamma_name(g)}" for g in GAMMAS),
            "sar_all_cfg_g1_gt", "sar_all_cfg_g1_soft")
# The rule, fixed before any run. Each claim: its comparisons (arm, control); the metrics it
# is judged on; the paper's direction ('better' / 'worse' for the arm). A control 'tf@T*' is
# tf sampled at its own best temperature of TEMPERATURE_SETTINGS (the sharpening control).
# 'needs': a comparison is only judged where the named claim is reproduced for the same arm.
CLAIMS = (
    {"id": "sf_worse", "claim": "naive student forcing trains worse than teacher forcing", "wanted": "worse",
     "comparisons": tuple((a, CONTROL) for a in SF_ARMS), "metrics": ("frechet",)},
    {"id": "sar_better", "claim": "SAR improves on teacher forcing", "wanted": "better",
     "comparisons": tuple((a, CONTROL) for a in SAR_ARMS), "metrics": ("frechet", "recall")},
    {"id": "cfg_best", "claim": "CFG sampling of the rollout inputs beats argmax and plain sampling (every gamma)",
     "wanted": "better", "metrics": ("frechet",),
     "comparisons": tuple((f"sar_all_cfg_{_gamma_name(g)}", f"sar_all_{o}_{_gamma_name(g)}")
                          for g in GAMMAS for o in ("argmax", "sample"))},
    {"id": "not_sharpening", "claim": "SAR's gain survives a temperature-matched TF control", "wanted": "better",
     "comparisons": tuple((a, "tf@T*") for a in SAR_ARMS), "metrics": ("frechet",)},
    {"id": "closes_gap", "claim": "the gain comes from closing the train-test gap", "wanted": "better",
     "comparisons": tuple((a, CONTROL) for a in SAR_ARMS), "metrics": ("gap_sample",), "needs": "sar_better"},
)
REPRODUCED = "reproduced"
NOT_RUN = "not run (fewer than 2 seeds of both arms)"
NO_GAIN = "not resolved (no reproduced quality gain to attribute)"


# ------------------------------------------------------------------------------ the numbers
def flat(result: dict) -> dict[str, float]:
    """Every number of one result by name: the METRICS, 'metric@setting' of the grid,
    'metric@step<k>' of the learning curve, 'rollout_frechet@k<k>' / 'rollout_accuracy@k<k>'."""
    out = {m: float(result[m]) for m in METRICS}
    for setting, values in result.get("grid", {}).items():
        out.update({f"{m}@{setting}": float(values[m]) for m in SAMPLE_METRICS})
    for point in result.get("curve", []):
        out.update({f"{m}@step{point['step']}": float(v) for m, v in point.items() if m != "step"})
    for point in result.get("rollout", []):
        out[f"rollout_frechet@k{point['k']}"] = float(point["frechet"])
        out[f"rollout_accuracy@k{point['k']}"] = float(point["accuracy"])
    return out


def lower_is_better(name: str) -> bool:
    base = name.split("@")[0].removeprefix("rollout_")
    return METRICS[base]


def by_base(results: list[dict]) -> dict[int, dict[str, dict[int, dict[str, float]]]]:
    """{base: {arm: {seed: flat numbers}}}."""
    out: dict = {}
    for r in results:
        out.setdefault(int(r["base"]), {}).setdefault(r["arm"], {})[int(r["seed"])] = flat(r)
    return out


def describe(runs: dict[int, dict[str, float]]) -> dict:
    """{'seeds', name: {mean, sd}} over the seeds of one arm of one base."""
    seeds = sorted(runs)
    names = set.intersection(*(set(runs[s]) for s in seeds))
    return {"seeds": seeds, **{n: mean_sd([runs[s][n] for s in seeds]) for n in sorted(names)}}


def tf_best_temperature(arms_of_base: dict) -> str | None:
    """tf's setting of TEMPERATURE_SETTINGS with the lowest mean Fréchet distance (None
    without tf): the sharpening control, chosen in tf's favour."""
    tf = arms_of_base.get(CONTROL)
    if not tf:
        return None
    means = {s: np.mean([v[f"frechet@{s}"] for v in tf.values()]) for s in TEMPERATURE_SETTINGS
             if all(f"frechet@{s}" in v for v in tf.values())}
    return min(means, key=means.get) if means else None


def compare(arms_of_base: dict, arm: str, control: str, metric: str, seed: int = 0) -> dict | None:
    """Paired arm - control of `metric` over the seeds both have ('t' and 'bootstrap'), None
    with fewer than 2. control 'tf@T*': tf's Fréchet-type metric at its best temperature."""
    control_metric = metric
    if control == "tf@T*":
        best = tf_best_temperature(arms_of_base)
        if best is None:
            return None
        control, control_metric = CONTROL, f"{metric.split('@')[0]}@{best}"
    a, c = arms_of_base.get(arm, {}), arms_of_base.get(control, {})
    seeds = sorted(s for s in set(a) & set(c) if metric in a[s] and control_metric in c[s])
    if len(seeds) < 2:
        return None
    x, y = [a[s][metric] for s in seeds], [c[s][control_metric] for s in seeds]
    return {"t": paired_t(x, y), "bootstrap": paired_bootstrap(x, y, seed=seed),
            "control_mean": float(np.mean(y)), "control_metric": control_metric}


def paper_direction(wanted: str, metric: str) -> str:
    """The stats.verdict direction ('lower'/'higher' of arm - control) of a 'better'/'worse' claim."""
    better_is_lower = lower_is_better(metric)
    return "lower" if (wanted == "better") == better_is_lower else "higher"


# ------------------------------------------------------------------------------ the verdicts
def claim_verdicts(arms_of_base: dict, seed: int = 0) -> list[dict]:
    """One entry per (claim, comparison, metric) for one base: the paired t-interval, the
    Holm-adjusted p-value over the claim's judged comparisons (per metric), the margin and
    the verdict; NOT_RUN or NO_GAIN where nothing is judged."""
    out, reproduced = [], set()
    for spec in CLAIMS:
        for metric in spec["metrics"]:
            judged = {}
            for arm, control in spec["comparisons"]:
                d = compare(arms_of_base, arm, control, metric, seed)
                entry = {"claim": spec["claim"], "id": spec["id"], "arm": arm, "control": control, "metric": metric,
                         "wanted": spec["wanted"]}
                if d is None:
                    entry["verdict"] = NOT_RUN
                elif "needs" in spec and (spec["needs"], arm) not in reproduced:
                    entry["verdict"] = NO_GAIN
                else:
                    judged[(arm, control)] = d
                    entry.update(diff=d["t"]["mean"], low=d["t"]["low"], high=d["t"]["high"], p=d["t"]["p"],
                                 n=d["t"]["n"], margin=MARGIN_FRACTION * abs(d["control_mean"]),
                                 control_metric=d["control_metric"])
                out.append(entry)
            adjusted = dict(zip(judged, holm([d["t"]["p"] for d in judged.values()])))
            for entry in out:
                pair = (entry["arm"], entry["control"])
                if entry["id"] == spec["id"] and entry["metric"] == metric and pair in adjusted:
                    entry["holm_p"] = adjusted[pair]
                    entry["verdict"] = verdict(entry["low"], entry["high"], entry["diff"], entry["holm_p"],
                                               entry["margin"], paper_direction(spec["wanted"], metric), ALPHA)
                    if entry["verdict"] == REPRODUCED and metric == spec["metrics"][0]:
                        reproduced.add((spec["id"], entry["arm"]))
    return out


def combine(per_base: dict[int, list[dict]]) -> list[dict]:
    """One verdict per (claim, comparison, metric) over the bases: the bases' common verdict
    when they agree, else 'not resolved (bases disagree)'; beside it the pooled difference
    with the base as a random effect (a t-interval over the bases' mean differences, df =
    bases - 1), when at least 2 bases judged it."""
    bases = sorted(per_base)
    out = []
    for i, first in enumerate(per_base[bases[0]]):
        entries = [per_base[b][i] for b in bases]
        verdicts = {e["verdict"] for e in entries}
        combined = verdicts.pop() if len(verdicts) == 1 else "not resolved (bases disagree)"
        row = {k: first[k] for k in ("claim", "id", "arm", "control", "metric", "wanted")}
        row.update(verdict=combined, per_base={b: e["verdict"] for b, e in zip(bases, entries)})
        diffs = [e["diff"] for e in entries if "diff" in e]
        if len(diffs) >= 2:
            row["pooled"] = paired_t(diffs, [0.0] * len(diffs))
        out.append(row)
    return out


def analyse(results: list[dict], seed: int = 0) -> dict:
    """Everything the tables show: per base the arms' means, the paired differences against tf
    of every number (and against tf@T* of the Fréchet distance), the verdicts; the combined
    verdicts."""
    data = by_base(results)
    bases = {}
    for b, arms_of_base in sorted(data.items()):
        rows = {arm: describe(runs) for arm, runs in arms_of_base.items()}
        vs_tf = {}
        for arm in arms_of_base:
            if arm == CONTROL:
                continue
            names = [n for n in rows[arm] if n != "seeds"]
            vs_tf[arm] = {n: d for n in names if (d := compare(arms_of_base, arm, CONTROL, n, seed)) is not None}
            if (d := compare(arms_of_base, arm, "tf@T*", "frechet", seed)) is not None:
                vs_tf[arm]["frechet vs tf@T*"] = d
        bases[b] = {"arms": rows, "vs_tf": vs_tf, "tf_best_temperature": tf_best_temperature(arms_of_base),
                    "claims": claim_verdicts(arms_of_base, seed)}
    combined = combine({b: v["claims"] for b, v in bases.items()}) if bases else []
    return {"bases": bases, "claims": combined}


def report(out: str, size: StudySize, arm_names: list[str], seed: int = 0) -> dict:
    """Read the results of `size` under `out`; write out/study.json, study.md and study.png."""
    results = [r for arm in arm_names for b in range(1, size.bases + 1) for s in range(1, size.seeds + 1)
               if (r := _read_json(result_path(out, arm, s, b))) is not None and r.get("key") == size.key()]
    analysis = analyse(results, seed)
    base_curves = {b: _read_json(os.path.join(out, "bases", f"base{b}", "curve.json"))
                   for b in range(1, size.bases + 1)}
    summary = {"suite": "digits", "size": dataclasses.asdict(size), "key": size.key(), "grid": EVAL_GRID,
               "rule": {"alpha": ALPHA, "margin_fraction": MARGIN_FRACTION, "claims": [dict(c) for c in CLAIMS]},
               "base_curves": base_curves, **analysis,
               "arm_objectives": {a: arms()[a] for a in arm_order({r["arm"] for r in results})}}
    write_json_atomic(os.path.join(out, "study.json"), summary)
    with open(os.path.join(out, "study.md"), "w") as f:
        f.write(markdown(summary, size))
    plot(summary, os.path.join(out, "study.png"))
    return summary
