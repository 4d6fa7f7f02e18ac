"""Public ops: backend switch, validation errors, and agreement with the references."""
import pytest
import torch

from sar_fast import ops
from sar_fast.ops import BackendError, reference


def test_backend_switch_env_and_override(monkeypatch):
    monkeypatch.setenv("SAR_FAST_BACKEND", "reference")
    assert ops.get_backend() == "reference"
    ops.set_backend("auto")
    assert ops.get_backend() == "auto"
    with ops.use_backend("reference"):
        assert ops.get_backend() == "reference"
    assert ops.get_backend() == "auto"
    ops.set_backend(None)
    monkeypatch.setenv("SAR_FAST_BACKEND", "cuda")
    with pytest.raises(ValueError, match="SAR_FAST_BACKEND"):
        ops.get_backend()
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.set_backend("fast")


def test_triton_is_no_backend_name():
    """'kernel' names the op's kernel, Triton or extension alike; 'triton' is not a backend."""
    with pytest.raises(ValueError, match="backend must be one of auto, kernel, reference; got 'triton'"):
        ops.set_backend("triton")
    assert "triton" not in ops.BACKENDS


def test_kernel_request_without_a_kernel_is_an_error_not_a_fallback():
    from sar_fast.ops import backend
    with ops.use_backend("kernel"), pytest.raises(BackendError, match="has no kernel"):
        backend.select("some_op", torch.zeros(1), kernel=None)
    with ops.use_backend("auto"):
        assert backend.select("some_op", torch.zeros(1), kernel=None) == "reference"
    with pytest.raises(ValueError, match="kernel must be one of"):
        backend.select("some_op", torch.zeros(1), kernel="attention")


def test_triton_kernel_on_cpu_needs_the_interpreter(monkeypatch):
    from sar_fast.ops import backend
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(backend, "triton_installed", lambda: True)
    with ops.use_backend("kernel"), pytest.raises(BackendError, match="TRITON_INTERPRET=1"):
        backend.select("x", torch.zeros(1), kernel=backend.TRITON)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with ops.use_backend("kernel"):
        assert backend.select("x", torch.zeros(1), kernel=backend.TRITON) == "kernel"
    with ops.use_backend("auto"):  # auto never picks Triton for CPU tensors
        assert backend.select("x", torch.zeros(1), kernel=backend.TRITON) == "reference"


def test_triton_kernel_without_triton_names_what_to_install(monkeypatch):
    from sar_fast.ops import backend
    monkeypatch.setattr(backend, "triton_installed", lambda: False)
    missing = r"x: .*triton is not installed \(pip install triton"
    with ops.use_backend("kernel"), pytest.raises(BackendError, match=missing):
        backend.select("x", torch.zeros(1), kernel=backend.TRITON)
    with ops.use_backend("auto"):
        assert backend.select("x", torch.zeros(1), kernel=backend.TRITON) == "reference"


def test_one_selection_for_the_extension_ops(monkeypatch):
    """The extension's ops go through the same select as the Triton ones: auto takes the
    extension wherever it can run, 'kernel' says why it cannot, 'reference' never takes it."""
    from sar_fast import _C_loader
    from sar_fast.ops import backend
    cpu, meta = torch.zeros(1), torch.zeros(1, device="meta")
    monkeypatch.setattr(_C_loader, "has_extension", lambda: True)
    for kind in (backend.EXTENSION, backend.EXTENSION_CPU):
        with ops.use_backend("auto"):
            assert backend.select("x", cpu, kernel=kind) == "kernel"
        with ops.use_backend("kernel"):
            assert backend.select("x", cpu, kernel=kind) == "kernel"
        with ops.use_backend("reference"):
            assert backend.select("x", cpu, kernel=kind) == "reference"
    with ops.use_backend("auto"):  # a CPU-only op on other tensors: the reference
        assert backend.select("x", meta, kernel=backend.EXTENSION_CPU) == "reference"
    with ops.use_backend("kernel"), pytest.raises(BackendError, match="CPU tensors only; the inputs are on meta"):
        backend.select("x", meta, kernel=backend.EXTENSION_CPU)
    monkeypatch.setattr(_C_loader, "has_extension", lambda: False)
    with ops.use_backend("auto"):
        assert backend.select("x", cpu, kernel=backend.EXTENSION) == "reference"
    with ops.use_backend("kernel"), pytest.raises(BackendError, match="x: .*sar_fast._C is not built"):
        backend.select("x", cpu, kernel=backend.EXTENSION)


def test_scale_shift_codes_and_dense_agree():
    sched, book = (1, 2, 3), torch.randn(9, 4)
    codes = torch.randint(0, 9, (2, 14))
    a = ops.scale_shift(codes, book, sched)
    maps = [m.clone().requires_grad_() for m in reference.embed_scales(codes, book, sched)]
    b = ops.scale_shift(scales=maps, schedule=sched)
    torch.testing.assert_close(a, b)
    b.square().sum().backward()  # dense latents are differentiable
    assert maps[0].grad.abs().sum() > 0 and maps[-1].grad is None  # the last scale feeds nothing


@pytest.mark.parametrize("kwargs, err, msg", [
    (dict(codes=torch.randint(0, 9, (2, 13))), ValueError, "schedule"),
    (dict(codes=torch.randint(0, 9, (2, 14)).float()), TypeError, "codes must have dtype"),
    (dict(codes=torch.full((2, 14), 9)), ValueError, r"codes must lie in \[0, 9\)"),
    (dict(codes=torch.full((2, 14), -1)), ValueError, "codes must lie"),
    (dict(codes=torch.zeros(14, dtype=torch.long)), ValueError, "codes must have 2 dims"),
])
def test_scale_shift_bad_input(kwargs, err, msg):
    with pytest.raises(err, match=msg):
        ops.scale_shift(codebook=torch.randn(9, 4), schedule=(1, 2, 3), **kwargs)


def test_scale_shift_bad_dense_input():
    with pytest.raises(ValueError, match=r"scales\[1\] must have shape"):
        ops.scale_shift(scales=[torch.randn(2, 4, 1, 1), torch.randn(2, 4, 3, 3)], schedule=(1, 2))
    with pytest.raises(ValueError, match="either codes"):
        ops.scale_shift(schedule=(1, 2))


@pytest.mark.parametrize("q, k, lens, err, msg", [
    (torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), (1, 3), ValueError, "sum to 4"),
    (torch.randn(2, 5, 8), torch.randn(2, 5, 8), (1, 4), ValueError, "q must have 4 dims"),
    (torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 4), (1, 4), ValueError, "k must have shape"),
    (torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8).half(), (1, 4), TypeError, "k must have dtype"),
    (torch.randn(1, 2, 5, 8).long(), torch.randn(1, 2, 5, 8).long(), (1, 4), TypeError, "q must have dtype"),
    (torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), (0, 5), ValueError, "positive"),
])
def test_attention_bad_input(q, k, lens, err, msg):
    with pytest.raises(err, match=msg):
        ops.scale_causal_attention(q, k, k, lens)


@pytest.mark.parametrize("D", [16, 32])
def test_attention_kernel_matches_reference(D):
    """Forced "kernel" (head dims the kernel takes): the kernel runs, or the call raises."""
    from conftest import KERNEL_DEVICE
    q, k, v = (torch.randn(2, 2, 14, D, device=KERNEL_DEVICE) for _ in range(3))
    want = reference.scale_causal_attention(q, k, v, (1, 4, 9))
    with ops.use_backend("kernel"):
        got = ops.scale_causal_attention(q, k, v, (1, 4, 9))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    with ops.use_backend("kernel"), pytest.raises(ValueError, match="head dims"):
        ops.scale_causal_attention(q[..., :8], k[..., :8], v[..., :8], (1, 4, 9))


def test_cross_entropy_bad_input():
    h, w, t = torch.randn(5, 4), torch.randn(7, 4), torch.randint(0, 7, (5,))
    with pytest.raises(ValueError, match=r"target must lie in \[0, 7\)"):
        ops.fused_linear_cross_entropy(h, w, None, torch.full((5,), 7))
    with pytest.raises(ValueError, match="weight must have shape"):
        ops.fused_linear_cross_entropy(h, torch.randn(7, 3), None, t)
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.fused_linear_cross_entropy(h, w, torch.randn(6), t)
    with pytest.raises(TypeError, match="target must have dtype"):
        ops.fused_linear_cross_entropy(h, w, None, t.float())
    with pytest.raises(ValueError, match="reduction"):
        ops.fused_linear_cross_entropy(h, w, None, t, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        ops.fused_linear_cross_entropy(h, w, None, t, label_smoothing=1.5)
    t2 = t.clone()
    t2[0] = -100  # ignored tokens are not range-checked
    ops.fused_linear_cross_entropy(h, w, None, t2)


def test_cross_entropy_gradients_flow():
    h = torch.randn(6, 4, requires_grad=True)
    w = torch.randn(9, 4, requires_grad=True)
    loss = ops.fused_linear_cross_entropy(h, w, None, torch.randint(0, 9, (6,)))
    loss.backward()
    assert h.grad.abs().sum() > 0 and w.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs, err, msg", [
    (dict(latent=torch.randn(2, 4, 5)), ValueError, "latent must have 4 dims"),
    (dict(latent=torch.randn(2, 3, 5, 5)), ValueError, "code dim 4 but latent has 3"),
    (dict(latent=torch.randn(2, 4, 5, 4)), ValueError, "square"),
    (dict(schedule=(1, 2, 4)), ValueError, "latent side 5"),
    (dict(mode="rq"), ValueError, "mode"),
    (dict(codebook=torch.randn(9, 4).long()), TypeError, "codebook must have dtype"),
    (dict(phi=3), TypeError, "phi must be callable"),
])
def test_msq_encode_bad_input(kwargs, err, msg):
    args = dict(latent=torch.randn(2, 4, 5, 5), codebook=torch.randn(9, 4), schedule=(1, 2, 5))
    args.update(kwargs)
    with pytest.raises(err, match=msg):
        ops.msq_encode(**args)


def test_msq_roundtrip_and_decode_errors():
    book = torch.randn(9, 4)
    z = torch.randn(2, 4, 5, 5)
    codes = ops.msq_encode(z, book, (1, 2, 5))
    assert codes.dtype == torch.int64 and codes.shape == (2, 30)
    # re-encoding the decoded latent gives the same last-scale codes
    again = ops.msq_encode(ops.msq_decode(codes, book, (1, 2, 5)), book, (1, 2, 5))
    assert torch.equal(again[:, 5:], codes[:, 5:])
    with pytest.raises(ValueError, match="has 30"):
        ops.msq_decode(codes[:, :29], book, (1, 2, 5))
    with pytest.raises(ValueError, match="codes must lie"):
        ops.msq_decode(codes + 9, book, (1, 2, 5))


def test_device_mismatch_is_named():
    """Tensors on different devices fail early, naming the argument (meta stands in for a GPU)."""
    q = torch.randn(1, 1, 5, 8)
    with pytest.raises(ValueError, match="k is on meta"):
        ops.scale_causal_attention(q, q.to("meta"), q, (1, 4))
    with pytest.raises(ValueError, match="codebook is on meta"):
        ops.msq_encode(torch.randn(1, 4, 5, 5), torch.randn(9, 4, device="meta"), (1, 5))
    with pytest.raises(ValueError, match="weight is on meta"):
        ops.fused_linear_cross_entropy(torch.randn(3, 4), torch.randn(7, 4, device="meta"), None,
                                       torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="codebook is on meta"):
        ops.scale_shift(torch.zeros(1, 5, dtype=torch.long), torch.randn(9, 4, device="meta"), (1, 2))


def test_to_device_async_pins_and_does_not_block_only_for_cuda(monkeypatch):
    """The one host-to-device copy of the launch tables (attention layouts, scale-shift
    tables, the loader's token index): pinned and non-blocking to a GPU, plain elsewhere."""
    from sar_fast.ops.gpu import to_device_async
    t = torch.arange(5, dtype=torch.int32)
    out = to_device_async(t, "cpu")
    assert torch.equal(out, t)
    calls = []

    class Pinned:
        def to(self, device, non_blocking=False):
            calls.append((device, non_blocking))
            return "copied"

    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: calls.append("pin") or Pinned())
    assert to_device_async(t, "cuda:1") == "copied"
    assert calls == ["pin", (torch.device("cuda", 1), True)]
    calls.clear()
    to_device_async(t, torch.device("cpu"))
    assert calls == []
