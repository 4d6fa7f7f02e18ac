"""The trainer's optimiser side, read from what a run leaves behind: metrics.jsonl, export.pth
and the sharded checkpoints (model + optimiser state, converted with DCP's own tool).

Only the public CLI (`python -m sar_fast.train`, torchrun) and sar_fast.train.param_groups
are used, so these tests do not depend on how train.py is organised inside.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import oracles
from conftest import ROOT
from sar_fast.train.checkpointing import list_checkpoints

SMALL = ["--depth", "1", "--embed-dim", "32", "--num-heads", "2", "--batch-size", "16", "--num-samples", "0",
         "--log-every", "1", "--no-progress", "--workers", "0", "--top-k", "0", "--cond-drop", "0"]
BETA1 = 0.9


def _env():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    return env


def _run(out, *flags, nproc=0, ok=True, timeout=300):
    """nproc=0: plain python (a 1-rank group); else torchrun with nproc ranks."""
    launcher = [sys.executable] if nproc == 0 else \
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone"]
    res = subprocess.run([*launcher, "-m", "sar_fast.train", "--out", str(out), *SMALL, *flags], env=_env(),
                         capture_output=True, text=True, timeout=timeout)
    if ok:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _checkpoint(out, step, tmp_path):
    """{'model': {name: tensor}, 'optim': {'state': {name: {...}}, 'param_groups': [...]}}."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    path = dict(list_checkpoints(os.path.join(out, "checkpoints")))[step]
    flat = tmp_path / f"ckpt_{os.path.basename(str(out))}_{step}.pt"
    dcp_to_torch_save(path, flat)
    return torch.load(flat, weights_only=False)


def _group_of(ckpt):
    """param name -> (lr, weight_decay) of its optimiser group."""
    return {name: (g["lr"], g["weight_decay"]) for g in ckpt["optim"]["param_groups"] for name in g["params"]}


def _expect_decay(name: str, shape) -> bool:
    """VAR's rule: decay weight matrices and embeddings, never biases, 1-D params, the
    position / level tables or the attention scale."""
    if len(shape) < 2 or name.endswith("bias") or "scale_mul" in name:
        return False
    return not any(k in name for k in ("pos_start", "pos_1LC", "lvl_embed"))


LR_FLAGS = ["--objective", "tf", "--pretrain-steps", "2", "--pretrain-lr", "0.01", "--max-steps", "2", "--lr", "0.002",
            "--warmup-steps", "4", "--weight-decay", "0.05", "--ckpt-every", "1", "--keep-last", "10", "--no-export"]


@pytest.fixture(scope="module")
def lr_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lr") / "run"
    _run(out, *LR_FLAGS, "--clip", "0")
    return out


def test_lr_of_warm_up_and_pretrain_phase_is_the_one_applied(lr_run, tmp_path):
    # warm-up over 4 steps; steps 0-1 in the TF phase at --pretrain-lr, then --lr
    expected = [0.01 * 1 / 4, 0.01 * 2 / 4, 0.002 * 3 / 4, 0.002]
    recs = _metrics(lr_run)
    assert [r["objective"] for r in recs] == ["tf"] * 4
    assert [r["lr"] for r in recs] == pytest.approx(expected, rel=1e-12)
    for step, lr in enumerate(expected, start=1):  # the optimiser's own groups, saved after that step
        groups = _checkpoint(lr_run, step, tmp_path)["optim"]["param_groups"]
        assert [g["lr"] for g in groups] == pytest.approx([lr] * len(groups), rel=1e-12), step


def test_weight_decay_only_on_weight_matrices(lr_run, tmp_path):
    ckpt = _checkpoint(lr_run, 1, tmp_path)
    groups = _group_of(ckpt)
    assert set(groups) == set(ckpt["model"])
    for name, tensor in ckpt["model"].items():
        assert groups[name][1] == (0.05 if _expect_decay(name, tensor.shape) else 0.0), name


def test_param_groups_split():
    from sar_fast.models import build_model
    from sar_fast.train import param_groups
    for arch in ("flexvar", "var"):
        model = build_model(f"{arch}-tiny")
        names = {id(p): n for n, p in model.named_parameters()}
        groups = param_groups(model, 0.1)
        assert sum(len(g["params"]) for g in groups) == len(names)
        for g in groups:
            for p in g["params"]:
                assert g["weight_decay"] == (0.1 if _expect_decay(names[id(p)], p.shape) else 0.0), names[id(p)]


def _grad_norm_seen_by_adam(ckpt) -> float:
    """After the first step exp_avg = (1 - beta1) * grad: the norm of the gradient applied."""
    state = ckpt["optim"]["state"]
    return float(torch.sqrt(sum((s["exp_avg"].double() / (1 - BETA1)).square().sum() for s in state.values())))


def test_clipping_bounds_the_applied_gradient_and_logs_the_pre_clip_norm(lr_run, tmp_path):
    pre_clip = _metrics(lr_run)[0]["grad_norm"]
    assert _grad_norm_seen_by_adam(_checkpoint(lr_run, 1, tmp_path)) == pytest.approx(pre_clip, rel=1e-4)
    clip = pre_clip / 3
    out = tmp_path / "clipped"
    flags = [f for f in LR_FLAGS]
    flags[flags.index("--pretrain-steps") + 1], flags[flags.index("--max-steps") + 1] = "1", "0"
    _run(out, *flags, "--clip", str(clip))
    assert _metrics(out)[0]["grad_norm"] == pytest.approx(pre_clip, rel=1e-5)  # same seed, batch, weights
    assert _grad_norm_seen_by_adam(_checkpoint(out, 1, tmp_path)) == pytest.approx(clip, rel=1e-4)


def test_skipped_nonfinite_step_leaves_params_and_optimizer_untouched(tmp_path):
    """lr 1e30: step 1 is finite and blows the weights up, steps 2 and 3 are not finite."""
    out = tmp_path / "run"
    res = _run(out, "--objective", "tf", "--pretrain-steps", "0", "--max-steps", "10", "--lr", "1e30",
               "--warmup-steps", "0", "--clip", "0", "--weight-decay", "0", "--max-nonfinite", "2",
               "--ckpt-every", "1", "--keep-last", "10", "--no-export", ok=False)
    assert res.returncode != 0 and "non-finite losses in a row" in res.stderr
    recs = _metrics(out)
    assert [r["nonfinite_total"] for r in recs] == [0, 1, 2]
    assert recs[0]["grad_norm"] == recs[0]["grad_norm"] and all(r["grad_norm"] != r["grad_norm"] for r in recs[1:])
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [1, 2, 3]
    first = _checkpoint(out, 1, tmp_path)
    for step in (2, 3):
        later = _checkpoint(out, step, tmp_path)
        for name, value in first["model"].items():
            assert torch.equal(value, later["model"][name]), (step, name)
        for name, state in first["optim"]["state"].items():
            for key, value in state.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(later["optim"]["state"][name][key])), \
                    (step, name, key)


# ----------------------------------------------------------------------- data with a real tokenizer
def _image_folder(root, n_per_class=8):
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(n_per_class):
            Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).save(root / f"class{c}" / f"{i}.png")
    return root


def _flex_tokenizer(path, seed):
    from sar_fast.models.tokenizers import FlexVQ16
    torch.manual_seed(seed)
    tok = FlexVQ16(vocab_size=64, Cvae=4, z_channels=32, ch=32, ch_mult=(1, 1), num_res_blocks=1)
    torch.save({"model": tok.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def code_cache(tmp_path_factory):
    """16 images (one batch of 16: every step sees the whole set), cached with tokenizer 1."""
    from sar_fast.cache import main as cache_main
    root = tmp_path_factory.mktemp("cache")
    data = _image_folder(root / "data")
    tok1, tok2 = _flex_tokenizer(root / "tok1.pth", 1), _flex_tokenizer(root / "tok2.pth", 2)
    assert cache_main(["--data", str(data), "--vae", str(tok1), "--out", str(root / "codes"), "--resolution", "8",
                       "--schedule", "1,2,4", "--device", "cpu", "--no-progress", "--num-workers", "0"]) == 0
    return root, tok1, tok2


def test_init_loads_the_given_weights(code_cache, tmp_path):
    """Step 0 of a run with --init has the checkpoint's loss on that batch (the whole cache),
    computed here by the oracle; with --lr 0 its export is the checkpoint itself. The
    from-scratch flags (--depth 2) must lose to --init."""
    from sar_fast.data.codes import CodeDataset
    from sar_fast.models import build_model, load_checkpoint, save_export
    from sar_fast.models.tokenizers import load_tokenizer
    from sar_fast.sar import SARConfig
    root, tok1, _ = code_cache
    torch.manual_seed(7)
    model = build_model("flexvar-tiny", vocab_size=64, code_dim=4, schedule=(1, 2, 4), depth=1, embed_dim=32,
                        num_heads=2, cond_drop_rate=0.0)
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    save_export(model, tmp_path / "init.pth")
    out = tmp_path / "run"
    _run(out, "--init", str(tmp_path / "init.pth"), "--depth", "2", "--cache", str(root / "codes"), "--vae", str(tok1),
         "--schedule", "1,2,4", "--objective", "tf", "--pretrain-steps", "0", "--max-steps", "1", "--lr", "0",
         "--ckpt-every", "100", "--seed", "3")
    exported = torch.load(out / "export.pth", weights_only=True)
    for name, value in model.state_dict().items():
        assert torch.equal(exported[name], value), name
    dataset = CodeDataset(root / "codes")
    codes = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.stack([dataset[i][1] for i in range(len(dataset))])
    book = load_tokenizer(tok1).codebook().detach().float()
    cfg = SARConfig(objective="tf")  # what the oracle reads: objective, weighting, smoothing
    with torch.no_grad():
        want = oracles.sar_loss(load_checkpoint(tmp_path / "init.pth", cond_drop_rate=0.0), labels, codes,
                                (1, 2, 4), book, cfg)["loss"]
    assert _metrics(out)[0]["loss"] == pytest.approx(float(want), rel=1e-5, abs=1e-6)


def test_cache_built_with_another_tokenizer_is_refused(code_cache, tmp_path):
    root, _, tok2 = code_cache
    res = _run(tmp_path / "run", "--cache", str(root / "codes"), "--vae", str(tok2), "--schedule", "1,2,4",
               "--objective", "tf", "--max-steps", "1", "--pretrain-steps", "0", ok=False, timeout=120)
    assert res.returncode != 0
    assert "was built with another tokenizer" in res.stderr and "than --vae (sha256" in res.stderr
    assert res.stderr.count("error:") == 1  # said once, by rank 0, before any work


def test_resume_on_one_rank_from_a_two_rank_checkpoint(tmp_path):
    out = tmp_path / "run"
    common = ["--objective", "tf", "--pretrain-steps", "0", "--ckpt-every", "2", "--keep-last", "5"]
    _run(out, *common, "--max-steps", "2", nproc=2)
    two_rank = torch.load(out / "export.pth", weights_only=True)
    # --lr 0: the resumed step may not move the weights, so the export shows what was loaded
    res = _run(out, *common, "--max-steps", "3", "--lr", "0", "--warmup-steps", "0")
    assert "resumed from" in res.stderr and "at step 2" in res.stderr
    assert [r["step"] for r in _metrics(out)] == [1, 2, 3]
    one_rank = torch.load(out / "export.pth", weights_only=True)
    for name, value in two_rank.items():
        assert torch.equal(one_rank[name], value), name
    state = _checkpoint(out, 3, tmp_path)["optim"]["state"]  # Adam's step count continued from 2
    assert {float(torch.as_tensor(s["step"])) for s in state.values()} == {3.0}


def test_short_var_run(tmp_path):
    """A VAR model on a VAR tokenizer (residual inputs, phi), the SAR objective on 'all'."""
    from sar_fast.models import load_checkpoint
    from sar_fast.models.tokenizers import VARVQVAE
    data = _image_folder(tmp_path / "data", n_per_class=4)
    tok = VARVQVAE(vocab_size=64, Cvae=4, ch=32, ch_mult=(1, 1), num_res_blocks=1, usage_scales=3)
    torch.save({"model": tok.state_dict()}, tmp_path / "var_tok.pth")
    out = tmp_path / "run"
    _run(out, "--model", "var-tiny", "--data", str(data), "--vae", str(tmp_path / "var_tok.pth"), "--resolution", "8",
         "--schedule", "1,2,4", "--batch-size", "8", "--pretrain-steps", "1", "--max-steps", "1", "--objective", "sar",
         "--transitions", "all", "--sampling", "cfg", "--gamma", "0.5", "--ckpt-every", "100", "--num-samples", "2")
    recs = _metrics(out)
    assert [r["objective"] for r in recs] == ["tf", "sar"]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in recs) and recs[1]["csf_loss"] > 0
    model = load_checkpoint(out / "export.pth")
    assert model.arch == "var" and model.config.schedule == (1, 2, 4)
    assert (out / "samples.png").stat().st_size > 0
