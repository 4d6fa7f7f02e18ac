"""What the benchmarks share: choosing the device and dtype (GPU, or a tiny CPU smoke run
under Triton's interpreter), the one timing loop, and grouped bar charts.

The benchmarks measure the sar_fast that Python imports (an install, or the source tree on
PYTHONPATH); every one has a --smoke mode (tiny shapes on the CPU, seconds) that CI runs so
that a broken bench fails. Each writes its JSON through JsonReport, row by row.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

from sar_fast.files import write_json_atomic  # imports torch, never triton: --smoke can still pick the interpreter


class JsonReport:
    """A bench's JSON document, written whole after every change (sar_fast.files'
    write_json_atomic): a run killed midway (a timeout, the end of a GPU lease) leaves a valid file
    holding every row measured so far. "complete" turns true in close()."""

    def __init__(self, path: str, **header):
        self.path = path
        self.doc = {**header, "complete": False}
        self.write()

    def set(self, **fields) -> None:
        self.doc.update(fields)
        self.write()

    def append(self, key: str, row: dict) -> None:
        """Add one row to the list `key` and write the file."""
        self.doc.setdefault(key, []).append(row)
        self.write()

    def close(self, **fields) -> None:
        self.set(**fields, complete=True)

    def write(self) -> None:
        write_json_atomic(self.path, self.doc, default=_jsonable)


def _jsonable(value):
    """Tensors and numpy scalars in a row: their Python value; anything else: its repr."""
    for name in ("tolist", "item"):
        if hasattr(value, name):
            return getattr(value, name)()
    return repr(value)


def add_smoke_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--smoke", "--cpu-smoke", dest="smoke", action="store_true",
                        help="tiny shapes on the CPU (Triton kernels under TRITON_INTERPRET=1): checks that "
                             "the bench runs, in seconds; the numbers mean nothing")


def start(name: str, out: str, smoke: bool, dtype_name: str):
    """(torch, device, dtype) for a bench run, or None when there is nothing to measure here.

    --smoke runs on the CPU under Triton's interpreter (set before triton is imported),
    in fp32 since the interpreter has no bf16.
    """
    os.makedirs(out, exist_ok=True)
    if smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    if not torch.cuda.is_available() and not smoke:
        print(f"{name}: no CUDA device here; nothing measured (use --smoke for a tiny interpreter run)")
        return None
    device = "cuda" if torch.cuda.is_available() and not smoke else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    return torch, device, (torch.float32 if device == "cpu" else dtype)


Peer = Callable[[], object] | tuple[Callable[[], object], Callable[[object], object]]


def time_ms(peers: dict[str, Peer], device: str, repeats: int, warmup: int = 1,
            inner: int = 1) -> dict[str, list[float]]:
    """Milliseconds per call of each peer, `repeats` times, after `warmup` untimed rounds.

    Peers are interleaved within each round so that load drift on a shared machine hits
    them alike. A timed interval holds `inner` back-to-back calls (the result is per call):
    on CUDA that includes host launch overhead where the host is the bottleneck. A peer
    may be a pair (prepare, fn): prepare() runs untimed and fn(prepare()) is timed, e.g.
    a forward and then its backward alone (inner must be 1). CUDA: events; CPU: perf_counter.
    """
    import torch
    cuda = device == "cuda" or getattr(device, "type", None) == "cuda"
    split = {name: peer if isinstance(peer, tuple) else (None, peer) for name, peer in peers.items()}
    if inner != 1 and any(prepare is not None for prepare, _ in split.values()):
        raise ValueError("time_ms: a (prepare, fn) peer is timed one call per interval (inner=1)")
    times: dict[str, list[float]] = {name: [] for name in peers}
    for round_ in range(warmup + repeats):
        for name, (prepare, fn) in split.items():
            arg = prepare() if prepare is not None else None
            call = (lambda: fn(arg)) if prepare is not None else fn
            if cuda:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                begin.record()
                for _ in range(inner):
                    call()
                end.record()
                end.synchronize()
                elapsed = begin.elapsed_time(end)
            else:
                t0 = time.perf_counter()
                for _ in range(inner):
                    call()
                elapsed = (time.perf_counter() - t0) * 1e3
            if round_ >= warmup:
                times[name].append(elapsed / inner)
    return times


def median_ms(fn: Peer, device: str, repeats: int, warmup: int = 1, inner: int = 1) -> float:
    """The median of time_ms for one callable."""
    return statistics.median(time_ms({"fn": fn}, device, repeats, warmup, inner)["fn"])


def bar_panels(path: str, results: list[dict], case_key: str, cases: list[str], peers: list[str],
               panels: list[tuple[str, str, str]], grid: tuple[int, int] | None = None) -> bool:
    """Write the chart to `path`; False (nothing written) when matplotlib is missing.

    results: dicts with `case_key`, 'peer', 'mode' and the metrics named in `panels`
    ((mode, metric, title) each); a missing value draws as 0. BENCH_PLOTS=0 in the
    environment: no chart (bench/gpu_first.sh keeps its output folder to JSON files).
    """
    if os.environ.get("BENCH_PLOTS", "1") == "0":
        return False
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows, cols = grid or (1, len(panels))
    fig, axes = plt.subplots(rows, cols, figsize=(max(10, 1.5 * len(cases) * cols), 4.5 * rows), squeeze=False)
    width = 0.8 / max(1, len(peers))
    for ax, (mode, key, title) in zip(axes.flat, panels):
        for i, peer in enumerate(peers):
            vals = []
            for case in cases:
                hit = [r.get(key) for r in results if r[case_key] == case and r["peer"] == peer and r["mode"] == mode]
                vals.append(hit[0] if hit and hit[0] is not None else 0.0)
            ax.bar([j + i * width for j in range(len(cases))], vals, width, label=peer)
        ax.set_title(title, fontsize=10)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
        ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=8)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
