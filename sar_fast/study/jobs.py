"""What both suites' runners share: one trainer run in this process, the (arm, seed) runs
still to do (a result of another study size or base refused), and the worker pool that runs
them, one process each."""
from __future__ import annotations

import concurrent.futures as futures
import dataclasses
import multiprocessing
import os
import sys
import time

import torch

from .design import CONTROL, _read_json, result_path


def log_line(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def train_once(cfg) -> float:
    """One Trainer run in this process (a 1-rank group); its wall seconds."""
    from ..train import Trainer
    start = time.perf_counter()
    Trainer(cfg).run()
    return time.perf_counter() - start


def base_sha256(out: str) -> str:
    from ..models.checkpoint import files_sha256
    return files_sha256([os.path.join(out, "base", "export.pth")])


def start(args, quick, full, known: dict) -> tuple:
    """(size, arm names, start time) of a suite's run: the --quick or full size with --seeds
    applied, the --arms checked against `known`, OUT/results made, and every core given to
    the one-process part that comes first (data, base)."""
    size = quick if args.quick else full
    if "seeds" in vars(args):
        size = dataclasses.replace(size, seeds=args.seeds)
    names = arm_names(args.arms, known)
    os.makedirs(os.path.join(args.out, "results"), exist_ok=True)
    torch.set_num_threads(args.threads * args.workers)
    return size, names, time.perf_counter()


def arm_names(text: str, known: dict) -> list[str]:
    """The --arms selection among `known` (the suite's arms), the control first when missing."""
    names = list(known) if text == "all" else [a.strip() for a in text.split(",") if a.strip()]
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise SystemExit(f"error: --arms: unknown {unknown}; known: {', '.join(known)}")
    if CONTROL not in names:
        names.insert(0, CONTROL)  # every comparison is against it
    return names


def pending(out: str, names: list[str], seeds: int, key: str, base_id: str) -> tuple[list[tuple[str, int]], int]:
    """(the (arm, seed) runs without a result, the number with one); a result of another
    study size or base is refused, never mixed in."""
    todo, done = [], 0
    for s in range(1, seeds + 1):  # seed-major: an interrupted study leaves whole seeds to compare
        for arm in names:
            r = _read_json(result_path(out, arm, s))
            if r is not None and (r.get("key"), r.get("base_sha256")) != (key, base_id):
                raise SystemExit(f"error: {result_path(out, arm, s)} is from a study of another size or "
                                 "another base; use another --out")
            if r is None:
                todo.append((arm, s))
            else:
                done += 1
    return todo, done


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def run_pool(run, out: str, size, todo: list[tuple[str, int]], workers: int, threads: int, describe) -> list:
    """`run(out, size, arm, seed, threads)` for every (arm, seed) of `todo` on `workers`
    processes, a progress line per finished run (`describe(result)` its numbers); returns
    the failed runs as (arm, seed, error) (the others' results are worth having)."""
    arms_start, failed = time.perf_counter(), []
    ctx = multiprocessing.get_context("spawn")  # fresh processes: no forked torch threads or process group
    with futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                                     initargs=(threads,)) as pool:
        jobs = {pool.submit(run, out, size, arm, s, threads): (arm, s) for arm, s in todo}
        for k, job in enumerate(futures.as_completed(jobs), 1):
            arm, s = jobs[job]
            elapsed = time.perf_counter() - arms_start
            eta = elapsed / k * (len(todo) - k)
            try:
                r = job.result()
            except Exception as e:  # keep going: the other runs' results are worth having
                failed.append((arm, s, repr(e)))
                print(f"[study] {k}/{len(todo)} {arm} seed {s} FAILED: {e!r}", file=sys.stderr, flush=True)
                continue
            print(f"[study] {k}/{len(todo)} {arm} seed {s}: {describe(r)} (train {r['train_s']:.0f}s); elapsed "
                  f"{elapsed / 60:.1f} min, ETA {eta / 60:.1f} min", file=sys.stderr, flush=True)
    return failed


def failed_runs(failed: list) -> None:
    """Exit with an error naming every failed (arm, seed), when there are any."""
    if failed:
        raise SystemExit(f"error: {len(failed)} (arm, seed) runs failed (the table leaves them out; rerun the "
                         f"same command to retry them): " + "; ".join(f"{a} seed {s}: {e}" for a, s, e in failed))
