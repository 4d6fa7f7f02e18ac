"""load_checkpoint on in-memory state dicts: wrapper prefixes, the `state_dict` layout, head
inference without the per-head scale, the shared-AdaLN refusal and strict=False."""
import pytest
import torch

from sar_fast.models import build_model, load_checkpoint
from sar_fast.models.checkpoint import CheckpointError


def _model(arch="flexvar", **kw):
    torch.manual_seed(0)
    model = build_model(f"{arch}-tiny", **kw)
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    return model


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _wrap_block_key(key: str) -> str:
    """How activation checkpointing names a block's parameters."""
    if key.startswith("blocks."):
        i, rest = key[len("blocks."):].split(".", 1)
        return f"blocks.{i}._checkpoint_wrapped_module.{rest}"
    return key


@pytest.mark.parametrize("arch", ["flexvar", "var"])
@pytest.mark.parametrize("rename", [
    lambda k: "_orig_mod." + k,                                  # torch.compile
    lambda k: "module._orig_mod." + k,                           # DDP around compile
    _wrap_block_key,                                             # activation checkpointing
    lambda k: "_orig_mod." + _wrap_block_key(k),
], ids=["orig_mod", "module-orig_mod", "checkpoint_wrapped", "both"])
def test_wrapper_prefixes_are_dropped(arch, rename):
    model = _model(arch)
    sd = {rename(k): v for k, v in model.state_dict().items()}
    assert sd.keys() != model.state_dict().keys()
    _same_weights(load_checkpoint(sd), model)


def test_state_dict_wrapper_layout():
    model = _model()
    loaded = load_checkpoint({"state_dict": model.state_dict(), "epoch": 3})
    _same_weights(loaded, model)


@pytest.mark.parametrize("embed_dim, heads", [(128, 2), (64, 1)])
def test_heads_inferred_without_scale_mul(embed_dim, heads):
    """Without attn_l2_norm there is no scale_mul_1H11 to read the head count from: the
    originals' rule (head dim 64) applies, and the loaded model computes the same logits."""
    model = _model(embed_dim=embed_dim, num_heads=heads, attn_l2_norm=False, cond_drop_rate=0.0)
    sd = model.state_dict()
    assert not any("scale_mul_1H11" in k for k in sd)
    loaded = load_checkpoint(sd, cond_drop_rate=0.0)
    assert loaded.config.num_heads == heads and loaded.config.attn_l2_norm is False
    _same_weights(loaded, model)
    labels, x = torch.tensor([1, 2]), torch.randn(2, 38, model.code_dim)
    model.eval(), loaded.eval()
    torch.testing.assert_close(loaded(labels, x, (1, 2, 3, 5)), model(labels, x, (1, 2, 3, 5)))


def test_shared_adaln_is_refused():
    sd = dict(_model().state_dict())
    sd["shared_ada_lin.1.weight"] = torch.zeros(6 * 64, 64)
    with pytest.raises(CheckpointError, match="shared AdaLN"):
        load_checkpoint(sd)


def test_strict_false_tolerates_missing_and_unexpected_but_not_mis_shaped():
    model = _model()
    sd = dict(model.state_dict())
    del sd["blocks.0.ffn.fc2.bias"]
    sd["extra.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): blocks.0.ffn.fc2.bias"):
        load_checkpoint(sd)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): extra.weight"):
        load_checkpoint(sd)
    loaded = load_checkpoint(sd, strict=False)
    own = loaded.state_dict()
    for k, v in model.state_dict().items():
        if k != "blocks.0.ffn.fc2.bias":
            assert torch.equal(own[k], v), k
    assert torch.count_nonzero(own["blocks.0.ffn.fc2.bias"]) == 0  # kept its initialisation (zeros)
    sd["head.bias"] = torch.zeros(5)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_checkpoint(sd, strict=False)
