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
from typing import Any, Callable

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
