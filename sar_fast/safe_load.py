"""The one way sar_fast reads a pickled file it did not write in this process.

A `.pth` is a pickle, and a pickle is a program: an unrestricted `torch.load` or
`pickle.load` on a file from the internet runs whatever it names. Every pickled file sar_fast
reads (model and tokenizer checkpoints, exports, the trainer's RNG state, the index of a
sharded training checkpoint and every item in it) goes through this module instead
(`.safetensors` files, which cannot carry code, are read by safetensors: models/checkpoint.py):

1. `inspect_pickle_globals` disassembles the pickle (pickletools: nothing is executed) and
   lists every global it names. Each one must be
   - on an exact allow-list of (module, name) pairs: torch's own weights-only set (tensors,
     storages, dtypes, OrderedDict, ...) plus the few numpy names an ndarray needs; or
   - a class of the original training code (`argparse.Namespace`, `utils.arg_util.Args`, or
     any class whose module is neither in the standard library nor importable here): it
     becomes an inert `StandIn` that records its constructor arguments and state as data and
     never runs a line of the original's code.
   Anything else (builtins.exec, os.system, subprocess.Popen, numpy.load, torch.load, ...)
   is a `CheckpointError` naming the file and the global, before unpickling starts.
2. The file is then unpickled by `torch.load(weights_only=True)`, torch's restricted
   unpickler, with only the stand-ins and the numpy names added: a global the scan could not
   see is still refused there.
Malformed files (empty, a directory, not a torch file, a damaged zip) get one CheckpointError
naming the path and what was expected.
"""
from __future__ import annotations

import dataclasses
import enum
import io
import os
import pathlib
import pickle
import pickletools
import sys
import zipfile
from importlib.util import find_spec
from typing import Any, Iterable

import torch

__all__ = ["CheckpointError", "InputError", "StandIn", "load_file", "load_bytes", "scan_item", "exit_once",
           "describe_folder", "require_nonempty_file", "inspect_pickle_globals", "restricted_pickle_load"]


class CheckpointError(ValueError):
    """A file sar_fast refuses to read: unsafe, malformed, or not the model it should hold."""


class InputError(SystemExit):
    """A bad command-line input, with its one-line message. A SystemExit, so callers of a
    `main` and the plain interpreter treat it as an exit with that message;
    `sar_fast.cli.run_main` exits 2."""


class StandIn:
    """Takes the place of a class of the original training code (its args object and the
    like). Nothing of the original is imported or called: the arguments pickle passes
    (`__reduce__` args, `__new__` args, `__setstate__` state) are kept as plain data.
    Attribute reads fall back to the keys of a dict state, so `ckpt['args'].lr` works."""

    _global_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any):
        self = object.__new__(cls)
        object.__setattr__(self, "_args", args)
        object.__setattr__(self, "_state", None)
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        object.__setattr__(self, "_state", state)

    def __getattr__(self, name: str) -> Any:
        state = object.__getattribute__(self, "_state")
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
            state = state[0]  # (dict state, slot state)
        if isinstance(state, dict) and name in state and not name.startswith("__"):
            return state[name]
        raise AttributeError(f"{type(self).__name__} (stand-in for {self._global_name}) has no attribute {name!r}")

    def __repr__(self) -> str:
        return f"<StandIn for {self._global_name}>"


# Classes the official checkpoints are known to pickle (VAR/FlexVAR/SAR ar-ckpt-*.pth 'args').
_KNOWN_FOREIGN = {("argparse", "Namespace"), ("utils.arg_util", "Args"), ("__main__", "Args")}
# The only globals never refused outside torch's own weights-only set: what an ndarray needs.
_NUMPY_NAMES = ("_reconstruct", "scalar")


def _numpy_allowed() -> dict[str, Any]:
    import numpy as np
    allowed: dict[str, Any] = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    core = getattr(np, "_core", None) or np.core
    for name in _NUMPY_NAMES:
        for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
            allowed[f"{mod}.{name}"] = getattr(core.multiarray, name)
    for code in "?bhilqBHILQefdgFDGUS":  # numeric, bool, str and bytes dtypes: never object
        dt = type(np.dtype(code))
        allowed[f"{dt.__module__}.{dt.__name__}"] = dt
    return allowed


def _torch_allowed() -> set[str]:
    from torch import _weights_only_unpickler as wou
    return set(wou._get_allowed_globals())


def _stand_in_for(module: str, name: str) -> type | None:
    """A StandIn subclass if (module, name) is a class of foreign training code, else None."""
    top = module.split(".")[0]
    foreign = (module, name) in _KNOWN_FOREIGN or (
        top not in sys.stdlib_module_names and top not in ("builtins", "__builtin__", "torch", "numpy")
        and top != "__main__" and _not_importable(top))
    if not foreign or not name.replace("_", "a").isalnum() or not name[:1].isupper():
        return None  # a class name (CapWords); functions of foreign code are not data
    return type(f"StandIn_{name}", (StandIn,), {"_global_name": f"{module}.{name}", "__module__": __name__})


def _not_importable(top: str) -> bool:
    try:
        return top.isidentifier() and find_spec(top) is None  # top-level: searches paths, imports nothing
    except (ImportError, ValueError):
        return True


# ----------------------------------------------------------------------------- the scan
_STRING_OPS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
               "BINUNICODE8"}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}
_REFUSED_OPS = {"EXT1", "EXT2", "EXT4"}  # copyreg's extension registry: globals by number


def inspect_pickle_globals(data: bytes | io.BufferedIOBase, path: str = "<bytes>") -> list[tuple[str, str]]:
    """Every (module, name) a pickle names, read without executing it. A STACK_GLOBAL whose
    operands are not two string literals right before it, and the extension-registry
    opcodes, are refused: a scan that cannot name a global must not let it through."""
    stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    found: list[tuple[str, str]] = []
    memo: dict[int, Any] = {}
    recent: list[Any] = []  # values pushed since the last op that was not a push/memo op
    try:
        for op, arg, _ in pickletools.genops(stream):
            n = op.name
            if n in ("GLOBAL", "INST"):
                module, _, name = arg.partition(" ")
                found.append((module, name))
                recent = []
            elif n == "STACK_GLOBAL":
                if len(recent) < 2 or not all(isinstance(v, str) for v in recent[-2:]):
                    raise CheckpointError(f"{path}: refused: a STACK_GLOBAL whose name cannot be read statically")
                found.append((recent[-2], recent[-1]))
                recent = []
            elif n in _REFUSED_OPS:
                raise CheckpointError(f"{path}: refused: pickle opcode {n} (copyreg extension registry)")
            elif n in _STRING_OPS:
                recent.append(arg.decode("latin-1") if isinstance(arg, bytes) else arg)
            elif n == "MEMOIZE":
                memo[len(memo)] = recent[-1] if recent else None
            elif n in _PUT_OPS:
                memo[arg] = recent[-1] if recent else None
            elif n in _GET_OPS:
                recent.append(memo.get(arg))
            elif n in ("PROTO", "FRAME"):
                pass
            else:
                recent = []
                if n == "STOP":
                    break
    except CheckpointError:
        raise
    except Exception as e:  # genops: ValueError on bad opcodes, truncation
        raise CheckpointError(f"{path}: not a valid pickle stream ({type(e).__name__}: {e})") from None
    return found


def _scan_file(path: str) -> tuple[str, dict[str, type]]:
    """('zip' | 'legacy', the stand-ins its pickles need) or a CheckpointError saying what the
    file is instead, or which global it refuses."""
    require_nonempty_file(path, "a checkpoint written by torch.save")
    with open(path, "rb") as f:
        return _scan_stream(f, path, stand_ins_allowed=True)


def require_nonempty_file(path: str, expected: str) -> None:
    """A CheckpointError saying what `path` is instead (a folder, an empty file), or
    FileNotFoundError, unless it is a file with content; `expected` names what it should be."""
    if os.path.isdir(path):
        raise CheckpointError(describe_folder(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path} is empty (0 bytes); expected {expected}")


def _scan_stream(f: io.BufferedIOBase, path: str, stand_ins_allowed: bool) -> tuple[str, dict[str, type]]:
    """The scan of `_scan_file` over an open binary stream (a file, or bytes held in memory)."""
    head = f.read(8)
    f.seek(0)
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(f) as z:
                names = z.namelist()
                if any(n.endswith("/constants.pkl") for n in names) or any("/code/" in n for n in names):
                    raise CheckpointError(f"{path} is a TorchScript archive; expected a torch.save checkpoint")
                pkls = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
                if len(pkls) != 1:
                    raise CheckpointError(f"{path} is a zip archive without exactly one data.pkl; "
                                          f"expected a checkpoint written by torch.save")
                data = z.read(pkls[0])
        except (zipfile.BadZipFile, EOFError, OSError, zipfile.LargeZipFile) as e:
            raise CheckpointError(f"{path} is a damaged zip archive ({e}); expected a complete torch.save "
                                  f"checkpoint — was the download or the save cut short?") from None
        return "zip", _check_globals(path, inspect_pickle_globals(data, path), stand_ins_allowed)
    if head[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"):
        stand_ins: dict[str, type] = {}
        for _ in range(4):  # legacy layout: magic, protocol, sys info, then the object; each is
            # checked before the next is read, so a payload is named first
            stand_ins.update(_check_globals(path, inspect_pickle_globals(f, path), stand_ins_allowed))
        f.seek(0)
        return "legacy", stand_ins
    raise CheckpointError(f"{path} is not a PyTorch checkpoint (expected a torch.save zip archive or legacy "
                          f"pickle file; it starts with {head!r})")


def describe_folder(path: str) -> str:
    """Why a folder is not the checkpoint file expected, and what to do with it: a sar_fast
    training checkpoint folder (it holds COMPLETE) is resumed; a run directory has exports."""
    path = os.fspath(path).rstrip("/") or "/"
    if os.path.isfile(os.path.join(path, "COMPLETE")):
        parent = os.path.dirname(os.path.abspath(path))
        run = os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else "RUN_DIR"
        return (f"{path} is a sar_fast training checkpoint folder (sharded model + optimiser state), not a model "
                f"file: resume its run with `torchrun -m sar_fast.train --out {run} --resume auto` (its newest "
                f"checkpoint) or `--resume {path}`; the weights as one file are the run's export "
                f"({os.path.join(run, 'export.safetensors')} or export.pth, written when the run ends)")
    if os.path.isdir(os.path.join(path, "checkpoints")) or os.path.isfile(os.path.join(path, "export.pth")):
        return (f"{path} is a sar_fast run directory, not a model file: its weights are "
                f"{os.path.join(path, 'export.safetensors')} (or export.pth); resume it with --out {path}")
    return (f"{path} is a directory; expected a checkpoint file (a torch.save .pth/.pt, a .safetensors or a "
            f"sharded *.safetensors.index.json)")


def _check_globals(path: str, names: Iterable[tuple[str, str]], stand_ins_allowed: bool = True) -> dict[str, type]:
    """The stand-ins a file needs; CheckpointError for any global that is neither allowed
    nor (where `stand_ins_allowed`) a foreign class."""
    allowed = _torch_allowed() | set(_numpy_allowed())
    stand_ins: dict[str, type] = {}
    for module, name in names:
        full = f"{module}.{name}"
        if full in allowed or full in stand_ins:
            continue
        cls = _stand_in_for(module, name) if stand_ins_allowed else None
        if cls is None:
            raise CheckpointError(f"{path}: refused to load: the file names the global {full!r}, which is not "
                                  f"tensor, container or array data (a pickle can run code through it)")
        stand_ins[full] = cls
    return stand_ins


def load_file(path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """torch.load, safely: see the module doc. Raises CheckpointError for unsafe or malformed
    files and FileNotFoundError for a missing one."""
    path = os.fspath(path)
    layout, stand_ins = _scan_file(path)
    return _restricted_torch_load(path, path, stand_ins, map_location=map_location, mmap=mmap and layout == "zip")


def load_bytes(data: bytes, name: str, map_location: Any = "cpu") -> Any:
    """`load_file` for a torch.save payload held in memory (an item of a sharded checkpoint);
    `name` says where it came from in errors. Only torch's weights-only set and array data
    are accepted: an item of our own checkpoints never holds a foreign class."""
    if not data:
        raise CheckpointError(f"{name} is empty (0 bytes); expected a torch.save payload")
    _, stand_ins = _scan_stream(io.BytesIO(data), name, stand_ins_allowed=False)
    return _restricted_torch_load(io.BytesIO(data), name, stand_ins, map_location=map_location, mmap=False)


def scan_item(stream: io.RawIOBase | io.BufferedIOBase, name: str) -> None:
    """The scan alone, over a seekable stream holding one torch.save payload (an item of a
    sharded checkpoint, read in place): CheckpointError naming `name` unless every global it
    names is tensor, container or array data."""
    _scan_stream(stream, name, stand_ins_allowed=False)


def _restricted_torch_load(source: Any, name: str, stand_ins: dict[str, type], map_location: Any,
                           mmap: bool) -> Any:
    """torch's weights-only unpickler, with only the stand-ins and the numpy names added."""
    extra = [(obj, full) for full, obj in _numpy_allowed().items()] + [(cls, full) for full, cls in stand_ins.items()]
    try:
        with torch.serialization.safe_globals(extra):
            return torch.load(source, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        msg = str(e).partition("WeightsUnpickler error:")[2].partition("Check the documentation")[0].strip() \
            or str(e)
        if "Unsupported operand" in msg:  # protocol 3+ opcodes (STACK_GLOBAL, FRAME, ...)
            msg += (" — the file was written with a pickle protocol above 2, which the weights-only reader does "
                    "not read; torch.save writes protocol 2 by default: re-save it that way where you trust it")
        raise CheckpointError(f"{name}: refused to load: {msg}") from None
    except (RuntimeError, EOFError, ValueError, KeyError, OSError) as e:
        raise CheckpointError(f"{name}: not a readable torch checkpoint (damaged or truncated?): "
                              f"{type(e).__name__}: {e}") from None


def exit_once(message: str) -> None:
    """SystemExit for an error every rank of a torchrun launch finds alike (a bad --init, a
    bad data folder): rank 0 prints it, the others exit non-zero silently. Called before any
    process group exists, so no rank waits on another."""
    if int(os.environ.get("RANK", "0")) == 0:
        raise InputError(message)
    raise SystemExit(2)


# ----------------------------------------------------------------- plain pickles (DCP index)
class _AllowListUnpickler(pickle.Unpickler):
    def __init__(self, f, path: str, allowed_prefixes: tuple[str, ...], allowed: dict[str, Any]):
        super().__init__(f)
        self._path, self._prefixes, self._allowed = path, allowed_prefixes, allowed

    def find_class(self, module: str, name: str):  # also reached by the EXT opcodes
        full = f"{module}.{name}"
        if full in self._allowed:
            return self._allowed[full]
        if module.startswith(self._prefixes) and name.isidentifier():
            obj = super().find_class(module, name)
            # plain data classes of the allowed modules: never functions, never classes whose
            # constructor does work
            if isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
                return obj
        raise CheckpointError(f"{self._path}: refused to load: the file names the global {full!r}")

    def persistent_load(self, pid):
        raise CheckpointError(f"{self._path}: unexpected persistent id in a plain pickle")


def restricted_pickle_load(path: str, allowed_prefixes: tuple[str, ...]) -> Any:
    """pickle.load of a file whose classes all live under `allowed_prefixes` (e.g. the DCP
    metadata dataclasses), plus torch's weights-only set; anything else is refused."""
    from torch import _weights_only_unpickler as wou
    allowed = dict(wou._get_allowed_globals())
    allowed.update({"builtins.list": list, "builtins.dict": dict, "builtins.tuple": tuple,
                    "pathlib.PosixPath": pathlib.PosixPath, "pathlib.WindowsPath": pathlib.PureWindowsPath})
    try:
        with open(path, "rb") as f:
            return _AllowListUnpickler(f, path, allowed_prefixes, allowed).load()
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None
