"""What the ops need to know about the kernels without importing triton (slow to import, and
absent on some machines): which inputs the kernels take and whether Triton's interpreter
runs them. The kernel modules read the same answers, so each fact has this one home."""
from __future__ import annotations

import os

HEAD_DIMS = (16, 32, 64, 128)  # head dims the attention kernels take (the reference takes any)


def interpreter_enabled() -> bool:
    """Whether Triton's interpreter runs the kernels (TRITON_INTERPRET set and not 0).

    Read from the environment at each call: tests set it before triton's first import and
    bench/compile_report.py unsets it for its workers, so a value frozen at import could be
    stale. Triton itself reads it when a kernel is decorated, so the kernel modules ask
    once, at their import, for the configs they build there."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
