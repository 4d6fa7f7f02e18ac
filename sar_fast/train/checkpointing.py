"""Sharded, atomic training checkpoints (torch.distributed.checkpoint) and flat exports.

Layout under the run directory:
    checkpoints/step_00001000/      model + optimiser shards (DCP), trainer.json, rng/rank*.pt,
                                    and COMPLETE, written last
    checkpoints/.tmp-step_00001000/ a save in progress (ignored; removed by the next save)
Every rank writes into the temp folder; once all have written, rank 0 writes COMPLETE and
renames the folder into place, so a kill -9 mid-save leaves the previous checkpoint loadable.

Asynchronous saves (`async_=True`): the state is copied to CPU memory on the step (the
only blocking part), then written by a background thread that talks over its own gloo
group (never the training group, whose collectives it would interleave with); rank 0
finalises (COMPLETE, rename, pruning) when the write is done. `PendingSave.wait()` joins
it: the trainer calls it before the next save and before exiting.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import json
import os
import random
import re
import shutil
import threading

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.futures import Future

from ..files import fsync_dir
from ..safe_load import CheckpointError, load_bytes, load_file, restricted_pickle_load, scan_item
from . import parallel

_STEP_DIR = re.compile(r"^step_(\d+)$")
COMPLETE = "COMPLETE"


def _rng_state() -> dict:
    """Every generator's state as tensors and plain numbers, so it reads back with the
    weights-only loader (no pickled numpy or Python objects)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, torch.tensor(mt, dtype=torch.int64), gauss],
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    mt = mt.tolist() if isinstance(mt, torch.Tensor) else mt  # files written before the tensor format
    random.setstate((version, tuple(int(x) for x in mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _SafeFileSystemReader(dcp.FileSystemReader):
    """DCP's reader with nothing left to the unpickler that a crafted folder could use:
    - the index (.metadata, a plain pickle) allows only DCP's metadata data classes, and
      every item it lists must lie inside the checkpoint folder;
    - each item is read on its own, after `safe_load`'s scan of its pickle, so a refusal
      names the item (DCP then reads tensors with torch's weights-only unpickler, and
      non-tensor items through `_SafeLoadPlanner`)."""

    def read_metadata(self, *args, **kwargs):
        rank = kwargs.get("rank")
        path = os.path.join(os.fspath(self.path), ".metadata" if rank is None else f"__{rank}.metadata")
        metadata = restricted_pickle_load(path, ("torch.distributed.checkpoint.",))
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path}: expected a DCP checkpoint index, found {type(metadata).__name__}")
        for index, info in (metadata.storage_data or {}).items():
            self._check_item(path, index, info)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def _check_item(self, metadata_path: str, index, info) -> None:
        name = getattr(index, "fqn", index)
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or not rel or rel in (".", "..") or os.path.basename(rel) != rel \
                or "\\" in rel or "/" in rel:
            raise CheckpointError(f"{metadata_path}: item {name!r} is stored at {rel!r}, which is not a file name "
                                  f"inside the checkpoint folder")
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        if type(offset) is not int or type(length) is not int or offset < 0 or length <= 0:
            raise CheckpointError(f"{metadata_path}: item {name!r} has an invalid byte range ({offset!r}, {length!r})")
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(f"{metadata_path}: item {name!r} is stored with transforms "
                                  f"{list(info.transform_descriptors)}; sar_fast writes (and reads) plain items only")

    def read_data(self, plan, planner):
        for item in plan.items:
            info = self.storage_data[item.storage_index]
            file = os.path.join(os.fspath(self.path), info.relative_path)
            where = f"{file}: item {item.dest_index.fqn!r}"
            try:
                with open(file, "rb") as f:
                    scan_item(_FileRange(f, info.offset, info.length), where)
                super().read_data(dataclasses.replace(plan, items=[item]), planner).wait()
            except CheckpointError:
                raise
            except Exception as e:
                raise CheckpointError(f"{where}: not readable: {type(e).__name__}: {_first_line(e)}") from None
        done: Future = Future()
        done.set_result(None)
        return done


class _FileRange(io.RawIOBase):
    """bytes [offset, offset + length) of an open file, as a seekable stream of its own."""

    def __init__(self, f, offset: int, length: int):
        self._f, self._start, self._len, self._pos = f, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._len}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buf) -> int:
        n = max(0, min(len(buf), self._len - self._pos))
        self._f.seek(self._start + self._pos)
        data = self._f.read(n)
        buf[:len(data)] = data
        self._pos += len(data)
        return len(data)


class _SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner unpickles each non-tensor item (the optimiser's lr, betas, ...)
    with torch.load(weights_only=False): a crafted item runs code there. Here the item is read
    by `safe_load.load_bytes`; DCP then gets a re-serialisation of the checked value, so its
    own (unsafe) reader only ever sees bytes written in this process, and the nesting of the
    value into the state dict stays DCP's."""

    def __init__(self, checkpoint_dir: str):
        super().__init__()
        self._dir = checkpoint_dir

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = load_bytes(value.getvalue(), f"{self._dir}: item {read_item.dest_index.fqn!r}")
        checked = io.BytesIO()
        torch.save(obj, checked)
        checked.seek(0)
        super().load_bytes(read_item, checked)


def _first_line(e: BaseException) -> str:
    text = str(e).partition("WeightsUnpickler error:")[2] or str(e)
    return text.strip().splitlines()[0] if text.strip() else type(e).__name__


def _checkpoint_error(e: BaseException, path: str) -> CheckpointError:
    """One CheckpointError from what DCP raised: its CheckpointException wraps each failing
    rank's exception (ours, naming the item, when it is a refusal)."""
    failed = [exc for _rank, (exc, _trace) in sorted((getattr(e, "failures", None) or {}).items())]
    refusal = next((exc for exc in failed if isinstance(exc, CheckpointError)), None)
    if refusal is not None:
        return refusal
    cause = failed[0] if failed else e
    return CheckpointError(f"{path}: not a readable sar_fast checkpoint: {type(cause).__name__}: {_first_line(cause)}")


def list_checkpoints(ckpt_root: str) -> list[tuple[int, str]]:
    """Complete checkpoints, oldest first: [(step, path)]."""
    if not os.path.isdir(ckpt_root):
        return []
    out = []
    for name in os.listdir(ckpt_root):
        m = _STEP_DIR.match(name)
        path = os.path.join(ckpt_root, name)
        if m and os.path.isfile(os.path.join(path, COMPLETE)):
            out.append((int(m.group(1)), path))
    return sorted(out)


class PendingSave:
    """A checkpoint being written: `wait()` returns its final path once it is complete
    (COMPLETE written and renamed into place on rank 0); raises what the write raised."""

    def __init__(self, final: str, future=None, finalize=None):
        self.final, self._future, self._finalize = final, future, finalize
        self._done = threading.Event()
        self._error: BaseException | None = None
        if future is None:
            self._done.set()
        else:
            future.add_done_callback(self._on_written)

    def _on_written(self, future) -> None:
        try:
            future.result()
            if self._finalize is not None:
                self._finalize()
        except BaseException as e:  # surfaced by wait() on the main thread
            self._error = e
        finally:
            self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> str:
        if not self._done.wait(timeout):
            raise TimeoutError(f"checkpoint {self.final} not written within {timeout} s")
        if self._error is not None:
            raise RuntimeError(f"writing checkpoint {self.final} failed") from self._error
        return self.final


_SAVE_GROUP = None


def _save_group():
    """A gloo group of all ranks for the background writer (created once, collectively)."""
    global _SAVE_GROUP
    if _SAVE_GROUP is None:
        _SAVE_GROUP = parallel.new_gloo_group()
    return _SAVE_GROUP


def save_checkpoint(ckpt_root: str, step: int, model, optimizer, trainer_state: dict, info, keep_last: int,
                    async_: bool = False) -> PendingSave:
    """Collective: every rank calls it. Returns the save (already complete unless `async_`)."""
    final = os.path.join(ckpt_root, f"step_{step:08d}")
    tmp = os.path.join(ckpt_root, f".tmp-step_{step:08d}")
    if info.is_main:
        os.makedirs(ckpt_root, exist_ok=True)
        for name in os.listdir(ckpt_root):  # leftovers of an interrupted save
            if name.startswith(".tmp-step_"):
                shutil.rmtree(os.path.join(ckpt_root, name), ignore_errors=True)
        os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
    parallel.barrier()
    torch.save(_rng_state(), os.path.join(tmp, "rng", f"rank{info.rank}.pt"))
    model_sd, optim_sd = get_state_dict(model, optimizer)
    finalize = (lambda: _finalize(ckpt_root, tmp, final, step, trainer_state, keep_last)) if info.is_main else None
    if async_:
        # DCP gathers every rank's write result before its future resolves on rank 0, so
        # rank 0 may finalise from its own future alone
        future = dcp.async_save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp,
                                process_group=_save_group())
        if not isinstance(future, concurrent.futures.Future):  # AsyncSaveResponse
            future = future.upload_completion
        return PendingSave(final, future, finalize)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    parallel.barrier()
    if finalize is not None:
        finalize()
    parallel.barrier()
    return PendingSave(final)


def _finalize(ckpt_root: str, tmp: str, final: str, step: int, trainer_state: dict, keep_last: int) -> None:
    """Rank 0, once every rank's shards are written: mark complete, move into place, prune."""
    with open(os.path.join(tmp, "trainer.json"), "w") as f:
        json.dump(trainer_state, f, indent=1)
    with open(os.path.join(tmp, COMPLETE), "w") as f:
        f.write(f"{step}\n")
    if os.path.exists(final):  # a re-save of the same step (e.g. SIGTERM right after a save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(ckpt_root)
    for _old_step, path in list_checkpoints(ckpt_root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(path: str, model, optimizer, info) -> dict:
    """Collective: restore model, optimiser and this rank's RNG; return the trainer state.
    Whatever is wrong with the folder (a crafted or damaged item, a missing file) raises the
    same CheckpointError on every rank, so no rank goes on to wait for the others."""
    rng, trainer_state, error = None, None, None
    try:  # the per-rank files first, then one agreement, then DCP's collective read
        if not os.path.isfile(os.path.join(path, COMPLETE)):
            raise CheckpointError(f"{path} is not a complete sar_fast checkpoint (no {COMPLETE} marker)")
        trainer_state = read_trainer_state(path)
        rng_path = os.path.join(path, "rng", f"rank{info.rank}.pt")
        if os.path.isfile(rng_path):  # absent when resuming with a different number of ranks
            rng = load_file(rng_path)
        reader = _SafeFileSystemReader(path)
        reader.read_metadata()  # a crafted index fails here, on every rank alike
    except (CheckpointError, OSError) as e:
        error = str(e)
    errors = [e for e in parallel.all_gather_object(error) if e is not None]
    if errors:
        raise CheckpointError(errors[0])
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    try:
        dcp.load(state, storage_reader=reader, planner=_SafeLoadPlanner(path))
    except CheckpointException as e:  # every rank gets every rank's failures
        raise _checkpoint_error(e, path) from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if rng is not None:
        _set_rng_state(rng)
    return trainer_state


def read_trainer_state(path: str) -> dict:
    """trainer.json of a checkpoint folder, checked for the fields a resume needs."""
    file = os.path.join(path, "trainer.json")
    try:
        with open(file) as f:
            state = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: not a readable trainer state ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or type(state.get("step")) is not int or state["step"] < 0:
        raise CheckpointError(f"{file}: expected a JSON object with a non-negative integer 'step'")
    return state


def resolve_resume(resume: str, ckpt_root: str) -> str | None:
    """'auto' -> the newest complete checkpoint (or None), 'none' -> None, else a path.
    Per process: under torchrun, resolve on rank 0 and broadcast (`resolve_resume_everywhere`)."""
    if resume == "none":
        return None
    if resume == "auto":
        found = list_checkpoints(ckpt_root)
        return found[-1][1] if found else None
    if not os.path.isdir(resume):
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint directory")
    return resume


def resolve_resume_everywhere(resume: str, ckpt_root: str, info) -> str | None:
    """Rank 0 decides which checkpoint to resume and every rank gets its answer: ranks that
    list the folder at different moments (a save finishing, a slow network filesystem)
    could otherwise resume different steps."""
    path, error = None, None
    if info.is_main:
        try:
            path = resolve_resume(resume, ckpt_root)
        except FileNotFoundError as e:
            error = str(e)
    path, error = parallel.broadcast_object((path, error))
    if error is not None:
        raise FileNotFoundError(error)
    return path


def full_model_state(model) -> dict:
    """Collective: the unsharded fp32 model state dict, on CPU, on rank 0 (empty elsewhere)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
