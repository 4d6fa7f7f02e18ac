"""The oracle suite's teacher: its exact sequence NLL against a brute-force enumeration (every
sequence of a tiny teacher: the probabilities sum to 1 per label, and the sampler's
frequencies match them), determinism by seed, the codebook-only tokenizer, and a student
trained on teacher samples through the real trainer path."""
import math

import numpy as np
import pytest
import torch

from sar_fast.metrics.exposure import teacher_forcing_nll
from sar_fast.models.checkpoint import CheckpointError
from sar_fast.models.tokenizers import CodebookTokenizer, build_tokenizer, preflight_tokenizer
from sar_fast.study import oracle
from sar_fast.schedules import total_length

TINY = dict(depth=1, embed_dim=16, num_heads=2, num_classes=2, head_gain=3.0)


def _all_sequences(vocab: int, length: int) -> torch.Tensor:
    """[vocab**length, length] int64: every sequence, in lexicographic order."""
    return torch.cartesian_prod(*[torch.arange(vocab)] * length).reshape(-1, length)


def test_exact_nll_against_brute_force_enumeration():
    """schedule (1, 2), V = 3: 3^5 = 243 sequences per label. Every scale's distribution must be
    normalised and depend on the earlier scales only, so exp(-nll) sums to 1 over them
    (independently of how the model computes); and the sampler (generate, KV cache, inverse
    CDF) must draw each sequence as often as exp(-nll) says."""
    teacher = oracle.make_teacher(3, schedule=(1, 2), vocab=3, code_dim=2, **TINY)
    seqs = _all_sequences(3, total_length(teacher.schedule))
    draws = 20_000
    labels, samples = oracle.teacher_samples(teacher, 2 * draws, seed=11, batch=4096)
    for label in range(2):
        lab = torch.full((seqs.shape[0],), label)
        nll = oracle.sequence_nll(teacher.model, lab, seqs, teacher.codebook, teacher.schedule)
        probs = torch.exp(-nll)
        assert nll.dtype == torch.float64
        assert abs(float(probs.sum()) - 1.0) < 1e-6, float(probs.sum())
        assert float(probs.max()) < 0.5  # a distribution with some spread, not one sequence

        # the sampler's frequencies: Pearson's chi-square over the cells expected >= 5 times
        # (the rest pooled) against a bound 6 sd above its mean (deterministic seeds: no flake)
        mine = samples[labels == label]
        index = (mine * torch.tensor([3 ** (4 - i) for i in range(5)])).sum(1)  # lexicographic rank
        observed = torch.bincount(index, minlength=seqs.shape[0]).double()
        expected = probs * mine.shape[0]
        big = expected >= 5
        obs = torch.cat([observed[big], observed[~big].sum().view(1)])
        exp = torch.cat([expected[big], expected[~big].sum().view(1)])
        chi2, df = float(((obs - exp) ** 2 / exp).sum()), int(obs.numel() - 1)
        assert chi2 < df + 6 * math.sqrt(2 * df), (label, chi2, df)

    # the per-token mean agrees with the study's teacher-forcing NLL (sar_fast.metrics.exposure)
    lab = torch.zeros(seqs.shape[0], dtype=torch.long)
    nll = oracle.sequence_nll(teacher.model, lab, seqs, teacher.codebook, teacher.schedule)
    tf = teacher_forcing_nll(teacher.model, lab, seqs, teacher.schedule, teacher.codebook)["per_token"]
    assert abs(float(nll.mean()) / seqs.shape[1] - tf) < 1e-6


def test_teacher_and_samples_are_fixed_by_their_seeds(tmp_path):
    rng_before = torch.get_rng_state()
    a, b = oracle.make_teacher(5, **TINY), oracle.make_teacher(5, **TINY)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is left alone
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa) and torch.equal(a.codebook, b.codebook)
    other = oracle.make_teacher(6, **TINY)
    assert not torch.equal(other.codebook, a.codebook)
    assert not torch.equal(other.model.head.weight, a.model.head.weight)

    la, ca = oracle.teacher_samples(a, 24, seed=1, batch=24)
    lb, cb = oracle.teacher_samples(b, 24, seed=1, batch=5)  # batching does not change the draws
    assert torch.equal(la, lb) and torch.equal(ca, cb)
    assert torch.equal(la, torch.arange(24) % 2) and ca.shape == (24, total_length(oracle.ORACLE_SCHEDULE))
    assert not torch.equal(oracle.teacher_samples(a, 24, seed=2)[1], ca)

    oracle.save_teacher(a, tmp_path / "teacher", note="test")
    loaded = oracle.load_teacher(tmp_path / "teacher")
    assert loaded.settings == a.settings and torch.equal(loaded.codebook, a.codebook)
    assert torch.equal(oracle.teacher_samples(loaded, 24, seed=1)[1], ca)
    assert torch.equal(oracle.sequence_nll(loaded.model, la, ca, loaded.codebook, loaded.schedule),
                       oracle.sequence_nll(a.model, la, ca, a.codebook, a.schedule))


def test_the_suite_teacher_has_the_documented_entropy():
    """The suite's setting (gain 6, input std 1): mean per-token entropy of about 2 nats,
    well below log 256, and its samples' NLL agrees with it (both are its entropy rate)."""
    teacher = oracle.make_teacher(0)
    labels, codes = oracle.teacher_samples(teacher, 128, seed=1)
    h = oracle.mean_token_entropy(teacher.model, labels, codes, teacher.codebook, teacher.schedule)
    nll = oracle.sequence_nll(teacher.model, labels, codes, teacher.codebook, teacher.schedule) / codes.shape[1]
    assert 1.0 < h["per_token"] < 3.0 and len(h["per_scale"]) == len(teacher.schedule)
    assert abs(float(nll.mean()) - h["per_token"]) < 0.1


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="vocab"):
        oracle.make_teacher(0, vocab=1)
    with pytest.raises(ValueError, match="head_gain"):
        oracle.make_teacher(0, head_gain=0.0)
    with pytest.raises(ValueError, match="1x1"):
        oracle.make_teacher(0, schedule=(2, 3))
    teacher = oracle.make_teacher(0, **TINY)
    labels, codes = oracle.teacher_samples(teacher, 4, seed=0)
    with pytest.raises(ValueError, match="codes must lie"):
        oracle.sequence_nll(teacher.model, labels, codes + 256, teacher.codebook, teacher.schedule)
    with pytest.raises(ValueError, match="codes must be an int tensor"):
        oracle.sequence_nll(teacher.model, labels, codes[:, :-1], teacher.codebook, teacher.schedule)
    with pytest.raises(ValueError, match="labels must lie"):
        oracle.sequence_nll(teacher.model, labels + 5, codes, teacher.codebook, teacher.schedule)


def test_codebook_tokenizer(tmp_path):
    teacher = oracle.make_teacher(0, **TINY)
    oracle.save_teacher(teacher, tmp_path / "t")
    path = str(tmp_path / "t" / oracle.CODEBOOK_FILE)
    tok = build_tokenizer(path, "cpu")
    assert isinstance(tok, CodebookTokenizer) and torch.equal(tok.codebook(), teacher.codebook)
    assert (tok.vocab_size, tok.Cvae, tok.mode, tok.phi) == (256, 16, "flexvar", None)
    _, codes = oracle.teacher_samples(teacher, 2, seed=0)
    from sar_fast import ops
    assert torch.equal(tok.tf_inputs(codes, teacher.schedule),
                       ops.scale_shift(codes, teacher.codebook, teacher.schedule, mode="flexvar"))
    with pytest.raises(TypeError, match="cannot encode"):
        tok.encode(torch.zeros(1, 3, 8, 8), (1, 2))
    with pytest.raises(TypeError, match="cannot decode"):
        tok.decode(codes, teacher.schedule)
    assert preflight_tokenizer(path, images=False) == "codebook"
    with pytest.raises(CheckpointError, match="codebook-only"):
        preflight_tokenizer(path)  # a caller that needs images


def test_student_trained_on_teacher_samples_gains_coverage(tmp_path):
    """The real trainer path (prepare_data's code cache + the codebook-only --vae): 60 steps
    of teacher forcing take the student's NLL of held-out teacher samples from ~log V (its
    near-uniform init) well down towards the teacher's entropy."""
    from sar_fast.train import Trainer
    from sar_fast.train.config import parse_config
    settings = oracle.TeacherSettings(seed=2, schedule=(1, 2, 3, 4), vocab=16, code_dim=4, depth=1, embed_dim=32,
                                      num_heads=2, head_gain=4.0)
    data = tmp_path / "data"
    record = oracle.prepare_data(data, settings, n_train=512, n_heldout=200)
    assert oracle.prepare_data(data, settings, n_train=512, n_heldout=200) == record  # reused
    with pytest.raises(ValueError, match="another request"):
        oracle.prepare_data(data, settings, n_train=256, n_heldout=200)
    Trainer(parse_config(["--out", str(tmp_path / "run"), "--device", "cpu", "--max-steps", "60", "--lr", "3e-3",
                          "--batch-size", "32", "--depth", "1", "--embed-dim", "32", "--num-heads", "2",
                          "--ckpt-every", "60", "--keep-last", "1", "--no-progress", "--objective", "tf",
                          "--pretrain-steps", "0",  # the tiny preset teacher-forces 300 steps first otherwise
                          *oracle.trainer_flags(str(data / "cache"), str(data / "teacher"), settings.schedule)])).run()
    m = oracle.evaluate_student(tmp_path / "run" / "export.pth", data, seed=3, n_samples=100, gap_rows=50)
    assert abs(m["teacher_entropy"] - record["teacher_entropy"]["per_token"]) < 0.1
    assert m["teacher_entropy"] < m["coverage_nll"] < math.log(16) - 0.3, m
    assert m["coverage_nll"] - m["teacher_entropy"] < (math.log(16) - m["teacher_entropy"]) / 2, m
    assert abs(sum(c * s * s for c, s in zip(m["coverage_per_scale"], settings.schedule)) / 30
               - m["coverage_nll"]) < 1e-9
    assert len(m["gap_sample_per_scale"]) == len(settings.schedule) - 1
    # precision: the student's samples are likelier under the teacher than uniform random codes
    teacher = oracle.load_teacher(data / "teacher")
    labels = oracle.balanced_labels(100, 10)
    noise = torch.randint(0, 16, (100, 30), generator=torch.Generator().manual_seed(0))
    uniform = float(oracle.sequence_nll(teacher.model, labels, noise, teacher.codebook, teacher.schedule).mean()) / 30
    assert m["teacher_entropy"] < m["precision_nll"] < uniform - 0.3, (m, uniform)


def test_codebook_tokenizer_is_refused_where_images_are_needed(tmp_path):
    from sar_fast.train.config import parse_config
    teacher = oracle.make_teacher(0, **TINY)
    oracle.save_teacher(teacher, tmp_path / "t")
    book = str(tmp_path / "t" / oracle.CODEBOOK_FILE)
    with pytest.raises(SystemExit, match="codebook-only"):  # no --cache: the digits would need encoding
        parse_config(["--vae", book, "--max-steps", "1", "--out", str(tmp_path / "run"), "--num-samples", "0"])
    labels, codes = oracle.teacher_samples(teacher, 8, seed=0)
    oracle.write_code_cache(tmp_path / "cache", labels, codes, str(tmp_path / "t"), teacher.schedule, 10)
    with pytest.raises(SystemExit, match="num-samples 0"):  # sample grids need a decoder
        parse_config(["--cache", str(tmp_path / "cache"), "--vae", book, "--max-steps", "1",
                      "--out", str(tmp_path / "run")])


# ------------------------------------------------------------------ the suite (python -m sar_fast.study --suite oracle)
def _study(out, *extra):
    import os
    import subprocess
    import sys
    from conftest import ROOT
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # CPU reference ops: no interpreter
    return subprocess.run([sys.executable, "-m", "sar_fast.study", "--suite", "oracle", "--out", str(out), *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_oracle_suite_quick_pipeline_resume_and_refusals(tmp_path):
    """`--suite oracle --quick` end to end (the pipeline and the table's shape, never its
    numbers), then a rerun that trains only the missing result and reuses data and base, and
    the refusals of another size's data and results."""
    import json
    import os
    from sar_fast.metrics.stats import VERDICTS
    from sar_fast.study import design, oracle_report
    out = tmp_path / "study"
    proc = _study(out, "--quick")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "study.json").read_text())
    assert summary["suite"] == "oracle" and summary["key"] == design.ORACLE_QUICK.key()
    assert list(summary["arms"]) == list(design.ORACLE_ARMS)
    schedule = design.ORACLE_QUICK.teacher.schedule
    for arm, row in summary["arms"].items():
        assert row["seeds"] == [1, 2]
        assert all(np.isfinite(row[m]["mean"]) for m in oracle_report.METRICS)
        assert len(row["coverage_per_scale"]) == len(schedule) and len(row["gap_sample_per_scale"]) == len(schedule) - 1
        if arm != "tf":
            for d in row["vs_tf"].values():
                assert d["t"]["n"] == 2 and d["t"]["low"] <= d["t"]["mean"] <= d["t"]["high"]
                assert d["bootstrap"]["mean"] == pytest.approx(d["t"]["mean"])
    claims = summary["claims"]
    assert len(claims) == (5 + 1) * 2 + 5  # (SAR arms + sf_full) x (precision, coverage) + the sharpening control
    assert all(c["verdict"] in VERDICTS for c in claims)
    assert summary["arms"]["tf"]["best_temperature"] in ("t1", "t0.9", "t0.8")
    table = (out / "study.md").read_text()
    assert sum(line.startswith("| ") for line in table.splitlines()) == (1 + 7) + (1 + 6) + (1 + 7) + (1 + 17)
    assert len(list((out / "results").glob("*.json"))) == 14
    first = json.loads((out / "results" / "sf_full__seed2.json").read_text())
    assert first["steps"] == design.ORACLE_QUICK.arm_steps and first["objective"]["objective"] == "sf_full"
    assert set(first["tempered"]) == {"t0.9", "t0.8"} and (out / "exports" / "sf_full__seed2.pth").is_file()
    data_stamp = os.stat(out / "data" / "data.json").st_mtime_ns, os.stat(out / "base" / "export.pth").st_mtime_ns

    os.remove(out / "results" / "sf_full__seed2.json")  # resume: a rerun trains only what is missing
    proc = _study(out, "--quick")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "13 (arm, seed) results found, 1 to run" in proc.stderr
    assert (os.stat(out / "data" / "data.json").st_mtime_ns, os.stat(out / "base" / "export.pth").st_mtime_ns) \
        == data_stamp  # data and base reused, not redone
    again = json.loads((out / "results" / "sf_full__seed2.json").read_text())
    for m in ("precision_nll", "coverage_nll", "gap_sample"):
        assert again[m] == pytest.approx(first[m], rel=1e-5)  # same seed, same run
    # a result without the tempered metrics (written before they existed) gets them from its kept export
    tf2 = json.loads((out / "results" / "tf__seed2.json").read_text())
    (out / "results" / "tf__seed2.json").write_text(json.dumps({k: v for k, v in tf2.items() if k != "tempered"}))
    proc = _study(out, "--quick")
    assert proc.returncode == 0 and "tempered metrics for 1 earlier results" in proc.stderr, proc.stderr[-2000:]
    refilled = json.loads((out / "results" / "tf__seed2.json").read_text())["tempered"]
    for t, values in tf2["tempered"].items():
        assert refilled[t] == pytest.approx(values, rel=1e-6)

    proc = _study(out)  # the full size in a quick study's folder: refused before any work
    assert proc.returncode != 0 and "another study or size" in proc.stderr, proc.stderr[-2000:]
    from sar_fast.study import oracle_suite
    with pytest.raises(SystemExit, match="another request"):  # and its data would be too
        oracle_suite.prepare(str(out), design.ORACLE_FULL)
    tf1 = json.loads((out / "results" / "tf__seed1.json").read_text())
    (out / "results" / "tf__seed1.json").write_text(json.dumps({**tf1, "key": "0" * 16}))
    proc = _study(out, "--quick")  # a result of another size is refused, never mixed in
    assert proc.returncode != 0 and "another size" in proc.stderr, proc.stderr[-2000:]
    other = tmp_path / "digits"  # a digits study's folder: refused before any data are made
    (other / "base").mkdir(parents=True)
    (other / "base" / "curve.json").write_text(json.dumps({"key": design.QUICK.key(), "curve": [], "done": False}))
    proc = _study(other, "--quick")
    assert proc.returncode != 0 and "another study" in proc.stderr and not (other / "data").exists(), proc.stderr


def _oracle_result(arm: str, i: int, shift: list, tf_values: dict) -> dict:
    return {"arm": arm, "seed": i + 1, "coverage_per_scale": [1.0] * 3, "gap_sample_per_scale": [0.1] * 2,
            "gap_argmax_per_scale": [0.1] * 2, "gap_sample": 0.1 + shift[i], "gap_argmax": 0.1,
            **{m: tf_values[m][i] + shift[i] for m in ("precision_nll", "coverage_nll")}}


def _oracle_results(diffs: dict, tf_values: dict) -> list[dict]:
    """tf's metric values per seed and, per arm, tf's plus the given per-seed differences."""
    out = []
    for i in range(5):
        out.append(_oracle_result("tf", i, [0.0] * 5, tf_values))
        out += [_oracle_result(arm, i, d, tf_values) for arm, d in diffs.items()]
    return out


def test_oracle_verdicts_on_constructed_results():
    """A case for each verdict of the rule (sar_fast.metrics.stats), Holm over the claim's
    arms deciding one of them, and an arm that did not run."""
    from sar_fast.metrics.stats import VERDICTS, holm, paired_t
    from sar_fast.study import oracle_report
    reproduced, opposite, no_effect, unresolved = VERDICTS
    spread = [0.04, -0.04, 0.08, -0.08, 0.0]
    diffs = {"sar_published": [-0.5 + 0.01 * k for k in range(5)],               # lower, clearly
             "sar_all_sample_g0.1": [0.5 + 0.01 * k for k in range(5)],          # higher, clearly
             "sar_all_sample_g1": [0.01, -0.01, 0.02, -0.02, 0.0],               # ~0, inside the margin
             "sar_all_cfg_g0.1": [-1.0, 0.9, -0.5, 0.6, -0.25],                  # wide: nothing to say
             "sar_all_cfg_g1": [-0.1 + s for s in spread],                       # p < 0.05, but not after Holm
             "sf_full": [0.5 - 0.01 * k for k in range(5)]}                      # SF worse than tf, clearly
    tf_values = {"precision_nll": [3.0, 3.1, 2.9, 3.05, 2.95], "coverage_nll": [2.0, 2.1, 1.9, 2.05, 1.95]}
    rows = oracle_report.summarize(_oracle_results(diffs, tf_values))
    claims = oracle_report.claim_verdicts(rows)
    want = {"sar_published": reproduced, "sar_all_sample_g0.1": opposite, "sar_all_sample_g1": no_effect,
            "sar_all_cfg_g0.1": unresolved, "sar_all_cfg_g1": unresolved, "sf_full": reproduced}
    assert {c["verdict"] for c in claims if c["claim"] == oracle_report.SHARPENING["claim"]} == \
        {oracle_report.NOT_RUN}  # no tempered metrics: the sharpening control is not run
    claims = [c for c in claims if c["claim"] != oracle_report.SHARPENING["claim"]]
    for metric in ("precision_nll", "coverage_nll"):
        got = {c["arm"]: c for c in claims if c["metric"] == metric}
        assert {a: c["verdict"] for a, c in got.items()} == want, metric
        assert got["sar_all_cfg_g1"]["p"] < 0.05 < got["sar_all_cfg_g1"]["holm_p"]
        sar = [a for a in want if a != "sf_full"]
        raw = [paired_t(diffs[a], [0.0] * 5)["p"] for a in sar]  # the differences are exactly these
        assert [got[a]["holm_p"] for a in sar] == pytest.approx(holm(raw))
        assert got["sf_full"]["holm_p"] == pytest.approx(got["sf_full"]["p"])  # a claim of one arm
        assert got["sar_published"]["margin"] == pytest.approx(0.05 * np.mean(tf_values[metric]))
    del diffs["sf_full"]
    claims = oracle_report.claim_verdicts(oracle_report.summarize(_oracle_results(diffs, tf_values)))
    assert {c["verdict"] for c in claims if c["arm"] == "sf_full"} == {oracle_report.NOT_RUN}


def test_sharpening_control_on_constructed_results():
    """tf at temperature 0.8 gains 0.3 nats of precision for 0.05 of coverage (its best
    temperature by their sum); an arm whose gain at temperature 1 is 0.1 is then worse than
    that control; with tf's best at 1 the control is tf itself."""
    from sar_fast.metrics.stats import VERDICTS
    from sar_fast.study import oracle_report
    reproduced, opposite = VERDICTS[:2]
    tf_values = {"precision_nll": [3.0, 3.1, 2.9, 3.05, 2.95], "coverage_nll": [2.0, 2.1, 1.9, 2.05, 1.95]}
    results = _oracle_results({"sar_published": [-0.1, -0.11, -0.09, -0.1, -0.1]}, tf_values)
    for r in results:
        r["tempered"] = {"t0.9": {"precision_nll": r["precision_nll"] - 0.1, "coverage_nll": r["coverage_nll"] + 0.02},
                         "t0.8": {"precision_nll": r["precision_nll"] - 0.3, "coverage_nll": r["coverage_nll"] + 0.05}}
    rows = oracle_report.summarize(results)
    assert rows["tf"]["best_temperature"] == "t0.8"
    claims = oracle_report.claim_verdicts(rows)
    pick = {(c["claim"], c["arm"], c["metric"]): c for c in claims}
    main = pick[(oracle_report.CLAIMS[0]["claim"], "sar_published", "precision_nll")]
    sharp = pick[(oracle_report.SHARPENING["claim"], "sar_published", "precision_nll")]
    assert main["verdict"] == reproduced and sharp["verdict"] == opposite
    assert sharp["diff"] == pytest.approx(-0.1 + 0.3, abs=1e-9)
    assert sharp["margin"] == pytest.approx(0.05 * (np.mean(tf_values["precision_nll"]) - 0.3))
    # the sampling-matched rows: every arm against tf at the same temperature
    assert rows["sar_published"]["vs_tf"]["precision_nll@t0.8"]["t"]["mean"] == pytest.approx(-0.1, abs=1e-9)
    for r in results:  # sharpening that costs more coverage than it buys precision: tf's best is 1
        for t in r["tempered"].values():
            t["coverage_nll"] += 1.0
    rows = oracle_report.summarize(results)
    assert rows["tf"]["best_temperature"] == "t1"
    sharp = {c["arm"]: c for c in oracle_report.claim_verdicts(rows)
             if c["claim"] == oracle_report.SHARPENING["claim"]}["sar_published"]
    assert sharp["verdict"] == reproduced and sharp["diff"] == pytest.approx(-0.1, abs=1e-9)


def test_tempered_likelihoods_are_the_sharpened_distribution():
    """At temperature T the student's token log-probabilities are those of logits / T: over a
    brute-force enumeration of a tiny teacher's sequences they still sum to 1, and two first
    tokens' log-probability ratio is the untempered one divided by T."""
    import itertools
    from sar_fast.study import oracle
    teacher = oracle.make_teacher(seed=3, schedule=(1, 2), vocab=3, code_dim=4, depth=1, embed_dim=16, num_heads=2,
                                  num_classes=2)
    seqs = torch.tensor(list(itertools.product(range(3), repeat=5)))
    labels = torch.zeros(len(seqs), dtype=torch.long)
    for t in (0.5, 1.7):
        logp = oracle.token_log_probs(teacher.model, labels, seqs, teacher.codebook, teacher.schedule, temperature=t)
        assert torch.logsumexp(logp.sum(1), 0).item() == pytest.approx(0.0, abs=1e-9)
        plain = oracle.token_log_probs(teacher.model, labels, seqs, teacher.codebook, teacher.schedule)
        first = [seqs[:, 0] == v for v in range(3)]
        ratio_t = logp[first[0], 0][0] - logp[first[1], 0][0]
        ratio_1 = plain[first[0], 0][0] - plain[first[1], 0][0]
        assert ratio_t.item() == pytest.approx(ratio_1.item() / t, rel=1e-9)
    with pytest.raises(ValueError, match="temperature"):
        oracle.token_log_probs(teacher.model, labels[:2], seqs[:2], teacher.codebook, teacher.schedule,
                               temperature=0.0)


def test_study_suite_is_checked_by_argparse(capsys):
    from sar_fast.study import runner
    with pytest.raises(SystemExit) as e:
        runner.build_parser().parse_args(["--out", "x", "--suite", "bogus"])
    assert e.value.code == 2
    assert "argument --suite: invalid choice: 'bogus'" in capsys.readouterr().err
    assert runner.build_parser().parse_args(["--out", "x"]).suite == "digits"  # the default keeps its behaviour
