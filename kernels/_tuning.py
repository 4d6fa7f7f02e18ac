"""Autotune config lists per GPU architecture.

A config that spills registers on one architecture is slow there, lengthens autotuning and
can still win a noisy autotune, so each kernel keeps one list per architecture family and
prunes, before autotuning, to the list of the active target. bench/compile_report.py
compiles every kept config for sm_80 / sm_90 / sm_100 and tests/test_compile.py checks that
none spills, overflows shared memory or fails to compile.
"""
from __future__ import annotations

from typing import Callable, Sequence

import triton


def target_arch() -> int:
    """Compute capability (80, 90, 100, ...) of Triton's active target; 0 when not CUDA."""
    try:
        target = triton.runtime.driver.active.get_current_target()
    except RuntimeError:  # no GPU driver at all
        return 0
    arch = getattr(target, "arch", None)
    return arch if getattr(target, "backend", None) == "cuda" and isinstance(arch, int) else 0


def family(arch: int, listed: Sequence[int]) -> int:
    """The largest listed architecture <= arch (sm_86 tunes like sm_80), else the smallest."""
    below = [a for a in listed if a <= arch]
    return max(below) if below else min(listed)


class ArchConfigs:
    """`table` maps an architecture to entries; `make(entry)` builds the triton.Config and
    `admits(entry, args)` (args: the launch's named arguments and constexprs) says whether an
    entry may run this launch (e.g. a head-dim limit). Pass `configs` and `prune` to
    triton.autotune (prune_configs_by={"early_config_prune": prune})."""

    def __init__(self, table: dict[int, list[tuple]], make: Callable[[tuple], triton.Config],
                 admits: Callable[[tuple, dict], bool] | None = None):
        self.table = table
        self.admits = admits or (lambda entry, args: True)
        self._entry_of: dict[tuple, tuple] = {}
        self.configs: list[triton.Config] = []
        for entries in table.values():
            for entry in entries:
                config = make(entry)
                key = self._key(config)
                if key not in self._entry_of:
                    self._entry_of[key] = entry
                    self.configs.append(config)

    @staticmethod
    def _key(config: triton.Config) -> tuple:
        return tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages

    def for_arch(self, arch: int, args: dict | None = None) -> list[tuple]:
        """The entries kept for `arch` (and, with args, admitted for that launch)."""
        entries = self.table[family(arch, list(self.table))]
        return [e for e in entries if args is None or self.admits(e, args)]

    def prune(self, configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        keep = set(self.for_arch(target_arch(), {**named_args, **kwargs}))
        return [c for c in configs if self._entry_of.get(self._key(c)) in keep]
