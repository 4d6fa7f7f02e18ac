"""The fused scale-shift kernel against the PyTorch reference (Triton interpreter on CPU).

Outputs are allocated NaN-filled (see `nan_outputs`), so an element the kernel never
writes fails the comparison.
"""
import importlib
import random

import pytest
import torch
import torch.nn.functional as F

from conftest import need_module, poison_outputs

from sar_fast import ops
from sar_fast.ops import reference
from sar_fast.schedules import random_flexvar_schedule, total_length

need_module("triton")
ss = importlib.import_module("sar_fast.ops.scale_shift")  # the module (ops.scale_shift is the function)
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 and compile counts need a GPU")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = dict(atol=1e-5, rtol=0)


@pytest.fixture(autouse=True)
def nan_outputs(monkeypatch):
    poison_outputs(monkeypatch, "scale_shift")


@pytest.fixture
def small_tiles(monkeypatch):
    """16-pixel tiles: many tiles per transition, tiles ending mid-map."""
    kernels = need_module("sar_fast.kernels.scale_shift")
    monkeypatch.setattr(kernels, "default_config", lambda C: (16, 1))


def make_codes(B, schedule, V):
    return torch.randint(0, V, (B, total_length(schedule)), device=DEVICE)


def triton_call(fn, *args, **kwargs):
    with ops.use_backend("kernel"):
        return fn(*args, **kwargs)


def reference_tf(codes, book, schedule):
    return reference.scale_shift(reference.embed_scales(codes.long(), book, schedule), schedule)


SCHEDULES = [
    ((1, 2, 3, 5), 3, 1),       # C=1, odd sides
    ((10, 13), 1, 3),           # non-integer ratio
    ((13, 16), 2, 8),
    ((1, 2, 4, 6), 2, 32),
    ((2, 7), 1, 5),             # ratio 3.5, C not a power of two
]


@pytest.mark.parametrize("schedule, B, C", SCHEDULES)
def test_codes_match_reference(schedule, B, C):
    V = 23
    book = F.normalize(torch.randn(V, C, device=DEVICE), dim=-1) * 3
    codes = make_codes(B, schedule, V)
    got = triton_call(ops.scale_shift, codes, book, schedule)
    assert got.shape == (B, total_length(schedule) - schedule[0] ** 2, C) and got.dtype == torch.float32
    torch.testing.assert_close(got, reference_tf(codes, book, schedule), **TOL)


def test_random_schedules_int32_codes(small_tiles):
    rng = random.Random(1)
    for _ in range(2):
        schedule = random_flexvar_schedule(rng, last=8)
        B, C, V = rng.randint(1, 2), rng.choice([1, 3, 8]), 17
        book = torch.randn(V, C, device=DEVICE)
        codes = make_codes(B, schedule, V).int()
        got = triton_call(ops.scale_shift, codes, book, schedule)
        torch.testing.assert_close(got, reference_tf(codes, book, schedule), **TOL)


def test_strided_codes_and_codebook():
    schedule, V, C = (1, 3, 4), 9, 6
    wide = make_codes(2, schedule, V)
    codes = torch.cat([wide, wide], dim=1)[:, 3:3 + wide.shape[1]]  # row stride != L
    book = torch.randn(C, V, device=DEVICE).T  # column-major codebook
    got = triton_call(ops.scale_shift, codes, book, schedule)
    torch.testing.assert_close(got, reference_tf(codes, book.contiguous(), schedule), **TOL)


@pytest.mark.parametrize("schedule, B, C", [((1, 2, 3, 5), 2, 3), ((10, 13), 1, 8)])
def test_dense_match_reference(schedule, B, C, small_tiles):
    maps = [torch.randn(B, C, s, s, device=DEVICE) for s in schedule]
    maps[0] = maps[0].to(memory_format=torch.channels_last)  # strides come from each map
    maps[1] = torch.randn(B, C, schedule[1] + 2, schedule[1] + 1, device=DEVICE)[:, :, 1:-1, :-1]
    got = triton_call(ops.scale_shift, scales=maps, schedule=schedule)
    torch.testing.assert_close(got, reference.scale_shift(maps, schedule), **TOL)


def test_dense_views_of_one_buffer():
    schedule, B, C = (2, 3, 5), 2, 4
    flat = torch.randn(B, C, total_length(schedule), device=DEVICE)
    maps = [m.unflatten(-1, (s, s)) for m, s in zip(flat.split([s * s for s in schedule], -1), schedule)]
    got = triton_call(ops.scale_shift, scales=maps, schedule=schedule)
    torch.testing.assert_close(got, reference.scale_shift(maps, schedule), **TOL)


def test_output_dtype_and_single_scale():
    schedule, V, C = (3, 5), 11, 8
    book, codes = torch.randn(V, C, device=DEVICE), make_codes(2, schedule, V)
    got = triton_call(ops.scale_shift, codes, book, schedule, out_dtype=torch.float16)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got, reference_tf(codes, book, schedule).half(), atol=2e-3, rtol=1e-3)
    half_maps = [m.half() for m in reference.embed_scales(codes, book, schedule)]
    got = triton_call(ops.scale_shift, scales=half_maps, schedule=schedule)
    torch.testing.assert_close(got, reference.scale_shift(half_maps, schedule).half(), atol=2e-3, rtol=1e-3)
    empty = triton_call(ops.scale_shift, make_codes(2, (4,), V), book, (4,))
    assert empty.shape == (2, 0, C)


@pytest.mark.parametrize("schedule", [(1, 7), (3, 4, 7), (10, 13)])
def test_dense_gradient_matches_autograd(schedule):
    B, C = 2, 3
    maps = [torch.randn(B, C, s, s, device=DEVICE, requires_grad=True) for s in schedule]
    twins = [m.detach().clone().requires_grad_() for m in maps]
    weight = torch.randn(B, total_length(schedule) - schedule[0] ** 2, C, device=DEVICE)
    (triton_call(ops.scale_shift, scales=maps, schedule=schedule) * weight).sum().backward()
    (reference.scale_shift(twins, schedule) * weight).sum().backward()
    for got, want in zip(maps[:-1], twins[:-1]):
        torch.testing.assert_close(got.grad, want.grad, **TOL)
    assert maps[-1].grad is None  # the last scale feeds no input


def test_codebook_gradient_matches_autograd():
    schedule, V, C = (1, 2, 3, 5), 6, 4  # few codes: many tokens share a row
    codes = make_codes(3, schedule, V)
    book = torch.randn(V, C, device=DEVICE, requires_grad=True)
    twin = book.detach().clone().requires_grad_()
    weight = torch.randn(3, total_length(schedule) - 1, C, device=DEVICE)
    (triton_call(ops.scale_shift, codes, book, schedule) * weight).sum().backward()
    (reference_tf(codes, twin, schedule) * weight).sum().backward()
    torch.testing.assert_close(book.grad, twin.grad, **TOL)


# ---------------------------------------------------------------------------------------- SSR
def naive_ssr_block(pred, book, schedule, j):
    """Input of scale j+1 built from the predicted codes of scale j, by hand."""
    start = sum(s * s for s in schedule[:j])
    s_in, s_out = schedule[j], schedule[j + 1]
    emb = book[pred[:, start:start + s_in * s_in]]  # B, s*s, C
    grid = emb.transpose(1, 2).reshape(pred.shape[0], -1, s_in, s_in)
    return F.interpolate(grid, size=(s_out, s_out), mode="bicubic").flatten(2).transpose(1, 2)


@pytest.mark.parametrize("transitions, blocks", [
    ("all", [0, 1, 2, 3]), ("last", [3]), (0, [0]), (2, [2]), ([1, 3], [1, 3]),
])
def test_ssr_inputs_match_naive(transitions, blocks):
    schedule, V, C = (1, 2, 3, 5, 7), 13, 8
    book, pred = torch.randn(V, C, device=DEVICE), make_codes(2, schedule, V)
    want = torch.cat([naive_ssr_block(pred, book, schedule, j) for j in blocks], dim=1)
    torch.testing.assert_close(reference.ssr_inputs(pred, book, schedule, transitions), want, **TOL)
    got = triton_call(ss.ssr_inputs, pred, book, schedule, transitions)
    torch.testing.assert_close(got, want, **TOL)
    rows = ss.transition_rows(schedule, transitions)
    assert rows[0][0] == 0 and rows[-1][1] == got.shape[1]
    if transitions == "all":
        torch.testing.assert_close(got, triton_call(ops.scale_shift, pred, book, schedule), atol=0, rtol=0)


def test_ssr_var_mode_is_the_residual_input_of_predictions():
    schedule, V, C = (1, 2, 4), 9, 3
    book, pred = torch.randn(V, C), torch.randint(0, V, (2, 21))
    full = ops.scale_shift(pred, book, schedule, mode="var")
    torch.testing.assert_close(ss.ssr_inputs(pred, book, schedule, "last", mode="var"), full[:, 4:])
    torch.testing.assert_close(ss.ssr_inputs(pred, book, schedule, 0, mode="var"), full[:, :4])


def test_ssr_codebook_gradient_only_from_the_chosen_scale():
    schedule, V, C = (1, 2, 3, 5), 7, 4
    pred = make_codes(2, schedule, V)
    book = torch.randn(V, C, device=DEVICE, requires_grad=True)
    twin = book.detach().clone().requires_grad_()
    triton_call(ss.ssr_inputs, pred, book, schedule, 1).square().sum().backward()
    reference.ssr_inputs(pred, twin, schedule, 1).square().sum().backward()
    torch.testing.assert_close(book.grad, twin.grad, **TOL)


# ---------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs, err, msg", [
    (dict(codes=torch.full((2, 14), 9)), ValueError, r"codes must lie in \[0, 9\)"),
    (dict(codes=torch.randint(0, 9, (2, 15))), ValueError, "has 15 tokens per sample but schedule"),
    (dict(codes=torch.randint(0, 9, (2, 14)).float()), TypeError, "codes must have dtype"),
    (dict(codes=torch.randint(0, 9, (2, 14)), codebook=torch.randint(0, 9, (9, 4))), TypeError,
     "codebook must have dtype"),
    (dict(codes=torch.randint(0, 9, (2, 14)), codebook=torch.randn(9, 4, device="meta")), ValueError,
     "codebook is on meta"),
    (dict(codes=torch.randint(0, 9, (2, 14)), out_dtype=torch.int32), TypeError, "out_dtype"),
    (dict(codes=torch.randint(0, 9, (2, 14)), mode="bilinear"), ValueError, "mode must be"),
])
def test_bad_codes_raise(kwargs, err, msg):
    kwargs = {"codebook": torch.randn(9, 4), **kwargs}
    with ops.use_backend("kernel"), pytest.raises(err, match=msg):
        ops.scale_shift(schedule=(1, 2, 3), **kwargs)


@pytest.mark.parametrize("scales, err, msg", [
    ([torch.randn(2, 4, 1, 1), torch.randn(2, 4, 2, 2).half()], TypeError, r"scales\[1\] must have dtype"),
    ([torch.randn(2, 4, 1, 1), torch.randn(2, 4, 3, 3)], ValueError, r"scales\[1\] must have shape"),
    ([torch.randn(2, 4, 1, 1)], ValueError, "scales has 1 maps but schedule"),
    ([torch.randn(2, 4, 1, 1), torch.randn(2, 4, 2, 2, device="meta")], ValueError, r"scales\[1\] is on meta"),
    (torch.randn(2, 4, 2, 2), TypeError, "scales must be a list"),
])
def test_bad_scales_raise(scales, err, msg):
    with ops.use_backend("kernel"), pytest.raises(err, match=msg):
        ops.scale_shift(scales=scales, schedule=(1, 2))


@pytest.mark.parametrize("transitions, err, msg", [
    ("first", ValueError, "transitions must be 'all', 'last'"),
    (3, ValueError, r"transition 3 \(scale 3 -> 4\) is outside \[0, 2\]"),
    (-1, ValueError, "is outside"),
    (True, TypeError, "transitions must hold ints"),
    ([2, 1], ValueError, "distinct and increasing"),
])
def test_bad_transitions_raise(transitions, err, msg):
    pred = torch.randint(0, 5, (1, 30))
    with pytest.raises(err, match=msg):
        ss.ssr_inputs(pred, torch.randn(5, 2), (1, 2, 3, 4), transitions)


def test_bad_pred_codes_raise():
    with pytest.raises(ValueError, match=r"pred_codes must lie in \[0, 5\)"):
        ss.ssr_inputs(torch.full((1, 14), 5), torch.randn(5, 2), (1, 2, 3))
    with pytest.raises(ValueError, match="'last' needs a schedule of at least 2"):
        ss.ssr_inputs(torch.zeros(1, 4, dtype=torch.long), torch.randn(5, 2), (2,), "last")


def test_table_layout_agrees_with_the_kernels():
    k = need_module("sar_fast.kernels.scale_shift")
    assert ss._META_WIDTH == k.META_WIDTH.value
    row = ss._codes_meta((1, 2, 5), (0, 1), torch.device("cpu"))[1].tolist()
    assert row[k.META_OUT_START.value] == 4 and row[k.META_SRC_OFF.value] == 1  # after 2x2; scale 1 at token 1
    assert row[k.META_N_IN.value] == 2 and row[k.META_N_OUT.value] == 5


# ---------------------------------------------------------------------------------------- compile, pos table
def test_torch_compile_fullgraph():
    schedule, V, C = (1, 2, 3), 5, 4
    book, codes = torch.randn(V, C, device=DEVICE), make_codes(2, schedule, V)
    maps = [torch.randn(2, C, s, s, device=DEVICE, requires_grad=True) for s in schedule]
    fn = torch.compile(lambda c, m: (ops.scale_shift(c, book, schedule, check_range=False)
                                     * ops.scale_shift(scales=m, schedule=schedule)).sum(),
                       backend="aot_eager", fullgraph=True)
    with ops.use_backend("kernel"):
        fn(codes, maps).backward()
    twins = [m.detach().clone().requires_grad_() for m in maps]
    (reference_tf(codes, book, schedule) * reference.scale_shift(twins, schedule)).sum().backward()
    torch.testing.assert_close(maps[1].grad, twins[1].grad, **TOL)


@pytest.mark.parametrize("grid, schedule", [(8, (1, 2, 3, 5, 8)), (32, (1, 3, 13, 16))])
def test_resize_pos_table_matches_area_interpolate(grid, schedule):
    table = torch.randn(1, 6, grid, grid, requires_grad=True)
    twin = table.detach().clone().requires_grad_()
    got = ss.resize_pos_table(table, schedule)
    want = torch.cat([F.interpolate(twin, size=(s, s), mode="area").flatten(2).transpose(1, 2)
                      for s in schedule], dim=1)
    torch.testing.assert_close(got, want, **TOL)
    weight = torch.randn_like(want)
    (got * weight).sum().backward()
    (want * weight).sum().backward()
    torch.testing.assert_close(table.grad, twin.grad, **TOL)
    with pytest.raises(ValueError, match="exceeds the table's grid"):
        ss.resize_pos_table(table, (1, grid + 1))


# ---------------------------------------------------------------------------------------- GPU only
@needs_gpu
def test_bf16_output_on_gpu():
    schedule, V, C = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), 4096, 32
    book, codes = torch.randn(V, C, device="cuda"), make_codes(4, schedule, V)
    got = ops.scale_shift(codes, book, schedule, out_dtype=torch.bfloat16)
    want = reference_tf(codes, book, schedule)
    # bf16 rounding of the fp32 result is the only error
    torch.testing.assert_close(got.float(), want, atol=1e-5, rtol=2 ** -8)


@needs_gpu
def test_random_schedules_do_not_recompile():
    from sar_fast.kernels import scale_shift as kern

    def variants():
        return sum(len(cache[0]) for cache in kern._scale_shift_fwd_kernel.device_caches.values())

    rng, book = random.Random(0), torch.randn(512, 32, device="cuda")
    before = None
    for _ in range(12):
        schedule = random_flexvar_schedule(rng)
        codes = make_codes(2, schedule, 512)
        torch.testing.assert_close(ops.scale_shift(codes, book, schedule), reference_tf(codes, book, schedule), **TOL)
        before = variants() if before is None else before  # after the first compile
    assert variants() == before, f"{variants() - before} recompiles over 11 new schedules"


@pytest.mark.parametrize("C, max_block_c", [(5, 4), (10, 4), (8, 4), (200, None)])
def test_channel_blocks_forward_and_gradients(monkeypatch, C, max_block_c):
    """Channels split over programs (axis 2): blocks of MAX_BLOCK_C, the last one partial
    (C 5, 10 at 4 per block; C 200 at the default 128), codes and dense maps, and the
    gradients of both."""
    kernels = need_module("sar_fast.kernels.scale_shift")
    if max_block_c is not None:
        monkeypatch.setattr(kernels, "MAX_BLOCK_C", max_block_c)
    assert kernels.block_channels(C) < C
    schedule, B, V = (1, 2, 3, 5), 2, 7
    book = torch.randn(V, C, device=DEVICE, requires_grad=True)
    twin = book.detach().clone().requires_grad_()
    codes = make_codes(B, schedule, V)
    weight = torch.randn(B, total_length(schedule) - 1, C, device=DEVICE)
    got = triton_call(ops.scale_shift, codes, book, schedule)
    torch.testing.assert_close(got, reference_tf(codes, twin, schedule), **TOL)
    (got * weight).sum().backward()
    (reference_tf(codes, twin, schedule) * weight).sum().backward()
    torch.testing.assert_close(book.grad, twin.grad, **TOL)
    maps = [torch.randn(B, C, s, s, device=DEVICE, requires_grad=True) for s in schedule]
    twins = [m.detach().clone().requires_grad_() for m in maps]
    (triton_call(ops.scale_shift, scales=maps, schedule=schedule) * weight).sum().backward()
    (reference.scale_shift(twins, schedule) * weight).sum().backward()
    for a, b in zip(maps[:-1], twins[:-1]):
        torch.testing.assert_close(a.grad, b.grad, **TOL)
