#!/usr/bin/env python
"""Modeled work of the ops, computed on the CPU: what a GPU measurement is compared with.

    python bench/modeled_work.py [--out DIR]

For the real schedules (256 / 512 / 1024 px; and Infinity's padded 1024 px layouts, 1:1 and
2:1) it reports:
  - the scale-causal mask's visible fraction of the L x L scores;
  - the fraction of the dense QK^T / PV work the attention kernels visit, per tile shape
    kept in their autotune lists: the tile ranges come from the kernels' own jit code
    (kernels/attention.py: tile_runs -> _query_tile_runs / _key_tile_runs -> _tile_runs,
    run here under Triton's interpreter), not from a re-derivation;
  - the same for FlexAttention's 128 x 128 block mask (a block is visited when any of its
    pairs is visible) and for dense SDPA (everything);
  - for every op, its minimal FLOPs and bytes at d16 widths (B 2, C 1024, 16 heads of 64,
    V 8912, codebook dim 32) and the roofline time max(FLOPs / peak, bytes / bandwidth) on
    A100, H100 and H200 (vendor data-sheet peaks, cited in PEAKS).
Writes DIR/modeled_work.json and DIR/modeled_work.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

# the tile ranges come from the kernels' jit code, run on CPU tensors by the interpreter
os.environ["TRITON_INTERPRET"] = "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from sar_fast.schedules import STANDARD_SCHEDULE  # noqa: E402

SCHEDULES = {
    680: STANDARD_SCHEDULE,
    2240: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
    9451: (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64),
}
# Infinity (FoundationVision/Infinity infinity/utils/dynamic_resolution.py, '1M' = 1024 px, 13
# scales; t = 1 for images) and scripts/train.sh's --pad=128 (pad_to_multiplier)
INFINITY_1024 = {
    "1:1": [(1, h, w) for h, w in ((1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16), (20, 20), (24, 24),
                                   (32, 32), (40, 40), (48, 48), (64, 64))],
    "2:1": [(1, h, w) for h, w in ((1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11), (30, 15), (38, 19),
                                   (46, 23), (60, 30), (74, 37), (90, 45))],
}
INFINITY_PAD_TO = 128
WIDTHS = dict(batch=2, channels=1024, heads=16, head_dim=64, vocab=8912, codebook_dim=32, itemsize=2)
# Dense bf16 tensor-core peak and HBM bandwidth, from the vendors' data sheets.
PEAKS = {
    "A100 SXM": dict(tflops=312, tbps=2.039, source="NVIDIA A100 Tensor Core GPU data sheet (80GB SXM): "
                                                      "BF16 312 TFLOPS dense, 2,039 GB/s"),
    "H100 SXM": dict(tflops=989, tbps=3.35, source="NVIDIA H100 Tensor Core GPU data sheet (SXM): "
                                                     "BF16 1,979 TFLOPS with sparsity = 989 dense, 3.35 TB/s"),
    "H200 SXM": dict(tflops=989, tbps=4.8, source="NVIDIA H200 Tensor Core GPU data sheet (SXM): "
                                                    "BF16 1,979 TFLOPS with sparsity = 989 dense, 4.8 TB/s"),
}
FLEX_BLOCK = 128


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def scale_lens(schedule) -> list[int]:
    """Tokens per scale: sides s (VAR / FlexVAR, s * s) or Infinity's (t, h, w) boxes."""
    return [n[0] * n[1] * n[2] if isinstance(n, (tuple, list)) else n * n for n in schedule]


def visible_pairs(schedule) -> int:
    """Pairs (query, key) the block-causal mask leaves visible (no window)."""
    total, seen = 0, 0
    for n in scale_lens(schedule):
        seen += n
        total += n * seen
    return total


def kernel_tile_area(schedule, block_m: int, block_n: int, query_side: bool) -> tuple[int, int]:
    """(score elements computed, of which in masked tiles) by the kernel walking the runs of
    kernels.attention.tile_runs: tiles x BLOCK_M x BLOCK_N, padding included."""
    from sar_fast.kernels import attention
    lens = scale_lens(schedule)
    runs = attention.tile_runs(lens, len(lens), block_m, block_n, query_side).tolist()
    step = block_n if query_side else block_m
    area, masked = 0, 0
    for lo, full_lo, full_hi, hi in runs:
        n_masked = _cdiv(max(full_lo - lo, 0), step) + _cdiv(max(hi - full_hi, 0), step)
        n_full = _cdiv(max(full_hi - full_lo, 0), step)
        area += (n_masked + n_full) * block_m * block_n
        masked += n_masked * block_m * block_n
    return area, masked


def flex_block_area(schedule, block: int = FLEX_BLOCK) -> int:
    """Score elements FlexAttention computes: every block x block tile with a visible pair."""
    import torch
    lens = torch.tensor(scale_lens(schedule))
    sid = torch.repeat_interleave(torch.arange(len(schedule)), lens)
    L = int(lens.sum())
    tiles = _cdiv(L, block)
    pad = torch.full((tiles * block,), len(schedule) + 1)
    pad[:L] = sid
    first = pad.view(tiles, block).min(1).values  # tiles are contiguous in scale id
    q_last = torch.where(torch.arange(tiles * block) < L, pad, -1).view(tiles, block).max(1).values
    # block (i, j) has a visible pair iff some key scale in j <= some query scale in i
    return int((first[None, :] <= q_last[:, None]).sum()) * block * block


def kept_tiles() -> dict[str, dict[tuple[int, int], list[int]]]:
    """(BLOCK_M, BLOCK_N) -> archs whose autotune list keeps it, per attention kernel."""
    from sar_fast.kernels import attention, attention_backward
    out = {}
    for kernel, lists in (("forward", attention.FWD_CONFIGS), ("dK/dV", attention_backward.DKDV_CONFIGS),
                          ("dQ", attention_backward.DQ_CONFIGS)):
        tiles: dict[tuple[int, int], list[int]] = {}
        for arch, configs in lists.items():
            for m, n, *_ in configs:
                tiles.setdefault((m, n), [])
                if arch not in tiles[(m, n)]:
                    tiles[(m, n)].append(arch)
        out[kernel] = dict(sorted(tiles.items()))
    return out


def attention_work() -> list[dict]:
    rows = []
    for L, schedule in SCHEDULES.items():
        dense = L * L
        row = dict(L=L, schedule=schedule, visible=visible_pairs(schedule) / dense,
                   flex_128=flex_block_area(schedule) / dense, sdpa=1.0, kernels={})
        for kernel, tiles in kept_tiles().items():
            row["kernels"][kernel] = []
            for (m, n), archs in tiles.items():
                area, masked = kernel_tile_area(schedule, m, n, query_side=(kernel != "dK/dV"))
                row["kernels"][kernel].append(dict(block_m=m, block_n=n, archs=archs, visited=area / dense,
                                                   masked_share=masked / area))
        rows.append(row)
    return rows


def infinity_work() -> list[dict]:
    """Infinity's padded 1024 px layouts. Fractions of the padded L_p x L_p. FlexAttention: its
    mask (same_doc | causal, the padded tail one more document) is the block-causal mask with
    the tail as one more scale. The kernels walk the real rows only (sar_fast handles the tail
    outside them, one key per row); SDPA with Infinity's dense bias: everything."""
    rows = []
    for ratio, boxes in INFINITY_1024.items():
        L = sum(scale_lens(boxes))
        padded = _cdiv(L, INFINITY_PAD_TO) * INFINITY_PAD_TO
        tail = [(1, 1, padded - L)] if padded > L else []
        dense = padded * padded
        row = dict(ratio=ratio, L=L, padded_L=padded, scales=len(boxes), visible=visible_pairs(boxes) / dense,
                   flex_128=flex_block_area(boxes + tail) / dense, sdpa=1.0, kernels={})
        for kernel, tiles in kept_tiles().items():
            row["kernels"][kernel] = [
                dict(block_m=m, block_n=n, archs=archs,
                     visited=kernel_tile_area(boxes, m, n, query_side=(kernel != "dK/dV"))[0] / dense)
                for (m, n), archs in tiles.items()]
        rows.append(row)
    return rows


def infinity_markdown(rows: list[dict]) -> list[str]:
    lines = ["", f"## Infinity 1024 px (pad_to_multiplier {INFINITY_PAD_TO}): fraction of the padded L_p x L_p",
             "", "| h:w | scales | L | L_p | mask visible | FlexAttention 128x128 | SDPA | kernel: fewest / most "
             "visited over the kept tiles |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        spans = "; ".join(f"{k} {min(e['visited'] for e in v):.3f}-{max(e['visited'] for e in v):.3f}"
                          for k, v in r["kernels"].items())
        lines.append(f"| {r['ratio']} | {r['scales']} | {r['L']} | {r['padded_L']} | {r['visible']:.3f} | "
                     f"{r['flex_128']:.3f} | {r['sdpa']:.0f} | {spans} |")
    return lines


def op_costs(L: int, schedule, visible_fraction: float) -> list[dict]:
    """Minimal FLOPs and bytes per op (each tensor read or written once, nothing recomputed)."""
    w = WIDTHS
    B, C, H, D = w["batch"], w["channels"], w["heads"], w["head_dim"]
    V, E, s = w["vocab"], w["codebook_dim"], w["itemsize"]
    N = B * L
    pairs = visible_fraction * L * L
    bhld = B * H * L * D * s
    out_rows = L - schedule[0] ** 2  # teacher-forcing rows: every scale but the first
    return [
        dict(op="attention fwd", flops=4 * B * H * pairs * D, bytes=4 * bhld + B * H * L * 4,
             note="QK^T + PV over visible pairs; read q,k,v, write o + lse"),
        dict(op="attention bwd", flops=8 * B * H * pairs * D, bytes=8 * bhld + B * H * L * 4,
             note="dV, dP, dQ, dK over visible pairs; read q,k,v,o,dO + lse, write dq,dk,dv"),
        dict(op="linear CE fwd", flops=2 * N * V * C, bytes=(N * C + V * C + V) * s + N * (8 + 3 * 4),
             note="logits GEMM; read hidden, weight, bias, target; write ce, lse, argmax"),
        dict(op="linear CE bwd", flops=4 * N * V * C, bytes=2 * (N * C + V * C) * s + N * 8,
             note="dH = G W, dW = G^T H; read hidden, weight; write dH, dW"),
        dict(op="linear KL fwd (teacher hidden)", flops=4 * N * V * C, bytes=(2 * N * C + V * C + V) * s + N * 12,
             note="student and teacher logits GEMMs"),
        dict(op="linear KL fwd (teacher logits)", flops=2 * N * V * C, bytes=(N * C + V * C + V + N * V) * s + N * 12,
             note="student logits GEMM; read the teacher's [N, V] logits"),
        dict(op="scale shift fwd (codes, TF)", flops=2 * 20 * B * out_rows * E,
             bytes=B * L * 8 + B * out_rows * E * s + 4096 * E * s,
             note="16-tap bicubic per output element; read codes (+ codebook), write [B, L-1, Cvae]"),
    ]


def roofline(costs: list[dict]) -> list[dict]:
    for c in costs:
        c["time_us"] = {}
        for gpu, p in PEAKS.items():
            compute = c["flops"] / (p["tflops"] * 1e12)
            memory = c["bytes"] / (p["tbps"] * 1e12)
            c["time_us"][gpu] = dict(us=max(compute, memory) * 1e6, bound="compute" if compute >= memory else "memory")
    return costs


def markdown(work: list[dict], costs: dict, infinity: list[dict]) -> str:
    lines = ["# Modeled work", "",
             "## Attention: fraction of the dense L x L score work visited", "",
             "Visited = score elements in the tiles a kernel walks (padding included) / L^2; masked = "
             "share of those in tiles that evaluate the mask. Tile ranges from kernels/attention.py "
             "(tile_runs, the kernels' own jit arithmetic). FlexAttention: 128 x 128 blocks with any "
             "visible pair. SDPA with a mask: everything.", "",
             "| L | mask visible | FlexAttention 128x128 | SDPA | kernel | BLOCK_M x BLOCK_N (archs) | visited "
             "| masked |",
             "|---|---|---|---|---|---|---|---|"]
    for row in work:
        head = f"| {row['L']} | {row['visible']:.3f} | {row['flex_128']:.3f} | {row['sdpa']:.0f} "
        for kernel, entries in row["kernels"].items():
            for e in entries:
                archs = ",".join(f"sm_{a}" for a in e["archs"])
                lines.append(f"{head}| {kernel} | {e['block_m']}x{e['block_n']} ({archs}) | {e['visited']:.3f} | "
                             f"{e['masked_share']:.2f} |")
                head = "| | | | "
    lines += infinity_markdown(infinity)
    lines += ["", "## Minimal FLOPs and bytes per op, roofline time (d16 widths: B 2, C 1024, 16 heads x 64, "
              "V 8912, Cvae 32, bf16)", "",
              "| L | op | GFLOP | MB | " + " | ".join(f"{g} us" for g in PEAKS) + " | note |",
              "|---|---|---|---|" + "---|" * len(PEAKS) + "---|"]
    for L, rows in costs.items():
        for c in rows:
            times = " | ".join(f"{c['time_us'][g]['us']:.1f} ({c['time_us'][g]['bound'][0]})" for g in PEAKS)
            lines.append(f"| {L} | {c['op']} | {c['flops'] / 1e9:.3g} | {c['bytes'] / 1e6:.3g} | {times} "
                         f"| {c['note']} |")
    lines += ["", "(c) compute-bound, (m) memory-bound. Peaks (bf16 dense tensor core, HBM):"]
    lines += [f"- {g}: {p['source']}" for g, p in PEAKS.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/modeled_work", help="output folder")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    work = attention_work()
    costs = {row["L"]: roofline(op_costs(row["L"], row["schedule"], row["visible"])) for row in work}
    infinity = infinity_work()
    with open(os.path.join(args.out, "modeled_work.json"), "w") as f:
        json.dump({"widths": WIDTHS, "peaks": PEAKS, "attention": work, "infinity_attention": infinity,
                   "ops": costs}, f, indent=1)
    text = markdown(work, costs, infinity)
    with open(os.path.join(args.out, "modeled_work.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
