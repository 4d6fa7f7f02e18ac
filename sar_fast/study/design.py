"""What the study compares and where its results live: the arms, the sizes (full and --quick),
and the per-result JSON files (written atomically, so a rerun skips what is done)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass

from ..sar import OFFICIAL
from .oracle import TeacherSettings

BASE_SEED = 0


# A base (or base stage) has plateaued when a chunk leaves its held-out NLL above 99% of its best so far.
PLATEAU = 0.99


GAMMAS = (0.01, 0.1, 1.0)


SAR_SAMPLINGS = ("argmax", "sample", "cfg")


SF_ARMS = ("sf_full", "sf_alternate", "sf_interleave", "sf_hybrid")


CSF_TARGET_ARMS = ("gt", "soft")


CONTROL = "tf"


def _gamma_name(gamma: float) -> str:
    return f"g{gamma:g}"


# The sampling settings of the paper's SSR experiments (its section 5.4.1; FlexVAR's published ones).
PAPER_SSR = dict(cfg=2.5, top_k=900, top_p=0.95)


def arms() -> dict[str, dict]:
    """Arm name -> the objective fields it sets (the rest: the tiny preset's objective)."""
    out = {CONTROL: dict(objective="tf"),
           # OFFICIAL's loss on the fast path (sar.py tests that objective 'official' gives the same)
           "sar_published": OFFICIAL | dict(objective="sar"),
           "sar_published_ssr_paper": OFFICIAL | dict(objective="sar") | PAPER_SSR}
    for sampling in SAR_SAMPLINGS:
        for gamma in GAMMAS:
            out[f"sar_all_{sampling}_{_gamma_name(gamma)}"] = dict(objective="sar", transitions="all",
                                                                   sampling=sampling, gamma=gamma)
    for target in CSF_TARGET_ARMS:  # Algorithm 1's ground-truth target and the soft one, at gamma 1
        out[f"sar_all_cfg_g1_{target}"] = dict(objective="sar", transitions="all", sampling="cfg", gamma=1.0,
                                              csf_target=target)
    for name in SF_ARMS:
        out[name] = dict(objective=name)
    return out


# The digits suite's arms in groups, each run (and sized to fit 90 minutes) on its own into
# one study folder: the bases and tf are shared, so a group adds only its own arms. 'sf'
# also carries the argmax and sampled Eq. 6 arms at gamma 1, which complete the CFG claim
# at that gamma (its cfg arm is in 'core').
ARM_GROUPS = {
    "core": (CONTROL, "sar_published", "sar_published_ssr_paper", "sar_all_cfg_g1", "sar_all_cfg_g1_gt",
             "sar_all_cfg_g1_soft"),
    "sampling": (CONTROL, *(f"sar_all_{s}_{_gamma_name(g)}" for g in GAMMAS[:2] for s in SAR_SAMPLINGS)),
    "sf": (CONTROL, *SF_ARMS, "sar_all_argmax_g1", "sar_all_sample_g1"),
}


@dataclass(frozen=True)
class _RunSize:
    """The student runs of either suite: the model, the base and the arms. All but `seeds`
    make every result's key (results of another size are never mixed in; more seeds extend a study)."""
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

    def _key(self, **extra) -> str:
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("seeds", "bases")} | extra
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


# How every arm's final model is evaluated besides the main setting ('plain', the digits
# preset: cfg 1.5, linear ramp, no truncation): lower temperatures (does a gain survive a
# sharper TF?), the SSR settings the arms train with, the paper's sampling.
EVAL_GRID = {
    "plain": dict(cfg=1.5, cfg_ramp="linear", top_k=0, top_p=0.0, temperature=1.0),
    "t0.9": dict(cfg=1.5, cfg_ramp="linear", top_k=0, top_p=0.0, temperature=0.9),
    "t0.8": dict(cfg=1.5, cfg_ramp="linear", top_k=0, top_p=0.0, temperature=0.8),
    "ssr": dict(cfg=1.2, cfg_ramp="linear", top_k=900, top_p=0.96, temperature=1.0),
    "paper": dict(cfg=PAPER_SSR["cfg"], cfg_ramp="linear", top_k=PAPER_SSR["top_k"], top_p=PAPER_SSR["top_p"],
                  temperature=1.0),
}
TEMPERATURE_SETTINGS = ("plain", "t0.9", "t0.8")  # the sharpening control: tf at its best of these


@dataclass(frozen=True)
class StudySize(_RunSize):
    """The digits suite's size. The base trains at base_lr until a chunk improves its
    held-out NLL by less than 1% (or base_steps), then through each `anneal` stage (lr, step
    cap) the same way; the arms train at arm_lr (the last stage's) for arm_steps, measured at
    every `curve_steps`. `bases` independently trained bases (seeds 0, 1, ...); like `seeds`
    it is not in the key, so more of either extend a study."""
    samples_per_class: int
    rollout_images: int       # held-out digits rolled out from ground-truth prefixes (the first N of 180)
    anneal: tuple[tuple[float, int], ...]
    curve_steps: tuple[int, ...]
    bases: int

    def key(self) -> str:
        return self._key(grid=EVAL_GRID)

    def stages(self) -> tuple[tuple[float, int], ...]:
        """(lr, step cap) of every base stage, in order."""
        return ((self.base_lr, self.base_steps), *self.anneal)


# Sized on 2 quiet CPU cores (docs/study.md has the arithmetic); one arm group per run.
FULL = StudySize(depth=3, embed_dim=96, num_heads=4, batch_size=32, base_steps=800, base_chunk=100, base_lr=1e-3,
                 base_warmup=20, arm_steps=100, arm_lr=3e-4, arm_warmup=5, seeds=8, samples_per_class=20,
                 rollout_images=180,
                 anneal=((3e-4, 600),), curve_steps=(25, 50, 100), bases=2)


# A pipeline check, not a result: a model too small and runs too short to mean anything.
QUICK = StudySize(depth=1, embed_dim=32, num_heads=2, batch_size=16, base_steps=4, base_chunk=2, base_lr=1e-3,
                  base_warmup=1, arm_steps=2, arm_lr=3e-4, arm_warmup=1, seeds=2, samples_per_class=2,
                  rollout_images=20,
                  anneal=((3e-4, 2),), curve_steps=(1, 2), bases=2)


# ------------------------------------------------------------------------------ the oracle suite
# The arms of the oracle suite (a frozen random teacher instead of the digits): the control,
# SAR as published, Eq. 6 with sampled and CFG-sampled inputs at the two gammas that moved the
# digits numbers, and naive student forcing.
ORACLE_ARMS = (CONTROL, "sar_published", "sar_all_sample_g0.1", "sar_all_sample_g1", "sar_all_cfg_g0.1",
               "sar_all_cfg_g1", "sf_full")


def oracle_arms() -> dict[str, dict]:
    """Arm name -> the objective fields it sets: the digits suite's arms of the same names."""
    every = arms()
    return {name: every[name] for name in ORACLE_ARMS}


@dataclass(frozen=True)
class OracleSize(_RunSize):
    """Everything that sizes the oracle suite: the teacher and its data, the student, the
    base and the arms. All but `seeds` make every result's key, as in StudySize."""
    teacher: TeacherSettings
    n_train: int              # teacher sequences in the training code cache
    n_heldout: int            # held-out teacher sequences: coverage NLL and exposure gaps
    n_samples: int            # student sequences per evaluation: precision NLL
    gap_rows: int             # held-out sequences the exposure gaps are measured on

    def key(self) -> str:
        return self._key(suite="oracle")  # never equal to a digits study's key


# Proposed from the per-step measurements (docs/study.md, "The oracle suite"): about 60-70 min
# on 2 quiet CPU cores with 2 workers; not run yet.
ORACLE_FULL = OracleSize(teacher=TeacherSettings(), n_train=32_768, n_heldout=1_000, n_samples=500, gap_rows=500,
                         depth=3, embed_dim=96, num_heads=4, batch_size=32, base_steps=800, base_chunk=100,
                         base_lr=1e-3, base_warmup=20, arm_steps=120, arm_lr=3e-4, arm_warmup=5, seeds=8)


# A pipeline check (a tiny teacher of 4 scales and 16 codes, a few steps): its numbers mean nothing.
ORACLE_QUICK = OracleSize(teacher=TeacherSettings(schedule=(1, 2, 3, 4), vocab=16, code_dim=4, depth=1, embed_dim=16,
                                                  num_heads=2, head_gain=4.0),
                          n_train=256, n_heldout=64, n_samples=40, gap_rows=32, depth=1, embed_dim=32, num_heads=2,
                          batch_size=16, base_steps=4, base_chunk=2, base_lr=1e-3, base_warmup=1, arm_steps=2,
                          arm_lr=3e-4, arm_warmup=1, seeds=2)


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


# ------------------------------------------------------------------------------ one arm
def result_path(out: str, arm: str, seed: int, base: int | None = None) -> str:
    """An (arm, seed) result: of base `base` in the digits suite, of the one base in the oracle suite."""
    name = f"{arm}__seed{seed}" if base is None else f"{arm}__base{base}__seed{seed}"
    return os.path.join(out, "results", name + ".json")


def base_dir(out: str, base: int | None = None) -> str:
    return os.path.join(out, "base") if base is None else os.path.join(out, "bases", f"base{base}")


def export_path(out: str, arm: str, seed: int) -> str:
    """Where an oracle arm's trained model is kept (small; later evaluations read it)."""
    return os.path.join(out, "exports", f"{arm}__seed{seed}.pth")
