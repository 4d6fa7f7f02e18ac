"""Run outputs: the JSONL metrics, one record per logged step, and the loss-curve PNG."""
from __future__ import annotations

import json

import torch

from .. import files


def plot_losses(jsonl_path: str, png_path: str) -> bool:
    """Loss curves (total, TF, CSF) from the metrics log; False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    series: dict[str, tuple[list, list]] = {}
    with open(jsonl_path) as f:
        for line in f:
            rec = json.loads(line)
            for key in ("loss", "tf_loss", "csf_loss", "sf_loss"):
                if rec.get(key) is not None:
                    xs, ys = series.setdefault(key, ([], []))
                    xs.append(rec["step"])
                    ys.append(rec[key])
    if not series:
        return False
    fig, axes = plt.subplots(1, 2 if "csf_loss" in series else 1, figsize=(11 if "csf_loss" in series else 6, 4),
                             squeeze=False)
    for key, (xs, ys) in series.items():
        ax = axes[0][1] if key == "csf_loss" else axes[0][0]
        ax.plot(xs, ys, label=key, linewidth=1)
    for ax in axes[0]:
        ax.set_xlabel("step")
        ax.set_ylabel("nats / token")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with files.atomic_write(png_path) as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return True


# ------------------------------------------------------------------ metrics
class JsonlLogger:
    def __init__(self, path: str):
        self.path = path
        self._f = open(path, "a", buffering=1)

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._f.close()


def step_record(step: int, objective: str, losses: torch.Tensor, grad_norm: torch.Tensor, lr: float,
                rates: dict, nonfinite_total: int, schedule, scale_totals: torch.Tensor | None,
                skipped_images: int = 0) -> dict:
    """One line of metrics.jsonl. losses [3]: total, TF (or SF), CSF; scale_totals [n, 3]:
    per scale the CE sum, correct argmaxes and tokens over all ranks."""
    record = {"step": step, "objective": objective, "loss": float(losses[0]), "tf_loss": float(losses[1]),
              "csf_loss": float(losses[2]) if objective in ("sar", "official") else None,
              "grad_norm": float(grad_norm), "lr": lr, **rates, "nonfinite_total": nonfinite_total,
              "schedule": list(schedule), "skipped_images": skipped_images}
    if scale_totals is not None:
        for s, (ce, correct, count) in zip(schedule, scale_totals.tolist()):
            record[f"loss_s{s}"] = ce / max(count, 1)
            record[f"acc_s{s}"] = correct / max(count, 1)
    return record


