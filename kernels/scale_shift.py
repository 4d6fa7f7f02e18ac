"""Triton kernels for the scale shift: bicubic upsampling of every scale in one launch.

Both kernels work on a small int64 table with one row per transition (scale j -> j+1),
so one compiled kernel serves every schedule (FlexVAR draws a new one each step):

  META_OUT_START  first row of this transition's block in the output sequence
  META_SRC_OFF    where scale j starts in the source (codes: token offset within a row of
                  `codes`; dense maps: element offset from the source base pointer)
  META_N_IN       side of scale j;  META_N_OUT  side of scale j+1
  META_SB .. SX   element strides of the dense map of scale j (batch, channel, y, x); in
                  the backward, offset and strides say where scale j's gradient goes

Bicubic follows PyTorch's `F.interpolate(mode='bicubic', align_corners=False)`: for output
pixel o of side n_out, src = (o + 0.5) * n_in / n_out - 0.5, i0 = floor(src), t = src - i0,
taps i0-1 .. i0+2 clamped to [0, n_in-1] with Keys' weights (A = -0.75); rows are
interpolated first, then the four row results. Arithmetic is fp32.

Programs: axis 0 walks the samples x the tiles of all transitions (BLOCK_P pixels each,
found by a short scan of the table, so the tiling needs no extra table per block size; the
batch folded in because axes 1-2 stop at 65,535), axis 1 blocks of BLOCK_C channels (at
most MAX_BLOCK_C: a wide map, C = 1024, would otherwise hold 1024 channels per pixel in
registers and spill).
The launchers take plain tensors; validation and autograd live in sar_fast.ops.scale_shift.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# columns of the transition table (sar_fast.ops.scale_shift builds its rows in this order)
META_OUT_START, META_SRC_OFF = tl.constexpr(0), tl.constexpr(1)
META_N_IN, META_N_OUT = tl.constexpr(2), tl.constexpr(3)
META_SB, META_SC, META_SY, META_SX = tl.constexpr(4), tl.constexpr(5), tl.constexpr(6), tl.constexpr(7)
META_WIDTH = tl.constexpr(8)

CUBIC_A = tl.constexpr(-0.75)  # PyTorch's bicubic coefficient
MAX_BLOCK_C = 128  # channels per program: 8 outputs per thread at BLOCK_P 16 and 8 warps


@triton.jit
def _find_tile(meta_ptr, num_t, tiles, BLOCK_P: tl.constexpr, OUTPUT_SIDE: tl.constexpr):
    """(sample, transition, first pixel) of this program's tile; tiles of a transition cover
    its output map (OUTPUT_SIDE) or its source map. Axis 0 carries samples x `tiles` (all
    transitions' tiles of one sample, tile fastest): axis 1 stops at 65,535 samples."""
    pid = tl.program_id(0)
    b = pid // tiles  # int32: a 64-bit division costs registers
    rest = (pid - b * tiles).to(tl.int64)
    b = b.to(tl.int64)
    j = rest * 0
    first = rest * 0
    for k in range(num_t):
        if OUTPUT_SIDE:
            side = tl.load(meta_ptr + k * META_WIDTH + META_N_OUT)
        else:
            side = tl.load(meta_ptr + k * META_WIDTH + META_N_IN)
        span = tl.cdiv(side * side, BLOCK_P)
        hit = (rest >= 0) & (rest < span)
        j = tl.where(hit, k, j)
        first = tl.where(hit, rest * BLOCK_P, first)
        rest -= span
    return b, j, first


@triton.jit
def _source_coord(o, n_in, n_out):
    """floor and fraction of the source coordinate of output pixels `o` (PyTorch's rule)."""
    scale = tl.math.div_rn(n_in.to(tl.float32), n_out.to(tl.float32))
    src = scale * (o.to(tl.float32) + 0.5) - 0.5
    i0 = tl.floor(src)
    return i0.to(tl.int32), src - i0


@triton.jit
def _cubic_weight(t, K: tl.constexpr):
    """Keys' cubic weight of tap K (0..3, at offset K-1 from floor) for fraction t."""
    A: tl.constexpr = CUBIC_A
    if K == 0:
        x = t + 1.0
        w = ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
    elif K == 1:
        w = ((A + 2.0) * t - (A + 3.0)) * t * t + 1.0
    elif K == 2:
        x = 1.0 - t
        w = ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    else:
        x = 2.0 - t
        w = ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
    return w


@triton.jit
def _adjoint_weight(o, i, n_in, n_out):
    """Weight of source pixel `i` in output pixel `o` (1D), summed over clamped taps;
    0 where `o` is outside the output map."""
    i0, t = _source_coord(o, n_in, n_out)
    w = tl.zeros(o.shape, tl.float32)
    for k in tl.static_range(4):
        tap = tl.minimum(tl.maximum(i0 - 1 + k, 0), n_in - 1)
        w += tl.where(tap == i, _cubic_weight(t, k), 0.0)
    return tl.where(o < n_out, w, 0.0)


@triton.jit(do_not_specialize=["num_t", "tiles", "rows_out", "codes_stride_b"])
def _scale_shift_fwd_kernel(out_ptr, src_ptr, codes_ptr, meta_ptr, num_t, tiles, C,
                            rows_out, codes_stride_b, book_stride,
                            GATHER: tl.constexpr,
                            BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    b, j, first = _find_tile(meta_ptr, num_t, tiles, BLOCK_P, True)
    row = meta_ptr + j * META_WIDTH
    out_start = tl.load(row + META_OUT_START)
    src_off = tl.load(row + META_SRC_OFF)
    n_in = tl.load(row + META_N_IN).to(tl.int32)
    n_out = tl.load(row + META_N_OUT).to(tl.int32)

    p = first.to(tl.int32) + tl.arange(0, BLOCK_P)
    p_ok = p < n_out * n_out
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = p_ok[:, None] & (c < C)[None, :]
    iy0, ty = _source_coord(p // n_out, n_in, n_out)
    ix0, tx = _source_coord(p % n_out, n_in, n_out)

    if GATHER:
        codes_row = codes_ptr + b * codes_stride_b + src_off
    else:
        sb = tl.load(row + META_SB)
        sc = tl.load(row + META_SC)
        sy = tl.load(row + META_SY)
        sx = tl.load(row + META_SX)
        map_base = src_ptr + src_off + b * sb + c[None, :].to(tl.int64) * sc

    acc = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
    for ky in tl.static_range(4):
        yy = tl.minimum(tl.maximum(iy0 - 1 + ky, 0), n_in - 1)
        line = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
        for kx in tl.static_range(4):
            xx = tl.minimum(tl.maximum(ix0 - 1 + kx, 0), n_in - 1)
            if GATHER:
                code = tl.load(codes_row + yy * n_in + xx, mask=p_ok, other=0).to(tl.int64)
                v = tl.load(src_ptr + code[:, None] * book_stride + c[None, :], mask=mask, other=0.0)
            else:
                v = tl.load(map_base + (yy * sy + xx * sx)[:, None], mask=mask, other=0.0)
            line += _cubic_weight(tx, kx)[:, None] * v.to(tl.float32)
        acc += _cubic_weight(ty, ky)[:, None] * line

    # (row * C): C's divisibility (specialised) lets the store vectorise
    dst = out_ptr + ((b * rows_out + out_start + p) * C)[:, None] + c[None, :]
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _candidate_outputs(i, ok, n_in, n_out):
    """First output pixel (per lane) that may reach source pixel `i`, and how many to visit
    (max over the tile). Exactly, o reaches i iff i - 2 <= floor(src(o)) <= i + 1, i.e.
    ((2i - 3) n_out - n_in) / (2 n_in) <= o < ((2i + 5) n_out - n_in) / (2 n_in); one pixel of
    margin each side absorbs fp32 rounding of src (the weights decide, so extras add 0)."""
    lo = (2 * i - 3) * n_out - n_in
    hi = (2 * i + 5) * n_out - n_in
    first = tl.maximum(tl.where(lo > 0, lo // (2 * n_in) - 1, 0), 0)
    last = tl.minimum(tl.maximum(hi, 0) // (2 * n_in) + 1, n_out - 1)
    return first, tl.max(tl.where(ok, last - first + 1, 0), axis=0)


@triton.jit(do_not_specialize=["num_t", "tiles", "rows_out"])
def _scale_shift_bwd_kernel(grad_src_ptr, grad_out_ptr, meta_ptr, num_t, tiles, C, rows_out,
                            BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Adjoint in gather form: each source pixel sums the output pixels whose taps reach it
    (no atomics, deterministic), with weights recomputed exactly as the forward does (hence
    the forward's tile lookup and indexing prologue, repeated)."""
    # deliberate repeat: of the forward kernel's meta-row reads: each kernel reads its row in its own registers
    b, j, first = _find_tile(meta_ptr, num_t, tiles, BLOCK_P, False)
    row = meta_ptr + j * META_WIDTH
    out_start = tl.load(row + META_OUT_START)
    dst_off = tl.load(row + META_SRC_OFF)
    n_in = tl.load(row + META_N_IN).to(tl.int32)
    n_out = tl.load(row + META_N_OUT).to(tl.int32)
    sb = tl.load(row + META_SB)
    sc = tl.load(row + META_SC)
    sy = tl.load(row + META_SY)
    sx = tl.load(row + META_SX)

    q = first.to(tl.int32) + tl.arange(0, BLOCK_P)
    q_ok = q < n_in * n_in
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    iy = q // n_in
    ix = q % n_in
    oy0, ny = _candidate_outputs(iy, q_ok, n_in, n_out)
    ox0, nx = _candidate_outputs(ix, q_ok, n_in, n_out)

    g_row = b * rows_out + out_start
    acc = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
    for ay in range(ny):
        oy = oy0 + ay
        wy = _adjoint_weight(oy, iy, n_in, n_out)
        line = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
        for ax in range(nx):
            ox = ox0 + ax
            wx = _adjoint_weight(ox, ix, n_in, n_out)
            hit = q_ok & (wx != 0.0) & (wy != 0.0)
            g = tl.load(grad_out_ptr + ((g_row + oy * n_out + ox) * C)[:, None] + c[None, :],
                        mask=hit[:, None] & c_ok[None, :], other=0.0)
            line += wx[:, None] * g.to(tl.float32)
        acc += wy[:, None] * line

    dst = grad_src_ptr + dst_off + b * sb + c[None, :].to(tl.int64) * sc + (iy * sy + ix * sx)[:, None]
    tl.store(dst, acc.to(grad_src_ptr.dtype.element_ty), mask=q_ok[:, None] & c_ok[None, :])


# ----------------------------------------------------------------------------------------
# launch helpers
# ----------------------------------------------------------------------------------------
def block_channels(C: int) -> int:
    """BLOCK_C: every channel in one program up to MAX_BLOCK_C, else blocks of it."""
    return min(triton.next_power_of_2(C), MAX_BLOCK_C)


def default_config(C: int) -> tuple[int, int]:
    """(BLOCK_P, num_warps): 8 outputs per thread. The 16 tap loads are all in flight at
    once, so registers grow with outputs per thread: 8 compiles to ~115 registers on sm_90
    (16 to ~194, 32 spills); the bench's sweep measures the alternatives."""
    block_c = block_channels(C)
    block_p = max(16, min(64, 2048 // block_c))
    return block_p, max(1, min(8, block_p * block_c // 256))


def num_tiles(sides: list[int], block_p: int) -> int:
    return sum(triton.cdiv(s * s, block_p) for s in sides)


def _launch_shape(batch: int, sides: list[int], C: int, block_p: int | None, num_warps: int | None):
    """(BLOCK_P, BLOCK_C, num_warps, tiles per image, grid) of a launch over the pixel tiles
    of `sides` for `batch` images: the given tile sizes, else the defaults for C."""
    dflt_p, dflt_w = default_config(C)
    block_p = block_p or dflt_p
    block_c = block_channels(C)
    tiles = num_tiles(sides, block_p)
    return block_p, block_c, num_warps or dflt_w, tiles, (tiles * batch, triton.cdiv(C, block_c))


def launch_forward(out: torch.Tensor, src: torch.Tensor, codes: torch.Tensor | None,
                   meta: torch.Tensor, out_sides: list[int], C: int,
                   block_p: int | None = None, num_warps: int | None = None) -> None:
    """out [B, L_out, C] (contiguous) <- bicubic upsampling described by `meta`.

    codes given: `src` is the codebook [V, C] (gather fused; codes [B, L], row stride free);
    codes None: `src` is the base tensor the dense maps' META_SRC_OFF offsets are from.
    `out_sides` are the output sides of the transitions in `meta` (sizes the grid).
    """
    block_p, block_c, num_warps, tiles, grid = _launch_shape(out.shape[0], out_sides, C, block_p, num_warps)
    if grid[0] == 0:
        return
    gather = codes is not None
    _scale_shift_fwd_kernel[grid](
        out, src, codes if gather else src, meta, meta.shape[0], tiles, C,
        out.shape[1], codes.stride(0) if gather else 0, src.stride(0) if gather else 0,
        GATHER=gather, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=num_warps)


def launch_backward(grad_src: torch.Tensor, grad_out: torch.Tensor, meta: torch.Tensor,
                    in_sides: list[int], C: int,
                    block_p: int | None = None, num_warps: int | None = None) -> None:
    """grad_src (laid out by meta's offsets/strides) <- adjoint of the forward for grad_out
    [B, L_out, C] (contiguous). `in_sides` are the source sides of the transitions."""
    block_p, block_c, num_warps, tiles, grid = _launch_shape(grad_out.shape[0], in_sides, C, block_p, num_warps)
    if grid[0] == 0:
        return
    _scale_shift_bwd_kernel[grid](
        grad_src, grad_out, meta, meta.shape[0], tiles, C, grad_out.shape[1],
        BLOCK_P=block_p, BLOCK_C=block_c, num_warps=num_warps)
