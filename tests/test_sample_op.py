"""ops.sample_survivors, the SSR draw fused in C++ (csrc/sample_cpu.cpp), against the
per-row oracle (tests/oracles.draw_inverse_cdf: a Python loop over the kept set in float64)
and against the PyTorch path it replaces on CPU (sampling.sample_survivors): the same
token for the same uniforms on random rows, odd vocabulary sizes, every filter setting,
guidance, fp16/bf16 logits, strided inputs, ties, non-finite rows and bad arguments."""
import pytest
import torch

import oracles
from sar_fast import _C_loader, ops
from sar_fast.ops import sample as sample_op
from sar_fast.rng import sample_keyed_uniform
from sar_fast.sampling import sample_survivors as torch_path, top_k_top_p_filter

pytestmark = pytest.mark.skipif(not _C_loader.has_extension(), reason="the C++ extension sar_fast._C is not built")

CASES = [(k, p) for k in (0, 2, 3, 17, 40) for p in (0.0, 0.3, 0.9, 0.96, 1.0)]


def _fused(logits, top_k, top_p, uniforms, uncond=None, guidance=0.0):
    with ops.use_backend("kernel"):
        return ops.sample_survivors(logits, top_k, top_p, uniforms, uncond=uncond, guidance=guidance)


def _rows(R, V, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(R, V, generator=g) * torch.rand(R, 1, generator=g) * 5  # flat to peaked rows
    return logits.to(dtype), torch.rand(R, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("V", [1, 7, 40, 257, 4099])
def test_fused_draw_equals_the_oracle(V):
    """Exact tokens against the float64 loop (V 4099: more than one radix level decides)."""
    R = 48 if V < 1000 else 12
    for i, (top_k, top_p) in enumerate(CASES):
        logits, u = _rows(R, V, seed=V * 100 + i)
        got = _fused(logits, top_k, top_p, u)
        want = oracles.draw_inverse_cdf(logits, top_k, top_p, u)
        assert torch.equal(got, want), (V, top_k, top_p, (got != want).nonzero().flatten().tolist())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("guidance", [0.0, 0.3, 1.7, -0.8])
def test_fused_draw_equals_the_torch_path(dtype, guidance):
    """Same tokens as the PyTorch path for the same keyed uniforms, at the trainer's filter
    (top-k 900 of V 4096, top-p 0.96) and a few others; guidance below -0.5 takes lerp's
    other formula. Low precision: ties are common, so equal logits may swap tokens."""
    R, V = 64, 4096
    g = torch.Generator().manual_seed(int(guidance * 10) + 3)
    cond = (torch.randn(R, V, generator=g) * 3).to(dtype)
    uncond = (torch.randn(R, V, generator=g) * 3).to(dtype) if guidance else None
    u = sample_keyed_uniform(5, 9, 1, slice(0, R))
    for top_k, top_p in [(900, 0.96), (0, 0.9), (50, 0.0), (0, 0.0), (V, 0.5), (V - 1, 0.0)]:
        got = _fused(cond, top_k, top_p, u, uncond, guidance)
        want = torch_path(cond, top_k, top_p, uniforms=u, uncond=uncond, guidance=guidance)
        mixed = cond.float() if uncond is None else torch.lerp(uncond.float(), cond.float(), 1 + guidance)
        assert torch.equal(mixed.gather(1, got[:, None]), mixed.gather(1, want[:, None])), (top_k, top_p)
        if dtype == torch.float32:
            assert torch.equal(got, want), (top_k, top_p)


def test_ties_keep_exactly_k_lowest_ids_first():
    """Tie-heavy rows: exactly k candidates, of the same logit values as the PyTorch path's;
    among equal logits the lower token ids come first (u -> 1 takes the last candidate)."""
    g = torch.Generator().manual_seed(11)
    logits = torch.randint(0, 4, (300, 3000), generator=g).float()
    last = torch.full((300,), 1 - 1e-16, dtype=torch.float64)
    for top_k in (1000, 1500, 2999):
        got = _fused(logits, top_k, 0.0, last)
        kth = logits.sort(-1, descending=True).values[:, top_k - 1]
        above = (logits > kth[:, None]).sum(-1)
        # the last of the k candidates: the (k - above)-th lowest id among the ties with the k-th
        tied = logits == kth[:, None]
        want = torch.stack([tied[r].nonzero().flatten()[top_k - 1 - above[r]] for r in range(300)])
        assert torch.equal(got, want), top_k
        ref = torch_path(logits, top_k, 0.0, uniforms=last)
        assert torch.equal(logits.gather(1, got[:, None]), logits.gather(1, ref[:, None]))


@pytest.mark.parametrize("bits", [11, 23])
def test_selection_sees_every_bit_of_the_logit(bits):
    """Logits 1 + m * 2**-23 that share their high bits and differ in the low `bits` of the
    mantissa only: the k-th candidate (u -> 1 draws it) is decided by every radix level."""
    g = torch.Generator().manual_seed(bits)
    R, V = 40, 3000
    m = torch.randint(0, 2 ** bits, (R, V), generator=g)
    logits = 1.0 + m.double() * 2.0 ** -23  # exact in float32
    logits = logits.float()
    last = torch.full((R,), 1 - 1e-16, dtype=torch.float64)
    for top_k in (1, 2, 700, 2999):
        got = _fused(logits, top_k, 0.0, last)
        kth = logits.sort(-1, descending=True).values[:, top_k - 1]
        assert torch.equal(logits.gather(1, got[:, None]).squeeze(1), kth), top_k
        assert torch.equal(got, torch_path(logits, top_k, 0.0, uniforms=last)) or bits == 11  # ties at 11 bits


def test_uniform_edges_and_every_row_written():
    """u = 0 takes the most likely token, u -> 1 the least likely kept one (the nucleus edge
    of the oracle); every row of a large batch gets a token of its own kept set."""
    logits, _ = _rows(500, 333, seed=4)
    zeros = torch.zeros(500, dtype=torch.float64)
    assert torch.equal(_fused(logits, 40, 0.9, zeros), logits.argmax(-1))
    near_one = torch.full((500,), 1 - 1e-16, dtype=torch.float64)
    got = _fused(logits, 40, 0.9, near_one)
    for r in range(500):
        kept = oracles.kept_tokens(logits[r], 40, 0.9)
        assert got[r].item() == min(kept, key=lambda v: (float(logits[r, v]), -v)), r
    u = torch.rand(500, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    got = _fused(logits, 0, 0.5, u)
    allowed = top_k_top_p_filter(logits, 0, 0.5) > float("-inf")
    assert allowed.gather(1, got[:, None]).all()


def test_shapes_strides_and_empty():
    logits, u = _rows(24, 50, seed=8)
    got = _fused(logits.view(2, 3, 4, 50), 7, 0.8, u.view(2, 3, 4))
    assert got.shape == (2, 3, 4) and got.dtype == torch.int64
    assert torch.equal(got.flatten(), oracles.draw_inverse_cdf(logits, 7, 0.8, u))
    strided = logits.t().contiguous().t()  # same values, column-major
    assert torch.equal(_fused(strided, 7, 0.8, u), got.flatten())
    wide = torch.full((24, 101), float("nan"))
    wide[:, :50] = logits
    assert torch.equal(_fused(wide[:, :50], 7, 0.8, u), got.flatten())  # a slice of a wider buffer
    assert _fused(torch.empty(0, 50), 7, 0.8, torch.empty(0, dtype=torch.float64)).shape == (0,)
    # fp32 uncond with bf16 logits: mixed in fp32, as the PyTorch path does
    cond, uncond = logits.bfloat16(), torch.randn(24, 50)
    want = torch_path(cond, 7, 0.8, uniforms=u, uncond=uncond, guidance=1.0)
    assert torch.equal(_fused(cond, 7, 0.8, u, uncond, 1.0), want)


def test_non_finite_rows_stay_in_range():
    """-inf logits are never drawn while a finite one exists; an all -inf row or a row with
    NaN returns its first candidate (the NaN, ranked first as torch.topk ranks it) instead of
    reading out of bounds."""
    logits, u = _rows(6, 30, seed=9)
    logits[0, :29] = float("-inf")
    logits[1] = float("-inf")
    logits[2, 13] = float("nan")
    logits[3, 5] = float("inf")
    got = _fused(logits, 10, 0.9, u)
    assert got[0] == 29 and got[1] == 0 and got[2] == 13 and got[3] == 5
    assert torch.equal(got[4:], oracles.draw_inverse_cdf(logits[4:], 10, 0.9, u[4:]))


def test_distribution_matches_the_filter():
    """40k draws on one guided row vs the filter's softmax (chi-square, df <= 8; the 1e-4
    tail is ~33), with the bound failing the unfiltered distribution."""
    g = torch.Generator().manual_seed(21)
    cond, uncond = torch.randn(1, 9, generator=g) * 1.5, torch.randn(1, 9, generator=g)
    N = 40_000
    draws = _fused(cond.expand(N, 9), 6, 0.9, sample_keyed_uniform(3, 11, 1, slice(0, N)),
                   uncond.expand(N, 9), 1.5)
    counts = torch.bincount(draws, minlength=9).double()
    for probs, bound in [(top_k_top_p_filter(2.5 * cond - 1.5 * uncond, 6, 0.9).softmax(-1)[0].double(), 33),
                         (cond.softmax(-1)[0].double(), None)]:
        m = probs > 0
        assert (counts[~m] == 0).all() or bound is None
        chi2 = float(((counts[m] - probs[m] * N) ** 2 / (probs[m] * N)).sum())
        assert chi2 < 33 if bound else chi2 > 100


def test_threads_do_not_change_the_draws():
    logits, u = _rows(257, 1000, seed=13)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _fused(logits, 100, 0.9, u)
        torch.set_num_threads(2)
        two = _fused(logits, 100, 0.9, u)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_backends_and_the_operator_schema():
    logits, u = _rows(8, 20, seed=1)
    assert sample_op.use_extension(logits)
    with ops.use_backend("reference"):
        assert not sample_op.use_extension(logits)
        assert torch.equal(ops.sample_survivors(logits, 5, 0.9, u), torch_path(logits, 5, 0.9, uniforms=u))
    torch.library.opcheck(torch.ops.sar_fast.sample_survivors.default, (logits, None, 0.0, 5, 0.9, u))
    torch.library.opcheck(torch.ops.sar_fast.sample_survivors.default, (logits, logits.flip(0), 1.5, 0, 0.5, u))


@pytest.mark.parametrize("args, match", [
    (dict(logits=torch.randn(4)), "logits must be 2-D"),
    (dict(logits=torch.randint(0, 3, (4, 5))), "logits must be float32"),
    (dict(logits=torch.randn(4, 5, dtype=torch.float64)), "logits must be float32"),
    (dict(top_k=-1), "top_k must be >= 0"),
    (dict(top_p=1.5), r"top_p must be in \[0, 1\]"),
    (dict(top_p=float("nan")), r"top_p must be in \[0, 1\]"),
    (dict(guidance=float("inf")), "guidance must be finite"),
    (dict(uncond=torch.randn(4, 6)), "uncond must have the logits' shape"),
    (dict(uncond=torch.randn(4, 5).half()), "uncond must have the logits' dtype"),
    (dict(uniforms=torch.rand(5, dtype=torch.float64)), r"uniforms must be 1-D \[rows\]"),
    (dict(uniforms=torch.rand(4)), "uniforms must be float64"),
    (dict(logits=torch.randn(4, 0)), "vocab size must lie in"),
])
def test_operator_refuses_bad_arguments(args, match):
    kw = dict(logits=torch.randn(4, 5), uncond=None, guidance=0.0, top_k=2, top_p=0.9,
              uniforms=torch.rand(4, dtype=torch.float64))
    kw.update(args)
    with pytest.raises((ValueError, TypeError), match=match):
        torch.ops.sar_fast.sample_survivors(kw["logits"], kw["uncond"], kw["guidance"], kw["top_k"], kw["top_p"],
                                            kw["uniforms"])


def test_wrapper_refuses_bad_arguments():
    logits, u = _rows(4, 9, seed=2)
    with pytest.raises(ValueError, match="uniforms must have shape"):
        _fused(logits, 3, 0.9, torch.rand(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="uncond must have the logits' shape"):
        _fused(logits, 3, 0.9, u, torch.randn(4, 8), 1.0)
    with pytest.raises(ValueError, match="logits must be a tensor"):
        _fused([1.0, 2.0], 3, 0.9, u)
