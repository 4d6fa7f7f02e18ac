"""SSR's draw (guidance mixing, top-k, top-p, inverse-CDF draw), peers in one run.

    python bench/bench_sample_survivors.py --out DIR           # CUDA if available, else the CPU shape
    python bench/bench_sample_survivors.py --out DIR --cpu     # the CPU shape of issue 17
    python bench/bench_sample_survivors.py --out DIR --smoke   # tiny, seconds

Shapes: CPU, the SAR step of bench_train_step.py --cpu (batch 8 x 169 tokens of the last
scale = 1352 rows, V 4096); GPU, flexvar-d16 at batch 32 (32 x 256 = 8192 rows, V 8912).
Both: conditional and null-class logits mixed with SAR's guidance, top-k 900, top-p 0.96.
Peers:
- fused:    sar_fast.ops.sample_survivors under backend 'kernel' (the C++ op; CPU only);
- survivors: sar_fast.sampling.sample_survivors (torch: one topk over V, the rest over k;
            what CUDA runs and what CPU ran before the fused op);
- official: the public code's draw (mix, filter over the whole sorted vocabulary, softmax
            and multinomial over V: sampling.sample_top_k_top_p), which `official` keeps.
Threads: the process's torch threads (all cores unless --threads). Writes DIR/bench_sample_survivors.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import JsonReport, add_smoke_flag, time_ms  # noqa: E402

from sar_fast import _C_loader, ops  # noqa: E402
from sar_fast.rng import sample_keyed_uniform  # noqa: E402
from sar_fast.sampling import guidance_weight, sample_survivors, sample_top_k_top_p  # noqa: E402

GUIDANCE = guidance_weight("sar", 1.5, 9, 10)  # SAR's ramp at the last of 10 scales, cfg 1.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--cpu", action="store_true", help="the CPU shape even where CUDA is available")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 10, smoke 2)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads on the CPU (default: torch's)")
    add_smoke_flag(ap)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = torch.cuda.is_available() and not (args.cpu or args.smoke)
    device = "cuda" if gpu else "cpu"
    rows, V, label = ((64, 257, "smoke: 64 rows, V 257") if args.smoke else
                      (8192, 8912, "flexvar-d16, batch 32, last scale") if gpu else
                      (1352, 4096, "CPU SAR step: batch 8 x 169, V 4096"))
    top_k, top_p = min(900, V - 1), 0.96
    repeats = args.repeats or (2 if args.smoke else 10)
    dtype = torch.bfloat16 if gpu else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    cond = (torch.randn(rows, V, generator=g, device=device) * 3).to(dtype)
    uncond = (torch.randn(rows, V, generator=g, device=device) * 3).to(dtype)
    u = sample_keyed_uniform(1, 0, 1, slice(0, rows), device=device)
    gen = torch.Generator(device=device).manual_seed(1)

    def official():
        mixed = (1 + GUIDANCE) * cond.float() - GUIDANCE * uncond.float()
        return sample_top_k_top_p(mixed, top_k, top_p, gen)

    peers = {
        "survivors": lambda: sample_survivors(cond, top_k, top_p, uniforms=u, uncond=uncond, guidance=GUIDANCE),
        "official": official,
    }
    if not gpu and _C_loader.has_extension():
        def fused():
            with ops.use_backend("kernel"):
                return ops.sample_survivors(cond, top_k, top_p, u, uncond=uncond, guidance=GUIDANCE)
        peers = {"fused": fused, **peers}
        agree = float((fused() == peers["survivors"]()).float().mean())
    else:
        agree = None
    report = JsonReport(os.path.join(args.out, "bench_sample_survivors.json"), shape=label, device=device,
                        rows=rows, vocab=V, top_k=top_k, top_p=top_p)
    times = time_ms(peers, device, repeats)  # the peers interleaved: they all end together
    median = {name: statistics.median(t) for name, t in times.items()}
    result = {"shape": label, "device": device, "rows": rows, "vocab": V, "top_k": top_k, "top_p": top_p,
              "threads": torch.get_num_threads(), "repeats": repeats, "median_ms": median,
              "min_ms": {name: min(t) for name, t in times.items()},
              "us_per_row": {name: 1e3 * m / rows for name, m in median.items()},
              "fused_equals_survivors": agree}
    print(f"{label} ({device}, {result['threads']} threads, top-k {top_k}, top-p {top_p}):")
    for name, m in median.items():
        print(f"  {name:10s} {m:9.2f} ms  ({1e3 * m / rows:6.1f} us/row, {median['official'] / m:5.2f}x official)")
    if agree is not None:
        print(f"  fused == survivors on {100 * agree:.2f}% of rows (same uniforms)")
    report.close(**result)


if __name__ == "__main__":
    main()
