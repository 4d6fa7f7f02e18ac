"""sar_step against the independent oracle (tests/oracles.py): loss and gradients of every
mode a flag allows, both archs, fp32, fixed seeds (both sides draw from the same streams)."""
import itertools

import pytest
import torch

import oracles
from sar_fast.sar import SARConfig, sar_step

from test_sar import SCHED, _setup  # noqa: E402 - the objective tests' one model/batch setup

N = len(SCHED)


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def check_against_oracle(arch, step=1, **kw):  # step 1: transitions='random' picks j=1 < n-2
    model, book, codes, labels, phi = _setup(arch)
    cfg = SARConfig(**{**dict(top_k=20, top_p=0.9, gamma=0.5, hybrid_k=2, seed=11), **kw})
    out = sar_step(model, labels, codes, SCHED, book, cfg, step=step, phi=phi)
    got = _grads(model, out.loss)
    ref = oracles.sar_loss(model, labels, codes, SCHED, book, cfg, step=step, phi=phi)
    want = _grads(model, ref["loss"])
    for key, value in ref.items():
        torch.testing.assert_close(out.metrics[key].double(), value.detach(), atol=2e-6, rtol=2e-5, msg=key)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=2e-6, rtol=1e-4, msg=name)
    return out, ref


SAR_MODES = [dict(transitions=t, csf_target=c, sampling=s, scale_weighting=w)
             for t, c, s, w in itertools.product(("last", "random", "all"), ("sampled", "soft", "gt"),
                                                 ("argmax", "sample", "cfg"), ("token", "scale"))]


@pytest.mark.parametrize("arch", ["flexvar", "var"])
@pytest.mark.parametrize("mode", SAR_MODES, ids=lambda m: "-".join(m.values()))
def test_sar_matches_oracle(arch, mode):
    check_against_oracle(arch, objective="sar", **mode)


@pytest.mark.parametrize("arch", ["flexvar", "var"])
@pytest.mark.parametrize("kw", [dict(sampling="cfg", cfg=1.2), dict(sampling="cfg", cfg=0.8),
                                dict(sampling="sample"), dict(sampling="argmax", label_smoothing=0.1)],
                         ids=["cfg1.2", "cfg0.8-unguided", "sample", "argmax-smoothing"])
def test_official_matches_oracle(arch, kw):
    check_against_oracle(arch, objective="official", **kw)


@pytest.mark.parametrize("arch", ["flexvar", "var"])
@pytest.mark.parametrize("weighting", ["token", "scale"])
def test_teacher_forcing_matches_oracle(arch, weighting):
    check_against_oracle(arch, objective="tf", scale_weighting=weighting, label_smoothing=0.1)


SF_MODES = ([dict(objective="sf_full", sampling=s) for s in ("argmax", "sample", "cfg")]
            + [dict(objective="sf_alternate", sampling="cfg", step=s) for s in (0, 1, 4, 7)]
            + [dict(objective="sf_interleave", sampling=s) for s in ("argmax", "cfg")]
            + [dict(objective="sf_hybrid", sampling="cfg", hybrid_k=k) for k in (1, 2, 3)]
            + [dict(objective="sf_full", sampling="cfg", scale_weighting="scale", label_smoothing=0.1)])


@pytest.mark.parametrize("arch", ["flexvar", "var"])
@pytest.mark.parametrize("mode", SF_MODES, ids=lambda m: "-".join(str(v) for v in m.values()))
def test_naive_student_forcing_matches_oracle(arch, mode):
    check_against_oracle(arch, **mode)


def test_oracle_modes_are_not_vacuous():
    """The options the oracle tests tell apart must actually change the loss here: the
    rollout, the weighting, the transitions, the guidance."""
    model, book, codes, labels, phi = _setup("flexvar")

    def loss(**kw):
        cfg = SARConfig(**{**dict(top_k=20, top_p=0.9, gamma=0.5, hybrid_k=2, seed=11), **kw})
        return float(oracles.sar_loss(model, labels, codes, SCHED, book, cfg, step=3)["loss"].detach())
    tf = loss(objective="tf")
    assert abs(loss(objective="tf", scale_weighting="scale") - tf) > 1e-3
    for obj in ("sf_full", "sf_interleave", "sf_hybrid"):
        assert abs(loss(objective=obj) - tf) > 1e-3, obj
    assert abs(loss(objective="sf_hybrid", hybrid_k=2) - loss(objective="sf_hybrid", hybrid_k=3)) > 1e-4
    assert abs(loss(transitions="all", csf_target="gt", sampling="argmax") - tf) > 1e-3
    assert abs(loss(transitions="all", sampling="cfg", cfg=1.2) - loss(transitions="all", sampling="sample")) > 1e-4
