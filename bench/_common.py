"""What the op benchmarks share: choosing the device and dtype (GPU, or a tiny CPU smoke run
under Triton's interpreter) and grouped bar charts."""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start(name: str, out: str, cpu_smoke: bool, dtype_name: str):
    """(torch, device, dtype) for a bench run, or None when there is nothing to measure here.

    --cpu-smoke runs on the CPU under Triton's interpreter (set before triton is imported),
    in fp32 since the interpreter has no bf16.
    """
    os.makedirs(out, exist_ok=True)
    if cpu_smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    if not torch.cuda.is_available() and not cpu_smoke:
        print(f"{name}: no CUDA device here; nothing measured (use --cpu-smoke for a tiny interpreter run)")
        return None
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    device = "cuda" if torch.cuda.is_available() and not cpu_smoke else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    return torch, device, (torch.float32 if device == "cpu" else dtype)


def bar_panels(path: str, results: list[dict], case_key: str, cases: list[str], peers: list[str],
               panels: list[tuple[str, str, str]], grid: tuple[int, int] | None = None) -> bool:
    """Write the chart to `path`; False (nothing written) when matplotlib is missing.

    results: dicts with `case_key`, 'peer', 'mode' and the metrics named in `panels`
    ((mode, metric, title) each); a missing value draws as 0.
    """
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
