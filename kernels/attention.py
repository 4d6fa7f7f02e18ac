"""Block-causal scale attention (FlashAttention-2 style) for scale-wise AR models.

Tokens carry a scale id (non-decreasing along the sequence). Query i sees key j iff
    k_sid[j] <= q_sid[i]  and  k_sid[j] >= q_sid[i] - window.
The scale layout reaches the kernels as small int32 tensors, never as constexprs, so a new
schedule (FlexVAR draws one per step) does not recompile anything:
    q_sid [Lq], k_sid [Lk]   scale id per token;
    q_off, k_off [S + 1]     q_off[s] = first query with scale id >= s (same for keys).
Self-attention passes the same pair for queries and keys; the KV-cache path gives every
query and key scale id 0, i.e. no mask.

Each program looks up, from the scale ids of its tile's first and last token, the range
of the other side it can see, and splits it into at most three runs of tiles: a masked
run, a run that is fully visible (no mask evaluated, no bounds checks), and a masked run.
Tiles outside the range are never visited. Nothing L x L is ever built.

Softmax runs in base 2: scores are multiplied by softmax_scale * log2(e) and the saved
log-sum-exp (fp32, [B*H, Lq]) is in the same units.

This module holds the range arithmetic every kernel shares, the forward (training and KV
cache) and its launcher; kernels/attention_backward.py the backward (dQ, dK, dV).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tuning import ArchConfigs, TunedKernel, length_bucket
from .support import interpreter_enabled

LOG2E = 1.4426950408889634
FP32_LOWEST = tl.constexpr(-3.4028234663852886e38)

# Test hook: allocate every output filled with NaN so that an element a kernel fails to
# write shows up in the comparison.
POISON_OUTPUTS = False


def _new(shape, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    dtype = like.dtype if dtype is None else dtype
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


def _admits_head_dim(entry: tuple, args: dict) -> bool:
    """Entries end with the largest head dim they take, optionally followed by the smallest."""
    smallest = entry[5] if len(entry) > 5 else 0
    return smallest <= args["HEAD_DIM"] <= entry[4]


def _tuned(kernel, table: dict[int, list[tuple]], fp32_table: dict[int, list[tuple]], interpreted_choice: tuple):
    """`kernel` autotuned over the entries (BLOCK_M = query tile, BLOCK_N = key tile, warps,
    stages, largest head dim[, smallest head dim]) that `table` (`fp32_table` for fp32
    inputs) lists for the target's architecture; one small
    config under the interpreter so tiny test inputs still span many tiles. Keyed on the head
    dim and the query / key length buckets (and the dtypes)."""
    def make(entry):
        m, n, w, s = entry[:4]
        return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)

    key = ["HEAD_DIM", "q_bucket", "k_bucket"]
    if interpreter_enabled():  # at import, as triton.jit decides whether it interprets
        return TunedKernel(triton.autotune([make(interpreted_choice)], key=key)(kernel), None)
    configs = ArchConfigs(table, make, admits=_admits_head_dim, fp32_table=fp32_table, dtype_arg="Q")
    return TunedKernel(triton.autotune(configs.configs, key=key,
                                       prune_configs_by={"early_config_prune": configs.prune})(kernel),
                       configs, make)


# --------------------------------------------------------------------------------------
# range arithmetic shared by all kernels
# --------------------------------------------------------------------------------------
@triton.jit
def _tile_batch_head(H):
    """(tile, bh, b, h) of this program. Grid axis 0 carries B*H, axis 1 the tiles: axes 1 and 2
    stop at 65,535, which a CFG-doubled batch of heads passes (2 x 1,100 x 30), axis 0 at 2**31
    (folding both into axis 0 needs a division whose registers made tight tiles spill). bh, b,
    h are int64: b * stride_b passes 2**31 once a tensor holds more than 2**31 elements
    (B*H*L*D at d30 sizes), and an int32 product would wrap into another sample's memory."""
    bh = tl.program_id(0).to(tl.int64)
    return tl.program_id(1), bh, bh // H, bh % H


@triton.jit
def _tile_runs(SID, OTHER_OFF, first, last, num_scales, window, BLOCK: tl.constexpr,
               QUERY_SIDE: tl.constexpr):
    """For a tile whose tokens run from index `first` to `last` (inclusive), the three runs
    [lo, full_lo), [full_lo, full_hi), [full_hi, hi) of tile starts (multiples of BLOCK) of
    the other side: the outer two need the mask, the middle one does not.

    QUERY_SIDE: the tile holds queries and the other side keys (forward, dQ); otherwise the
    tile holds keys and the other side queries (dK/dV)."""
    s_first = tl.load(SID + first)
    s_last = tl.load(SID + last)
    if QUERY_SIDE:  # keys of scales [s_first - w, s_last] touch the tile; [s_last - w, s_first] all of it
        lo = tl.load(OTHER_OFF + tl.maximum(s_first - window, 0))
        hi = tl.load(OTHER_OFF + s_last + 1)
        vis_lo = tl.load(OTHER_OFF + tl.maximum(s_last - window, 0))
        vis_hi = tl.load(OTHER_OFF + s_first + 1)
    else:  # queries of scales [s_first, s_last + w] touch the tile; [s_last, s_first + w] all of it
        lo = tl.load(OTHER_OFF + s_first)
        hi = tl.load(OTHER_OFF + tl.minimum(s_last + window + 1, num_scales))
        vis_lo = tl.load(OTHER_OFF + s_last)
        vis_hi = tl.load(OTHER_OFF + tl.minimum(s_first + window + 1, num_scales))
    lo = (lo // BLOCK) * BLOCK
    full_lo = tl.cdiv(vis_lo, BLOCK) * BLOCK
    full_hi = tl.maximum((vis_hi // BLOCK) * BLOCK, full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _query_tile_runs(Q_SID, K_OFF, m0, Lq, num_scales, window, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    """Key-tile runs of the query tile starting at m0 (forward, dQ)."""
    return _tile_runs(Q_SID, K_OFF, m0, tl.minimum(m0 + BLOCK_M, Lq) - 1, num_scales, window,
                      BLOCK_N, True)


@triton.jit
def _key_tile_runs(K_SID, Q_OFF, n0, Lk, num_scales, window, BLOCK_N: tl.constexpr,
                   BLOCK_M: tl.constexpr):
    """Query-tile runs of the key tile starting at n0 (dK/dV)."""
    return _tile_runs(K_SID, Q_OFF, n0, tl.minimum(n0 + BLOCK_N, Lk) - 1, num_scales, window,
                      BLOCK_M, False)


@triton.jit
def _tile_runs_kernel(SID, OFF, RUNS, L, num_scales, window, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, QUERY_SIDE: tl.constexpr):
    """RUNS[t] = (lo, full_lo, full_hi, hi) of tile t, as the attention kernels compute them."""
    t = tl.program_id(0)
    if QUERY_SIDE:
        lo, full_lo, full_hi, hi = _query_tile_runs(SID, OFF, t * BLOCK_M, L, num_scales, window,
                                                    BLOCK_M, BLOCK_N)
    else:
        lo, full_lo, full_hi, hi = _key_tile_runs(SID, OFF, t * BLOCK_N, L, num_scales, window,
                                                  BLOCK_N, BLOCK_M)
    tl.store(RUNS + t * 4 + 0, lo)
    tl.store(RUNS + t * 4 + 1, full_lo)
    tl.store(RUNS + t * 4 + 2, full_hi)
    tl.store(RUNS + t * 4 + 3, hi)


@triton.jit
def _visible(q_sid, k_sid, window):
    """[M, N] mask from query scale ids [M] and key scale ids [N]."""
    return (k_sid[None, :] <= q_sid[:, None]) & (k_sid[None, :] >= q_sid[:, None] - window)


# --------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------
@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, q_sid, K, V, K_SID, stride_kn, stride_vn, Lk, window, qk_scale,
               start, stop, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
               DOT_PRECISION: tl.constexpr):
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
        if MASKED:
            k_sid = tl.load(K_SID + cols, mask=in_k, other=2147483647)
            s = tl.where(_visible(q_sid, k_sid, window), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # a row with nothing visible yet (max -inf) takes the lowest finite float instead, so
            # -inf - max is -inf, not NaN; any score it later sees is above it (a floor at 0 made
            # scores far below 0 all underflow)
            m_new = tl.where(m_new == float("-inf"), FP32_LOWEST, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["q_bucket", "k_bucket"])
def _fwd_kernel(Q, K, V, O, LSE, Q_SID, K_SID, K_OFF,
                stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                H, Lq, Lk, num_scales, window, qk_scale, q_bucket, k_bucket,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    # Late query tiles see the most keys: launch them first for a better tail.
    tile, bh, b, h = _tile_batch_head(H)
    m0 = (tl.num_programs(1) - 1 - tile) * BLOCK_M
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    O += b * stride_ob + h * stride_oh

    rows = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    in_q = rows < Lq
    q = tl.load(Q + rows[:, None] * stride_qm + offs_d[None, :], mask=in_q[:, None], other=0.0)
    q_sid = tl.load(Q_SID + rows, mask=in_q, other=-1)  # padding rows see nothing

    lo, full_lo, full_hi, hi = _query_tile_runs(Q_SID, K_OFF, m0, Lq, num_scales, window,
                                                BLOCK_M, BLOCK_N)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, q_sid, K, V, K_SID, stride_kn, stride_vn, Lk,
                               window, qk_scale, full_lo, full_hi, BLOCK_N, HEAD_DIM, False,
                               DOT_PRECISION)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, q_sid, K, V, K_SID, stride_kn, stride_vn, Lk,
                               window, qk_scale, lo, full_lo, BLOCK_N, HEAD_DIM, True,
                               DOT_PRECISION)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, q_sid, K, V, K_SID, stride_kn, stride_vn, Lk,
                               window, qk_scale, full_hi, hi, BLOCK_N, HEAD_DIM, True,
                               DOT_PRECISION)
    # Every real row sees its own scale, so l == 0 means every visible score was -inf (an
    # infinite input): softmax has no value there, NaN as torch gives. Padding rows are not stored.
    l_i = tl.where(l_i == 0.0, float("nan"), l_i)
    out = acc / l_i[:, None]
    tl.store(O + rows[:, None] * stride_om + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=in_q[:, None])
    tl.store(LSE + bh * Lq + rows, m_i + tl.log2(l_i), mask=in_q)


# (BLOCK_M, BLOCK_N, num_warps, num_stages, largest head dim) per architecture family (the
# largest listed arch <= the GPU's); autotuned once per head dim, dtype and power-of-two
# length bucket (not per L: FlexVAR's varying lengths retune at most once per bucket).
# bench/compile_report.py checks every entry compiles for sm_80/90/100, fits shared memory
# and spills nothing on sm_80/90.
# sm_80 (mma.sync keeps the [BLOCK_M, D] accumulator, the q fragments and the score tile in
# registers): 4-warp 128-row tiles and 128 x 128 tiles spill at head dim 128.
FWD_CONFIGS = {
    80: [(128, 32, 8, 3, 128), (64, 128, 8, 3, 128), (64, 64, 4, 3, 128), (64, 64, 4, 4, 128)],
    # sm_90: 4-warp tiles with 128 rows or 128 keys spill at head dim 128 (wgmma accumulators)
    90: [(128, 64, 4, 3, 64), (128, 64, 8, 3, 128), (128, 128, 8, 3, 128), (64, 64, 4, 3, 128),
         (64, 128, 4, 3, 64)],
}
# sm_100 (tcgen05): the sm_90 list less the 4-warp 128 x 64 tile (spills 128-304 B at head
# dims 16-64) and 128 x 128 (128 B at head dim 128)
FWD_CONFIGS[100] = [(128, 64, 8, 3, 128), (64, 64, 4, 3, 128), (64, 128, 4, 3, 64)]
# sm_86/89/120 (99 KB of shared memory, mma.sync like sm_80; sm_120 has neither wgmma nor
# tcgen05): the sm_80 list with the head-dim-128 tiles over 99 KB (64 x 128, 64 x 64 / 4 stages:
# up to 144 KB) or spilling (64 x 64 / 3 stages: 8-24 B) limited to head dim 64, plus 64 x 32.
# Shared memory as compiled (bench/compile_report.py --arch 86,120): <= 77 KB at head dim 128.
FWD_CONFIGS[86] = [(128, 32, 8, 3, 128), (64, 128, 8, 3, 64), (64, 64, 4, 3, 64), (64, 64, 4, 4, 64),
                   (64, 32, 4, 3, 128), (128, 64, 8, 2, 64)]
FWD_CONFIGS[120] = FWD_CONFIGS[86]
# The KV-cache path has few queries per call (one scale): smaller query tiles.
CACHED_CONFIGS = {
    80: [(16, 64, 4, 3, 128), (32, 64, 4, 3, 128), (64, 64, 4, 3, 128)],
    # sm_90: 16/32-query tiles run mma.sync; with 4 warps and 64 keys they spill 8 B at head
    # dims 64/128, so those take 8 warps
    90: [(16, 64, 8, 3, 128), (32, 64, 8, 3, 128), (16, 32, 4, 3, 128), (64, 64, 4, 3, 128), (128, 64, 4, 3, 64)],
}
# sm_100: 64 x 64 spills 96 B at head dim 128 and 128 x 64 / 4 warps up to 304 B
CACHED_CONFIGS[100] = [(16, 64, 8, 3, 128), (32, 64, 8, 3, 128), (16, 32, 4, 3, 128), (64, 64, 4, 3, 64)]

CACHED_CONFIGS[86] = [(16, 64, 4, 3, 128), (32, 64, 4, 3, 128), (64, 64, 4, 3, 64), (16, 32, 4, 3, 128)]
CACHED_CONFIGS[120] = CACHED_CONFIGS[86]

# fp32 inputs (exact IEEE products on the FMA units, operands held per thread): 8 warps and
# 16/32-row tiles; at head dim 128 only 16-row tiles (or 16-key ones for dK/dV, dQ) are free of
# spills on both sm_80 and sm_90 (e.g. 32 x 32 spills 0.3-0.8 KB there). ptxas spills a few
# bytes at some head dims and not at larger ones, hence the smallest head dims.
FWD_FP32_CONFIGS = {arch: [(16, 64, 8, 2, 128), (64, 32, 8, 2, 64), (16, 128, 8, 2, 128, 128), (32, 64, 8, 2, 64, 32)]
                    for arch in (80, 90, 100)}
CACHED_FP32_CONFIGS = {arch: [(16, 64, 8, 2, 128), (16, 128, 8, 2, 128, 128), (32, 64, 8, 2, 64, 32)]
                       for arch in (80, 90, 100)}
# 99 KB parts: fp32 16 x 128 takes 145 KB at head dim 128
for _arch in (86, 120):
    FWD_FP32_CONFIGS[_arch] = [(16, 64, 8, 2, 128), (64, 32, 8, 2, 64), (32, 64, 8, 2, 64, 32)]
    CACHED_FP32_CONFIGS[_arch] = [(16, 64, 8, 2, 128), (32, 64, 8, 2, 64, 32)]

_fwd_tuned = _tuned(_fwd_kernel, FWD_CONFIGS, FWD_FP32_CONFIGS, (16, 16, 4, 1))
_cached_tuned = _tuned(_fwd_kernel, CACHED_CONFIGS, CACHED_FP32_CONFIGS, (16, 16, 4, 1))


# --------------------------------------------------------------------------------------
# launchers (the helpers below serve attention_backward.py's too)
# --------------------------------------------------------------------------------------
def scale_layout(scale_lens, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(sid [L] int32, off [S + 1] int32) for tokens grouped into scales of `scale_lens`.
    For tile_runs, tests and benchmarks, with a plain copy; the ops build theirs in
    sar_fast.ops.attention.scale_layout (cached per schedule, copied without a host sync)."""
    lens = torch.tensor(scale_lens, dtype=torch.int32)
    sid = torch.repeat_interleave(torch.arange(len(scale_lens), dtype=torch.int32), lens)
    off = torch.zeros(len(scale_lens) + 1, dtype=torch.int32)
    off[1:] = torch.cumsum(lens, 0)
    return sid.to(device), off.to(device)


def tile_runs(scale_lens, window: int, block_m: int, block_n: int, query_side: bool,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """[tiles, 4] int32 (lo, full_lo, full_hi, hi) per query tile (query_side: the key runs
    the forward and dQ visit) or per key tile (the query runs dK/dV visit), computed by the
    kernels' own jit code; on CPU tensors it needs Triton's interpreter. Work models
    (bench/modeled_work.py) and tests use it."""
    sid, off = scale_layout(scale_lens, torch.device(device))
    L = int(sid.numel())
    tiles = triton.cdiv(L, block_m if query_side else block_n)
    runs = torch.zeros(tiles, 4, dtype=torch.int32, device=sid.device)
    _tile_runs_kernel[(tiles,)](sid, off, runs, L, len(scale_lens), window,
                                BLOCK_M=block_m, BLOCK_N=block_n, QUERY_SIDE=query_side)
    return runs.cpu()


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored for fp16/bf16 inputs


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _launch_args(blocks: tuple[int, int] | None, *outputs: torch.Tensor) -> dict:
    """Explicit tiles, or what the autotuned launch needs: outputs to re-poison (tests)."""
    if blocks is None:
        return {"poisoned": outputs} if POISON_OUTPUTS else {}
    return {"BLOCK_M": blocks[0], "BLOCK_N": blocks[1], "num_warps": 4, "num_stages": 1}


# length buckets of the autotune keys: 1, 2, 4, ..., 8192 tokens
LENGTH_BUCKET_CAP = 8192


def _buckets(Lq: int, Lk: int) -> tuple[int, int]:
    return length_bucket(Lq, LENGTH_BUCKET_CAP), length_bucket(Lk, LENGTH_BUCKET_CAP)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_sid: torch.Tensor,
            k_sid: torch.Tensor, k_off: torch.Tensor, softmax_scale: float, window: int,
            cached: bool = False, blocks: tuple[int, int] | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """O [B, H, Lq, D] (a view of [B, Lq, H, D] memory, so merging heads afterwards is free)
    and the base-2 log-sum-exp [B, H, Lq] fp32. q, k, v: [B, H, L, D], last dim contiguous.
    `blocks` = (BLOCK_M, BLOCK_N) skips autotuning (tests)."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    out = _new((B, Lq, H, D), q).transpose(1, 2)
    lse = _new((B, H, Lq), q, torch.float32)
    num_scales = k_off.numel() - 1
    if blocks is None:
        kernel = _cached_tuned if cached else _fwd_tuned
    else:
        kernel = _fwd_kernel
    grid = lambda meta: (B * H, triton.cdiv(Lq, meta["BLOCK_M"]))  # noqa: E731
    kernel[grid](q, k, v, out, lse, q_sid, k_sid, k_off, *_strides(q), *_strides(k), *_strides(v),
                 *_strides(out), H, Lq, Lk, num_scales, window, softmax_scale * LOG2E, *_buckets(Lq, Lk),
                 HEAD_DIM=D, DOT_PRECISION=_dot_precision(q.dtype), **_launch_args(blocks, out, lse))
    return out, lse
