"""Scale shift: the model's input sequence built from per-scale code maps or latents.

Input of scale i+1 = scale i embedded and bicubic-upsampled to side s_{i+1} (FlexVAR), or
VAR's residual variant (f_hat accumulation, area-downsampled; reference path only).

On CUDA (or with backend 'kernel' under TRITON_INTERPRET=1) the FlexVAR variant runs as
one Triton launch for all scales (sar_fast.kernels.scale_shift), the codebook gather fused;
the ops are registered with torch.library so torch.compile treats them as opaque calls.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import torch

from ..schedules import Schedule
from . import backend, reference
from ._checks import FLOAT_DTYPES, INDEX_DTYPES, check_index_range, check_tensor
from .gpu import device_guard, to_device_async
from .reference import Phi, Transitions, parse_transitions


# ----------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------
def scale_shift(codes: torch.Tensor | None = None, codebook: torch.Tensor | None = None,
                schedule: Sequence[int] = (), *, scales: Sequence[torch.Tensor] | None = None,
                mode: str = "flexvar", phi: Phi | None = None, check_range: bool = True,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Teacher-forcing input [B, L - first_l, C].

    Either `codes` [B, L] (int, concatenated over scales) with `codebook` [V, C] — pass the
    codebook exactly as the model embeds it (FlexVAR: L2-normalised) — or `scales`, a list
    of dense maps [B, C, s_i, s_i] of one dtype (differentiable; the codes path is
    differentiable w.r.t. the codebook). mode='var' adds VAR's residual f_hat accumulation
    through `phi`; that variant always runs the PyTorch reference, never the kernel.
    `check_range=False` skips the index range check (one host sync) for callers that
    validated the codes upstream. Arithmetic is fp32; the result has `out_dtype` (default:
    the codebook's / the maps' dtype).
    """
    schedule = Schedule(schedule)
    _check_mode(mode)
    if (codes is None) == (scales is None):
        raise ValueError("pass either codes (with codebook) or scales, not both or neither")
    every = tuple(range(len(schedule) - 1))
    if codes is not None:
        dtype = _check_codes("codes", codes, codebook, schedule, check_range, out_dtype)
        return _from_codes(codes, codebook, schedule, every, mode, phi, dtype)
    maps, dtype = _check_scales(scales, schedule, out_dtype)
    if mode == "flexvar" and backend.select("scale_shift", *maps, kernel=backend.TRITON) == "kernel":
        return torch.ops.sar_fast.scale_shift_dense(maps, list(schedule), list(every), dtype)
    return reference.scale_shift(maps, schedule, mode, phi).to(dtype)


def ssr_inputs(pred_codes: torch.Tensor, codebook: torch.Tensor, schedule: Sequence[int],
               transitions: Transitions = "all", *, mode: str = "flexvar", phi: Phi | None = None,
               check_range: bool = True, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Student-forcing inputs (Stagger-Scale Rollout) from sampled predictions, one launch.

    `pred_codes` [B, L]: the codes sampled from the teacher-forced logits of every scale;
    only the scales feeding the chosen transitions are read. `transitions`:
    - 'all': [B, L - first_l, C], scale_shift's layout: the input of scale i+1 built from the
      predicted codes of scale i, for every i (the paper's parallel SSR, Eq. 6);
    - 'last' or an int i in [0, n-2]: [B, s_{i+1}^2, C], the input of scale i+1 only
      ('last' = n-2, the public SAR code's choice);
    - a sequence of distinct increasing ints: their blocks concatenated in that order.
    mode='var' (reference path): the block of scale i+1 is VAR's residual input built from
    the predicted codes of scales 0..i.
    """
    schedule = Schedule(schedule)
    _check_mode(mode)
    chosen = parse_transitions(transitions, len(schedule))
    dtype = _check_codes("pred_codes", pred_codes, codebook, schedule, check_range, out_dtype)
    return _from_codes(pred_codes, codebook, schedule, chosen, mode, phi, dtype)


def transition_rows(schedule: Sequence[int], transitions: Transitions = "all") -> list[tuple[int, int]]:
    """(start, end) token rows of each chosen transition's block in ssr_inputs' output."""
    schedule = Schedule(schedule)
    rows, start = [], 0
    for j in parse_transitions(transitions, len(schedule)):
        rows.append((start, start + schedule.lengths[j + 1]))
        start = rows[-1][1]
    return rows


@lru_cache(maxsize=256)
def _area_tables(grid: int, schedule: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """1D area-resize rows of every side stacked, [sum s, grid] fp32, and the flat indices
    [sum s^2] of each scale's diagonal block in the [sum s, sum s] product."""
    rows, index, start = [], [], 0
    total = sum(schedule)
    for s in schedule:
        one_d = torch.zeros(s, grid, dtype=torch.float64)
        for o in range(s):
            lo, hi = (o * grid) // s, -(-(o + 1) * grid // s)  # floor / ceil, as adaptive pooling
            one_d[o, lo:hi] = 1.0 / (hi - lo)
        rows.append(one_d)
        span = torch.arange(start, start + s)
        index.append((span[:, None] * total + span[None, :]).flatten())
        start += s
    return torch.cat(rows).float().to(device), torch.cat(index).to(device)


def resize_pos_table(table: torch.Tensor, schedule: Sequence[int]) -> torch.Tensor:
    """FlexVAR's per-scale position table [1, sum s^2, C] (fp32) from the 2D table
    [1, C, G, G]: each scale area-resized (as F.interpolate(mode='area')) and flattened.

    Three launches for any schedule (two small matmuls and a gather, tables cached per
    (G, schedule)) instead of an interpolate per scale; differentiable w.r.t. `table`.
    Uses fp32 matmuls: with TF32 matmuls enabled its error grows to TF32's.
    """
    check_tensor("table", table, ndim=4, dtypes=FLOAT_DTYPES)
    if table.shape[0] != 1 or table.shape[2] != table.shape[3]:
        raise ValueError(f"table must have shape (1, C, G, G), got {tuple(table.shape)}")
    schedule = Schedule(schedule)
    grid = table.shape[-1]
    if schedule[-1] > grid:
        raise ValueError(f"schedule side {schedule[-1]} exceeds the table's grid {grid}")
    resize, index = _area_tables(grid, schedule, table.device)
    both = resize @ table[0].float() @ resize.T  # C, sum s, sum s: every pair of sides
    return both.flatten(1).index_select(1, index).T.unsqueeze(0)


# ----------------------------------------------------------------------------------------
# validation and dispatch
# ----------------------------------------------------------------------------------------
def _check_mode(mode: str) -> None:
    if mode not in ("flexvar", "var"):
        raise ValueError(f"mode must be 'flexvar' or 'var', got {mode!r}")


def _check_out_dtype(out_dtype: torch.dtype | None, default: torch.dtype) -> torch.dtype:
    if out_dtype is None:
        return default
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be one of float32, float16, bfloat16, got {out_dtype}")
    return out_dtype


def _check_codes(name: str, codes: torch.Tensor, codebook: torch.Tensor | None,
                 schedule: Schedule, check_range: bool, out_dtype: torch.dtype | None) -> torch.dtype:
    check_tensor(name, codes, ndim=2, dtypes=INDEX_DTYPES)
    if codebook is None:
        raise ValueError(f"{name} need a codebook [V, C]")
    check_tensor("codebook", codebook, ndim=2, dtypes=FLOAT_DTYPES, device=codes.device)
    if codes.shape[1] != schedule.total:
        raise ValueError(f"{name} has {codes.shape[1]} tokens per sample but schedule {tuple(schedule)} "
                         f"has {schedule.total}")
    if check_range:
        check_index_range(name, codes, codebook.shape[0])
    return _check_out_dtype(out_dtype, codebook.dtype)


def _check_scales(scales: Sequence[torch.Tensor], schedule: Schedule,
                  out_dtype: torch.dtype | None) -> tuple[list[torch.Tensor], torch.dtype]:
    if isinstance(scales, torch.Tensor) or not isinstance(scales, Sequence):
        raise TypeError(f"scales must be a list of tensors [B, C, s, s], got {type(scales).__name__}")
    if len(scales) != len(schedule):
        raise ValueError(f"scales has {len(scales)} maps but schedule {schedule} has {len(schedule)}")
    first = scales[0]
    check_tensor("scales[0]", first, ndim=4, dtypes=FLOAT_DTYPES)
    for i, (m, s) in enumerate(zip(scales, schedule)):
        check_tensor(f"scales[{i}]", m, ndim=4, dtypes=(first.dtype,), device=first.device,
                     shape=(first.shape[0], first.shape[1], s, s))
    return list(scales), _check_out_dtype(out_dtype, first.dtype)


def _from_codes(codes: torch.Tensor, codebook: torch.Tensor, schedule: Schedule,
                chosen: tuple[int, ...], mode: str, phi: Phi | None, dtype: torch.dtype) -> torch.Tensor:
    if mode == "flexvar" and backend.select("scale_shift", codes, codebook, kernel=backend.TRITON) == "kernel":
        return torch.ops.sar_fast.scale_shift_codes(codes, codebook, list(schedule), list(chosen), dtype)
    return reference.ssr_inputs(codes, codebook, schedule, chosen, mode, phi).to(dtype)


# ----------------------------------------------------------------------------------------
# kernel tables (see sar_fast.kernels.scale_shift for the row layout), cached per schedule
# ----------------------------------------------------------------------------------------
_META_WIDTH = 8  # columns per row: out_start, src_off, n_in, n_out, sb, sc, sy, sx


def _to_device(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    return to_device_async(torch.tensor(rows, dtype=torch.int64).reshape(len(rows), _META_WIDTH), device)


@lru_cache(maxsize=512)
def _codes_meta(schedule: tuple[int, ...], chosen: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Forward table of the gather path: sources are token offsets into a row of codes."""
    offsets, rows, out_start = Schedule(schedule).offsets, [], 0
    for j in chosen:
        n_in, n_out = schedule[j], schedule[j + 1]
        rows.append([out_start, offsets[j], n_in, n_out, 0, 0, 0, 0])
        out_start += n_out * n_out
    return _to_device(rows, device)


@lru_cache(maxsize=512)
def _adjoint_meta(schedule: tuple[int, ...], chosen: tuple[int, ...], batch: int, channels: int,
                  tokens: bool, device: torch.device) -> torch.Tensor:
    """Backward table: where the gradient of each source scale goes in the flat buffer.
    tokens: [B, S, C] token-major (S = source tokens of all chosen transitions; summed per
    code into the codebook's gradient); else one contiguous [B, C, s, s] block per source scale."""
    total_src = sum(schedule[j] ** 2 for j in chosen)
    rows, out_start, src_start = [], 0, 0
    for j in chosen:
        n_in, n_out = schedule[j], schedule[j + 1]
        if tokens:
            place = [src_start * channels, total_src * channels, 1, n_in * channels, channels]
        else:
            place = [batch * channels * src_start, channels * n_in * n_in, n_in * n_in, n_in, 1]
        rows.append([out_start, place[0], n_in, n_out, *place[1:]])
        out_start += n_out * n_out
        src_start += n_in * n_in
    return _to_device(rows, device)


def _dense_meta(maps: list[torch.Tensor], schedule: tuple[int, ...], chosen: tuple[int, ...]) -> torch.Tensor:
    """Forward table of the dense path, per call: offsets of each map from maps[0]'s data."""
    base, size = maps[0].data_ptr(), maps[0].element_size()
    rows, out_start = [], 0
    for j in chosen:
        n_in, n_out = schedule[j], schedule[j + 1]
        offset, rem = divmod(maps[j].data_ptr() - base, size)
        assert rem == 0, "tensors of one dtype are element-aligned"
        rows.append([out_start, offset, n_in, n_out, *maps[j].stride()])
        out_start += n_out * n_out
    return _to_device(rows, maps[0].device)


_empty = torch.empty  # the ops' output allocator (tests swap in a NaN-filled one)


def _out_rows(schedule: Sequence[int], chosen: Sequence[int]) -> int:
    return sum(schedule[j + 1] ** 2 for j in chosen)


def _kernels():
    from sar_fast.kernels import scale_shift as scale_shift_kernels  # here: importing triton is slow
    return scale_shift_kernels


# ----------------------------------------------------------------------------------------
# torch.library ops (Triton path): forward from codes / dense maps, and the adjoint
# ----------------------------------------------------------------------------------------
@torch.library.custom_op("sar_fast::scale_shift_codes", mutates_args=())
def _codes_op(codes: torch.Tensor, codebook: torch.Tensor, schedule: list[int], transitions: list[int],
              out_dtype: torch.dtype) -> torch.Tensor:
    sched, chosen = tuple(schedule), tuple(transitions)
    C = codebook.shape[1]
    out = _empty(codes.shape[0], _out_rows(sched, chosen), C, dtype=out_dtype, device=codes.device)
    codes = codes if codes.stride(1) == 1 else codes.contiguous()
    book = codebook if codebook.stride(1) == 1 else codebook.contiguous()
    with device_guard(codes):
        _kernels().launch_forward(out, book, codes, _codes_meta(sched, chosen, codes.device),
                                  [sched[j + 1] for j in chosen], C)
    return out


@_codes_op.register_fake
def _(codes, codebook, schedule, transitions, out_dtype):
    return codes.new_empty(codes.shape[0], _out_rows(schedule, transitions), codebook.shape[1], dtype=out_dtype)


@torch.library.custom_op("sar_fast::scale_shift_dense", mutates_args=())
def _dense_op(scales: list[torch.Tensor], schedule: list[int], transitions: list[int],
              out_dtype: torch.dtype) -> torch.Tensor:
    sched, chosen = tuple(schedule), tuple(transitions)
    B, C = scales[0].shape[:2]
    out = _empty(B, _out_rows(sched, chosen), C, dtype=out_dtype, device=scales[0].device)
    with device_guard(out):
        _kernels().launch_forward(out, scales[0], None, _dense_meta(scales, sched, chosen),
                                  [sched[j + 1] for j in chosen], C)
    return out


@_dense_op.register_fake
def _(scales, schedule, transitions, out_dtype):
    B, C = scales[0].shape[:2]
    return scales[0].new_empty(B, _out_rows(schedule, transitions), C, dtype=out_dtype)


def _adjoint_numel(schedule: Sequence[int], chosen: Sequence[int], batch: int, channels: int) -> int:
    return batch * channels * sum(schedule[j] ** 2 for j in chosen)


@torch.library.custom_op("sar_fast::scale_shift_adjoint", mutates_args=())
def _adjoint_op(grad_out: torch.Tensor, schedule: list[int], transitions: list[int], tokens: bool,
                out_dtype: torch.dtype) -> torch.Tensor:
    """Flat gradient of the chosen source scales (layout: see _adjoint_meta)."""
    sched, chosen = tuple(schedule), tuple(transitions)
    B, _, C = grad_out.shape
    grad_src = _empty(_adjoint_numel(sched, chosen, B, C), dtype=out_dtype, device=grad_out.device)
    meta = _adjoint_meta(sched, chosen, B, C, tokens, grad_out.device)
    with device_guard(grad_src):
        _kernels().launch_backward(grad_src, grad_out.contiguous(), meta, [sched[j] for j in chosen], C)
    return grad_src


@_adjoint_op.register_fake
def _(grad_out, schedule, transitions, tokens, out_dtype):
    B, _, C = grad_out.shape
    return grad_out.new_empty(_adjoint_numel(schedule, transitions, B, C), dtype=out_dtype)


def _codes_setup(ctx, inputs, output):
    codes, codebook, schedule, transitions, _ = inputs
    ctx.save_for_backward(codes)
    ctx.schedule, ctx.transitions = schedule, transitions
    ctx.book_shape, ctx.book_dtype = tuple(codebook.shape), codebook.dtype


def sum_rows_by_index(index: torch.Tensor, rows: torch.Tensor, size: int) -> torch.Tensor:
    """out [size, C] with out[i] = sum of rows[j] [n, C] over index[j] == i, in one fixed
    order on every device and run: a stable sort groups each index's rows in token order, then
    a pairwise tree adds neighbours within each group (ceil(log2 n) rounds of [n, C] work, no
    atomics, no host sync). index_add_ on CUDA adds with atomics in whatever order threads land:
    different bits run to run. The cost: a sort of n keys and ~5 elementwise passes over [n, C]
    per round, ~15 rounds for a d16 batch (n ~ 30k source tokens, C = 32): small next to the
    step, and exact pairwise sums are more accurate than a sequential one."""
    n = index.numel()
    out = rows.new_zeros(size + 1, rows.shape[1])  # row `size` takes the writes of non-leading rows
    if n == 0:
        return out[:size]
    keys, order = torch.sort(index, stable=True)
    vals = rows[order]
    pos = torch.arange(n, device=rows.device)
    leads = torch.ones(n, dtype=torch.bool, device=rows.device)
    leads[1:] = keys[1:] != keys[:-1]
    rank = pos - torch.cummax(torch.where(leads, pos, 0), 0).values  # position within its group
    step = 1
    while step < n:
        partner = (pos + step).clamp(max=n - 1)
        adds = (rank % (2 * step) == 0) & (pos + step < n) & (keys[partner] == keys)
        vals = torch.where(adds[:, None], vals + vals[partner], vals)
        step *= 2
    out.index_copy_(0, torch.where(leads, keys, size), vals)
    return out[:size]


def _codes_backward(ctx, grad_out):
    """Codebook gradient: the adjoint per source token, summed onto its code's row."""
    if not ctx.needs_input_grad[1]:
        return None, None, None, None, None
    (codes,) = ctx.saved_tensors
    sched, chosen = ctx.schedule, ctx.transitions
    C = ctx.book_shape[1]
    grad_tokens = _adjoint_op(grad_out, sched, chosen, True, torch.float32).view(-1, C)
    offsets = Schedule(sched).offsets
    source_codes = torch.cat([codes[:, offsets[j]:offsets[j + 1]] for j in chosen], dim=1)
    grad_book = sum_rows_by_index(source_codes.reshape(-1).long(), grad_tokens, ctx.book_shape[0])
    return None, grad_book.to(ctx.book_dtype), None, None, None


def _dense_setup(ctx, inputs, output):
    scales, schedule, transitions, _ = inputs
    ctx.schedule, ctx.transitions = schedule, transitions
    ctx.num_maps, ctx.dtype = len(scales), scales[0].dtype


def _dense_backward(ctx, grad_out):
    """Gradient per map: [B, C, s, s] for the sources of the chosen transitions, else None."""
    sched, chosen = ctx.schedule, ctx.transitions
    B, _, C = grad_out.shape
    flat = _adjoint_op(grad_out, sched, chosen, False, ctx.dtype)
    grads: list[torch.Tensor | None] = [None] * ctx.num_maps
    start = 0
    for j in chosen:
        n = B * C * sched[j] ** 2
        grads[j] = flat[start:start + n].view(B, C, sched[j], sched[j])
        start += n
    return grads, None, None, None


torch.library.register_autograd("sar_fast::scale_shift_codes", _codes_backward, setup_context=_codes_setup)
torch.library.register_autograd("sar_fast::scale_shift_dense", _dense_backward, setup_context=_dense_setup)


__all__ = ["scale_shift", "ssr_inputs", "transition_rows", "resize_pos_table"]
