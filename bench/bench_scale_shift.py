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


def main() -> int:
    args = parse_args()
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first import of triton
    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available() and not args.smoke:
        print("bench_scale_shift: no CUDA device; nothing measured (use --smoke for a CPU run "
              "of the same code paths under the Triton interpreter)")
        return 0
    import importlib

    from sar_fast import ops
    from sar_fast.ops import reference
    from sar_fast.schedules import STANDARD_SCHEDULE, random_flexvar_schedule, scale_offsets, total_length
    ss = importlib.import_module("sar_fast.ops.scale_shift")
    kern = importlib.import_module("sar_fast.kernels.scale_shift")

    cuda = torch.cuda.is_available() and not args.smoke
    device = "cuda" if cuda else "cpu"
    began = time.perf_counter()
    if args.smoke:
        schedule, V, C, batches = (1, 2, 3), 16, 4, [2]
        args.repeats, args.inner, args.warmup = 2, 1, 1
        args.no_compile = True  # inductor's CPU compile would dominate the smoke run
    else:
        schedule, V, C, batches = STANDARD_SCHEDULE, VOCAB, CODE_DIM, args.batches
    ops.set_backend("kernel")  # the kernels even where 'auto' would pick them anyway
    clock = Clock(torch, cuda, args.warmup, args.repeats, args.inner)
    torch.manual_seed(0)
    book = F.normalize(torch.randn(V, C, device=device), dim=-1)
    L = total_length(schedule)
    rows_out = L - schedule[0] ** 2

    def over_budget(section: str) -> bool:
        spent = time.perf_counter() - began
        if spent > args.budget:
            report["skipped"].append(f"{section} (budget spent: {spent:.0f} s)")
            return True
        return False

    def eager_loop(codes, out_dtype):
        maps = reference.embed_scales(codes, book, schedule)
        return reference.scale_shift(maps, schedule).to(out_dtype)

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_scale_shift.json")
    writer = JsonReport(
        path, device=torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter smoke run)",
        torch=torch.__version__,
        config={"schedule": list(schedule), "V": V, "C": C, "batches": batches,
                "default_block_p_num_warps": list(kern.default_config(C)),
                "repeats": args.repeats, "inner": args.inner},
        targets={"speedup_vs_eager": TARGET_VS_EAGER, "fraction_of_copy_bandwidth": TARGET_OF_COPY},
        checks={}, forward=[], copy={}, ssr=[], dense=[], sweep=[], skipped=[])
    report = writer.doc  # sections fill in place; writer.write() after each row

    # -------------------------------------------------------------- correctness, recompiles
    codes = torch.randint(0, V, (batches[-1], L), device=device)
    want = eager_loop(codes, torch.float32)
    got = ops.scale_shift(codes, book, schedule, check_range=False)
    report["checks"]["max_abs_err_fp32"] = (got - want).abs().max().item()
    got16 = ops.scale_shift(codes, book, schedule, check_range=False, out_dtype=torch.bfloat16)
    report["checks"]["max_abs_err_bf16_out"] = (got16.float() - want).abs().max().item()
    if cuda:
        rng = random.Random(0)
        schedules = {random_flexvar_schedule(rng) for _ in range(20)}
        worst = 0.0

        def variants() -> int:
            return sum(len(c[0]) for c in kern._scale_shift_fwd_kernel.device_caches.values())
        before = variants()
        for sched in schedules:
            c = torch.randint(0, V, (2, total_length(sched)), device=device)
            ref = reference.scale_shift(reference.embed_scales(c, book, sched), sched)
            worst = max(worst, (ops.scale_shift(c, book, sched, check_range=False) - ref).abs().max().item())
        report["checks"]["random_schedules"] = len(schedules)
        report["checks"]["random_schedules_max_abs_err"] = worst
        report["checks"]["recompiles_over_random_schedules"] = variants() - before
    writer.write()
    print("checks:", json.dumps(report["checks"]))

    # -------------------------------------------------------------- forward from codes
    compiled = None
    if not args.no_compile:
        compiled = torch.compile(eager_loop)
    for B in batches:
        codes = torch.randint(0, V, (B, L), device=device)
        for out_dtype in (torch.float32, torch.bfloat16) if cuda else (torch.float32,):
            out = torch.empty(B, rows_out, C, dtype=out_dtype, device=device)
            nbytes = out.numel() * out.element_size() + codes.numel() * codes.element_size() + book.numel() * 4
            meta = ss._codes_meta(tuple(schedule), tuple(range(len(schedule) - 1)), codes.device)
            sides = list(schedule[1:])
            peers = {
                "eager": lambda: eager_loop(codes, out_dtype),
                "sar_fast": lambda: ops.scale_shift(codes, book, schedule, check_range=False, out_dtype=out_dtype),
                "kernel": lambda: kern.launch_forward(out, book, codes, meta, sides, C),
            }
            if compiled is not None and out_dtype == torch.float32:  # compile time: fp32 only
                peers["compiled"] = lambda: compiled(codes, out_dtype)
            for name, fn in peers.items():
                if name == "compiled":
                    if over_budget(f"compiled B={B} {out_dtype}"):
                        continue
                    t0 = time.perf_counter()
                    attempt(fn)
                    compile_s = time.perf_counter() - t0
                row = {"peer": name, "B": B, "out_dtype": str(out_dtype).replace("torch.", ""), "bytes": nbytes}
                if name == "compiled":
                    row["first_call_s"] = round(compile_s, 2)
                row["ms"] = attempt(clock.events, fn)
                row["graph_ms"] = attempt(clock.graph, fn)
                row["peak_mb"] = attempt(clock.peak_mb, fn)
                for key in ("ms", "graph_ms"):
                    if isinstance(row[key], float):
                        row[key.replace("ms", "GBps")] = nbytes / (row[key] * 1e-3) / 1e9
                writer.append("forward", row)
                print(json.dumps(row))
        if cuda:  # the roofline: a device-to-device copy of the fp32 output's size
            src = torch.empty(B * rows_out * C * 4, dtype=torch.uint8, device=device)
            dst = torch.empty_like(src)
            ms = clock.events(lambda: dst.copy_(src))
            gms = attempt(clock.graph, lambda: dst.copy_(src))
            report["copy"][str(B)] = {"bytes": 2 * src.numel(), "ms": ms, "GBps": 2 * src.numel() / (ms * 1e-3) / 1e9,
                                      "graph_ms": gms}
            if isinstance(gms, float):
                report["copy"][str(B)]["graph_GBps"] = 2 * src.numel() / (gms * 1e-3) / 1e9
            del src, dst
    if cuda:
        big = torch.empty(2 ** 30, dtype=torch.uint8, device=device)
        dst = torch.empty_like(big)
        ms = Clock(torch, True, 2, 10, 3).events(lambda: dst.copy_(big))
        report["copy"]["1GiB"] = {"bytes": 2 * big.numel(), "ms": ms, "GBps": 2 * big.numel() / (ms * 1e-3) / 1e9}
        del big, dst
        writer.write()
        print("copy:", json.dumps(report["copy"]))

    # -------------------------------------------------------------- SSR inputs (largest B)
    B = batches[-1]
    pred = torch.randint(0, V, (B, L), device=device)
    if not over_budget("ssr"):
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
                return ss.ssr_inputs(pred, book, schedule, transitions, check_range=False)
            for name, fn in {"eager": eager_ssr, "sar_fast": fused_ssr}.items():
                row = {"peer": name, "B": B, "transitions": transitions,
                       "ms": attempt(clock.events, fn), "graph_ms": attempt(clock.graph, fn)}
                writer.append("ssr", row)
                print(json.dumps(row))

    # -------------------------------------------------------------- dense latents, fwd + bwd
    if not over_budget("dense"):
        maps = [torch.randn(B, C, s, s, device=device, requires_grad=True) for s in schedule]
        grad = torch.randn(B, rows_out, C, device=device)

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
        report["checks"]["dense_grad_max_abs_err"] = max((g - m.grad).abs().max().item()
                                                        for g, m in zip(got, maps[:-1]))
        for impl, name in (("reference", "eager"), ("kernel", "sar_fast")):
            row = {"peer": name, "B": B, "fwd_ms": attempt(clock.events, lambda: fwd(impl)),
                   "fwd_bwd_ms": attempt(clock.events, lambda: fwd_bwd(impl))}
            writer.append("dense", row)
            print(json.dumps(row))

    # -------------------------------------------------------------- kernel config sweep
    if not args.no_sweep and not over_budget("sweep"):
        codes = torch.randint(0, V, (B, L), device=device)
        meta = ss._codes_meta(tuple(schedule), tuple(range(len(schedule) - 1)), codes.device)
        tiles = [(16, 1), (16, 2), (32, 1), (32, 2), (32, 4), (64, 2), (64, 4), (64, 8), (128, 4), (128, 8)]
        configs = [(torch.float32, p, w) for p, w in (tiles if cuda else tiles[:1])]
        if cuda:
            configs += [(torch.bfloat16, p, w) for p, w in ((32, 4), (64, 4), (64, 8))]
        for out_dtype, block_p, warps in configs:
            if over_budget("rest of sweep"):
                break
            out = torch.empty(B, rows_out, C, dtype=out_dtype, device=device)
            nbytes = out.numel() * out.element_size() + codes.numel() * 8 + book.numel() * 4
            fn = lambda: kern.launch_forward(out, book, codes, meta, list(schedule[1:]), C,  # noqa: E731
                                             block_p=block_p, num_warps=warps)
            ms = attempt(clock.graph if cuda else clock.events, fn)
            row = {"B": B, "out_dtype": str(out_dtype).replace("torch.", ""), "block_p": block_p,
                   "num_warps": warps, "ms": ms}
            if isinstance(ms, float):
                row["GBps"] = nbytes / (ms * 1e-3) / 1e9
            writer.append("sweep", row)
        best = [r for r in report["sweep"] if isinstance(r.get("ms"), float)]
        if best:
            report["sweep_best"] = {dt: min((r for r in best if r["out_dtype"] == dt), key=lambda r: r["ms"])
                                    for dt in {r["out_dtype"] for r in best}}
            print("sweep best:", json.dumps(report["sweep_best"]))

    # -------------------------------------------------------------- summary against targets
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
    writer.close(summary=summary, seconds=round(time.perf_counter() - began, 1))
    print("summary:", json.dumps(summary, indent=1))
    print("wrote", path)
    if plot(report, os.path.join(args.out, "bench_scale_shift.png")):
        print("wrote", os.path.join(args.out, "bench_scale_shift.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
