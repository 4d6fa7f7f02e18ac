"""The digits suite's tables (study.md) and plot (study.png) from report.analyse's summary."""
from __future__ import annotations

import numpy as np

from .design import CONTROL, EVAL_GRID, StudySize, arms


def arm_order(names) -> list[str]:
    """`names` in the order of design.arms()."""
    return [a for a in arms() if a in set(names)]


def mean_sd(values) -> dict:
    """{'mean', 'sd'} of values over seeds (sd None for one value)."""
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else None}


def fmt_mean_sd(m: dict, digits: int = 3) -> str:
    """'mean ± sd' of a metric over seeds (the mean alone with one seed)."""
    return f"{m['mean']:.{digits}f}" + (f" ± {m['sd']:.{digits}f}" if m.get("sd") is not None else "")


def _fmt_t(d: dict | None, digits: int = 3, boot: bool = False) -> str:
    """'mean [t-interval]' of a paired difference (* when the interval excludes 0)."""
    if d is None:
        return "—"
    t = d["t"]
    star = " *" if t["low"] > 0 or t["high"] < 0 else ""
    text = f"{t['mean']:+.{digits}f} [{t['low']:+.{digits}f}, {t['high']:+.{digits}f}]{star}"
    if boot:
        b = d["bootstrap"]
        text += f"; boot [{b['low']:+.{digits}f}, {b['high']:+.{digits}f}]"
    return text


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows), ""]


def _arms_table(base: dict) -> list[str]:
    cols = ("frechet", "accuracy", "precision", "recall", "nll", "ce_own", "ce_gt", "gap_sample", "gap_argmax")
    rows = [[arm, str(len(row["seeds"])), *(fmt_mean_sd(row[c]) if c in row else "—" for c in cols)]
            for arm in arm_order(base["arms"]) for row in [base["arms"][arm]]]
    return _table(["arm", "seeds", "Fréchet", "accuracy", "precision", "recall", "TF NLL", "CE own input",
                   "CE GT input", "gap (sampled)", "gap (argmax)"], rows)


def _diff_table(base: dict) -> list[str]:
    cols = ("frechet", "frechet vs tf@T*", "recall", "precision", "nll", "gap_sample")
    rows = [[arm, *(_fmt_t(base["vs_tf"][arm].get(c), boot=c == "frechet") for c in cols)]
            for arm in arm_order(base["vs_tf"])]
    return _table(["arm", "ΔFréchet vs tf", f"ΔFréchet vs tf@{base['tf_best_temperature']}", "Δrecall",
                   "Δprecision", "ΔTF NLL", "Δgap (sampled)"], rows)


def _grid_table(base: dict) -> list[str]:
    tf = base["arms"].get(CONTROL, {})
    rows = [["tf (Fréchet)", *(fmt_mean_sd(tf[f"frechet@{s}"]) if f"frechet@{s}" in tf else "—"
                               for s in EVAL_GRID)]]
    rows += [[arm, *(_fmt_t(base["vs_tf"][arm].get(f"frechet@{s}")) for s in EVAL_GRID)]
             for arm in arm_order(base["vs_tf"])]
    return _table(["ΔFréchet vs tf, both sampled with", *EVAL_GRID], rows)


def _prefixed(base: dict, prefix: str) -> list[str]:
    """The names 'prefix<k>' of tf's numbers, in order of k."""
    tf = base["arms"].get(CONTROL, {})
    names = [n for n in tf if isinstance(n, str) and n.startswith(prefix)]
    return sorted(names, key=lambda n: int(n[len(prefix):]))


def _curve_table(base: dict) -> list[str]:
    names = _prefixed(base, "frechet@step")
    rows = [[arm, *(_fmt_t(base["vs_tf"][arm].get(n)) for n in names),
             *(_fmt_t(base["vs_tf"][arm].get(n.replace("frechet", "nll")), 4) for n in names)]
            for arm in arm_order(base["vs_tf"])]
    steps = [n.split("@step")[1] for n in names]
    return _table(["arm", *(f"ΔFréchet @{s}" for s in steps), *(f"ΔNLL @{s}" for s in steps)], rows)


def _rollout_table(base: dict) -> list[str]:
    names = _prefixed(base, "rollout_frechet@k")
    rows = [[arm, *(f"{base['arms'][arm][n]['mean']:.3f}" for n in names)] for arm in arm_order(base["arms"])
            if all(n in base["arms"][arm] for n in names)]
    return _table(["Fréchet of rollouts given the first k GT scales", *(f"k={n.split('@k')[1]}" for n in names)],
                  rows)


def _claims_table(claims: list[dict], per_base: dict) -> list[str]:
    rows = []
    for i, c in enumerate(claims):
        cells = []
        for base in per_base.values():
            e = base["claims"][i]
            cells.append(f"{e['diff']:+.3f} [{e['low']:+.3f}, {e['high']:+.3f}], Holm p {e['holm_p']:.3g}: "
                         f"{e['verdict']}" if "diff" in e else e["verdict"])
        pooled = c.get("pooled")
        rows.append([c["claim"], f"{c['arm']} vs {c['control']}", c["metric"], *cells,
                     f"{pooled['mean']:+.3f} [{pooled['low']:+.3f}, {pooled['high']:+.3f}]" if pooled else "—",
                     f"**{c['verdict']}**"])
    return _table(["claim", "comparison", "metric", *(f"base {b}" for b in per_base), "pooled (bases random)",
                   "verdict"], rows)


def _base_line(b: int, curve: dict | None, size: StudySize) -> str:
    if not curve or not curve.get("stages"):
        return f"Base {b}: not trained yet."
    stages = "; ".join(f"lr {s['lr']:g}: {s['steps']} steps, NLL {s['nll']:.4f} "
                       f"({'plateau' if s['plateau'] else 'step cap'})" for s in curve["stages"])
    return f"Base {b} (seed {b - 1}): {stages}. Arms: lr {size.arm_lr:g}, {size.arm_steps} steps, batch " \
           f"{size.batch_size}."


def markdown(summary: dict, size: StudySize) -> str:
    per_base = {int(b): v for b, v in summary["bases"].items()}
    text = ["# Digits suite", "",
            "Mean ± sd over seeds. Δ: paired mean difference arm - control with its 95% paired t-interval (* "
            "excludes 0; the Fréchet column also shows the percentile bootstrap). Lower is better except accuracy, "
            "precision and recall. tf@T: tf sampled at its best temperature of the grid (the sharpening control).", ""]
    text += [_base_line(b, (summary.get("base_curves") or {}).get(b), size) for b in per_base] + [""]
    rule = summary["rule"]
    text += [f"## Verdicts (rule fixed before the run: Holm over each claim's comparisons per metric, alpha "
             f"{rule['alpha']}, margin {rule['margin_fraction']:.0%} of the control's mean; a verdict over bases needs "
             f"every base to agree)", "", *_claims_table(summary["claims"], per_base)]
    for b, base in per_base.items():
        text += [f"## Base {b}", "", *_arms_table(base), *_diff_table(base), "Sampling-matched evaluation:", "",
                 *_grid_table(base), "Learning curve (arm steps):", "", *_curve_table(base),
                 "Generation-level exposure (tf and every arm, held-out labels, 'plain' sampling):", "",
                 *_rollout_table(base)]
    return "\n".join(text) + "\n"


def plot(summary: dict, path: str) -> bool:
    """ΔFréchet and Δgap (sampled) against tf per arm and base, with their t-intervals."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    bases = summary["bases"]
    names = arm_order({a for base in bases.values() for a in base["vs_tf"]})
    if not names:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.4 * len(names) + 1.8), sharey=True)
    for ax, metric in zip(axes, ("frechet", "gap_sample")):
        for j, (b, base) in enumerate(sorted(bases.items())):
            y = np.arange(len(names)) + 0.2 * j
            d = [base["vs_tf"].get(a, {}).get(metric) for a in names]
            keep = [i for i, x in enumerate(d) if x is not None]
            t = [d[i]["t"] for i in keep]
            ax.errorbar([x["mean"] for x in t], y[keep], xerr=[[x["mean"] - x["low"] for x in t],
                                                              [x["high"] - x["mean"] for x in t]],
                        fmt="o", capsize=3, label=f"base {b}")
        ax.axvline(0.0, color="grey", lw=0.8)
        ax.set_title(f"Δ {metric} vs tf (95% paired t)", fontsize=9)
    axes[0].set_yticks(np.arange(len(names)), names, fontsize=8)
    axes[0].invert_yaxis()
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
