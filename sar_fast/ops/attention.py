"""Block-causal scale attention: a token of scale s attends to every token of scales <= s
(or, with a window w, of scales s-w..s).

Triton path (kernels/attention.py, kernels/attention_backward.py): FlashAttention-2 style
forward and backward that visit only the tiles the mask leaves visible and evaluate the mask
only on tiles straddling a scale boundary; the schedule reaches the kernels as a small int32
tensor, so FlexVAR's random schedules never recompile them. Both entry points are
`torch.library` custom ops with autograd, so `torch.compile` keeps them in one graph.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch._guards import detect_fake_mode

from sar_fast.kernels.support import HEAD_DIMS  # imports no triton (sar_fast.patch reads it at import)

from . import backend, reference
from ._checks import FLOAT_DTYPES, check_tensor
from .gpu import device_guard, to_device_async


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, same_len: bool) -> None:
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    B, H, L, D = q.shape
    check_tensor("k", k, ndim=4, dtypes=(q.dtype,), device=q.device,
                 shape=(B, H, L if same_len else None, D))
    check_tensor("v", v, ndim=4, dtypes=(q.dtype,), device=q.device, shape=tuple(k.shape))
    if k.shape[2] == 0 or L == 0:
        raise ValueError(f"q and k need at least one token, got q {tuple(q.shape)}, k {tuple(k.shape)}")


def _check_softmax_scale(softmax_scale: float | None) -> None:
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float))
                                          and math.isfinite(softmax_scale) and softmax_scale > 0):
        raise ValueError(f"softmax_scale must be a positive finite float or None, got {softmax_scale!r}")


def _use_triton(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """backend.select plus the kernel's own limits: under 'auto' an input the kernel cannot
    take goes to the reference; a forced 'kernel' raises instead of falling back."""
    if backend.select(op, q, k, v, kernel=backend.TRITON) != "kernel":
        return False
    D, forced = q.shape[-1], backend.get_backend() == "kernel"
    if D not in HEAD_DIMS:
        if forced:
            raise ValueError(f"{op}: the Triton kernel takes head dims {HEAD_DIMS} (last dim of q), got {D}")
        return False
    if q.dtype == torch.bfloat16 and not q.is_cuda and not backend.any_fake(q):
        raise TypeError(f"{op}: q has dtype bfloat16, which Triton's interpreter cannot run on CPU; "
                        f"use float32 or float16, or the 'reference' backend")
    return True


# --------------------------------------------------------------------------------------
# custom ops (opaque to torch.compile; autograd registered below)
# --------------------------------------------------------------------------------------
class ScaleLayout(NamedTuple):
    """A schedule as tensors: sid [L] int32 (scale of each token) and off [n + 1] int32
    (first token of each scale). Passed instead of Python ints, it lets torch.compile see
    one graph for every schedule (ints would be guarded on and recompile per schedule)."""
    sid: torch.Tensor
    off: torch.Tensor


def _int32_on(values: list[int], device: torch.device) -> torch.Tensor:
    return to_device_async(torch.tensor(values, dtype=torch.int32), device)


def _build_layout(scale_lens: tuple[int, ...], device: torch.device) -> ScaleLayout:
    sid = [i for i, n in enumerate(scale_lens) for _ in range(n)]
    off = [0]
    for n in scale_lens:
        off.append(off[-1] + n)
    return ScaleLayout(_int32_on(sid, device), _int32_on(off, device))


# per schedule: FlexVAR's random schedules are a few thousand, each a few KB
_cached_layout = lru_cache(maxsize=None)(_build_layout)


def scale_layout(scale_lens: Sequence[int], device: torch.device | str) -> ScaleLayout:
    """The layout of tokens grouped into scales of `scale_lens` tokens (cached per schedule)."""
    lens = tuple(int(n) for n in scale_lens)
    if not lens or min(lens) < 1:
        raise ValueError(f"scale_lens must be positive token counts, got {lens}")
    # traced by torch.compile (the layout becomes graph constants) or fake (memory estimates):
    # built afresh, never cached
    if torch.compiler.is_compiling() or detect_fake_mode() is not None:
        return _build_layout(lens, torch.device(device))
    return _cached_layout(lens, torch.device(device))


# the kernels clamp the window to the number of scales: this means "no window" for any schedule
_NO_WINDOW = 1 << 20


def _last_dim_dense(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("sar_fast::scale_attention_fwd", mutates_args=())
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_sid: torch.Tensor, k_sid: torch.Tensor,
                   q_off: torch.Tensor, k_off: torch.Tensor, softmax_scale: float, window: int, cached: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, base-2 log-sum-exp). cached: every query sees every key (KV cache)."""
    from sar_fast.kernels import attention as attention_kernels  # here: importing triton is slow
    q, k, v = (_last_dim_dense(t) for t in (q, k, v))
    with device_guard(q):
        return attention_kernels.forward(q, k, v, q_sid, k_sid, k_off, softmax_scale, window, cached=cached)


@_attention_fwd.register_fake
def _(q, k, v, q_sid, k_sid, q_off, k_off, softmax_scale, window, cached):
    B, H, L, D = q.shape
    return q.new_empty(B, L, H, D).transpose(1, 2), q.new_empty(B, H, L, dtype=torch.float32)


@torch.library.custom_op("sar_fast::scale_attention_bwd", mutates_args=())
def _attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   out: torch.Tensor, lse: torch.Tensor, q_sid: torch.Tensor, k_sid: torch.Tensor,
                   q_off: torch.Tensor, k_off: torch.Tensor, softmax_scale: float,
                   window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from sar_fast.kernels import attention_backward  # here: importing triton is slow
    grad_out, q, k, v, out = (_last_dim_dense(t) for t in (grad_out, q, k, v, out))
    with device_guard(q):
        return attention_backward.backward(grad_out, q, k, v, out, lse.contiguous(), q_sid, k_sid, q_off, k_off,
                                           softmax_scale, window)


@_attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, q_sid, k_sid, q_off, k_off, softmax_scale, window):
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        torch.empty_like(k, memory_format=torch.contiguous_format), \
        torch.empty_like(v, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, q_sid, k_sid, q_off, k_off, softmax_scale, window, cached = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, q_sid, k_sid, q_off, k_off)
    ctx.softmax_scale, ctx.window = softmax_scale, window


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, q_sid, k_sid, q_off, k_off = ctx.saved_tensors
    dq, dk, dv = _attention_bwd(grad_out, q, k, v, out, lse, q_sid, k_sid, q_off, k_off, ctx.softmax_scale,
                                ctx.window)
    return dq, dk, dv, None, None, None, None, None, None, None


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------
def _window_mask(sid: torch.Tensor, window: int | None) -> torch.Tensor:
    gap = sid[:, None] - sid[None, :]
    return (gap >= 0) if window is None else (gap >= 0) & (gap <= window)


def scale_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           scale_lens: Sequence[int] | ScaleLayout, softmax_scale: float | None = None,
                           window: int | None = None) -> torch.Tensor:
    """q, k, v [B, H, L, D] -> [B, H, L, D]; scale_lens = tokens per scale, summing to L, or
    their `scale_layout` (tensors: what a compiled model passes, so that a new schedule
    does not recompile it).
    A token of scale s attends to the tokens of scales <= s, or with `window` = w only to
    those of scales s-w..s (w = 0: its own scale only). softmax_scale defaults to 1/sqrt(D)
    (VAR/FlexVAR with attn_l2_norm pass 1.0 and a pre-scaled q). The Triton path returns a
    [B, H, L, D] view of [B, L, H, D] memory, so `out.transpose(1, 2).reshape(B, L, H * D)`
    costs no copy.
    """
    _check_qkv(q, k, v, same_len=True)
    if isinstance(scale_lens, ScaleLayout):
        layout, lens = scale_lens, None
        if layout.sid.dim() != 1 or layout.sid.shape[0] != q.shape[2] or layout.sid.device != q.device:
            raise ValueError(f"scale_lens: a ScaleLayout of {q.shape[2]} tokens on {q.device} was expected, got "
                             f"sid {tuple(layout.sid.shape)} on {layout.sid.device}")
    else:
        lens = tuple(int(n) for n in scale_lens)
        if not lens or min(lens) < 1:
            raise ValueError(f"scale_lens must be positive token counts, got {lens}")
        if sum(lens) != q.shape[2]:
            raise ValueError(f"scale_lens sum to {sum(lens)} but q has L={q.shape[2]} tokens")
        layout = None
    _check_softmax_scale(softmax_scale)
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 0):
        raise ValueError(f"window must be None or an int >= 0 (scales looked back), got {window!r}")
    if window is not None and lens is not None and window >= len(lens) - 1:
        window = None  # looks back past the first scale: the plain block-causal mask
    if _use_triton("scale_causal_attention", q, k, v):
        layout = layout if layout is not None else scale_layout(lens, q.device)
        scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
        out, _ = _attention_fwd(q, k, v, layout.sid, layout.sid, layout.off, layout.off, scale,
                                _NO_WINDOW if window is None else window, False)
        return out
    if layout is None and window is None:
        return reference.scale_causal_attention(q, k, v, lens, softmax_scale)
    sid = layout.sid if layout is not None else scale_layout(lens, q.device).sid
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_window_mask(sid, window), scale=softmax_scale)


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     softmax_scale: float | None = None) -> torch.Tensor:
    """Sampling: the newest scale's queries [B, H, l, D] against the KV cache [B, H, L', D]
    (all earlier scales plus this one); no mask is needed."""
    _check_qkv(q, k, v, same_len=False)
    _check_softmax_scale(softmax_scale)
    if _use_triton("cached_attention", q, k, v):
        scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
        q_layout, k_layout = scale_layout((q.shape[2],), q.device), scale_layout((k.shape[2],), q.device)
        out, _ = _attention_fwd(q, k, v, q_layout.sid, k_layout.sid, q_layout.off, k_layout.off, scale, 1, True)
        return out
    return reference.cached_attention(q, k, v, softmax_scale)
