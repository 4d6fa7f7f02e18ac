"""Scale schedules: the side lengths of the token maps, coarsest first.

A schedule (1, 2, 3, 4, 5, 6, 8, 10, 13, 16) means the model predicts a 1x1 map, then 2x2,
..., then 16x16: sum(s*s) = 680 tokens. FlexVAR trains on random schedules so one model
serves any of them; `random_flexvar_schedule` reproduces that distribution.
"""
from __future__ import annotations

import random
from typing import Iterable, Sequence


class Schedule(tuple):
    """A validated schedule: a tuple of side lengths (strictly increasing positive ints) that
    also carries its token layout, computed once.

    - `lengths`: tokens per scale (s*s), a tuple of n ints;
    - `offsets`: a tuple of n + 1 ints, offsets[i]:offsets[i + 1] is scale i in the
      flattened sequence, offsets[0] = 0 and offsets[n] = `total`;
    - `total`: the sequence length, sum(s*s).

    It is a tuple: it compares, hashes, indexes, slices (a slice is a plain tuple), pickles
    and serialises to JSON (a list) as the tuple of its sides, so it goes wherever a tuple
    of sides did and works as a cache key. Public entry points take any sequence of ints
    and convert once with `Schedule(x)`; converting a Schedule returns it unchanged, so
    internals may call it freely. `latent_side` also checks that the schedule ends there;
    `name` names the argument in error messages.
    """

    def __new__(cls, sides: Iterable[int], *, latent_side: int | None = None, name: str = "schedule") -> Schedule:
        if type(sides) is cls:
            self = sides
        else:
            self = super().__new__(cls, _checked_sides(sides, name))
            lengths = tuple(s * s for s in self)
            offsets = [0]
            for n in lengths:
                offsets.append(offsets[-1] + n)
            object.__setattr__(self, "lengths", lengths)
            object.__setattr__(self, "offsets", tuple(offsets))
            object.__setattr__(self, "total", offsets[-1])
        if latent_side is not None and self[-1] != latent_side:
            raise ValueError(f"{name} must end at the latent side {latent_side}, got {tuple(self)}")
        return self

    lengths: tuple[int, ...]
    offsets: tuple[int, ...]
    total: int

    def __setattr__(self, key, value):
        raise AttributeError(f"a Schedule is immutable (tried to set {key!r})")

    def __delattr__(self, key):
        raise AttributeError(f"a Schedule is immutable (tried to delete {key!r})")

    def __reduce__(self):
        # rebuilt from its sides (re-validated); the derived attributes are not pickled
        return (Schedule, (tuple(self),))

    def __repr__(self) -> str:
        return f"Schedule({tuple(self)!r})"

    def __str__(self) -> str:  # messages print the sides, as for a tuple
        return tuple.__repr__(self)

    @property
    def num_scales(self) -> int:
        return len(self)

    def scale(self, si: int) -> slice:
        """The token slice of scale `si` in a flattened [.., total] sequence."""
        return slice(self.offsets[si], self.offsets[si + 1])

    def prefix(self, n: int) -> Schedule:
        """The first `n` scales, as a Schedule."""
        if not 1 <= n <= len(self):
            raise ValueError(f"prefix length must be in [1, {len(self)}], got {n}")
        return Schedule(self[:n])


def _checked_sides(schedule, name: str) -> tuple[int, ...]:
    if isinstance(schedule, (str, bytes)) or not hasattr(schedule, "__iter__"):
        raise TypeError(f"{name} must be a sequence of ints, got {type(schedule).__name__}")
    out = []
    for s in schedule:
        if hasattr(s, "item") and not isinstance(s, int):  # 0-d tensors / numpy scalars
            s = s.item()
        if isinstance(s, bool) or not isinstance(s, int):
            raise TypeError(f"{name} must hold ints, got {s!r} ({type(s).__name__})")
        out.append(int(s))
    if not out:
        raise ValueError(f"{name} must not be empty")
    if out[0] < 1:
        raise ValueError(f"{name} must hold positive side lengths, got {tuple(out)}")
    if any(b <= a for a, b in zip(out, out[1:])):
        raise ValueError(f"{name} must be strictly increasing, got {tuple(out)}")
    return tuple(out)


# the schedules named in one place: FlexVAR/VAR's 256px schedule (FlexVAR evaluates on it),
# and the embedded digits model's (its training sample grids)
STANDARD_SCHEDULE = Schedule((1, 2, 3, 4, 5, 6, 8, 10, 13, 16))
DIGITS_SCHEDULE = Schedule((1, 2, 3, 4, 6, 8))


def parse_schedule(text: str) -> Schedule:
    """Parse '1,2,3,4' (or 'standard') from a command line."""
    if text.strip().lower() == "standard":
        return STANDARD_SCHEDULE
    try:
        parts = [int(p) for p in text.replace(" ", "").split(",") if p]
    except ValueError:
        raise ValueError(f"schedule must be comma-separated ints like 1,2,4,8, got {text!r}") from None
    return Schedule(parts)


def scale_offsets(schedule: Sequence[int]) -> list[int]:
    """Schedule(schedule).offsets as a list, for callers holding plain sides (tests, benches)."""
    return list(Schedule(schedule).offsets)


def total_length(schedule: Sequence[int]) -> int:
    """Schedule(schedule).total, for callers holding plain sides (tests, benches)."""
    return Schedule(schedule).total


def random_flexvar_schedule(rng: random.Random, last: int = 16, max_len: int = 680) -> Schedule:
    """One random training schedule with FlexVAR's distribution (for last=16).

    5% of the time the standard schedule; otherwise [1, 2] + 5 sides from 3..10 + 2 from
    11..15 + [16], then with probability 10/5/2/1% one to four middle scales dropped, then
    scales dropped from the three before the last until the total length fits in `max_len`.
    FlexVAR may drop the final scale too; we never do, so every schedule ends at the latent
    side and supervises the full-resolution map. For other `last`, the ranges and the
    number of sides drawn from each scale with it.
    """
    if not isinstance(rng, random.Random):
        raise TypeError(f"rng must be a random.Random (seeded), got {type(rng).__name__}")
    if last == 16:
        lo_range, hi_range = range(3, 11), range(11, 16)
    else:
        if last < 8:
            raise ValueError(f"random_flexvar_schedule needs last >= 8, got {last}")
        split = max(4, round(last * 11 / 16))
        lo_range, hi_range = range(3, split), range(split, last)
    if last == 16 and rng.random() < 0.05:
        sched = list(STANDARD_SCHEDULE)
    else:
        if last == 16:
            k_lo, k_hi = 5, 2
        else:  # the same fractions of each range as FlexVAR's 5 of 8 and 2 of 5
            k_lo, k_hi = max(1, round(len(lo_range) * 5 / 8)), max(1, round(len(hi_range) * 2 / 5))
        middle = rng.sample(lo_range, k_lo) + rng.sample(hi_range, k_hi)
        sched = [1, 2] + sorted(middle) + [last]
    u = rng.random()
    for threshold in (0.9, 0.95, 0.98, 0.99):
        if u > threshold:
            sched.pop(rng.choice(range(2, len(sched) - 1)))
    while sum(s * s for s in sched) > max_len:  # a list being edited, not yet a Schedule
        sched.pop(rng.choice(range(max(2, len(sched) - 4), len(sched) - 1)))
    return Schedule(sched)
