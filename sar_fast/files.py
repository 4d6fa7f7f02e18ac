"""Files the package writes: atomic replacement (no reader ever sees half a file) and PNG
images without an imaging library."""
from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import struct
import zlib
from typing import IO, Any, Iterator

import numpy as np
import torch


# ------------------------------------------------------------------ atomic replacement
def fsync_dir(path: str) -> None:
    """Flush a folder's entries to disk, so that a rename inside it survives a crash; a file
    system that cannot sync a folder (some network mounts) is left as it is."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[str]:
    """A temporary file name beside `path` for a writer that takes a name (savefig,
    safetensors). On a clean exit the file is flushed to disk and renamed over `path` (a
    reader sees the old file or the whole new one, never part of it) and the folder is
    synced; on an error the temporary file is removed and `path` is left as it was.

    The name is unique per call (the process id and a random tag), so concurrent writers of
    one path never share a temporary file; `suffix` ends it, for writers that pick a format
    from the extension."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}.{secrets.token_hex(4)}{suffix}"
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **open_kwargs) -> Iterator[IO]:
    """A file object that replaces `path` whole when the block exits cleanly (see
    atomic_path); an error inside the block leaves `path` untouched. `mode`: "w" or "wb"."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode, **open_kwargs) as f:
        yield f


def write_json_atomic(path: str | os.PathLike, obj: Any, **dump_kwargs) -> None:
    """json.dump(obj) (indent 1 unless given) replacing `path` whole."""
    with atomic_write(path, "w") as f:
        json.dump(obj, f, **{"indent": 1, **dump_kwargs})


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
    with atomic_write(path) as f:
        f.write(png)


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
