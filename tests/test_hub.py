"""hf://OWNER/REPO/FILE[@REVISION] ids, resolved through huggingface_hub's offline mode from a
cache laid out as the library lays it out (refs/, snapshots/<commit>/, blobs/). Never online:
every test sets HF_HUB_OFFLINE=1 and points the cache at tmp_path."""
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import DATA, ROOT
from sar_fast.hub import HubError, parse_hub_id, resolve_weights_path
from sar_fast.models import load_checkpoint, write_safetensors

COMMIT_MAIN = "a" * 40
COMMIT_OLD = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    return cache


def put(cache, repo_id, commit, filename, data: bytes, refs=("main",)):
    """One file as huggingface_hub caches it: the bytes in blobs/<sha256>, a relative symlink
    to them at snapshots/<commit>/<filename>, each ref naming the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = repo / "snapshots" / commit / filename
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return link


def _golden(name):
    return torch.load(os.path.join(DATA, f"golden_{name}.pt"), weights_only=True)


def _safetensors_bytes(tmp_path, sd, name="w.safetensors"):
    path = tmp_path / name
    write_safetensors(sd, path)
    return path.read_bytes()


def test_cache_layout_is_the_librarys(hub_cache, tmp_path):
    from huggingface_hub import scan_cache_dir
    put(hub_cache, "FoundationVision/var", COMMIT_MAIN, "var_d16.pth", b"x" * 10)
    repos = scan_cache_dir(hub_cache).repos
    assert [(r.repo_id, [rev.commit_hash for rev in r.revisions]) for r in repos] == \
        [("FoundationVision/var", [COMMIT_MAIN])]
    assert {ref for r in repos for rev in r.revisions for ref in rev.refs} == {"main"}


def test_hub_ids_resolve_offline_by_branch_and_commit(hub_cache, tmp_path):
    g = _golden("var")
    new, old = dict(g["state_dict"]), dict(g["state_dict"])
    old["head.bias"] = old["head.bias"] + 1
    put(hub_cache, "FoundationVision/var", COMMIT_MAIN, "sub/dir/var_d16.safetensors",
        _safetensors_bytes(tmp_path, new))
    put(hub_cache, "FoundationVision/var", COMMIT_OLD, "sub/dir/var_d16.safetensors",
        _safetensors_bytes(tmp_path, old, "old.safetensors"), refs=("v1",))
    pth = tmp_path / "var_d16.pth"
    torch.save(new, pth)
    put(hub_cache, "FoundationVision/var", COMMIT_MAIN, "var_d16.pth", pth.read_bytes())
    snapshot = hub_cache / "models--FoundationVision--var" / "snapshots"
    for spec, commit in (("hf://FoundationVision/var/sub/dir/var_d16.safetensors", COMMIT_MAIN),
                         ("hf://FoundationVision/var/sub/dir/var_d16.safetensors@main", COMMIT_MAIN),
                         (f"hf://FoundationVision/var/sub/dir/var_d16.safetensors@{COMMIT_MAIN}", COMMIT_MAIN),
                         ("hf://FoundationVision/var/sub/dir/var_d16.safetensors@v1", COMMIT_OLD),
                         (f"hf://FoundationVision/var/sub/dir/var_d16.safetensors@{COMMIT_OLD}", COMMIT_OLD)):
        assert resolve_weights_path(spec) == str(snapshot / commit / "sub" / "dir" / "var_d16.safetensors")
        model = load_checkpoint(spec)
        expected = new if commit == COMMIT_MAIN else old
        assert torch.equal(model.state_dict()["head.bias"], expected["head.bias"]), spec
    case = g["cases"][0]
    logits = load_checkpoint("hf://FoundationVision/var/var_d16.pth", cond_drop_rate=0.0).eval()(
        case["label_B"], case["x_BLCv_wo_first_l"])
    assert (logits - case["logits"]).abs().max() <= 1e-5


def test_a_sharded_index_brings_its_shards(hub_cache, tmp_path):
    sd = _golden("var")["state_dict"]
    keys = sorted(sd)
    weight_map = {}
    for i in range(2):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        part = {k: sd[k] for k in keys[i::2]}
        put(hub_cache, "ZGZzz/SAR", COMMIT_MAIN, f"d16/{name}", _safetensors_bytes(tmp_path, part, name))
        weight_map.update({k: name for k in part})
    put(hub_cache, "ZGZzz/SAR", COMMIT_MAIN, "d16/model.safetensors.index.json",
        json.dumps({"weight_map": weight_map}).encode())
    model = load_checkpoint("hf://ZGZzz/SAR/d16/model.safetensors.index.json")
    for k, v in model.state_dict().items():
        if k in sd:
            assert torch.equal(v, sd[k]), k


def test_missing_files_name_the_id_the_cache_and_offline_mode(hub_cache, tmp_path):
    put(hub_cache, "FoundationVision/var", COMMIT_MAIN, "var_d16.pth", b"x")
    for spec in ("hf://FoundationVision/var/var_d20.pth", "hf://FoundationVision/var/var_d16.pth@nobranch",
                 "hf://nobody/nothing/x.pth"):
        with pytest.raises(HubError) as e:
            resolve_weights_path(spec)
        msg = str(e.value)
        assert spec in msg and str(hub_cache) in msg and "HF_HUB_OFFLINE" in msg, msg


@pytest.mark.parametrize("spec", ["hf://owner/repo", "hf://owner/repo/", "hf://owner//file.pth", "hf:///repo/f.pth",
                                  "hf://own er/repo/f.pth", "hf://owner/re--po/f.pth", "hf://owner/repo/../f.pth",
                                  "hf://owner/repo/a/./f.pth", "hf://owner/repo/f.pth@", "hf://owner/repo/f.pth@a b",
                                  "hf://owner/repo/f\\g.pth"])
def test_malformed_ids_are_refused(spec):
    with pytest.raises(HubError, match="malformed Hub id"):
        parse_hub_id(spec)


def test_parse_hub_id():
    assert parse_hub_id("hf://jiaosiyu1999/FlexVAR/FlexVARd16-epo179.pth") == \
        ("jiaosiyu1999/FlexVAR", "FlexVARd16-epo179.pth", None)
    assert parse_hub_id("hf://ZGZzz/SAR/ckpt/d16/model.safetensors@refs/pr/1") == \
        ("ZGZzz/SAR", "ckpt/d16/model.safetensors", "refs/pr/1")
    assert resolve_weights_path("plain/path.pth") == "plain/path.pth"


def test_flags_take_hub_ids(hub_cache, tmp_path):
    """--init passes config validation (no 'no such file'), convert reads an id, and an id
    missing from the offline cache is one line naming it, exit 2."""
    from sar_fast.train.config import parse_config
    sd = _golden("var")["state_dict"]
    put(hub_cache, "FoundationVision/var", COMMIT_MAIN, "var_d16.safetensors", _safetensors_bytes(tmp_path, sd))
    cfg = parse_config(["--init", "hf://FoundationVision/var/var_d16.safetensors", "--out", str(tmp_path / "run")])
    assert cfg.model.init == "hf://FoundationVision/var/var_d16.safetensors"  # the id is what the run records
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    out = tmp_path / "var_d16.pth"
    res = subprocess.run([sys.executable, "-m", "sar_fast.convert", "hf://FoundationVision/var/var_d16.safetensors",
                          str(out)], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert sorted(torch.load(out, weights_only=True)) == sorted(sd)
    missing = "hf://FoundationVision/var/var_d30.safetensors"
    for cmd in (["sar_fast.train", "--init", missing], ["sar_fast.convert", missing, str(tmp_path / "x.pth")]):
        res = subprocess.run([sys.executable, "-m", *cmd], env=env, capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1 and missing in res.stderr and "HF_HUB_OFFLINE" in res.stderr


def test_torchrun_two_ranks_init_from_a_hub_id(hub_cache, tmp_path):
    """Each rank resolves the id to the same cached file before any process group; rank 0
    reads the weights and broadcasts them: a step at lr 0 exports them unchanged."""
    from sar_fast.models.tokenizers.grey import GreyLevelTokenizer
    from sar_fast.models import build_model, save_export
    tok = GreyLevelTokenizer()
    torch.manual_seed(0)
    model = build_model("flexvar-tiny", depth=1, embed_dim=32, num_heads=2, vocab_size=tok.vocab_size, code_dim=1,
                        schedule=(1, 2, 4, 8))
    save_export(model, tmp_path / "m.safetensors")
    put(hub_cache, "me/tiny", COMMIT_MAIN, "m.safetensors", (tmp_path / "m.safetensors").read_bytes())
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m",
                          "sar_fast.train", "--init", "hf://me/tiny/m.safetensors", "--out", str(out),
                          "--pretrain-steps", "0", "--max-steps", "1", "--lr", "0", "--batch-size", "4",
                          "--num-samples", "0",
                          "--workers", "0", "--no-progress", "--schedule", "1,2,4,8"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    exported = load_checkpoint(out / "export.safetensors").state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(exported[k], v), k
    assert json.loads((out / "config.json").read_text())["model"]["init"] == "hf://me/tiny/m.safetensors"
