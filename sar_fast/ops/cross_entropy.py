"""Head + loss without the [N, V] logits: cross-entropy (hard targets, per-token weights,
label smoothing, ignore_index) and KL to a teacher distribution (CSFL as KL).

The Triton path (kernels/cross_entropy.py) runs as two torch.library custom ops per loss, a
forward returning per-token values and a backward recomputing the logit tiles, so the
loss works under torch.compile and autograd does gradient work only for the inputs that
need it. Weighting and reduction are ordinary autograd on [N] tensors around the op.
"""
from __future__ import annotations

import math

import torch

from . import backend, reference
from ._checks import FLOAT_DTYPES, INDEX_DTYPES, check_index_range, check_tensor
from .gpu import device_guard

_REDUCTIONS = ("none", "sum", "mean")


def _kernels():
    from sar_fast.kernels import cross_entropy as cross_entropy_kernels  # here: importing triton is slow
    return cross_entropy_kernels


def _or_empty(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0) if t is None else t


# ------------------------------------------------------------------------------------------
# custom ops: hard-target cross-entropy
# ------------------------------------------------------------------------------------------
@torch.library.custom_op("sar_fast::linear_cross_entropy_fwd", mutates_args=())
def _ce_fwd(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
            label_smoothing: float, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-token unweighted CE, log-sum-exp, argmax), each [N]."""
    with device_guard(hidden):
        return _kernels().ce_forward(hidden, weight, bias, target, label_smoothing, ignore_index)


@_ce_fwd.register_fake
def _(hidden, weight, bias, target, label_smoothing, ignore_index):
    n = hidden.shape[0]
    return (hidden.new_empty(n, dtype=torch.float32), hidden.new_empty(n, dtype=torch.float32),
            hidden.new_empty(n, dtype=torch.long))


@torch.library.custom_op("sar_fast::linear_cross_entropy_bwd", mutates_args=())
def _ce_bwd(grad_ce: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            target: torch.Tensor, lse: torch.Tensor, label_smoothing: float, ignore_index: int,
            need_hidden: bool, need_weight: bool, need_bias: bool
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    k = _kernels()
    coef = torch.where(target != ignore_index, grad_ce.float(), 0.0)
    # the GEMMs run in the operands' dtype
    with torch.autocast(hidden.device.type, enabled=False), device_guard(hidden):
        dh, dw, db = k.head_backward(coef, hidden, weight, bias, lse, k.MODE_TARGET, target=target,
                                     label_smoothing=label_smoothing, need_hidden=need_hidden,
                                     need_weight=need_weight, need_bias=need_bias)
    return _or_empty(dh, hidden), _or_empty(dw, weight), _or_empty(db, hidden if bias is None else bias)


@_ce_bwd.register_fake
def _(grad_ce, hidden, weight, bias, target, lse, label_smoothing, ignore_index, need_hidden, need_weight,
      need_bias):
    return _fake_grads(hidden, weight, bias, need_hidden, need_weight, need_bias)


def _fake_grads(hidden, weight, bias, need_hidden, need_weight, need_bias):
    has_bias = need_bias and bias is not None
    return (torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if need_weight else weight.new_empty(0),
            torch.empty_like(bias) if has_bias else (hidden if bias is None else bias).new_empty(0))


def _ce_setup(ctx, inputs, output):
    hidden, weight, bias, target, label_smoothing, ignore_index = inputs
    ctx.save_for_backward(hidden, weight, bias, target, output[1])
    ctx.label_smoothing, ctx.ignore_index = label_smoothing, ignore_index


def _ce_backward(ctx, grad_ce, _grad_lse, _grad_argmax):
    hidden, weight, bias, target, lse = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    if grad_ce is None or not (need_h or need_w or need_b):
        return None, None, None, None, None, None
    dh, dw, db = _ce_bwd(grad_ce, hidden, weight, bias, target, lse, ctx.label_smoothing, ctx.ignore_index,
                         need_h, need_w, need_b and bias is not None)
    return (dh if need_h else None, dw if need_w else None, db if need_b else None, None, None, None)


_ce_fwd.register_autograd(_ce_backward, setup_context=_ce_setup)


# ------------------------------------------------------------------------------------------
# custom ops: KL(p_teacher || p_student)
# ------------------------------------------------------------------------------------------
@torch.library.custom_op("sar_fast::linear_kl_div_fwd", mutates_args=())
def _kl_fwd(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            teacher_logits: torch.Tensor | None, teacher_hidden: torch.Tensor | None, temperature: float
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-token KL, student log-sum-exp, teacher log-sum-exp), each [N], of logits / T."""
    with device_guard(hidden):
        return _kernels().kl_forward(hidden, weight, bias, teacher_logits, teacher_hidden, temperature)


@_kl_fwd.register_fake
def _(hidden, weight, bias, teacher_logits, teacher_hidden, temperature):
    n = hidden.shape[0]
    return tuple(hidden.new_empty(n, dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("sar_fast::linear_kl_div_bwd", mutates_args=())
def _kl_bwd(grad_kl: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            teacher_logits: torch.Tensor | None, teacher_hidden: torch.Tensor | None, lse: torch.Tensor,
            teacher_lse: torch.Tensor, temperature: float, need_hidden: bool, need_weight: bool, need_bias: bool
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    k = _kernels()
    mode = k.MODE_TEACHER_LOGITS if teacher_logits is not None else k.MODE_TEACHER_HIDDEN
    teacher = teacher_logits if teacher_logits is not None else teacher_hidden
    with torch.autocast(hidden.device.type, enabled=False), device_guard(hidden):
        dh, dw, db = k.head_backward(grad_kl.float().contiguous(), hidden, weight, bias, lse, mode,
                                     teacher=teacher, teacher_lse=teacher_lse, temperature=temperature,
                                     need_hidden=need_hidden, need_weight=need_weight, need_bias=need_bias)
    return _or_empty(dh, hidden), _or_empty(dw, weight), _or_empty(db, hidden if bias is None else bias)


@_kl_bwd.register_fake
def _(grad_kl, hidden, weight, bias, teacher_logits, teacher_hidden, lse, teacher_lse, temperature,
      need_hidden, need_weight, need_bias):
    return _fake_grads(hidden, weight, bias, need_hidden, need_weight, need_bias)


def _kl_setup(ctx, inputs, output):
    hidden, weight, bias, teacher_logits, teacher_hidden, temperature = inputs
    ctx.save_for_backward(hidden, weight, bias, teacher_logits, teacher_hidden, output[1], output[2])
    ctx.temperature = temperature


def _kl_backward(ctx, grad_kl, _grad_lse, _grad_teacher_lse):
    hidden, weight, bias, teacher_logits, teacher_hidden, lse, teacher_lse = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    if grad_kl is None or not (need_h or need_w or need_b):
        return (None,) * 6
    dh, dw, db = _kl_bwd(grad_kl, hidden, weight, bias, teacher_logits, teacher_hidden, lse, teacher_lse,
                         ctx.temperature, need_h, need_w, need_b and bias is not None)
    # the teacher side is detached: no gradient to teacher_logits / teacher_hidden
    return (dh if need_h else None, dw if need_w else None, db if need_b else None, None, None, None)


_kl_fwd.register_autograd(_kl_backward, setup_context=_kl_setup)


# ------------------------------------------------------------------------------------------
# public ops
# ------------------------------------------------------------------------------------------
def _check_head(hidden, weight, bias, token_weight, reduction) -> tuple[int, int, int]:
    check_tensor("hidden", hidden, ndim=2, dtypes=FLOAT_DTYPES)
    N, C = hidden.shape
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES, device=hidden.device, shape=(None, C))
    V = weight.shape[0]
    if V == 0:
        raise ValueError("weight must have at least one row (vocabulary size 0)")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES, device=hidden.device, shape=(V,))
    if token_weight is not None:
        check_tensor("token_weight", token_weight, ndim=1, dtypes=FLOAT_DTYPES, device=hidden.device, shape=(N,))
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")
    return N, C, V


def _operands(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden and weight in one compute dtype, as F.linear would see them (autocast included)."""
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
    else:
        dtype = torch.promote_types(hidden.dtype, weight.dtype)
    return hidden.to(dtype).contiguous(), weight.to(dtype).contiguous()


def _reduce(per_token: torch.Tensor, w: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    return per_token.sum() / w.sum()


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                               target: torch.Tensor, token_weight: torch.Tensor | None = None,
                               label_smoothing: float = 0.0, ignore_index: int = -100,
                               reduction: str = "mean", return_stats: bool = False, check_range: bool = True):
    """CE of hidden [N, C] @ weight[V, C].T + bias [V] against target [N] (see
    reference.linear_cross_entropy for the exact reductions and stats).

    check_range=False skips the target range check (a host sync) for callers whose targets
    are valid by construction (e.g. codes from a tokenizer).

    Per token w_i * CE_i (0 where target == ignore_index); 'mean' divides by the sum of the
    weights of the tokens not ignored. return_stats adds (per-token unweighted CE, argmax,
    log-sum-exp), each [N] and detached. On the Triton path the [N, V] logits never exist;
    gradients are computed in backward, only for the inputs that require them.
    """
    N, C, V = _check_head(hidden, weight, bias, token_weight, reduction)
    check_tensor("target", target, ndim=1, dtypes=INDEX_DTYPES, device=hidden.device, shape=(N,))
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if check_range:
        check_index_range("target", target[target != ignore_index], V, what="vocabulary size")
    path = backend.select("fused_linear_cross_entropy", hidden, weight, kernel=backend.TRITON)
    if path == "reference":
        return reference.linear_cross_entropy(hidden, weight, bias, target.long(), token_weight,
                                              label_smoothing, ignore_index, reduction, return_stats)
    h, w = _operands(hidden, weight)
    target = target.contiguous()
    ce, lse, argmax = _ce_fwd(h, w, None if bias is None else bias.contiguous(), target,
                              float(label_smoothing), int(ignore_index))
    valid = target != ignore_index
    tok_w = valid.float() if token_weight is None else torch.where(valid, token_weight.float(), 0.0)
    loss = _reduce(ce * tok_w, tok_w, reduction)
    if not return_stats:
        return loss
    return loss, (ce.detach(), argmax, lse.detach())


def fused_linear_kl_div(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        target_logits: torch.Tensor | None = None, target_hidden: torch.Tensor | None = None,
                        token_weight: torch.Tensor | None = None, reduction: str = "mean",
                        temperature: float = 1.0) -> torch.Tensor:
    """KL(p_teacher || p_student) per token, the soft-target (CSFL-as-KL) loss.

    Student logits = (hidden [N, C] @ weight.T + bias) / T; the teacher's are
    target_logits [N, V] / T, or (target_hidden [N, C] @ weight.T + bias) / T through the
    same head (then never materialised either). The teacher side gets no gradient. Per
    token w_i * KL_i; 'mean' = sum / sum_i w_i. No T^2 factor (scale the loss yourself).
    See reference.linear_kl_div.
    """
    N, C, V = _check_head(hidden, weight, bias, token_weight, reduction)
    if (target_logits is None) == (target_hidden is None):
        raise ValueError("pass exactly one of target_logits [N, V] or target_hidden [N, C]")
    if target_logits is not None:
        check_tensor("target_logits", target_logits, ndim=2, dtypes=FLOAT_DTYPES, device=hidden.device,
                     shape=(N, V))
    else:
        check_tensor("target_hidden", target_hidden, ndim=2, dtypes=FLOAT_DTYPES, device=hidden.device,
                     shape=(N, C))
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    path = backend.select("fused_linear_kl_div", hidden, weight, kernel=backend.TRITON)
    if path == "reference":
        return reference.linear_kl_div(hidden, weight, bias, target_logits, target_hidden, token_weight,
                                       reduction, temperature)
    h, w = _operands(hidden, weight)
    teacher_logits = None if target_logits is None else target_logits.detach().contiguous()
    teacher_hidden = None if target_hidden is None else target_hidden.detach().to(h.dtype).contiguous()
    kl, _, _ = _kl_fwd(h, w, None if bias is None else bias.contiguous(), teacher_logits, teacher_hidden,
                       float(temperature))
    tok_w = torch.ones_like(kl) if token_weight is None else token_weight.float()
    return _reduce(kl * tok_w, tok_w, reduction)
