"""Fused head + CE / KL (kernels/cross_entropy.py) against float64 PyTorch and the references.

On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py) with 16 x 32 x 16 tiles,
so N = 37, V = 75, C = 40 leave partial tiles along every axis. Every kernel output is
allocated with NaN first (POISON_OUTPUTS), so an element a kernel skips fails a comparison (on
a GPU poisoned again after the autotuner's first call, which writes every config into them).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import need_module

need_module("triton")

from sar_fast import ops  # noqa: E402
from sar_fast.ops import reference  # noqa: E402
from sar_fast.ops.cross_entropy import fused_linear_cross_entropy, fused_linear_kl_div  # noqa: E402

N, V = 37, 75
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


@pytest.fixture(autouse=True)
def kern(monkeypatch):
    from sar_fast.kernels import cross_entropy as k
    monkeypatch.setattr(k, "POISON_OUTPUTS", True)
    with ops.use_backend("kernel"):
        yield k


def _inputs(C=40, bias=True, dtype=torch.float32, n=N, v=V):
    h = torch.randn(n, C, device=DEVICE).to(dtype).requires_grad_()
    w = (0.3 * torch.randn(v, C, device=DEVICE)).to(dtype).requires_grad_()
    b = (0.5 * torch.randn(v, device=DEVICE)).to(dtype).requires_grad_() if bias else None
    return h, w, b


def _reduce(per_token, w, reduction):
    return {"none": per_token, "sum": per_token.sum(), "mean": per_token.sum() / w.sum()}[reduction]


def _ce64(h, w, b, target, tw, eps, ignore_index, reduction):
    logits = F.linear(h.double(), w.double(), None if b is None else b.double())
    ce = F.cross_entropy(logits, target.long(), ignore_index=ignore_index, label_smoothing=eps, reduction="none")
    valid = target != ignore_index
    wt = torch.ones_like(ce) if tw is None else tw.double()
    wt = torch.where(valid, wt, torch.zeros_like(wt))
    return _reduce(ce * wt, wt, reduction)


def _kl64(h, w, b, teacher_logits, teacher_hidden, tw, reduction, temperature):
    b64 = None if b is None else b.double()
    logp_s = (F.linear(h.double(), w.double(), b64) / temperature).log_softmax(-1)
    with torch.no_grad():
        t = teacher_logits.double() if teacher_logits is not None else F.linear(teacher_hidden.double(),
                                                                              w.double(), b64)
        logp_t = (t / temperature).log_softmax(-1)
    terms = logp_t.exp() * (logp_t - logp_s)
    kl = torch.where(logp_t.exp() > 0, terms, torch.zeros_like(terms)).sum(-1)
    wt = torch.ones_like(kl) if tw is None else tw.double()
    return _reduce(kl * wt, wt, reduction)


def _leaves64(*ts):
    return [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in ts]


def _close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5, what: str = ""):
    """Max error within rel * max|want| (fp32 accuracy against float64)."""
    assert got.shape == want.shape, what
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert torch.isfinite(got).all(), f"{what}: non-finite values {got}"
    scale = max(want.abs().max().item(), 1e-3)
    err = (got - want).abs().max().item()
    assert err <= rel * scale, f"{what}: max error {err:.3g} > {rel:g} * {scale:.3g}"


def _grads(loss, tensors):
    grads = torch.autograd.grad(loss.sum(), [t for t in tensors if t is not None and t.requires_grad])
    it = iter(grads)
    return [next(it) if t is not None and t.requires_grad else None for t in tensors]


# ------------------------------------------------------------------------------------------
# hard-target cross-entropy
# ------------------------------------------------------------------------------------------
CE_CASES = [  # (label_smoothing, token weights, bias, ignore_index or None, C)
    (0.0, False, False, None, 40),
    (0.0, True, True, -100, 32),
    (0.2, False, True, -100, 40),
    (0.2, True, False, None, 32),
    (0.1, True, True, 5, 40),  # an ignore_index inside the vocabulary
]


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("eps, weighted, with_bias, ignore, C", CE_CASES)
def test_ce_loss_and_grads_match_float64(reduction, eps, weighted, with_bias, ignore, C):
    h, w, b = _inputs(C, with_bias)
    target = torch.randint(0, V, (N,), device=DEVICE)
    ignore_index = -100 if ignore is None else ignore
    if ignore is not None:
        target[::5] = ignore
    if ignore == 5:
        target = target.int()  # int32 targets are accepted too
    tw = torch.rand(N, device=DEVICE).requires_grad_() if weighted else None
    loss = ops.fused_linear_cross_entropy(h, w, b, target, tw, eps, ignore_index, reduction)
    h64, w64, b64, tw64 = _leaves64(h, w, b, tw)
    want = _ce64(h64, w64, b64, target, tw64, eps, ignore_index, reduction)
    _close(loss, want, what="loss")
    for name, got, exp in zip(("hidden", "weight", "bias", "token_weight"),
                              _grads(loss, [h, w, b, tw]), _grads(want, [h64, w64, b64, tw64])):
        if exp is not None:
            _close(got, exp, what=f"grad {name}")


def test_stats_equal_reference():
    h, w, b = _inputs()
    target = torch.randint(0, V, (N,), device=DEVICE)
    target[3] = -100
    tw = torch.rand(N, device=DEVICE)
    loss, (ce, amax, lse) = fused_linear_cross_entropy(h, w, b, target, tw, 0.1, return_stats=True)
    rloss, (rce, ramax, rlse) = reference.linear_cross_entropy(h, w, b, target, tw, 0.1, return_stats=True)
    torch.testing.assert_close(loss, rloss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ce, rce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, rlse, rtol=1e-5, atol=1e-6)
    assert torch.equal(amax, ramax) and amax.dtype == torch.long
    assert ce[3] == 0 and not (ce.requires_grad or lse.requires_grad)


@pytest.mark.parametrize("splits", [1, 3])
def test_argmax_ties_pick_lowest_index(kern, splits):
    # zero hidden: logits = bias, whose maximum sits at 9, 40 and 70 (different tiles and splits)
    h = torch.zeros(N, 32, device=DEVICE)
    w = torch.randn(V, 32, device=DEVICE)
    b = torch.randn(V, device=DEVICE)
    b[[9, 40, 70]] = b.max() + 1.0
    target = torch.randint(0, V, (N,), device=DEVICE)
    _, _, amax = kern.ce_forward(h, w, b, target, 0.0, -100, splits=splits)
    assert (amax == 9).all()
    assert torch.equal(amax, F.linear(h, w, b).argmax(-1))


@pytest.mark.parametrize("splits", [2, 5])
def test_vocab_splits_agree(kern, splits):
    h, w, b = (t.detach() for t in _inputs())
    target = torch.randint(0, V, (N,), device=DEVICE)
    ce1, lse1, am1 = kern.ce_forward(h, w, b, target, 0.15, -100, splits=1)
    ces, lses, ams = kern.ce_forward(h, w, b, target, 0.15, -100, splits=splits)
    torch.testing.assert_close(ces, ce1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lses, lse1, rtol=1e-5, atol=1e-6)
    assert torch.equal(ams, am1)
    teacher = torch.randn(N, V, device=DEVICE)
    kl1 = kern.kl_forward(h, w, b, teacher, None, 1.5, splits=1)
    kls = kern.kl_forward(h, w, b, teacher, None, 1.5, splits=splits)
    for a, c in zip(kls, kl1):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


def test_backward_in_several_chunks(kern, monkeypatch):
    monkeypatch.setattr(kern, "WORKSPACE_BYTES", 16 * V * 4)  # 16 rows per chunk: 3 chunks for N = 37
    assert kern._chunk_rows(N, V, 4) == 16
    h, w, b = _inputs()
    target = torch.randint(0, V, (N,), device=DEVICE)
    loss = fused_linear_cross_entropy(h, w, b, target, label_smoothing=0.1)
    h64, w64, b64 = _leaves64(h, w, b)
    want = _ce64(h64, w64, b64, target, None, 0.1, -100, "mean")
    for got, exp in zip(_grads(loss, [h, w, b]), _grads(want, [h64, w64, b64])):
        _close(got, exp)


def test_frozen_head_and_no_grad_do_no_gradient_work(kern, monkeypatch):
    h, w, b = _inputs()
    w.requires_grad_(False)
    b.requires_grad_(False)
    target = torch.randint(0, V, (N,), device=DEVICE)

    def no_weight_grad(*args, **kwargs):
        raise AssertionError("dW computed for a frozen head")
    monkeypatch.setattr(kern, "_add_matmul", no_weight_grad)
    loss = fused_linear_cross_entropy(h, w, b, target)
    (gh,) = torch.autograd.grad(loss, [h])
    h64 = h.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(_ce64(h64, w, b, target, None, 0.0, -100, "mean"), [h64])
    _close(gh, want)

    def no_backward(*args, **kwargs):
        raise AssertionError("backward work in a no-grad call")
    monkeypatch.setattr(kern, "head_backward", no_backward)
    with torch.no_grad():
        loss = fused_linear_cross_entropy(h, w.requires_grad_(), b, target)
    assert loss.grad_fn is None and torch.isfinite(loss)


def test_mixed_dtypes_promote_like_the_reference():
    h = torch.randn(N, 32, device=DEVICE).half()
    w = 0.3 * torch.randn(V, 32, device=DEVICE)
    target = torch.randint(0, V, (N,), device=DEVICE)
    got = fused_linear_cross_entropy(h, w, None, target, reduction="none")
    torch.testing.assert_close(got, reference.linear_cross_entropy(h, w, None, target, reduction="none"),
                               rtol=1e-5, atol=1e-5)


def test_empty_batch():
    h, w, b = _inputs(n=0)
    target = torch.zeros(0, dtype=torch.long, device=DEVICE)
    assert fused_linear_cross_entropy(h, w, b, target, reduction="none").shape == (0,)
    loss = fused_linear_cross_entropy(h, w, b, target, reduction="sum")
    loss.backward()
    assert loss.item() == 0 and h.grad.shape == (0, 40) and (w.grad == 0).all()


def test_fp16_no_worse_than_eager():
    h, w, b = _inputs(40, True, torch.float16)
    target = torch.randint(0, V, (N,), device=DEVICE)
    h64, w64, b64 = _leaves64(h, w, b)
    want = _ce64(h64, w64, b64, target, None, 0.1, -100, "mean")
    eager = F.cross_entropy(F.linear(h, w, b).float(), target, label_smoothing=0.1)
    fused = fused_linear_cross_entropy(h, w, b, target, label_smoothing=0.1)
    assert (fused.double() - want).abs() <= 2 * (eager.double() - want).abs() + 1e-6
    for got, ref, exp in zip(_grads(fused, [h, w, b]), _grads(eager, [h, w, b]), _grads(want, [h64, w64, b64])):
        assert got.dtype == torch.float16
        assert (got.double() - exp).norm() <= 2 * (ref.double() - exp).norm() + 1e-6


@pytest.mark.parametrize("dtype", [
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(not ON_GPU, reason="bf16 needs a GPU: Triton's "
                                                                             "interpreter has no bf16")),
    torch.float16])  # the interpreter runs fp16: small shapes on the CPU
def test_half_precision_no_worse_than_eager(kern, monkeypatch, dtype):
    n, v, C = (1000, 4096, 256) if ON_GPU else (64, 512, 32)
    h, w, b = _inputs(C, True, dtype, n=n, v=v)
    target = torch.randint(0, v, (n,), device=DEVICE)
    h64, w64, b64 = _leaves64(h, w, b)
    want = _ce64(h64, w64, b64, target, None, 0.1, -100, "mean")
    want_g = _grads(want, [h64, w64, b64])
    eager = F.cross_entropy(F.linear(h, w, b).float(), target, label_smoothing=0.1)
    eager_g = _grads(eager, [h, w, b])
    monkeypatch.setattr(kern, "WORKSPACE_BYTES", 256 * v * 2)  # 4 backward chunks
    fused = fused_linear_cross_entropy(h, w, b, target, label_smoothing=0.1)
    fused_g = _grads(fused, [h, w, b])
    assert (fused.double() - want).abs() <= 2 * (eager.double() - want).abs() + 1e-5
    for got, ref, exp in zip(fused_g, eager_g, want_g):
        assert (got.double() - exp).norm() <= 2 * (ref.double() - exp).norm() + 1e-6


# ------------------------------------------------------------------------------------------
# soft targets: KL(p_teacher || p_student)
# ------------------------------------------------------------------------------------------
@pytest.mark.skipif(not ON_GPU, reason="bf16 needs a GPU: Triton's interpreter has no bf16")
@pytest.mark.parametrize("teacher", ["logits", "hidden"])
def test_kl_bf16_on_gpu_no_worse_than_eager(teacher):
    n, v, C = 1000, 4096, 256
    h, w, b = _inputs(C, True, torch.bfloat16, n=n, v=v)
    t_logits = torch.randn(n, v, device=DEVICE) if teacher == "logits" else None
    t_hidden = torch.randn(n, C, device=DEVICE).bfloat16() if teacher == "hidden" else None
    h64, w64, b64 = _leaves64(h, w, b)
    want = _kl64(h64, w64, b64, t_logits, t_hidden, None, "mean", 2.0)
    want_g = _grads(want, [h64, w64, b64])
    with torch.no_grad():  # eager: bf16 head, fp32 softmax
        t = t_logits if t_logits is not None else F.linear(t_hidden, w, b).float()
        logp_t = (t / 2.0).log_softmax(-1)
    eager = (logp_t.exp() * (logp_t - (F.linear(h, w, b).float() / 2.0).log_softmax(-1))).sum(-1).mean()
    eager_g = _grads(eager, [h, w, b])
    fused = fused_linear_kl_div(h, w, b, t_logits, t_hidden, temperature=2.0)
    fused_g = _grads(fused, [h, w, b])
    assert (fused.double() - want).abs() <= 2 * (eager.double() - want).abs() + 1e-5
    for got, ref, exp in zip(fused_g, eager_g, want_g):
        assert (got.double() - exp).norm() <= 2 * (ref.double() - exp).norm() + 1e-6


@pytest.mark.parametrize("teacher, reduction, temperature, with_bias, weighted", [
    ("logits", "mean", 1.0, True, False),
    ("logits", "none", 2.5, False, True),
    ("hidden", "sum", 1.0, False, True),
    ("hidden", "mean", 0.7, True, True),
])
def test_kl_matches_float64_and_reference(teacher, reduction, temperature, with_bias, weighted):
    h, w, b = _inputs(40, with_bias)
    tw = torch.rand(N, device=DEVICE) if weighted else None
    t_logits = (2.0 * torch.randn(N, V, device=DEVICE)).requires_grad_() if teacher == "logits" else None
    t_hidden = torch.randn(N, 40, device=DEVICE).requires_grad_() if teacher == "hidden" else None
    loss = fused_linear_kl_div(h, w, b, t_logits, t_hidden, tw, reduction, temperature)
    h64, w64, b64 = _leaves64(h, w, b)
    want = _kl64(h64, w64, b64, t_logits, t_hidden, tw, reduction, temperature)
    _close(loss, want, what="loss")
    ref = reference.linear_kl_div(h, w, b, t_logits, t_hidden, tw, reduction, temperature)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for name, got, exp in zip(("hidden", "weight", "bias"), _grads(loss, [h, w, b]),
                              _grads(want, [h64, w64, b64])):
        if exp is not None:
            _close(got, exp, what=f"grad {name}")
    teacher_t = t_logits if t_logits is not None else t_hidden
    loss = fused_linear_kl_div(h, w, b, t_logits, t_hidden, tw, reduction, temperature)
    loss.sum().backward()
    assert teacher_t.grad is None  # the teacher side is detached


def test_kl_teacher_with_filtered_vocabulary():
    h, w, b = _inputs()
    t_logits = torch.randn(N, V, device=DEVICE)
    t_logits[:, 10:60] = float("-inf")  # a top-k filtered teacher, whole tiles included
    loss = fused_linear_kl_div(h, w, b, target_logits=t_logits, reduction="none")
    h64, w64, b64 = _leaves64(h, w, b)
    want = _kl64(h64, w64, b64, t_logits, None, None, "none", 1.0)
    _close(loss, want)
    for got, exp in zip(_grads(loss, [h, w, b]), _grads(want, [h64, w64, b64])):
        _close(got, exp)


FILTERED = 128  # -inf student logits over the first 128 columns: a whole first tile on any config


def _filtered_head(v=300):
    """A head whose bias is -inf over the first FILTERED columns (a filtered vocabulary)."""
    h, w, b = _inputs(v=v)
    with torch.no_grad():
        b[:FILTERED] = float("-inf")
    return h, w, b


def test_ce_student_row_starting_with_filtered_tiles():
    """Every student logit of the first vocabulary tile(s) is -inf: the online log-sum-exp must
    not form -inf - -inf (NaN) before it meets a finite logit."""
    v = 300
    h, w, b = _filtered_head(v)
    target = torch.randint(FILTERED, v, (N,), device=DEVICE)
    loss = ops.fused_linear_cross_entropy(h, w, b, target, reduction="none")
    h64, w64, b64 = _leaves64(h, w, b)
    want = _ce64(h64, w64, b64, target, None, 0.0, -100, "none")
    _close(loss, want, what="loss")
    for name, got, exp in zip(("hidden", "weight", "bias"), _grads(loss.sum(), [h, w, b]),
                              _grads(want.sum(), [h64, w64, b64])):
        _close(got, exp, what=f"grad {name}")


@pytest.mark.parametrize("teacher", ["logits", "hidden"])
def test_kl_student_row_starting_with_filtered_tiles(teacher):
    """As above for the KL; the teacher filters the same columns (else KL is infinite)."""
    v = 300
    h, w, b = _filtered_head(v)
    t_hidden = torch.randn(N, h.shape[1], device=DEVICE)
    t_logits = F.linear(t_hidden, w.detach(), b.detach()) if teacher == "logits" else None
    t_hidden = t_hidden if teacher == "hidden" else None
    loss = fused_linear_kl_div(h, w, b, target_logits=t_logits, target_hidden=t_hidden, reduction="none")
    h64, w64, b64 = _leaves64(h, w, b)
    want = _kl64(h64, w64, b64, t_logits, t_hidden, None, "none", 1.0)
    _close(loss, want, what="loss")
    for name, got, exp in zip(("hidden", "weight", "bias"), _grads(loss.sum(), [h, w, b]),
                              _grads(want.sum(), [h64, w64, b64])):
        _close(got, exp, what=f"grad {name}")


def test_kl_to_itself_is_zero():
    h, w, b = _inputs()
    loss = fused_linear_kl_div(h, w, b, target_hidden=h.detach(), reduction="none")
    assert loss.abs().max() < 1e-5
    gh, gw, gb = _grads(loss, [h, w, b])
    assert max(g.abs().max().item() for g in (gh, gw, gb)) < 1e-6


# ------------------------------------------------------------------------------------------
# torch.library registration and input validation
# ------------------------------------------------------------------------------------------
def test_custom_ops_pass_opcheck():
    h, w, b = _inputs(32, n=20, v=40)
    target = torch.randint(0, 40, (20,), device=DEVICE)
    torch.library.opcheck(torch.ops.sar_fast.linear_cross_entropy_fwd.default, (h, w, b, target, 0.1, -100),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    teacher = torch.randn(20, 40, device=DEVICE)
    torch.library.opcheck(torch.ops.sar_fast.linear_kl_div_fwd.default, (h, w, None, teacher, None, 1.0),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_works_under_torch_compile():
    h, w, b = _inputs(32, n=20, v=40)
    target = torch.randint(0, 40, (20,), device=DEVICE)

    def step(h, w, b):
        return fused_linear_cross_entropy(h, w, b, target, label_smoothing=0.1)
    compiled = torch.compile(step, backend="aot_eager")
    got = _grads(compiled(h, w, b), [h, w, b])
    want = _grads(step(h, w, b), [h, w, b])
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c)


@pytest.mark.parametrize("kwargs, err, msg", [
    (dict(target=torch.full((5,), 7)), ValueError, r"target must lie in \[0, 7\)"),
    (dict(target=torch.full((5,), -1)), ValueError, r"target must lie in \[0, 7\)"),
    (dict(weight=torch.randn(7, 3)), ValueError, "weight must have shape"),
    (dict(bias=torch.randn(6)), ValueError, "bias must have shape"),
    (dict(target=torch.zeros(4, dtype=torch.long)), ValueError, "target must have shape"),
    (dict(target=torch.zeros(5)), TypeError, "target must have dtype"),
    (dict(hidden=torch.randn(5, 4).double()), TypeError, "hidden must have dtype"),
    (dict(token_weight=torch.rand(6)), ValueError, "token_weight must have shape"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(label_smoothing=1.0), ValueError, "label_smoothing"),
    (dict(hidden=torch.randn(5)), ValueError, "hidden must have 2 dims"),
])
def test_ce_bad_input(kwargs, err, msg):
    args = dict(hidden=torch.randn(5, 4), weight=torch.randn(7, 4), bias=None, target=torch.randint(0, 7, (5,)))
    args.update(kwargs)
    with pytest.raises(err, match=msg):
        fused_linear_cross_entropy(**args)


@pytest.mark.parametrize("kwargs, err, msg", [
    (dict(), ValueError, "exactly one of target_logits"),
    (dict(target_logits=torch.randn(5, 7), target_hidden=torch.randn(5, 4)), ValueError, "exactly one"),
    (dict(target_logits=torch.randn(5, 6)), ValueError, "target_logits must have shape"),
    (dict(target_hidden=torch.randn(5, 3)), ValueError, "target_hidden must have shape"),
    (dict(target_logits=torch.randint(0, 3, (5, 7))), TypeError, "target_logits must have dtype"),
    (dict(target_logits=torch.randn(5, 7), temperature=0.0), ValueError, "temperature"),
    (dict(target_logits=torch.randn(5, 7), temperature="2"), TypeError, "temperature"),
    (dict(target_logits=torch.randn(5, 7), reduction="max"), ValueError, "reduction"),
])
def test_kl_bad_input(kwargs, err, msg):
    with pytest.raises(err, match=msg):
        fused_linear_kl_div(torch.randn(5, 4), torch.randn(7, 4), None, **kwargs)
