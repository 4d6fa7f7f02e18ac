"""Files the package writes: atomic replacement (no reader ever sees half a file) and PNG
images without an imaging library."""
from __future__ import annotations

import math
import os
import struct
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
