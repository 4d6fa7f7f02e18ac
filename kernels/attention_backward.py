"""Backward of the block-causal scale attention (kernels/attention.py: the mask, the scale
layout tensors and the tile runs): dK/dV per key tile over the query tiles that see it, dQ
per query tile over the key tiles it sees, both recomputing the probabilities from the
forward's base-2 log-sum-exp; delta = rowsum(O * dO) first, in a small kernel of its own.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention import (LOG2E, _buckets, _dot_precision, _key_tile_runs, _launch_args, _new, _query_tile_runs,
                        _strides, _tile_batch_head, _tuned, _visible)
from .support import interpreter_enabled


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, stride_ob, stride_oh, stride_om,
                      stride_dob, stride_doh, stride_dom, H, Lq,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta[i] = sum_d O[i, d] * dO[i, d] (fp32)."""
    tile, bh, b, h = _tile_batch_head(H)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    in_q = rows < Lq
    o = tl.load(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + offs_d[None, :],
                mask=in_q[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dom + offs_d[None, :],
                 mask=in_q[:, None], other=0.0)
    tl.store(DELTA + bh * Lq + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=in_q)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, k_sid, Q, DO, LSE, DELTA, Q_SID, stride_qm, stride_dom, Lq,
                window, qk_scale, start, stop, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
                MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate dK, dV [BLOCK_N, D] of one key tile over the query tiles [start, stop).
    Works transposed (keys x queries) so every product lands in the key tile's layout."""
    # deliberate repeat: _dq_tiles below loads its tiles the same way; see there why the loads are not shared
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    for m0 in range(start, stop, BLOCK_M):
        m0 = tl.multiple_of(m0, BLOCK_M)
        rows = m0 + offs_m
        q_ptrs = Q + rows[:, None] * stride_qm + offs_d[None, :]
        do_ptrs = DO + rows[:, None] * stride_dom + offs_d[None, :]
        if MASKED:
            in_q = rows < Lq
            q = tl.load(q_ptrs, mask=in_q[:, None], other=0.0)
            do = tl.load(do_ptrs, mask=in_q[:, None], other=0.0)
            lse = tl.load(LSE + rows, mask=in_q, other=0.0)
            delta = tl.load(DELTA + rows, mask=in_q, other=0.0)
        else:
            q = tl.load(q_ptrs)
            do = tl.load(do_ptrs)
            lse = tl.load(LSE + rows)
            delta = tl.load(DELTA + rows)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # [N, M]
        p_t = tl.exp2(s_t - lse[None, :])
        if MASKED:
            q_sid = tl.load(Q_SID + rows, mask=in_q, other=-1)
            vis_t = (k_sid[:, None] <= q_sid[None, :]) & (k_sid[:, None] >= q_sid[None, :] - window)
            p_t = tl.where(vis_t, p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=["q_bucket", "k_bucket"])
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, Q_SID, K_SID, Q_OFF,
                     stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                     stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                     stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                     H, Lq, Lk, num_scales, window, qk_scale, softmax_scale, q_bucket, k_bucket,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    tile, bh, b, h = _tile_batch_head(H)
    n0 = tile * BLOCK_N  # early key tiles are seen by the most queries
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    DO += b * stride_dob + h * stride_doh
    LSE += bh * Lq
    DELTA += bh * Lq

    cols = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    in_k = cols < Lk
    k = tl.load(K + cols[:, None] * stride_kn + offs_d[None, :], mask=in_k[:, None], other=0.0)
    v = tl.load(V + cols[:, None] * stride_vn + offs_d[None, :], mask=in_k[:, None], other=0.0)
    k_sid = tl.load(K_SID + cols, mask=in_k, other=2147483647)  # padding keys are seen by nobody

    lo, full_lo, full_hi, hi = _key_tile_runs(K_SID, Q_OFF, n0, Lk, num_scales, window,
                                              BLOCK_N, BLOCK_M)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dk, dv = _dkdv_tiles(dk, dv, k, v, k_sid, Q, DO, LSE, DELTA, Q_SID, stride_qm, stride_dom, Lq,
                         window, qk_scale, full_lo, full_hi, BLOCK_M, HEAD_DIM, False, DOT_PRECISION)
    dk, dv = _dkdv_tiles(dk, dv, k, v, k_sid, Q, DO, LSE, DELTA, Q_SID, stride_qm, stride_dom, Lq,
                         window, qk_scale, lo, full_lo, BLOCK_M, HEAD_DIM, True, DOT_PRECISION)
    dk, dv = _dkdv_tiles(dk, dv, k, v, k_sid, Q, DO, LSE, DELTA, Q_SID, stride_qm, stride_dom, Lq,
                         window, qk_scale, full_hi, hi, BLOCK_M, HEAD_DIM, True, DOT_PRECISION)
    dk *= softmax_scale
    tl.store(DK + b * stride_dkb + h * stride_dkh + cols[:, None] * stride_dkn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=in_k[:, None])
    tl.store(DV + b * stride_dvb + h * stride_dvh + cols[:, None] * stride_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=in_k[:, None])


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, q_sid, K, V, K_SID, stride_kn, stride_vn, Lk, window,
              qk_scale, start, stop, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
              MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate dQ [BLOCK_M, D] of one query tile over the key tiles [start, stop).
    # deliberate repeat: of kernels/attention._fwd_tiles' tile loads (see the docstring)
    The K/V tile loads repeat _fwd_tiles' on purpose: the loop bodies differ right after
    them, and a shared helper returning both tiles costs registers in this hot loop."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for n0 in range(start, stop, BLOCK_N):
        n0 = tl.multiple_of(n0, BLOCK_N)
        cols = n0 + offs_n
        k_ptrs = K + cols[:, None] * stride_kn + offs_d[None, :]
        v_ptrs = V + cols[:, None] * stride_vn + offs_d[None, :]
        if MASKED:
            in_k = cols < Lk
            k = tl.load(k_ptrs, mask=in_k[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=in_k[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        p = tl.exp2(s - lse[:, None])
        if MASKED:
            k_sid = tl.load(K_SID + cols, mask=in_k, other=2147483647)
            p = tl.where(_visible(q_sid, k_sid, window), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit(do_not_specialize=["q_bucket", "k_bucket"])
def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, Q_SID, K_SID, K_OFF,
                   stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                   stride_dqb, stride_dqh, stride_dqm,
                   H, Lq, Lk, num_scales, window, qk_scale, softmax_scale, q_bucket, k_bucket,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    tile, bh, b, h = _tile_batch_head(H)
    m0 = (tl.num_programs(1) - 1 - tile) * BLOCK_M
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh

    rows = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    in_q = rows < Lq
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :],
                mask=in_q[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dom + offs_d[None, :],
                 mask=in_q[:, None], other=0.0)
    lse = tl.load(LSE + bh * Lq + rows, mask=in_q, other=0.0)
    delta = tl.load(DELTA + bh * Lq + rows, mask=in_q, other=0.0)
    q_sid = tl.load(Q_SID + rows, mask=in_q, other=-1)

    lo, full_lo, full_hi, hi = _query_tile_runs(Q_SID, K_OFF, m0, Lq, num_scales, window,
                                                BLOCK_M, BLOCK_N)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    dq = _dq_tiles(dq, q, do, lse, delta, q_sid, K, V, K_SID, stride_kn, stride_vn, Lk, window,
                   qk_scale, full_lo, full_hi, BLOCK_N, HEAD_DIM, False, DOT_PRECISION)
    dq = _dq_tiles(dq, q, do, lse, delta, q_sid, K, V, K_SID, stride_kn, stride_vn, Lk, window,
                   qk_scale, lo, full_lo, BLOCK_N, HEAD_DIM, True, DOT_PRECISION)
    dq = _dq_tiles(dq, q, do, lse, delta, q_sid, K, V, K_SID, stride_kn, stride_vn, Lk, window,
                   qk_scale, full_hi, hi, BLOCK_N, HEAD_DIM, True, DOT_PRECISION)
    dq *= softmax_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqm + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=in_q[:, None])


# dK/dV: wide key tiles, short query steps; dQ: the reverse (as in FlashAttention-2).
# dK/dV keeps two [BLOCK_N, D] fp32 accumulators plus k and v in registers: 4 warps only for
# 64-key tiles, 8 warps for 128-key tiles (4-warp 128-key tiles spill kilobytes on sm_80).
# (32, 128, 8 warps) spills 56 B at head dim 128 on sm_80.
DKDV_CONFIGS = {
    80: [(32, 64, 4, 3, 128), (64, 64, 8, 3, 128), (32, 128, 8, 3, 64), (16, 128, 8, 3, 128)],
    90: [(32, 64, 4, 3, 128), (64, 64, 8, 3, 128), (32, 128, 8, 3, 128), (16, 128, 8, 3, 128)],
}
DKDV_CONFIGS[100] = DKDV_CONFIGS[90]
# sm_80: a 128 x 64 tile spills at head dim 128.
DQ_CONFIGS = {
    80: [(128, 32, 8, 3, 128), (64, 64, 4, 3, 128), (64, 32, 4, 3, 128)],
    90: [(128, 32, 8, 3, 128), (128, 64, 8, 3, 128), (64, 64, 4, 3, 128)],
}
DQ_CONFIGS[100] = [(128, 32, 8, 3, 64), (128, 64, 8, 3, 128), (64, 64, 4, 3, 128)]  # 128 x 32: 24 B at 128

# 99 KB parts: 64 x 64 dK/dV tiles take 112 KB at head dim 128 (limited to 64); dQ 64 x 64 /
# 3 stages 107 KB (limited to 64), 128 x 32 98.6 KB (fits); at head dim 128 sm_120 still spills
# 16-40 B in dK/dV (sm_86: 0 B with 16 x 128) -- 2-stage variants spill more.
DKDV_CONFIGS[86] = [(16, 128, 8, 3, 128), (32, 64, 4, 3, 128), (64, 64, 8, 3, 64), (32, 128, 8, 3, 64)]
DKDV_CONFIGS[120] = DKDV_CONFIGS[86]
DQ_CONFIGS[86] = [(128, 32, 8, 3, 128), (64, 32, 4, 3, 128), (64, 64, 4, 3, 64)]
DQ_CONFIGS[120] = DQ_CONFIGS[86]
DKDV_FP32_CONFIGS = {arch: [(16, 64, 8, 2, 64), (32, 32, 8, 2, 64), (16, 32, 8, 2, 128, 128), (32, 16, 8, 2, 128, 128)]
                     for arch in (80, 90, 100)}
DQ_FP32_CONFIGS = {arch: [(16, 64, 8, 2, 128), (64, 32, 8, 2, 64), (32, 16, 8, 2, 128, 128)] for arch in (80, 90)}
DQ_FP32_CONFIGS[100] = [(16, 64, 8, 2, 128), (64, 32, 8, 2, 64)]  # 32 x 16 spills 8 B at head dim 128 on sm_100
_dkdv_tuned = _tuned(_bwd_dkdv_kernel, DKDV_CONFIGS, DKDV_FP32_CONFIGS, (16, 32, 4, 1))
_dq_tuned = _tuned(_bwd_dq_kernel, DQ_CONFIGS, DQ_FP32_CONFIGS, (32, 16, 4, 1))
_DELTA_BLOCK = 16 if interpreter_enabled() else 64


def backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             out: torch.Tensor, lse: torch.Tensor, q_sid: torch.Tensor, k_sid: torch.Tensor,
             q_off: torch.Tensor, k_off: torch.Tensor, softmax_scale: float, window: int,
             blocks: tuple[int, int] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dQ, dK, dV (contiguous, dtype of q) from dO and the forward's O and log-sum-exp."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    num_scales = k_off.numel() - 1
    delta = _new((B, H, Lq), q, torch.float32)
    _bwd_delta_kernel[(B * H, triton.cdiv(Lq, _DELTA_BLOCK))](
        out, do, delta, *_strides(out), *_strides(do), H, Lq, HEAD_DIM=D, BLOCK_M=_DELTA_BLOCK)
    dq, dk, dv = _new(q.shape, q), _new(k.shape, k), _new(v.shape, v)
    common = dict(HEAD_DIM=D, DOT_PRECISION=_dot_precision(q.dtype))
    scales = (softmax_scale * LOG2E, softmax_scale, *_buckets(Lq, Lk))

    kernel = _dkdv_tuned if blocks is None else _bwd_dkdv_kernel
    kernel[lambda meta: (B * H, triton.cdiv(Lk, meta["BLOCK_N"]))](
        q, k, v, do, dk, dv, lse, delta, q_sid, k_sid, q_off,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv),
        H, Lq, Lk, num_scales, window, *scales, **common, **_launch_args(blocks, dk, dv))
    kernel = _dq_tuned if blocks is None else _bwd_dq_kernel
    kernel[lambda meta: (B * H, triton.cdiv(Lq, meta["BLOCK_M"]))](
        q, k, v, do, dq, lse, delta, q_sid, k_sid, k_off,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
        H, Lq, Lk, num_scales, window, *scales, **common, **_launch_args(blocks, dq))
    return dq, dk, dv
