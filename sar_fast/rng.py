"""Every keyed random stream of the package: the stream ids and the seed/hash formulas.

Training noise is keyed by the sample, not by the rank: uniforms that are a pure function
of (seed, step, stream, global row), so SSR's draws, the sf_* rollouts, label dropout and
drop-path give the same result on 1, 2 or N ranks and with any gradient accumulation, and
differ from row to row. The global row of a sample is its position in the epoch's global
order (data.DataSource.rows, from ResumableDistributedSampler.global_positions): the same
sample gets the same row for any number of ranks and micro-batches.

- `sample_keyed_uniform`: the counter-based hash (no generator state; the same on the CPU
  and on CUDA, no host sync) behind every stream below.
- STREAM_SSR / STREAM_ROLLOUT: sar.py's SSR draws (per scale) and naive student forcing's
  rollouts (per token); STREAM_MODEL with its sub-streams STREAM_LABEL_DROP / STREAM_DROP_PATH:
  the model's label dropout and drop-path (`keyed_uniform`, `SampleKey`).
- `official_scale_seed` / `transition_seed` / `schedule_seed`: the generator seeds of the
  `official` objective's draws (keyed by the rank's batch, as the public code), of
  transitions='random' and of the random training schedules (keyed by the step alone).
- `image_seed` / `image_identity` / `image_uniforms`: the sampling noise of image k of an
  evaluation set (sar_fast.evaluate, sar_fast.study), the same for any ranks and batch size.

Changing any formula here changes the draws of existing runs: tests/test_rng.py pins values.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

# ------------------------------------------------------------------ stream ids
# streams of sample_keyed_uniform used inside the package (a stream may also be a tuple)
STREAM_SSR = 1            # SSR draws: stream (STREAM_SSR, scale index)
STREAM_MODEL = 2          # the model's label dropout and drop-path: (STREAM_MODEL, STREAM_LABEL_DROP / ...)
STREAM_ROLLOUT = 3        # naive student forcing's rollouts (sf_*): one uniform per token of a row

# sub-streams of STREAM_MODEL: one per use, so that two uses never share a draw
STREAM_LABEL_DROP = 1
STREAM_DROP_PATH = 1_000  # + 2 * block index (+ 1 for the FFN branch)


# ------------------------------------------------------------------ the keyed hash
_M32 = 0xFFFFFFFF


def _mul32(x, c: int):
    """(x * c) mod 2**32 for x in [0, 2**32) without overflowing int64 (torch tensors or ints)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _mix32(x):
    """A 32-bit integer hash with full avalanche (Wellons' 'lowbias32'); tensors or ints."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _key(*values: int) -> int:
    h = 0x9E3779B9
    for v in values:
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 2**63:
            raise ValueError(f"sample_keyed_uniform: seed, step and stream must be ints in [0, 2**63), got {v!r}")
        h = _mix32(_mix32(h ^ (v & _M32)) ^ (v >> 32))
    return h


def sample_keyed_uniform(seed: int, step: int, stream: int | tuple[int, ...],
                         global_rows: torch.Tensor | slice, shape: tuple[int, ...] = (),
                         device: torch.device | str | None = None) -> torch.Tensor:
    """Uniforms in [0, 1), float64 [R, *shape], a pure function of (seed, step, stream,
    global row, element): the randomness of a sample, not of the rank or micro-batch that
    holds it, so a run gives the same draws on any number of ranks and accumulation steps.

    global_rows: int64 tensor [R] (any values >= 0) or a slice (start, stop; step 1) of
    global row indices (the trainer's: the row's position in the epoch's global order,
    see DataSource.next). stream: an int or a tuple of ints naming the use (STREAM_*,
    plus e.g. a scale or block index). A counter-based hash (no generator state): row r
    costs the same whether or not the other rows are drawn.
    """
    if isinstance(global_rows, slice):
        if global_rows.step not in (None, 1) or global_rows.start is None or global_rows.stop is None:
            raise ValueError(f"global_rows slice must be start:stop with step 1, got {global_rows}")
        rows = torch.arange(global_rows.start, global_rows.stop, device=device, dtype=torch.int64)
    elif isinstance(global_rows, torch.Tensor) and global_rows.dim() == 1 and not global_rows.is_floating_point():
        rows = global_rows.to(device if device is not None else global_rows.device, torch.int64)
    else:
        raise ValueError(f"global_rows must be a 1-d integer tensor or a slice, got {global_rows!r}")
    stream = stream if isinstance(stream, tuple) else (stream,)
    k0 = _key(seed, step, *stream)
    k1, k2 = _mix32(k0 ^ 0x68E31DA4), _mix32(k0 ^ 0xB5297A4D)
    numel = 1
    for d in shape:
        numel *= int(d)
    row_hash = _mix32(_mix32((rows & _M32) ^ k0) ^ (rows >> 32))                      # [R]
    elem = torch.arange(numel, device=rows.device, dtype=torch.int64)
    a = _mix32(row_hash.unsqueeze(1) ^ _mix32(elem ^ k1).unsqueeze(0))                   # [R, numel]
    b = _mix32(a ^ k2)
    u = ((a >> 5) * 67108864 + (b >> 6)).double() * 2.0**-53  # 53 random bits
    return u.view(rows.shape[0], *shape)


# ------------------------------------------------------------------ the model's noise
def keyed_uniform(seed: int, step: int, stream: int, rows: torch.Tensor) -> torch.Tensor:
    """Uniforms in [0, 1) (float32), one per entry of `rows` (int, any shape, values >= 0):
    a pure function of (seed, step, stream, row), on rows' device: sample_keyed_uniform
    under (STREAM_MODEL, stream)."""
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


# ------------------------------------------------------------------ generator seeds (rank's batch)
def official_scale_seed(seed: int, step: int, si: int) -> int:
    """Seed of the `official` objective's generator for scale `si` at `step`: one stream per
    (seed, step, scale), so skipping a scale changes no other draw."""
    return (seed * 1_000_003 + step) * 1_009 + si


def transition_seed(seed: int, step: int) -> int:
    """Seed of the random.Random that picks transitions='random''s transition at `step`."""
    return seed * 7_919 + step


def schedule_seed(seed: int, step: int) -> int:
    """Seed of the random.Random that draws step `step`'s FlexVAR schedule (--random-schedules):
    the same on every rank."""
    return seed * 1_000_003 + step


# ------------------------------------------------------------------ evaluation images
def image_seed(seed: int, cls: int, index: int) -> int:
    """The seed of image (cls, index): a hash, so neighbouring images get unrelated streams."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{cls}:{index}".encode()).digest()[:8], "little") >> 1


def image_identity(k: int, num_classes: int) -> tuple[int, int]:
    """(class, index within the class) of image k of a set: classes interleaved."""
    return k % num_classes, k // num_classes


def image_uniforms(seed: int, cls: int, index: int, num_tokens: int) -> torch.Tensor:
    """The sampling noise of one image: [num_tokens] uniforms in [0, 1) (float64, CPU)."""
    gen = torch.Generator().manual_seed(image_seed(seed, cls, index))
    return torch.rand(num_tokens, generator=gen, dtype=torch.float64)
