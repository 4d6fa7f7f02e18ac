"""Every Triton op against float64 in bf16 and fp16, forward and backward, at a small shape
and at FlexVAR-d16 shapes: the GPU correctness step of bench/gpu_first.sh (selected by the
gpu_first marker, tests/conftest.py). On the CPU the fp16 small cases run under Triton's
interpreter; bf16 (the interpreter has none) and the d16 shapes (minutes there) skip.

Criterion: the kernel's relative error (Frobenius norm) against float64 is at most twice
eager PyTorch's own in the same dtype, plus a floor at the dtype's rounding. Each case runs
once to warm up (on a GPU the first call autotunes, timing every config into the same
output buffers, which would hide an unwritten element), then again on NaN-poisoned outputs.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

from conftest import need_module

need_module("triton")

from sar_fast import ops  # noqa: E402
from sar_fast.kernels import attention as attention_kernels  # noqa: E402
from sar_fast.kernels import cross_entropy as cross_entropy_kernels  # noqa: E402
from sar_fast.ops import reference  # noqa: E402
from sar_fast.schedules import STANDARD_SCHEDULE, total_length  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.skipif(
    not ON_GPU, reason="bf16 needs a GPU: Triton's interpreter has no bf16"))]
SIZES = ["small", pytest.param("d16", marks=pytest.mark.skipif(
    not ON_GPU, reason="d16 shapes need a GPU (minutes under the interpreter)"))]
ROUNDING = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
D16_LENS = tuple(s * s for s in STANDARD_SCHEDULE)  # L 680
D16_V, D16_C, D16_CODE = 8912, 1024, 32


def rel(got: torch.Tensor, exact: torch.Tensor) -> float:
    return ((got.double() - exact).norm() / exact.norm().clamp_min(1e-30)).item()


def assert_no_worse(got, eager, exact, dtype, what: str) -> None:
    for name, g, e, x in zip(("out", *(f"grad {i}" for i in range(len(got) - 1))), got, eager, exact):
        assert torch.isfinite(g).all(), f"{what} {name}: non-finite elements (unwritten output?)"
        err, eager_err = rel(g, x), rel(e, x)
        assert err <= 2 * eager_err + 4 * ROUNDING[dtype], f"{what} {name}: {err:.3g} vs eager {eager_err:.3g}"


def warm_then_poisoned(call, poison):
    """call() once (autotuning on a GPU), then with outputs poisoned: the second result."""
    call()
    poison()
    return call()


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def fwd_bwd(fn, inputs, grad_out=None):
    out = fn(*inputs)
    grad_out = torch.ones_like(out) if grad_out is None else grad_out
    grads = torch.autograd.grad(out, [t for t in inputs if t.requires_grad], grad_out)
    return (out, *grads)


def poison_module(monkeypatch, module):
    return lambda: monkeypatch.setattr(module, "POISON_OUTPUTS", True)


# ------------------------------------------------------------------ attention
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_causal_attention(monkeypatch, dtype, D, size):
    lens, B, H = ((1, 4, 9, 16), 2, 2) if size == "small" else (D16_LENS, 2, 1024 // D)
    q, k, v, grad_out = (torch.randn(B, H, sum(lens), D, device=DEVICE) for _ in range(4))
    mask = reference.scale_causal_mask(lens, DEVICE)

    def sdpa(*qkv):
        return F.scaled_dot_product_attention(*qkv, attn_mask=mask)

    def kernel():
        with ops.use_backend("kernel"):
            return fwd_bwd(lambda *t: ops.scale_causal_attention(*t, lens), leaves(q.to(dtype), k.to(dtype),
                                                                                     v.to(dtype)), grad_out.to(dtype))
    got = warm_then_poisoned(kernel, poison_module(monkeypatch, attention_kernels))
    eager = fwd_bwd(sdpa, leaves(q.to(dtype), k.to(dtype), v.to(dtype)), grad_out.to(dtype))
    exact = fwd_bwd(sdpa, leaves(q.double(), k.double(), v.double()), grad_out.double())
    assert_no_worse(got, eager, exact, dtype, f"attention {size} D{D}")


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cached_attention(monkeypatch, dtype, D, size):
    """The sampler's step: the newest scale's queries against every earlier key and its own."""
    (Lq, Lk), B, H = ((16, 30), 2, 2) if size == "small" else ((256, 680), 2, 1024 // D)
    q, grad_out = (torch.randn(B, H, Lq, D, device=DEVICE) for _ in range(2))
    k, v = (torch.randn(B, H, Lk, D, device=DEVICE) for _ in range(2))

    def kernel():
        with ops.use_backend("kernel"):
            return fwd_bwd(ops.cached_attention, leaves(q.to(dtype), k.to(dtype), v.to(dtype)), grad_out.to(dtype))
    got = warm_then_poisoned(kernel, poison_module(monkeypatch, attention_kernels))
    eager = fwd_bwd(F.scaled_dot_product_attention, leaves(q.to(dtype), k.to(dtype), v.to(dtype)),
                    grad_out.to(dtype))
    exact = fwd_bwd(F.scaled_dot_product_attention, leaves(q.double(), k.double(), v.double()), grad_out.double())
    assert_no_worse(got, eager, exact, dtype, f"cached attention {size} D{D}")


# ------------------------------------------------------------------ fused head + CE / KL
def head_inputs(size: str):
    """hidden [N, C], weight [V, C], bias [V], targets, teacher hidden: fp32 masters."""
    N, C, V = (37, 40, 75) if size == "small" else (2 * 680, D16_C, D16_V)
    h, t_hidden = torch.randn(N, C, device=DEVICE), torch.randn(N, C, device=DEVICE)
    w, b = 0.3 * torch.randn(V, C, device=DEVICE), 0.5 * torch.randn(V, device=DEVICE)
    return h, w, b, torch.randint(0, V, (N,), device=DEVICE), t_hidden


def eager_ce(h, w, b, target, logits_dtype=torch.float32):
    """What autocast training runs: the head in the input dtype, the loss on fp32 logits."""
    return F.cross_entropy(F.linear(h, w, b).to(logits_dtype), target, label_smoothing=0.1)


def eager_kl(h, w, b, t_hidden, logits_dtype=torch.float32):
    with torch.no_grad():
        logp_t = F.linear(t_hidden, w, b).to(logits_dtype).log_softmax(-1)
    return (logp_t.exp() * (logp_t - F.linear(h, w, b).to(logits_dtype).log_softmax(-1))).sum(-1).mean()


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("loss", ["ce", "kl"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_head_loss(monkeypatch, dtype, loss, size):
    h, w, b, target, t_hidden = head_inputs(size)

    def fused(h, w, b):
        if loss == "ce":
            return ops.fused_linear_cross_entropy(h, w, b, target, label_smoothing=0.1)
        return ops.fused_linear_kl_div(h, w, b, target_hidden=t_hidden.to(h.dtype))

    def eager(in_dtype, logits_dtype):
        other = target if loss == "ce" else t_hidden.to(in_dtype)
        fn = eager_ce if loss == "ce" else eager_kl
        return fwd_bwd(lambda *t: fn(*t, other, logits_dtype), leaves(h.to(in_dtype), w.to(in_dtype),
                                                                        b.to(in_dtype)))

    def kernel():
        with ops.use_backend("kernel"):
            return fwd_bwd(fused, leaves(h.to(dtype), w.to(dtype), b.to(dtype)))
    got = warm_then_poisoned(kernel, poison_module(monkeypatch, cross_entropy_kernels))
    assert_no_worse(got, eager(dtype, torch.float32), eager(torch.float64, torch.float64), dtype, f"{loss} {size}")


# ------------------------------------------------------------------ scale shift
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_shift(monkeypatch, dtype, size):
    """Codes -> teacher-forcing input in a half codebook's dtype, and the codebook gradient."""
    schedule, B, V, C = ((1, 2, 3, 5), 2, 7, 8) if size == "small" else (STANDARD_SCHEDULE, 4, D16_V, D16_CODE)
    book = torch.randn(V, C, device=DEVICE)
    codes = torch.randint(0, V, (B, total_length(schedule)), device=DEVICE)
    grad_out = torch.randn(B, total_length(schedule) - schedule[0] ** 2, C, device=DEVICE)
    module = importlib.import_module("sar_fast.ops.scale_shift")

    def ref(codebook):
        return reference.scale_shift(reference.embed_scales(codes, codebook, schedule), schedule)

    def kernel():
        with ops.use_backend("kernel"):
            return fwd_bwd(lambda c: ops.scale_shift(codes, c, schedule), leaves(book.to(dtype)), grad_out.to(dtype))

    def poison():
        monkeypatch.setattr(module, "_empty", lambda *shape, dtype=None, device=None:
                            torch.full(shape, float("nan"), dtype=dtype, device=device))
    got = warm_then_poisoned(kernel, poison)
    eager = fwd_bwd(ref, leaves(book.to(dtype)), grad_out.to(dtype))
    exact = fwd_bwd(ref, leaves(book.double()), grad_out.double())
    assert_no_worse(got, eager, exact, dtype, f"scale shift {size}")
