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
from .oracle import ORACLE_TEMPERATURES
from .report_md import fmt_mean_sd, mean_sd

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
# The sharpening control: each SAR arm (sampled at temperature 1) against tf sampled at its own
# best temperature of 1 and ORACLE_TEMPERATURES, "best" fixed before the run as the lowest mean
# precision NLL + coverage NLL (a temperature that buys precision with as much coverage is no gain).
SHARPENING = {"claim": "SAR's gain survives a temperature-matched TF control", "wanted": "lower",
              "arms": CLAIMS[0]["arms"], "evidence": ("precision_nll",)}
TEMPERED = tuple(f"{m}@t{t:g}" for t in ORACLE_TEMPERATURES for m in ("precision_nll", "coverage_nll"))


def _flat(r: dict) -> dict:
    """The METRICS of one result and, when it has them, its tempered metrics ('metric@t<T>')."""
    out = {m: r[m] for m in METRICS}
    for t, values in r.get("tempered", {}).items():
        out.update({f"{m}@{t}": v for m, v in values.items()})
    return out


def tf_best_temperature(control: dict[int, dict]) -> str | None:
    """'t1' or the 't<T>' of ORACLE_TEMPERATURES where tf's mean precision NLL + coverage NLL
    is lowest (over its seeds that have every temperature); None when none has them."""
    seeds = [s for s, r in control.items() if all(n in r for n in TEMPERED)]
    if not seeds:
        return None
    score = {"t1": np.mean([control[s]["precision_nll"] + control[s]["coverage_nll"] for s in seeds])}
    for t in ORACLE_TEMPERATURES:
        score[f"t{t:g}"] = np.mean([control[s][f"precision_nll@t{t:g}"] + control[s][f"coverage_nll@t{t:g}"]
                                    for s in seeds])
    return min(score, key=score.get)


def _paired(a: list[float], c: list[float], seed: int) -> dict:
    return {"t": paired_t(a, c), "bootstrap": paired_bootstrap(a, c, seed=seed)}


def summarize(results: list[dict], seed: int = 0) -> dict:
    """Per arm (in ORACLE_ARMS' order): mean and sd of every metric over seeds (the tempered
    ones where every seed has them), per-scale means, the paired differences against tf
    ('t': paired_t, 'bootstrap': paired_bootstrap seeded by `seed`) over the seeds both
    have, when at least 2, and against tf at its best temperature ('vs_tf_tempered')."""
    by_arm: dict[str, dict[int, dict]] = {}
    raw: dict[str, dict[int, dict]] = {}
    for r in results:
        by_arm.setdefault(r["arm"], {})[r["seed"]] = _flat(r)
        raw.setdefault(r["arm"], {})[r["seed"]] = r
    control = by_arm.get(CONTROL, {})
    best = tf_best_temperature(control)
    rows = {}
    for arm in [a for a in ORACLE_ARMS if a in by_arm]:
        runs = by_arm[arm]
        seeds = sorted(runs)
        names = [n for n in (*METRICS, *TEMPERED) if all(n in runs[s] for s in seeds)]
        row = {"seeds": seeds, **{m: mean_sd([runs[s][m] for s in seeds]) for m in names}}
        for per_scale in ("coverage_per_scale", "gap_sample_per_scale", "gap_argmax_per_scale"):
            row[per_scale] = np.mean([raw[arm][s][per_scale] for s in seeds], axis=0).tolist()
        paired = sorted(set(runs) & set(control))
        if arm != CONTROL and len(paired) >= 2:
            row["vs_tf"] = {m: _paired([runs[s][m] for s in paired], [control[s][m] for s in paired], seed)
                            for m in names if all(m in control[s] for s in paired)}
            key = "precision_nll" if best == "t1" else f"precision_nll@{best}"
            if best is not None and all(key in control[s] for s in paired):
                row["vs_tf_tempered"] = {"precision_nll": _paired([runs[s]["precision_nll"] for s in paired],
                                                                  [control[s][key] for s in paired], seed)}
        rows[arm] = row
    if CONTROL in rows and best is not None:
        rows[CONTROL]["best_temperature"] = best
    return rows


def claim_verdicts(rows: dict) -> list[dict]:
    """One verdict per (claim, arm, evidence metric) by stats.verdict: the paired t-interval
    and the Holm-adjusted p-value (over the claim's arms that were run, per metric), the
    margin MARGIN_FRACTION x the control's mean. An arm without paired seeds is 'not run'.
    The sharpening claim compares with tf at its best temperature ('vs_tf_tempered')."""
    out = []
    for spec in (*CLAIMS, SHARPENING):
        field = "vs_tf_tempered" if spec is SHARPENING else "vs_tf"
        for metric in spec["evidence"]:
            ran = [a for a in spec["arms"] if metric in rows.get(a, {}).get(field, {})]
            adjusted = dict(zip(ran, holm([rows[a][field][metric]["t"]["p"] for a in ran])))
            for arm in spec["arms"]:
                entry = {"claim": spec["claim"], "arm": arm, "metric": metric, "wanted": spec["wanted"]}
                if arm not in adjusted:
                    out.append({**entry, "verdict": NOT_RUN})
                    continue
                t = rows[arm][field][metric]["t"]
                control_mean = _control_mean(rows, field, metric)
                entry.update(diff=t["mean"], low=t["low"], high=t["high"], p=t["p"], holm_p=adjusted[arm],
                             n=t["n"], margin=MARGIN_FRACTION * abs(control_mean),
                             verdict=verdict(t["low"], t["high"], t["mean"], adjusted[arm],
                                             MARGIN_FRACTION * abs(control_mean), spec["wanted"], alpha=ALPHA))
                out.append(entry)
    return out


def _control_mean(rows: dict, field: str, metric: str) -> float:
    """tf's mean of `metric` (at its best temperature for the sharpening control)."""
    best = rows[CONTROL].get("best_temperature", "t1")
    name = metric if field == "vs_tf" or best == "t1" else f"{metric}@{best}"
    return rows[CONTROL][name]["mean"]


# ------------------------------------------------------------------------------ the table
def _fmt_diff(d: dict | None) -> str:
    if d is None:
        return "—"
    t, b = d["t"], d["bootstrap"]
    return (f"{t['mean']:+.4f} [{t['low']:+.4f}, {t['high']:+.4f}] p={t['p']:.3g}; "
            f"boot [{b['low']:+.4f}, {b['high']:+.4f}]")


def _tempered_table(rows: dict) -> list[str]:
    """Every arm sampled (and scored) at each temperature of the grid, with its paired
    difference from tf at the same temperature: the sampling-matched comparison."""
    if not all(n in rows.get(CONTROL, {}) for n in TEMPERED):
        return []
    lines = ["Sampling-matched (the student's logits divided by T for both its samples and its coverage NLL; Δ vs tf "
             f"at the same T; tf's best temperature by precision + coverage: {rows[CONTROL]['best_temperature']}):",
             "", "| arm | " + " | ".join(TEMPERED) + " |", "|---|" + "---|" * len(TEMPERED)]
    for arm, row in rows.items():
        cells = []
        for n in TEMPERED:
            d = row.get("vs_tf", {}).get(n)
            cells.append(fmt_mean_sd(row[n], 4) + (f"; Δ {d['t']['mean']:+.4f} [{d['t']['low']:+.4f}, "
                                                   f"{d['t']['high']:+.4f}]" if d else "") if n in row else "—")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return [*lines, ""]


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
    text += [*lines, "", *diffs, "", *_tempered_table(rows)]
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
