"""Every reader of a user's file is a safe one: read from the package's source with `ast`,
no call outside sar_fast/safe_load.py unpickles without restriction (torch.load, pickle,
numpy.load with allow_pickle), and DCP's load always gets sar_fast's reader and planner
(its defaults unpickle non-tensor items with torch.load(weights_only=False))."""
import ast
import os

from conftest import ROOT, dotted_name

PACKAGE = os.path.join(ROOT, "sar_fast")
SAFE_LOADER = os.path.join(PACKAGE, "safe_load.py")


def _calls():
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            with open(path) as f:
                tree = ast.parse(f.read(), path)
            for node in ast.walk(tree):
                if isinstance(node, ast.Call):
                    yield path, node



def _kwarg(call, name):
    return next((k.value for k in call.keywords if k.arg == name), None)


def unsafe_reads(calls):
    found = []
    for path, call in calls:
        name = dotted_name(call.func)
        where = f"{os.path.relpath(path, ROOT)}:{call.lineno} {name}"
        if path == SAFE_LOADER:
            continue
        if name.endswith(("pickle.load", "pickle.loads", "Unpickler", "torch.load", "marshal.loads")):
            found.append(where)
        elif name.endswith(("np.load", "numpy.load")):
            allow = _kwarg(call, "allow_pickle")
            if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                found.append(where + " (allow_pickle)")
        elif name in ("dcp.load", "torch.distributed.checkpoint.load"):
            if _kwarg(call, "storage_reader") is None or _kwarg(call, "planner") is None:
                found.append(where + " (without sar_fast's reader and planner)")
    return found


def test_no_unrestricted_unpickling_outside_safe_load():
    assert unsafe_reads(_calls()) == []


def test_the_audit_sees_what_it_must_refuse():
    source = """
import pickle, torch, numpy as np
import torch.distributed.checkpoint as dcp
torch.load(p, weights_only=False)
pickle.load(f)
np.load(p, allow_pickle=True)
np.load(p)
np.load(p, allow_pickle=False)
dcp.load(state, storage_reader=r)
dcp.load(state, storage_reader=r, planner=q)
"""
    tree = ast.parse(source)
    calls = [("x.py", n) for n in ast.walk(tree) if isinstance(n, ast.Call)]
    found = unsafe_reads(calls)
    assert [f.split(" ", 1)[1] for f in found] == [
        "torch.load", "pickle.load", "np.load (allow_pickle)", "dcp.load (without sar_fast's reader and planner)"]
