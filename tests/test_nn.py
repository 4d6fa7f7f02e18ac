"""sar_fast.nn.FusedLinearCrossEntropy / FusedLinearKLDiv against head(x) + torch's losses,
computed in float64 (an independent oracle), values and gradients, both backends."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sar_fast import ops
from sar_fast.nn import FusedLinearCrossEntropy, FusedLinearKLDiv

BACKENDS = ["reference", "kernel"]


def _head(C=24, V=37, bias=True):
    head = torch.nn.Linear(C, V, bias=bias)
    torch.nn.init.normal_(head.weight, std=0.3)
    return head


def _grads(head, hidden):
    return [hidden.grad] + [p.grad for p in head.parameters()]


def _zero(head, hidden):
    hidden.grad = None
    head.zero_grad(set_to_none=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("smoothing,bias", [(0.0, True), (0.1, True), (0.25, False)])
def test_cross_entropy_equals_head_then_ce(backend, reduction, smoothing, bias):
    head = _head(bias=bias)
    hidden = torch.randn(3, 7, 24, requires_grad=True)  # odd sizes: N = 21, V = 37
    target = torch.randint(0, 37, (3, 7))
    target[1, 2] = -100  # ignored
    weight = torch.rand(3, 7)
    ref_head = {n: p.detach().double().requires_grad_() for n, p in head.named_parameters()}
    h64 = hidden.detach().double().requires_grad_()
    logits = F.linear(h64, ref_head["weight"], ref_head.get("bias"))
    ce = F.cross_entropy(logits.reshape(-1, 37), target.reshape(-1), label_smoothing=smoothing,
                         reduction="none").view(3, 7) * weight
    expected = {"none": ce, "sum": ce.sum(), "mean": ce.sum() / weight[target != -100].sum()}[reduction]
    expected.sum().backward() if reduction == "none" else expected.backward()

    loss_fn = FusedLinearCrossEntropy(head, label_smoothing=smoothing, reduction=reduction)
    with ops.use_backend(backend):
        got = loss_fn(hidden, target, token_weight=weight)
        got.sum().backward()
    assert got.shape == expected.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected.detach(), atol=1e-5, rtol=1e-5)
    if reduction == "none":
        assert got[1, 2].item() == 0.0  # the ignored token
    torch.testing.assert_close(hidden.grad.double(), h64.grad, atol=1e-5, rtol=1e-5)
    for n, p in head.named_parameters():
        torch.testing.assert_close(p.grad.double(), ref_head[n].grad, atol=1e-5, rtol=1e-5)


def test_cross_entropy_owns_no_parameters():
    head = _head()
    loss_fn = FusedLinearCrossEntropy(head)
    assert list(loss_fn.parameters()) == [] and loss_fn.state_dict() == {} and loss_fn.head is head


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("teacher", ["logits", "hidden"])
def test_kl_equals_head_then_kl_div(backend, teacher):
    head = _head()
    hidden = torch.randn(2, 5, 24, requires_grad=True)
    t_hidden = torch.randn(2, 5, 24)
    weight = torch.rand(2, 5)
    T = 1.7
    w64, b64 = head.weight.detach().double().requires_grad_(), head.bias.detach().double().requires_grad_()
    h64 = hidden.detach().double().requires_grad_()
    t_logits = F.linear(t_hidden.double(), w64.detach(), b64.detach())
    log_p = F.log_softmax(F.linear(h64, w64, b64) / T, -1)
    log_q = F.log_softmax(t_logits / T, -1)
    expected = (log_q.exp() * (log_q - log_p)).sum(-1) * weight
    expected.sum().backward()
    loss_fn = FusedLinearKLDiv(head, temperature=T)
    kwargs = {"target_logits": t_logits.float()} if teacher == "logits" else {"target_hidden": t_hidden}
    with ops.use_backend(backend):
        got = loss_fn(hidden, token_weight=weight, **kwargs)
        got.sum().backward()
    assert got.shape == (2, 5)
    torch.testing.assert_close(got.double(), expected.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hidden.grad.double(), h64.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(head.weight.grad.double(), w64.grad, atol=1e-5, rtol=1e-5)


def test_bad_input_is_named():
    head = _head()
    with pytest.raises(TypeError, match="head must be a torch.nn.Linear"):
        FusedLinearCrossEntropy(torch.nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="label_smoothing"):
        FusedLinearCrossEntropy(head, label_smoothing=1.0)
    with pytest.raises(ValueError, match="reduction"):
        FusedLinearCrossEntropy(head, reduction="avg")
    loss_fn = FusedLinearCrossEntropy(head)
    with pytest.raises(ValueError, match=r"hidden must be \[..., 24\]"):
        loss_fn(torch.randn(4, 23), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"target must have shape \(2, 3\)"):
        loss_fn(torch.randn(2, 3, 24), torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token_weight must have shape \(2, 3\)"):
        loss_fn(torch.randn(2, 3, 24), torch.zeros(2, 3, dtype=torch.long), token_weight=torch.ones(6))
    with pytest.raises(ValueError, match="exactly one"):
        FusedLinearKLDiv(head)(torch.randn(2, 24))
    with pytest.raises(ValueError, match="temperature"):
        FusedLinearKLDiv(head, temperature=0.0)
