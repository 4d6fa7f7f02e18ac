"""Benchmark the fused scale shift against the eager PyTorch loop and torch.compile of it.

    python bench/bench_scale_shift.py --out DIR [--batches 64 128 256] [--budget 100]
    python bench/bench_scale_shift.py --out DIR --smoke       # CPU, tiny shapes, interpreter: seconds

Shapes: FlexVAR d16 inputs: standard schedule (1..16, L = 680), code dim C = 32, an
L2-normalised fp32 codebook of 8912 rows, B in --batches, output fp32 and bf16.
Peers (teacher-forcing input from codes [B, L]):
- eager:    the PyTorch loop: per scale a gather, F.interpolate(bicubic), then one cat;
- compiled: torch.compile of that loop (default mode, PyTorch's automatic dynamic shapes;
            fp32 output only, to keep its compile time short);
- sar_fast: sar_fast.ops.scale_shift (one Triton launch, gather fused);
- kernel:   the launcher alone into a preallocated output (no op/dispatch overhead).
Each is timed twice: `ms` = CUDA events around back-to-back calls (includes host launch
overhead where the host is the bottleneck, as in an eager training step) and `graph_ms` =
the same calls replayed from a CUDA graph (device time only). Bytes moved = output written
+ codes read + codebook read once; GB/s = bytes / time. The roofline reference is a
device-to-device copy of the output's size (read + write counted) and of 1 GiB (peak).
Also: SSR 'last' and 'all' inputs, the dense-latent path forward + backward vs autograd
through the reference, a (BLOCK_P, num_warps) sweep of the forward kernel, a count of
kernel compilations over random FlexVAR schedules, and max abs error vs the reference.
Targets on H200: sar_fast >= 3x eager and >= 70% of the same-size copy bandwidth.
Writes DIR/bench_scale_shift.json and, if matplotlib imports, DIR/bench_scale_shift.png.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import JsonReport, add_smoke_flag, median_ms  # noqa: E402

TARGET_VS_EAGER, TARGET_OF_COPY = 3.0, 0.70
VOCAB, CODE_DIM = 8912, 32


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder for bench_scale_shift.json / .png")
    p.add_argument("--batches", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--repeats", type=int, default=15, help="timed repeats (median)")
    p.add_argument("--inner", type=int, default=20, help="calls per timed repeat")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--budget", type=float, default=100.0,
                   help="seconds; later sections are skipped (and say so) once spent")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    p.add_argument("--no-sweep", action="store_true", help="skip the kernel config sweep")
    add_smoke_flag(p)
    return p.parse_args()


class Clock:
    """Times callables: bench/_common.py's loop (CUDA events, perf_counter on the CPU), and CUDA graphs."""

    def __init__(self, torch, cuda: bool, warmup: int, repeats: int, inner: int):
        self.torch, self.cuda = torch, cuda
        self.warmup, self.repeats, self.inner = warmup, repeats, inner

    def events(self, fn) -> float:
        """Median ms per call of `inner` back-to-back calls (the shared timing loop)."""
        return median_ms(fn, "cuda" if self.cuda else "cpu", self.repeats, self.warmup, self.inner)

    def graph(self, fn) -> float | None:
        """Median ms per call replaying `inner` calls captured in one CUDA graph."""
        if not self.cuda:
            return None
        torch = self.torch
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm caches/allocator off the capture
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(self.inner):
                fn()
        replay = Clock(torch, True, self.warmup, self.repeats, 1)
        return replay.events(graph.replay) / self.inner

    def peak_mb(self, fn) -> float | None:
        """Memory allocated above the inputs during one call."""
        if not self.cuda:
            return None
        torch = self.torch
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def attempt(fn, *args):
    """fn(*args), or the error as text (a peer that fails is recorded, not fatal)."""
    try:
        return fn(*args)
    except Exception as err:  # noqa: BLE001 - any failure of a peer is a result to record
        return f"error: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"


def plot(report: dict, path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in report["forward"] if r["out_dtype"] == "float32"]
    peers = ["eager", "compiled", "sar_fast", "kernel"]
    batches = sorted({r["B"] for r in rows})
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(peers)
    for k, peer in enumerate(peers):
        vals = []
        for B in batches:
            r = next((r for r in rows if r["B"] == B and r["peer"] == peer), None)
            gbps = r.get("graph_GBps") or r.get("GBps") if r else None
            vals.append(gbps if isinstance(gbps, (int, float)) else 0.0)
        ax.bar([i + k * width for i in range(len(batches))], vals, width, label=peer)
    for i, B in enumerate(batches):
        copy = report["copy"].get(str(B), {}).get("GBps")
        if isinstance(copy, (int, float)):
            ax.hlines(copy, i - width / 2, i + 0.8 - width / 2, colors="k", linestyles="dashed")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(batches))], [f"B={B}" for B in batches])
    ax.set_ylabel("GB/s (CUDA-graph replay where available)")
    ax.set_title(f"scale shift, schedule {tuple(report['config']['schedule'])}, C={report['config']['C']}, "
                 f"fp32 out\ndashed: device-to-device copy of the same size", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


class Run:
    """One bench run: the shapes, the modules under test, the clock and the report that
    every section below fills in (and writes) row by row."""

    def __init__(self, args: argparse.Namespace, torch, cuda: bool):
        import importlib

        import torch.nn.functional as F

        from sar_fast import ops
        from sar_fast.ops import reference
        from sar_fast.schedules import STANDARD_SCHEDULE, total_length
        self.args, self.torch, self.F, self.cuda = args, torch, F, cuda
        self.ops, self.reference = ops, reference
        self.ss = importlib.import_module("sar_fast.ops.scale_shift")
        self.kern = importlib.import_module("sar_fast.kernels.scale_shift")
        self.device = "cuda" if cuda else "cpu"
        self.began = time.perf_counter()
        if args.smoke:
            self.schedule, self.V, self.C, self.batches = (1, 2, 3), 16, 4, [2]
            args.repeats, args.inner, args.warmup = 2, 1, 1
            args.no_compile = True  # inductor's CPU compile would dominate the smoke run
        else:
            self.schedule, self.V, self.C, self.batches = STANDARD_SCHEDULE, VOCAB, CODE_DIM, args.batches
        ops.set_backend("kernel")  # the kernels even where 'auto' would pick them anyway
        self.clock = Clock(torch, cuda, args.warmup, args.repeats, args.inner)
        torch.manual_seed(0)
        self.book = F.normalize(torch.randn(self.V, self.C, device=self.device), dim=-1)
        self.L = total_length(self.schedule)
        self.rows_out = self.L - self.schedule[0] ** 2
        os.makedirs(args.out, exist_ok=True)
        self.path = os.path.join(args.out, "bench_scale_shift.json")
        self.writer = JsonReport(
            self.path, device=torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter smoke run)",
            torch=torch.__version__,
            config={"schedule": list(self.schedule), "V": self.V, "C": self.C, "batches": self.batches,
                    "default_block_p_num_warps": list(self.kern.default_config(self.C)),
                    "repeats": args.repeats, "inner": args.inner},
            targets={"speedup_vs_eager": TARGET_VS_EAGER, "fraction_of_copy_bandwidth": TARGET_OF_COPY},
            checks={}, forward=[], copy={}, ssr=[], dense=[], sweep=[], skipped=[])
        self.report = self.writer.doc  # sections fill in place; writer.write() after each row

    def over_budget(self, section: str) -> bool:
        """True (and the section recorded as skipped) once --budget seconds are spent."""
        spent = time.perf_counter() - self.began
        if spent > self.args.budget:
            self.report["skipped"].append(f"{section} (budget spent: {spent:.0f} s)")
            return True
        return False

    def eager_loop(self, codes, out_dtype):
        maps = self.reference.embed_scales(codes, self.book, self.schedule)
        return self.reference.scale_shift(maps, self.schedule).to(out_dtype)

    def codes_meta(self, codes):
        return self.ss._codes_meta(tuple(self.schedule), tuple(range(len(self.schedule) - 1)), codes.device)

    def add_row(self, section: str, row: dict) -> None:
        self.writer.append(section, row)
        print(json.dumps(row))


def check_errors(run: Run) -> None:
    """Max abs error of the op against the reference (fp32 and bf16 output) and, on CUDA,
    over random FlexVAR schedules together with the kernel compilations they cost."""
    torch, ops, reference, book, V = run.torch, run.ops, run.reference, run.book, run.V
    checks = run.report["checks"]
    codes = torch.randint(0, V, (run.batches[-1], run.L), device=run.device)
    want = run.eager_loop(codes, torch.float32)
    got = ops.scale_shift(codes, book, run.schedule, check_range=False)
    checks["max_abs_err_fp32"] = (got - want).abs().max().item()
    got16 = ops.scale_shift(codes, book, run.schedule, check_range=False, out_dtype=torch.bfloat16)
    checks["max_abs_err_bf16_out"] = (got16.float() - want).abs().max().item()
    if run.cuda:
        from sar_fast.schedules import random_flexvar_schedule, total_length
        rng = random.Random(0)
        schedules = {random_flexvar_schedule(rng) for _ in range(20)}
        worst = 0.0

        def variants() -> int:
            return sum(len(c[0]) for c in run.kern._scale_shift_fwd_kernel.device_caches.values())
        before = variants()
        for sched in schedules:
            c = torch.randint(0, V, (2, total_length(sched)), device=run.device)
            ref = reference.scale_shift(reference.embed_scales(c, book, sched), sched)
            worst = max(worst, (ops.scale_shift(c, book, sched, check_range=False) - ref).abs().max().item())
        checks["random_schedules"] = len(schedules)
        checks["random_schedules_max_abs_err"] = worst
        checks["recompiles_over_random_schedules"] = variants() - before
    run.writer.write()
    print("checks:", json.dumps(checks))


def forward_peers(run: Run, codes, out_dtype, compiled) -> dict:
    """The callables timed on one batch of codes: eager, sar_fast, the bare launcher and
    (fp32 output only) the compiled loop."""
    torch, C = run.torch, run.C
    out = torch.empty(codes.shape[0], run.rows_out, C, dtype=out_dtype, device=run.device)
    meta, sides = run.codes_meta(codes), list(run.schedule[1:])
    peers = {
        "eager": lambda: run.eager_loop(codes, out_dtype),
        "sar_fast": lambda: run.ops.scale_shift(codes, run.book, run.schedule, check_range=False, out_dtype=out_dtype),
        "kernel": lambda: run.kern.launch_forward(out, run.book, codes, meta, sides, C),
    }
    if compiled is not None and out_dtype == torch.float32:  # compile time: fp32 only
        peers["compiled"] = lambda: compiled(codes, out_dtype)
    return peers


def time_forward_peer(run: Run, name: str, fn, B: int, out_dtype, nbytes: int) -> None:
    """One forward row: events and graph times, peak memory, GB/s (and the compiled peer's
    first call, which holds its compile time)."""
    if name == "compiled":
        if run.over_budget(f"compiled B={B} {out_dtype}"):
            return
        t0 = time.perf_counter()
        attempt(fn)
        compile_s = time.perf_counter() - t0
    row = {"peer": name, "B": B, "out_dtype": str(out_dtype).replace("torch.", ""), "bytes": nbytes}
    if name == "compiled":
        row["first_call_s"] = round(compile_s, 2)
    row["ms"] = attempt(run.clock.events, fn)
    row["graph_ms"] = attempt(run.clock.graph, fn)
    row["peak_mb"] = attempt(run.clock.peak_mb, fn)
    for key in ("ms", "graph_ms"):
        if isinstance(row[key], float):
            row[key.replace("ms", "GBps")] = nbytes / (row[key] * 1e-3) / 1e9
    run.add_row("forward", row)


def time_copy(run: Run, B: int) -> None:
    """The roofline for batch B: a device-to-device copy of the fp32 output's size."""
    torch, clock = run.torch, run.clock
    src = torch.empty(B * run.rows_out * run.C * 4, dtype=torch.uint8, device=run.device)
    dst = torch.empty_like(src)
    ms = clock.events(lambda: dst.copy_(src))
    gms = attempt(clock.graph, lambda: dst.copy_(src))
    entry = {"bytes": 2 * src.numel(), "ms": ms, "GBps": 2 * src.numel() / (ms * 1e-3) / 1e9, "graph_ms": gms}
    if isinstance(gms, float):
        entry["graph_GBps"] = 2 * src.numel() / (gms * 1e-3) / 1e9
    run.report["copy"][str(B)] = entry


def time_peak_copy(run: Run) -> None:
    """The peak: a device-to-device copy of 1 GiB."""
    torch = run.torch
    big = torch.empty(2 ** 30, dtype=torch.uint8, device=run.device)
    dst = torch.empty_like(big)
    ms = Clock(torch, True, 2, 10, 3).events(lambda: dst.copy_(big))
    run.report["copy"]["1GiB"] = {"bytes": 2 * big.numel(), "ms": ms, "GBps": 2 * big.numel() / (ms * 1e-3) / 1e9}


def time_forward(run: Run) -> None:
    """Every forward peer for every batch size and output dtype, then the copy rooflines."""
    torch = run.torch
    compiled = None if run.args.no_compile else torch.compile(run.eager_loop)
    for B in run.batches:
        codes = torch.randint(0, run.V, (B, run.L), device=run.device)
        for out_dtype in (torch.float32, torch.bfloat16) if run.cuda else (torch.float32,):
            nbytes = (B * run.rows_out * run.C * out_dtype.itemsize + codes.numel() * codes.element_size()
                      + run.book.numel() * 4)
            for name, fn in forward_peers(run, codes, out_dtype, compiled).items():
                time_forward_peer(run, name, fn, B, out_dtype, nbytes)
        if run.cuda:
            time_copy(run, B)
    if run.cuda:
        time_peak_copy(run)
        run.writer.write()
        print("copy:", json.dumps(run.report["copy"]))


def time_ssr(run: Run, pred) -> None:
    """SSR inputs ('last' and 'all' transitions) from predicted codes: eager vs fused."""
    from sar_fast.schedules import scale_offsets
    torch, F, book, schedule, C = run.torch, run.F, run.book, run.schedule, run.C
    B = pred.shape[0]
    n, offsets = len(schedule), scale_offsets(schedule)
    for transitions in ("last", "all"):
        def eager_ssr(transitions=transitions):  # embeds only the scales it reads
            js = [n - 2] if transitions == "last" else range(n - 1)
            blocks = []
            for j in js:
                s_in = schedule[j]
                emb = book[pred[:, offsets[j]:offsets[j] + s_in * s_in]].transpose(1, 2)
                up = F.interpolate(emb.reshape(B, C, s_in, s_in), size=(schedule[j + 1],) * 2, mode="bicubic")
                blocks.append(up.flatten(2).transpose(1, 2))
            return torch.cat(blocks, dim=1)

        def fused_ssr(transitions=transitions):
            return run.ss.ssr_inputs(pred, book, schedule, transitions, check_range=False)
        for name, fn in {"eager": eager_ssr, "sar_fast": fused_ssr}.items():
            run.add_row("ssr", {"peer": name, "B": B, "transitions": transitions,
                                "ms": attempt(run.clock.events, fn), "graph_ms": attempt(run.clock.graph, fn)})


def time_dense(run: Run, B: int) -> None:
    """The dense-latent path (scale maps in, autograd through): forward and forward +
    backward, kernel vs reference, and the kernel's gradient error."""
    torch, ops, schedule = run.torch, run.ops, run.schedule
    maps = [torch.randn(B, run.C, s, s, device=run.device, requires_grad=True) for s in schedule]
    grad = torch.randn(B, run.rows_out, run.C, device=run.device)

    def fwd_bwd(impl):
        for m in maps:
            m.grad = None
        with ops.use_backend(impl):
            ops.scale_shift(scales=maps, schedule=schedule).backward(grad)

    def fwd(impl):
        with torch.no_grad(), ops.use_backend(impl):
            ops.scale_shift(scales=maps, schedule=schedule)

    fwd_bwd("kernel")
    got = [m.grad.clone() for m in maps[:-1]]
    fwd_bwd("reference")
    run.report["checks"]["dense_grad_max_abs_err"] = max((g - m.grad).abs().max().item()
                                                        for g, m in zip(got, maps[:-1]))
    for impl, name in (("reference", "eager"), ("kernel", "sar_fast")):
        run.add_row("dense", {"peer": name, "B": B, "fwd_ms": attempt(run.clock.events, lambda: fwd(impl)),
                              "fwd_bwd_ms": attempt(run.clock.events, lambda: fwd_bwd(impl))})


SWEEP_TILES = [(16, 1), (16, 2), (32, 1), (32, 2), (32, 4), (64, 2), (64, 4), (64, 8), (128, 4), (128, 8)]
SWEEP_TILES_BF16 = [(32, 4), (64, 4), (64, 8)]


def sweep_configs(run: Run, B: int) -> None:
    """The forward kernel at each (BLOCK_P, num_warps), and the fastest per output dtype."""
    torch, clock = run.torch, run.clock
    codes = torch.randint(0, run.V, (B, run.L), device=run.device)
    meta = run.codes_meta(codes)
    configs = [(torch.float32, p, w) for p, w in (SWEEP_TILES if run.cuda else SWEEP_TILES[:1])]
    if run.cuda:
        configs += [(torch.bfloat16, p, w) for p, w in SWEEP_TILES_BF16]
    for out_dtype, block_p, warps in configs:
        if run.over_budget("rest of sweep"):
            break
        out = torch.empty(B, run.rows_out, run.C, dtype=out_dtype, device=run.device)
        nbytes = out.numel() * out.element_size() + codes.numel() * 8 + run.book.numel() * 4
        fn = lambda: run.kern.launch_forward(out, run.book, codes, meta, list(run.schedule[1:]), run.C,  # noqa: E731
                                             block_p=block_p, num_warps=warps)
        ms = attempt(clock.graph if run.cuda else clock.events, fn)
        row = {"B": B, "out_dtype": str(out_dtype).replace("torch.", ""), "block_p": block_p,
               "num_warps": warps, "ms": ms}
        if isinstance(ms, float):
            row["GBps"] = nbytes / (ms * 1e-3) / 1e9
        run.writer.append("sweep", row)
    best = [r for r in run.report["sweep"] if isinstance(r.get("ms"), float)]
    if best:
        run.report["sweep_best"] = {dt: min((r for r in best if r["out_dtype"] == dt), key=lambda r: r["ms"])
                                    for dt in {r["out_dtype"] for r in best}}
        print("sweep best:", json.dumps(run.report["sweep_best"]))


def summarize(report: dict) -> dict:
    """Per (B, output dtype): sar_fast's speedup over eager and its fraction of the copy
    bandwidth, the two numbers the targets are stated in."""
    summary = {}
    for r in report["forward"]:
        if r["peer"] != "sar_fast":
            continue
        eager = next((e for e in report["forward"] if e["peer"] == "eager" and e["B"] == r["B"]
                      and e["out_dtype"] == r["out_dtype"]), None)
        entry = {}
        for key in ("ms", "graph_ms"):
            if eager and isinstance(r.get(key), float) and isinstance(eager.get(key), float):
                entry[f"speedup_vs_eager_{key}"] = eager[key] / r[key]
        copy = report["copy"].get(str(r["B"]), {})
        for key, ckey in (("GBps", "GBps"), ("graph_GBps", "graph_GBps")):
            if isinstance(r.get(key), float) and isinstance(copy.get(ckey), float):
                entry[f"fraction_of_copy_{key}"] = r[key] / copy[ckey]
        summary[f"B={r['B']} {r['out_dtype']}"] = entry
    return summary


def main() -> int:
    args = parse_args()
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first import of triton
    import torch

    if not torch.cuda.is_available() and not args.smoke:
        print("bench_scale_shift: no CUDA device; nothing measured (use --smoke for a CPU run "
              "of the same code paths under the Triton interpreter)")
        return 0
    run = Run(args, torch, cuda=torch.cuda.is_available() and not args.smoke)
    check_errors(run)
    time_forward(run)
    B = run.batches[-1]  # the largest batch for the remaining sections
    pred = torch.randint(0, run.V, (B, run.L), device=run.device)  # drawn either way: later draws stay put
    if not run.over_budget("ssr"):
        time_ssr(run, pred)
    if not run.over_budget("dense"):
        time_dense(run, B)
    if not args.no_sweep and not run.over_budget("sweep"):
        sweep_configs(run, B)
    summary = summarize(run.report)
    run.writer.close(summary=summary, seconds=round(time.perf_counter() - run.began, 1))
    print("summary:", json.dumps(summary, indent=1))
    print("wrote", run.path)
    if plot(run.report, os.path.join(args.out, "bench_scale_shift.png")):
        print("wrote", os.path.join(args.out, "bench_scale_shift.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
