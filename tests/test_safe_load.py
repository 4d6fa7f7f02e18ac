"""Crafted checkpoints run no code through any sar_fast loader, and malformed files get one
clear error. Every payload is first shown to run under plain pickle / torch.load(weights_only=
False) (it writes a marker file), so a refusal here is a refusal of a working exploit."""
import argparse
import io
import os
import pickle
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch

from sar_fast.train import checkpointing
from sar_fast.models import CheckpointError, load_checkpoint, load_tokenizer, read_checkpoint_file
from sar_fast.models.tokenizers import read_state_dict
from sar_fast.safe_load import StandIn, inspect_pickle_globals, load_file, restricted_pickle_load

DATA = os.path.join(os.path.dirname(__file__), "data")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------ a pickler that names any global
class Global:
    """Pickles as a bare reference to module.name (GLOBAL, or STACK_GLOBAL from protocol 4),
    whether or not that object exists here."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, *a):  # pickle insists that a reduce function be callable
        raise AssertionError("never called while pickling")


class Call:
    """Pickles as func(*args): REDUCE."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args

    def __call__(self, *a):
        raise AssertionError("never called while pickling")


class CraftingPickler(pickle._Pickler):
    dispatch = dict(pickle._Pickler.dispatch)

    def _save_global_ref(self, obj):
        if self.proto >= 4:
            self.save(obj.module)
            self.save(obj.name)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())

    dispatch[Global] = _save_global_ref


class crafting_pickle_module:  # what torch.save(pickle_module=...) needs
    Pickler = CraftingPickler
    dump = staticmethod(pickle.dump)


def payloads(marker):
    """name -> (object whose unpickling writes `marker`, the global our loaders must name)."""
    touch_py = f"open({marker!r}, 'w').close()"
    imp = Call(Global("builtins", "__import__"), "os")
    return {
        "exec": (Call(Global("builtins", "exec"), touch_py), r"builtins\.exec"),
        "eval": (Call(Global("builtins", "eval"), touch_py), r"builtins\.eval"),
        "os.system": (Call(Global("os", "system"), f"touch {marker}"), r"os\.system"),
        "posix.system": (Call(Global("posix", "system"), f"touch {marker}"), r"posix\.system"),
        "subprocess": (Call(Global("subprocess", "call"), ["touch", marker]), r"subprocess\.call"),
        "getattr-import": (Call(Call(Global("builtins", "getattr"), imp, "system"), f"touch {marker}"),
                           r"builtins\.getattr"),
        "numpy": (Call(Global("numpy", "savetxt"), marker, [1.0]), r"numpy\.savetxt"),
        "torch": (Call(Global("torch", "save"), {}, marker), r"torch\.save"),
    }


LAYOUTS = [("zip", 2), ("zip", 4), ("legacy", 2), ("legacy", 4), ("raw", 2), ("raw", 4)]


def write_crafted(path, payload, layout, proto):
    """A checkpoint that looks official (an ar-ckpt with a model state dict) carrying the payload."""
    obj = {"trainer": {"var_wo_ddp": {"head.weight": torch.zeros(3, 2)}}, "args": payload}
    if layout == "raw":  # a bare pickle
        buf = io.BytesIO()
        CraftingPickler(buf, protocol=proto).dump(payload)
        path.write_bytes(buf.getvalue())
    else:
        torch.save(obj, path, pickle_module=crafting_pickle_module, pickle_protocol=proto,
                   _use_new_zipfile_serialization=layout == "zip")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("crafted")
    files = []
    for layout, proto in LAYOUTS:
        for name in payloads("x"):
            marker = root / f"ran-{name}-{layout}-p{proto}"
            payload, refused = payloads(str(marker))[name]
            path = root / f"{name}-{layout}-p{proto}.pth"
            write_crafted(path, payload, layout, proto)
            files.append((path, marker, refused))
    return files


def _run_plainly(paths, how):
    code = textwrap.dedent(f"""
        import pickle, sys, torch
        for p in sys.argv[1:]:
            try:
                {'pickle.load(open(p, "rb"))' if how == 'pickle' else 'torch.load(p, weights_only=False)'}
            except Exception:
                pass
    """)
    subprocess.run([sys.executable, "-c", code, *map(str, paths)], check=True, timeout=120, cwd=REPO,
                   capture_output=True)


def test_every_payload_runs_under_plain_unpickling(corpus):
    """Guard against a corpus that proves nothing: each file does run code when loaded plainly."""
    torch_files = [p for p, _, _ in corpus if p.name.split("-")[-2] != "raw"]
    raw_files = [p for p, _, _ in corpus if p.name.split("-")[-2] == "raw"]
    _run_plainly(torch_files, "torch")
    _run_plainly(raw_files, "pickle")
    missing = [str(p.name) for p, marker, _ in corpus if not marker.exists()]
    assert not missing, f"payloads that did not run plainly: {missing}"
    for _, marker, _ in corpus:
        marker.unlink()


LOADERS = {
    "load_file": load_file,
    "read_checkpoint_file": read_checkpoint_file,
    "load_checkpoint": load_checkpoint,
    "load_tokenizer": load_tokenizer,
    "read_state_dict": read_state_dict,
    "rng state": lambda p: checkpointing._set_rng_state(load_file(p)),
}


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_crafted_checkpoints_run_nothing_and_are_refused(corpus, loader):
    for path, marker, refused in corpus:
        with pytest.raises(CheckpointError, match=rf"{path}.*refused.*{refused}"):
            LOADERS[loader](path)
        assert not marker.exists(), f"{loader} ran the payload of {path.name}"


def _tiny_training_checkpoint(root):
    """A sar_fast training checkpoint of a Linear layer: DCP shards, trainer.json, RNG, COMPLETE."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(root))
    os.makedirs(root / "rng", exist_ok=True)
    torch.save(checkpointing._rng_state(), root / "rng" / "rank0.pt")
    (root / "trainer.json").write_text('{"step": 1}')
    (root / checkpointing.COMPLETE).write_text("1\n")
    return model, opt


class _Info:
    rank = 0


def test_training_checkpoint_loads_and_refuses_crafted_parts(tmp_path):
    ckpt = tmp_path / "step_00000001"
    model, opt = _tiny_training_checkpoint(ckpt)
    assert checkpointing.load_checkpoint(str(ckpt), model, opt, _Info()) == {"step": 1}

    # the RNG file and the DCP index (.metadata, a plain pickle) each replaced by a payload
    marker = tmp_path / "ran"
    payload, refused = payloads(str(marker))["os.system"]
    rng = ckpt / "rng" / "rank0.pt"
    good_rng = rng.read_bytes()
    write_crafted(rng, payload, "zip", 2)
    with pytest.raises(CheckpointError, match=rf"rank0.pt.*refused.*{refused}"):
        checkpointing.load_checkpoint(str(ckpt), model, opt, _Info())
    assert not marker.exists()
    rng.write_bytes(good_rng)

    meta = ckpt / ".metadata"
    buf = io.BytesIO()
    CraftingPickler(buf, protocol=4).dump(payload)
    meta.write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError, match=rf"\.metadata.*refused.*{refused}"):
        checkpointing.load_checkpoint(str(ckpt), model, opt, _Info())
    assert not marker.exists()
    _run_plainly([meta], "pickle")  # and plain pickle would have run it
    assert marker.exists()


def test_rng_state_round_trips_through_the_safe_loader(tmp_path):
    import random

    import numpy as np
    torch.save(checkpointing._rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    checkpointing._set_rng_state(load_file(tmp_path / "rng.pt"))
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected
    # the older format (numpy array, Python tuple) still reads: numpy arrays are data
    old = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save(old, tmp_path / "old.pt")
    expected = (random.random(), float(np.random.rand()))
    checkpointing._set_rng_state(load_file(tmp_path / "old.pt"))
    assert (random.random(), float(np.random.rand())) == expected


# ------------------------------------------------------------------ foreign classes: inert stand-ins
def test_foreign_classes_become_inert_stand_ins(tmp_path):
    g = torch.load(os.path.join(DATA, "golden_flexvar.pt"), weights_only=True)
    marker = tmp_path / "ran"
    # a class of training code that is not installed here, built by REDUCE and by NEWOBJ+BUILD
    by_reduce = Call(Global("orig_train.utils", "Args"), str(marker), 3)
    for proto in (2, 4):
        path = tmp_path / f"ar-ckpt-p{proto}.pth"
        torch.save({"trainer": {"var_wo_ddp": g["state_dict"]}, "args": argparse.Namespace(lr=1e-4, depth=16),
                    "extra": by_reduce}, path, pickle_module=crafting_pickle_module, pickle_protocol=proto)
        if proto == 4:  # torch's weights-only reader knows protocol 2 only: refused, saying why
            with pytest.raises(CheckpointError, match=r"refused.*pickle protocol above 2"):
                read_checkpoint_file(path)
            continue
        obj = read_checkpoint_file(path)
        assert isinstance(obj["args"], StandIn) and obj["args"].lr == 1e-4 and obj["args"].depth == 16
        assert "argparse.Namespace" in repr(obj["args"])
        assert isinstance(obj["extra"], StandIn) and obj["extra"]._args == (str(marker), 3)
        assert load_checkpoint(path).arch == "flexvar"
    assert not marker.exists()
    # a lower-case name of foreign code is a function, not data: refused
    path = tmp_path / "func.pth"
    torch.save({"x": Call(Global("orig_train.utils", "run"), 1)}, path, pickle_module=crafting_pickle_module)
    with pytest.raises(CheckpointError, match=r"refused.*orig_train\.utils\.run"):
        load_file(path)
    # a class of an installed module is never a stand-in (it has code that could run)
    torch.save({"x": Call(Global("subprocess", "Popen"), ["true"])}, path, pickle_module=crafting_pickle_module)
    with pytest.raises(CheckpointError, match=r"refused.*subprocess\.Popen"):
        load_file(path)


def test_scan_refuses_what_it_cannot_name():
    # STACK_GLOBAL whose operands are built, not literal; and copyreg's extension registry
    built = b"\x80\x04\x8c\x02osN\x85R\x8c\x06system\x93."
    with pytest.raises(CheckpointError, match="STACK_GLOBAL"):
        inspect_pickle_globals(built)
    with pytest.raises(CheckpointError, match="EXT1"):
        inspect_pickle_globals(b"\x80\x02\x82\x01.")
    assert inspect_pickle_globals(pickle.dumps(torch.Size([2]), protocol=4)) == [("torch", "Size")]


def test_restricted_pickle_load_allows_only_data_classes(tmp_path):
    p = tmp_path / "x.pkl"
    p.write_bytes(pickle.dumps({"a": [1, (2, 3)], "s": torch.Size([4])}))
    assert restricted_pickle_load(str(p), ("torch.distributed.checkpoint.",)) == {"a": [1, (2, 3)],
                                                                                  "s": torch.Size([4])}
    # a non-dataclass under an allowed prefix (constructors that do work) is refused
    p.write_bytes(b"\x80\x02ctorch.distributed.checkpoint.filesystem\nFileSystemWriter\nq\x00.")
    with pytest.raises(CheckpointError, match="FileSystemWriter"):
        restricted_pickle_load(str(p), ("torch.distributed.checkpoint.",))


# ------------------------------------------------------------------ malformed files
def test_malformed_files_fail_with_one_clear_error(tmp_path):
    g = torch.load(os.path.join(DATA, "golden_var.pt"), weights_only=True)
    good = tmp_path / "good.pth"
    torch.save(g["state_dict"], good)
    cases = {}
    (tmp_path / "empty.pth").write_bytes(b"")
    cases["empty.pth"] = r"is empty \(0 bytes\); expected a checkpoint written by torch.save"
    (tmp_path / "text.pth").write_text("root:x:0:0:root:/root:/bin/bash\n")
    cases["text.pth"] = r"is not a PyTorch checkpoint .*starts with b'root:x:0'"
    (tmp_path / "truncated.pth").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cases["truncated.pth"] = r"damaged zip archive .*cut short"
    legacy = tmp_path / "legacy-full.pth"
    torch.save(g["state_dict"], legacy, _use_new_zipfile_serialization=False)
    assert load_checkpoint(legacy).arch == "var" and load_checkpoint(good).arch == "var"  # both layouts load
    (tmp_path / "legacy-cut.pth").write_bytes(legacy.read_bytes()[: legacy.stat().st_size // 2])
    cases["legacy-cut.pth"] = r"not a readable torch checkpoint \(damaged or truncated\?\)"
    (tmp_path / "legacy-head.pth").write_bytes(legacy.read_bytes()[:200])
    cases["legacy-head.pth"] = r"not a valid pickle stream"
    (tmp_path / "adir").mkdir()
    cases["adir"] = r"is a directory; expected a checkpoint file"
    (tmp_path / "junk.pth").write_bytes(b"\x80\x02junk")
    cases["junk.pth"] = r"not a valid pickle stream"
    with zipfile.ZipFile(tmp_path / "notorch.zip", "w") as z:
        z.writestr("hello.txt", "hi")
    cases["notorch.zip"] = r"zip archive without exactly one data.pkl"
    for name, msg in cases.items():
        path = tmp_path / name
        for loader in (load_checkpoint, load_tokenizer, load_file):
            with pytest.raises(CheckpointError, match=rf"{path}.*{msg}" if name != "adir" else msg) as e:
                loader(path)
            assert str(path) in str(e.value)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_file(tmp_path / "missing.pth")


def test_wrong_model_dtype_and_nonfinite_weights(tmp_path):
    var = torch.load(os.path.join(DATA, "golden_var.pt"), weights_only=True)["state_dict"]
    vq = torch.load(os.path.join(DATA, "golden_varvq.pt"), weights_only=True)["state_dict"]
    p = tmp_path / "ckpt.pth"
    torch.save(vq, p)  # a tokenizer given where the transformer is expected
    with pytest.raises(CheckpointError, match=rf"{p}: not a FlexVAR/VAR transformer state dict"):
        load_checkpoint(p)
    torch.save(var, p)  # and the other way round
    with pytest.raises(CheckpointError, match=rf"{p}: cannot tell the tokenizer kind"):
        load_tokenizer(p)
    bad = dict(var)
    bad["head.weight"] = bad["head.weight"].to(torch.int32)
    torch.save(bad, p)
    with pytest.raises(CheckpointError, match=rf"{p}: wrong tensor dtypes \(1\): head.weight: torch.int32"):
        load_checkpoint(p)
    bad = dict(var)
    bad["head.bias"] = torch.zeros(bad["head.bias"].numel() + 1)
    torch.save(bad, p)
    with pytest.raises(CheckpointError,
                       match=rf"(?s){p}: checkpoint does not fit the model.*head.bias: checkpoint \(98,\)"):
        load_checkpoint(p)
    bad = dict(var)
    w = bad["head.weight"].clone()
    w[0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    bad["head.weight"] = w
    torch.save(bad, p)
    with pytest.warns(RuntimeWarning, match=rf"{p}: 3 non-finite \(NaN/Inf\) weight values in 1 tensors: "
                                            r"head.weight \(3\)"):
        load_checkpoint(p)
    vq_bad = dict(vq)
    k = next(k for k, v in vq.items() if v.is_floating_point())
    vq_bad[k] = vq_bad[k].clone().fill_(float("nan"))
    torch.save(vq_bad, p)
    with pytest.warns(RuntimeWarning, match=rf"{p}: {vq_bad[k].numel()} non-finite"):
        load_tokenizer(p, norm_groups=4)


# ------------------------------------------------------------------ the trainer: once, before any rank works
@pytest.mark.parametrize("bad", ["passwd", "tokenizer-as-model"])
def test_torchrun_with_a_bad_init_fails_once_without_hanging(tmp_path, bad):
    if bad == "passwd":
        init = tmp_path / "passwd"
        init.write_text("root:x:0:0:root:/root:/bin/bash\n")
        msg = "is not a PyTorch checkpoint"
    else:
        init = tmp_path / "vae.pth"
        torch.save(torch.load(os.path.join(DATA, "golden_varvq.pt"), weights_only=True)["state_dict"], init)
        msg = "not a FlexVAR/VAR transformer state dict"
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m",
           "sar_fast.train", "--out", str(tmp_path / "run"), "--init", str(init), "--max-steps", "1"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert out.count(msg) == 1, out[-3000:]
    assert f"error: {init}" in out and "Traceback" not in out.split("error:")[0][-2000:]
    assert not (tmp_path / "run").exists()  # no rank got as far as creating the run directory
