"""Infinity's padded layout (scales as (t, h, w) boxes, then a tail of rows that see token 0
only): the Triton kernels (interpreter on CPU), the dense reference and the row-by-row float64
oracle of tests/naive.py agree, forward and every gradient, with outputs poisoned (NaN)."""
import re

import pytest
import torch

from naive import padded_block_causal_attention as oracle
from sar_fast import ops
from sar_fast.kernels import attention as kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setattr(kernels, "POISON_OUTPUTS", True)


def box_lens(boxes):
    return tuple(t * h * w for t, h, w in boxes)


def rel_err(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


def leaves(B, H, Lq, D, Lk=None):
    return [torch.randn(B, H, n, D, device=DEVICE).requires_grad_() for n in (Lq, Lk or Lq, Lk or Lq)]


def check(backend, q, k, v, lens, pad, softmax_scale, cached=False, tol=1e-5):
    with ops.use_backend(backend):
        if cached:
            out = ops.padded_cached_attention(q, k, v, pad, softmax_scale)
        else:
            out = ops.padded_scale_causal_attention(q, k, v, lens, pad, softmax_scale)
    grad_out = torch.randn_like(out)
    got = (out, *torch.autograd.grad(out, (q, k, v), grad_out))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want_out = oracle(q64, k64, v64, lens, pad, softmax_scale, cached=cached)
    want = (want_out, *torch.autograd.grad(want_out, (q64, k64, v64), grad_out.double()))
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.isfinite(g).all(), f"{name} has unwritten (NaN) elements"
        assert rel_err(g, w) <= tol, f"{name}: rel. error {rel_err(g, w):.2e} > {tol:.0e}"
    return got


# interpreter tiles: 16 x 16 forward, 16 x 32 / 32 x 16 backward
LAYOUTS = [
    ([(1, 1, 1)] * 6 + [(1, 1, 2), (1, 2, 1), (1, 1, 3)], 5),    # many tiny scales, non-square
    ([(1, 1, 1), (1, 9, 13)], 3),                                  # one huge scale (117 tokens)
    ([(1, 1, 1), (1, 2, 3), (1, 3, 5)], 1),                        # L = 22: no multiple of a tile
    ([(1, 1, 1), (1, 2, 2), (1, 3, 4)], 15),                       # pad = tile - 1
    ([(1, 1, 1), (1, 3, 2), (1, 4, 3)], 33),                       # pad > every tile
    ([(1, 1, 1), (2, 2, 3), (3, 3, 2)], 7),                        # t > 1 (video boxes)
    ([(1, 1, 1), (1, 2, 3), (1, 4, 5)], 0),                        # no padding
]


@pytest.mark.parametrize("backend", ["kernel", "reference"])
@pytest.mark.parametrize("boxes, pad", LAYOUTS)
def test_padded_layout_matches_float64_oracle(backend, boxes, pad):
    lens = box_lens(boxes)
    q, k, v = leaves(1, 2, sum(lens) + pad, 16)
    check(backend, q, k, v, lens, pad, softmax_scale=1.0 if pad % 2 else None)


def test_padding_leaves_real_rows_and_their_gradients_alone():
    """Real rows and every gradient are those of the unpadded sequence whatever the padded
    rows hold, except dV[0], which adds the padded rows' output gradients."""
    lens, pad = box_lens([(1, 1, 1), (1, 2, 3), (1, 3, 3)]), 9
    q, k, v = leaves(2, 2, sum(lens) + pad, 32)
    with torch.no_grad():
        for t in (q, k, v):
            t[:, :, sum(lens):] = 1e4  # padded rows huge: any leak shows
    out, dq, dk, dv = check("kernel", q, k, v, lens, pad, None)
    L = sum(lens)
    assert torch.equal(out[:, :, L:], v[:, :, :1].detach().expand(-1, -1, pad, -1))
    assert not dq[:, :, L:].any() and not dk[:, :, L:].any() and not dv[:, :, L:].any()
    real = [t.detach()[:, :, :L].clone().requires_grad_() for t in (q, k, v)]
    with ops.use_backend("kernel"):
        plain = ops.scale_causal_attention(*real, lens)
    torch.testing.assert_close(out[:, :, :L], plain, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("pad", [0, 1, 17])
def test_padded_cached_attention_matches_float64_oracle(pad):
    q, k, v = leaves(1, 2, 6 + pad, 16, Lk=29)
    check("kernel", q, k, v, None, pad, 0.7, cached=True)


def test_padded_output_is_model_layout():
    """The [B, H, L, D] result is a view of [B, L, H, D] memory (the model's reshape is free)."""
    q, k, v = (t.detach() for t in leaves(1, 2, 14 + 4, 16))
    with ops.use_backend("kernel"):
        out = ops.padded_scale_causal_attention(q, k, v, (1, 4, 9), 4)
    assert out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("call, msg", [
    (lambda q: ops.padded_scale_causal_attention(q, q, q, (1, 4), pad=-1), "pad must be an int"),
    (lambda q: ops.padded_scale_causal_attention(q, q, q, (1, 4), pad=3), "sum(scale_lens) + pad"),
    (lambda q: ops.padded_scale_causal_attention(q, q, q, (1, 4), pad=7), "no real token"),
    (lambda q: ops.padded_cached_attention(q, q, q, pad=1.5), "pad must be an int"),
])
def test_bad_pad(call, msg):
    q = torch.randn(1, 1, 7, 16)
    with pytest.raises(ValueError, match=re.escape(msg)):
        call(q)


def test_torch_compile_fullgraph_with_a_layout():
    """A compiled model passes the real tokens' ScaleLayout: one graph, gradients as the oracle."""
    lens, pad = box_lens([(1, 1, 1), (1, 2, 3), (1, 2, 2)]), 6
    q, k, v = leaves(1, 2, sum(lens) + pad, 16)
    with ops.use_backend("kernel"):
        layout = ops.scale_layout(lens, q.device)
        loss_fn = torch.compile(lambda q, k, v: ops.padded_scale_causal_attention(q, k, v, layout, pad).square().sum(),
                                backend="aot_eager", fullgraph=True)
        loss_fn(q, k, v).backward()
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    oracle(q64, k64, v64, lens, pad).square().sum().backward()
    for got, want in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 5e-3)])
def test_model_layout_views_and_half_precision(dtype, tol):
    """q, k, v as the transformer passes them (strided views of one [B, L, 3, H, D] buffer)."""
    lens, pad = box_lens([(1, 1, 1), (1, 3, 2), (1, 4, 5)]), 11
    buf = torch.randn(2, sum(lens) + pad, 3, 2, 32, device=DEVICE, dtype=dtype)
    q, k, v = (t.requires_grad_() for t in buf.permute(2, 0, 3, 1, 4).detach().unbind(0))
    check("kernel", q, k, v, lens, pad, 0.5, tol=tol)
