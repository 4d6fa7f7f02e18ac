"""Benchmark the fused head + cross-entropy (and the soft-target KL) against its peers, in one run.

    python bench/bench_cross_entropy.py --out DIR [--quick] [--dtype bf16|fp16|fp32] [--repeats 10]
    python bench/bench_cross_entropy.py --out DIR --losses ce kl  # also the KL to a teacher's head
    python bench/bench_cross_entropy.py --out DIR --smoke         # CPU, tiny shapes, interpreter: seconds

Peers, on the SAR head loss (N = B x 680 tokens, per-token weights 1/L, label smoothing 0.1;
KL: the teacher given by its hidden states through the same head, temperature 1):
- eager:   F.linear in the input dtype, F.cross_entropy on the fp32 logits (what autocast
           training does), weighted mean;
- compile: torch.compile of eager;
- liger:   Liger-Kernel's LigerFusedLinearCrossEntropyLoss, if installed (no per-token
           weights there: plain mean);
- fused:   sar_fast.ops.fused_linear_cross_entropy / fused_linear_kl_div (Triton).
Each is timed forward (inputs requiring grad) and forward+backward with CUDA events
(warm-up, median of repeats); peak memory is the most allocated above the inputs during
one call. Writes DIR/bench_cross_entropy.json (row by row) and, if matplotlib imports, DIR/bench_cross_entropy.png.
Targets on H200 bf16: fused peak memory <= 25% of eager's, fused fwd+bwd >= 1.2x eager.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import JsonReport, add_smoke_flag, bar_panels, median_ms, start  # noqa: E402

TOKENS_PER_IMAGE = 680  # 1+4+9+16+25+36+64+100+169+256 at 256 px
SMOOTHING = 0.1
TARGET_MEM_RATIO, TARGET_SPEEDUP = 0.25, 1.2


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder for bench_cross_entropy.json / .png")
    p.add_argument("--batches", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--dims", type=int, nargs="+", default=[1024, 1536])
    p.add_argument("--vocabs", type=int, nargs="+", default=[4096, 8912])
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="two shapes only: (64, 1024, 4096), (256, 1536, 8912)")
    p.add_argument("--peers", nargs="+", default=["eager", "compile", "liger", "fused"])
    p.add_argument("--losses", nargs="+", choices=["ce", "kl"], default=["ce"],
                   help="ce: hard targets; kl: soft targets from a teacher's hidden states (liger: ce only)")
    add_smoke_flag(p)
    return p.parse_args()


def shapes(args) -> list[tuple[int, int, int]]:
    if args.smoke:
        return [(1, 32, 96)]  # 64 tokens
    if args.quick:
        return [(64, 1024, 4096), (256, 1536, 8912)]
    return [(b, c, v) for b in args.batches for c in args.dims for v in args.vocabs]


def make_peers(names, torch, F, ops, loss: str):
    """{peer: fn(h, w, b, target, token_weight)}; for kl the target is the teacher's hidden
    states [N, C] (no gradient), else class indices."""
    def eager_ce(h, w, b, t, tw):
        ce = F.cross_entropy(F.linear(h, w, b).float(), t, label_smoothing=SMOOTHING, reduction="none")
        return (ce * tw).sum() / tw.sum()

    def eager_kl(h, w, b, t, tw):
        with torch.no_grad():
            logp_t = F.linear(t, w, b).float().log_softmax(-1)
        kl = (logp_t.exp() * (logp_t - F.linear(h, w, b).float().log_softmax(-1))).sum(-1)
        return (kl * tw).sum() / tw.sum()

    def fused_ce(h, w, b, t, tw):
        with ops.use_backend("kernel"):
            return ops.fused_linear_cross_entropy(h, w, b, t, tw, label_smoothing=SMOOTHING)

    def fused_kl(h, w, b, t, tw):
        with ops.use_backend("kernel"):
            return ops.fused_linear_kl_div(h, w, b, target_hidden=t, token_weight=tw)

    eager, fused = (eager_kl, fused_kl) if loss == "kl" else (eager_ce, fused_ce)
    peers = {}
    for name in names:
        if name == "eager":
            peers[name] = eager
        elif name == "compile":
            peers[name] = torch.compile(eager)
        elif name == "fused":
            peers[name] = fused
        elif name == "liger":
            if loss == "kl":
                continue
            try:
                from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
            except ImportError:
                print("liger-kernel is not installed: skipping that peer")
                continue
            liger_loss = LigerFusedLinearCrossEntropyLoss(label_smoothing=SMOOTHING)
            peers[name] = lambda h, w, b, t, tw: liger_loss(w, h, t, b)
        else:
            raise SystemExit(f"unknown peer {name!r}")
    return peers


def measure(torch, fn, inputs, backward: bool, device: str, warmup: int, repeats: int) -> tuple[float, float]:
    """(median ms, peak MiB allocated above the inputs during one call; NaN on the CPU) of
    fn(*inputs) [+ backward]."""
    leaves = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]

    def clear_grads():
        for x in leaves:
            x.grad = None

    def once(_=None):
        loss = fn(*inputs)
        if backward:
            loss.backward()

    ms = median_ms((clear_grads, once), device, repeats, warmup)
    if device != "cuda":
        return ms, float("nan")
    clear_grads()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    once()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    clear_grads()
    return ms, peak


def plot(results: list[dict], path: str) -> bool:
    labels = sorted({r["shape"] for r in results}, key=lambda s: [int(x[1:]) for x in s.split()])
    peers = sorted({r["peer"] for r in results}, key=lambda p: ["eager", "compile", "liger", "fused"].index(p)
                   if p in ("eager", "compile", "liger", "fused") else 99)
    panels = [("fwd", "time_ms", "forward time (ms)"), ("fwd+bwd", "time_ms", "forward+backward time (ms)"),
              ("fwd", "peak_mib", "forward peak memory (MiB)"), ("fwd+bwd", "peak_mib", "fwd+bwd peak memory (MiB)")]
    return bar_panels(path, results, "shape", labels, peers, panels, grid=(2, 2))


def main() -> int:
    args = parse_args()
    # deliberate repeat: every bench main opens with the same start() call and lazy imports
    started = start("bench_cross_entropy", args.out, args.smoke, args.dtype)
    if started is None:
        return 0
    torch, device, dtype = started
    import torch.nn.functional as F
    import triton

    from sar_fast import ops
    names = [p for p in args.peers if not (device == "cpu" and p in ("compile", "liger"))]
    path = os.path.join(args.out, "bench_cross_entropy.json")
    report = JsonReport(
        path, op="fused_linear_cross_entropy", device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
        dtype=str(dtype).replace("torch.", ""), torch=torch.__version__, triton=triton.__version__,
        label_smoothing=SMOOTHING, tokens_per_image=TOKENS_PER_IMAGE, smoke=bool(args.smoke),
        targets={"mem_ratio_vs_eager_max": TARGET_MEM_RATIO, "fwd_bwd_speedup_vs_eager_min": TARGET_SPEEDUP},
        notes="peak_mib: most allocated above the inputs during one call; liger has no per-token weights "
              "(plain mean); times are medians of CUDA-event intervals; kl: teacher hidden states through "
              "the same head, temperature 1", loss_checks=[], results=[])
    results = report.doc["results"]
    for loss in args.losses:
        peers = make_peers(names, torch, F, ops, loss)
        for B, C, V in shapes(args):
            measure_shape(torch, device, dtype, args, report, peers, loss, (B, C, V))
    summary = summarise(results, device)
    report.close(summary=summary)
    print(f"wrote {path}")
    if plot([r for r in results if r["loss"] == "ce"], os.path.join(args.out, "bench_cross_entropy.png")):
        print(f"wrote {os.path.join(args.out, 'bench_cross_entropy.png')}")
    for s in summary:
        print(f"{s['loss']} {s['shape']:22s} fused fwd+bwd {s['speedup_vs_eager']:.2f}x eager, "
              f"peak memory {s['mem_ratio_vs_eager'] if s['mem_ratio_vs_eager'] is not None else float('nan'):.2f}"
              f" of eager")
    return 0


def measure_shape(torch, device, dtype, args, report: JsonReport, peers: dict, loss: str, bcv) -> None:
    """Every peer at one (B, C, V), forward and forward+backward: one row each, written as measured."""
    B, C, V = bcv
    n = 64 if args.smoke else B * TOKENS_PER_IMAGE  # the interpreter is slow
    gen = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(n, C, device=device, generator=gen).to(dtype).requires_grad_()
    w = (0.02 * torch.randn(V, C, device=device, generator=gen)).to(dtype).requires_grad_()
    b = torch.zeros(V, device=device).to(dtype).requires_grad_()
    if loss == "kl":
        t = torch.randn(n, C, device=device, generator=gen).to(dtype)
    else:
        t = torch.randint(0, V, (n,), device=device, generator=gen)
    tw = torch.full((n,), 1.0 / TOKENS_PER_IMAGE, device=device)
    inputs = (h, w, b, t, tw)
    shape = f"B{B} C{C} V{V}"
    with torch.no_grad():
        ref = peers["eager"](*inputs).item() if "eager" in peers else None
        got = peers["fused"](*inputs).item() if "fused" in peers else None
    if ref is not None and got is not None:
        report.append("loss_checks", {"loss": loss, "shape": shape, "eager_loss": ref, "fused_loss": got,
                                      "abs_diff": abs(ref - got)})
    for peer, fn in peers.items():
        for mode in ("fwd", "fwd+bwd"):
            row = {"loss": loss, "shape": shape, "B": B, "N": n, "C": C, "V": V, "peer": peer, "mode": mode,
                   "time_ms": None, "peak_mib": None}
            try:
                repeats, warmup = (args.repeats, args.warmup) if device == "cuda" else (2, 0)
                row["time_ms"], row["peak_mib"] = measure(torch, fn, inputs, mode == "fwd+bwd", device,
                                                          warmup, repeats)
            except torch.cuda.OutOfMemoryError:
                row["error"] = "out of memory"
                torch.cuda.empty_cache()
            report.append("results", row)
            print(f"{loss} {shape:22s} {peer:8s} {mode:8s} time {row['time_ms'] or float('nan'):9.3f} ms  "
                  f"peak {row['peak_mib'] if row['peak_mib'] is not None else float('nan'):10.1f} MiB", flush=True)
    del h, w, b, t, tw, inputs
    if device == "cuda":
        torch.cuda.empty_cache()


def summarise(results: list[dict], device: str) -> list[dict]:
    """Speed and memory of every row against eager at its loss, shape and mode (added to the
    rows); the fused fwd+bwd rows against the targets."""
    summary = []
    for row in results:
        base = [r for r in results if r["loss"] == row["loss"] and r["shape"] == row["shape"]
                and r["mode"] == row["mode"] and r["peer"] == "eager"]
        if base and base[0]["time_ms"] and row["time_ms"]:
            row["speedup_vs_eager"] = base[0]["time_ms"] / row["time_ms"]
        if base and base[0]["peak_mib"] and row["peak_mib"] is not None and device == "cuda":
            row["mem_ratio_vs_eager"] = row["peak_mib"] / base[0]["peak_mib"]
        if row["peer"] == "fused" and row["mode"] == "fwd+bwd" and "speedup_vs_eager" in row:
            summary.append({"loss": row["loss"], "shape": row["shape"], "speedup_vs_eager": row["speedup_vs_eager"],
                            "mem_ratio_vs_eager": row.get("mem_ratio_vs_eager"),
                            "meets_speed_target": row["speedup_vs_eager"] >= TARGET_SPEEDUP,
                            "meets_memory_target": (None if row.get("mem_ratio_vs_eager") is None
                                                    else row["mem_ratio_vs_eager"] <= TARGET_MEM_RATIO)})
    return summary


if __name__ == "__main__":
    sys.exit(main())
