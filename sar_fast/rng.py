"""Randomness keyed by the sample, not by the rank: uniforms that are a pure function of
(seed, step, stream, global row), so label dropout and drop-path give the same result on
1, 2 or N ranks and with any gradient accumulation, and differ from row to row.

`keyed_uniform` is sampling.sample_keyed_uniform (a counter-based hash, no generator
state; the same on the CPU and on CUDA, no host sync) under the model's stream.

The global row of a sample is its position in the epoch's global order
(data.DataSource.rows, from ResumableDistributedSampler.global_positions): the same sample
gets the same row for any number of ranks and micro-batches. The SSR draws of sar.py key
their noise by the same rows (sampling.sample_keyed_uniform).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling import STREAM_MODEL, sample_keyed_uniform

# sub-streams of sampling.STREAM_MODEL: one per use, so that two uses never share a draw
STREAM_LABEL_DROP = 1
STREAM_DROP_PATH = 1_000  # + 2 * block index (+ 1 for the FFN branch)


def keyed_uniform(seed: int, step: int, stream: int, rows: torch.Tensor) -> torch.Tensor:
    """Uniforms in [0, 1) (float32), one per entry of `rows` (int, any shape, values >= 0):
    a pure function of (seed, step, stream, row), on rows' device. The hash is the one the
    SSR draws use (sampling.sample_keyed_uniform), under its own stream."""
    if not isinstance(rows, torch.Tensor) or rows.is_floating_point() or rows.is_complex():
        raise TypeError(f"rows must be an integer tensor of global row indices, got {type(rows).__name__} "
                        f"{getattr(rows, 'dtype', '')}")
    u = sample_keyed_uniform(seed, step, (STREAM_MODEL, stream), rows.reshape(-1).long())
    return u.view(rows.shape).float().clamp_(max=1.0 - 2.0**-24)  # fp32 rounding must not reach 1


@dataclass(frozen=True)
class SampleKey:
    """What a model in training mode keys its noise by: the run's seed, the optimiser step,
    and the global rows [B] of the batch it runs on (see ScaleAR.set_sample_key)."""
    seed: int
    step: int
    rows: torch.Tensor

    def uniform(self, stream: int) -> torch.Tensor:
        return keyed_uniform(self.seed, self.step, stream, self.rows)
