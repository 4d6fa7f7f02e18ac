"""Every command-line entry point, given a bad path where it expects a file (or a folder),
exits 2 with one line on stderr naming the path, and no traceback.

Each (entry point, path) runs as `python -m sar_fast.X ...` would: the module executed as
__main__ (runpy, what -m does) in a process of its own. To keep 40-odd runs fast, the
processes are forked from one driver that has imported torch once; the driver ends each run as
the interpreter would (a traceback for an uncaught exception, SystemExit's message and code).
A few runs also go through a real `python -m`."""
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

ENTRY_POINTS = {  # where each takes the path; BAD is replaced by it
    "train": ["--init", "BAD", "--out", "OUT"],
    "evaluate": ["--ckpt", "BAD", "--out", "OUT"],
    "sample": ["--ckpt", "BAD", "--vae", "embedded-digits", "--out", "OUT.png"],
    "cache": ["--data", "embedded-digits", "--vae", "BAD", "--out", "OUT"],
    "convert": ["BAD", "OUT.safetensors"],
    "memory": ["BAD"],  # takes preset names, not files: a path is not one
    "study": ["--out", "BAD"],  # an output folder: a missing or plain folder is a valid one
}
NOT_BAD = {"study": ("missing", "directory")}


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def bad_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    (root / "adir").mkdir()
    step = root / "run" / "checkpoints" / "step_00000010"
    step.mkdir(parents=True)
    (step / "COMPLETE").write_text("")
    (step / ".metadata").write_bytes(b"")
    (root / "empty.pth").write_bytes(b"")
    good = root / "good.pth"
    torch.save({"w": torch.zeros(64, 64)}, good)
    (root / "cut.pth").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (root / "evil.pth").write_bytes(pickle.dumps(_RunsCode(root / "RAN"), protocol=2))
    paths = {"missing": root / "nope.pth", "directory": root / "adir", "training checkpoint": step,
             "README.md": os.path.join(ROOT, "README.md"), "empty file": root / "empty.pth",
             "truncated zip": root / "cut.pth", "malicious pickle": root / "evil.pth"}
    return root, {k: str(v) for k, v in paths.items()}


DRIVER = r"""
import io, json, os, runpy, sys, tempfile, traceback
import importlib
import torch  # imported once, before the forks, with what the entry points share (not the entry points
for name in ("sar_fast.train.config", "sar_fast.data.loader", "sar_fast.train.build", "sar_fast.train.parallel",
             "sar_fast.models"):
    importlib.import_module(name)  # themselves: runpy runs those fresh, as -m does)
cases = json.loads(sys.argv[1])
results = []
for module, argv in cases:
    err = tempfile.TemporaryFile()
    pid = os.fork()
    if pid == 0:
        os.dup2(err.fileno(), 2)
        sys.stderr = io.TextIOWrapper(os.fdopen(2, "wb", closefd=False), write_through=True)
        sys.argv = [module] + argv
        code = 0
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as e:  # as the interpreter ends: print a message, exit 1; an int is the code
            if isinstance(e.code, int) or e.code is None:
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    err.seek(0)
    results.append([os.waitstatus_to_exitcode(status), err.read().decode(errors="replace")])
print(json.dumps(results))
"""


def _env():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)
    return env


def _cases(name, root, paths):
    out = []
    for kind, path in paths.items():
        if kind in NOT_BAD.get(name, ()):
            continue
        argv = [path if a == "BAD" else a.replace("OUT", str(root / f"out-{name}-{kind.replace(' ', '_')}"))
                for a in ENTRY_POINTS[name]]
        out.append((kind, path, argv))
    return out


def _check(name, kind, path, rc, err, root):
    lines = [line for line in err.splitlines() if line.strip()]
    where = f"{name} on {kind}: rc {rc}, stderr:\n{err[-3000:]}"
    assert rc == 2, where
    assert "Traceback" not in err, where
    assert len(lines) == 1, where
    assert path in lines[0], where
    if kind == "training checkpoint" and name != "memory":
        assert "--resume" in lines[0] and "export" in lines[0], where
    assert not (root / "RAN").exists(), "the malicious pickle ran"


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_bad_paths_give_one_line_and_exit_2(name, bad_paths):
    root, paths = bad_paths
    cases = _cases(name, root, paths)
    res = subprocess.run([sys.executable, "-c", DRIVER, json.dumps([(f"sar_fast.{name}", argv)
                                                                    for _, _, argv in cases])],
                         env=_env(), cwd=root, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads(res.stdout.strip().splitlines()[-1])
    for (kind, path, _), (rc, err) in zip(cases, results):
        _check(name, kind, path, rc, err, root)
    assert not any(p.startswith("out-") for p in os.listdir(root)), "an entry point wrote output before failing"


@pytest.mark.parametrize("name, kind", [("evaluate", "README.md"), ("sample", "README.md"),
                                        ("train", "training checkpoint")])
def test_the_real_interpreter_prints_no_traceback(name, kind, bad_paths):
    root, paths = bad_paths
    (kind, path, argv), = [c for c in _cases(name, root, paths) if c[0] == kind]
    res = subprocess.run([sys.executable, "-m", f"sar_fast.{name}", *argv], env=_env(), cwd=root,
                         capture_output=True, text=True, timeout=300)
    _check(name, kind, path, res.returncode, res.stderr, root)
