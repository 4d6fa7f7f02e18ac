"""The references in sar_fast.ops.reference against naive float64 loops (tests/naive.py)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import naive
from sar_fast.ops import reference


@pytest.mark.parametrize("h, out", [(1, 2), (2, 3), (3, 5), (5, 6), (10, 13), (13, 16), (4, 4)])
def test_bicubic_matches_naive(h, out):
    img = torch.randn(3, h, h, dtype=torch.float64)
    got = F.interpolate(img[None], size=(out, out), mode="bicubic")[0].numpy()
    np.testing.assert_allclose(got, naive.bicubic(img.numpy(), out), atol=1e-12)


@pytest.mark.parametrize("h, out", [(16, 13), (16, 1), (7, 3), (5, 5), (16, 10)])
def test_area_matches_naive(h, out):
    img = torch.randn(2, h, h, dtype=torch.float64)
    got = F.interpolate(img[None], size=(out, out), mode="area")[0].numpy()
    np.testing.assert_allclose(got, naive.area(img.numpy(), out), atol=1e-12)


@pytest.mark.parametrize("schedule", [(1, 2, 3), (1, 3, 5, 6), (1, 2)])
def test_scale_shift_flexvar_matches_naive(schedule):
    B, C, V = 2, 3, 11
    book = torch.randn(V, C, dtype=torch.float64)
    codes = torch.randint(0, V, (B, sum(s * s for s in schedule)))
    got = reference.scale_shift(reference.embed_scales(codes, book, schedule), schedule).double()
    start, want = 0, []
    for i, s in enumerate(schedule[:-1]):
        emb = book[codes[:, start:start + s * s]].numpy()  # B, s*s, C
        start += s * s
        for b in range(B):
            m = emb[b].T.reshape(C, s, s)
            want.append((b, naive.bicubic(m, schedule[i + 1]).reshape(C, -1).T))
    for b in range(B):
        ref = np.concatenate([w for bb, w in want if bb == b], axis=0)
        np.testing.assert_allclose(got[b].numpy(), ref, atol=1e-5)


def test_scale_shift_var_matches_naive():
    schedule, B, C, V = (1, 2, 4), 2, 3, 7
    book = torch.randn(V, C, dtype=torch.float64)
    codes = torch.randint(0, V, (B, 21))
    phi = lambda h, i, n: h * (0.5 + i)  # noqa: E731 - stands in for VAR's convs
    got = reference.scale_shift(reference.embed_scales(codes, book, schedule), schedule, "var", phi).double()
    for b in range(B):
        f_hat, start, pieces = np.zeros((C, 4, 4)), 0, []
        for i, s in enumerate(schedule[:-1]):
            m = book[codes[b, start:start + s * s]].numpy().T.reshape(C, s, s)
            start += s * s
            f_hat += naive.bicubic(m, 4) * (0.5 + i)
            pieces.append(naive.area(f_hat, schedule[i + 1]).reshape(C, -1).T)
        np.testing.assert_allclose(got[b].numpy(), np.concatenate(pieces), atol=1e-5)


@pytest.mark.parametrize("scale_lens", [(1, 4, 9), (1, 4, 16, 25), (1, 36), (3,)])
def test_attention_matches_naive(scale_lens):
    L = sum(scale_lens)
    q, k, v = (torch.randn(2, 3, L, 8) for _ in range(3))
    got = reference.scale_causal_attention(q, k, v, scale_lens, softmax_scale=0.3)
    want = naive.attention(q, k, v, scale_lens, 0.3)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_cached_attention_equals_last_scale_of_full():
    lens = (1, 4, 9)
    q, k, v = (torch.randn(1, 2, 14, 8) for _ in range(3))
    full = reference.scale_causal_attention(q, k, v, lens)
    last = reference.cached_attention(q[:, :, 5:], k, v)
    torch.testing.assert_close(last, full[:, :, 5:], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("smoothing, weighted, with_bias", [(0.0, False, True), (0.1, True, False), (0.3, True, True)])
def test_linear_cross_entropy_matches_naive(reduction, smoothing, weighted, with_bias):
    N, C, V = 13, 6, 17
    h, w = torch.randn(N, C), torch.randn(V, C)
    b = torch.randn(V) if with_bias else None
    target = torch.randint(0, V, (N,))
    target[3] = -100
    tw = torch.rand(N) if weighted else None
    got, (ce, amax, lse) = reference.linear_cross_entropy(h, w, b, target, tw, smoothing, -100, reduction,
                                                          return_stats=True)
    logits = (h.double() @ w.double().T) + (0 if b is None else b.double())
    per = naive.cross_entropy(logits, target, tw, smoothing, -100)
    wsum = sum(1.0 if tw is None else float(tw[i]) for i in range(N) if target[i] != -100)
    want = {"none": per, "sum": per.sum(), "mean": per.sum() / wsum}[reduction]
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert torch.equal(amax, logits.argmax(-1))
    torch.testing.assert_close(lse.double(), logits.logsumexp(-1), atol=1e-5, rtol=1e-5)


def test_nearest_code_ties_break_low():
    book = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    assert reference.nearest_code(z, book).tolist() == [0, 1, 0]


@pytest.mark.parametrize("normalize", [True, False])
def test_msq_flexvar_matches_naive(normalize):
    B, C, V, sched = 2, 4, 19, (1, 2, 3, 5)
    z, book = torch.randn(B, C, 5, 5), torch.randn(V, C)
    codes = reference.msq_encode(z, book, sched, "flexvar", normalize)
    bk = book.double().numpy()
    if normalize:
        bk = bk / np.linalg.norm(bk, axis=1, keepdims=True)
    start = 0
    for s in sched:
        for b in range(B):
            zs = naive.area(z[b].double().numpy(), s).reshape(C, -1).T
            if normalize:
                zs = zs / np.linalg.norm(zs, axis=1, keepdims=True)
            np.testing.assert_array_equal(codes[b, start:start + s * s].numpy(), naive.nearest(zs, bk))
        start += s * s


def test_msq_var_residual_matches_naive_and_decodes():
    B, C, V, sched = 2, 3, 23, (1, 2, 4)
    z, book = torch.randn(B, C, 4, 4), torch.randn(V, C)
    phi = lambda h, i, n: h * 0.9  # noqa: E731
    codes, fhats = reference.msq_encode(z, book, sched, "var", False, phi, return_quantized=True)
    for b in range(B):
        rest, f_hat, start = z[b].double().numpy(), np.zeros((C, 4, 4)), 0
        for i, s in enumerate(sched):
            zs = (naive.area(rest, s) if i < 2 else rest).reshape(C, -1).T
            idx = naive.nearest(zs, book.double().numpy())
            np.testing.assert_array_equal(codes[b, start:start + s * s].numpy(), idx)
            start += s * s
            h = book.double().numpy()[idx].T.reshape(C, s, s)
            h = (naive.bicubic(h, 4) if i < 2 else h) * 0.9
            f_hat, rest = f_hat + h, rest - h
            np.testing.assert_allclose(fhats[i][b].numpy(), f_hat, atol=1e-5)
    decoded = reference.msq_decode(codes, book, sched, "var", False, phi)
    torch.testing.assert_close(decoded, fhats[-1], atol=1e-5, rtol=1e-5)
    last = reference.msq_decode(codes, book, sched, "flexvar", False)
    torch.testing.assert_close(last, book[codes[:, 5:]].transpose(1, 2).reshape(B, C, 4, 4))
