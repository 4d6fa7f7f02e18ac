"""Which implementation an op runs: the Triton kernels or the pure-PyTorch references.

`SAR_FAST_BACKEND=auto|triton|reference` (environment) or `set_backend(...)`:
- auto: Triton on CUDA tensors where the op has a kernel, the reference elsewhere;
- triton: always the kernels; on CPU tensors they run under Triton's interpreter
  (TRITON_INTERPRET=1), which is how tests cover kernel code without a GPU;
- reference: always the PyTorch references (the oracles the kernels are tested against).
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
from types import ModuleType
from typing import Iterator

import torch
from torch._subclasses.fake_tensor import is_fake

BACKENDS = ("auto", "triton", "reference")
_ENV = "SAR_FAST_BACKEND"
_override: str | None = None


class BackendError(RuntimeError):
    """The requested backend cannot run this op here."""


def _check(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name


def get_backend() -> str:
    """The backend in force: set_backend(...) if called, else $SAR_FAST_BACKEND, else 'auto'."""
    if _override is not None:
        return _override
    return _check(os.environ.get(_ENV, "auto").strip().lower() or "auto", f"${_ENV}")


def set_backend(name: str | None) -> None:
    """Force a backend for every op; None goes back to $SAR_FAST_BACKEND / 'auto'."""
    global _override
    _override = None if name is None else _check(str(name).lower(), "backend")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Temporarily force a backend (tests, benchmarks)."""
    global _override
    previous = _override
    set_backend(name)
    try:
        yield
    finally:
        _override = previous


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def any_fake(*tensors) -> bool:
    """Fake tensors (sar_fast.memory's estimates) never run a kernel: any backend takes them."""
    if torch.compiler.is_compiling():
        return False
    return any(is_fake(t) for t in tensors if isinstance(t, torch.Tensor))


def select(op: str, *tensors: torch.Tensor, kernel: str | None) -> str:
    """'triton' or 'reference' for this call of `op` on `tensors`.

    `kernel` names the module under sar_fast.kernels holding the op's Triton kernel, or
    None while the op has none (then auto falls back to the reference and an explicit
    'triton' request is an error, never a silent fallback).
    """
    backend = get_backend()
    if backend == "reference":
        return "reference"
    on_cuda = any(t.is_cuda for t in tensors if isinstance(t, torch.Tensor))
    if backend == "auto":
        return "triton" if (on_cuda and kernel is not None and triton_installed()) else "reference"
    if kernel is None:
        raise BackendError(f"{op}: backend 'triton' was requested but this op has no Triton kernel; "
                           f"use backend 'auto' or 'reference'")
    if not triton_installed():
        raise BackendError(f"{op}: backend 'triton' was requested but triton is not installed "
                           f"(pip install triton; Linux only)")
    if not on_cuda and not interpreter_enabled() and not any_fake(*tensors):
        raise BackendError(f"{op}: backend 'triton' on CPU tensors needs Triton's interpreter: "
                           f"set TRITON_INTERPRET=1 before the first import of triton")
    return "triton"


def load_kernels(module: str) -> ModuleType:
    """Import sar_fast.kernels.<module> (lazily: importing triton is slow)."""
    return importlib.import_module(f"sar_fast.kernels.{module}")
