"""One training step (forward + backward + AdamW) per objective, next to a FLOP/byte model
of what its work should cost, phase by phase.

    python bench/bench_train_step.py --out DIR             # GPU: d16 shapes (batch 32), bf16 autocast
    python bench/bench_train_step.py --out DIR --cpu       # CPU: depth 2, width 256, 4 heads, V 4096, batch 8
    python bench/bench_train_step.py --out DIR --smoke     # seconds: a tiny model, 1 repeat

Objectives: tf (teacher forcing), sar (default SAR: last transition, CFG sampling, top-k 900,
top-p 0.96), official (the public SAR step as written), sar_all (all transitions). The
objectives are interleaved (one step of each per repeat) and each step time is the median
over repeats, so a busy machine slows every objective alike and the ratios hold.

The phase table comes from one profiled step per objective (torch.profiler ranges that
sar.py opens: sar.tf_forward, sar.null_prefix_forward, sar.sampling, sar.sf_forward; the
bench adds backward and optimizer) beside the model's prediction: GEMM FLOPs at the rate a
model-shaped matmul reaches here, plus bytes at the rate a large copy reaches here (both
measured at start-up). A phase whose measured/predicted ratio stands out costs more than
its work. Each objective also gets one accounted step: its peak memory (allocated and
reserved, CUDA; "n/a" on the CPU) and its model FLOPs counted by the trainer's own FLOP
model (sar_fast.train.flops.PassFlops: the passes the step really ran), which give tokens/s and MFU
against the GPU's dense bf16 peak (flops.peak_flops; null on the CPU or an unknown GPU).
Writes DIR/bench_train_step.json, an objective at a time as each is measured.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import JsonReport, add_smoke_flag, median_ms, time_ms  # noqa: E402
from sar_fast.train import flops  # noqa: E402
from sar_fast.models import build_model  # noqa: E402
from sar_fast.sar import OFFICIAL, SARConfig, _needed_scales, sar_step  # noqa: E402
from sar_fast.schedules import STANDARD_SCHEDULE, scale_offsets, total_length  # noqa: E402

CASES = {
    "tf": dict(objective="tf"),
    "sar": dict(OFFICIAL, objective="sar"),
    "official": dict(OFFICIAL),
    "sar_all": dict(OFFICIAL, objective="sar", transitions="all"),
}
PHASES = ("tf_forward", "null_prefix_forward", "sampling", "sf_forward", "backward", "optimizer")


# ------------------------------------------------------------------ the FLOP / byte model
def _ctx_sum(sides) -> int:
    """Sum over tokens of the keys each sees under the block-causal mask."""
    seen = acc = 0
    for s in sides:
        seen += s * s
        acc += s * s * seen
    return acc


def predict(cfg: SARConfig, mc, batch: int, schedule, param_count: int, logit_elem_bytes: int) -> dict[str, dict]:
    """{phase: {"flops", "bytes"}} of one step: GEMM FLOPs of the blocks (qkv, proj, MLP;
    attention scores and values against the visible keys) and of the head, backward = 2x
    the forward GEMMs of every pass with autograd; bytes where the work is memory-bound:
    dense logits (written, read by the loss, their gradient written and read), sampling's
    passes over the vocabulary, AdamW's parameter and state traffic."""
    D, C, V, r = mc.depth, mc.embed_dim, mc.vocab_size, mc.mlp_ratio
    n, off, L = len(schedule), scale_offsets(schedule), total_length(schedule)
    obj = cfg.objective

    def blocks(rows, tokens, ctx):
        return rows * D * (2 * tokens * (4 + 2 * r) * C * C + 4 * ctx * C)

    def head(rows, tokens):
        return rows * 2 * tokens * C * V

    logit_bytes = 4 * logit_elem_bytes  # a dense [tokens, V] logits tensor: written, read, grad written, grad read
    ph = {p: {"flops": 0.0, "bytes": 0.0} for p in PHASES}
    ph["optimizer"]["bytes"] = param_count * 4 * 7  # AdamW: param, grad, 2 moments read; param, 2 moments written
    ph["tf_forward"]["flops"] = blocks(batch, L, _ctx_sum(schedule)) + head(batch, L)
    grad_fwd = ph["tf_forward"]["flops"]
    if obj == "tf":
        ph["backward"]["flops"] = 2 * grad_fwd
        return ph
    if obj == "official":
        guided = cfg.sampling == "cfg" and cfg.cfg > 1.0
        rows_tf = batch * (2 if guided else 1)
        ph["tf_forward"]["flops"] = blocks(rows_tf, L, _ctx_sum(schedule)) + head(rows_tf, L)
        ph["tf_forward"]["bytes"] = rows_tf * L * V * logit_bytes / 2  # logits written + read by CE
        sampled_rows = batch * L  # every scale
        # per row over V: fp32 copies and the guidance mix, the top-k mask, a full sort,
        # softmax / cumsum / scatter / mask / softmax, the multinomial: ~40 passes of 4 bytes
        ph["sampling"]["bytes"] = sampled_rows * V * (40 * 4 + 8 * math.log2(V))
        side = schedule[-1]
        sf = blocks(batch, 1 + side * side, 1 + side * side * (1 + side * side)) + head(batch, side * side)
        ph["sf_forward"] = {"flops": sf, "bytes": batch * side * side * V * logit_bytes / 2}
        ph["backward"] = {"flops": 2 * (ph["tf_forward"]["flops"] + sf),
                          "bytes": (rows_tf * L + batch * side * side) * V * logit_bytes / 2}
        return ph
    js, needed = _needed_scales(cfg, n, 0)
    need_tokens = sum(schedule[s] ** 2 for s in needed)
    ph["tf_forward"]["flops"] += head(batch, need_tokens)  # the sampled scales' logits, no grad
    if cfg.sampling == "cfg" and cfg.cfg > 0 and needed:
        last = max(needed) + 1
        ph["null_prefix_forward"]["flops"] = blocks(batch, off[last], _ctx_sum(schedule[:last])) + \
            head(batch, need_tokens)
    if cfg.sampling != "argmax":
        # per row: read cond + uncond, write the mix, read it for top-k (4 passes of 4 bytes); the
        # rest is over the k candidates
        k = cfg.top_k if 0 < cfg.top_k < V else V
        ph["sampling"]["bytes"] = batch * need_tokens * (16 * V + 40 * k)
    if cfg.transitions == "all":
        sf = blocks(batch, L, _ctx_sum(schedule)) + head(batch, L - 1)
    else:
        side = schedule[js[0] + 1]
        sf = blocks(batch, 1 + side * side, 1 + side * side * (1 + side * side)) + head(batch, side * side)
    ph["sf_forward"]["flops"] = sf
    ph["backward"]["flops"] = 2 * (grad_fwd + sf)
    return ph


def calibrate(device: torch.device, dtype: torch.dtype, tokens: int, dim: int) -> tuple[float, float]:
    """(GEMM FLOP/s of a model-shaped matmul, bytes/s of a large copy) on this device, now."""
    a = torch.randn(tokens, dim, device=device, dtype=dtype)
    b = torch.randn(dim, 4 * dim, device=device, dtype=dtype)
    x = torch.empty(64 * 2**20 // 4, device=device)
    y = torch.empty_like(x)

    def rate(fn, work):
        return work / (median_ms(fn, device.type, repeats=5, warmup=1) / 1e3)
    return rate(lambda: a @ b, 2 * tokens * dim * 4 * dim), rate(lambda: y.copy_(x), 2 * x.numel() * 4)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------ measurement
def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--cpu", action="store_true", help="the CPU shape of issue 17 (depth 2, width 256, V 4096)")
    add_smoke_flag(ap)
    ap.add_argument("--model", default=None, help="GPU model preset (default flexvar-d16)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--repeats", "--steps", type=int, default=None,
                    help="interleaved steps per objective (median taken)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {list(CASES)}")
    return ap.parse_args()


def bench_model(args: argparse.Namespace):
    """(schedule, model, batch, repeats, autocast dtype or None, label) for --smoke, --cpu
    or the GPU preset; the model is built on the CPU."""
    if args.smoke:
        schedule = (1, 2, 3, 4, 6)
        model = build_model("flexvar-tiny", depth=1, embed_dim=64, num_heads=2, vocab_size=257, code_dim=8,
                            schedule=schedule, cond_drop_rate=0.1)
        return schedule, model, args.batch or 4, args.repeats or 1, None, "flexvar-tiny(1x64, V257)"
    if args.cpu:
        schedule = STANDARD_SCHEDULE
        model = build_model("flexvar-d16", depth=2, embed_dim=256, num_heads=4, vocab_size=4096, code_dim=32,
                            schedule=schedule, cond_drop_rate=0.1)
        return schedule, model, args.batch or 8, args.repeats or 5, None, "flexvar(2x256, 4 heads, V4096)"
    model = build_model(args.model or "flexvar-d16", cond_drop_rate=0.1)
    return STANDARD_SCHEDULE, model, args.batch or 32, args.repeats or 10, torch.bfloat16, args.model or "flexvar-d16"


def case_configs(cases: str, vocab_size: int) -> dict[str, SARConfig]:
    """The --cases objectives by name, top_k capped at the vocabulary; an unknown name is an error."""
    names = [c for c in cases.split(",") if c]
    unknown = set(names) - set(CASES)
    if unknown:
        raise SystemExit(f"--cases: unknown {sorted(unknown)}; choose from {list(CASES)}")
    return {name: SARConfig(**{**CASES[name], "top_k": min(CASES[name].get("top_k", 0), vocab_size)})
            for name in names}


def main() -> None:
    args = parse_args()
    os.makedirs(args.out, exist_ok=True)
    on_cpu = args.cpu or args.smoke
    if not on_cpu and not torch.cuda.is_available():
        print("bench_train_step: no CUDA device; run with --cpu (or --smoke) for the CPU numbers")
        return
    device = torch.device("cpu" if on_cpu else "cuda")
    schedule, model, batch, repeats, amp, label = bench_model(args)
    model.to(device).train()
    mc = model.config
    codebook = F.normalize(torch.randn(model.vocab_size, model.code_dim, device=device), dim=-1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    L = total_length(schedule)
    cfgs = case_configs(args.cases, model.vocab_size)
    names = list(cfgs)
    gen = torch.Generator(device="cpu").manual_seed(0)
    labels = torch.randint(0, mc.num_classes, (batch,), generator=gen).to(device)
    codes = torch.randint(0, model.vocab_size, (batch, L), generator=gen).to(device)

    def step(cfg: SARConfig, i: int) -> None:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            out = sar_step(model, labels, codes, schedule, codebook, cfg, step=i)
        with torch.profiler.record_function("sar.backward"):
            out.loss.backward()
        with torch.profiler.record_function("sar.optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)

    calls = iter(range(10**9))  # the step index, for objectives whose draws depend on it
    # interleaved rounds: a load spike hits every objective alike
    times = {name: [ms / 1e3 for ms in got] for name, got in time_ms(
        {name: (lambda cfg=cfgs[name]: step(cfg, next(calls))) for name in names},
        device.type, repeats=repeats, warmup=args.warmup).items()}
    report_cases(args.out, model, cfgs, times, step, device, batch, schedule, repeats, amp, label)


def report_cases(out: str, model, cfgs: dict[str, SARConfig], times: dict[str, list[float]], step, device,
                 batch: int, schedule, repeats: int, amp, label: str) -> None:
    """bench_train_step.json: per objective the measured step, one accounted step (FLOPs,
    MFU, memory), one profiled step's phases and the model's prediction of them; then the
    printed table and ratios."""
    mc, L = model.config, total_length(schedule)
    gemm_rate, byte_rate = calibrate(device, amp or torch.float32, batch * L, mc.embed_dim)
    params = sum(p.numel() for p in model.parameters())
    peak = flops.peak_flops(device)
    report = JsonReport(
        os.path.join(out, "bench_train_step.json"),
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__,
        threads=torch.get_num_threads(), model=label, params_M=params / 1e6, batch=batch, schedule=list(schedule),
        tokens_per_image=L, repeats=repeats, gemm_flop_s=gemm_rate, copy_byte_s=byte_rate, peak_flop_s=peak,
        cases={})
    results = report.doc
    pass_flops = flops.PassFlops(model.blocks[0], model.config)
    for name, cfg in cfgs.items():
        med = statistics.median(times[name])
        pred = predict(cfg, mc, batch, schedule, params, 2 if amp else 4)
        pred_s = {p: v["flops"] / gemm_rate + v["bytes"] / byte_rate for p, v in pred.items()}
        row = {"step_s": med, "step_s_all": times[name], "img_per_s": batch / med, "tokens_per_s": batch * L / med,
               **accounted_step(lambda: step(cfg, 20_000), device, pass_flops, med, peak),
               "phases_s": profiled_phases(lambda: step(cfg, 10_000), device),
               "predicted_phases_s": pred_s, "predicted_step_s": sum(pred_s.values()), "predicted": pred}
        results["cases"][name] = row
        report.write()
    summarise(results, times, label, batch, L, device)
    report.close()


def accounted_step(run_step, device: torch.device, pass_flops: flops.PassFlops, step_s: float,
                   peak: float | None) -> dict:
    """One more step: its peak memory (GiB; "n/a" off CUDA) and model FLOPs (PassFlops: the
    passes it ran), and the MFU those FLOPs make at the measured step time."""
    pass_flops.take()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    pass_flops.enabled = True
    try:
        run_step()
        _sync(device)
    finally:
        pass_flops.enabled = False
    flops, tokens = pass_flops.take()
    flops = float(flops)
    got = {"model_flops": flops, "pass_tokens": tokens, "model_tflop_s": flops / step_s / 1e12,
           "mfu": flops / step_s / peak if peak else None}
    if device.type == "cuda":
        got.update(peak_allocated_gib=torch.cuda.max_memory_allocated() / 2**30,
                   peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30)
    else:
        got.update(peak_allocated_gib="n/a", peak_reserved_gib="n/a")
    return got


def profiled_phases(run_step, device: torch.device) -> dict[str, float]:
    """Seconds per phase (the sar.* ranges) of one profiled step."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        run_step()
        _sync(device)
    got = {}
    for evt in prof.key_averages():
        if evt.key.startswith("sar.") and evt.key[4:] in PHASES:
            # GPU: the kernels' time inside the range (the host runs ahead of them)
            us = (getattr(evt, "device_time_total", 0) or evt.cpu_time_total) if device.type == "cuda" \
                else evt.cpu_time_total
            got[evt.key[4:]] = us / 1e6
    return got


def summarise(results: dict, times: dict[str, list[float]], label: str, batch: int, L: int,
              device: torch.device) -> None:
    """Print the table; add the ratios to tf and between objectives to `results`."""
    base = results["cases"].get("tf")
    print(f"\n{label}, batch {batch}, L {L}, {device}, {results['threads']} threads; "
          f"calibrated GEMM {results['gemm_flop_s'] / 1e9:.1f} GFLOP/s, copy {results['copy_byte_s'] / 1e9:.1f} GB/s; "
          f"median of {results['repeats']} interleaved steps")
    print(f"{'objective':10s} {'s/step':>8s} {'vs tf':>6s} {'model':>6s} {'tok/s':>9s} {'MFU':>6s} {'peak GiB':>9s} | "
          + " | ".join(f"{p[:12]:>12s}" for p in PHASES) + "   (measured s / model s; profiled step)")
    for name, res in results["cases"].items():
        if base:
            res["time_vs_tf"] = res["step_s"] / base["step_s"]
            res["predicted_vs_tf"] = res["predicted_step_s"] / base["predicted_step_s"]
        cells = []
        for p in PHASES:
            m, q = res["phases_s"].get(p), res["predicted_phases_s"][p]
            cells.append(f"{'-' if m is None else f'{m:.3f}':>5s}/{q:.3f}".rjust(12) if m is not None or q else
                         f"{'':>12s}")
        mfu = "n/a" if res["mfu"] is None else f"{100 * res['mfu']:.1f}%"
        mem = res["peak_allocated_gib"]
        mem = mem if isinstance(mem, str) else f"{mem:.1f}"
        print(f"{name:10s} {res['step_s']:8.3f} {res.get('time_vs_tf', float('nan')):6.2f} "
              f"{res.get('predicted_vs_tf', float('nan')):6.2f} {res['tokens_per_s']:9.0f} {mfu:>6s} {mem:>9s} | "
              + " | ".join(cells))
        prof_total = sum(res["phases_s"].values())
        if prof_total:
            res["sampling_share"] = res["phases_s"].get("sampling", 0.0) / prof_total

    # per-repeat ratios (the objectives of one repeat ran seconds apart): steadier than a
    # ratio of medians when the machine's load drifts
    def paired(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b]))
    for a, b in (("sar", "tf"), ("official", "tf"), ("official", "sar")):
        if a in times and b in times:
            results[f"{a}_over_{b}_paired"] = paired(a, b)
            print(f"{a} / {b}: {paired(a, b):.2f}x (median of per-repeat ratios), "
                  f"{statistics.median(times[a]) / statistics.median(times[b]):.2f}x (ratio of medians)")
    if "official" in results["cases"] and "sar" in results["cases"]:
        results["official_over_sar"] = results["cases"]["official"]["step_s"] / results["cases"]["sar"]["step_s"]
    if "sar" in results["cases"]:
        print(f"sar sampling share of the profiled step: {100 * results['cases']['sar'].get('sampling_share', 0):.1f}%")


if __name__ == "__main__":
    main()
