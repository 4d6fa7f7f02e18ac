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
`select` makes the choice for every op, Triton or extension alike.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Iterator

import torch
from torch._subclasses.fake_tensor import is_fake

from sar_fast.kernels.support import interpreter_enabled

from .. import _C_loader

BACKENDS = ("auto", "kernel", "reference")
# what an op's kernel is (select's `kernel`)
TRITON = "triton"  # a Triton kernel in sar_fast.kernels: CUDA, or CPU under the interpreter
EXTENSION = "extension"  # an op of the C++/CUDA extension sar_fast._C, on CPU and CUDA tensors
EXTENSION_CPU = "extension_cpu"  # an op of the extension with a CPU implementation only
_KINDS = (TRITON, EXTENSION, EXTENSION_CPU)
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


# Looked up once: the answer cannot change in a running process, and the ops ask on every call,
# which torch.compile must trace (dynamo in torch 2.11 refuses to trace importlib.util.find_spec).
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_installed() -> bool:
    return _TRITON_INSTALLED


def any_fake(*tensors) -> bool:
    """Fake tensors (sar_fast.memory's estimates) never run a kernel: any backend takes them."""
    if torch.compiler.is_compiling():
        return False
    return any(is_fake(t) for t in tensors if isinstance(t, torch.Tensor))


def _cannot_run(op: str, kernel: str | None, tensors: tuple) -> str | None:
    """Why `op`'s kernel cannot run on `tensors` here, or None when it can."""
    if kernel is None:
        return f"{op}: backend 'kernel' was requested but this op has no kernel; use backend 'auto' or 'reference'"
    if kernel == TRITON:
        if not triton_installed():
            return f"{op}: backend 'kernel' was requested but triton is not installed (pip install triton; Linux only)"
        if not _on_cuda(tensors) and not interpreter_enabled() and not any_fake(*tensors):
            return (f"{op}: backend 'kernel' on CPU tensors needs Triton's interpreter: "
                    f"set TRITON_INTERPRET=1 before the first import of triton")
        return None
    if kernel == EXTENSION_CPU:
        devices = {t.device.type for t in tensors if isinstance(t, torch.Tensor)}
        if devices - {"cpu"}:
            return (f"{op}: backend 'kernel' asks for the extension's op, which runs on CPU tensors only; "
                    f"the inputs are on {', '.join(sorted(devices))} (use backend 'auto')")
    if not _C_loader.has_extension():
        return (f"{op}: backend 'kernel' asks for the extension, but the C++/CUDA extension sar_fast._C "
                f"is not built; " + _C_loader.BUILD_HINT)
    if _on_cuda(tensors) and not _C_loader.cuda_compiled():
        return (f"{op}: backend 'kernel' asks for the extension, but sar_fast._C was built without "
                f"CUDA kernels; " + _C_loader.BUILD_HINT)
    return None


def _on_cuda(tensors: tuple) -> bool:
    return any(t.is_cuda for t in tensors if isinstance(t, torch.Tensor))


def select(op: str, *tensors: torch.Tensor, kernel: str | None) -> str:
    """'kernel' or 'reference' for this call of `op` on `tensors` under the backend in force.

    `kernel` says what the op's kernel is: TRITON, EXTENSION or EXTENSION_CPU, or None
    while the op has none. 'auto' takes the kernel where it is the fast path (a Triton
    kernel on CUDA tensors only: under the interpreter it is a test of the kernel, not a
    fast path; the extension wherever it can run), else the reference; 'kernel' takes it,
    or raises BackendError saying why it cannot run here (never a silent fallback).
    """
    if kernel is not None and kernel not in _KINDS:
        raise ValueError(f"kernel must be one of {', '.join(_KINDS)} or None, got {kernel!r}")
    backend = get_backend()
    if backend == "reference":
        return "reference"
    reason = _cannot_run(op, kernel, tensors)
    if backend == "auto":
        fast = reason is None and (kernel != TRITON or _on_cuda(tensors))
        return "kernel" if fast else "reference"
    if reason is not None:
        raise BackendError(reason)
    return "kernel"
