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

METRIC_KEYS = ("frechet", "accuracy", "nll", "gap_sample", "gap_argmax")


def _fake(arm, seed, frechet, gap=0.1):
    return {"arm": arm, "seed": seed, "frechet": frechet, "accuracy": 0.5, "nll": 1.0, "gap_sample": gap,
            "gap_argmax": gap, "nll_per_scale": [1.0] * 6, "gaps": {"sample": {"per_scale": [gap] * 5}}}


def _results(shift: dict, seeds=5, gap_shift=None):
    """tf's Fréchet distance varies by seed; each arm adds its shift plus a little seed noise."""
    rng = np.random.default_rng(0)
    out = []
    for s in range(1, seeds + 1):
        base = 5.0 + rng.normal()
        out.append(_fake("tf", s, base))
        for arm, d in shift.items():
            g = 0.1 + (gap_shift or {}).get(arm, 0.0) + 0.001 * rng.normal()
            out.append(_fake(arm, s, base + d + 0.01 * rng.normal(), g))
    return out


def _verdict(claims, claim, arm):
    return next(c["verdict"] for c in claims if c["claim"].startswith(claim) and c["arm"] == arm)


def test_verdicts_follow_the_intervals():
    shift = {"sf_full": +1.0, "sf_alternate": -1.0, "sf_interleave": 0.0, "sar_published": -0.5,
             "sar_all_cfg_g0.1": -1.0, "sar_all_cfg_g1": +0.5, "sar_all_argmax_g0.1": 0.0, "sar_all_sample_g0.1": -2.0}
    results = _results(shift, gap_shift={"sar_published": 0.0, "sar_all_cfg_g0.1": -0.05})
    rows = report.summarize(results)
    claims = report.verdicts(rows, results=results)
    assert _verdict(claims, "naive", "sf_full") == "reproduced"
    assert _verdict(claims, "naive", "sf_alternate") == "contradicted"
    assert _verdict(claims, "naive", "sf_interleave") == "not resolved at this scale"
    assert report.best_sar_all(rows) == "sar_all_cfg_g0.1"
    assert _verdict(claims, "SAR improves", "sar_published") == "reproduced"
    # cfg beats argmax but loses to sample at the best gamma: contradicted
    assert _verdict(claims, "CFG sampling", "sar_all_cfg_g0.1") == "contradicted"
    # a gain with a shrunken gap: reproduced; a gain with an unchanged gap: not resolved
    assert _verdict(claims, "the gain", "sar_all_cfg_g0.1") == "reproduced"
    assert _verdict(claims, "the gain", "sar_published") == "not resolved at this scale"
    assert "sf_hybrid" not in {c["arm"] for c in claims}  # not run: no verdict


def test_no_verdict_below_five_seeds_or_without_a_gain():
    results = _results({"sf_full": +1.0, "sar_published": +1.0}, seeds=4)
    claims = report.verdicts(report.summarize(results), results=results)
    assert _verdict(claims, "naive", "sf_full") == "not resolved (fewer than 5 seeds)"
    assert _verdict(claims, "the gain", "sar_published") == "not resolved (fewer than 5 seeds)"
    results = _results({"sar_published": +1.0})
    claims = report.verdicts(report.summarize(results), results=results)
    assert _verdict(claims, "SAR improves", "sar_published") == "contradicted"
    assert _verdict(claims, "the gain", "sar_published").startswith("not resolved")


def _run(out, *extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # CPU reference ops: no interpreter
    return subprocess.run([sys.executable, "-m", "sar_fast.study", "--quick", "--out", str(out), *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_quick_study_pipeline_and_resume(tmp_path):
    need_module("sklearn")
    need_module("matplotlib")
    out = tmp_path / "study"
    proc = _run(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    arms = list(design.arms())
    assert len(arms) == 15
    summary = json.loads((out / "study.json").read_text())
    assert list(summary["arms"]) == arms
    for arm, row in summary["arms"].items():
        assert row["seeds"] == [1, 2]
        assert len(row["nll_per_scale"]) == 6 and len(row["gap_sample_per_scale"]) == 5
        assert all(np.isfinite(row[m]["mean"]) for m in METRIC_KEYS)
        if arm != "tf":
            assert set(row["vs_tf"]) == set(METRIC_KEYS)
            assert all(d["n"] == 2 and d["low"] <= d["mean"] <= d["high"] for d in row["vs_tf"].values())
    claims = summary["claims"]
    assert [c["claim"][:12] for c in claims].count("naive studen") == 4
    assert len(claims) == 9
    # two seeds never decide anything
    assert all(c["verdict"].startswith("not resolved") for c in claims)
    table = (out / "study.md").read_text()
    assert sum(line.startswith("| ") for line in table.splitlines()) == 1 + 15 + 1 + 9
    assert (out / "study.png").stat().st_size > 0
    assert len(list((out / "results").glob("*.json"))) == 30
    first = json.loads((out / "results" / "sf_full__seed2.json").read_text())
    assert first["steps"] == design.QUICK.arm_steps and first["objective"]["objective"] == "sf_full"
    # resume: a rerun trains only what is missing
    os.remove(out / "results" / "sf_full__seed2.json")
    proc = _run(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "29 (arm, seed) results found, 1 to run" in proc.stderr
    again = json.loads((out / "results" / "sf_full__seed2.json").read_text())
    assert again["frechet"] == pytest.approx(first["frechet"], rel=1e-5)  # same seed, same run


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(SystemExit, match="unknown"):
        runner.main(["--out", str(tmp_path), "--arms", "tf,sar_magic"])
    with pytest.raises(SystemExit, match="--seeds"):
        runner.main(["--out", str(tmp_path), "--seeds", "1"])


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
