"""Multi-scale quantisation through the C++/CUDA extension (sar_fast._C) against the
PyTorch reference: identical codes (and, for VAR, identical f_hat) on CPU, dispatch,
decode round trips, and clear errors on bad input."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from conftest import DATA
from sar_fast import ops
from sar_fast import _C_loader
from sar_fast.ops import BackendError, reference
from sar_fast.ops import quantize

if not _C_loader.has_extension():
    pytest.fail("sar_fast._C is not built: pip install --no-build-isolation -e . "
                "(or python setup.py build_ext --inplace)", pytrace=False)  # never a silent skip

if torch.cuda.is_available() and not _C_loader.cuda_compiled():  # would skip every CUDA test below silently
    pytest.fail("a CUDA device is present but sar_fast._C was built without CUDA kernels: rebuild it with a "
                "CUDA toolkit (CUDA_HOME set, SAR_FAST_NO_CUDA unset)", pytrace=False)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture
def gen() -> torch.Generator:
    """A freshly seeded generator: new inputs every run; the seed is printed on failure."""
    generator = torch.Generator()
    print(f"input seed: {generator.seed()}")
    return generator


def encode(backend: str, *args, **kwargs):
    with ops.use_backend(backend):  # 'kernel' = the extension, or an error
        return ops.msq_encode(*args, **kwargs)


def make_phi(channels: int, gen: torch.Generator):
    """VAR-like Phi: (1 - r) h + r conv_i(h), a different conv per scale group."""
    convs = [torch.nn.Conv2d(channels, channels, 3, padding=1) for _ in range(2)]
    for conv in convs:
        conv.weight.data = torch.randn(conv.weight.shape, generator=gen) * 0.2
        conv.bias.data = torch.randn(conv.bias.shape, generator=gen) * 0.1

    def phi(h: torch.Tensor, i: int, n: int) -> torch.Tensor:
        return 0.5 * h + 0.5 * convs[0 if 2 * i < n else 1](h)
    return phi


# (B, C, H, schedule, V): non-integer area ratios (16 -> 13, 10, 6), odd H, V not a
# multiple of any tile width, a single code, a 1x1 latent.
FLEX_CASES = [
    (2, 32, 16, (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), 517),
    (3, 8, 13, (1, 2, 4, 7, 11, 13), 97),
    (1, 5, 9, (2, 3, 9), 33),
    (4, 3, 15, (1, 15), 1),
    (2, 16, 7, (3, 5, 7), 8912),
    (2, 4, 1, (1,), 12),
]


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("B, C, H, schedule, V", FLEX_CASES)
def test_flexvar_codes_match_reference(B, C, H, schedule, V, normalize, gen):
    latent = torch.randn(B, C, H, H, generator=gen)
    codebook = torch.randn(V, C, generator=gen)
    want = encode("reference", latent, codebook, schedule, "flexvar", normalize)
    got = encode("kernel", latent, codebook, schedule, "flexvar", normalize)
    assert got.dtype == torch.int64 and got.shape == (B, sum(s * s for s in schedule))
    assert torch.equal(got, want)


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_flexvar_dtypes_and_layouts(dtype, layout, gen):
    latent = torch.randn(2, 6, 12, 12, generator=gen).to(dtype)
    codebook = torch.randn(50, 6, generator=gen).to(dtype)
    if layout == "channels_last":
        latent = latent.contiguous(memory_format=torch.channels_last)
    else:
        latent = torch.randn(2, 12, 12, 12, generator=gen).to(dtype)[:, ::2]
        codebook = torch.randn(6, 50, generator=gen).to(dtype).t()
    for normalize in (True, False):
        want = encode("reference", latent, codebook, (1, 3, 5, 8, 12), "flexvar", normalize)
        assert torch.equal(encode("kernel", latent, codebook, (1, 3, 5, 8, 12), "flexvar", normalize), want)


@pytest.mark.parametrize("normalize", [True, False])
def test_duplicated_codebook_rows_pick_the_lowest_index(normalize, gen):
    codebook = torch.randn(40, 8, generator=gen)
    low, high = torch.tensor([2, 9, 17]), torch.tensor([39, 30, 18])
    codebook[high] = codebook[low]
    # a 4x4 latent whose cells are exact copies of the duplicated (higher-index) rows
    picks = high[torch.randint(0, 3, (2, 16), generator=gen)]
    latent = codebook[picks].transpose(1, 2).reshape(2, 8, 4, 4)
    want_last = torch.where(picks == 39, 2, torch.where(picks == 30, 9, 17))  # high -> low
    got = encode("kernel", latent, codebook, (1, 2, 4), "flexvar", normalize)
    assert torch.equal(got[:, -16:], want_last)
    assert torch.equal(got, encode("reference", latent, codebook, (1, 2, 4), "flexvar", normalize))


def test_exact_ties_with_integer_data(gen):
    # small integers: every score is exact in fp32, so ties are real and must go to the
    # first minimum (torch.argmin's rule) on every CPU kernel variant
    latent = torch.randint(-2, 3, (3, 3, 6, 6), generator=gen).float()
    codebook = torch.randint(-2, 3, (300, 3), generator=gen).float()  # 125 distinct rows
    want = encode("reference", latent, codebook, (6,), "flexvar", False)
    dist = torch.cdist(latent.permute(0, 2, 3, 1).reshape(-1, 3).double(), codebook.double())
    assert torch.equal(want.flatten(), dist.argmin(1))
    for isa in _C_loader.cpu_isas():
        with _C_loader.use_cpu_isa(isa):
            assert torch.equal(encode("kernel", latent, codebook, (6,), "flexvar", False), want), isa


@pytest.mark.parametrize("mode", ["flexvar", "var"])
def test_every_cpu_kernel_variant_agrees(mode, gen):
    latent = torch.randn(2, 12, 11, 11, generator=gen)
    codebook = torch.randn(333, 12, generator=gen)
    want = encode("reference", latent, codebook, (1, 2, 4, 7, 11), mode, mode == "flexvar")
    for isa in _C_loader.cpu_isas():
        with _C_loader.use_cpu_isa(isa):
            assert _C_loader.cpu_isa() == isa
            assert torch.equal(encode("kernel", latent, codebook, (1, 2, 4, 7, 11), mode, mode == "flexvar"), want), isa


def test_flexvar_return_quantized_matches_reference(gen):
    latent = torch.randn(2, 8, 10, 10, generator=gen)
    codebook = torch.randn(64, 8, generator=gen)
    for normalize in (True, False):
        codes, maps = encode("kernel", latent, codebook, (1, 3, 6, 10), "flexvar", normalize, return_quantized=True)
        want_codes, want_maps = encode("reference", latent, codebook, (1, 3, 6, 10), "flexvar", normalize,
                                       return_quantized=True)
        assert torch.equal(codes, want_codes)
        assert all(torch.equal(a, b) for a, b in zip(maps, want_maps, strict=True))


# (B, C, H, schedule, V) for VAR's residual quantiser
VAR_CASES = [
    (2, 8, 16, (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), 97),
    (3, 4, 13, (1, 3, 6, 13), 33),
    (1, 6, 9, (2, 9), 1000),
    (2, 3, 5, (5,), 7),
]


@pytest.mark.parametrize("with_phi", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("B, C, H, schedule, V", VAR_CASES)
def test_var_codes_and_f_hat_match_reference(B, C, H, schedule, V, normalize, with_phi, gen):
    latent = torch.randn(B, C, H, H, generator=gen)
    codebook = torch.randn(V, C, generator=gen) * 0.5  # on the latent's scale: every scale matters
    phi = make_phi(C, gen) if with_phi else None
    codes, f_hats = encode("kernel", latent, codebook, schedule, "var", normalize, phi, return_quantized=True)
    want_codes, want_f_hats = encode("reference", latent, codebook, schedule, "var", normalize, phi,
                                     return_quantized=True)
    assert torch.equal(codes, want_codes)
    assert len(f_hats) == len(schedule)
    for got, want in zip(f_hats, want_f_hats):
        assert got.dtype == torch.float32 and torch.equal(got, want)


def test_var_phi_sees_the_reference_layout(gen):
    # Phi's convolutions round differently on channels-last and NCHW inputs, so h must
    # reach phi with the same strides as in the reference
    seen: dict[str, list] = {"reference": [], "kernel": []}
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    latent = torch.randn(2, 4, 8, 8, generator=gen)
    codebook = torch.randn(20, 4, generator=gen)
    for backend in seen:
        def phi(h, i, n, log=seen[backend]):
            log.append((tuple(h.shape), h.stride()))
            return conv(h)
        encode(backend, latent, codebook, (1, 2, 4, 8), "var", False, phi)
    assert seen["kernel"] == seen["reference"]


def test_var_step_op_directly(gen):
    rest = torch.randn(2, 5, 9, 9, generator=gen)
    codebook = torch.randn(40, 5, generator=gen)
    codes, h = _C_loader.msq_var_step(rest, None, codebook, 4, False, True)
    zs = F.interpolate(rest, size=(4, 4), mode="area").permute(0, 2, 3, 1).reshape(-1, 5)
    want = reference.nearest_code(zs, codebook).view(2, 16)
    assert torch.equal(codes, want)
    small = codebook[want].transpose(1, 2).reshape(2, 5, 4, 4)
    assert torch.equal(h, F.interpolate(small, size=(9, 9), mode="bicubic"))
    # fused: f_hat += h, rest -= h in place; h comes back empty
    f_hat, rest2 = torch.randn(2, 5, 9, 9, generator=gen), rest.clone()
    f_hat0 = f_hat.clone()
    codes2, empty = _C_loader.msq_var_step(rest2, f_hat, codebook, 4, False, True)
    assert torch.equal(codes2, codes) and empty.numel() == 0
    assert torch.equal(f_hat, f_hat0 + h) and torch.equal(rest2, rest - h)


def test_decode_round_trips(gen):
    latent = torch.randn(2, 8, 10, 10, generator=gen)
    codebook = torch.randn(64, 8, generator=gen)
    schedule = (1, 2, 5, 10)
    phi = make_phi(8, gen)
    # var: decoding the codes rebuilds the encoder's f_hat exactly
    codes, f_hats = encode("kernel", latent, codebook, schedule, "var", False, phi, return_quantized=True)
    assert torch.equal(ops.msq_decode(codes, codebook, schedule, "var", False, phi), f_hats[-1])
    # flexvar: the decoded latent is the last scale's code map, and re-encoding it gives
    # back the last scale's codes
    codes, maps = encode("kernel", latent, codebook, schedule, "flexvar", True, return_quantized=True)
    decoded = ops.msq_decode(codes, codebook, schedule, "flexvar", True)
    assert torch.equal(decoded, maps[-1])
    again = encode("kernel", decoded, codebook, schedule, "flexvar", True)
    assert torch.equal(again[:, -100:], codes[:, -100:])


# ------------------------------------------------------------------------------ dispatch
def test_dispatch_follows_the_backend(monkeypatch, gen):
    latent = torch.randn(2, 4, 6, 6, generator=gen)
    codebook = torch.randn(9, 4, generator=gen)
    calls = []
    real = _C_loader.msq_encode_flexvar
    monkeypatch.setattr(_C_loader, "msq_encode_flexvar", lambda *a: calls.append(1) or real(*a))
    want = encode("reference", latent, codebook, (1, 3, 6))
    assert calls == []
    assert torch.equal(encode("auto", latent, codebook, (1, 3, 6)), want) and calls == [1]
    assert torch.equal(encode("kernel", latent, codebook, (1, 3, 6)), want) and calls == [1, 1]


def test_without_the_extension_auto_falls_back_and_kernel_refuses(monkeypatch, gen):
    latent = torch.randn(2, 4, 6, 6, generator=gen)
    codebook = torch.randn(9, 4, generator=gen)
    monkeypatch.setattr(_C_loader, "has_extension", lambda: False)
    assert not quantize.use_extension(latent)
    assert torch.equal(encode("auto", latent, codebook, (1, 6)), reference.msq_encode(latent, codebook, (1, 6)))
    with pytest.raises(BackendError, match="not built"):
        encode("kernel", latent, codebook, (1, 6))


@pytest.mark.parametrize("name", ["flexvq", "varvq"])
def test_tokenizer_golden_codes_through_the_extension(name, monkeypatch):
    # the tokenizers call ops.msq_encode; under the extension they must still give the
    # original code's codes (golden fixtures, bit for bit)
    from sar_fast.models.tokenizers import FlexVQ16, VARVQVAE
    g = torch.load(os.path.join(DATA, f"golden_{name}.pt"), weights_only=True)
    model = {"flexvq": FlexVQ16, "varvq": VARVQVAE}[name].from_checkpoint(
        g["state_dict"], norm_groups=g["config"]["norm_groups"])
    steps = []
    real_flex, real_var = _C_loader.msq_encode_flexvar, _C_loader.msq_var_step
    monkeypatch.setattr(_C_loader, "msq_encode_flexvar", lambda *a: steps.append("flexvar") or real_flex(*a))
    monkeypatch.setattr(_C_loader, "msq_var_step", lambda *a: steps.append("var") or real_var(*a))
    with ops.use_backend("kernel"):
        for sched, key in (("schedule", "codes"), ("schedule_alt", "codes_alt")):
            codes = model.encode(g["images"], tuple(g[sched]))
            assert all(torch.equal(a, b) for a, b in zip(codes, g[key], strict=True)), sched
    assert steps and set(steps) == {"flexvar" if name == "flexvq" else "var"}


# ------------------------------------------------------------------------------ bad input
def _bad(**kw):
    args = dict(latent=torch.randn(2, 4, 5, 5), codebook=torch.randn(9, 4), schedule=(1, 2, 5))
    args.update(kw)
    return args


BAD_ENCODE = [
    (_bad(latent=torch.randn(2, 4, 5)), ValueError, "latent must have 4 dims"),
    (_bad(latent=torch.randn(2, 4, 5, 5).double()), TypeError, "latent must have dtype"),
    (_bad(latent=torch.ones(2, 4, 5, 5, dtype=torch.int32)), TypeError, "latent must have dtype"),
    (_bad(latent=torch.randn(0, 4, 5, 5)), ValueError, "at least one sample"),
    (_bad(codebook=torch.randn(9, 3)), ValueError, "code dim 3 but latent has 4"),
    (_bad(codebook=torch.randn(0, 4)), ValueError, "codebook must be non-empty"),
    (_bad(codebook=torch.randn(9)), ValueError, "codebook must have 2 dims"),
    (_bad(codebook=torch.randn(9, 4).long()), TypeError, "codebook must have dtype"),
    (_bad(codebook=[[0.0] * 4]), TypeError, "codebook must be a torch.Tensor"),
    (_bad(latent=torch.randn(2, 4, 5, 4)), ValueError, "square"),
    (_bad(schedule=(1, 2, 4)), ValueError, "latent side 5"),
    (_bad(schedule=()), ValueError, "must not be empty"),
    (_bad(schedule=(2, 1, 5)), ValueError, "strictly increasing"),
    (_bad(schedule=(0, 5)), ValueError, "positive"),
    (_bad(schedule=(1.5, 5)), TypeError, "must hold ints"),
    (_bad(mode="rq"), ValueError, "mode"),
    (_bad(phi=3), TypeError, "phi must be callable"),
]


@pytest.mark.parametrize("backend", ["auto", "kernel"])
@pytest.mark.parametrize("kwargs, err, msg", BAD_ENCODE)
def test_msq_encode_rejects_bad_input(kwargs, err, msg, backend):
    with ops.use_backend(backend), pytest.raises(err, match=msg):
        ops.msq_encode(**kwargs)


z4, book4 = torch.randn(2, 4, 5, 5), torch.randn(9, 4)
BAD_FLEXVAR_OP = [
    ((torch.randn(2, 4, 5), book4, [1, 5], True), ValueError, "latent must be 4-D"),
    ((z4.double(), book4, [1, 5], True), TypeError, "latent must be float32, float16 or bfloat16"),
    ((torch.randn(0, 4, 5, 5), book4, [1, 5], True), ValueError, "latent must be non-empty"),
    ((z4, torch.randn(9), [1, 5], True), ValueError, "codebook must be 2-D"),
    ((z4, book4.long(), [1, 5], True), TypeError, "codebook must be float32"),
    ((z4, torch.randn(0, 4), [1, 5], True), ValueError, "codebook must be non-empty"),
    ((z4, torch.randn(9, 6), [1, 5], True), ValueError, "codebook has C=6 features but latent has C=4"),
    ((z4, book4, [], True), ValueError, "schedule must hold at least one side"),
    ((z4, book4, [1, 6], True), ValueError, r"scale side 6 must lie in \[1, min\(H, W\)\] = \[1, 5\]"),
    ((z4, book4, [0, 5], True), ValueError, "scale side 0"),
    ((z4, book4, [1] * 65, True), ValueError, "at most 64"),
]


@pytest.mark.parametrize("args, err, msg", BAD_FLEXVAR_OP)
def test_flexvar_op_checks_in_cpp(args, err, msg):
    with pytest.raises(err, match=msg):
        torch.ops.sar_fast.msq_encode_flexvar(*args)


BAD_VAR_OP = [
    ((z4.half(), None, book4, 2, False, True), TypeError, "rest .the residual. must be float32"),
    ((torch.randn(4, 5, 5), None, book4, 2, False, True), ValueError, "rest must be 4-D"),
    ((z4, None, torch.randn(9, 3), 2, False, True), ValueError, "codebook has C=3"),
    ((z4, None, book4, 6, False, True), ValueError, "scale side 6"),
    ((z4, None, book4, 3, False, False), ValueError, "without upsample the scale side"),
    ((z4, torch.zeros(2, 4, 5, 4), book4, 2, False, True), ValueError, "f_hat has shape"),
    ((z4, torch.zeros(2, 4, 5, 5).half(), book4, 2, False, True), TypeError, "f_hat must be float32"),
    ((z4, z4, book4, 2, False, True), ValueError, "must be different tensors"),
    ((z4, torch.zeros(1, 1, 1, 1).expand(2, 4, 5, 5), book4, 2, False, True), ValueError, "dense"),
]


@pytest.mark.parametrize("args, err, msg", BAD_VAR_OP)
def test_var_step_op_checks_in_cpp(args, err, msg):
    with pytest.raises(err, match=msg):
        torch.ops.sar_fast.msq_var_step(*args)


def test_unknown_cpu_variant_is_a_value_error():
    with pytest.raises(ValueError, match="unknown instruction set 'sse9'"):
        with _C_loader.use_cpu_isa("sse9"):
            pass


def test_ops_trace_with_fake_tensors(gen):
    latent = torch.randn(2, 3, 6, 6, generator=gen)
    codebook = torch.randn(10, 3, generator=gen)
    torch.library.opcheck(torch.ops.sar_fast.msq_encode_flexvar.default, (latent, codebook, [1, 2, 6], True))
    torch.library.opcheck(torch.ops.sar_fast.msq_var_step.default, (latent.clone(), None, codebook, 2, False, True))
    torch.library.opcheck(torch.ops.sar_fast.msq_var_step.default,
                          (latent.clone(), torch.zeros_like(latent), codebook, 2, False, True))


# ------------------------------------------------------------------------------ CUDA
def _assert_near_optimal(codes: torch.Tensor, latent: torch.Tensor, codebook: torch.Tensor,
                         schedule, normalize: bool) -> None:
    """Each code's true (float64) distance is the minimum up to fp32 rounding."""
    z = latent.double().cpu()
    book = F.normalize(codebook.double().cpu(), dim=-1) if normalize else codebook.double().cpu()
    start = 0
    for s in schedule:
        zs = F.interpolate(z, size=(s, s), mode="area").permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        if normalize:
            zs = F.normalize(zs, dim=-1)
        d = torch.cdist(zs, book).square()
        chosen = d.gather(1, codes[:, start:start + s * s].reshape(-1, 1).cpu()).squeeze(1)
        tol = 1e-5 * (zs.square().sum(1) + book.square().sum(1).max())
        assert bool((chosen <= d.min(1).values + tol).all())
        start += s * s


@needs_cuda
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_flexvar_matches_cpu(dtype, normalize, gen):
    latent = torch.randn(4, 32, 16, 16, generator=gen).to(dtype)
    codebook = torch.randn(1000, 32, generator=gen).to(dtype)
    schedule = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    got = encode("kernel", latent.cuda(), codebook.cuda(), schedule, "flexvar", normalize)
    assert got.device.type == "cuda"
    want = encode("kernel", latent, codebook, schedule, "flexvar", normalize)
    # only fp32 near-ties may differ (ATen's CUDA norms round differently from the CPU's)
    assert (got.cpu() == want).float().mean().item() > 0.99
    _assert_near_optimal(got, latent, codebook, schedule, normalize)


@needs_cuda
@pytest.mark.parametrize("dim", [3, 64, 200])
def test_cuda_exact_ties_and_wide_rows(dim, gen):
    latent = torch.randint(-2, 3, (2, dim, 8, 8), generator=gen).float()
    codebook = torch.randint(-2, 3, (700, dim), generator=gen).float()
    want = encode("reference", latent, codebook, (8,), "flexvar", False)
    assert torch.equal(encode("kernel", latent.cuda(), codebook.cuda(), (8,), "flexvar", False).cpu(), want)


@needs_cuda
def test_cuda_var_step_matches_cpu_bit_for_bit_given_the_codes(gen):
    # pooling, bicubic weights and accumulation use the same rounding on both devices
    rest = torch.randn(3, 8, 13, 13, generator=gen)
    codebook = torch.randn(64, 8, generator=gen)
    for side in (1, 4, 9):
        codes_gpu, h_gpu = _C_loader.msq_var_step(rest.cuda(), None, codebook.cuda(), side, False, True)
        codes_cpu, h_cpu = _C_loader.msq_var_step(rest, None, codebook, side, False, True)
        if torch.equal(codes_gpu.cpu(), codes_cpu):
            assert torch.equal(h_gpu.cpu(), h_cpu) and h_gpu.stride() == h_cpu.stride()
        f_hat, rest_gpu = torch.zeros_like(rest).cuda(), rest.cuda()
        _C_loader.msq_var_step(rest_gpu, f_hat, codebook.cuda(), side, False, True)
        assert torch.allclose(f_hat.cpu() + rest_gpu.cpu(), rest, atol=1e-5)


@needs_cuda
def test_cuda_var_encode_matches_reference(gen):
    latent = torch.randn(2, 8, 16, 16, generator=gen)
    codebook = torch.randn(97, 8, generator=gen) * 0.5
    schedule = (1, 2, 4, 8, 16)
    codes, f_hats = encode("kernel", latent.cuda(), codebook.cuda(), schedule, "var", False, None,
                           return_quantized=True)
    want_codes, want_f_hats = encode("reference", latent, codebook, schedule, "var", False, None,
                                     return_quantized=True)
    assert (codes.cpu() == want_codes).float().mean().item() > 0.99
    if torch.equal(codes.cpu(), want_codes):
        torch.testing.assert_close(f_hats[-1].cpu(), want_f_hats[-1], atol=1e-5, rtol=1e-5)


@needs_cuda
def test_cuda_rejects_mixed_devices():
    with pytest.raises(ValueError, match="codebook is on cpu but latent is on cuda"):
        torch.ops.sar_fast.msq_encode_flexvar(torch.randn(2, 4, 5, 5, device="cuda"), torch.randn(9, 4), [5], True)
    with pytest.raises(ValueError, match="f_hat is on"):
        torch.ops.sar_fast.msq_var_step(torch.randn(2, 4, 5, 5, device="cuda"), torch.zeros(2, 4, 5, 5),
                                        torch.randn(9, 4, device="cuda"), 2, False, True)
    with pytest.raises(ValueError, match="codebook is on"):
        ops.msq_encode(torch.randn(2, 4, 5, 5, device="cuda"), torch.randn(9, 4), (1, 5))


def test_missing_extension_error_names_the_build_command(monkeypatch: pytest.MonkeyPatch) -> None:
    import sar_fast._C_loader as loader

    def fail_import(name: str):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(loader, "_extension", None)
    monkeypatch.setattr(loader, "_import_error", None)
    monkeypatch.setattr(loader.importlib, "import_module", fail_import)
    assert not loader.has_extension() and not loader.cuda_compiled()
    with pytest.raises(ImportError, match=r"pip install --no-build-isolation -e \.") as info:
        loader.load_extension()
    assert "python setup.py build_ext --inplace" in str(info.value)
    with pytest.raises(ImportError, match="sar_fast._C"):
        loader.msq_encode_flexvar(torch.randn(1, 2, 4, 4), torch.randn(4, 2), [1, 2], True)


def test_cuda_compiled_flag_is_bool() -> None:
    assert isinstance(_C_loader.load_extension().cuda_compiled(), bool)
