"""Block-causal scale attention: the Triton kernels (interpreter on CPU) against dense-mask
SDPA in float64, forward and backward, on odd sizes, random schedules and the KV-cache path."""
import random

import pytest
import torch
import torch.nn.functional as F

from conftest import poison_outputs
from sar_fast import ops
from sar_fast.ops import reference
from sar_fast.kernels import attention as kernels
from sar_fast.kernels import attention_backward

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    poison_outputs(monkeypatch, "attention")


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


def qkv(B, H, L, D, dtype=torch.float32, model_layout=False, Lk=None):
    """Fresh q, k, v leaves; model_layout gives strided views of one [B, L, 3, H, D] buffer
    as the transformer passes them."""
    if model_layout:
        buf = torch.randn(B, L, 3, H, D, device=DEVICE, dtype=dtype)
        return [t.requires_grad_() for t in buf.permute(2, 0, 3, 1, 4).detach().unbind(0)]
    lens = (L, Lk or L, Lk or L)
    return [torch.randn(B, H, n, D, device=DEVICE, dtype=dtype).requires_grad_() for n in lens]


def dense_reference(q, k, v, mask, softmax_scale, grad_out):
    """Output and dQ, dK, dV of SDPA with a dense boolean mask, in float64."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q64, k64, v64, attn_mask=mask, scale=softmax_scale)
    return (out, *torch.autograd.grad(out, (q64, k64, v64), grad_out.double()))


def window_mask(scale_lens, window):
    sid = torch.repeat_interleave(torch.arange(len(scale_lens)), torch.tensor(scale_lens))
    gap = sid[:, None] - sid[None, :]
    return ((gap >= 0) & (gap <= window)).to(DEVICE)


def check_against_dense(q, k, v, scale_lens, softmax_scale=None, window=None, tol=1e-5):
    with ops.use_backend("kernel"):
        out = ops.scale_causal_attention(q, k, v, scale_lens, softmax_scale, window=window)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    mask = (reference.scale_causal_mask(scale_lens, DEVICE) if window is None
            else window_mask(scale_lens, window))
    want = dense_reference(q, k, v, mask, softmax_scale, grad_out)
    for name, g, w in zip(("out", "dq", "dk", "dv"), (out, *grads), want):
        assert torch.isfinite(g).all(), f"{name} has unwritten (NaN) elements"
        assert rel_err(g, w) <= tol, f"{name}: rel. error {rel_err(g, w):.2e} > {tol:.0e}"


@pytest.mark.parametrize("scale_lens, D, B, H, softmax_scale, model_layout", [
    ((1, 4, 9, 16), 16, 2, 2, None, False),    # schedule 1,2,3,4: L = 30
    ((1, 4, 16, 25), 32, 1, 3, 1.0, True),     # schedule 1,2,4,5: L = 46; VAR's scale 1.0
    ((1, 36), 16, 3, 1, 0.3, True),            # SAR's student-forcing layout [1, s*s]
    ((7,), 16, 1, 2, None, False),             # one scale: plain full attention, L < a tile
])
def test_matches_dense_mask_sdpa(scale_lens, D, B, H, softmax_scale, model_layout):
    q, k, v = qkv(B, H, sum(scale_lens), D, model_layout=model_layout)
    check_against_dense(q, k, v, scale_lens, softmax_scale)


def test_random_schedules_seeded():
    rng = random.Random(1234)
    for _ in range(5):
        sides = sorted(rng.sample(range(1, 7), rng.randint(1, 4)))
        scale_lens = tuple(s * s for s in sides)
        q, k, v = qkv(rng.randint(1, 2), rng.randint(1, 2), sum(scale_lens), rng.choice((16, 32)))
        check_against_dense(q, k, v, scale_lens, softmax_scale=rng.choice((None, 1.0)))


@pytest.mark.parametrize("window, scale_lens", [
    (0, (1, 4, 9, 16)), (1, (1, 4, 9, 16, 3)), (2, (2, 5, 9, 16, 1)),
    (0, (20, 20, 7)),  # rows whose first visited tile holds nothing they may see
])
def test_window_matches_dense_windowed_mask(window, scale_lens):
    q, k, v = qkv(1, 2, sum(scale_lens), 16)
    check_against_dense(q, k, v, scale_lens, window=window)


@pytest.mark.parametrize("blocks", [(16, 32), (32, 16), (64, 16)])
def test_block_shapes(blocks):
    """The launchers with explicit tile shapes (BLOCK_M != BLOCK_N, tiles longer than L)."""
    scale_lens, D = (1, 4, 9, 16, 25), 16
    q, k, v = (t.detach() for t in qkv(1, 2, sum(scale_lens), D))
    sid, off = kernels.scale_layout(scale_lens, q.device)
    out, lse = kernels.forward(q, k, v, sid, sid, off, 0.25, len(scale_lens), blocks=blocks)
    grad_out = torch.randn_like(out)
    grads = attention_backward.backward(grad_out, q, k, v, out, lse, sid, sid, off, off, 0.25, len(scale_lens),
                             blocks=blocks)
    want = dense_reference(q, k, v, reference.scale_causal_mask(scale_lens, DEVICE), 0.25, grad_out)
    for g, w in zip((out, *grads), want):
        assert rel_err(g, w) <= 1e-5
    # the saved log-sum-exp is base 2
    s = (q.double() @ k.double().transpose(-1, -2)) * 0.25
    s = s.masked_fill(~reference.scale_causal_mask(scale_lens, DEVICE), float("-inf"))
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1) / torch.log(torch.tensor(2.0)))


def nan_outside(t, keep: slice):
    bad = torch.full_like(t, float("nan"))
    bad[:, :, keep] = t[:, :, keep]
    return bad


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN flows through the other rows
@pytest.mark.parametrize("window", [None, 0])
def test_tiles_outside_the_mask_are_never_read(window):
    """Scales aligned to 16-token tiles: no tile straddles a boundary, so a tile outside the
    visible range is skipped, not masked; NaN there must not leak into any result."""
    scale_lens, blocks = (16, 16, 32), (16, 16)
    w = 3 if window is None else window
    seen_by = {None: [slice(0, 16), slice(0, 32), slice(0, 64)],  # keys each query scale sees
               0: [slice(0, 16), slice(16, 32), slice(32, 64)]}[window]
    seeing = {None: [slice(0, 64), slice(16, 64), slice(32, 64)],  # queries each key scale is seen by
              0: [slice(0, 16), slice(16, 32), slice(32, 64)]}[window]
    q, k, v = (t.detach() for t in qkv(1, 1, 64, 16))
    sid, off = kernels.scale_layout(scale_lens, q.device)
    out, lse = kernels.forward(q, k, v, sid, sid, off, 0.25, w, blocks=blocks)
    grad_out = torch.randn_like(out)
    dq, dk, dv = attention_backward.backward(grad_out, q, k, v, out, lse, sid, sid, off, off, 0.25, w,
                                  blocks=blocks)
    for rows, keys in zip([slice(0, 16), slice(16, 32), slice(32, 64)], seen_by):
        k_bad, v_bad = nan_outside(k, keys), nan_outside(v, keys)
        out_s, lse_s = kernels.forward(q, k_bad, v_bad, sid, sid, off, 0.25, w, blocks=blocks)
        torch.testing.assert_close(out_s[:, :, rows], out[:, :, rows])
        dq_s, _, _ = attention_backward.backward(grad_out, q, k_bad, v_bad, out, lse, sid, sid, off, off,
                                      0.25, w, blocks=blocks)
        torch.testing.assert_close(dq_s[:, :, rows], dq[:, :, rows])
    for keys, queries in zip([slice(0, 16), slice(16, 32), slice(32, 64)], seeing):
        q_bad, do_bad = nan_outside(q, queries), nan_outside(grad_out, queries)
        _, dk_s, dv_s = attention_backward.backward(do_bad, q_bad, k, v, out, lse, sid, sid, off, off, 0.25, w,
                                         blocks=blocks)
        torch.testing.assert_close(dk_s[:, :, keys], dk[:, :, keys])
        torch.testing.assert_close(dv_s[:, :, keys], dv[:, :, keys])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("cached", [False, True])
def test_overflowing_scores_give_nan_as_softmax_does(cached):
    """A row whose every visible score is -inf (an infinite input, not the mask) has no
    softmax: the kernel must return NaN there, as the float64 reference does, not 0; rows
    with a +inf score are NaN too, and every other row stays exact."""
    scale_lens, D = (1, 4, 9), 16
    q, k, v = (t.detach() for t in qkv(1, 2, 14, D))
    k[..., 3] = -k[..., 3].abs() - 0.5  # every key negative in one component
    q[0, 0, 6, 3] = float("inf")        # -> every score of this row is -inf
    q[0, 1, 9, 3] = -float("inf")       # -> every score of this row is +inf
    with ops.use_backend("kernel"):
        if cached:
            got = ops.cached_attention(q[:, :, 5:], k, v)
            want = (q[:, :, 5:].double() @ k.double().transpose(-1, -2) / D ** 0.5).softmax(-1) @ v.double()
        else:
            got = ops.scale_causal_attention(q, k, v, scale_lens)
            s = (q.double() @ k.double().transpose(-1, -2)) / D ** 0.5
            mask = reference.scale_causal_mask(scale_lens, DEVICE)
            want = s.masked_fill(~mask, float("-inf")).softmax(-1) @ v.double()
    assert want.isnan().any(dim=-1).sum() == 2  # the two poisoned rows, nothing else
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5, equal_nan=True)


def far_below_zero(B, H, L, D, dtype, Lk=None, depth=200.0):
    """q, k, v whose every score sits near -depth (natural-log units) with O(1) spread: each
    query points against every key along one shared direction."""
    u = torch.full((D,), D ** -0.5, device=DEVICE)
    c = (depth * D ** 0.5) ** 0.5  # q.k * D^-0.5 ~ -c^2 * D^-0.5 = -depth
    q = -c * u + 0.3 * torch.randn(B, H, L, D, device=DEVICE)
    k = c * u + 0.05 * torch.randn(B, H, Lk or L, D, device=DEVICE)
    v = torch.randn(B, H, Lk or L, D, device=DEVICE)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("path", ["full", "window", "cached"])
def test_scores_far_below_zero_match_float64(dtype, path):
    """Every visible score near -200 (-289 in the kernels' log2 units): softmax is still
    defined, and the running max must follow the scores down, not stop at 0 after a tile
    the row cannot see (exp2 of -289 underflows, so a floored max gives 0 / 0)."""
    # window 0 over (20, 20, 7): rows of scale 1 first visit a key tile they cannot see at all
    # (what the floor at 0 then broke); without a window every row sees key 0 in its first tile
    scale_lens, D = ((20, 20, 7) if path == "window" else (1, 4, 9, 16)), 16
    L = sum(scale_lens)
    q, k, v = far_below_zero(1, 2, 9 if path == "cached" else L, D, dtype, Lk=L if path == "cached" else None)
    with ops.use_backend("kernel"):
        if path == "cached":
            out = ops.cached_attention(q, k, v)
        else:
            out = ops.scale_causal_attention(q, k, v, scale_lens, window=0 if path == "window" else None)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    mask = {"full": reference.scale_causal_mask(scale_lens, DEVICE), "window": window_mask(scale_lens, 0),
            "cached": None}[path]
    want = dense_reference(q, k, v, mask, None, grad_out)
    # judged against torch's own error in this dtype; dQ sums huge keys that nearly cancel
    # (sum_j dS_ij = 0), so the fp32 log-sum-exp's rounding at |lse| ~ 289 (ulp 3e-5) shows
    # there as ~1e-3 of |dQ|; the bug this guards gives NaN
    eager_out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    eager = (eager_out, *torch.autograd.grad(eager_out, (q, k, v), grad_out))
    for name, g, w, e in zip(("out", "dq", "dk", "dv"), (out, *grads), want, eager):
        assert torch.isfinite(g).all(), f"{name}: non-finite values"
        tol = max(1e-5, 2 * rel_err(e, w), 2e-3 if name == "dq" else 0.0)
        assert rel_err(g, w) <= tol, f"{name}: rel. error {rel_err(g, w):.2e} > {tol:.1e}"


def test_cached_attention_equals_full_attention_over_prefix():
    scale_lens = (1, 4, 9, 16)
    q, k, v = (t.detach() for t in qkv(2, 2, 30, 32))
    with ops.use_backend("kernel"):
        full = ops.scale_causal_attention(q, k, v, scale_lens)
        start = 0
        for n in scale_lens:  # as the sampler runs: scale by scale against the growing cache
            end = start + n
            step = ops.cached_attention(q[:, :, start:end], k[:, :, :end], v[:, :, :end])
            assert rel_err(step, full[:, :, start:end]) <= 1e-5
            start = end


def test_cached_attention_gradients_match_sdpa():
    q, k, v = qkv(1, 2, 9, 16, Lk=23)
    with ops.use_backend("kernel"):
        out = ops.cached_attention(q, k, v, softmax_scale=1.0)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    for g, w in zip((out, *grads), dense_reference(q, k, v, None, 1.0, grad_out)):
        assert rel_err(g, w) <= 1e-5


def test_fp16_error_within_twice_torch_own():
    scale_lens = (1, 4, 9, 16)
    q, k, v = (t.detach() for t in qkv(1, 2, 30, 32, dtype=torch.float16))
    with ops.use_backend("kernel"):
        out = ops.scale_causal_attention(q, k, v, scale_lens)
    mask = reference.scale_causal_mask(scale_lens, DEVICE)
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
    torch_own = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert rel_err(out, exact) <= 2 * rel_err(torch_own, exact)


@pytest.mark.parametrize("dtype", [
    torch.float16,  # the interpreter runs fp16: small shapes on the CPU
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(not ON_GPU, reason="bf16 needs a GPU (Triton's "
                                                                             "interpreter has no bf16)"))])
@pytest.mark.parametrize("D", [64, 128])
def test_half_precision_no_worse_than_eager(D, dtype):
    scale_lens = (1, 4, 9, 16, 25, 36, 64, 100, 169, 256) if ON_GPU else (1, 4, 9)
    mask = reference.scale_causal_mask(scale_lens, DEVICE)
    q, k, v = qkv(2, 4 if ON_GPU else 2, sum(scale_lens), D, dtype=dtype, model_layout=True)
    with ops.use_backend("kernel"):  # the kernel, also on the CPU (interpreter)
        out = ops.scale_causal_attention(q, k, v, scale_lens)
        grad_out = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
    exact = dense_reference(q, k, v, mask, None, grad_out)
    own_out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    own = (own_out, *torch.autograd.grad(own_out, (q, k, v), grad_out))
    for name, g, o, w in zip(("out", "dq", "dk", "dv"), (out, *grads), own, exact):
        assert rel_err(g, w) <= 2 * rel_err(o, w), name


def test_torch_compile_fullgraph_and_opcheck():
    from sar_fast.ops.attention import _attention_fwd
    scale_lens = [1, 4, 9]
    q, k, v = qkv(1, 2, 14, 16)
    with ops.use_backend("kernel"):
        lay = ops.scale_layout(scale_lens, q.device)
        torch.library.opcheck(_attention_fwd, (q, k, v, lay.sid, lay.sid, lay.off, lay.off, 0.25, 3, False))
        loss_fn = torch.compile(lambda q, k, v: ops.scale_causal_attention(q, k, v, scale_lens).square().sum(),
                                backend="aot_eager", fullgraph=True)
        loss_fn(q, k, v).backward()
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    reference.scale_causal_attention(q64, k64, v64, scale_lens).square().sum().backward()
    assert rel_err(q.grad, q64.grad) <= 1e-5 and rel_err(v.grad, v64.grad) <= 1e-5


def test_auto_backend_on_cpu_is_the_reference():
    if ON_GPU:
        pytest.skip("auto picks Triton on a GPU")
    q, k, v = (t.detach() for t in qkv(1, 2, 14, 8))  # D = 8: no kernel, but the reference runs
    torch.testing.assert_close(ops.scale_causal_attention(q, k, v, (1, 4, 9)),
                               reference.scale_causal_attention(q, k, v, (1, 4, 9)), rtol=0, atol=0)


@pytest.mark.parametrize("make, err, msg", [
    (lambda: (qkv(1, 2, 14, 16), (1, 4, 8)), ValueError, "sum to 13"),
    (lambda: ([torch.randn(1, 2, 14, 16), torch.randn(1, 2, 13, 16), torch.randn(1, 2, 14, 16)],
              (1, 4, 9)), ValueError, "k must have shape"),
    (lambda: ([torch.randn(1, 2, 14, 16), torch.randn(1, 2, 14, 16), torch.randn(1, 2, 14, 32)],
              (1, 4, 9)), ValueError, "v must have shape"),
    (lambda: ([torch.randn(1, 2, 14, 8)] * 3, (1, 4, 9)), ValueError, "head dims"),
    (lambda: ([torch.randn(1, 2, 14, 48)] * 3, (1, 4, 9)), ValueError, "got 48"),
    (lambda: ([torch.randn(1, 2, 14, 16).double()] * 3, (1, 4, 9)), TypeError, "q must have dtype"),
    (lambda: ([torch.randn(1, 2, 14, 16), torch.randn(1, 2, 14, 16).half(), torch.randn(1, 2, 14, 16)],
              (1, 4, 9)), TypeError, "k must have dtype"),
    (lambda: ([torch.randn(1, 2, 14, 16)] * 3, (1, 0, 13)), ValueError, "positive"),
])
def test_bad_input(make, err, msg):
    (q, k, v), scale_lens = make()
    with ops.use_backend("kernel"), pytest.raises(err, match=msg):
        ops.scale_causal_attention(q, k, v, scale_lens)


def test_bad_options():
    q = torch.randn(1, 2, 14, 16)
    with pytest.raises(ValueError, match="window"):
        ops.scale_causal_attention(q, q, q, (1, 4, 9), window=-1)
    with pytest.raises(ValueError, match="softmax_scale"):
        ops.scale_causal_attention(q, q, q, (1, 4, 9), softmax_scale=-0.5)
    with pytest.raises(ValueError, match="k must have shape"):
        ops.cached_attention(q, torch.randn(1, 2, 20, 32), torch.randn(1, 2, 20, 32))
    if not ON_GPU:
        with ops.use_backend("kernel"), pytest.raises(TypeError, match="bfloat16"):
            ops.scale_causal_attention(q.bfloat16(), q.bfloat16(), q.bfloat16(), (1, 4, 9))


@pytest.mark.parametrize("query_side", [True, False])
@pytest.mark.parametrize("window", [0, 2, 9])
def test_tile_runs_cover_the_mask_exactly(query_side, window):
    """tile_runs (the kernels' own range arithmetic, also behind bench/modeled_work.py) against
    the dense mask: the visited tiles hold every visible pair, the unmasked run only fully
    visible tiles, and every tile left out is fully invisible."""
    scale_lens = [1, 4, 9, 16, 25, 7, 30]
    block_m, block_n = (16, 32) if query_side else (32, 16)
    mask = window_mask(scale_lens, window).cpu()
    if not query_side:
        mask = mask.t()  # rows: key tokens, columns: the query tokens dK/dV visits
    L = mask.shape[0]
    tile, step = (block_m, block_n) if query_side else (block_n, block_m)
    runs = kernels.tile_runs(scale_lens, window, block_m, block_n, query_side)
    assert runs.shape == (-(-L // tile), 4)
    for t, (lo, full_lo, full_hi, hi) in enumerate(runs.tolist()):
        rows = mask[t * tile:(t + 1) * tile]
        visited = torch.zeros(L, dtype=torch.bool)
        for start, stop in ((lo, full_lo), (full_lo, full_hi), (full_hi, hi)):
            for c in range(start, stop, step):
                visited[c:c + step] = True
        assert not rows[:, ~visited].any(), f"tile {t}: a visible pair outside the runs {lo, full_lo, full_hi, hi}"
        for c in range(full_lo, full_hi, step):
            assert rows[:, c:c + step].all(), f"tile {t}: tile at {c} in the unmasked run is not fully visible"
