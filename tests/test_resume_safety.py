"""A training run directory someone else shared runs no code on resume.

`torch.distributed.checkpoint.load` hands every non-tensor item of a checkpoint (the
optimiser's lr, betas, ...) to its default planner, which unpickles it with
`torch.load(weights_only=False)`; its reader unpickles the index (.metadata) with plain
`pickle.load`. The corpus here is a real checkpoint of the trainer with one part replaced
by a payload (the index; or an item, pointed at by the index, as a zip, legacy or bare
pickle). Each payload is first shown to run under plain `dcp.load` (it writes a marker
file), then resumed through the trainer's own path with 1 and 2 ranks: no marker, the same
clear error naming the item on every rank, and no rank left waiting."""
import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo

from conftest import PACKAGE_PATH
from sar_fast.safe_load import restricted_pickle_load
from test_safe_load import CraftingPickler, crafting_pickle_module, payloads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = os.path.join(ROOT, "tests", "resume_probe.py")
TINY = ["--depth", "1", "--embed-dim", "32", "--num-heads", "2", "--batch-size", "16", "--num-samples", "0",
        "--no-progress", "--workers", "0", "--top-k", "0", "--pretrain-steps", "0"]
# the three items first found to run code (any non-tensor item would do)
ITEMS = ["optim.param_groups.0.lr", "optim.param_groups.0.betas", "optim.param_groups.1.weight_decay"]


def _env():
    env = dict(os.environ, PYTHONPATH=PACKAGE_PATH + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    return env


def _read_index(folder):
    return restricted_pickle_load(os.path.join(folder, ".metadata"), ("torch.distributed.checkpoint.",))


def _write_index(folder, metadata):
    with open(os.path.join(folder, ".metadata"), "wb") as f:
        pickle.dump(metadata, f)


def _payload_bytes(payload, layout, proto):
    buf = io.BytesIO()
    if layout == "bare":
        CraftingPickler(buf, protocol=proto).dump(payload)
    else:
        torch.save(payload, buf, pickle_module=crafting_pickle_module, pickle_protocol=proto,
                   _use_new_zipfile_serialization=layout == "zip")
    return buf.getvalue()


def _point_item_at(folder, fqn, blob, relative_path="evil.distcp"):
    """The index now says item `fqn` is the bytes of `blob` (written beside the shards)."""
    with open(os.path.join(folder, os.path.basename(relative_path)), "wb") as f:
        f.write(blob)
    metadata = _read_index(folder)
    (index,) = [i for i in metadata.storage_data if i.fqn == fqn]
    metadata.storage_data[index] = _StorageInfo(relative_path, 0, len(blob))
    _write_index(folder, metadata)


@pytest.fixture(scope="module")
def clean_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cmd = [sys.executable, "-m", "sar_fast.train", "--out", str(out), *TINY, "--max-steps", "1"]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return str(out / "checkpoints" / "step_00000001")


@pytest.fixture(scope="module")
def corpus(clean_checkpoint, tmp_path_factory):
    """[(folder, marker, what the error must name)]: every folder runs its payload under plain dcp.load."""
    root = tmp_path_factory.mktemp("crafted")
    cases = []
    kinds = ["os.system", "exec", "subprocess"]
    n = 0
    for layout in ("zip", "legacy", "bare"):
        for proto in (2, 4):
            for kind in kinds[:2]:
                fqn = ITEMS[n % len(ITEMS)]
                n += 1
                folder = root / f"item-{layout}-p{proto}-{kind}"
                marker = root / f"ran-{folder.name}"
                shutil.copytree(clean_checkpoint, folder)
                payload, refused = payloads(str(marker))[kind]
                _point_item_at(str(folder), fqn, _payload_bytes(payload, layout, proto))
                cases.append((str(folder), str(marker), rf"item '{fqn}'.*{refused}"))
    for proto in (2, 4):
        for kind in kinds:
            folder = root / f"index-p{proto}-{kind}"
            marker = root / f"ran-{folder.name}"
            shutil.copytree(clean_checkpoint, folder)
            payload, refused = payloads(str(marker))[kind]
            buf = io.BytesIO()
            CraftingPickler(buf, protocol=proto).dump(payload)
            (folder / ".metadata").write_bytes(buf.getvalue())
            cases.append((str(folder), str(marker), rf"\.metadata.*refused.*{refused}"))
    return cases


# Plain DCP, as a user's own script would call it: the index tells which items to read.
_PLAIN_DCP = textwrap.dedent("""
    import pickle, sys, torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    for folder in sys.argv[1:]:
        try:
            md = pickle.load(open(folder + "/.metadata", "rb"))
            sd = {k: torch.empty(m.size, dtype=m.properties.dtype) if isinstance(m, TensorStorageMetadata)
                  else None for k, m in md.state_dict_metadata.items()}
            dcp.load(sd, checkpoint_id=folder, no_dist=True)
        except BaseException:
            pass
""")


def test_every_payload_runs_under_plain_dcp_load(corpus):
    """Guard against a corpus that proves nothing."""
    subprocess.run([sys.executable, "-c", _PLAIN_DCP, *[f for f, _, _ in corpus]], check=True, timeout=300,
                   capture_output=True, env=_env())
    missing = [os.path.basename(f) for f, marker, _ in corpus if not os.path.exists(marker)]
    assert not missing, f"payloads that did not run under plain dcp.load: {missing}"
    for _, marker, _ in corpus:
        os.remove(marker)


def _probe(tmp_path, nproc, folders):
    out = tmp_path / "probe.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone", PROBE,
           "--json", str(out), "--folders", json.dumps(folders), "--", "--out", str(tmp_path / "run"), *TINY]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def beyond_plain_dcp(clean_checkpoint, tmp_path_factory):
    """Crafted folders that plain dcp.load does not run (it reads tensors weights-only, and
    follows any path), refused all the same: a tensor item that is a payload, an index that
    points an item outside the folder."""
    root = tmp_path_factory.mktemp("beyond")
    marker = root / "ran"
    payload, refused = payloads(str(marker))["os.system"]
    blob = _payload_bytes(payload, "zip", 2)
    cases = []
    folder = root / "tensor-item"
    shutil.copytree(clean_checkpoint, folder)
    _point_item_at(str(folder), "model.head.weight", blob)
    cases.append((str(folder), str(marker), rf"item 'model.head.weight'.*{refused}"))
    for i, rel in enumerate(["../evil.distcp", str(root / "evil.distcp")]):
        folder = root / f"outside-{i}"
        shutil.copytree(clean_checkpoint, folder)
        _point_item_at(str(folder), ITEMS[0], blob, relative_path=rel)
        cases.append((str(folder), str(marker), rf"item '{ITEMS[0]}'.*not a file name inside the checkpoint folder"))
    return cases


@pytest.mark.parametrize("nproc", [1, 2])
def test_resume_refuses_every_payload_on_every_rank(corpus, beyond_plain_dcp, clean_checkpoint, tmp_path, nproc):
    crafted = corpus + beyond_plain_dcp
    folders = [clean_checkpoint] + [f for f, _, _ in crafted] + [clean_checkpoint]
    per_rank = _probe(tmp_path, nproc, folders)
    assert len(per_rank) == nproc
    ran = [os.path.basename(f) for f, marker, _ in crafted if os.path.exists(marker)]
    assert not ran, f"payloads that ran on resume: {ran}"
    for rank, results in enumerate(per_rank):
        assert results[clean_checkpoint] == "ok", (rank, results[clean_checkpoint])
        for folder, _, names in crafted:
            got = results[folder]
            assert got.startswith("CheckpointError: "), (rank, folder, got)
            assert len(got.splitlines()) == 1 and "Traceback" not in got, got
            assert re.search(names, got), (rank, folder, got, names)
            assert got == per_rank[0][folder], "every rank reports the same error"


@pytest.mark.parametrize("nproc, part", [(1, "index"), (2, "item")])
def test_torchrun_resume_of_a_crafted_run_fails_cleanly(corpus, tmp_path, nproc, part):
    """`--out THEIR_RUN` (resume auto): one clear error, non-zero exit, nothing ran, no hang."""
    folder, marker, names = next(c for c in corpus if os.path.basename(c[0]).startswith(part))
    run = tmp_path / "their_run"
    shutil.copytree(folder, run / "checkpoints" / "step_00000001")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone", "-m",
           "sar_fast.train", "--out", str(run), *TINY, "--max-steps", "2"]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode != 0, out[-3000:]
    assert not os.path.exists(marker)
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.search(names, errors[0]), out[-3000:]  # once, from rank 0
    assert "Traceback" not in out.split("error: ")[0][-3000:]
    assert not (run / "checkpoints" / "step_00000002").exists()
