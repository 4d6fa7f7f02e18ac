"""Which implementation an op runs: its kernel or its pure-PyTorch reference.

`SAR_FAST_BACKEND=auto|kernel|reference` (environment) or `set_backend(...)`:
- kernel: always the op's kernel, an error where it cannot run (never a silent fallback).
  The kernel is a Triton kernel (kernels/: attention, cross entropy, scale shift), which
  runs on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1), how tests cover
  kernel code without a GPU; for msq_encode it is the C++/CUDA extension sar_fast._C,
  for sample_survivors the extension's CPU op;
- auto: the kernel where it is the fast path (Triton on CUDA tensors; the extension on
  CPU and CUDA when it is built), the reference elsewhere;
- reference: always the PyTorch references (the oracles the kernels are tested against).
'triton' is a deprecated alias of 'kernel' (it named the backend before the extension
joined): still accepted, with a FutureWarning (shown to users by default).
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import warnings
from types import ModuleType
from typing import Iterator

import torch
from torch._subclasses.fake_tensor import is_fake

BACKENDS = ("auto", "kernel", "reference")
_DEPRECATED = {"triton": "kernel"}
_ENV = "SAR_FAST_BACKEND"
_override: str | None = None


class BackendError(RuntimeError):
    """The requested backend cannot run this op here."""


def _check(name: str, source: str) -> str:
    if name in _DEPRECATED:
        warnings.warn(f"{source}: backend {name!r} is deprecated, use {_DEPRECATED[name]!r} (the op's kernel: "
                      f"Triton, or the C++/CUDA extension for msq_encode)", FutureWarning, stacklevel=3)
        return _DEPRECATED[name]
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


# Looked up once: the answer cannot change in a running process, and the ops ask on every call,
# which torch.compile must trace (dynamo in torch 2.11 refuses to trace importlib.util.find_spec).
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_installed() -> bool:
    return _TRITON_INSTALLED


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def any_fake(*tensors) -> bool:
    """Fake tensors (sar_fast.memory's estimates) never run a kernel: any backend takes them."""
    if torch.compiler.is_compiling():
        return False
    return any(is_fake(t) for t in tensors if isinstance(t, torch.Tensor))


def select(op: str, *tensors: torch.Tensor, kernel: str | None) -> str:
    """'kernel' or 'reference' for this call of `op` (a Triton op) on `tensors`.

    `kernel` names the module under sar_fast.kernels holding the op's Triton kernel, or
    None while the op has none (then auto falls back to the reference and an explicit
    'kernel' request is an error, never a silent fallback).
    """
    backend = get_backend()
    if backend == "reference":
        return "reference"
    on_cuda = any(t.is_cuda for t in tensors if isinstance(t, torch.Tensor))
    if backend == "auto":
        return "kernel" if (on_cuda and kernel is not None and triton_installed()) else "reference"
    if kernel is None:
        raise BackendError(f"{op}: backend 'kernel' was requested but this op has no Triton kernel; "
                           f"use backend 'auto' or 'reference'")
    if not triton_installed():
        raise BackendError(f"{op}: backend 'kernel' was requested but triton is not installed "
                           f"(pip install triton; Linux only)")
    if not on_cuda and not interpreter_enabled() and not any_fake(*tensors):
        raise BackendError(f"{op}: backend 'kernel' on CPU tensors needs Triton's interpreter: "
                           f"set TRITON_INTERPRET=1 before the first import of triton")
    return "kernel"


def load_kernels(module: str) -> ModuleType:
    """Import sar_fast.kernels.<module> (lazily: importing triton is slow)."""
    return importlib.import_module(f"sar_fast.kernels.{module}")
