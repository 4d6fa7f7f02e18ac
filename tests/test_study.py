"""The study command: the verdict rules on results whose answer is known, and `--quick`
end to end (the pipeline and the table's shape, never its numbers), resumed."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, need_module
from sar_fast.study import design, report, runner

SETTINGS = tuple(design.EVAL_GRID)
ALTERNATING = np.array([1.0, -1.0] * 4)  # 8 seeds: differences mean + a * this have a known t statistic


def _fake(arm, seed, base, frechet, gap=0.1, recall=0.5, t08=None):
    """One result: every metric the report reads, Fréchet `frechet` under every setting but
    t0.8 (`t08`, default the same)."""
    grid = {s: {"frechet": frechet if s != "t0.8" or t08 is None else t08, "accuracy": 0.9, "precision": 0.8,
                "recall": recall} for s in SETTINGS}
    return {"arm": arm, "seed": seed, "base": base, "frechet": frechet, "accuracy": 0.9, "precision": 0.8,
            "recall": recall, "nll": 1.0, "gap_sample": gap, "gap_argmax": gap, "ce_own": 1.0 + gap, "ce_gt": 1.0,
            "grid": grid, "curve": [{"step": 25, "nll": 1.0, "frechet": frechet, "accuracy": 0.9, "precision": 0.8,
                                     "recall": recall}],
            "rollout": [{"k": k, "frechet": frechet / (k + 1), "accuracy": 0.9} for k in range(3)]}


def _results(shift: dict, bases=(1, 2), seeds=8, tf_t08_shift=0.0):
    """tf's Fréchet distance varies by seed (about 5); each arm adds `shift[arm]` (a number, or
    {base: number}, or a (mean, spread) pair: mean + spread * ALTERNATING) plus a small seed
    noise; ('gap', arm) and ('recall', arm) entries shift those metrics the same way."""
    rng = np.random.default_rng(0)
    out = []
    for b in bases:
        for s in range(1, seeds + 1):
            tf = 5.0 + rng.normal()
            out.append(_fake("tf", s, b, tf, t08=tf + tf_t08_shift))
            for arm, d in shift.items():
                if isinstance(arm, tuple):
                    continue
                d = d.get(b, 0.0) if isinstance(d, dict) else d
                d = d[0] + d[1] * ALTERNATING[s - 1] if isinstance(d, tuple) else d + 0.01 * rng.normal()
                gap = 0.1 + shift.get(("gap", arm), 0.0) + 0.001 * rng.normal()
                recall = 0.5 + shift.get(("recall", arm), 0.0) + 0.001 * rng.normal()
                out.append(_fake(arm, s, b, tf + d, gap, recall))
    return out


def _claim(analysis, claim_id, arm, control="tf", metric="frechet", base=None):
    rows = analysis["claims"] if base is None else analysis["bases"][base]["claims"]
    return next(c for c in rows if (c["id"], c["arm"], c["control"], c["metric"]) == (claim_id, arm, control, metric))


def test_verdicts_follow_the_pre_registered_rule():
    from sar_fast.metrics.stats import VERDICTS
    reproduced, opposite, null, unresolved = VERDICTS
    shift = {"sf_full": +1.0, "sf_alternate": -1.0, "sf_interleave": 0.0, "sf_hybrid": {1: -1.0, 2: +1.0},
             "sar_published": {1: -0.5, 2: 0.0}, "sar_all_cfg_g0.1": -1.0, ("gap", "sar_all_cfg_g0.1"): -0.05,
             ("recall", "sar_all_cfg_g0.1"): +0.1, "sar_all_cfg_g1": -1.0, "sar_all_argmax_g0.1": 0.0,
             "sar_all_sample_g0.1": -2.0}
    analysis = report.analyse(_results(shift))
    assert _claim(analysis, "sf_worse", "sf_full")["verdict"] == reproduced
    assert _claim(analysis, "sf_worse", "sf_alternate")["verdict"] == opposite
    # no effect and an interval inside 5% of tf's mean (about 0.25): an effect of the paper's size is ruled out
    assert _claim(analysis, "sf_worse", "sf_interleave")["verdict"] == null
    # the bases disagree: no verdict over bases, each base's own stands
    hybrid = _claim(analysis, "sf_worse", "sf_hybrid")
    assert hybrid["verdict"] == "not resolved (bases disagree)"
    assert hybrid["per_base"] == {1: opposite, 2: reproduced}
    assert _claim(analysis, "sar_better", "sar_published", base=1)["verdict"] == reproduced
    assert _claim(analysis, "sar_better", "sar_published", base=2)["verdict"] == null
    assert _claim(analysis, "sar_better", "sar_all_cfg_g0.1")["verdict"] == reproduced
    assert _claim(analysis, "sar_better", "sar_all_cfg_g0.1", metric="recall")["verdict"] == reproduced
    # the gain is attributed to the gap only where the gap shrank; no gain, nothing to attribute
    assert _claim(analysis, "closes_gap", "sar_all_cfg_g0.1", metric="gap_sample")["verdict"] == reproduced
    assert _claim(analysis, "closes_gap", "sar_all_cfg_g1", metric="gap_sample")["verdict"] == null
    assert _claim(analysis, "closes_gap", "sar_published", metric="gap_sample", base=2)["verdict"] == report.NO_GAIN
    # cfg beats argmax at gamma 0.1 but loses to sample: two verdicts, one per comparison
    assert _claim(analysis, "cfg_best", "sar_all_cfg_g0.1", "sar_all_argmax_g0.1")["verdict"] == reproduced
    assert _claim(analysis, "cfg_best", "sar_all_cfg_g0.1", "sar_all_sample_g0.1")["verdict"] == opposite
    assert _claim(analysis, "cfg_best", "sar_all_cfg_g1", "sar_all_argmax_g1")["verdict"] == report.NOT_RUN
    # an arm that was not run has no verdict anywhere
    assert _claim(analysis, "sar_better", "sar_all_cfg_g1_gt")["verdict"] == report.NOT_RUN
    assert analysis["bases"][1]["tf_best_temperature"] == "plain"  # every setting equal: the first


def test_sharpening_control_uses_tf_at_its_best_temperature():
    from sar_fast.metrics.stats import VERDICTS
    reproduced, opposite = VERDICTS[:2]
    # tf sampled at temperature 0.8 is 1.5 better than at 1: SAR's -1.0 at temperature 1 is then worse
    analysis = report.analyse(_results({"sar_all_cfg_g1": -1.0}, tf_t08_shift=-1.5))
    assert analysis["bases"][1]["tf_best_temperature"] == "t0.8"
    assert _claim(analysis, "sar_better", "sar_all_cfg_g1")["verdict"] == reproduced
    sharp = _claim(analysis, "not_sharpening", "sar_all_cfg_g1", control="tf@T*")
    assert sharp["verdict"] == opposite
    entry = _claim(analysis, "not_sharpening", "sar_all_cfg_g1", control="tf@T*", base=1)
    assert entry["control_metric"] == "frechet@t0.8" and entry["diff"] == pytest.approx(0.5, abs=0.05)


def test_holm_correction_withholds_a_nominal_result():
    """Raw p about 0.02 in one of four SF comparisons: significant alone, not after Holm (x4)."""
    from scipy import stats as scipy_stats
    from sar_fast.metrics.stats import VERDICTS
    a = 0.1
    mean = scipy_stats.t.ppf(1 - 0.01, 7) * a / np.sqrt(7)  # two-sided p = 0.02 for a +- a pattern
    shift = {"sf_full": (mean, a), "sf_alternate": (0.0, 0.0), "sf_interleave": (0.0, 0.0), "sf_hybrid": (0.0, 0.0)}
    entry = _claim(report.analyse(_results(shift, bases=(1,))), "sf_worse", "sf_full", base=1)
    assert entry["p"] == pytest.approx(0.02, rel=1e-6)
    assert entry["holm_p"] == pytest.approx(0.08, rel=1e-6)  # the smallest of 4 p-values: 4 x p
    assert entry["verdict"] != VERDICTS[0]


def test_pooled_difference_treats_bases_as_random():
    """Two bases of mean differences 1 and 3: pooled mean 2, df 1, half-width t(0.975, 1) x 1."""
    import math
    analysis = report.analyse(_results({"sf_full": {1: (1.0, 0.1), 2: (3.0, 0.1)}}))
    pooled = _claim(analysis, "sf_worse", "sf_full")["pooled"]
    half = math.tan(0.475 * math.pi) * 1.0
    assert pooled["mean"] == pytest.approx(2.0) and pooled["df"] == 1
    assert (pooled["low"], pooled["high"]) == (pytest.approx(2.0 - half), pytest.approx(2.0 + half))


def test_markdown_has_every_table(tmp_path):
    shift = {"sar_published": -0.5, "sf_full": +1.0}
    results = _results(shift)
    summary = {**report.analyse(results), "base_curves": {}, "rule": {"alpha": 0.05, "margin_fraction": 0.05}}
    from sar_fast.study.report_md import markdown
    text = markdown(summary, design.QUICK)
    for needle in ("## Verdicts", "## Base 1", "## Base 2", "Sampling-matched", "Learning curve",
                   "Generation-level exposure", "tf@plain", "sf_full vs tf"):
        assert needle in text, needle
    assert "**reproduced**" in text


def _run(out, *extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # CPU reference ops: no interpreter
    return subprocess.run([sys.executable, "-m", "sar_fast.study", "--quick", "--out", str(out), *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


PIPELINE_ARMS = ("tf", "sar_published", "sar_all_cfg_g1_gt", "sf_full")


def test_quick_study_pipeline_and_resume(tmp_path):
    """`--quick` on a few arms: two bases (each through both lr stages), every result with its
    grid, curve and rollouts, the report's tables and verdicts; a rerun trains only what is
    missing and reproduces it."""
    from sar_fast.metrics.stats import VERDICTS
    need_module("sklearn")
    need_module("matplotlib")
    out = tmp_path / "study"
    proc = _run(out, "--arms", ",".join(PIPELINE_ARMS[1:]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    size = design.QUICK
    shas = set()
    for b in (1, 2):
        curve = json.loads((out / "bases" / f"base{b}" / "curve.json").read_text())
        assert [s["lr"] for s in curve["stages"]] == [lr for lr, _ in size.stages()]
        assert all(s["steps"] <= cap for s, (_, cap) in zip(curve["stages"], size.stages()))
        assert curve["done"] and np.isfinite(curve["metrics"]["frechet"])
        shas.add(json.loads((out / "results" / f"tf__base{b}__seed1.json").read_text())["base_sha256"])
    assert len(shas) == 2  # two independently trained bases
    results = sorted((out / "results").glob("*.json"))
    assert len(results) == len(PIPELINE_ARMS) * 2 * 2
    first = json.loads((out / "results" / "sf_full__base2__seed2.json").read_text())
    assert first["steps"] == size.arm_steps and first["objective"]["objective"] == "sf_full"
    assert [c["step"] for c in first["curve"]] == list(size.curve_steps)
    assert set(first["grid"]) == set(design.EVAL_GRID) and len(first["rollout"]) == 6
    assert all(0.0 <= first["grid"][s][m] <= 1.0 for s in design.EVAL_GRID for m in ("precision", "recall"))
    summary = json.loads((out / "study.json").read_text())
    assert set(summary["bases"]) == {"1", "2"}
    for base in summary["bases"].values():
        assert list(base["arms"]) == list(PIPELINE_ARMS)
        for d in base["vs_tf"].values():
            assert {"frechet", "frechet vs tf@T*", "recall", "nll", "ce_own", "ce_gt", "rollout_frechet@k5",
                    *(f"frechet@{s}" for s in design.EVAL_GRID), "frechet@step1"} <= set(d)
            assert all(x["t"]["n"] == 2 and x["t"]["low"] <= x["t"]["mean"] <= x["t"]["high"] for x in d.values())
    allowed = {*VERDICTS, report.NOT_RUN, report.NO_GAIN, "not resolved (bases disagree)"}
    assert {c["verdict"] for c in summary["claims"]} <= allowed
    judged = [c for c in summary["claims"] if c["verdict"] != report.NOT_RUN]
    assert {(c["id"], c["arm"]) for c in judged} >= {("sf_worse", "sf_full"), ("sar_better", "sar_published"),
                                                      ("sar_better", "sar_all_cfg_g1_gt")}
    table = (out / "study.md").read_text()
    assert table.count("## Base ") == 2 and "## Verdicts" in table
    assert (out / "study.png").stat().st_size > 0
    # resume, as another group's run into the same folder: it trains only what is missing of
    # its own arms, and the report still covers every arm in the folder
    os.remove(out / "results" / "sf_full__base2__seed2.json")
    proc = _run(out, "--arms", "sf_full")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "7 results found, 1 to run" in proc.stderr
    summary = json.loads((out / "study.json").read_text())
    assert all(list(base["arms"]) == list(PIPELINE_ARMS) for base in summary["bases"].values())
    again = json.loads((out / "results" / "sf_full__base2__seed2.json").read_text())
    assert again["frechet"] == pytest.approx(first["frechet"], rel=1e-5)  # same seed, same run
    assert [c["frechet"] for c in again["curve"]] == pytest.approx([c["frechet"] for c in first["curve"]], rel=1e-5)


def test_arm_groups_expand_and_bad_arguments_are_named(tmp_path):
    from sar_fast.study.jobs import arm_names
    names = arm_names("sf_full,core", design.arms(), design.ARM_GROUPS)
    assert names == ["tf", "sf_full", *design.ARM_GROUPS["core"][1:]]
    assert set(arm_names("all", design.arms(), design.ARM_GROUPS)) == set(design.arms())
    assert set().union(*design.ARM_GROUPS.values()) == set(design.arms())  # every arm is in a group
    with pytest.raises(SystemExit, match="unknown"):
        runner.main(["--out", str(tmp_path), "--arms", "tf,sar_magic"])
    with pytest.raises(SystemExit, match="--seeds"):
        runner.main(["--out", str(tmp_path), "--seeds", "1"])
    with pytest.raises(SystemExit, match="--bases"):
        runner.main(["--out", str(tmp_path), "--bases", "0"])
    with pytest.raises(SystemExit, match="--bases"):
        runner.main(["--out", str(tmp_path), "--suite", "oracle", "--bases", "2"])


# ------------------------------------------------------------------ statistics (issue: study v2)
def test_paired_t_matches_closed_forms():
    """t quantiles and p-values with closed forms: df 1 (Cauchy) and df 2."""
    import math
    from sar_fast.metrics.stats import paired_t
    # n = 2 (df 1): t_{1, 0.975} = tan(0.475 pi); p = 1 - (2 / pi) atan(|t|)
    r = paired_t([3.0, 5.0], [1.0, 1.0])          # differences 2, 4
    sd, se = math.sqrt(2.0), math.sqrt(2.0) / math.sqrt(2.0)
    assert r["mean"] == pytest.approx(3.0) and r["se"] == pytest.approx(se) and r["df"] == 1
    half = math.tan(0.475 * math.pi) * sd / math.sqrt(2.0)
    assert (r["low"], r["high"]) == (pytest.approx(3.0 - half), pytest.approx(3.0 + half))
    assert r["p"] == pytest.approx(1.0 - 2.0 / math.pi * math.atan(3.0 / se))
    # n = 3 (df 2): t_{2, q} = (2q - 1) / sqrt(2 q (1 - q)); p = 1 - |t| / sqrt(2 + t^2)
    r = paired_t([1.0, 2.0, 6.0], [0.0, 0.0, 0.0], level=0.9)
    mean, sd = 3.0, math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2)
    q = 0.95
    half = (2 * q - 1) / math.sqrt(2 * q * (1 - q)) * sd / math.sqrt(3)
    assert (r["low"], r["high"]) == (pytest.approx(mean - half), pytest.approx(mean + half))
    t = mean / (sd / math.sqrt(3))
    assert r["p"] == pytest.approx(1.0 - t / math.sqrt(2.0 + t * t))
    # 5 seeds: +-2.776 standard errors (the t table), wider than a normal's 1.96
    r = paired_t([0.1, -0.2, 0.3, 0.0, 0.4], [0.0] * 5)
    assert (r["high"] - r["mean"]) / r["se"] == pytest.approx(2.7764, abs=1e-4)


@pytest.mark.parametrize("name", ["paired_t", "paired_bootstrap"])
def test_paired_statistics_reject_bad_input(name):
    from sar_fast.metrics import stats
    stat = getattr(stats, name)
    with pytest.raises(ValueError, match="same length"):
        stat([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="at least 2 seeds"):
        stat([1.0], [1.0])
    with pytest.raises(ValueError, match="finite"):
        stat([1.0, float("nan")], [1.0, 2.0])
    with pytest.raises(ValueError, match="level"):
        stat([1.0, 2.0], [1.0, 1.0], level=1.0)


def test_holm_on_a_known_vector():
    from sar_fast.metrics.stats import holm
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> 0.06 (monotone)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([0.02]) == pytest.approx([0.02])           # one comparison: unchanged
    with pytest.raises(ValueError, match="pvalues"):
        holm([0.1, 1.5])


def test_verdict_rule_on_constructed_cases():
    from sar_fast.metrics.stats import VERDICTS, verdict
    reproduced, opposite, equivalent, unresolved = VERDICTS
    # significant and in the wanted direction (lower is better, e.g. NLL or Fréchet distance)
    assert verdict(-0.3, -0.1, -0.2, 0.01, margin=0.05, wanted="lower") == reproduced
    assert verdict(0.1, 0.3, 0.2, 0.01, margin=0.05, wanted="higher") == reproduced
    # significant the other way
    assert verdict(0.1, 0.3, 0.2, 0.01, margin=0.05, wanted="lower") == opposite
    # not significant, interval inside the margin: an effect of the paper's size is ruled out
    assert verdict(-0.04, 0.03, -0.005, 0.6, margin=0.05, wanted="lower") == equivalent
    # not significant and wider than the margin: nothing can be said
    assert verdict(-0.2, 0.1, -0.05, 0.4, margin=0.05, wanted="lower") == unresolved
    assert verdict(-0.2, 0.2, 0.0, 0.9, margin=0.05, wanted="lower") == unresolved  # mean 0, interval wide
    # significant after correction only counts below alpha: 0.06 is not
    assert verdict(-0.3, -0.01, -0.15, 0.06, margin=0.05, wanted="lower") == unresolved
    with pytest.raises(ValueError, match="wanted"):
        verdict(-1, 1, 0, 0.5, margin=0.1, wanted="better")
    with pytest.raises(ValueError, match="margin"):
        verdict(-1, 1, 0, 0.5, margin=0.0, wanted="lower")
