"""Randomness keyed by the sample, not by the rank: uniforms that are a pure function of
(seed, step, stream, global row), so label dropout and drop-path give the same result on
1, 2 or N ranks and with any gradient accumulation, and differ from row to row.

`keyed_uniform` is a counter-based hash (no generator state): the host folds
(seed, step, stream) into one 32-bit key, the device hashes key and row index with two
rounds of a 32-bit integer mixer ("lowbias32", C. Wellons) and keeps 24 bits. It is the
same on the CPU and on CUDA, costs no host sync, and works inside torch.compile (the key
is a tensor op on int64 values, the rows a tensor).

The global row of a sample is its position in the epoch's global order
(data.DataSource.rows, from ResumableDistributedSampler.global_positions): the same sample
gets the same row for any number of ranks and micro-batches. The SSR draws of sar.py key
their noise by the same rows (sampling.sample_keyed_uniform).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK32 = 0xFFFFFFFF

# streams: one per use, so that two uses never share a draw
STREAM_LABEL_DROP = 1
STREAM_DROP_PATH = 1_000  # + 2 * block index (+ 1 for the FFN branch)


def _mix32_host(x: int) -> int:
    x &= _MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _MASK32
    x ^= x >> 16
    return x


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32) in int64 without overflow: c split in 16-bit halves."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def fold_key(seed: int, step: int, stream: int) -> int:
    """One 32-bit key of (seed, step, stream), each an int >= 0 (any size)."""
    key = 0x9E3779B9
    for part in (seed, step, stream):
        if isinstance(part, bool) or not isinstance(part, int) or part < 0:
            raise ValueError(f"seed, step and stream must be ints >= 0, got {part!r}")
        while True:  # every 32-bit word of the part, so large seeds do not collide
            key = _mix32_host(key ^ (part & _MASK32)) + 0x632BE5AB
            part >>= 32
            if not part:
                break
    return _mix32_host(key)


def keyed_uniform(seed: int, step: int, stream: int, rows: torch.Tensor) -> torch.Tensor:
    """Uniforms in [0, 1) (float32, 24 bits), one per entry of `rows` (int, any shape,
    values >= 0): a pure function of (seed, step, stream, row), on rows' device."""
    if not isinstance(rows, torch.Tensor) or rows.is_floating_point() or rows.is_complex():
        raise TypeError(f"rows must be an integer tensor of global row indices, got {type(rows).__name__} "
                        f"{getattr(rows, 'dtype', '')}")
    key = fold_key(seed, step, stream)
    x = _mix32((rows.long() & _MASK32) ^ key)
    x = _mix32(x ^ ((rows.long() >> 32) + 0x2545F491))
    return (x >> 8).float() * (1.0 / (1 << 24))


@dataclass(frozen=True)
class SampleKey:
    """What a model in training mode keys its noise by: the run's seed, the optimiser step,
    and the global rows [B] of the batch it runs on (see ScaleAR.set_sample_key)."""
    seed: int
    step: int
    rows: torch.Tensor

    def uniform(self, stream: int) -> torch.Tensor:
        return keyed_uniform(self.seed, self.step, stream, self.rows)
