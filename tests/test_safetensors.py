"""Weights as safetensors: `python -m sar_fast.convert` round trips official layouts exactly;
a converted checkpoint gives the same logits, training, samples and export as the .pth;
sharded indexes are validated; shared and non-contiguous storage is written correctly."""
import argparse
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save_file as st_save_file

from conftest import DATA
from sar_fast import convert
from sar_fast.cli import InputError
from sar_fast.models import (CheckpointError, load_checkpoint, load_tokenizer, read_checkpoint_file, save_export,
                             write_safetensors)
from sar_fast.models.checkpoint import find_model_mapping, standalone_tensors

SCHEDULE_CASE = 1  # a tf case of each golden file


def _golden(name):
    return torch.load(os.path.join(DATA, f"golden_{name}.pt"), weights_only=True)


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def assert_same_tensors(a, b):
    """Every key, dtype, shape and bit."""
    assert sorted(a) == sorted(b)
    for k in a:
        assert (a[k].dtype, a[k].shape) == (b[k].dtype, b[k].shape), k
        assert _bits(a[k]) == _bits(b[k]), k


def _official_layouts(tmp_path):
    """The layouts the official checkpoints come in, built from the golden state dicts."""
    flexvar, var = _golden("flexvar")["state_dict"], _golden("var")["state_dict"]
    flexvq, varvq = _golden("flexvq")["state_dict"], _golden("varvq")["state_dict"]
    layouts = {
        "ar-ckpt-last.pth": {"epoch": 3, "iter": 7, "args": argparse.Namespace(lr=1e-4, depth=2),
                             "trainer": {"var_wo_ddp": flexvar, "var_opt": {"step": 3}, "config": {}}},
        "FlexVARd16-epo179.pth": flexvar,
        "var_d16.pth": var,
        "FlexVAE.pth": {"model": flexvq},
        "vae_ch160v4096z32.pth": varvq,
    }
    paths = {}
    for name, obj in layouts.items():
        paths[name] = tmp_path / name
        torch.save(obj, paths[name])
    return paths


def test_convert_round_trips_official_layouts_exactly(tmp_path, capsys):
    for name, path in _official_layouts(tmp_path).items():
        original, _ = find_model_mapping(torch.load(path, weights_only=False))
        st, back = tmp_path / (name + ".safetensors"), tmp_path / ("back-" + name)
        assert convert.main([str(path), str(st)]) == 0
        report = capsys.readouterr().err
        assert_same_tensors(st_load_file(st), original)  # keys as the original code names them
        if name.startswith("ar-ckpt"):
            assert "trainer.var_wo_ddp" in report and "args (StandIn_Namespace)" in report and "epoch" in report
        assert convert.main([str(st), str(back)]) == 0
        assert_same_tensors(torch.load(back, weights_only=True), original)


def test_converted_models_give_identical_logits_and_load_into_the_original(tmp_path):
    paths = _official_layouts(tmp_path)
    for pth, name in ((paths["ar-ckpt-last.pth"], "flexvar"), (paths["var_d16.pth"], "var")):
        st = tmp_path / f"{name}.safetensors"
        convert.convert(str(pth), str(st))
        case = _golden(name)["cases"][SCHEDULE_CASE]
        args = case["label_B"], case["x_BLCv_wo_first_l"], case["schedule"]
        a = load_checkpoint(pth, cond_drop_rate=0.0).eval()(*args)
        b = load_checkpoint(st, cond_drop_rate=0.0).eval()(*args)
        assert torch.equal(a, b)
        assert (b - case["logits"]).abs().max() <= 1e-5
    for pth, name in ((paths["FlexVAE.pth"], "flexvq"), (paths["vae_ch160v4096z32.pth"], "varvq")):
        st = tmp_path / f"{name}.safetensors"
        convert.convert(str(pth), str(st))
        g = _golden(name)
        a, b = load_tokenizer(pth, norm_groups=4), load_tokenizer(st, norm_groups=4)
        assert_same_tensors(type(b).from_checkpoint(st, norm_groups=4).state_dict(), b.state_dict())
        for x, y in zip(a.encode(g["images"], g["schedule"]), b.encode(g["images"], g["schedule"])):
            assert torch.equal(x, y)
        assert_same_tensors(a.state_dict(), b.state_dict())


def test_export_writes_safetensors_beside_the_pth_the_original_code_loads(tmp_path):
    from standins.flexvar_like import FlexVAR, VQModel
    from standins.var_like import VAR, VQVAE
    torch.manual_seed(0)
    originals = [FlexVAR(VQModel(codebook_size=40, codebook_embed_dim=8), embed_dim=64, num_heads=2),
                 VAR(VQVAE(vocab_size=48, z_channels=8, v_patch_nums=(1, 2, 3)), embed_dim=64, num_heads=2)]
    for original in originals:
        # FlexVAR: the export's mask is that of the schedule the original was built with
        model = load_checkpoint(original.state_dict(), **({} if isinstance(original, VAR) else
                                                          {"schedule": tuple(original.patch_nums)}))
        pth, st = tmp_path / f"{model.arch}.pth", tmp_path / f"{model.arch}.safetensors"
        save_export(model, [pth, st])
        exported = torch.load(pth, weights_only=True)
        assert_same_tensors(st_load_file(st), exported)
        assert original.load_state_dict(exported, strict=True)  # the .pth is what the original loads
        back = tmp_path / f"{model.arch}-back.pth"
        convert.convert(str(st), str(back))
        assert original.load_state_dict(torch.load(back, weights_only=True), strict=True)


def test_shared_and_non_contiguous_storage_is_written_as_standalone_tensors(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {"w": base, "tied": base, "t": base.t(), "row": base[1], "cols": base[:, 2:4],
               "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 3), "idx": torch.arange(5)}
    with pytest.raises((RuntimeError, ValueError), match="share memory|contiguous"):  # the library alone refuses
        st_save_file(tensors, tmp_path / "plain.safetensors")
    out = standalone_tensors(tensors)
    assert out["w"] is not None and out["w"].data_ptr() == base.data_ptr()  # the owner is not copied
    path = tmp_path / "x.safetensors"
    write_safetensors(tensors, path)
    back = read_checkpoint_file(path)
    assert_same_tensors(back, {k: v.contiguous() for k, v in tensors.items()})
    ptrs = [v.untyped_storage().data_ptr() for v in back.values() if v.numel()]
    assert len(set(ptrs)) == len(ptrs)
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def _shard(sd, tmp_path, n=2):
    keys = sorted(sd)
    weight_map = {}
    for i in range(n):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: sd[k] for k in keys[i::n]}
        write_safetensors(part, tmp_path / name)
        weight_map.update({k: name for k in part})
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index, weight_map


def test_sharded_index_loads_and_is_validated(tmp_path):
    g = _golden("var")
    index, weight_map = _shard(g["state_dict"], tmp_path)
    case = g["cases"][0]
    logits = load_checkpoint(index, cond_drop_rate=0.0).eval()(case["label_B"], case["x_BLCv_wo_first_l"])
    assert (logits - case["logits"]).abs().max() <= 1e-5
    back = tmp_path / "back.pth"
    convert.convert(str(index), str(back))
    assert_same_tensors(torch.load(back, weights_only=True), g["state_dict"])

    first, second = sorted(set(weight_map.values()))
    moved_key = next(k for k, v in weight_map.items() if v == second)
    outside = tmp_path.parent / "outside.safetensors"
    write_safetensors({"x": torch.zeros(1)}, outside)
    dup = tmp_path / "dup.safetensors"
    write_safetensors({moved_key: torch.zeros(1)}, dup)
    bad = {
        "not json": ("{weight_map: ", r"not a JSON safetensors index"),
        "no weight_map": ({"metadata": {}}, r"expected a safetensors index"),
        "traversal": ({"weight_map": {"x": "../outside.safetensors"}}, r"outside the index's folder"),
        "absolute": ({"weight_map": {"x": str(outside)}}, r"outside the index's folder"),
        "pickle shard": ({"weight_map": {"x": "pytorch_model.bin"}}, r"not a .safetensors file"),
        "missing shard": ({**weight_map, "extra": "model-9.safetensors"}, r"shard model-9.safetensors is missing"),
        "two shards": ({**weight_map, "zz": "dup.safetensors"}, r"in two shards"),
        "wrong shard": ({**weight_map, moved_key: first}, r"which the index maps to"),
        "key in no shard": ({**weight_map, "ghost": first}, r"in no shard: ghost"),
    }
    for what, (content, msg) in bad.items():
        if what in ("missing shard", "two shards", "wrong shard", "key in no shard"):
            content = {"weight_map": content}
        index.write_text(content if isinstance(content, str) else json.dumps(content))
        with pytest.raises(CheckpointError, match=msg) as e:
            load_checkpoint(index)
        assert str(index) in str(e.value), what


def test_malformed_safetensors_fail_with_one_clear_error(tmp_path):
    good = tmp_path / "good.safetensors"
    write_safetensors(_golden("var")["state_dict"], good)
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "text.safetensors").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (tmp_path / "adir.safetensors").mkdir()
    for name, msg in (("empty", "is empty"), ("cut", "not a readable safetensors file"),
                      ("text", "not a readable safetensors file"), ("adir", "is a directory")):
        path = tmp_path / f"{name}.safetensors"
        for loader in (load_checkpoint, load_tokenizer, read_checkpoint_file):
            with pytest.raises(CheckpointError, match=msg) as e:
                loader(path)
            assert str(path) in str(e.value)


def test_convert_refuses_what_it_cannot_do(tmp_path):
    pth = tmp_path / "m.pth"
    torch.save(_golden("var")["state_dict"], pth)
    st = tmp_path / "m.safetensors"
    convert.convert(str(pth), str(st))
    before = st.read_bytes()
    for src, dst, msg in ((pth, st, "exists; pass --force"), (pth, tmp_path / "m2.pth", "cannot convert"),
                          (st, tmp_path / "m2.safetensors", "cannot convert"),
                          (pth, tmp_path / "m.txt", "cannot convert"),
                          (pth, tmp_path, "cannot convert"), (pth, "hf://a/b/c.safetensors", "cannot be written"),
                          (tmp_path / "nope.pth", st, "no such file")):
        with pytest.raises(InputError, match=msg):
            convert.convert(str(src), str(dst))
    assert st.read_bytes() == before
    convert.convert(str(pth), str(st), force=True)
    assert_same_tensors(st_load_file(st), _golden("var")["state_dict"])


# ------------------------------------------------------------------ training and sampling: same results
def _digits_model(path):
    from sar_fast.models.tokenizers.grey import GreyLevelTokenizer
    from sar_fast.models import build_model
    tok = GreyLevelTokenizer()
    torch.manual_seed(0)
    model = build_model("flexvar-tiny", depth=1, embed_dim=32, num_heads=2, vocab_size=tok.vocab_size, code_dim=1,
                        schedule=(1, 2, 4, 8))
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    save_export(model, path)


def _train(init, out):
    from sar_fast import train
    train.main(["--init", str(init), "--out", str(out), "--pretrain-steps", "1", "--max-steps", "1",
                "--batch-size", "8", "--num-samples", "0", "--workers", "0", "--no-progress", "--no-async-save",
                "--device", "cpu", "--schedule", "1,2,4,8", "--log-every", "1"])
    with open(out / "metrics.jsonl") as f:
        losses = [json.loads(line)["loss"] for line in f]
    return losses, st_load_file(out / "export.safetensors"), torch.load(out / "export.pth", weights_only=True)


def test_converted_checkpoint_trains_samples_and_exports_identically(tmp_path):
    from sar_fast import evaluate
    pth, st = tmp_path / "init.pth", tmp_path / "init.safetensors"
    _digits_model(pth)
    convert.convert(str(pth), str(st))
    a, b = _train(pth, tmp_path / "run_pth"), _train(st, tmp_path / "run_st")
    assert a[0] == b[0] and len(a[0]) == 2
    assert_same_tensors(a[1], b[1])
    assert_same_tensors(a[2], b[2])
    assert_same_tensors(a[1], a[2])  # the two exports of a run hold the same tensors
    images = []
    for ckpt in (pth, st):
        out = tmp_path / f"eval-{ckpt.suffix[1:]}"
        evaluate.main(["--ckpt", str(ckpt), "--out", str(out), "--device", "cpu", "--classes", "3",
                       "--per-class", "2", "--metric", "none"])
        with np.load(out / "samples.npz") as z:
            images.append(z["arr_0"])
    np.testing.assert_array_equal(images[0], images[1])


def test_converted_var_model_and_tokenizer_train_and_sample_identically(tmp_path):
    """VAR: the model (--init / --ckpt) and its residual VQVAE (--vae) as .pth and converted."""
    from PIL import Image

    from sar_fast import sample
    from sar_fast.models import VARVQVAE, build_model
    torch.manual_seed(0)
    tok = VARVQVAE(vocab_size=17, Cvae=4, ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1)  # 32x32 -> 2x2
    model = build_model("var-tiny", depth=1, embed_dim=32, num_heads=2, vocab_size=17, code_dim=4, schedule=(1, 2))
    for p in list(tok.parameters()) + list(model.parameters()):
        p.data.normal_(0, 0.1)
    files = {}
    for what, obj in (("init", None), ("vae", tok.state_dict())):
        files[what, "pth"] = tmp_path / f"{what}.pth"
        save_export(model, files[what, "pth"]) if obj is None else torch.save(obj, files[what, "pth"])
        files[what, "st"] = tmp_path / f"{what}.safetensors"
        convert.convert(str(files[what, "pth"]), str(files[what, "st"]))
    rng, images = np.random.default_rng(0), tmp_path / "imgs"
    for cls in ("a", "b"):
        (images / cls).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(images / cls / f"{i}.png")
    results = []
    for fmt in ("pth", "st"):
        from sar_fast import train
        out = tmp_path / f"run_{fmt}"
        train.main(["--init", str(files["init", fmt]), "--vae", str(files["vae", fmt]), "--data", str(images),
                    "--resolution", "32", "--schedule", "1,2", "--out", str(out), "--pretrain-steps", "1",
                    "--max-steps", "1", "--batch-size", "4", "--num-samples", "0", "--workers", "0", "--no-progress",
                    "--no-async-save", "--device", "cpu", "--log-every", "1"])
        with open(out / "metrics.jsonl") as f:
            losses = [json.loads(line)["loss"] for line in f]
        sample.main(["--ckpt", str(files["init", fmt]), "--vae", str(files["vae", fmt]), "--classes", "0,1",
                     "--out", str(tmp_path / f"{fmt}.png"), "--npz", str(tmp_path / f"{fmt}.npz"), "--device", "cpu"])
        results.append((losses, st_load_file(out / "export.safetensors"), np.load(tmp_path / f"{fmt}.npz")["arr_0"]))
    assert results[0][0] == results[1][0] and len(results[0][0]) == 2
    assert_same_tensors(results[0][1], results[1][1])
    np.testing.assert_array_equal(results[0][2], results[1][2])
