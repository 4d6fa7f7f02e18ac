"""Model parity with the original FlexVAR/SAR/VAR code (golden fixtures), checkpoints, inputs."""
import os

import pytest
import torch

from conftest import DATA
from sar_fast.models import (CheckpointError, build_model, export_state_dict, load_checkpoint, preset_config,
                             save_export)

GOLDEN = {name: os.path.join(DATA, f"golden_{name}.pt") for name in ("flexvar", "var")}


def _golden(name):
    return torch.load(GOLDEN[name], weights_only=True)


def _run_case(model, case):
    if case["kind"] == "tf":
        return model(case["label_B"], case["x_BLCv_wo_first_l"], case["schedule"])
    side = case["schedule"][-1]
    return model.forward_student(case["label_B"], case["x_BLCv_wo_first_l"], side)


@pytest.mark.parametrize("name", ["flexvar", "var"])
def test_logits_match_the_original_code(name):
    g = _golden(name)
    model = load_checkpoint(g["state_dict"], cond_drop_rate=0.0).eval()
    assert model.arch == name and model.config.depth == g["config"]["depth"]
    kinds = set()
    for case in g["cases"]:
        out = _run_case(model, case)
        assert out.shape == case["logits"].shape
        err = (out - case["logits"]).abs().max().item()
        assert err <= 1e-5, f"{name} {case['kind']} {case['schedule']}: max abs diff {err:.2e}"
        kinds.add(case["kind"])
    assert kinds == ({"tf", "sf"} if name == "flexvar" else {"tf"})


@pytest.mark.parametrize("name", ["flexvar", "var"])
def test_parity_test_is_sensitive(name):
    """A small change to one weight of the last block must break the parity check."""
    g = _golden(name)
    model = load_checkpoint(g["state_dict"], cond_drop_rate=0.0).eval()
    with torch.no_grad():
        model.blocks[-1].ffn.fc1.weight.add_(1e-2 * torch.randn_like(model.blocks[-1].ffn.fc1.weight))
    case = g["cases"][0]
    assert (_run_case(model, case) - case["logits"]).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["flexvar", "var"])
def test_export_has_the_original_keys_and_shapes(name):
    g = _golden(name)
    model = load_checkpoint(g["state_dict"])
    exported = export_state_dict(model, patch_nums=tuple(g["config"]["patch_nums"]))
    original = g["state_dict"]
    assert set(exported) == set(original)
    for k, v in original.items():
        assert exported[k].shape == v.shape, k
        assert exported[k].dtype == v.dtype, k
        torch.testing.assert_close(exported[k], v, atol=0, rtol=0)


@pytest.mark.parametrize("layout", ["flat", "ar_ckpt", "ddp", "export_file"])
def test_checkpoint_layouts_roundtrip(layout, tmp_path):
    g = _golden("flexvar")
    sd = g["state_dict"]
    if layout == "ar_ckpt":
        obj = {"epoch": 3, "iter": 0, "trainer": {"var_wo_ddp": sd, "var_opt": {}, "config": {}}, "args": {"a": 1}}
    elif layout == "ddp":
        obj = {f"module.{k}": v for k, v in sd.items()}
    else:
        obj = sd
    if layout == "export_file":
        path = tmp_path / "export.pth"
        save_export(load_checkpoint(sd), path)
        model = load_checkpoint(path, cond_drop_rate=0.0).eval()
    else:
        path = tmp_path / "ckpt.pth"
        torch.save(obj, path)
        model = load_checkpoint(str(path), cond_drop_rate=0.0).eval()
    case = g["cases"][1]
    assert (_run_case(model, case) - case["logits"]).abs().max() <= 1e-5


def test_checkpoint_with_pickled_foreign_objects(tmp_path):
    """ar-ckpt files pickle the original trainer's args object; loading must not need its code."""
    import sys
    import types
    g = _golden("flexvar")
    path = tmp_path / "ar-ckpt-epo0.pth"
    fake = types.ModuleType("orig_arg_util")  # stands in for the original's utils.arg_util

    class Args:
        lr = 1e-4
    Args.__module__, Args.__qualname__ = "orig_arg_util", "Args"
    fake.Args = Args
    sys.modules["orig_arg_util"] = fake
    try:
        torch.save({"trainer": {"var_wo_ddp": g["state_dict"]}, "args": Args()}, path)
    finally:
        del sys.modules["orig_arg_util"]
    model = load_checkpoint(path)
    assert model.arch == "flexvar"


def test_wrong_checkpoints_fail_clearly(tmp_path):
    g = _golden("var")
    sd = dict(g["state_dict"])
    with pytest.raises(CheckpointError, match="weights are a var model"):
        load_checkpoint(sd, arch="flexvar")
    broken = dict(sd)
    broken.pop("blocks.1.ffn.fc2.bias")
    broken["blocks.1.extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): blocks.1.ffn.fc2.bias"):
        load_checkpoint(broken)
    with pytest.raises(CheckpointError, match="not a FlexVAR/VAR transformer"):
        load_checkpoint({"encoder.conv_in.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="no model state dict"):
        load_checkpoint({"epoch": 3})
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pth")
    shapes = dict(sd)
    shapes["head.bias"] = torch.zeros(5)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_checkpoint(shapes)


def test_presets():
    c = preset_config("flexvar-d16")
    assert (c.depth, c.embed_dim, c.num_heads, c.vocab_size, c.code_dim) == (16, 1024, 16, 8912, 32)
    c = preset_config("var-d30")
    assert (c.embed_dim, c.num_heads, c.vocab_size) == (1920, 30, 4096)
    assert abs(c.drop_path_rate - 0.125) < 1e-9
    for bad in ("flexvar", "gpt-d16", "var-x3"):
        with pytest.raises(ValueError, match="preset"):
            preset_config(bad)
    with pytest.raises(ValueError, match="not divisible"):
        preset_config("flexvar-tiny", num_heads=5)


def test_var_d16_parameter_count_matches_the_paper():
    """VAR-d16 has 310M parameters (VAR's model zoo)."""
    with torch.device("meta"):
        model = build_model("var-d16")
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - 310.3) < 0.5


def test_bad_model_inputs():
    model = build_model("flexvar-tiny")
    x = torch.randn(2, 13, 8)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\]"):
        model(torch.tensor([0, 11]), x, (1, 2, 3))
    with pytest.raises(ValueError, match="label_B must be an int64"):
        model(torch.tensor([0.0, 1.0]), x, (1, 2, 3))
    with pytest.raises(ValueError, match=r"shape \(2, 13, 8\)"):
        model(torch.tensor([0, 1]), torch.randn(2, 12, 8), (1, 2, 3))
    with pytest.raises(ValueError, match="start with the 1x1"):
        model(torch.tensor([0, 1]), x, (2, 3))
    with pytest.raises(ValueError, match="position table"):
        model(torch.tensor([0, 1]), torch.randn(2, 33 * 33 + 3, 8), (1, 33))
    var = build_model("var-tiny", schedule=(1, 2, 3))
    with pytest.raises(ValueError, match="only runs the schedule"):
        var(torch.tensor([0, 1]), torch.randn(2, 29, 8), (1, 2, 5))
    with pytest.raises(ValueError, match="scale_index"):
        var.forward_student(torch.tensor([0]), torch.randn(1, 9, 8), 3, scale_index=1)


def test_label_dropout_only_in_training():
    model = build_model("flexvar-tiny", cond_drop_rate=0.5)
    labels = torch.zeros(4000, dtype=torch.long)
    model.train()
    dropped = (model.class_condition(labels) == model.class_emb.weight[-1]).all(-1).float().mean()
    assert 0.45 < dropped < 0.55
    model.eval()
    assert not (model.class_condition(labels) == model.class_emb.weight[-1]).all(-1).any()


def test_gradients_reach_every_parameter():
    model = build_model("flexvar-tiny", cond_drop_rate=0.0)
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    out = model(torch.tensor([1, 2]), torch.randn(2, 13, 8), (1, 2, 3))
    out.logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_golden_parity_through_the_triton_kernels():
    """The model's attention and the SAR losses' kernels, run under the interpreter on CPU,
    reproduce the original code's logits too (one small case per kind)."""
    from conftest import KERNEL_DEVICE
    from sar_fast import ops
    g = _golden("flexvar")
    model = load_checkpoint(g["state_dict"], cond_drop_rate=0.0).eval().to(KERNEL_DEVICE)
    cases = [c for c in g["cases"] if c["schedule"] in ([1, 3, 5], [1, 6])]
    assert len(cases) == 2
    with ops.use_backend("kernel"), torch.no_grad():
        for case in cases:
            case = {k: v.to(KERNEL_DEVICE) if isinstance(v, torch.Tensor) else v for k, v in case.items()}
            err = (_run_case(model, case) - case["logits"]).abs().max().item()
            assert err <= 1e-5, (case["kind"], err)


def test_label_range_check_can_be_turned_off():
    """On (the default) a label past the null class fails by name; a trainer that checks its
    batches on the host turns the per-forward check (a host sync) off."""
    model = build_model("flexvar-tiny")
    bad = torch.tensor([0, model.num_classes + 1])
    with pytest.raises(ValueError, match="labels must lie in"):
        model.class_condition(bad)
    assert model.set_label_range_check(False) is model
    with pytest.raises(IndexError):  # only the embedding's own bounds check is left
        model.class_condition(bad)
    model.set_label_range_check(True)
    with pytest.raises(ValueError, match="labels must lie in"):
        model.class_condition(bad)
