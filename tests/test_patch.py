"""sar_fast.patch on stand-ins of the original VAR / FlexVAR / SAR classes (tests/standins):
patched == unpatched (outputs, gradients, samples, tokenizer), per instance, reversible,
state_dict untouched, and clear errors for what the kernels cannot express."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from sar_fast import ops
from sar_fast.nn import FusedLinearCrossEntropy
from sar_fast.patch import PatchError, hidden_states, is_patched, patch_flexvar, patch_model, patch_var, unpatch
from standins.flexvar_like import FlexVAR, VARTrainer, VQModel
from standins.var_like import VAR, VQVAE, SelfAttention

BACKENDS = ["reference", "kernel"]  # kernel: the Triton kernels under TRITON_INTERPRET=1 on the CPU
TOL = dict(atol=2e-5, rtol=1e-4)


def _var(patch_nums=(1, 2, 3), embed_dim=64, num_heads=2, znorm=False, **kw):
    vae = VQVAE(vocab_size=48, z_channels=8, v_patch_nums=patch_nums, using_znorm=znorm)
    return VAR(vae, embed_dim=embed_dim, num_heads=num_heads, patch_nums=patch_nums, **kw), vae


def _flexvar(**kw):
    vae = VQModel(codebook_size=40, codebook_embed_dim=8)
    return FlexVAR(vae, embed_dim=64, num_heads=2, **kw), vae


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(a: dict, b: dict):
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


class _Spy:
    """Counts calls of the sar_fast.ops entry points the patch routes through."""
    def __init__(self, monkeypatch):
        self.calls = {}
        for name in ("scale_causal_attention", "cached_attention", "msq_encode", "scale_shift"):
            real = getattr(ops, name)
            monkeypatch.setattr(ops, name, self._wrap(name, real))

    def _wrap(self, name, real):
        def counted(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            return real(*args, **kwargs)
        return counted


def _run(model, fn, seed=1):
    """Output and parameter gradients of fn(model) -> tensor, on a fixed label-dropout seed."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = fn(model)
    (out.float().square().mean() + out.float().mean()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


def _assert_run_equal(a, b):
    torch.testing.assert_close(a[0], b[0], **TOL)
    assert a[1].keys() == b[1].keys() and len(a[1]) > 10
    for n in a[1]:
        torch.testing.assert_close(a[1][n], b[1][n], **TOL, msg=lambda m, n=n: f"grad of {n}: {m}")


# ------------------------------------------------------------------------------------------
# VAR
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("l2_norm", [True, False])
def test_var_training_step_equal(backend, l2_norm, monkeypatch):
    model, vae = _var(attn_l2_norm=l2_norm)
    img = torch.randn(3, 3, 12, 12)
    labels = torch.tensor([0, 4, 9])

    def step(m):
        x = vae.quantize.idxBl_to_var_input(vae.img_to_idxBl(img))
        return m(labels, x)

    before, state = _run(model, step), _snapshot(model)
    spy = _Spy(monkeypatch)
    report = patch_model(model)
    assert report.family == "VAR" and not report.left_alone and len(report.patched) == 4
    with ops.use_backend(backend):
        after = _run(model, step)
    _assert_run_equal(before, after)
    assert spy.calls["scale_causal_attention"] == model.depth  # the fused op really ran
    assert spy.calls["msq_encode"] == 1 and spy.calls["scale_shift"] == 1
    _same_state(state, _snapshot(model))


@pytest.mark.parametrize("znorm", [False, True])
def test_var_tokenizer_equal(znorm):
    model, vae = _var(patch_nums=(1, 2, 3, 5), znorm=znorm)
    f = torch.randn(2, 8, 5, 5)
    q = vae.quantize
    codes, fhat = q.f_to_idxBl_or_fhat(f, to_fhat=False), q.f_to_idxBl_or_fhat(f, to_fhat=True)
    x = q.idxBl_to_var_input(codes)
    patch_var(model)
    codes_p, fhat_p = q.f_to_idxBl_or_fhat(f, to_fhat=False), q.f_to_idxBl_or_fhat(f, to_fhat=True)
    assert [c.shape for c in codes_p] == [(2, 1), (2, 4), (2, 9), (2, 25)]
    for a, b in zip(codes, codes_p):
        assert torch.equal(a, b)
    for a, b in zip(fhat, fhat_p):
        torch.testing.assert_close(a, b, **TOL)
    x_p = q.idxBl_to_var_input(codes)
    assert x_p.dtype == torch.float32 and x_p.shape == x.shape == (2, 4 + 9 + 25, 8)
    torch.testing.assert_close(x, x_p, **TOL)
    torch.testing.assert_close(q.idxBl_to_var_input(codes[:-1]), x, **TOL)  # the last scale is unread


def test_var_progressive_training_runs_the_original(monkeypatch):
    model, vae = _var(patch_nums=(1, 2, 3))
    patch_var(model)
    spy = _Spy(monkeypatch)
    vae.quantize.prog_si = 1
    vae.quantize.f_to_idxBl_or_fhat(torch.randn(1, 8, 3, 3), to_fhat=False)
    assert "msq_encode" not in spy.calls


@pytest.mark.parametrize("backend", BACKENDS)
def test_var_kv_cache_sampling_equal(backend, monkeypatch):
    model, _ = _var(patch_nums=(1, 2, 3, 4))
    model.eval()
    labels = torch.tensor([3, 7])
    codes, f_hat = model.autoregressive_infer_cfg(2, labels, cfg=2.0)
    patch_model(model)
    spy = _Spy(monkeypatch)
    with ops.use_backend(backend):
        codes_p, f_hat_p = model.autoregressive_infer_cfg(2, labels, cfg=2.0)
    assert spy.calls["cached_attention"] == 4 * model.depth and "scale_causal_attention" not in spy.calls
    for a, b in zip(codes, codes_p):
        assert torch.equal(a, b)
    torch.testing.assert_close(f_hat, f_hat_p, **TOL)
    assert all(b.attn.cached_k is None for b in model.blocks)


def test_var_progressive_prefix_layout():
    """VAR's prog_si slices the mask to the first scales: the layout follows the prefix."""
    model, vae = _var(patch_nums=(1, 2, 3))
    model.prog_si = 1  # scales 0..1: 5 tokens
    x = torch.randn(2, 4, 8)
    labels = torch.tensor([1, 2])
    before = _run(model, lambda m: m(labels, x))
    patch_var(model)
    _assert_run_equal(before, _run(model, lambda m: m(labels, x)))


# ------------------------------------------------------------------------------------------
# FlexVAR / SAR
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_flexvar_random_schedules_and_student_forcing_equal(backend, monkeypatch):
    model, vae = _flexvar()
    trainer = VARTrainer(vae)
    img = torch.randn(2, 3, 24, 24)  # latent 6 x 6
    labels = torch.tensor([2, 5])
    calls = [
        lambda m: m(labels, trainer.encode_var_wo_firstL(img, [1, 2, 4, 6])[0], [1, 2, 4, 6]),
        lambda m: m(labels, trainer.encode_var_wo_firstL(img, [1, 3, 5, 6])[0], [1, 3, 5, 6]),
        # SAR's student-forcing pass: [class token] + one scale's inputs, layout [1, n]
        lambda m: m(labels, torch.randn(2, 25, 8, generator=torch.Generator().manual_seed(3)), [1, 5],
                    student_forcing=True),
    ]
    before = [_run(model, c) for c in calls]
    state = _snapshot(model)
    spy = _Spy(monkeypatch)
    report = patch_flexvar(model, trainer=trainer)
    assert "update_patch_related" in report.patched and "trainer.encode_var_wo_firstL" in report.patched
    with ops.use_backend(backend):
        after = [_run(model, c) for c in calls]
    for a, b in zip(before, after):
        _assert_run_equal(a, b)
    assert after[2][0].shape == (2, 25, 40)
    assert spy.calls["scale_causal_attention"] == 3 * model.depth and spy.calls["msq_encode"] == 2
    assert model.patch_nums == [1, 5] and model.L == 26 and model.begin_ends == [(0, 1), (1, 26)]
    _same_state(state, _snapshot(model))  # no bias rebuilt: the buffer keeps its value


@pytest.mark.parametrize("backend", BACKENDS)
def test_flexvar_kv_cache_sampling_equal(backend):
    model, vae = _flexvar()
    model.eval()
    labels = torch.tensor([1, 8])
    codes = model.autoregressive_infer_cfg(vae, 2, labels, [1, 2, 3, 5], cfg=3.0)
    patch_model(model)
    with ops.use_backend(backend):
        codes_p = model.autoregressive_infer_cfg(vae, 2, labels, [1, 2, 3, 5], cfg=3.0)
    for a, b in zip(codes, codes_p):
        assert torch.equal(a, b)


def test_flexvar_trainer_encode_equal_and_training_quantizer_falls_back(monkeypatch):
    model, vae = _flexvar()
    trainer = VARTrainer(vae)
    img = torch.randn(3, 3, 20, 20)
    x, codes = trainer.encode_var_wo_firstL(img, [1, 2, 3, 5])
    patch_flexvar(model, trainer=trainer)
    spy = _Spy(monkeypatch)
    vae.eval()
    x_p, codes_p = trainer.encode_var_wo_firstL(img, [1, 2, 3, 5])
    assert torch.equal(codes, codes_p) and x_p.shape == x.shape == (3, 4 + 9 + 25, 8)
    torch.testing.assert_close(x, x_p, **TOL)
    assert spy.calls["msq_encode"] == 1
    vae.train()  # the original updates codebook_used in training mode: it must still run
    used = vae.quantize.codebook_used.clone()
    trainer.encode_var_wo_firstL(img, [1, 2, 3, 5])
    assert spy.calls["msq_encode"] == 1 and not torch.equal(used, vae.quantize.codebook_used)


# ------------------------------------------------------------------------------------------
# per instance, reversible
# ------------------------------------------------------------------------------------------
def test_unpatch_restores_the_original_methods():
    model, vae = _var()
    fx, fvae = _flexvar()
    trainer = VARTrainer(fvae)
    patch_var(model)
    patch_flexvar(fx, trainer=trainer)
    assert is_patched(model) and "forward" in model.blocks[0].attn.__dict__
    unpatch(model)
    unpatch(fx)
    for m in (model, fx):
        for b in m.blocks:
            assert "forward" not in b.attn.__dict__ and b.attn.forward.__func__ is SelfAttention.forward
    q = vae.quantize
    assert "f_to_idxBl_or_fhat" not in q.__dict__ and "idxBl_to_var_input" not in q.__dict__
    assert q.f_to_idxBl_or_fhat.__func__ is type(q).f_to_idxBl_or_fhat
    assert "update_patch_related" not in fx.__dict__ and "encode_var_wo_firstL" not in trainer.__dict__
    assert not is_patched(model)
    with pytest.raises(PatchError, match="not patched"):
        unpatch(model)
    # unpatched FlexVAR rebuilds its bias per call again
    fx(torch.tensor([1]), torch.randn(1, 4, 8), [1, 2])
    assert fx.attn_bias_for_masking.shape == (1, 1, 5, 5)


def test_two_instances_patched_differently():
    class_forward = SelfAttention.forward
    a, vae_a = _var()
    b, vae_b = _var()
    patch_var(a, tokenizer=False)
    patch_var(b, attention=False)
    assert all("forward" in blk.attn.__dict__ for blk in a.blocks)
    assert all("forward" not in blk.attn.__dict__ for blk in b.blocks)
    assert "f_to_idxBl_or_fhat" not in vae_a.quantize.__dict__ and "f_to_idxBl_or_fhat" in vae_b.quantize.__dict__
    assert SelfAttention.forward is class_forward  # the class is untouched
    with pytest.raises(PatchError, match="already patched"):
        patch_var(a)


def test_state_dict_loads_across_patched_and_unpatched():
    a, _ = _var()
    b, _ = _var()
    patch_var(a)
    b.load_state_dict(a.state_dict())
    a.load_state_dict(b.state_dict())
    assert list(a.state_dict()) == list(b.state_dict())


# ------------------------------------------------------------------------------------------
# what cannot be patched: clear errors at patch time, strict=False report
# ------------------------------------------------------------------------------------------
def test_unknown_class_is_refused():
    with pytest.raises(PatchError, match="unknown class torch.nn.modules.linear.Linear"):
        patch_model(torch.nn.Linear(2, 2))
    with pytest.raises(PatchError, match="expects a VAR"):
        patch_var(_flexvar()[0])


def test_unsupported_head_dim_names_the_attribute():
    model, _ = _var(embed_dim=48, num_heads=2)  # head dim 24
    state = _snapshot(model)
    with pytest.raises(PatchError, match=r"SelfAttention.head_dim=24"):
        patch_model(model)
    assert not is_patched(model) and all("forward" not in b.attn.__dict__ for b in model.blocks)
    report = patch_model(model, strict=False)  # the tokenizer still gets patched
    assert report.patched == ["vae_quant_proxy[0].f_to_idxBl_or_fhat", "vae_quant_proxy[0].idxBl_to_var_input"]
    assert [w for w, _ in report.left_alone] == ["blocks.0.attn", "blocks.1.attn"]
    assert "head_dim=24" in str(report)
    _same_state(state, _snapshot(model))


def test_attention_dropout_is_refused():
    model, _ = _var(attn_drop_rate=0.1)
    with pytest.raises(PatchError, match="SelfAttention.attn_drop=0.1"):
        patch_var(model)


def test_mask_the_kernel_cannot_express_is_refused():
    model, _ = _var(patch_nums=(1, 2, 3))
    model.attn_bias_for_masking[..., 5:, 0] = float("-inf")  # a custom mask, not block-causal
    with pytest.raises(PatchError, match="VAR.attn_bias_for_masking is not the block-causal mask"):
        patch_var(model)


def test_missing_attribute_is_named():
    model, _ = _var()
    del model.blocks[1].attn.zero_k_bias
    with pytest.raises(PatchError, match=r"SelfAttention.zero_k_bias missing"):
        patch_var(model)
    report = patch_var(model, strict=False)
    assert "blocks.0.attn.forward" in report.patched and "blocks.1.attn.forward" not in report.patched


def test_non_square_patch_nums_are_refused():
    model, _ = _var(patch_nums=(1, 2))
    model.patch_nums = ((1, 1), (2, 3))
    with pytest.raises(PatchError, match="only square"):
        patch_var(model, tokenizer=False)


def test_blocks_called_outside_the_layout_fail_loudly():
    model, _ = _var(patch_nums=(1, 2, 3))
    patch_var(model)
    with pytest.raises(RuntimeError, match="no scale prefix"):
        model.blocks[0].attn(torch.randn(1, 7, 64), attn_bias=model.attn_bias_for_masking[:, :, :7, :7])


# ------------------------------------------------------------------------------------------
# the loss side: hidden_states + FusedLinearCrossEntropy == logits + CrossEntropyLoss
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_loss_on_hidden_states_equals_head_and_ce(backend):
    model, vae = _flexvar()
    x, labels = torch.randn(2, 13, 8), torch.tensor([1, 2])
    gt = torch.randint(0, 40, (2, 14))
    weight = torch.full((1, 14), 1 / 14)

    def original(m):
        logits = m(labels, x, [1, 2, 3])
        ce = F.cross_entropy(logits.view(-1, 40), gt.view(-1), label_smoothing=0.1, reduction="none")
        return ce.view(2, -1).mul(weight).sum(-1)

    loss_fn = FusedLinearCrossEntropy(model.head, label_smoothing=0.1)

    def fused(m):
        with hidden_states(m):
            h = m(labels, x, [1, 2, 3])
        assert h.shape == (2, 14, 64)
        return loss_fn(h, gt, token_weight=weight.expand(2, -1)).sum(-1)

    before = _run(model, original)
    patch_model(model)
    with ops.use_backend(backend):
        after = _run(model, fused)
    _assert_run_equal(before, after)
    assert "forward" not in model.head.__dict__  # restored after the block
    assert model(labels, x, [1, 2, 3]).shape == (2, 14, 40)
