"""The oracle suite's report: per arm mean ± sd of every metric, paired differences against tf
(t-interval and p-value, the bootstrap beside it), the claims' verdicts by the rule fixed
before the run (sar_fast.metrics.stats.verdict: Holm over the arms of a claim, a margin of
5% of tf's mean), study.md and study.json."""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from ..files import write_json_atomic
from ..metrics.stats import holm, paired_bootstrap, paired_t, verdict
from .design import CONTROL, ORACLE_ARMS, OracleSize, _read_json, oracle_arms, result_path
from .report_md import fmt_mean_sd

# every metric: lower is better
METRICS = {"precision_nll": "precision NLL: the teacher's NLL of student samples (nats/token)",
           "coverage_nll": "coverage NLL: the student's NLL of held-out teacher samples (nats/token)",
           "gap_sample": "exposure gap, sampled inputs (nats/token)",
           "gap_argmax": "exposure gap, argmax inputs (nats/token)"}

# The rule, fixed before any run: each claim's arms are compared with tf on each evidence
# metric; Holm over the claim's arms per metric; alpha 0.05; the margin (the smallest effect
# that would matter) 5% of tf's mean of that metric. `wanted`: the paper's direction of arm - tf.
ALPHA = 0.05
MARGIN_FRACTION = 0.05
CLAIMS = ({"claim": "SAR improves on teacher forcing", "wanted": "lower",
           "arms": ("sar_published", "sar_all_sample_g0.1", "sar_all_sample_g1", "sar_all_cfg_g0.1",
                    "sar_all_cfg_g1"),
           "evidence": ("precision_nll", "coverage_nll")},
          {"claim": "naive student forcing trains worse than teacher forcing", "wanted": "higher",
           "arms": ("sf_full",), "evidence": ("precision_nll", "coverage_nll")})
NOT_RUN = "not run (fewer than 2 seeds paired with tf)"


def _mean_sd(values: list[float]) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else None}


def summarize(results: list[dict], seed: int = 0) -> dict:
    """Per arm (in ORACLE_ARMS' order): mean and sd of every metric over seeds, per-scale
    means, and the paired differences against tf ('t': paired_t, 'bootstrap': paired_bootstrap
    seeded by `seed`) over the seeds both have, when there are at least 2."""
    by_arm: dict[str, dict[int, dict]] = {}
    for r in results:
        by_arm.setdefault(r["arm"], {})[r["seed"]] = r
    control = by_arm.get(CONTROL, {})
    rows = {}
    for arm in [a for a in ORACLE_ARMS if a in by_arm]:
        runs = by_arm[arm]
        seeds = sorted(runs)
        row = {"seeds": seeds, **{m: _mean_sd([runs[s][m] for s in seeds]) for m in METRICS}}
        for per_scale in ("coverage_per_scale", "gap_sample_per_scale", "gap_argmax_per_scale"):
            row[per_scale] = np.mean([runs[s][per_scale] for s in seeds], axis=0).tolist()
        paired = sorted(set(runs) & set(control))
        if arm != CONTROL and len(paired) >= 2:
            row["vs_tf"] = {}
            for m in METRICS:
                a, c = [runs[s][m] for s in paired], [control[s][m] for s in paired]
                row["vs_tf"][m] = {"t": paired_t(a, c), "bootstrap": paired_bootstrap(a, c, seed=seed)}
        rows[arm] = row
    return rows


def claim_verdicts(rows: dict) -> list[dict]:
    """One verdict per (claim, arm, evidence metric) by stats.verdict: the paired t-interval
    and the Holm-adjusted p-value (over the claim's arms that were run, per metric), the
    margin MARGIN_FRACTION x tf's mean. An arm without paired seeds is 'not run'."""
    out = []
    for spec in CLAIMS:
        for metric in spec["evidence"]:
            ran = [a for a in spec["arms"] if "vs_tf" in rows.get(a, {})]
            adjusted = dict(zip(ran, holm([rows[a]["vs_tf"][metric]["t"]["p"] for a in ran])))
            margin = MARGIN_FRACTION * abs(rows[CONTROL][metric]["mean"]) if CONTROL in rows else None
            for arm in spec["arms"]:
                entry = {"claim": spec["claim"], "arm": arm, "metric": metric, "wanted": spec["wanted"],
                         "margin": margin}
                if arm not in adjusted:
                    out.append({**entry, "verdict": NOT_RUN})
                    continue
                t = rows[arm]["vs_tf"][metric]["t"]
                entry.update(diff=t["mean"], low=t["low"], high=t["high"], p=t["p"], holm_p=adjusted[arm],
                             n=t["n"], verdict=verdict(t["low"], t["high"], t["mean"], adjusted[arm], margin,
                                                       spec["wanted"], alpha=ALPHA))
                out.append(entry)
    return out


# ------------------------------------------------------------------------------ the table
def _fmt_diff(d: dict | None) -> str:
    if d is None:
        return "—"
    t, b = d["t"], d["bootstrap"]
    return (f"{t['mean']:+.4f} [{t['low']:+.4f}, {t['high']:+.4f}] p={t['p']:.3g}; "
            f"boot [{b['low']:+.4f}, {b['high']:+.4f}]")


def markdown(rows: dict, base: dict | None, claims: list[dict], size: OracleSize, record: dict | None) -> str:
    names = list(METRICS)
    lines = ["| arm | seeds | precision NLL | coverage NLL | gap (sampled) | gap (argmax) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {arm} | {len(row['seeds'])} | " + " | ".join(fmt_mean_sd(row[m], 4) for m in names) + " |"
              for arm, row in rows.items()]
    diffs = ["| arm | " + " | ".join(f"Δ{m} vs tf" for m in names) + " |", "|---|" + "---|" * len(names)]
    diffs += [f"| {arm} | " + " | ".join(_fmt_diff(row["vs_tf"][m]) for m in names) + " |"
              for arm, row in rows.items() if "vs_tf" in row]
    text = ["Oracle suite: a frozen random teacher's exact likelihood. Mean ± sd over seeds; lower is better for "
            "every metric. Δ: paired mean difference arm - tf with its 95% paired t-interval and two-sided p-value; "
            "boot: the 95% paired bootstrap interval beside it.", ""]
    if record:
        text += [f"Teacher entropy (the floor of both NLLs, in expectation): "
                 f"{record['teacher_entropy']['per_token']:.4f} nats/token; {size.n_train} training sequences, "
                 f"{size.n_heldout} held out, {size.n_samples} student samples per evaluation.", ""]
    text += [*lines, "", *diffs, ""]
    if base:
        last = base["curve"][-1]
        text += [f"Base: {last['step']} teacher-forcing steps, held-out coverage NLL {last['coverage_nll']:.4f} "
                 f"({'plateau reached' if base.get('plateau') else 'step limit'}); every arm then trains "
                 f"{size.arm_steps} steps at batch {size.batch_size}.", ""]
    text += [f"Verdicts (rule fixed before the run: Holm over each claim's arms per metric, alpha {ALPHA}, margin "
             f"{MARGIN_FRACTION:.0%} of tf's mean; sar_fast.metrics.stats.verdict):", "",
             "| claim | arm | metric | Δ [95% t] | p | Holm p | margin | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for c in claims:
        if "diff" not in c:
            text.append(f"| {c['claim']} | {c['arm']} | {c['metric']} | — | — | — | — | {c['verdict']} |")
            continue
        text.append(f"| {c['claim']} | {c['arm']} | {c['metric']} | {c['diff']:+.4f} [{c['low']:+.4f}, "
                    f"{c['high']:+.4f}] | {c['p']:.3g} | {c['holm_p']:.3g} | {c['margin']:.4f} | {c['verdict']} |")
    return "\n".join(text) + "\n"


def report(out: str, size: OracleSize, arm_names: list[str], record: dict | None = None, seed: int = 0) -> dict:
    """Read the results of `size` under `out`, write out/study.md and out/study.json."""
    results = [r for arm in arm_names for s in range(1, size.seeds + 1)
               if (r := _read_json(result_path(out, arm, s))) is not None and r.get("key") == size.key()]
    rows = summarize(results, seed)
    base = _read_json(os.path.join(out, "base", "curve.json"))
    claims = claim_verdicts(rows)
    summary = {"suite": "oracle", "size": dataclasses.asdict(size), "key": size.key(), "data": record,
               "base": base, "arms": rows, "claims": claims,
               "rule": {"alpha": ALPHA, "margin_fraction": MARGIN_FRACTION, "claims": [dict(c) for c in CLAIMS]},
               "arm_objectives": {a: oracle_arms()[a] for a in rows}}
    write_json_atomic(os.path.join(out, "study.json"), summary)
    with open(os.path.join(out, "study.md"), "w") as f:
        f.write(markdown(rows, base, claims, size, record))
    return summary
