"""Autotune config lists per GPU architecture.

A config that spills registers on one architecture is slow there, lengthens autotuning and
can still win a noisy autotune, so each kernel keeps one list per architecture family and
prunes, before autotuning, to the list of the active target. fp32 inputs get lists of their
own: their GEMM operands take twice the registers and shared memory of bf16/fp16 ones (exact
IEEE products run on the FMA units, tiles held per thread), so tiles that fit 16-bit inputs
spill kilobytes with fp32. bench/compile_report.py compiles every kept config for sm_80 /
sm_90 / sm_100 and every dtype, and tests/test_compile.py checks that none spills, overflows
shared memory or fails to compile.

`TunedKernel` wraps the autotuned kernel for what a GPU run adds: deterministic mode (the
first admitted config, no timing; sar_fast.ops.gpu) and tests' poisoned outputs. Autotune
keys hold a length bucket (`length_bucket`) besides the head dim / sizes and dtypes, so a
kernel tuned on the 1 x 1 first scale does not keep that (noise-picked) winner for every
length.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import triton

from sar_fast.ops.gpu import is_deterministic


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
    """`table` maps an architecture to entries for bf16/fp16 inputs, `fp32_table` (same form,
    default `table`) to entries for fp32 ones; the launch's argument `dtype_arg` tells which.
    `make(entry)` builds the triton.Config and `admits(entry, args)` (args: the launch's named
    arguments and constexprs) says whether an entry may run this launch (e.g. a head-dim
    limit). Pass `configs` and `prune` to triton.autotune
    (prune_configs_by={"early_config_prune": prune}); Triton's autotuner keys on the argument
    dtypes, so each dtype is tuned over its own list."""

    def __init__(self, table: dict[int, list[tuple]], make: Callable[[tuple], triton.Config],
                 admits: Callable[[tuple, dict], bool] | None = None,
                 fp32_table: dict[int, list[tuple]] | None = None, dtype_arg: str | None = None):
        if fp32_table is not None and dtype_arg is None:
            raise ValueError("fp32_table needs dtype_arg: the argument whose dtype picks the table")
        self.tables = {False: table, True: fp32_table if fp32_table is not None else table}
        self.dtype_arg = dtype_arg
        self.admits = admits or (lambda entry, args: True)
        self._make = make
        self.configs: list[triton.Config] = []
        seen = set()
        for t in self.tables.values():
            for entries in t.values():
                for entry in entries:
                    config = make(entry)
                    if self._key(config) not in seen:
                        seen.add(self._key(config))
                        self.configs.append(config)

    @staticmethod
    def _key(config: triton.Config) -> tuple:
        return tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages

    def is_fp32(self, args: dict | None) -> bool:
        return (args is not None and self.dtype_arg is not None
                and getattr(args.get(self.dtype_arg), "dtype", None) == torch.float32)

    def for_arch(self, arch: int, args: dict | None = None) -> list[tuple]:
        """The entries kept for `arch` and the dtype of `args` (16-bit without args), admitted
        for that launch when `args` is given."""
        table = self.tables[self.is_fp32(args)]
        entries = table[family(arch, list(table))]
        return [e for e in entries if args is None or self.admits(e, args)]

    def prune(self, configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        keep = {self._key(self._make(e)) for e in self.for_arch(target_arch(), {**named_args, **kwargs})}
        return [c for c in configs if self._key(c) in keep]


def length_bucket(n: int, cap: int) -> int:
    """Autotune key for a length: the next power of two, at most `cap` (a few dozen tunings
    per kernel at most, whatever lengths FlexVAR's schedules give)."""
    return min(triton.next_power_of_2(max(int(n), 1)), cap)


def poison_(t: torch.Tensor) -> None:
    """Refill a test's poisoned output: NaN, or -(2**31 - 1) for integer outputs."""
    t.fill_(float("nan") if t.dtype.is_floating_point else -(2**31 - 1))


class TunedKernel:
    """A triton.autotune kernel (`autotuner`) launched as `kernel[grid](*args, **kwargs)`.

    - Deterministic mode: launches the first entry `configs` (the ArchConfigs it was tuned
      over; None: the autotuner's only config, as under the interpreter) admits for the
      target, dtype and arguments, skipping the autotuner and its timing.
    - `poisoned=[outputs]` (tests' POISON_OUTPUTS): a first autotuned call benchmarks every
      config into the same outputs, so an element the winner leaves unwritten would not show;
      with several configs the outputs are poisoned again after that call and the (now cached)
      winner launched once more. With one config nothing is benchmarked: one launch.
    """

    def __init__(self, autotuner, configs: ArchConfigs | None, make: Callable[[tuple], triton.Config] | None = None):
        self.autotuner = autotuner
        self.configs = configs
        self._make = make

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.run(grid, *args, **kwargs)

    def first_config(self, args: tuple, kwargs: dict) -> triton.Config:
        if self.configs is None:
            return self.autotuner.configs[0]
        named = {**dict(zip(self.autotuner.arg_names, args)), **kwargs}
        entries = self.configs.for_arch(target_arch(), named)
        if not entries:
            raise RuntimeError(f"no autotune config admitted for this launch (arch {target_arch()})")
        return self._make(entries[0])

    def run(self, grid, *args, poisoned: Sequence[torch.Tensor] = (), **kwargs):
        if is_deterministic():
            config = self.first_config(args, kwargs)
            return self.autotuner.fn[grid](*args, **kwargs, **config.all_kwargs())
        self.autotuner[grid](*args, **kwargs)
        if poisoned and len(self.autotuner.configs) > 1:
            for t in poisoned:
                poison_(t)
            self.autotuner[grid](*args, **kwargs)
