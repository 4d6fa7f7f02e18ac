"""What a kernel launch on a GPU needs besides the kernel: the CUDA device guard and the
deterministic mode.

Deterministic mode (`set_deterministic(True)`, `SAR_FAST_DETERMINISTIC=1`, or
`torch.use_deterministic_algorithms(True)`): every autotuned Triton kernel launches the first
config its list admits for the GPU, dtype and head dim instead of the autotuner's fastest
(timing noise picks the winner, and winners differ in summation order), and the fused CE/KL
split the vocabulary by V alone (not by the local row count and the SM count). Two ranks or two
runs then compute every row in the same order: bit-identical results at a fixed batch size,
at the cost of the autotuner's pick (the first entry of each list is a good default, not
always the fastest).
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

_ENV = "SAR_FAST_DETERMINISTIC"
_override: bool | None = None


def set_deterministic(flag: bool | None) -> None:
    """Force deterministic mode on or off; None goes back to $SAR_FAST_DETERMINISTIC and
    torch.are_deterministic_algorithms_enabled()."""
    global _override
    if flag is not None and not isinstance(flag, bool):
        raise TypeError(f"set_deterministic takes True, False or None, got {flag!r}")
    _override = flag


def is_deterministic() -> bool:
    if _override is not None:
        return _override
    env = os.environ.get(_ENV, "").strip().lower()
    if env not in ("", "0", "1", "true", "false", "yes", "no"):
        raise ValueError(f"${_ENV} must be 0 or 1, got {env!r}")
    return env in ("1", "true", "yes") or torch.are_deterministic_algorithms_enabled()


@contextlib.contextmanager
# deliberate repeat: of ops.backend.use_backend's shape: two independent switches, each with its own state
def use_deterministic(flag: bool) -> Iterator[None]:
    """Temporarily force deterministic mode on or off (tests, evaluation)."""
    global _override
    previous = _override
    set_deterministic(flag)
    try:
        yield
    finally:
        _override = previous


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make t's GPU the current one while a kernel launches: Triton launches on the current
    device, so tensors on cuda:1 with cuda:0 current would run on the wrong GPU."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def to_device_async(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A small host tensor built for a launch (a schedule's table, an index) on `device`: to a
    GPU through pinned memory and non-blocking, so that a new schedule costs no host sync (the
    caching host allocator keeps the pinned buffer until the copy is done); elsewhere a plain copy."""
    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
