"""Block-causal scale attention: a token of scale s attends to every token of scales <= s
(or, with a window w, of scales s-w..s).

Triton path (kernels/attention.py): FlashAttention-2 style forward and backward that
visit only the tiles the mask leaves visible and evaluate the mask only on tiles straddling
a scale boundary; the schedule reaches the kernels as a small int32 tensor, so FlexVAR's
random schedules never recompile them. Both entry points are `torch.library` custom ops
with autograd, so `torch.compile` keeps them in one graph.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import torch
import torch.nn.functional as F

from . import backend, reference
from ._checks import check_tensor

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_KERNEL = "attention"
HEAD_DIMS = (16, 32, 64, 128)  # head dims the Triton kernels take (the reference takes any)


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, same_len: bool) -> None:
    check_tensor("q", q, ndim=4, dtypes=_DTYPES)
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
    if backend.select(op, q, k, v, kernel=_KERNEL) != "kernel":
        return False
    D, forced = q.shape[-1], backend.get_backend() == "kernel"
    if D not in HEAD_DIMS:
        if forced:
            raise ValueError(f"{op}: the Triton kernel takes head dims {HEAD_DIMS} (last dim of q), got {D}")
        return False
    if q.dtype == torch.bfloat16 and not q.is_cuda:
        raise TypeError(f"{op}: q has dtype bfloat16, which Triton's interpreter cannot run on CPU; "
                        f"use float32 or float16, or the 'reference' backend")
    return True


# --------------------------------------------------------------------------------------
# custom ops (opaque to torch.compile; autograd registered below)
# --------------------------------------------------------------------------------------
@lru_cache(maxsize=None)  # per schedule: FlexVAR's random schedules are a few thousand, each a few KB
def _layout(scale_lens: tuple[int, ...], len_q: int, len_k: int, device: torch.device):
    """(q_sid, k_sid, q_off, k_off) int32 on `device`; no scale_lens = one scale, no mask."""
    kernels = backend.load_kernels(_KERNEL)
    if scale_lens:
        sid, off = kernels.scale_layout(scale_lens, device)
        return sid, sid, off, off
    q_sid, q_off = kernels.scale_layout((len_q,), device)
    k_sid, k_off = kernels.scale_layout((len_k,), device)
    return q_sid, k_sid, q_off, k_off


def _last_dim_dense(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("sar_fast::scale_attention_fwd", mutates_args=())
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale_lens: list[int],
                   softmax_scale: float, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, base-2 log-sum-exp). Empty scale_lens: every query sees every key (KV cache)."""
    q, k, v = (_last_dim_dense(t) for t in (q, k, v))
    q_sid, k_sid, _, k_off = _layout(tuple(scale_lens), q.shape[2], k.shape[2], q.device)
    return backend.load_kernels(_KERNEL).forward(q, k, v, q_sid, k_sid, k_off, softmax_scale,
                                                 window, cached=not scale_lens)


@_attention_fwd.register_fake
def _(q, k, v, scale_lens, softmax_scale, window):
    B, H, L, D = q.shape
    return q.new_empty(B, L, H, D).transpose(1, 2), q.new_empty(B, H, L, dtype=torch.float32)


@torch.library.custom_op("sar_fast::scale_attention_bwd", mutates_args=())
def _attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   out: torch.Tensor, lse: torch.Tensor, scale_lens: list[int], softmax_scale: float,
                   window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_out, q, k, v, out = (_last_dim_dense(t) for t in (grad_out, q, k, v, out))
    layout = _layout(tuple(scale_lens), q.shape[2], k.shape[2], q.device)
    return backend.load_kernels(_KERNEL).backward(grad_out, q, k, v, out, lse.contiguous(), *layout,
                                                  softmax_scale, window)


@_attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, scale_lens, softmax_scale, window):
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        torch.empty_like(k, memory_format=torch.contiguous_format), \
        torch.empty_like(v, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, scale_lens, softmax_scale, window = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale_lens, ctx.softmax_scale, ctx.window = scale_lens, softmax_scale, window


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _attention_bwd(grad_out, q, k, v, out, lse, ctx.scale_lens, ctx.softmax_scale,
                                ctx.window)
    return dq, dk, dv, None, None, None


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------
def _window_mask(scale_lens: tuple[int, ...], window: int, device: torch.device) -> torch.Tensor:
    sid = torch.repeat_interleave(torch.arange(len(scale_lens), device=device),
                                  torch.tensor(scale_lens, device=device))
    gap = sid[:, None] - sid[None, :]
    return (gap >= 0) & (gap <= window)


def scale_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           scale_lens: Sequence[int], softmax_scale: float | None = None,
                           window: int | None = None) -> torch.Tensor:
    """q, k, v [B, H, L, D] -> [B, H, L, D]; scale_lens = tokens per scale, summing to L.

    A token of scale s attends to the tokens of scales <= s, or with `window` = w only to
    those of scales s-w..s (w = 0: its own scale only). softmax_scale defaults to 1/sqrt(D)
    (VAR/FlexVAR with attn_l2_norm pass 1.0 and a pre-scaled q). The Triton path returns a
    [B, H, L, D] view of [B, L, H, D] memory, so `out.transpose(1, 2).reshape(B, L, H * D)`
    costs no copy.
    """
    _check_qkv(q, k, v, same_len=True)
    lens = tuple(int(n) for n in scale_lens)
    if not lens or min(lens) < 1:
        raise ValueError(f"scale_lens must be positive token counts, got {lens}")
    if sum(lens) != q.shape[2]:
        raise ValueError(f"scale_lens sum to {sum(lens)} but q has L={q.shape[2]} tokens")
    _check_softmax_scale(softmax_scale)
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 0):
        raise ValueError(f"window must be None or an int >= 0 (scales looked back), got {window!r}")
    if window is not None and window >= len(lens) - 1:
        window = None  # looks back past the first scale: the plain block-causal mask
    if _use_triton("scale_causal_attention", q, k, v):
        scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
        out, _ = _attention_fwd(q, k, v, list(lens), scale, len(lens) if window is None else window)
        return out
    if window is None:
        return reference.scale_causal_attention(q, k, v, lens, softmax_scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_window_mask(lens, window, q.device),
                                          scale=softmax_scale)


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     softmax_scale: float | None = None) -> torch.Tensor:
    """Sampling: the newest scale's queries [B, H, l, D] against the KV cache [B, H, L', D]
    (all earlier scales plus this one); no mask is needed."""
    _check_qkv(q, k, v, same_len=False)
    _check_softmax_scale(softmax_scale)
    if _use_triton("cached_attention", q, k, v):
        scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
        out, _ = _attention_fwd(q, k, v, [], scale, 1)
        return out
    return reference.cached_attention(q, k, v, softmax_scale)
