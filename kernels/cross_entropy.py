"""Fused head + cross-entropy / KL (CSFL) in Triton, never materialising the [N, V] logits.

Forward: one program per (token block, vocabulary split) walks its vocabulary range tile by
tile; each tile of logits is an on-chip GEMM (hidden tile @ weight tile.T + bias), folded
into an online log-sum-exp, a running argmax, the target logit and the sum of logits (label
smoothing), or into the teacher's log-sum-exp and the cross term of the KL. Only [splits, N]
partials leave the chip; a few [N]-sized torch ops combine them.

Backward (only when autograd asks): for a bounded chunk of tokens at a time, a Triton GEMM
recomputes the logit tiles and writes grad_logits into a workspace of WORKSPACE_BYTES; two
cuBLAS GEMMs then take dHidden = G @ W and dW += G.T @ H (accumulated in fp32), and dBias
comes from per-block column sums written by the same kernel. Chosen over fp32 atomics into
dHidden/dW, where every (token tile, vocab tile) program would add two full [tile, C] blocks
(about 2*N*V*C/tile atomics): the two GEMMs are dense, run at cuBLAS speed and give
deterministic results, and the workspace keeps memory bounded whatever N is.

Launch helpers here take validated, contiguous tensors of one compute dtype; autograd,
validation and dispatch live in sar_fast.ops.cross_entropy.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sar_fast.ops.gpu import is_deterministic

from ._tuning import ArchConfigs, TunedKernel, length_bucket, poison_
from .support import interpreter_enabled

# Bytes of grad-logits workspace per backward chunk (rows = WORKSPACE_BYTES // (V * itemsize)).
WORKSPACE_BYTES = 256 * 2**20
# Tests set this to allocate every output with NaN, so an element the kernels skip shows up.
POISON_OUTPUTS = False

MODE_TARGET, MODE_TEACHER_LOGITS, MODE_TEACHER_HIDDEN = 0, 1, 2


# (BLOCK_N tokens, BLOCK_V vocabulary, BLOCK_K reduction, warps, stages) per architecture
# family (the largest listed arch <= the GPU's); bench/compile_report.py checks that every
# entry compiles for sm_80/90/100, fits shared memory and spills nothing on sm_80/90.
# With label smoothing or a teacher mode the epilogue adds live [BLOCK_N, BLOCK_V] values: a
# 128 x 256 tile spills on sm_80 and sm_90, 128 x 128 needs 8 warps (and spills 8 B on sm_80
# in the CE forward).
CE_FORWARD_CONFIGS = {
    80: [(64, 128, 64, 8, 3), (64, 64, 64, 4, 4), (128, 64, 64, 8, 3)],
    90: [(128, 128, 64, 8, 3), (64, 128, 64, 8, 3), (128, 64, 64, 8, 3)],
}
CE_FORWARD_CONFIGS[100] = [(64, 128, 64, 8, 3), (128, 64, 64, 8, 3)]  # sm_100: 128 x 128 spills 80 B
_GRAD = [(128, 128, 64, 8, 3), (64, 128, 64, 8, 3), (64, 64, 64, 4, 4)]
GRAD_LOGITS_CONFIGS = {80: _GRAD, 90: _GRAD, 100: _GRAD}
# KL keeps a student and a teacher logit tile (fp32) live at once, next to the GEMM
# accumulator: at most 64 x 128 per 8 warps (128 x 128 / 8 warps spills ~0.6 KB per thread).
_KL = [(64, 64, 64, 4, 4), (64, 128, 64, 8, 3), (128, 64, 64, 8, 3)]
KL_FORWARD_CONFIGS = {80: _KL, 90: _KL, 100: [(64, 128, 64, 8, 3)]}  # sm_100: the other two spill 16 B
# fp32 inputs, exact (IEEE, FMA units) or TF32: operand tiles twice as wide, so BLOCK_K <= 32
# and 2 stages (BLOCK_K 64 spills 0.3-1.6 KB on sm_80). Every tile, flag and precision
# compiled: 64 x 64 x 32 / 4 warps spills 16-80 B in the CE and KL forwards on sm_80, 32-row
# KL tiles 8-24 B; so each kernel keeps the three clean ones below.
CE_FORWARD_FP32_CONFIGS = {arch: [(64, 128, 32, 8, 2), (128, 64, 32, 8, 2), (64, 64, 16, 4, 2)]
                           for arch in (80, 90, 100)}
GRAD_LOGITS_FP32_CONFIGS = {arch: [(128, 64, 32, 8, 2), (64, 128, 16, 8, 2), (64, 64, 32, 4, 2)]
                            for arch in (80, 90, 100)}
KL_FORWARD_FP32_CONFIGS = {arch: [(64, 128, 32, 8, 2), (128, 64, 16, 8, 2), (64, 32, 32, 4, 2)]
                           for arch in (80, 90, 100)}
_INTERPRETED_SHAPE = (16, 32, 16, 4, 1)  # tiny tiles: small test shapes span several tiles of every kind


def _tuned(table: dict[int, list[tuple]], fp32_table: dict[int, list[tuple]], key: list[str], group: bool,
           **autotune_kwargs):
    """triton.autotune over the entries `table` lists for the target's architecture, keyed on
    `key`, the dtypes and the row-count bucket `n_bucket` (an argument of every kernel here)."""
    interpreted = interpreter_enabled()  # at import, as triton.jit decides whether it interprets

    def make(entry):
        n, v, k, w, s = entry
        extra = {"GROUP_N": 2 if interpreted else 8} if group else {}
        return triton.Config({"BLOCK_N": n, "BLOCK_V": v, "BLOCK_K": k, **extra}, num_warps=w, num_stages=s)

    def wrap(kernel):
        if interpreted:
            return TunedKernel(triton.autotune([make(_INTERPRETED_SHAPE)], key=key, **autotune_kwargs)(kernel), None)
        configs = ArchConfigs(table, make, fp32_table=fp32_table, dtype_arg="h_ptr")
        return TunedKernel(triton.autotune(configs.configs, key=key,
                                           prune_configs_by={"early_config_prune": configs.prune},
                                           **autotune_kwargs)(kernel), configs, make)
    return wrap


_EVEN_K = {"EVEN_K": lambda args: args["C"] % args["BLOCK_K"] == 0}
# the smallest BLOCK_N the backward may pick: sizes its buffer of per-block dBias partials
_MIN_BLOCK_N = (_INTERPRETED_SHAPE[0] if interpreter_enabled() else
                min(entry[0] for table in (GRAD_LOGITS_CONFIGS, GRAD_LOGITS_FP32_CONFIGS)
                    for entries in table.values() for entry in entries))


@triton.jit
def _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, C, stride_h, stride_w, scale,
                HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 tile (h[rows] @ w[cols].T + b[cols]) * scale; rows and cols must be in range."""
    ks = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_h + ks[None, :]
    w_ptrs = w_ptr + cols.to(tl.int64)[:, None] * stride_w + ks[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k in range(0, C, BLOCK_K):
        if EVEN_K:
            h = tl.load(h_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_ok = (k + ks) < C
            h = tl.load(h_ptrs, mask=k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols).to(tl.float32)[None, :]
    return acc * scale


@_tuned(CE_FORWARD_CONFIGS, CE_FORWARD_FP32_CONFIGS, key=["C", "V", "n_bucket"], group=False)
@triton.heuristics(_EVEN_K)
@triton.jit(do_not_specialize=["n_bucket"])
def _ce_forward_kernel(h_ptr, w_ptr, b_ptr, target_ptr,
                       max_ptr, sumexp_ptr, argmax_ptr, target_logit_ptr, logit_sum_ptr,
                       N, V, C, stride_h, stride_w, v_per_split, n_bucket,
                       HAS_BIAS: tl.constexpr, SMOOTH: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < N
    rows = offs_n % N  # out-of-range rows recompute a valid row; their results are not stored
    target = tl.load(target_ptr + rows).to(tl.int32)
    v_lo = split * v_per_split
    v_hi = tl.minimum(V, v_lo + v_per_split)

    run_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    sumexp = tl.zeros((BLOCK_N,), tl.float32)
    best = tl.zeros((BLOCK_N,), tl.int32)
    target_logit = tl.zeros((BLOCK_N,), tl.float32)
    logit_sum = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        col_ok = offs_v < v_hi
        z = _logit_tile(h_ptr, w_ptr, b_ptr, rows, offs_v % V, C, stride_h, stride_w, 1.0,
                        HAS_BIAS, EVEN_K, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        tile_max, tile_arg = tl.max(z, axis=1, return_indices=True, return_indices_tie_break_left=True)
        new_max = tl.maximum(run_max, tile_max)
        # shift by 0 while every logit so far is -inf (a filtered vocabulary): -inf - -inf is NaN
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        sumexp = sumexp * tl.exp(run_max - shift) + tl.sum(tl.exp(z - shift[:, None]), axis=1)
        best = tl.where(tile_max > run_max, v0 + tile_arg, best)  # strict: ties keep the lower index
        run_max = new_max
        hit = (offs_v[None, :] == target[:, None]) & col_ok[None, :]
        target_logit += tl.sum(tl.where(hit, z, 0.0), axis=1)
        if SMOOTH:
            logit_sum += tl.sum(tl.where(col_ok[None, :], z, 0.0), axis=1)

    out = split * N + offs_n
    tl.store(max_ptr + out, run_max, mask=row_ok)
    tl.store(sumexp_ptr + out, sumexp, mask=row_ok)
    tl.store(argmax_ptr + out, best, mask=row_ok)
    tl.store(target_logit_ptr + out, target_logit, mask=row_ok)
    if SMOOTH:
        tl.store(logit_sum_ptr + out, logit_sum, mask=row_ok)


@_tuned(KL_FORWARD_CONFIGS, KL_FORWARD_FP32_CONFIGS, key=["C", "V", "TEACHER", "n_bucket"], group=False)
@triton.heuristics(_EVEN_K)
@triton.jit(do_not_specialize=["n_bucket"])
def _kl_forward_kernel(h_ptr, w_ptr, b_ptr, teacher_ptr,
                       s_max_ptr, s_sumexp_ptr, t_max_ptr, t_sumexp_ptr, cross_ptr,
                       N, V, C, stride_h, stride_w, stride_t, v_per_split, inv_temp, n_bucket,
                       TEACHER: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per row: student and teacher online log-sum-exp and cross = sum_j e^(t_j - m_t) (t_j - s_j).
    Its signature and tiling mirror _ce_forward_kernel's (same GEMM tiles, other reductions)."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < N
    rows = offs_n % N
    v_lo = split * v_per_split
    v_hi = tl.minimum(V, v_lo + v_per_split)

    s_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s_sumexp = tl.zeros((BLOCK_N,), tl.float32)
    t_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    t_sumexp = tl.zeros((BLOCK_N,), tl.float32)
    cross = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        col_ok = offs_v < v_hi
        cols = offs_v % V
        zs = _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, C, stride_h, stride_w, inv_temp,
                         HAS_BIAS, EVEN_K, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
        if TEACHER == 1:  # teacher logits [N, V]
            zt = tl.load(teacher_ptr + rows.to(tl.int64)[:, None] * stride_t + cols[None, :]).to(tl.float32)
            zt = zt * inv_temp
        else:  # teacher hidden [N, C] through the same head
            zt = _logit_tile(teacher_ptr, w_ptr, b_ptr, rows, cols, C, stride_t, stride_w, inv_temp,
                             HAS_BIAS, EVEN_K, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
        # before masking (masked columns would give -inf - -inf); 0 where the teacher is -inf
        diff = tl.where(zt > float("-inf"), zt - zs, 0.0)
        zs = tl.where(col_ok[None, :], zs, float("-inf"))
        zt = tl.where(col_ok[None, :], zt, float("-inf"))

        # either side may hold -inf logits (filtered vocabularies): shift by 0 while its max is -inf
        new_s = tl.maximum(s_max, tl.max(zs, axis=1))
        s_shift = tl.where(new_s == float("-inf"), 0.0, new_s)
        s_sumexp = s_sumexp * tl.exp(s_max - s_shift) + tl.sum(tl.exp(zs - s_shift[:, None]), axis=1)
        s_max = new_s
        new_t = tl.maximum(t_max, tl.max(zt, axis=1))
        shift = tl.where(new_t == float("-inf"), 0.0, new_t)
        rescale = tl.exp(t_max - shift)
        e = tl.exp(zt - shift[:, None])
        t_sumexp = t_sumexp * rescale + tl.sum(e, axis=1)
        cross = cross * rescale + tl.sum(e * diff, axis=1)
        t_max = new_t

    out = split * N + offs_n
    tl.store(s_max_ptr + out, s_max, mask=row_ok)
    tl.store(s_sumexp_ptr + out, s_sumexp, mask=row_ok)
    tl.store(t_max_ptr + out, t_max, mask=row_ok)
    tl.store(t_sumexp_ptr + out, t_sumexp, mask=row_ok)
    tl.store(cross_ptr + out, cross, mask=row_ok)


@_tuned(GRAD_LOGITS_CONFIGS, GRAD_LOGITS_FP32_CONFIGS, key=["C", "V", "MODE", "n_bucket"], group=True,
        reset_to_zero=["dbias_ptr"])
@triton.heuristics(_EVEN_K)
@triton.jit(do_not_specialize=["n_bucket"])
def _grad_logits_kernel(h_ptr, w_ptr, b_ptr, target_ptr, teacher_ptr, lse_ptr, teacher_lse_ptr, coef_ptr,
                        g_ptr, dbias_ptr,
                        N, V, C, stride_h, stride_w, stride_t, stride_g, smooth, smooth_over_v, inv_temp, n_bucket,
                        MODE: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr):
    """G[i, j] = coef_i * d loss_i / d logit_ij for one tile, recomputing the logits.

    MODE 0 (hard target, label smoothing): softmax - (1 - smooth) * onehot - smooth / V.
    MODE 1/2 (teacher logits / teacher hidden): (softmax(s / T) - softmax(t / T)) / T.
    """
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(N, BLOCK_N)
    v_blocks = tl.cdiv(V, BLOCK_V)
    # GROUP_N token blocks sweep the vocabulary together so their weight tiles stay in L2
    per_group = GROUP_N * v_blocks
    first = (pid // per_group) * GROUP_N
    group_size = tl.minimum(n_blocks - first, GROUP_N)
    pid_n = first + (pid % per_group) % group_size
    pid_v = (pid % per_group) // group_size

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = offs_n < N
    col_ok = offs_v < V
    rows = offs_n % N
    cols = offs_v % V
    z = _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, C, stride_h, stride_w, inv_temp,
                    HAS_BIAS, EVEN_K, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
    p = tl.exp(z - tl.load(lse_ptr + rows)[:, None])
    if MODE == 0:
        target = tl.load(target_ptr + rows).to(tl.int32)
        g = p - smooth_over_v - tl.where(offs_v[None, :] == target[:, None], 1.0 - smooth, 0.0)
    else:
        if MODE == 1:
            zt = tl.load(teacher_ptr + rows.to(tl.int64)[:, None] * stride_t + cols[None, :]).to(tl.float32)
            zt = zt * inv_temp
        else:
            zt = _logit_tile(teacher_ptr, w_ptr, b_ptr, rows, cols, C, stride_t, stride_w, inv_temp,
                             HAS_BIAS, EVEN_K, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
        g = (p - tl.exp(zt - tl.load(teacher_lse_ptr + rows)[:, None])) * inv_temp
    g = g * tl.load(coef_ptr + rows)[:, None]
    keep = row_ok[:, None] & col_ok[None, :]
    g = tl.where(keep, g, 0.0)
    tl.store(g_ptr + offs_n.to(tl.int64)[:, None] * stride_g + offs_v[None, :],
             g.to(g_ptr.dtype.element_ty), mask=keep)
    if BIAS_GRAD:
        tl.store(dbias_ptr + pid_n * V + offs_v, tl.sum(g, axis=0), mask=col_ok)


# ------------------------------------------------------------------------------------------
# launch helpers
# ------------------------------------------------------------------------------------------
def _new(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON_OUTPUTS:
        poison_(out)
    return out


def _poisoned(*outputs: torch.Tensor) -> dict:
    """Launch option: the outputs a test poisoned, re-poisoned after autotuning."""
    return {"poisoned": outputs} if POISON_OUTPUTS else {}


# row-count buckets of the autotune keys: 1, 2, 4, ..., 65,536 rows
ROWS_BUCKET_CAP = 2**16


def _rows_bucket(N: int) -> int:
    return length_bucket(N, ROWS_BUCKET_CAP)


def _dot_precision(t: torch.Tensor) -> str:
    """bf16/fp16 operands: tensor cores (fp32 accumulation); the mode is ignored for them.
    fp32 operands: TF32 tensor cores only where torch allows them for fp32 GEMMs
    (torch.set_float32_matmul_precision("high"), as the trainer sets), else exact fp32."""
    if t.dtype != torch.float32:
        return "tf32"
    return "tf32" if torch.backends.cuda.matmul.fp32_precision == "tf32" else "ieee"


_SM_COUNT: dict[int, int] = {}


def _num_splits(N: int, V: int, device: torch.device) -> int:
    """Vocabulary splits so that a small N still fills the GPU (~2 programs per SM); in
    deterministic mode from V alone (the splits' merge order then depends on nothing else:
    same bits on every rank, batch size and GPU; at most one 512-column split per program,
    so a large N pays a few extra [splits, N] partials)."""
    if is_deterministic():
        return triton.cdiv(V, 512)
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    token_blocks = triton.cdiv(N, 128)
    return max(1, min(triton.cdiv(V, 512), triton.cdiv(2 * _SM_COUNT[index], token_blocks)))


def _split_range(V: int, splits: int | None, device: torch.device, N: int) -> tuple[int, int]:
    splits = _num_splits(N, V, device) if splits is None else max(1, min(int(splits), V))
    per_split = triton.cdiv(V, splits)
    return triton.cdiv(V, per_split), per_split


def _merge_lse(m: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Combine per-split (max, sum exp(z - max)) [S, N] -> (lse, row max, rescale [S, N])."""
    top = m.max(dim=0).values
    shift = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    rescale = torch.exp(m - shift)
    return shift + torch.log((s * rescale).sum(dim=0)), top, rescale


def ce_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
               label_smoothing: float, ignore_index: int, splits: int | None = None):
    """(per-token unweighted CE [N] fp32 (0 where ignored), log-sum-exp [N] fp32, argmax [N] int64)."""
    N, C = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    if N == 0:
        return (torch.zeros(0, device=dev), torch.zeros(0, device=dev), torch.zeros(0, dtype=torch.long, device=dev))
    S, per_split = _split_range(V, splits, dev, N)
    smooth = label_smoothing > 0.0
    m, s, tlogit = (_new((S, N), torch.float32, dev) for _ in range(3))
    best = _new((S, N), torch.int32, dev)
    lsum = _new((S, N), torch.float32, dev) if smooth else m
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), S)  # noqa: E731
    _ce_forward_kernel[grid](hidden, weight, bias if bias is not None else hidden, target,
                             m, s, best, tlogit, lsum, N, V, C, hidden.stride(0), weight.stride(0), per_split,
                             _rows_bucket(N), HAS_BIAS=bias is not None, SMOOTH=smooth,
                             DOT_PRECISION=_dot_precision(hidden), **_poisoned(m, s, best, tlogit, lsum))
    lse, top, _ = _merge_lse(m, s)
    # argmax: the first split (lowest vocabulary range) that reaches the row max
    argmax = best.gather(0, (m == top).to(torch.int8).argmax(dim=0, keepdim=True)).squeeze(0).long()
    ce = lse - (1.0 - label_smoothing) * tlogit.sum(dim=0)
    if smooth:
        ce = ce - (label_smoothing / V) * lsum.sum(dim=0)
    ce = torch.where(target != ignore_index, ce, torch.zeros_like(ce))
    return ce, lse, argmax


def kl_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               teacher_logits: torch.Tensor | None, teacher_hidden: torch.Tensor | None, temperature: float,
               splits: int | None = None):
    """(KL(p_teacher || p_student) [N], student lse [N], teacher lse [N]), all fp32, of logits / T."""
    N, C = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    if N == 0:
        return tuple(torch.zeros(0, device=dev) for _ in range(3))
    S, per_split = _split_range(V, splits, dev, N)
    teacher = teacher_logits if teacher_logits is not None else teacher_hidden
    mode = MODE_TEACHER_LOGITS if teacher_logits is not None else MODE_TEACHER_HIDDEN
    sm, ss, tm, ts, cross = (_new((S, N), torch.float32, dev) for _ in range(5))
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), S)  # noqa: E731
    _kl_forward_kernel[grid](hidden, weight, bias if bias is not None else hidden, teacher,
                             sm, ss, tm, ts, cross, N, V, C, hidden.stride(0), weight.stride(0), teacher.stride(0),
                             per_split, 1.0 / temperature, _rows_bucket(N), TEACHER=mode, HAS_BIAS=bias is not None,
                             DOT_PRECISION=_dot_precision(hidden), **_poisoned(sm, ss, tm, ts, cross))
    lse, _, _ = _merge_lse(sm, ss)
    teacher_lse, _, rescale = _merge_lse(tm, ts)
    t_sumexp = (ts * rescale).sum(dim=0)
    kl = (cross * rescale).sum(dim=0) / t_sumexp - teacher_lse + lse
    return kl, lse, teacher_lse


def _chunk_rows(N: int, V: int, itemsize: int) -> int:
    rows = max(1, WORKSPACE_BYTES // (V * itemsize))
    if rows >= 128:
        rows -= rows % 128  # whole tiles per chunk
    return max(1, min(N, rows))


_MM_OUT_DTYPE = True  # whether torch.addmm(..., out_dtype=float32) works here (CUDA, torch >= 2.8)


def _add_matmul(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b with fp32 accumulation across calls, for fp32 or half inputs."""
    global _MM_OUT_DTYPE
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if _MM_OUT_DTYPE:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (RuntimeError, TypeError, NotImplementedError):
            _MM_OUT_DTYPE = False
    acc += torch.mm(a, b).float()  # fp32 inside the GEMM; one rounding per chunk


def head_backward(coef: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  lse: torch.Tensor, mode: int, target: torch.Tensor | None = None, label_smoothing: float = 0.0,
                  teacher: torch.Tensor | None = None, teacher_lse: torch.Tensor | None = None,
                  temperature: float = 1.0, need_hidden: bool = True, need_weight: bool = True,
                  need_bias: bool = True):
    """Gradients of sum_i coef_i * loss_i w.r.t. hidden, weight, bias (None where not needed).

    coef [N] fp32 = d total / d loss_i (0 for ignored tokens); lse [N] from the forward;
    mode MODE_TARGET needs target/label_smoothing, the teacher modes teacher/teacher_lse.
    """
    N, C = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    need_bias = need_bias and bias is not None
    dh = _new((N, C), hidden.dtype, dev) if need_hidden else None
    dw = torch.zeros((V, C), dtype=torch.float32, device=dev) if need_weight else None
    db = torch.zeros((V,), dtype=torch.float32, device=dev) if need_bias else None
    dummy = coef
    inv_temp = 1.0 / temperature if mode != MODE_TARGET else 1.0
    rows_per_chunk = _chunk_rows(N, V, hidden.element_size())
    for start in range(0, N if (need_hidden or need_weight or need_bias) else 0, rows_per_chunk):
        stop = min(N, start + rows_per_chunk)
        n = stop - start
        h = hidden[start:stop]
        g = _new((n, V), hidden.dtype, dev)
        partial = (torch.zeros((triton.cdiv(n, _MIN_BLOCK_N), V), dtype=torch.float32, device=dev) if need_bias
                   else torch.zeros(1, dtype=torch.float32, device=dev))
        t = teacher[start:stop] if teacher is not None else dummy
        grid = lambda meta, n=n: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(V, meta["BLOCK_V"]),)  # noqa: E731
        _grad_logits_kernel[grid](
            h, weight, bias if bias is not None else h,
            target[start:stop] if target is not None else dummy, t, lse[start:stop],
            teacher_lse[start:stop] if teacher_lse is not None else dummy, coef[start:stop], g, partial,
            n, V, C, h.stride(0), weight.stride(0), t.stride(0) if teacher is not None else 0, g.stride(0),
            float(label_smoothing), float(label_smoothing) / V, inv_temp, _rows_bucket(n),
            MODE=mode, HAS_BIAS=bias is not None, BIAS_GRAD=need_bias, DOT_PRECISION=_dot_precision(hidden),
            **_poisoned(g))
        if need_hidden:
            torch.mm(g, weight, out=dh[start:stop])
        if need_weight:
            _add_matmul(dw, g.t(), h)
        if need_bias:
            db += partial.sum(dim=0)
    return (dh,
            dw.to(weight.dtype) if dw is not None else None,
            db.to(bias.dtype) if db is not None else None)
