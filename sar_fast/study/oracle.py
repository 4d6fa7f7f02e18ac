"""The oracle suite's core: a frozen random scale-wise teacher whose distribution is known
exactly, so a student's quality is measured without a tokenizer or a feature network.

The teacher is a FlexVAR ScaleAR at a seeded random initialisation, with a random codebook
of unit-norm codes, made to have structure:

- class embeddings of std 1 and AdaLN gammas of 1 (VAR's init keeps both near 0, so every
  class would give nearly the same distribution and the blocks would be near-identities);
- the word embedding at std `input_std` (1: the embedded input is as large as the position
  table, so a token's distribution depends strongly on the previous scale's codes; at VAR's
  init it is ~20x smaller and the position alone decides);
- the head at `head_gain` times VAR's std: the logits' temperature. Gain 6 gives a mean
  per-token entropy of about 2 nats (log 256 = 5.55 is uniform) on the suite's schedule;
  `mean_token_entropy` measures it and `make_teacher` records it.

Its sequences are drawn scale by scale (`teacher_samples`); within a scale the tokens are
conditionally independent given the earlier scales, so -log p(codes | label) is the
teacher-forced cross-entropy summed over every token (`sequence_nll`). Two exact metrics
per student: the teacher's NLL of the student's samples (precision-like: does the student
make sequences the teacher finds likely) and the student's NLL of held-out teacher samples
(coverage: does the student put mass everywhere the teacher does), both per token.

Training data for sar_fast.train: `write_code_cache` writes teacher samples as a code cache
whose tokenizer is the teacher's codebook (`codebook.safetensors`, a codebook-only tokenizer:
sar_fast.models.tokenizers.codebook); train with `--cache DIR --vae TEACHER/codebook.safetensors
--schedule ... --num-samples 0` (`trainer_flags`).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import ops
from ..files import write_json_atomic
from ..models.checkpoint import CheckpointError, load_checkpoint, save_export, weights_sha256
from ..models.generate import generate
from ..models.tokenizers import build_tokenizer
from ..models.tokenizers.codebook import save_codebook, unit_codebook
from ..models.transformer import ScaleAR, preset_config
from ..data.common import check_int
from ..schedules import Schedule

ORACLE_SCHEDULE = (1, 2, 3, 4, 6, 8, 12)  # 7 scales, 274 tokens
MODEL_FILE, CODEBOOK_FILE, SETTINGS_FILE = "model.safetensors", "codebook.safetensors", "teacher.json"
NUM_CLASSES = 10  # the trainer's from-scratch presets have 10 classes


@dataclass(frozen=True)
class TeacherSettings:
    """Everything that makes a teacher (the same settings give the same teacher)."""
    seed: int = 0
    schedule: tuple[int, ...] = ORACLE_SCHEDULE
    vocab: int = 256
    code_dim: int = 16
    depth: int = 2
    embed_dim: int = 64
    num_heads: int = 4
    num_classes: int = NUM_CLASSES
    head_gain: float = 6.0
    input_std: float = 1.0
    class_std: float = 1.0

    def check(self) -> "TeacherSettings":
        for name in ("seed", "vocab", "code_dim", "depth", "embed_dim", "num_heads", "num_classes"):
            value, low = getattr(self, name), 2 if name == "vocab" else 0 if name == "seed" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        for name in ("head_gain", "input_std", "class_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        schedule = Schedule(self.schedule, name="schedule")
        if schedule[0] != 1:
            raise ValueError(f"schedule must start with the 1x1 scale, got {schedule}")
        return TeacherSettings(**{**asdict(self), "schedule": schedule})


@dataclass
class Teacher:
    model: ScaleAR              # eval mode, no label dropout, frozen
    codebook: torch.Tensor      # [V, code_dim] float32: the inputs are built from it
    settings: TeacherSettings

    @property
    def schedule(self) -> tuple[int, ...]:
        return self.settings.schedule


def make_teacher(seed: int = 0, schedule: Sequence[int] = ORACLE_SCHEDULE, vocab: int = 256, code_dim: int = 16,
                 **settings) -> Teacher:
    """The frozen random teacher of `TeacherSettings(seed, schedule, vocab, code_dim,
    **settings)` (see the module docstring). The global RNG is left as it was."""
    s = TeacherSettings(seed=seed, schedule=tuple(schedule), vocab=vocab, code_dim=code_dim, **settings).check()
    config = preset_config("flexvar-tiny", depth=s.depth, embed_dim=s.embed_dim, num_heads=s.num_heads,
                           vocab_size=s.vocab, code_dim=s.code_dim, num_classes=s.num_classes, schedule=s.schedule,
                           cond_drop_rate=0.0, drop_path_rate=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        model = ScaleAR(config)
        model.init_weights(init_adaln_gamma=1.0, init_head=s.head_gain)
        torch.nn.init.normal_(model.class_emb.weight, std=s.class_std)
        torch.nn.init.normal_(model.word_embed.weight, std=s.input_std)
    book = unit_codebook(s.vocab, s.code_dim, torch.Generator().manual_seed(s.seed + 1))
    return Teacher(model.eval().requires_grad_(False), book, s)


def save_teacher(teacher: Teacher, folder: str | os.PathLike, **record) -> None:
    """folder/model.safetensors (the model's export), codebook.safetensors (a codebook-only
    tokenizer: the --vae of a student's training), teacher.json (its settings, plus `record`)."""
    folder = os.fspath(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"teacher folder {folder!r} exists and is not a directory")
    os.makedirs(folder, exist_ok=True)
    save_export(teacher.model, os.path.join(folder, MODEL_FILE))
    save_codebook(teacher.codebook, os.path.join(folder, CODEBOOK_FILE))
    write_json_atomic(os.path.join(folder, SETTINGS_FILE), {"settings": {**asdict(teacher.settings),
                                                                         "schedule": list(teacher.schedule)},
                                                            **record})


def load_teacher(folder: str | os.PathLike) -> Teacher:
    """The teacher `save_teacher` wrote (weights read by safetensors only)."""
    folder = os.fspath(folder)
    path = os.path.join(folder, SETTINGS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder!r} is not a teacher folder (no {SETTINGS_FILE}); make one with save_teacher")
    try:
        with open(path) as f:
            fields = json.load(f)["settings"]
        settings = TeacherSettings(**{**fields, "schedule": tuple(fields["schedule"])}).check()
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a teacher's settings ({type(e).__name__}: {e})") from None
    model = load_checkpoint(os.path.join(folder, MODEL_FILE), cond_drop_rate=0.0, schedule=settings.schedule)
    tok = build_tokenizer(os.path.join(folder, CODEBOOK_FILE), "cpu")
    got = (model.vocab_size, model.code_dim, model.num_classes, tuple(tok.codebook().shape))
    want = (settings.vocab, settings.code_dim, settings.num_classes, (settings.vocab, settings.code_dim))
    if got != want:
        raise CheckpointError(f"{folder}: the files do not fit its {SETTINGS_FILE}: (vocab, code dim, classes, "
                              f"codebook shape) are {got}, the settings say {want}")
    return Teacher(model.eval().requires_grad_(False), tok.codebook().clone(), settings)


# ------------------------------------------------------------------------------ sampling
def balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    """[n] int64: 0, 1, ..., num_classes - 1, 0, 1, ... (every class equally often)."""
    return torch.arange(check_int("n", n, 1)) % num_classes


@torch.no_grad()
def model_samples(model: ScaleAR, codebook: torch.Tensor, schedule: Sequence[int], labels: torch.Tensor, seed: int,
                  cfg: float = 0.0, top_k: int = 0, top_p: float = 0.0, batch: int = 256,
                  temperature: float = 1.0) -> torch.Tensor:
    """codes [n, L] int64: one sequence per label drawn scale by scale from `model` (by
    default from its own distribution: no guidance, no top-k/top-p, temperature 1). The noise is one
    stream of uniforms from `seed`, consumed in order, so (seed, labels) fixes the result
    whatever `batch`."""
    check_int("seed", seed, 0)
    check_int("batch", batch, 1)
    schedule = model.check_schedule(schedule)
    gen, length, out = torch.Generator().manual_seed(seed), Schedule(schedule).total, []
    for start in range(0, labels.shape[0], batch):
        part = labels[start:start + batch]
        uniforms = torch.rand(part.shape[0], length, generator=gen, dtype=torch.float64)
        drawn = generate(model, codebook, part, schedule, cfg=cfg, top_k=top_k, top_p=top_p, uniforms=uniforms,
                         temperature=temperature)
        out.append(torch.cat(drawn.codes, dim=1).cpu())
    return torch.cat(out)


def teacher_samples(teacher: Teacher, n: int, seed: int, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels [n] int64, balanced over the classes, codes [n, L] int64) drawn from the teacher."""
    labels = balanced_labels(n, teacher.settings.num_classes)
    return labels, model_samples(teacher.model, teacher.codebook, teacher.schedule, labels, seed, batch=batch)


# ------------------------------------------------------------------------------ exact likelihoods
def _check_codes(labels: torch.Tensor, codes: torch.Tensor, schedule: Sequence[int], vocab_size: int,
                 num_classes: int) -> None:
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.is_floating_point():
        raise ValueError(f"labels must be an int tensor [B], got {getattr(labels, 'shape', type(labels).__name__)}")
    if not isinstance(codes, torch.Tensor) or codes.dim() != 2 or codes.is_floating_point() \
            or codes.shape != (labels.shape[0], Schedule(schedule).total):
        raise ValueError(f"codes must be an int tensor [{labels.shape[0]}, {Schedule(schedule).total}] (one row per "
                         f"label, the tokens of schedule {list(schedule)}), got "
                         f"{tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= vocab_size):
        raise ValueError(f"codes must lie in [0, {vocab_size}), got [{int(codes.min())}, {int(codes.max())}]")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]")


def _tf_log_softmax(model: ScaleAR, labels: torch.Tensor, codes: torch.Tensor, codebook: torch.Tensor,
                    schedule: Schedule, temperature: float = 1.0) -> torch.Tensor:
    """[B, L, V] float64 log-probabilities of the teacher-forced pass on int64 `codes` (the
    logits divided by `temperature`: the distribution the sampler draws from at it)."""
    x = ops.scale_shift(codes, codebook.float(), schedule, mode=model.arch, out_dtype=torch.float32)
    logits = model(labels.long(), x, schedule).double()
    return F.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)


@torch.no_grad()
def token_log_probs(model: ScaleAR, labels: torch.Tensor, codes: torch.Tensor, codebook: torch.Tensor,
                    schedule: Sequence[int], batch: int = 256, temperature: float = 1.0) -> torch.Tensor:
    """[B, L] float64: log p(code of token t | label, the scales before t's) under `model`
    (teacher forcing in eval mode: no label dropout), its logits divided by `temperature`."""
    schedule = model.check_schedule(schedule)
    _check_codes(labels, codes, schedule, model.vocab_size, model.num_classes)
    check_int("batch", batch, 1)
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    was_training, out = model.training, []
    model.eval()
    try:
        for start in range(0, labels.shape[0], batch):
            part = codes[start:start + batch].long()
            logp = _tf_log_softmax(model, labels[start:start + batch], part, codebook, schedule, temperature)
            out.append(logp.gather(-1, part.unsqueeze(-1)).squeeze(-1))
    finally:
        model.train(was_training)
    return torch.cat(out)


def sequence_nll(model: ScaleAR, labels: torch.Tensor, codes: torch.Tensor, codebook: torch.Tensor,
                 schedule: Sequence[int], batch: int = 256) -> torch.Tensor:
    """[B] float64: the exact -log p(codes | label) in nats. Within a scale the tokens are
    conditionally independent given the earlier scales, so it is the sum over every token
    of every scale of the teacher-forced cross-entropy."""
    return -token_log_probs(model, labels, codes, codebook, schedule, batch).sum(dim=1)


@torch.no_grad()
def mean_token_entropy(model: ScaleAR, labels: torch.Tensor, codes: torch.Tensor, codebook: torch.Tensor,
                       schedule: Sequence[int]) -> dict:
    """{'per_token', 'per_scale'}: the mean entropy (nats) of the model's per-token
    distributions on the prefixes `codes` (its own samples: its entropy rate)."""
    schedule = model.check_schedule(schedule)
    _check_codes(labels, codes, schedule, model.vocab_size, model.num_classes)
    was_training = model.training
    try:
        logp = _tf_log_softmax(model.eval(), labels, codes.long(), codebook, schedule)
    finally:
        model.train(was_training)
    h = -(logp.exp() * logp).sum(-1)
    off = Schedule(schedule).offsets
    return {"per_token": float(h.mean()), "per_scale": [float(h[:, off[i]:off[i + 1]].mean())
                                                        for i in range(len(schedule))]}


def oracle_metrics(teacher: Teacher, student: ScaleAR, heldout: tuple[torch.Tensor, torch.Tensor], n: int,
                   seed: int, cfg: float = 0.0, top_k: int = 0, top_p: float = 0.0) -> dict:
    """Per token (nats): 'precision_nll', the teacher's NLL of `n` student samples (drawn
    with `seed` and the given sampling); 'coverage_nll', the student's NLL of the held-out
    teacher samples `heldout` = (labels, codes), and per scale ('coverage_per_scale');
    'teacher_entropy', the teacher's NLL of the held-out samples (the floor of both, in
    expectation)."""
    labels, codes = heldout
    schedule = Schedule(teacher.schedule)
    length, off = schedule.total, schedule.offsets
    own_labels = balanced_labels(n, teacher.settings.num_classes)
    own = model_samples(student, teacher.codebook, teacher.schedule, own_labels, seed, cfg=cfg, top_k=top_k,
                        top_p=top_p)
    precision = sequence_nll(teacher.model, own_labels, own, teacher.codebook, teacher.schedule)
    coverage = -token_log_probs(student, labels, codes, teacher.codebook, teacher.schedule)
    floor = sequence_nll(teacher.model, labels, codes, teacher.codebook, teacher.schedule)
    return {"precision_nll": float(precision.mean()) / length, "coverage_nll": float(coverage.mean()),
            "coverage_per_scale": [float(coverage[:, off[i]:off[i + 1]].mean()) for i in range(len(off) - 1)],
            "teacher_entropy": float(floor.mean()) / length}


# The sharpening control: every student is also sampled (and scored) at these temperatures.
ORACLE_TEMPERATURES = (0.9, 0.8)


@torch.no_grad()
def tempered_metrics(teacher: Teacher, student: ScaleAR, heldout: tuple[torch.Tensor, torch.Tensor], n: int,
                     seed: int, temperature: float) -> dict:
    """The student at `temperature` (its logits divided by it): 'precision_nll', the
    teacher's NLL per token of `n` samples drawn at it (the same noise as oracle_metrics'
    for `seed`); 'coverage_nll', the tempered student's NLL per token of the held-out
    teacher samples. Sharpening (T < 1) buys precision with coverage."""
    labels, codes = heldout
    length = Schedule(teacher.schedule).total
    own_labels = balanced_labels(n, teacher.settings.num_classes)
    own = model_samples(student, teacher.codebook, teacher.schedule, own_labels, seed, temperature=temperature)
    precision = sequence_nll(teacher.model, own_labels, own, teacher.codebook, teacher.schedule)
    coverage = -token_log_probs(student, labels, codes, teacher.codebook, teacher.schedule, temperature=temperature)
    return {"precision_nll": float(precision.mean()) / length, "coverage_nll": float(coverage.mean())}


@torch.no_grad()
def evaluate_tempered(export: str | os.PathLike, out: str | os.PathLike, seed: int, n_samples: int,
                      temperatures: Sequence[float] = ORACLE_TEMPERATURES) -> dict:
    """{'t<T>': tempered_metrics} of the student in `export` for every temperature."""
    teacher = load_teacher(os.path.join(os.fspath(out), "teacher"))
    heldout = load_heldout(out)
    student = load_checkpoint(os.fspath(export), cond_drop_rate=0.0).eval()
    return {f"t{t:g}": tempered_metrics(teacher, student, heldout, n_samples, seed, t) for t in temperatures}


# ------------------------------------------------------------------------------ training data
def write_code_cache(out: str | os.PathLike, labels: torch.Tensor, codes: torch.Tensor, teacher_folder: str,
                     schedule: Sequence[int], num_classes: int) -> dict:
    """Teacher samples as a code cache (sar_fast.data.codes' format) whose tokenizer is the
    teacher's codebook file, so `python -m sar_fast.train --cache OUT --vae
    TEACHER/codebook.safetensors` trains on them. Returns the manifest."""
    from ..data.codes import CACHE_FORMAT, check_code_cache
    schedule = Schedule(schedule, name="schedule")
    book_path = os.path.abspath(os.path.join(os.fspath(teacher_folder), CODEBOOK_FILE))
    if not os.path.isfile(book_path):
        raise FileNotFoundError(f"no teacher codebook at {book_path} (save_teacher writes it)")
    tok = build_tokenizer(book_path, "cpu")
    _check_codes(labels, codes, schedule, tok.vocab_size, num_classes)
    out = os.fspath(out)
    os.makedirs(out, exist_ok=True)
    dtype = "int16" if tok.vocab_size <= np.iinfo(np.int16).max + 1 else "int32"
    manifest_path = os.path.join(out, "manifest.json")
    if os.path.exists(manifest_path):  # never pair an old manifest with new arrays
        os.remove(manifest_path)
    np.save(os.path.join(out, "labels.npy"), labels.numpy().astype(np.int64))
    np.save(os.path.join(out, "codes.npy"), codes.numpy().astype(dtype)[:, None, :])  # one view
    manifest = dict(format=CACHE_FORMAT, schedule=list(schedule), seq_len=Schedule(schedule).total,
                    num_samples=int(labels.shape[0]), done=int(labels.shape[0]), views=1, dtype=dtype,
                    classes=[f"class_{c}" for c in range(num_classes)], vocab_size=int(tok.vocab_size),
                    quant_mode=tok.mode, tokenizer_path=book_path, tokenizer_class=type(tok).__name__,
                    tokenizer_sha256=weights_sha256(book_path), data_path="oracle-teacher-samples",
                    split="train", augment="none")
    write_json_atomic(manifest_path, manifest)
    return check_code_cache(out, weights_sha256(book_path))


def trainer_flags(cache: str, teacher_folder: str, schedule: Sequence[int]) -> list[str]:
    """The sar_fast.train flags that train on a cache of teacher samples."""
    return ["--cache", os.fspath(cache), "--vae", os.path.join(os.fspath(teacher_folder), CODEBOOK_FILE),
            "--schedule", ",".join(str(s) for s in Schedule(schedule)), "--num-samples", "0",
            "--workers", "0"]


# ------------------------------------------------------------------------------ a suite's data
HELDOUT_FILE, DATA_RECORD = "heldout.safetensors", "data.json"


def prepare_data(out: str | os.PathLike, settings: TeacherSettings, n_train: int, n_heldout: int,
                 seed: int = 1) -> dict:
    """A suite's fixed data in `out`: the teacher (out/teacher), `n_train` of its samples as a
    code cache (out/cache, sample seed `seed`) and `n_heldout` held-out samples
    (out/heldout.safetensors, seed `seed` + 1). Written once: a folder holding the same
    request is reused, a different one refused. Returns the record (out/data.json)."""
    from ..models.checkpoint import write_safetensors
    out = os.fspath(out)
    check_int("n_train", n_train, 1)
    check_int("n_heldout", n_heldout, 1)
    check_int("seed", seed, 0)
    settings = settings.check()
    request = {"settings": {**asdict(settings), "schedule": list(settings.schedule)}, "n_train": n_train,
               "n_heldout": n_heldout, "seed": seed}
    record_path = os.path.join(out, DATA_RECORD)
    if os.path.isfile(record_path):
        with open(record_path) as f:
            record = json.load(f)
        if record.get("request") != request:
            raise ValueError(f"{out} holds oracle data of another request ({record.get('request')}); "
                             f"use another folder")
        return record
    teacher = make_teacher(**asdict(settings))
    teacher_dir = os.path.join(out, "teacher")
    labels, codes = teacher_samples(teacher, n_heldout, seed + 1)
    entropy = mean_token_entropy(teacher.model, labels, codes, teacher.codebook, teacher.schedule)
    save_teacher(teacher, teacher_dir, entropy=entropy)
    write_safetensors({"labels": labels, "codes": codes}, os.path.join(out, HELDOUT_FILE))
    train_labels, train_codes = teacher_samples(teacher, n_train, seed)
    write_code_cache(os.path.join(out, "cache"), train_labels, train_codes, teacher_dir, teacher.schedule,
                     settings.num_classes)
    record = {"request": request, "teacher_entropy": entropy}
    write_json_atomic(record_path, record)
    return record


def load_heldout(out: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels [N], codes [N, L]) int64: the held-out teacher samples `prepare_data` wrote."""
    from ..models.checkpoint import read_safetensors
    path = os.path.join(os.fspath(out), HELDOUT_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no held-out teacher samples at {path} (prepare_data writes them)")
    tensors = read_safetensors(path)
    if set(tensors) != {"labels", "codes"}:
        raise CheckpointError(f"{path}: expected the tensors 'labels' and 'codes', found {sorted(tensors)}")
    return tensors["labels"].long(), tensors["codes"].long()


@torch.no_grad()
def evaluate_student(export: str | os.PathLike, out: str | os.PathLike, seed: int, n_samples: int,
                     gap_rows: int = 500) -> dict:
    """The oracle metrics of the student in export file `export` against the data of `out`
    (prepare_data): precision and coverage NLL per token (oracle_metrics; the student's
    samples drawn with `seed`), the coverage per scale, and the exposure gap (argmax and
    sampled inputs, sar_fast.metrics.exposure) on the first `gap_rows` held-out samples."""
    from ..metrics.exposure import exposure_gap
    teacher = load_teacher(os.path.join(os.fspath(out), "teacher"))
    heldout = load_heldout(out)
    student = load_checkpoint(os.fspath(export), cond_drop_rate=0.0).eval()
    if (student.vocab_size, student.code_dim, student.num_classes) != \
            (teacher.settings.vocab, teacher.settings.code_dim, teacher.settings.num_classes):
        raise ValueError(f"the student {os.fspath(export)} ({student.vocab_size} codes of dim {student.code_dim}, "
                         f"{student.num_classes} classes) does not fit the teacher of {os.fspath(out)}")
    metrics = oracle_metrics(teacher, student, heldout, n_samples, seed)
    labels, codes = heldout[0][:gap_rows], heldout[1][:gap_rows]
    for prediction in ("argmax", "sample"):
        gen = torch.Generator().manual_seed(seed * 7_777 + 1)
        g = exposure_gap(student, labels, codes, teacher.schedule, teacher.codebook, prediction=prediction,
                         generator=gen)
        metrics[f"gap_{prediction}"] = g.mean
        metrics[f"gap_{prediction}_per_scale"] = g.gap.tolist()
    return metrics
