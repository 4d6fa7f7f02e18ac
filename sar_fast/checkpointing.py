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
import json
import os
import random
import re
import shutil
import threading

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from . import parallel
from .safe_load import load_file, restricted_pickle_load

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
    """DCP's reader unpickles the checkpoint index (.metadata) with plain pickle.load; this
    one allows only the DCP metadata data classes in it."""

    def read_metadata(self, *args, **kwargs):
        rank = kwargs.get("rank")
        path = os.path.join(os.fspath(self.path), ".metadata" if rank is None else f"__{rank}.metadata")
        metadata = restricted_pickle_load(path, ("torch.distributed.checkpoint.",))
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


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
    import torch.distributed as dist
    if _SAVE_GROUP is None and dist.is_initialized():
        _SAVE_GROUP = dist.new_group(backend="gloo")
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
    _fsync_dir(ckpt_root)
    for _old_step, path in list_checkpoints(ckpt_root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def load_checkpoint(path: str, model, optimizer, info) -> dict:
    """Collective: restore model, optimiser and this rank's RNG; return the trainer state."""
    if not os.path.isfile(os.path.join(path, COMPLETE)):
        raise FileNotFoundError(f"{path} is not a complete sar_fast checkpoint (no {COMPLETE} marker)")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    reader = _SafeFileSystemReader(path)
    reader.read_metadata()  # refuse a crafted index here, with our error, not wrapped by DCP's collectives
    dcp.load(state, storage_reader=reader)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_path = os.path.join(path, "rng", f"rank{info.rank}.pt")
    if os.path.isfile(rng_path):  # absent when resuming with a different number of ranks
        _set_rng_state(load_file(rng_path))
    with open(os.path.join(path, "trainer.json")) as f:
        return json.load(f)


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
