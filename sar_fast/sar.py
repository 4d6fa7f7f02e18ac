"""The SAR objective: teacher forcing, Stagger-Scale Rollout, Contrastive Student-Forcing Loss.

One training step on a batch (labels, ground-truth codes of every scale):

1. TF pass on ground-truth inputs -> L_TF (cross-entropy vs the ground truth), through the
   fused head + loss so the logits are never materialised; logits are built (no grad) only
   for the scales SSR samples from.
2. SSR: sample those scales' TF predictions (argmax, top-k/top-p, or top-k/top-p on
   classifier-free-guided logits with SAR's ramp t = cfg * (1 + si/(n-1)) / 2); the
   null-class pass this needs runs without autograd, over the prefix that the sampled
   scales need, and maps to logits only there.
3. One SF pass on inputs rebuilt from the samples (transition 'last' as the public code,
   a 'random' one, or 'all' at once as the paper's Eq. 6), supervised by the TF-sampled
   codes (CSFL), the TF distribution (KL) or the ground truth: L = L_TF + gamma * L_CSF.

`objective='official'` reproduces the public SAR step as written (TF on a 2B batch with
the null class and autograd through all of it, every scale sampled, dense logits); the
default path computes the same loss and gradients without that waste (tested with the
same SSR codes injected in both, and under argmax sampling). Their draws differ: `official`
keeps the public code's multinomial over the whole vocabulary from a generator seeded per
(seed, step, scale), draw for draw; the default draws from the same distribution over the
top-k candidates only (ops.sample_survivors: fused in C++ on CPU), with uniforms keyed by (seed, step,
global row, scale) (rng.sample_keyed_uniform), so a sample's draw does not depend on
the number of ranks or micro-batches.

Naive student forcing (the paper's Table 3 ablations) is here too: 'sf_full' (train on a
full autoregressive rollout), 'sf_alternate' (TF and sf_full on alternate steps),
'sf_interleave' (odd scales' inputs from the rollout, even ones ground truth) and
'sf_hybrid' (the first hybrid_k scales teacher-forced, the rest from the rollout); each
is one pass with ground-truth targets, on a rollout whose draws are keyed by (seed, step,
global row, token) like SSR's.

No distributed code here: the trainer wraps the model (FSDP2) and calls `sar_step`.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from . import ops
from .models.blocks import apply_head
from .ops.reference import Phi
from .rng import STREAM_ROLLOUT, STREAM_SSR, official_scale_seed, sample_keyed_uniform, transition_seed
from .sampling import guidance_weight, sample_top_k_top_p
from .schedules import Schedule

OBJECTIVES = ("tf", "sar", "official", "sf_full", "sf_alternate", "sf_interleave", "sf_hybrid")
TRANSITIONS = ("last", "random", "all")
SAMPLINGS = ("argmax", "sample", "cfg")
CSF_TARGETS = ("sampled", "soft", "gt")
SCALE_WEIGHTINGS = ("token", "scale")


@dataclass
class SARConfig:
    """One step's objective. The metadata is the trainer's command line (sar_fast.train.config
    makes a flag of every field but `seed`, which comes from the run's --seed)."""
    objective: str = field(default="sar", metadata={"choices": OBJECTIVES, "help": (
        "tf: teacher forcing; sar: TF + SSR + CSFL; official: the public SAR step as written (slower, same "
        "result); sf_*: naive student-forcing ablations")})
    transitions: str = field(default="last", metadata={"choices": TRANSITIONS, "help": (
        "SSR transitions: last (public code), random, all (Eq. 6)")})
    sampling: str = field(default="cfg", metadata={"choices": SAMPLINGS, "help": "how SSR samples the TF predictions"})
    csf_target: str = field(default="sampled", metadata={"choices": CSF_TARGETS, "help": (
        "CSF target: TF-sampled codes, TF distribution (KL), GT")})
    gamma: float = field(default=0.01, metadata={"help": "weight of the CSF loss"})
    cfg: float = field(default=1.2, metadata={"help": "guidance for SSR sampling (ramp cfg*(1+si/(n-1))/2)"})
    top_k: int = field(default=900, metadata={"help": "SSR top-k (0 = off)"})
    top_p: float = field(default=0.96, metadata={"help": "SSR top-p (0 = off)"})
    scale_weighting: str = field(default="token", metadata={"choices": SCALE_WEIGHTINGS, "help": (
        "token: 1/L per token; scale: 1/n per scale")})
    label_smoothing: float = field(default=0.0, metadata={"help": "label smoothing of every cross-entropy term"})
    hybrid_k: int = field(default=4, metadata={"help": "sf_hybrid: teacher-forced scales before the rollout"})
    seed: int = field(default=0, metadata={"cli": False, "help": "seed of SSR's draws (the run's --seed)"})

    def __post_init__(self) -> None:
        for name, allowed in (("objective", OBJECTIVES), ("transitions", TRANSITIONS),
                              ("sampling", SAMPLINGS), ("csf_target", CSF_TARGETS),
                              ("scale_weighting", SCALE_WEIGHTINGS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma}")
        if self.top_k < 0 or not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"need top_k >= 0 and 0 <= top_p <= 1, got {self.top_k}, {self.top_p}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.hybrid_k < 1:
            raise ValueError(f"hybrid_k must be >= 1, got {self.hybrid_k}")
        if self.objective == "official" and (self.transitions != "last" or self.csf_target != "sampled"):
            raise ValueError("objective 'official' is the public code's step: transitions 'last', "
                             "csf_target 'sampled'")

    def to_dict(self) -> dict:
        return asdict(self)


# The public SAR code's settings (GengzeZhou/SAR trainer.py, csfl mode).
OFFICIAL = dict(objective="official", transitions="last", sampling="cfg", csf_target="sampled",
                gamma=0.01, cfg=1.2, top_k=900, top_p=0.96)


@dataclass
class StepOutput:
    loss: torch.Tensor                  # what backward runs on
    metrics: dict[str, torch.Tensor]    # detached 0-d tensors (no host sync until logged)
    tf_ce: torch.Tensor                 # [B*L] per-token CE of the pass on ground-truth targets
    tf_argmax: torch.Tensor             # [B*L] its argmax
    codes: torch.Tensor                 # [B, L] ground truth
    schedule: Schedule

    @property
    def scale_stats(self) -> torch.Tensor:
        """[n, 3]: per scale, CE sum, correct-argmax count, tokens (computed when asked for,
        so steps that are not logged pay nothing)."""
        B, n = self.codes.shape[0], len(self.schedule)
        ce = self.tf_ce.detach().float().view(B, -1).sum(0)
        correct = (self.tf_argmax.view(B, -1) == self.codes).float().sum(0)
        scale_id = torch.repeat_interleave(torch.arange(n, device=ce.device),
                                           torch.tensor(self.schedule.lengths, device=ce.device))
        per_token = torch.stack((ce, correct, torch.full_like(ce, float(B))), dim=1)
        return per_token.new_zeros(n, 3).index_add_(0, scale_id, per_token)


def token_weights(schedule: Schedule, weighting: str, device: torch.device, first_scale: int = 0) -> torch.Tensor:
    """Per-token weights [L'] over scales first_scale..n-1 (normalised by the mean reduction)."""
    lengths = schedule.lengths[first_scale:]
    if weighting == "token":
        return torch.ones(sum(lengths), device=device)
    return torch.cat([torch.full((n,), 1.0 / (len(lengths) * n), device=device) for n in lengths])


class _Inputs:
    """Builds the model's input sequences from code maps (FlexVAR non-residual, VAR residual):
    teacher forcing through ops.scale_shift, SSR's transitions through ops.ssr_inputs."""

    def __init__(self, arch: str, codebook: torch.Tensor, phi: Phi | None):
        self.arch, self.codebook, self.phi = arch, codebook, phi

    def tf(self, codes: torch.Tensor, schedule: Schedule) -> torch.Tensor:
        return ops.scale_shift(codes, self.codebook, schedule, mode=self.arch, phi=self.phi,
                               check_range=False, out_dtype=torch.float32)

    def _ssr(self, codes: torch.Tensor, schedule: Schedule, js: list[int]) -> torch.Tensor:
        return ops.ssr_inputs(codes, self.codebook, schedule, js, mode=self.arch, phi=self.phi,
                              check_range=False, out_dtype=torch.float32)

    def transitions(self, gt: torch.Tensor, preds: dict[int, torch.Tensor], schedule: Schedule,
                    js: list[int]) -> torch.Tensor:
        """Inputs of scales j+1 for the increasing transitions js, concatenated [B, sum s_{j+1}^2, C]:
        each built from the predicted codes of scale j (VAR: on top of the ground truth of
        the scales < j). js = 0..n-2 is Eq. 6, every scale's input at once."""
        if self.arch == "flexvar":  # scale j+1's input reads scale j alone: one call for every j
            return self._ssr(_with_predictions(gt, preds, js, schedule), schedule, js)
        # one call per j: VAR's residual input of scale j+1 sums scales 0..j, of which only j
        # is predicted. The whole schedule, not its prefix: the residual sum lives at the last
        # side and phi is chosen by si / (n - 1), so a truncated schedule changes both.
        return torch.cat([self._ssr(_with_predictions(gt, preds, [j], schedule), schedule, [j]) for j in js], dim=1)


def _with_predictions(gt: torch.Tensor, preds: dict[int, torch.Tensor], js: list[int],
                      schedule: Schedule) -> torch.Tensor:
    """The ground-truth codes [B, L] with the scales js replaced by their predictions."""
    mixed = gt.clone()
    for j in js:
        mixed[:, schedule.scale(j)] = preds[j]
    return mixed


def _check_batch(labels: torch.Tensor, codes: torch.Tensor, schedule: Schedule) -> None:
    """Shapes only: value ranges are the data pipeline's job (checked once per batch on the
    host in the trainer), so the step itself never waits on the device."""
    if labels.dim() != 1 or codes.dim() != 2 or codes.shape[0] != labels.shape[0]:
        raise ValueError(f"need labels [B] and codes [B, L], got {tuple(labels.shape)} and {tuple(codes.shape)}")
    if codes.shape[1] != schedule.total:
        raise ValueError(f"codes has {codes.shape[1]} tokens but schedule {tuple(schedule)} has {schedule.total}")
    if len(schedule) < 2:
        raise ValueError(f"SAR needs at least two scales, got schedule {schedule}")


def sar_step(model, labels: torch.Tensor, codes: torch.Tensor, schedule, codebook: torch.Tensor,
             config: SARConfig, step: int = 0, phi: Phi | None = None, rows: torch.Tensor | None = None,
             ssr_codes: dict[int, torch.Tensor] | None = None) -> StepOutput:
    """Loss (and metrics) of one training step; the caller runs backward and the optimiser.

    model: a ScaleAR (possibly FSDP-wrapped; `forward_student` and `generate` must then be
    registered as FSDP forward methods). codes [B, L]: ground-truth codes of every scale
    of `schedule`; codebook [V, Cv]: the embedding the inputs are built from (FlexVAR: the
    L2-normalised VQ codebook; VAR: the raw one with `phi`, its shared convs).
    rows [B]: each row's global index (the trainer's: its position in the epoch's global
    order), which keys SSR's draws; default 0..B-1. ssr_codes {scale: codes [B, s^2]}:
    use these instead of sampling those scales (a seam for tests and oracles).
    """
    schedule = Schedule(schedule)
    _check_batch(labels, codes, schedule)
    if rows is None:
        rows = torch.arange(labels.shape[0], device=labels.device)
    elif rows.shape != labels.shape or rows.is_floating_point():
        raise ValueError(f"rows must be integer [{labels.shape[0]}] (one global index per row), got "
                         f"{rows.dtype} {tuple(rows.shape)}")
    inputs = _Inputs(model.arch, codebook, phi)
    obj = config.objective
    if obj == "tf" or (obj == "sf_alternate" and step % 2 == 0):
        return _teacher_forcing(model, labels, codes, schedule, inputs, config)
    if obj == "official":
        return _official(model, labels, codes, schedule, inputs, config, step, ssr_codes)
    if obj == "sar":
        return _sar(model, labels, codes, schedule, inputs, config, step, rows, ssr_codes)
    return _naive_student_forcing(model, labels, codes, schedule, inputs, config, step, rows)


# ------------------------------------------------------------------------------------------
def _tf_head(codes: torch.Tensor, weights: torch.Tensor, config: SARConfig, logit_scales: list[int],
             schedule: Schedule):
    """head_fn for the TF pass: fused CE + stats, and detached logits of `logit_scales`."""
    def head_fn(hidden: torch.Tensor, head) -> tuple:
        B, L, C = hidden.shape
        loss, stats = ops.fused_linear_cross_entropy(
            hidden.reshape(B * L, C), head.weight, head.bias, codes.reshape(-1),
            token_weight=weights.repeat(B), label_smoothing=config.label_smoothing,
            reduction="mean", return_stats=True, check_range=False)
        with torch.no_grad():
            logits = {si: apply_head(head, hidden[:, schedule.scale(si)].detach()) for si in logit_scales}
        return loss, stats, logits
    return head_fn


def _logits_head(logit_scales: list[int], schedule: Schedule):
    def head_fn(hidden: torch.Tensor, head) -> dict[int, torch.Tensor]:
        return {si: apply_head(head, hidden[:, schedule.scale(si)]) for si in logit_scales}
    return head_fn


def _step_output(loss, metrics: dict, stats, codes: torch.Tensor, schedule: Schedule) -> StepOutput:
    ce, amax, _ = stats
    return StepOutput(loss, metrics, ce, amax, codes, schedule)


def _metrics(**values: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v.detach().float() for k, v in values.items()}


def _teacher_forcing(model, labels, codes, schedule, inputs: _Inputs, config: SARConfig) -> StepOutput:
    w = token_weights(schedule, config.scale_weighting, codes.device)
    with _phase("sar.tf_forward"):
        loss, stats, _ = model(labels, inputs.tf(codes, schedule), schedule,
                               head_fn=_tf_head(codes, w, config, [], schedule))
    return _step_output(loss, _metrics(loss=loss, tf_loss=loss), stats, codes, schedule)


def _needed_scales(config: SARConfig, n: int, step: int) -> tuple[list[int], list[int]]:
    """(transitions j -> j+1 to run, scales whose TF predictions must be sampled)."""
    if config.transitions == "last":
        js = [n - 2]
    elif config.transitions == "random":
        js = [random.Random(transition_seed(config.seed, step)).randrange(n - 1)]
    else:
        js = list(range(n - 1))
    needed = sorted({j for j in js} | ({j + 1 for j in js} if config.csf_target == "sampled" else set()))
    return js, needed


def _phase(name: str):
    """A profiler range around a phase of the step (bench/bench_train_step.py reads them);
    about a microsecond when no profiler is recording."""
    return torch.profiler.record_function(name)


def _sample(config: SARConfig, cond: dict[int, torch.Tensor], uncond: dict[int, torch.Tensor] | None,
            n: int, step: int, scales: list[int], rows: torch.Tensor,
            ssr_codes: dict[int, torch.Tensor] | None) -> dict[int, torch.Tensor]:
    """SSR draws of the default objective: CFG mixing, top-k / top-p and the draw over the k
    candidates only, with uniforms keyed by (seed, step, global row, scale)."""
    preds = {}
    for si in scales:
        if ssr_codes is not None and si in ssr_codes:
            preds[si] = ssr_codes[si]
            continue
        logits = cond[si]
        if config.sampling == "argmax":
            preds[si] = logits.argmax(-1)
            continue
        t = guidance_weight("sar", config.cfg, si, n) if uncond is not None else 0.0
        uniforms = sample_keyed_uniform(config.seed, step, (STREAM_SSR, si), rows, logits.shape[1:-1], logits.device)
        preds[si] = ops.sample_survivors(logits, config.top_k, config.top_p, uniforms,
                                         uncond=None if uncond is None else uncond[si], guidance=t)
    return preds


# deliberate repeat: of _sample's loop: the official path keeps the public code's draws (see the docstring)
def _sample_official(config: SARConfig, cond: dict[int, torch.Tensor], uncond: dict[int, torch.Tensor] | None,
                     n: int, step: int, scales: list[int],
                     ssr_codes: dict[int, torch.Tensor] | None) -> dict[int, torch.Tensor]:
    """The public code's draws: multinomial over the whole (filtered) vocabulary, one
    generator per (seed, step, scale) shared by all rows (so keyed by the rank's batch).
    Kept apart from `_sample` (same loop shape) so the official path stays draw for draw."""
    preds = {}
    for si in scales:
        if ssr_codes is not None and si in ssr_codes:
            preds[si] = ssr_codes[si]
            continue
        logits = cond[si]
        if config.sampling == "argmax":
            preds[si] = logits.argmax(-1)
            continue
        if uncond is not None:
            t = guidance_weight("sar", config.cfg, si, n)
            logits = (1 + t) * logits - t * uncond[si]
        gen = torch.Generator(device=logits.device).manual_seed(official_scale_seed(config.seed, step, si))
        preds[si] = sample_top_k_top_p(logits, config.top_k, config.top_p, gen)
    return preds


def _uses_guidance(config: SARConfig, official: bool) -> bool:
    if config.sampling != "cfg":
        return False
    return config.cfg > 1.0 if official else config.cfg > 0.0  # the public code guides only above 1


def _sar(model, labels, codes, schedule, inputs: _Inputs, config: SARConfig, step: int, rows: torch.Tensor,
         ssr_codes: dict[int, torch.Tensor] | None) -> StepOutput:
    n = len(schedule)
    device = codes.device
    js, needed = _needed_scales(config, n, step)
    logit_scales = sorted(set(needed) | ({j + 1 for j in js} if config.csf_target == "soft" else set()))
    w = token_weights(schedule, config.scale_weighting, device)
    with _phase("sar.tf_forward"):
        x_tf = inputs.tf(codes, schedule)
        tf_loss, stats, tf_logits = model(labels, x_tf, schedule,
                                          head_fn=_tf_head(codes, w, config, logit_scales, schedule))

    uncond = None
    injected = ssr_codes is not None and all(si in ssr_codes for si in needed)
    if _uses_guidance(config, official=False) and needed and not injected:
        last = max(needed) + 1  # the null-class pass only needs the prefix up to the last sampled scale
        with torch.no_grad(), _phase("sar.null_prefix_forward"):
            null = torch.full_like(labels, model.num_classes)
            uncond = model(null, x_tf[:, :schedule.offsets[last] - 1], schedule[:last],
                           head_fn=_logits_head(needed, schedule))
    with torch.no_grad(), _phase("sar.sampling"):
        preds = _sample(config, tf_logits, uncond, n, step, needed, rows, ssr_codes)

    with _phase("sar.sf_forward"):
        csf_loss = _csf(model, labels, codes, schedule, inputs, config, js, preds, tf_logits)
    loss = tf_loss + config.gamma * csf_loss
    return _step_output(loss, _metrics(loss=loss, tf_loss=tf_loss, csf_loss=csf_loss), stats, codes, schedule)


def _csf_target_head(target: torch.Tensor | None, teacher_logits: torch.Tensor | None, weights: torch.Tensor | None,
                     config: SARConfig):
    def head_fn(hidden: torch.Tensor, head) -> torch.Tensor:
        B, L, C = hidden.shape
        tw = None if weights is None else weights.repeat(B)
        if teacher_logits is not None:  # KL(teacher || student), the soft CSF target
            return ops.fused_linear_kl_div(hidden.reshape(B * L, C), head.weight, head.bias,
                                           target_logits=teacher_logits.reshape(B * L, -1), token_weight=tw)
        return ops.fused_linear_cross_entropy(hidden.reshape(B * L, C), head.weight, head.bias, target.reshape(-1),
                                              token_weight=tw, label_smoothing=config.label_smoothing,
                                              check_range=False)
    return head_fn


def _csf(model, labels, codes, schedule, inputs: _Inputs, config: SARConfig, js: list[int],
         preds: dict[int, torch.Tensor], tf_logits: dict[int, torch.Tensor]) -> torch.Tensor:
    """The student-forcing pass on self-generated inputs and its loss."""
    n = len(schedule)

    def target_of(si: int):
        if config.csf_target == "sampled":
            return preds[si], None
        if config.csf_target == "gt":
            return codes[:, schedule.scale(si)], None
        return None, tf_logits[si]

    if config.transitions != "all":
        j = js[0]
        x_sf = inputs.transitions(codes, preds, schedule, [j])
        target, teacher = target_of(j + 1)
        return model.forward_student(labels, x_sf, schedule[j + 1], scale_index=j + 1,
                                     head_fn=_csf_target_head(target, teacher, None, config))
    x_sf = inputs.transitions(codes, preds, schedule, list(range(n - 1)))
    parts = [target_of(si) for si in range(1, n)]
    w = token_weights(schedule, config.scale_weighting, codes.device, first_scale=1)
    if config.csf_target == "soft":
        teacher = torch.cat([p[1] for p in parts], dim=1)

        def head_fn(hidden, head):  # scale 0 sees only the class token: identical in TF and SF
            return _csf_target_head(None, teacher, w, config)(hidden[:, 1:], head)
    else:
        target = torch.cat([p[0] for p in parts], dim=1)

        def head_fn(hidden, head):
            return _csf_target_head(target, None, w, config)(hidden[:, 1:], head)
    return model(labels, x_sf, schedule, head_fn=head_fn)


# ------------------------------------------------------------------------------------------
def _official(model, labels, codes, schedule, inputs: _Inputs, config: SARConfig, step: int,
              ssr_codes: dict[int, torch.Tensor] | None) -> StepOutput:
    """The public SAR step as written: dense logits, 2B TF batch with autograd, all scales sampled."""
    n = len(schedule)
    B, V = labels.shape[0], model.vocab_size
    guided = _uses_guidance(config, official=True)
    labels2 = torch.cat((labels, torch.full_like(labels, model.num_classes))) if guided else labels
    with _phase("sar.tf_forward"):  # with the null class (2B rows) when guided
        x_tf = inputs.tf(codes, schedule)
        logits_full = model(labels2, x_tf.repeat(2, 1, 1) if guided else x_tf, schedule)
        logits_tf = logits_full[:B]
        w = token_weights(schedule, config.scale_weighting, codes.device)
        per_tok = F.cross_entropy(logits_tf.reshape(-1, V).float(), codes.reshape(-1),
                                  label_smoothing=config.label_smoothing, reduction="none").view(B, -1)
        tf_loss = (per_tok * (w / w.sum())).sum(-1).mean()  # the public code: weights 1/L, sum, batch mean
    with torch.no_grad(), _phase("sar.sampling"):
        cond = {si: logits_tf[:, schedule.scale(si)].float() for si in range(n)}
        uncond = {si: logits_full[B:, schedule.scale(si)].float() for si in range(n)} if guided else None
        # mirror the public code: guidance only when cfg > 1, otherwise sample the conditional logits
        cfg = config if guided or config.sampling != "cfg" else SARConfig(**{**config.to_dict(), "sampling": "sample"})
        preds = _sample_official(cfg, cond, uncond, n, step, list(range(n)), ssr_codes)
    j = n - 2
    with _phase("sar.sf_forward"):
        x_sf = inputs.transitions(codes, preds, schedule, [j])
        logits_sf = model.forward_student(labels, x_sf, schedule[j + 1], scale_index=j + 1)
        csf_loss = F.cross_entropy(logits_sf.reshape(-1, V).float(), preds[j + 1].reshape(-1),
                                   label_smoothing=config.label_smoothing)
    loss = tf_loss + config.gamma * csf_loss
    with torch.no_grad():
        ce = per_tok.detach().reshape(-1)
        stats = (ce, logits_tf.detach().argmax(-1).reshape(-1), None)
    return _step_output(loss, _metrics(loss=loss, tf_loss=tf_loss, csf_loss=csf_loss), stats, codes, schedule)


# ------------------------------------------------------------------------------------------
def _naive_student_forcing(model, labels, codes, schedule, inputs: _Inputs, config: SARConfig,
                           step: int, rows: torch.Tensor) -> StepOutput:
    """One pass on inputs from the model's own full rollout (all or some scales), GT targets.
    The rollout's draws are keyed by (seed, step, global row, token), like SSR's."""
    n = len(schedule)
    guided = _uses_guidance(config, official=False)
    greedy = config.sampling == "argmax"
    with torch.no_grad():
        uniforms = None if greedy else sample_keyed_uniform(config.seed, step, STREAM_ROLLOUT, rows,
                                                            (codes.shape[1],), codes.device)
        rollout = model.generate(inputs.codebook, labels, schedule, cfg=config.cfg if guided else 0.0,
                                 cfg_ramp="sar", top_k=1 if greedy else config.top_k,
                                 top_p=config.top_p, phi=inputs.phi, uniforms=uniforms)
    if config.objective == "sf_interleave":
        use_rollout = [i % 2 == 1 for i in range(n)]
    elif config.objective == "sf_hybrid":
        use_rollout = [i >= config.hybrid_k for i in range(n)]
    else:  # sf_full, and the odd steps of sf_alternate
        use_rollout = [True] * n
    mixed = torch.cat([rollout.codes[i] if use_rollout[i] else codes[:, schedule.scale(i)] for i in range(n)], dim=1)
    w = token_weights(schedule, config.scale_weighting, codes.device)
    loss, stats, _ = model(labels, inputs.tf(mixed, schedule), schedule,
                           head_fn=_tf_head(codes, w, config, [], schedule))
    return _step_output(loss, _metrics(loss=loss, sf_loss=loss), stats, codes, schedule)
