"""Benchmark block-causal scale attention against its peers, in one run.

    python bench/bench_attention.py --out DIR [--quick] [--dtype bf16|fp16|fp32] [--batch 64]
    python bench/bench_attention.py --out DIR --lengths 680 2240 --head-dims 64 128 --batch 16
    python bench/bench_attention.py --out DIR --smoke       # CPU, tiny shapes, interpreter: seconds

Shapes (VAR/FlexVAR, head dim 64): d16 (H=16) and d24 (H=24) on the standard 10-scale
schedule (L = 680), plus FlexVAR random training schedules (d16); or, with --lengths, the
standard schedules of those lengths (680: 256 px, 1..16; 2240: 512 px, 1..32) at each
--head-dims. Peers:
- sar_fast:    sar_fast.ops.scale_causal_attention (Triton, tile-skipping);
- sdpa-*:      F.scaled_dot_product_attention with the dense additive mask [1, 1, L, L] that
               VAR/FlexVAR train with, under each SDPA backend (auto, efficient, cudnn, flash,
               math); a backend that refuses the mask is recorded as unsupported;
- flex:        flex_attention under one torch.compile (made once, reused by every shape) with
               a block mask built once per schedule;
- xformers:    memory_efficient_attention with the dense bias, if xformers is installed.
Modes: fwd (inputs require grad, as in training), bwd (backward of one forward, timed
alone), fwd+bwd. Times are medians of CUDA-event intervals after warm-up; TFLOP/s count only
the visible (query, key) pairs: fwd 4*D per pair, bwd 2.5x that; peak memory is the most
allocated above the inputs during one fwd+bwd. Writes DIR/bench_attention.json (row by row) and, if
matplotlib imports, DIR/bench_attention.png.
Targets on H200 bf16, fwd+bwd: sar_fast >= 1.3x flex and >= 2x the fastest dense-mask SDPA.
"""
from __future__ import annotations

import argparse
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import JsonReport, add_smoke_flag, bar_panels, median_ms, start  # noqa: E402

from sar_fast.schedules import STANDARD_SCHEDULE  # noqa: E402

HEAD_DIM = 64
TARGET_VS_FLEX, TARGET_VS_SDPA = 1.3, 2.0
SDPA_BACKENDS = ("auto", "efficient", "cudnn", "flash", "math")
# standard schedules by total length: VAR/FlexVAR at 256 px and VAR at 512 px
SCHEDULES_BY_LENGTH = {680: STANDARD_SCHEDULE, 2240: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)}
MODES = ("fwd", "bwd", "fwd+bwd")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder for bench_attention.json / .png")
    p.add_argument("--batch", type=int, default=64, help="images per batch (B)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--random-schedules", type=int, default=2, help="FlexVAR random schedules (d16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="d16 standard schedule and one random schedule")
    p.add_argument("--lengths", type=int, nargs="+", default=None, choices=sorted(SCHEDULES_BY_LENGTH),
                   help="instead of the default cases: the standard schedule of each length ...")
    p.add_argument("--head-dims", type=int, nargs="+", default=[HEAD_DIM], help="... at each head dim")
    p.add_argument("--width", type=int, default=1024,
                   help="model width of the --lengths cases: heads = width / head dim (d16: 1024)")
    p.add_argument("--peers", nargs="+", default=["sar_fast", "flex", "xformers"]
                   + [f"sdpa-{b}" for b in SDPA_BACKENDS])
    add_smoke_flag(p)
    return p.parse_args()


def cases(args) -> list[dict]:
    """name, heads, scale_lens of every benchmarked shape."""
    from sar_fast.schedules import STANDARD_SCHEDULE, random_flexvar_schedule
    if args.smoke:
        return [{"name": "smoke (1,2,3,4)", "H": 2, "D": 16, "B": 1, "lens": (1, 4, 9, 16)}]
    if args.lengths:
        return [{"name": f"L{L} D{D}", "H": args.width // D, "D": D, "B": args.batch,
                 "lens": tuple(s * s for s in SCHEDULES_BY_LENGTH[L])} for L in args.lengths for D in args.head_dims]
    std = tuple(s * s for s in STANDARD_SCHEDULE)
    out = [{"name": "d16 L680", "H": 16, "D": HEAD_DIM, "B": args.batch, "lens": std}]
    if not args.quick:
        out.append({"name": "d24 L680", "H": 24, "D": HEAD_DIM, "B": args.batch, "lens": std})
    rng = random.Random(args.seed)
    seen = {std}
    for _ in range(1 if args.quick else args.random_schedules):
        for _ in range(100):  # a schedule not benchmarked yet
            lens = tuple(s * s for s in random_flexvar_schedule(rng))
            if lens not in seen:
                break
        seen.add(lens)
        out.append({"name": f"d16 flexvar L{sum(lens)}", "H": 16, "D": HEAD_DIM, "B": args.batch, "lens": lens})
    return out


def visible_pairs(lens) -> int:
    """(query, key) pairs the block-causal mask leaves visible."""
    total, seen = 0, 0
    for n in lens:
        seen += n
        total += n * seen
    return total


def make_peers(names, case, device, dtype, torch, F, ops, compiled: dict):
    """{peer name: fn(q, k, v) -> out [B, H, L, D]} for this shape; setup cost (masks,
    block masks) is paid here, once per schedule, as training would."""
    lens, L = case["lens"], sum(case["lens"])
    keep = ops.reference.scale_causal_mask(lens, device)
    dense_bias = torch.zeros(L, L, device=device, dtype=dtype).masked_fill_(~keep, float("-inf"))[None, None]
    peers, skipped = {}, {}
    for name in names:
        if name == "sar_fast":
            def sar_fast(q, k, v):
                with ops.use_backend("kernel"):
                    return ops.scale_causal_attention(q, k, v, lens)
            peers[name] = sar_fast
        elif name.startswith("sdpa-"):
            which = name[5:]
            if which == "auto":
                peers[name] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense_bias)
                continue
            from torch.nn.attention import SDPBackend, sdpa_kernel
            backend = {"efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                       "flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}[which]

            def sdpa(q, k, v, backend=backend):
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=dense_bias)
            peers[name] = sdpa
        elif name == "flex":
            if device == "cpu":
                skipped[name] = "not run in the CPU smoke mode"
                continue
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            sid = torch.repeat_interleave(torch.arange(len(lens), device=device),
                                          torch.tensor(lens, device=device))
            block_mask = create_block_mask(lambda b, h, qi, ki: sid[ki] <= sid[qi], None, None, L, L,
                                           device=device)
            if "flex" not in compiled:  # one torch.compile for every shape: dynamo recompiles per shape only
                compiled["flex"] = torch.compile(flex_attention, dynamic=False)
            peers[name] = lambda q, k, v, bm=block_mask, flex=compiled["flex"]: flex(q, k, v, block_mask=bm)
        elif name == "xformers":
            try:
                import xformers.ops as xops
            except ImportError:
                skipped[name] = "xformers is not installed"
                continue
            padded = -(-L // 8) * 8  # xformers wants the bias rows 8-aligned in memory
            bias = torch.zeros(L, padded, device=device, dtype=dtype)
            bias[:, :L] = dense_bias[0, 0]
            bias = bias[:, :L]

            def xformers_attn(q, k, v, bias=bias):
                B, H = q.shape[:2]
                out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                      attn_bias=bias.expand(B, H, L, L))
                return out.transpose(1, 2)
            peers[name] = xformers_attn
        else:
            raise SystemExit(f"unknown peer {name!r}")
    return peers, skipped


def measure(torch, fn, inputs, grad_out, mode: str, device: str, warmup: int,
            repeats: int) -> tuple[float, float]:
    """(median ms, peak MiB allocated above the inputs during one fwd+bwd; NaN on the CPU)."""
    q, k, v = inputs

    def backward(out):
        return torch.autograd.grad(out, (q, k, v), grad_out)

    peer = {"fwd": lambda: fn(q, k, v), "fwd+bwd": lambda: backward(fn(q, k, v)),
            "bwd": (lambda: fn(q, k, v), backward)}[mode]  # bwd: timed alone after an untimed forward
    ms = median_ms(peer, device, repeats, warmup)
    if device != "cuda":
        return ms, float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    backward(fn(q, k, v))
    torch.cuda.synchronize()
    return ms, (torch.cuda.max_memory_allocated() - base) / 2**20


def plot(results: list[dict], path: str) -> bool:
    shapes = list(dict.fromkeys(r["case"] for r in results))
    peers = list(dict.fromkeys(r["peer"] for r in results))
    panels = [("fwd+bwd", "time_ms", "forward+backward time (ms)"), ("fwd+bwd", "tflops", "forward+backward TFLOP/s"),
              ("fwd", "tflops", "forward TFLOP/s"), ("bwd", "tflops", "backward TFLOP/s"),
              ("fwd+bwd", "peak_mib", "fwd+bwd peak memory (MiB)")]
    return bar_panels(path, results, "case", shapes, peers, panels)


def main() -> int:
    args = parse_args()
    started = start("bench_attention", args.out, args.smoke, args.dtype)
    if started is None:
        return 0
    torch, device, dtype = started
    import torch.nn.functional as F
    import triton

    from sar_fast import ops
    peer_names = args.peers
    if device == "cpu":
        peer_names = [p for p in peer_names if p in ("sar_fast", "sdpa-auto", "sdpa-math", "flex")]
    path = os.path.join(args.out, "bench_attention.json")
    report = JsonReport(
        path, op="scale_causal_attention", device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
        dtype=str(dtype).replace("torch.", ""), torch=torch.__version__, triton=triton.__version__,
        smoke=bool(args.smoke),
        targets={"fwd_bwd_speedup_vs_flex_min": TARGET_VS_FLEX, "fwd_bwd_speedup_vs_fastest_sdpa_min": TARGET_VS_SDPA},
        notes="TFLOP/s count visible pairs only (fwd 4*D flops per pair, bwd 2.5x fwd); peak_mib: most "
              "allocated above the inputs during one fwd+bwd; bwd is timed alone after an untimed forward",
        skipped_peers={}, checks=[], results=[])
    compiled: dict = {}
    for case in cases(args):
        measure_case(torch, F, ops, device, dtype, args, report, peer_names, case, compiled)
    results = report.doc["results"]
    summary = summarise(results)
    report.close(summary=summary)
    print(f"wrote {path}")
    if plot(results, os.path.join(args.out, "bench_attention.png")):
        print(f"wrote {os.path.join(args.out, 'bench_attention.png')}")
    for s in summary:
        parts = [f"{s['case']:22s} sar_fast fwd+bwd {s['sar_fast_ms']:.3f} ms"]
        if "speedup_vs_flex" in s:
            parts.append(f"{s['speedup_vs_flex']:.2f}x flex (target {TARGET_VS_FLEX})")
        if "speedup_vs_fastest_sdpa" in s:
            parts.append(f"{s['speedup_vs_fastest_sdpa']:.2f}x {s['fastest_sdpa']} (target {TARGET_VS_SDPA})")
        print(", ".join(parts))
    return 0


def measure_case(torch, F, ops, device, dtype, args, report: JsonReport, peer_names, case, compiled) -> None:
    """Every peer and mode at one shape: one row each, written as measured."""
    B, H, D, lens = case["B"], case["H"], case["D"], case["lens"]
    L = sum(lens)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    q, k, v = (torch.randn(B, H, L, D, device=device, generator=gen).to(dtype).requires_grad_()
               for _ in range(3))
    grad_out = torch.randn(B, H, L, D, device=device, generator=gen).to(dtype)
    peers, skipped = make_peers(peer_names, case, device, dtype, torch, F, ops, compiled)
    report.set(skipped_peers={**report.doc["skipped_peers"], **skipped})
    if "sar_fast" in peers:  # agreement with fp32 dense-mask SDPA on a slice of the batch
        with torch.no_grad():  # full batch: the first call autotunes, at this shape
            got = peers["sar_fast"](q, k, v)[:2].float()
            want = ops.reference.scale_causal_attention(q[:2].float(), k[:2].float(), v[:2].float(), lens)
        report.append("checks", {"case": case["name"], "max_abs_diff_vs_fp32_sdpa": (got - want).abs().max().item()})
    fwd_flops = 4.0 * B * H * D * visible_pairs(lens)
    flops = {"fwd": fwd_flops, "bwd": 2.5 * fwd_flops, "fwd+bwd": 3.5 * fwd_flops}
    for peer, fn in peers.items():
        for mode in MODES:
            row = {"case": case["name"], "B": B, "H": H, "D": D, "L": L, "scale_lens": list(lens),
                   "density": visible_pairs(lens) / L ** 2, "peer": peer, "mode": mode,
                   "time_ms": None, "tflops": None, "peak_mib": None}
            try:
                repeats, warmup = (args.repeats, args.warmup) if device == "cuda" else (1, 0)
                row["time_ms"], row["peak_mib"] = measure(torch, fn, (q, k, v), grad_out, mode, device,
                                                          warmup, repeats)
                row["tflops"] = flops[mode] / (row["time_ms"] * 1e-3) / 1e12
            except torch.cuda.OutOfMemoryError:
                row["error"] = "out of memory"
            except RuntimeError as e:  # e.g. an SDPA backend that refuses a dense mask
                row["error"] = f"unsupported: {str(e).splitlines()[0][:200]}"
            if device == "cuda":
                torch.cuda.empty_cache()
            report.append("results", row)
            if "error" in row:
                print(f"{case['name']:22s} {peer:15s} {mode:8s} {row['error']}", flush=True)
            else:
                print(f"{case['name']:22s} {peer:15s} {mode:8s} {row['time_ms']:9.3f} ms "
                      f"{row['tflops']:8.1f} TFLOP/s  peak {row['peak_mib']:9.1f} MiB", flush=True)
            if "error" in row and row["error"].startswith("unsupported"):
                break  # the other modes would fail the same way


def summarise(results: list[dict]) -> list[dict]:
    """Per case: sar_fast's fwd+bwd against the fastest flex and SDPA rows, and the targets."""
    summary = []
    for case in dict.fromkeys(r["case"] for r in results):
        def best(prefix):
            rows = [r for r in results if r["case"] == case and r["mode"] == "fwd+bwd" and r["time_ms"]
                    and r["peer"].startswith(prefix)]
            return min(rows, key=lambda r: r["time_ms"]) if rows else None
        ours, flex, sdpa = best("sar_fast"), best("flex"), best("sdpa-")
        if ours is None:
            continue
        entry = {"case": case, "sar_fast_ms": ours["time_ms"]}
        if flex:
            entry["speedup_vs_flex"] = flex["time_ms"] / ours["time_ms"]
            entry["meets_flex_target"] = entry["speedup_vs_flex"] >= TARGET_VS_FLEX
        if sdpa:
            entry["fastest_sdpa"] = sdpa["peer"]
            entry["speedup_vs_fastest_sdpa"] = sdpa["time_ms"] / ours["time_ms"]
            entry["meets_sdpa_target"] = entry["speedup_vs_fastest_sdpa"] >= TARGET_VS_SDPA
        summary.append(entry)
    return summary


if __name__ == "__main__":
    sys.exit(main())
