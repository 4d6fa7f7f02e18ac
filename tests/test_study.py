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
