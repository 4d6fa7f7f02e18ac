"""Run outputs: progress bar, JSONL metrics, throughput/MFU, loss-curve and sample-grid PNGs."""
from __future__ import annotations

import json
import math
import os
import struct
import sys
import time
import zlib

import numpy as np
import torch

# ------------------------------------------------------------------ images
def write_png(path: str, rgb: np.ndarray) -> None:
    """Write an RGB uint8 array [H, W, 3] as a PNG (no imaging library needed)."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"write_png needs uint8 [H, W, 3], got {rgb.dtype} {rgb.shape}")
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))  # filter type 0 per row

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) \
        + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(png)
    os.replace(tmp, path)


def image_grid(images: torch.Tensor, nrow: int = 8, pad: int = 2, min_side: int = 64) -> np.ndarray:
    """[N, 3, H, W] in [0, 1] -> uint8 [H', W', 3] grid; small images are upscaled (nearest)."""
    imgs = images.detach().float().clamp(0, 1).cpu()
    n, _, h, w = imgs.shape
    scale = max(1, math.ceil(min_side / max(h, w)))
    if scale > 1:
        imgs = imgs.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
        h, w = h * scale, w * scale
    nrow = max(1, min(nrow, n))
    rows = math.ceil(n / nrow)
    grid = torch.ones(3, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = imgs[i]
    return (grid.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


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
    tmp = f"{png_path}.tmp{os.getpid()}.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png_path)
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


class Progress:
    """Rank-0 progress bar: tqdm when installed, else a plain line every few seconds."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, desc: str = "train"):
        self.enabled, self.total, self.n = enabled, total, initial
        self._bar, self._last, self._t0 = None, 0.0, time.time()
        if enabled:
            try:
                from tqdm import tqdm
                self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                pass

    def update(self, n: int = 1, **postfix) -> None:
        self.n += n
        if not self.enabled:
            return
        text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in postfix.items())
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)
            self._bar.update(n)
        elif time.time() - self._last > 5 or self.n >= self.total:
            self._last = time.time()
            print(f"[{self.n}/{self.total}] {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def flops_per_token(depth: int, dim: int, vocab: int, mlp_ratio: float, mean_context: float) -> float:
    """Forward FLOPs per token: 2 x (qkv + proj + MLP + AdaLN matmuls) per block, attention
    scores and values against `mean_context` visible keys, and the head."""
    per_block = 2 * (3 * dim * dim + dim * dim + 2 * mlp_ratio * dim * dim + 6 * dim * dim) + 4 * mean_context * dim
    return depth * per_block + 2 * dim * vocab


def mean_visible_keys(schedule) -> float:
    """Average number of keys a token sees under the block-causal mask."""
    total, seen, acc = 0, 0, 0
    for s in schedule:
        seen += s * s
        acc += s * s * seen
        total += s * s
    return acc / total


_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of the GPU (None on CPU or an unknown GPU): the MFU denominator."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in _PEAK_BF16.items():
        if key in name:
            return value
    return None


class GpuMonitor:
    """GPU memory and utilisation through NVML (nvidia-ml-py), when present."""

    def __init__(self, device: torch.device):
        self.handle = None
        if device.type != "cuda":
            return
        try:
            import pynvml
            pynvml.nvmlInit()
            self._nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        except Exception:
            self.handle = None

    def read(self) -> dict:
        if self.handle is None:
            return {}
        try:
            util = self._nvml.nvmlDeviceGetUtilizationRates(self.handle)
            mem = self._nvml.nvmlDeviceGetMemoryInfo(self.handle)
            return {"gpu_util": float(util.gpu), "gpu_mem_used_gb": mem.used / 2**30}
        except Exception:
            return {}
