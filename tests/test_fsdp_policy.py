"""The 'step' reshard policy's one use of FSDP2 internals (parallel._reduce_now) is checked by
a start-up probe; where the probe fails, the policy falls back to FSDP2's public gradient sync
with a warning and trains to the same gradients. In-process, on a 1-rank gloo group."""
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from sar_fast.train import parallel


@pytest.fixture
def one_rank():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    saved = dict(parallel._PROBED)
    parallel._PROBED.clear()
    try:
        yield parallel.DistInfo(0, 1, 0, torch.device("cpu"))
    finally:
        parallel._PROBED.clear()
        parallel._PROBED.update(saved)
        dist.destroy_process_group()


class _Blocks(nn.Module):
    """The shape shard_model expects: `blocks`, plus the root's extra entry points."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        self.embed = nn.Linear(6, 8)
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) / 3)

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = torch.tanh(block(h))
        return h

    def forward_student(self, x):
        return self.forward(x)

    def generate(self, x):
        return self.forward(x)


def _mesh_and_policy(precision="fp32"):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy
    return (init_device_mesh("cpu", (1,)),
            MixedPrecisionPolicy(param_dtype=parallel.PRECISIONS[precision], reduce_dtype=torch.float32))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_probe_passes_on_this_torch(one_rank, precision):
    mesh, mp = _mesh_and_policy(precision)
    assert parallel._probe_reduce_now(mesh, mp, torch.device("cpu")) is None


@pytest.mark.parametrize("broken, says", [
    (lambda units: None, "no gradient"),  # the internals ran but reduced nothing
    (lambda units: units[0]._get_fsdp_state()._no_such_internal, "AttributeError"),  # a renamed internal
])
def test_probe_catches_internals_that_fail(one_rank, monkeypatch, broken, says):
    monkeypatch.setattr(parallel, "_reduce_now", broken)
    mesh, mp = _mesh_and_policy()
    problem = parallel._probe_reduce_now(mesh, mp, torch.device("cpu"))
    assert problem is not None and says in problem


def test_probe_catches_wrong_gradients(one_rank, monkeypatch):
    real = parallel._reduce_now

    def doubled(units):  # reduces, then scales: the values check must see it
        real(units)
        for unit in units:
            unit.reshard()  # the module holds its sharded parameters (and their gradients) again
            for p in unit.parameters(recurse=False):
                if p.grad is not None:
                    p.grad.mul_(2)
    monkeypatch.setattr(parallel, "_reduce_now", doubled)
    mesh, mp = _mesh_and_policy()
    assert "differs" in parallel._probe_reduce_now(mesh, mp, torch.device("cpu"))


def _one_step(info, fallback, monkeypatch, accum=2):
    """(gradients, reductions) of one 'step'-policy step with two passes per backward."""
    if fallback:
        monkeypatch.setattr(parallel, "_probe_reduce_now", lambda *a, **k: "simulated failure")
    parallel._PROBED.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = parallel.shard_model(_Blocks(), info, "fp32", reshard="step")
    warned = [w for w in caught if "falling back" in str(w.message)]
    assert model._sar_reduce_now is not fallback and len(warned) == int(fallback)
    gen = torch.Generator().manual_seed(2)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        parallel.begin_step(model)
        for m in range(accum):
            parallel.set_micro_batch(model, last=m == accum - 1)
            x = torch.randn(5, 6, generator=gen)
            (model(x).square().mean() + model.forward_student(2 * x).mean()).backward()
        parallel.reduce_gradients(model)
    # FSDP's reductions, by its own profiler label (on 1 rank it issues no collective)
    scatters = sum(e.name.startswith("FSDP::post_backward_reduce") for e in prof.events())
    grads = {n: p.grad.full_tensor().clone() for n, p in model.named_parameters()}
    return grads, scatters


def test_public_fallback_warns_and_gives_the_same_gradients(one_rank, monkeypatch):
    private, private_scatters = _one_step(one_rank, False, monkeypatch)
    public, public_scatters = _one_step(one_rank, True, monkeypatch)
    assert private.keys() == public.keys()
    for name in private:
        torch.testing.assert_close(public[name], private[name], rtol=1e-5, atol=1e-6, msg=name)
    assert private_scatters == 3  # once per unit (root + 2 blocks) per step
    # the fallback's cost: the last micro-batch's backward reduces each block once per pass
    # through it (2 here); the root, whose inputs need no gradient, once at the backward's end
    assert public_scatters == 2 * 2 + 1, public_scatters


def test_activation_checkpointing_recomputes_with_the_same_gradients_and_names(one_rank, monkeypatch):
    """--activation-checkpointing (torch.utils.checkpoint, public): each block's forward runs
    again in the backward, the gradients are those of the plain run, the parameter names
    (the checkpoints' and exports' keys) are unchanged, and a block's forward hooks (FSDP's,
    the FLOP counter's) see one call per pass, not the recomputation."""
    calls = []
    real = nn.Linear.forward

    def counted(self, x):
        calls.append(torch.is_grad_enabled())
        return real(self, x)
    monkeypatch.setattr(nn.Linear, "forward", counted)
    results, hooked = {}, []
    for ac in (False, True):
        calls.clear()
        hooked.clear()
        model = _Blocks()
        for block in model.blocks:
            block.register_forward_pre_hook(lambda module, args: hooked.append(module))
        model = parallel.shard_model(model, one_rank, "fp32", activation_checkpointing=ac, reshard="pass")
        model(torch.linspace(-1, 1, 12).reshape(2, 6)).square().mean().backward()
        assert len(hooked) == 2, (ac, len(hooked))
        results[ac] = ({n: p.grad.full_tensor().clone() for n, p in model.named_parameters()}, len(calls))
    (plain, plain_calls), (recomputed, ac_calls) = results[False], results[True]
    assert list(plain) == list(recomputed) == list(dict(_Blocks().named_parameters()))
    assert plain_calls == 3 and ac_calls == 3 + 2  # embed + 2 blocks; the 2 blocks again in the backward
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-6, atol=1e-7, msg=name)
