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
    """A progress bar on stderr (the trainer's steps, the cache's images): tqdm when
    installed, else a line with count, rate and ETA every few seconds and at the end."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, desc: str = "train", unit: str = "it"):
        self.enabled, self.total, self.n, self.desc, self.unit = enabled, total, initial, desc, unit
        self._bar, self._last, self._n0, self._t0 = None, 0.0, initial, time.monotonic()
        if enabled:
            try:
                from tqdm import tqdm
                self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True,
                                 file=sys.stderr)
            except ImportError:
                pass

    def update(self, n: int = 1, **postfix) -> None:
        self.n += n
        if not self.enabled:
            return
        text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in postfix.items())
        now = time.monotonic()
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)
            self._bar.update(n)
        elif now - self._last >= 5.0 or self.n >= self.total:
            self._last = now
            rate = (self.n - self._n0) / max(now - self._t0, 1e-9)
            eta = (self.total - self.n) / rate if rate > 0 else float("inf")
            print(f"{self.desc}: {self.n}/{self.total} {self.unit}, {rate:.1f} {self.unit}/s, ETA {eta:.0f}s {text}"
                  .rstrip(), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def flops_per_token(depth: int, dim: int, vocab: int, mlp_ratio: float, mean_context: float) -> float:
    """Forward FLOPs per token: 2 x (qkv + proj + MLP + AdaLN matmuls) per block, attention
    scores and values against `mean_context` visible keys, and the head."""
    per_block = 2 * (3 * dim * dim + dim * dim + 2 * mlp_ratio * dim * dim + 6 * dim * dim) + 4 * mean_context * dim
    return depth * per_block + 2 * dim * vocab


def mean_visible_keys(schedule) -> float:
    """Average number of keys a token sees under the block-causal mask (scale sides)."""
    return mean_visible_keys_of_lengths([s * s for s in schedule])


def mean_visible_keys_of_lengths(scale_lens) -> float:
    """The same for scales given by their token counts."""
    total, seen, acc = 0, 0, 0
    for n in scale_lens:
        seen += n
        acc += n * seen
        total += n
    return acc / max(total, 1)


class PassFlops:
    """Model FLOPs of the passes a step really ran (TF, null-class prefix, student, ...),
    counted from the tokens entering the first block: each call adds the forward FLOPs of
    its B x L tokens, three times that when it builds a graph (forward + backward).
    Recomputations of activation checkpointing (calls inside the backward) and calls while
    not `enabled` (sampling) are not counted."""

    def __init__(self, first_block: torch.nn.Module, model_config):
        self.config, self.enabled = model_config, False
        self.flops, self.tokens = 0.0, 0
        first_block.register_forward_pre_hook(self._count)

    def _count(self, module, args) -> None:
        if not self.enabled or torch._C._current_graph_task_id() != -1:
            return
        x, layout = args[0], args[2] if len(args) > 2 else None
        B, L = x.shape[0], x.shape[1]
        c = self.config
        off = getattr(layout, "off", None)  # an ops.ScaleLayout: scale offsets [n + 1] on the device
        if off is not None:  # kept a tensor (no host sync); read on logged steps only
            off = off.double()
            keys = ((off[1:] - off[:-1]) * off[1:]).sum() / off[-1].clamp(min=1)
        else:
            keys = mean_visible_keys_of_lengths(layout if layout else (L,))
        passes = 3.0 if torch.is_grad_enabled() else 1.0
        self.flops += passes * flops_per_token(c.depth, c.embed_dim, c.vocab_size, c.mlp_ratio, keys) * B * L
        self.tokens += B * L

    def take(self) -> tuple[float | torch.Tensor, int]:
        """(FLOPs, tokens) since the last take; the FLOPs may be a device scalar (Throughput
        converts it when it is read, on a logged step)."""
        out, self.flops, self.tokens = (self.flops, self.tokens), 0.0, 0
        return out


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


class Throughput:
    """Images, tokens and model FLOPs trained since the last read, as rates over all ranks,
    and the MFU they make (None where the GPU's peak is unknown)."""

    def __init__(self, model_config, device: torch.device, world_size: int):
        self.config, self.peak, self.world_size = model_config, peak_flops(device), world_size
        self.reset()

    def reset(self) -> None:
        self.start, self.images, self.tokens, self.flops = time.time(), 0, 0, 0.0

    def add(self, images: int, flops: float, tokens: int) -> None:
        """One step of this rank: its images, and the FLOPs and tokens of all its passes
        (PassFlops.take())."""
        self.flops += flops
        self.tokens += tokens
        self.images += images

    def read(self) -> dict:
        dt = max(time.time() - self.start, 1e-9)
        rates = {"img_per_s": self.images * self.world_size / dt, "tokens_per_s": self.tokens * self.world_size / dt,
                 "mfu": (float(self.flops) / dt / self.peak) if self.peak else None}
        self.reset()
        return rates


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


def nvml_handle(nvml, device: torch.device):
    """The NVML handle of a CUDA device. NVML numbers all GPUs of the machine and ignores
    CUDA_VISIBLE_DEVICES, so the local CUDA index is matched by UUID (else PCI bus id)."""
    props = torch.cuda.get_device_properties(device.index or 0)
    uuid = getattr(props, "uuid", None)
    if uuid is not None:
        text = str(uuid)
        try:
            return nvml.nvmlDeviceGetHandleByUUID(text if text.startswith(("GPU-", "MIG-")) else "GPU-" + text)
        except Exception:
            pass
    bus = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
    return nvml.nvmlDeviceGetHandleByPciBusId(bus)


class GpuMonitor:
    """Peak memory on a CUDA device; utilisation and memory in use through NVML
    (nvidia-ml-py), when present. Nothing on a CPU."""

    def __init__(self, device: torch.device):
        self.device, self.handle = device, None
        if device.type != "cuda":
            return
        try:
            import pynvml
            pynvml.nvmlInit()
            self._nvml = pynvml
            self.handle = nvml_handle(pynvml, device)
        except Exception:
            self.handle = None

    def read(self) -> dict:
        if self.device.type != "cuda":
            return {}
        record = {"peak_mem_gb": torch.cuda.max_memory_allocated(self.device) / 2**30}
        if self.handle is None:
            return record
        try:
            util = self._nvml.nvmlDeviceGetUtilizationRates(self.handle)
            mem = self._nvml.nvmlDeviceGetMemoryInfo(self.handle)
            record.update(gpu_util=float(util.gpu), gpu_mem_used_gb=mem.used / 2**30)
        except Exception:
            pass
        return record
