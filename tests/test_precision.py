"""Mixed precision as the original models train under autocast: GEMMs (the fused head +
loss included) take half-precision operands with fp32 accumulation, while the residual
stream, the norms and the loss stay fp32.

The interpreter has no bf16, so the Triton path is checked with fp16 parameters and the
bf16 policy (FSDP2, 1 rank, gloo) with the reference backend; both against the fp32 model
and against the fp32 model under torch.autocast (the original code's behaviour)."""
import copy

import pytest
import torch
import torch.distributed as dist

from conftest import poison_outputs
from sar_fast import ops
from sar_fast.models import ScaleAR, preset_config

SCHED = (1, 2, 3, 4)
L = sum(s * s for s in SCHED)


def _model():
    torch.manual_seed(0)
    model = ScaleAR(preset_config("flexvar-tiny", depth=2, cond_drop_rate=0.0))
    with torch.no_grad():  # gammas of a trained model, not VAR's near-identity init
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _batch(B=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 10, (B,), generator=g), torch.randn(B, L - 1, 8, generator=g),
            torch.randint(0, 64, (B * L,), generator=g))


def _loss(model, labels, x, target, seen=None):
    def head_fn(hidden, head):
        if seen is not None:
            seen["operands"] = (hidden.dtype, head.weight.dtype)
        return ops.fused_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head.weight, head.bias, target)
    return model(labels, x, SCHED, head_fn=head_fn)


def _record_block_inputs(model, seen):
    for block in model.blocks:
        block.register_forward_pre_hook(lambda mod, args: seen.setdefault("block_x", set()).add(args[0].dtype))


def _grads(model):
    out = []
    for p in model.parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        out.append(g.float().flatten())
    return torch.cat(out)


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()


def test_half_parameters_reach_the_fused_kernel_in_half_with_an_fp32_residual(monkeypatch):
    """fp16 parameters (what FSDP's param_dtype gives the forward): the fused CE kernel gets
    fp16 operands, the blocks an fp32 residual, the loss is fp32 and close to the fp32 model's."""
    kern = poison_outputs(monkeypatch, "cross_entropy")
    seen, kernel_dtypes = {}, []
    real = kern.ce_forward
    monkeypatch.setattr(kern, "ce_forward", lambda h, w, *a, **k: kernel_dtypes.append((h.dtype, w.dtype))
                        or real(h, w, *a, **k))
    labels, x, target = _batch()
    with ops.use_backend("kernel"):
        ref_model = _model()
        want = _loss(ref_model, labels, x, target)
        model = copy.deepcopy(ref_model).half()
        _record_block_inputs(model, seen)
        got = _loss(model, labels, x, target, seen)
        got.backward()
    assert seen["block_x"] == {torch.float32}
    assert seen["operands"] == (torch.float16, torch.float16)
    assert kernel_dtypes[-1] == (torch.float16, torch.float16)
    assert got.dtype == torch.float32
    assert abs(got.item() - want.item()) < 1e-2 * abs(want.item())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.fixture
def one_rank_group():
    if dist.is_initialized():
        pytest.fail("a process group leaked from an earlier test: tests must destroy the groups they create")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_fsdp_bf16_policy_keeps_fp32_residual_and_matches_autocast(one_rank_group):
    """The trainer's FSDP2 bf16 policy against the fp32 model and against the fp32 model
    under autocast (the original code): block inputs fp32, head + loss operands bf16, and
    the loss / gradients no further from fp32 than autocast's."""
    from sar_fast.train.parallel import DistInfo, shard_model

    labels, x, target = _batch()
    with ops.use_backend("reference"):
        fp32 = _model()
        want = _loss(fp32, labels, x, target)
        want.backward()
        g_want = _grads(fp32)

        auto = _model()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ac = _loss(auto, labels, x, target)
        ac.backward()
        g_ac = _grads(auto)

        seen = {}
        sharded = shard_model(_model(), DistInfo(0, 1, 0, torch.device("cpu")), precision="bf16")
        _record_block_inputs(sharded, seen)
        got = _loss(sharded, labels, x, target, seen)
        got.backward()
        g_got = _grads(sharded)

    assert seen["block_x"] == {torch.float32}, "the residual stream was cast to bf16"
    assert seen["operands"] == (torch.bfloat16, torch.bfloat16)
    assert got.dtype == torch.float32
    err_got, err_ac = abs(got.item() - want.item()), abs(ac.item() - want.item())
    assert err_got <= 2 * err_ac + 1e-3 * abs(want.item()), (got.item(), ac.item(), want.item())
    assert _cos(g_got, g_want) > 0.999 and _cos(g_got, g_want) >= _cos(g_ac, g_want) - 1e-3
    assert abs(got.item() - ac.item()) < 1e-2 * abs(want.item())


def test_fp32_dot_precision_follows_torch_tf32_setting():
    from sar_fast.kernels import cross_entropy as kern
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert kern._dot_precision(torch.zeros(1)) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert kern._dot_precision(torch.zeros(1)) == "tf32"
        assert kern._dot_precision(torch.zeros(1, dtype=torch.float16)) == "tf32"  # ignored for half
    finally:
        torch.set_float32_matmul_precision(before)
