"""Time one training step (forward + backward + AdamW) per objective on one device.

    python bench/bench_train_step.py --out DIR                  # GPU: d16 shapes, bf16 autocast
    python bench/bench_train_step.py --out DIR --cpu            # CPU: the tiny preset's model
    python bench/bench_train_step.py --out DIR --smoke          # CPU, a 1-block model, 1 step: seconds

Objectives compared in one run: tf (teacher forcing), sar (default SAR: last transition,
CFG sampling), official (the public SAR step as written) and sar with all transitions.
Reports img/s, the step-time ratio to TF, MFU (GPU) and peak memory; writes
DIR/bench_train_step.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import add_smoke_flag, time_ms  # noqa: E402
from sar_fast import logs  # noqa: E402
from sar_fast.models import build_model  # noqa: E402
from sar_fast.sar import OFFICIAL, SARConfig, sar_step  # noqa: E402
from sar_fast.schedules import STANDARD_SCHEDULE, total_length  # noqa: E402

CASES = {
    "tf": dict(objective="tf"),
    "sar": dict(OFFICIAL, objective="sar"),
    "official": dict(OFFICIAL),
    "sar_all": dict(OFFICIAL, objective="sar", transitions="all"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--cpu", action="store_true", help="tiny model on the CPU (the embedded default's size)")
    ap.add_argument("--model", default=None, help="model preset (default flexvar-d16 on GPU)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=2)
    add_smoke_flag(ap)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if not (args.cpu or args.smoke) and not torch.cuda.is_available():
        print("bench_train_step: no CUDA device; run with --cpu for the CPU numbers")
        return
    device = torch.device("cpu" if args.cpu or args.smoke else "cuda")
    if args.smoke:
        model = build_model("flexvar-tiny", depth=1, embed_dim=32, num_heads=2, vocab_size=17, code_dim=1,
                            schedule=(1, 2, 3), cond_drop_rate=0.1)
        schedule, batch, steps, amp = (1, 2, 3), 4, 1, None
        args.warmup = 0
    elif args.cpu:
        model = build_model("flexvar-tiny", depth=3, embed_dim=96, num_heads=4, vocab_size=17, code_dim=1,
                            schedule=(1, 2, 3, 4, 6, 8), cond_drop_rate=0.1)
        schedule, batch, steps, amp = (1, 2, 3, 4, 6, 8), args.batch or 64, args.steps or 5, None
    else:
        model = build_model(args.model or "flexvar-d16", cond_drop_rate=0.1)
        schedule, batch, steps, amp = STANDARD_SCHEDULE, args.batch or 32, args.steps or 10, torch.bfloat16
    model.to(device).train()
    codebook = F.normalize(torch.randn(model.vocab_size, model.code_dim, device=device), dim=-1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    L = total_length(schedule)
    mc = model.config
    fwd_flops = logs.flops_per_token(mc.depth, mc.embed_dim, mc.vocab_size, mc.mlp_ratio,
                                     logs.mean_visible_keys(schedule)) * L * batch
    peak = logs.peak_flops(device)
    model_name = args.model or ("flexvar-tiny(1x32, smoke)" if args.smoke
                                else "flexvar-tiny(3x96)" if args.cpu else "flexvar-d16")
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "model": model_name,
               "params_M": sum(p.numel() for p in model.parameters()) / 1e6, "batch": batch, "schedule": schedule,
               "cases": {}}
    for name, kw in CASES.items():
        cfg = SARConfig(**{**kw, "top_k": min(kw.get("top_k", 0), model.vocab_size)})
        labels = torch.randint(0, mc.num_classes, (batch,), device=device)
        codes = torch.randint(0, model.vocab_size, (batch, L), device=device)

        def step(i: int) -> None:
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                out = sar_step(model, labels, codes, schedule, codebook, cfg, step=i)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        calls = iter(range(10**9))  # the step index, for schedules that depend on it
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = time_ms({name: lambda: step(next(calls))}, device.type, steps, args.warmup)[name]
        dt = statistics.mean(times) / 1e3
        # model FLOPs actually needed: TF fwd+bwd (3x), SF pass fwd+bwd on its tokens, null-class fwd
        res = {"step_s": dt, "img_per_s": batch / dt}
        if peak:
            res["mfu_tf_equivalent"] = 3 * fwd_flops / dt / peak
        if device.type == "cuda":
            res["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        results["cases"][name] = res
        print(f"{name:10s} {dt * 1e3:9.1f} ms/step  {batch / dt:8.1f} img/s", flush=True)
    tf = results["cases"]["tf"]["step_s"]
    for res in results["cases"].values():
        res["time_vs_tf"] = res["step_s"] / tf
    results["official_over_sar"] = results["cases"]["official"]["step_s"] / results["cases"]["sar"]["step_s"]
    with open(os.path.join(args.out, "bench_train_step.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps({k: v for k, v in results.items() if k != "cases"}, indent=1))


if __name__ == "__main__":
    main()
