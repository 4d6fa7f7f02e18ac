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

from .design import CONTROL, _read_json, base_dir, result_path


def log_line(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def train_once(cfg) -> float:
    """One Trainer run in this process (a 1-rank group); its wall seconds."""
    from ..train import Trainer
    start = time.perf_counter()
    Trainer(cfg).run()
    return time.perf_counter() - start


def base_sha256(out: str, base: int | None = None) -> str:
    from ..models.checkpoint import files_sha256
    return files_sha256([os.path.join(base_dir(out, base), "export.pth")])


def start(args, quick, full, known: dict, groups: dict | None = None) -> tuple:
    """(size, arm names, start time) of a suite's run: the --quick or full size with --seeds
    (and --bases) applied, the --arms checked against `known` (and its `groups`), OUT/results
    made, and every core given to the one-process part that comes first (data, bases)."""
    size = quick if args.quick else full
    for field in ("seeds", "bases"):
        if field in vars(args):
            size = dataclasses.replace(size, **{field: getattr(args, field)})
    names = arm_names(args.arms, known, groups)
    os.makedirs(os.path.join(args.out, "results"), exist_ok=True)
    torch.set_num_threads(args.threads * args.workers)
    return size, names, time.perf_counter()


def arm_names(text: str, known: dict, groups: dict | None = None) -> list[str]:
    """The --arms selection among `known` (the suite's arms; names of `groups` stand for their
    arms), the control first (added when missing)."""
    names = []
    for part in (list(known) if text == "all" else [a.strip() for a in text.split(",") if a.strip()]):
        names += [a for a in (groups or {}).get(part, (part,)) if a not in names]
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise SystemExit(f"error: --arms: unknown {unknown}; known: {', '.join(known)}"
                         + (f"; groups: {', '.join(groups)}" if groups else ""))
    return [CONTROL, *(a for a in names if a != CONTROL)]  # every comparison is against it: first


def pending(out: str, names: list[str], seeds: int, key: str, base_ids: dict) -> tuple[list[tuple], int]:
    """(the runs without a result, the number with one). `base_ids` maps each base (None: the
    one base of the oracle suite) to its export's hash; a run is (arm, seed) or (arm, seed,
    base). A result of another study size or base is refused, never mixed in."""
    todo, done = [], 0
    for s in range(1, seeds + 1):  # seed-major: an interrupted study leaves whole seeds to compare
        for base, base_id in base_ids.items():
            for arm in names:
                path = result_path(out, arm, s, base)
                r = _read_json(path)
                if r is not None and (r.get("key"), r.get("base_sha256")) != (key, base_id):
                    raise SystemExit(f"error: {path} is from a study of another size or another base; "
                                     "use another --out")
                if r is None:
                    todo.append((arm, s) if base is None else (arm, s, base))
                else:
                    done += 1
    return todo, done


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _describe_job(job: tuple) -> str:
    return f"{job[0]} seed {job[1]}" + (f" base {job[2]}" if len(job) > 2 else "")


def run_pool(run, out: str, size, todo: list[tuple], workers: int, threads: int, describe) -> list:
    """`run(out, size, *job, threads)` for every job (arm, seed[, base]) of `todo` on `workers`
    processes, a progress line per finished run (`describe(result)` its numbers); returns
    the failed runs as (job, error) (the others' results are worth having)."""
    arms_start, failed = time.perf_counter(), []
    ctx = multiprocessing.get_context("spawn")  # fresh processes: no forked torch threads or process group
    with futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                                     initargs=(threads,)) as pool:
        jobs = {pool.submit(run, out, size, *job, threads): job for job in todo}
        for k, done in enumerate(futures.as_completed(jobs), 1):
            job = jobs[done]
            elapsed = time.perf_counter() - arms_start
            eta = elapsed / k * (len(todo) - k)
            try:
                r = done.result()
            except Exception as e:  # keep going: the other runs' results are worth having
                failed.append((job, repr(e)))
                print(f"[study] {k}/{len(todo)} {_describe_job(job)} FAILED: {e!r}", file=sys.stderr, flush=True)
                continue
            print(f"[study] {k}/{len(todo)} {_describe_job(job)}: {describe(r)} (train {r['train_s']:.0f}s); "
                  f"elapsed {elapsed / 60:.1f} min, ETA {eta / 60:.1f} min", file=sys.stderr, flush=True)
    return failed


def failed_runs(failed: list) -> None:
    """Exit with an error naming every failed (arm, seed), when there are any."""
    if failed:
        raise SystemExit(f"error: {len(failed)} runs failed (the table leaves them out; rerun the same command "
                         f"to retry them): " + "; ".join(f"{_describe_job(job)}: {e}" for job, e in failed))
