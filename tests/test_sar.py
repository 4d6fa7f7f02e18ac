"""The SAR objective: official == default (loss and gradients), every mode runs and trains."""
import pytest
import torch
import torch.nn.functional as F

from sar_fast.models import build_model
from sar_fast.sar import OFFICIAL, SARConfig, sar_step

SCHED = (1, 2, 3, 5)


def _setup(arch, seed=0):
    torch.manual_seed(seed)
    model = build_model(f"{arch}-tiny", cond_drop_rate=0.0, schedule=SCHED)
    for p in model.parameters():  # random weights so that every path matters
        p.data.normal_(0, 0.1)
    book = F.normalize(torch.randn(64, 8), dim=-1)
    codes = torch.randint(0, 64, (3, 39))
    labels = torch.tensor([1, 2, 3])
    phi = (lambda h, i, n: 0.7 * h + 0.1 * i) if arch == "var" else None
    return model, book, codes, labels, phi


def _loss_and_grads(model, labels, codes, book, cfg, phi, step):
    model.zero_grad()
    out = sar_step(model, labels, codes, SCHED, book, cfg, step=step, phi=phi)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


def _ssr_codes(seed=5):
    """The same SSR codes for both objectives (the last transition reads scales 2 and 3)."""
    g = torch.Generator().manual_seed(seed)
    return {si: torch.randint(0, 64, (3, SCHED[si] ** 2), generator=g) for si in (2, 3)}


# official and the default draw differently (official: the public code's multinomial over V
# from a per-(step, scale) generator; default: inverse CDF over the top-k candidates with
# uniforms keyed by the global row, tests/test_sampler.py shows the same distribution), so
# the two are compared where their draws coincide by construction: greedy draws (argmax
# sampling, or top_k = 1 on the guided logits, which also checks the null-class prefix pass
# and the guidance ramp) and the same injected SSR codes (sampling / cfg).
@pytest.mark.parametrize("arch", ["flexvar", "var"])
@pytest.mark.parametrize("sampling, top_k, inject", [
    ("argmax", 20, False), ("cfg", 1, False), ("sample", 1, False), ("cfg", 20, True), ("sample", 20, True)])
def test_official_and_default_give_equal_loss_and_gradients(arch, sampling, top_k, inject):
    model, book, codes, labels, phi = _setup(arch)
    official = SARConfig(**{**OFFICIAL, "sampling": sampling, "top_k": top_k, "gamma": 0.5, "cfg": 1.5})
    default = SARConfig(**{**official.to_dict(), "objective": "sar"})
    for step in (0, 1, 7):
        ssr = _ssr_codes(step) if inject else None
        model.zero_grad()
        a = sar_step(model, labels, codes, SCHED, book, official, step=step, phi=phi, ssr_codes=ssr)
        a.loss.backward()
        ga = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        b = sar_step(model, labels, codes, SCHED, book, default, step=step, phi=phi, ssr_codes=ssr)
        b.loss.backward()
        gb = {n: p.grad.clone() for n, p in model.named_parameters()}
        for key in ("loss", "tf_loss", "csf_loss"):
            torch.testing.assert_close(a.metrics[key], b.metrics[key], atol=1e-6, rtol=1e-6)
        for name in ga:
            torch.testing.assert_close(ga[name], gb[name], atol=1e-6, rtol=1e-5, msg=name)
        torch.testing.assert_close(a.scale_stats, b.scale_stats, atol=1e-4, rtol=1e-5)


def test_injected_ssr_codes_are_used():
    """The seam the comparison above relies on: other codes, another CSF loss."""
    model, book, codes, labels, phi = _setup("flexvar")
    for objective in ("sar", "official"):
        cfg = SARConfig(**{**OFFICIAL, "objective": objective, "gamma": 0.5})
        a = sar_step(model, labels, codes, SCHED, book, cfg, phi=phi, ssr_codes=_ssr_codes(1))
        b = sar_step(model, labels, codes, SCHED, book, cfg, phi=phi, ssr_codes=_ssr_codes(2))
        assert abs(a.metrics["csf_loss"] - b.metrics["csf_loss"]) > 1e-3, objective


def test_default_draws_are_keyed_by_global_row(monkeypatch):
    """A row's SSR draw depends on its global index, not on its place in the local batch."""
    import sar_fast.sar as sar_mod
    model, book, codes, labels, phi = _setup("flexvar")
    cfg = SARConfig(**{**OFFICIAL, "objective": "sar", "top_k": 0, "top_p": 0.0})
    csf = sar_mod._csf

    def drawn(rows, part=slice(None)):
        seen = {}

        def spy(*args):  # _csf(model, labels, codes, schedule, inputs, config, js, preds, tf_logits)
            seen.update(args[7])
            return csf(*args)
        monkeypatch.setattr(sar_mod, "_csf", spy)
        sar_step(model, labels[part], codes[part], SCHED, book, cfg, step=3, phi=phi, rows=torch.tensor(rows))
        return seen
    full = drawn([10, 11, 12])
    alone = drawn([11, 12], slice(1, None))  # the rows another rank (or micro-batch) would hold
    assert full.keys() == alone.keys() == {2, 3}
    for si in full:
        assert torch.equal(alone[si], full[si][1:]), si
    other = drawn([20, 21, 22])
    assert any(not torch.equal(other[si], full[si]) for si in full)


MODES = [dict(objective="tf")] + [
    dict(objective="sar", transitions=t, csf_target=c, sampling=s)
    for t in ("last", "random", "all") for c in ("sampled", "soft", "gt") for s in ("argmax", "cfg")
] + [dict(objective=o) for o in ("official", "sf_full", "sf_alternate", "sf_interleave", "sf_hybrid")] + [
    dict(objective="sar", transitions="all", scale_weighting="scale", label_smoothing=0.1)]


@pytest.mark.parametrize("objective", ["sf_full", "sf_hybrid"])
def test_student_forcing_rollouts_are_keyed_by_global_row(monkeypatch, objective):
    """A row's rollout depends on its global index, not on the batch it is in (what made
    1 rank == 2 ranks fail for sf_*: one generator per (step, scale) for the whole batch)."""
    import sar_fast.models.transformer as tr
    model, book, codes, labels, phi = _setup("flexvar")
    cfg = SARConfig(objective=objective, sampling="cfg", cfg=1.5, top_k=30, top_p=0.9, hybrid_k=2)
    generate = tr.ScaleAR.generate
    seen = []

    def spy(self, *args, **kwargs):
        out = generate(self, *args, **kwargs)
        seen.append(torch.cat(out.codes, dim=1))
        return out
    monkeypatch.setattr(tr.ScaleAR, "generate", spy)

    def rollout(rows, part=slice(None)):
        seen.clear()
        sar_step(model, labels[part], codes[part], SCHED, book, cfg, step=1, phi=phi, rows=torch.tensor(rows))
        return seen[0]
    full = rollout([10, 11, 12])
    assert torch.equal(rollout([11, 12], slice(1, None)), full[1:])
    assert not torch.equal(rollout([20, 21, 22]), full)


@pytest.mark.parametrize("arch", ["flexvar", "var"])
@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(f"{v}" for v in m.values()))
def test_every_mode_is_finite_and_trains(arch, mode):
    model, book, codes, labels, phi = _setup(arch)
    cfg = SARConfig(top_k=20, gamma=0.5, hybrid_k=2, **mode)
    out, grads = _loss_and_grads(model, labels, codes, book, cfg, phi, step=3)
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(v) for v in out.metrics.values())
    assert out.scale_stats.shape == (len(SCHED), 3)
    assert sum(g.abs().sum() for g in grads.values()) > 0
    if "csf_loss" in out.metrics:
        assert out.metrics["csf_loss"] >= 0


def test_transition_all_csf_depends_on_every_scale_prediction():
    """With 'all', the SF pass sees self-generated inputs at every scale >= 1."""
    model, book, codes, labels, phi = _setup("flexvar")
    cfg = SARConfig(objective="sar", transitions="all", sampling="argmax", csf_target="gt")
    out = sar_step(model, labels, codes, SCHED, book, cfg)
    tf = sar_step(model, labels, codes, SCHED, book, SARConfig(objective="tf"))
    assert not torch.allclose(out.metrics["csf_loss"], tf.metrics["tf_loss"])


def test_random_transition_is_seeded_and_varies():
    from sar_fast.sar import _needed_scales
    cfg = SARConfig(transitions="random")
    picks = [_needed_scales(cfg, 10, step)[0][0] for step in range(200)]
    assert picks == [_needed_scales(cfg, 10, step)[0][0] for step in range(200)]
    assert set(picks) == set(range(9))


@pytest.mark.parametrize("kwargs, msg", [
    (dict(objective="mle"), "objective"), (dict(transitions="first"), "transitions"),
    (dict(sampling="greedy"), "sampling"), (dict(csf_target="teacher"), "csf_target"),
    (dict(gamma=-1), "gamma"), (dict(top_p=2.0), "top_p"), (dict(label_smoothing=1.0), "label_smoothing"),
    (dict(objective="official", transitions="all"), "official"),
])
def test_bad_config(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        SARConfig(**kwargs)


def test_bad_batch():
    model, book, codes, labels, phi = _setup("flexvar")
    with pytest.raises(ValueError, match="codes has 30 tokens"):
        sar_step(model, labels, codes[:, :30], SCHED, book, SARConfig())
    with pytest.raises(ValueError, match="at least two scales"):
        sar_step(model, labels, codes[:, :1], (1,), book, SARConfig())


@pytest.mark.parametrize("transitions, csf_target", [("last", "sampled"), ("all", "soft")])
def test_sar_step_through_triton_kernels_matches_reference(transitions, csf_target):
    """scale_shift, attention and the fused losses under the interpreter give the reference's
    loss and gradients for a whole SAR step."""
    from conftest import KERNEL_DEVICE
    from sar_fast import ops
    model, book, codes, labels, phi = _setup("flexvar")
    model, book, codes, labels = (t.to(KERNEL_DEVICE) for t in (model, book, codes, labels))
    cfg = SARConfig(transitions=transitions, csf_target=csf_target, sampling="argmax", gamma=0.5)
    with ops.use_backend("reference"):
        a, ga = _loss_and_grads(model, labels, codes, book, cfg, phi, 0)
    with ops.use_backend("kernel"):
        b, gb = _loss_and_grads(model, labels, codes, book, cfg, phi, 0)
    for key in ("loss", "tf_loss", "csf_loss"):
        torch.testing.assert_close(a.metrics[key], b.metrics[key], atol=1e-5, rtol=1e-5)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], atol=1e-5, rtol=1e-4, msg=name)
