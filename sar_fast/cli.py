"""What every command-line entry point shares: a bad input file is one line on stderr naming
the file and what was expected, exit code 2 (argparse's code for a bad argument), no
traceback.

    if __name__ == "__main__":
        run_main(main)

`run_main` turns what `main` raises for a bad input into that line: `InputError` (raised by
the argument checks, e.g. `require_weights_file`), `CheckpointError` (a file sar_fast refuses
to read, `HubError` included) and the OS errors of a path that is missing, a folder or
unreadable. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable

import torch

from .hub import HubError, resolve_weights_path
from .safe_load import CheckpointError, InputError, describe_folder

__all__ = ["InputError", "one_line", "require_weights_file", "run_main"]


def one_line(message: object) -> str:
    """The message on one line: a multi-line CheckpointError's lines joined by '; ' (by a
    space after a line that ends with ':')."""
    text = ""
    for line in (line.strip() for line in str(message).splitlines()):
        if line:
            text += ("" if not text else " " if text.endswith(":") else "; ") + line
    return text


def _message(e: BaseException) -> str | None:
    """The one-line error for a bad input, or None when `e` is not one."""
    if isinstance(e, InputError):
        return one_line(e.code) if e.code is not None else ""
    if isinstance(e, CheckpointError):
        return "error: " + one_line(e)
    if isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
        if e.filename is None:
            return "error: " + one_line(e)
        return f"error: {e.filename}: {e.strerror or one_line(e)}"
    return None


def run_main(main: Callable[[], Any]) -> Any:
    """Run an entry point's `main()`; a bad input exits 2 with one line on stderr."""
    try:
        return main()
    except (InputError, ValueError, OSError) as e:
        message = _message(e)
        if message is None:
            raise
        if message:
            print(message, file=sys.stderr, flush=True)
        sys.exit(2)


def require_weights_file(flag: str, spec: str, alternatives: str = "") -> str:
    """The local file a weights argument names (a path, a sharded *.safetensors.index.json or
    an hf:// id, resolved through the HF cache), or InputError naming the flag: missing, a
    folder (saying what the folder is), an unresolvable Hub id."""
    try:
        path = resolve_weights_path(spec)
    except HubError as e:
        raise InputError(f"error: {flag}: {one_line(e)}") from None
    if os.path.isdir(path):
        raise InputError(f"error: {flag} {describe_folder(path)}")
    if not os.path.isfile(path):
        raise InputError(f"error: {flag} {spec}: no such file" + (f" (or pass {alternatives})" if alternatives else ""))
    return path


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


def resolve_device(device: str | None = "auto") -> torch.device:
    """What a --device flag names: 'auto' (or None) is CUDA when available, else the CPU;
    a CUDA device must exist."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise RuntimeError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device} was requested but no CUDA device is available")
    return dev
