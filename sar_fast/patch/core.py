"""The bookkeeping sar_fast.patch.var and sar_fast.patch.infinity share: the REQUIRED table (each
family module adds its classes' entries), the error and report types, and applying /
undoing the per-instance swaps."""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Callable

# THE table: every attribute of the original classes the patch reads or replaces, and why
# (filled by sar_fast.patch.var for VAR / FlexVAR / SAR and by sar_fast.patch.infinity).
REQUIRED: dict[str, dict[str, str]] = {}


class PatchError(ValueError):
    """A model (or a part of it) sar_fast.patch cannot patch without changing its results."""


def _require(obj, entry: str, where: str) -> str | None:
    """None when `obj` has every attribute of REQUIRED[entry], else the message naming them."""
    missing = [a for a in REQUIRED[entry] if not hasattr(obj, a)]
    if not missing:
        return None
    names = ", ".join(f"{type(obj).__name__}.{a}" for a in missing)
    return (f"{where}: {names} missing (sar_fast.patch needs {entry}'s "
            + "; ".join(f"{a}: {REQUIRED[entry][a]}" for a in missing)
            + "); the upstream class changed or this is not the class the patch supports")


# ------------------------------------------------------------------------------------------
# report and bookkeeping
# ------------------------------------------------------------------------------------------
@dataclass
class PatchReport:
    family: str
    patched: list[str] = field(default_factory=list)              # "blocks.0.attn.forward", ...
    left_alone: list[tuple[str, str]] = field(default_factory=list)  # (what, why)

    def __str__(self) -> str:
        lines = [f"sar_fast.patch ({self.family}): {len(self.patched)} methods patched"]
        lines += [f"  left alone: {what}: {why}" for what, why in self.left_alone]
        return "\n".join(lines)


@dataclass
class _Swap:
    target: object
    attr: str
    make: Callable  # target -> replacement (a bound method or function)
    label: str


_MISSING = object()
_APPLIED: "weakref.WeakKeyDictionary[object, list[tuple[object, str, object]]]" = weakref.WeakKeyDictionary()
_OWNER: "weakref.WeakKeyDictionary[object, set[str]]" = weakref.WeakKeyDictionary()  # patched targets


def _apply(root, swaps: list[_Swap], report: PatchReport, strict: bool) -> PatchReport:
    if root in _APPLIED:
        raise PatchError(f"{type(root).__name__} instance is already patched; call unpatch() first")
    for s in swaps:
        if s.attr in _OWNER.get(s.target, ()):
            raise PatchError(f"{s.label} is already patched through another model; unpatch that one first")
    if strict and report.left_alone:
        raise PatchError("cannot patch (strict=True; strict=False patches the rest):\n"
                         + "\n".join(f"  {what}: {why}" for what, why in report.left_alone))
    done = []
    for s in swaps:
        old = s.target.__dict__.get(s.attr, _MISSING)
        new = s.make(s.target)
        object.__setattr__(s.target, s.attr, new)  # an instance attribute: the class is untouched
        done.append((s.target, s.attr, old))
        _OWNER.setdefault(s.target, set()).add(s.attr)
        report.patched.append(s.label)
    _APPLIED[root] = done
    return report


def is_patched(model) -> bool:
    return model in _APPLIED


def unpatch(model) -> None:
    """Restore every method patch_* replaced for `model` (its blocks, tokenizer, trainer)."""
    done = _APPLIED.pop(model, None)
    if done is None:
        raise PatchError(f"{type(model).__name__} instance is not patched by sar_fast.patch")
    for target, attr, old in reversed(done):
        if old is _MISSING:
            object.__delattr__(target, attr)
        else:
            object.__setattr__(target, attr, old)
        _OWNER[target].discard(attr)
