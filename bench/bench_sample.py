"""Sampler throughput (images/s, tokens only: no VAE decode) per setting, in one run.

    python bench/bench_sample.py --out DIR            # GPU: FlexVAR-d16 shapes (random weights)
    python bench/bench_sample.py --out DIR --smoke    # CPU: the embedded default's tiny model

Cases: the evaluation path (CFG, conditional and null-class rows in one batched pass, KV
cache, per-image seeded noise as sar_fast.evaluate draws it), the same with one shared
generator, without CFG, in fp32 instead of bf16, and without the KV cache (the whole prefix
recomputed at every scale: the test oracle). Writes DIR/bench_sample.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import JsonReport, add_smoke_flag, time_ms  # noqa: E402

from sar_fast.models import build_model  # noqa: E402
from sar_fast.models.generate import generate  # noqa: E402
from sar_fast.rng import image_uniforms  # noqa: E402
from sar_fast.schedules import STANDARD_SCHEDULE  # noqa: E402

TINY_SCHEDULE = (1, 2, 3, 4, 6, 8)


def cases(gpu: bool) -> dict[str, dict]:
    low = torch.bfloat16 if gpu else None
    return {
        "eval: cfg + kv + per-image seeds": dict(cfg=2.5, use_cache=True, dtype=low, per_image=True),
        "cfg + kv, one generator": dict(cfg=2.5, use_cache=True, dtype=low, per_image=False),
        "no cfg + kv": dict(cfg=0.0, use_cache=True, dtype=low, per_image=False),
        **({"cfg + kv, fp32": dict(cfg=2.5, use_cache=True, dtype=None, per_image=False)} if gpu else {}),
        "cfg, no kv cache": dict(cfg=2.5, use_cache=False, dtype=low, per_image=False),
    }


def run_case(model, codebook, labels, schedule, case, device) -> None:
    uniforms = None
    if case["per_image"]:
        tokens = sum(s * s for s in schedule)
        uniforms = torch.stack([image_uniforms(0, int(c), i, tokens) for i, c in enumerate(labels.tolist())])
    with torch.autocast(device.type, dtype=case["dtype"] or torch.float32, enabled=case["dtype"] is not None):
        generate(model, codebook, labels, schedule, cfg=case["cfg"], cfg_ramp="flexvar" if case["cfg"] else "linear",
                 top_k=900 if model.vocab_size > 900 else 0, top_p=0.95, use_cache=case["use_cache"],
                 uniforms=uniforms, seed=None if case["per_image"] else 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    add_smoke_flag(ap)
    ap.add_argument("--model", default="flexvar-d16")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    gpu = torch.cuda.is_available() and not args.smoke
    if not gpu and not args.smoke:
        print("bench_sample: no CUDA device; run with --smoke for the CPU numbers")
        return
    device = torch.device("cuda" if gpu else "cpu")
    if gpu:
        model, schedule = build_model(args.model), STANDARD_SCHEDULE
        batch, reps = args.batch or 64, args.reps or 3
    else:
        model = build_model("flexvar-tiny", depth=3, embed_dim=96, num_heads=4, vocab_size=17, code_dim=1,
                            schedule=TINY_SCHEDULE)
        schedule, batch, reps = TINY_SCHEDULE, args.batch or 64, args.reps or 2
    model.to(device).eval()
    codebook = F.normalize(torch.randn(model.vocab_size, model.code_dim, device=device), dim=-1)
    labels = torch.arange(batch, device=device) % model.num_classes
    report = JsonReport(os.path.join(args.out, "bench_sample.json"),
                        device=torch.cuda.get_device_name() if gpu else "cpu", model=args.model if gpu else "tiny",
                        schedule=list(schedule), batch=batch, cases={})
    results = report.doc
    peers = {name: (lambda case=case: run_case(model, codebook, labels, schedule, case, device))
             for name, case in cases(gpu).items()}
    times = time_ms(peers, device.type, repeats=reps, warmup=1)  # interleaved, after a warm-up round
    for name, ms in times.items():
        seconds = statistics.median(ms) / 1e3
        results["cases"][name] = {"images_per_s": batch / seconds, "ms_per_batch": 1e3 * seconds}
    base = results["cases"]["cfg + kv, one generator"]["images_per_s"]
    for row in results["cases"].values():
        row["vs_cfg_kv"] = row["images_per_s"] / base
    report.close()  # the cases are timed interleaved: they all end together
    width = max(map(len, results["cases"]))
    print(f"{results['device']}, {results['model']}, batch {batch}, schedule {list(schedule)}")
    for name, row in results["cases"].items():
        print(f"  {name:<{width}}  {row['images_per_s']:9.1f} img/s  ({row['vs_cfg_kv']:.2f}x)")


if __name__ == "__main__":
    main()
