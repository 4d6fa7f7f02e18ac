"""Scale schedules: the side lengths of the token maps, coarsest first.

A schedule (1, 2, 3, 4, 5, 6, 8, 10, 13, 16) means the model predicts a 1x1 map, then 2x2,
..., then 16x16: sum(s*s) = 680 tokens. FlexVAR trains on random schedules so one model
serves any of them; `random_flexvar_schedule` reproduces that distribution.
"""
from __future__ import annotations

import random
from typing import Iterable, Sequence

STANDARD_SCHEDULE: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def validate_schedule(schedule: Iterable[int], latent_side: int | None = None,
                      name: str = "schedule") -> tuple[int, ...]:
    """Return `schedule` as a tuple after checking it: strictly increasing positive ints,
    and, when `latent_side` is given, ending at the latent's side length."""
    if isinstance(schedule, (str, bytes)) or not hasattr(schedule, "__iter__"):
        raise TypeError(f"{name} must be a sequence of ints, got {type(schedule).__name__}")
    out = []
    for s in schedule:
        if hasattr(s, "item") and not isinstance(s, int):  # 0-d tensors / numpy scalars
            s = s.item()
        if isinstance(s, bool) or not isinstance(s, int):
            raise TypeError(f"{name} must hold ints, got {s!r} ({type(s).__name__})")
        out.append(s)
    if not out:
        raise ValueError(f"{name} must not be empty")
    if out[0] < 1:
        raise ValueError(f"{name} must hold positive side lengths, got {tuple(out)}")
    if any(b <= a for a, b in zip(out, out[1:])):
        raise ValueError(f"{name} must be strictly increasing, got {tuple(out)}")
    if latent_side is not None and out[-1] != latent_side:
        raise ValueError(f"{name} must end at the latent side {latent_side}, got {tuple(out)}")
    return tuple(out)


def parse_schedule(text: str) -> tuple[int, ...]:
    """Parse '1,2,3,4' (or 'standard') from a command line."""
    if text.strip().lower() == "standard":
        return STANDARD_SCHEDULE
    try:
        parts = [int(p) for p in text.replace(" ", "").split(",") if p]
    except ValueError:
        raise ValueError(f"schedule must be comma-separated ints like 1,2,4,8, got {text!r}") from None
    return validate_schedule(parts)


def scale_lengths(schedule: Sequence[int]) -> list[int]:
    """Tokens per scale: s*s for each side s."""
    return [s * s for s in schedule]


def scale_offsets(schedule: Sequence[int]) -> list[int]:
    """Start index of every scale in the flattened sequence, plus the total length at the end."""
    offsets = [0]
    for s in schedule:
        offsets.append(offsets[-1] + s * s)
    return offsets


def total_length(schedule: Sequence[int]) -> int:
    return sum(s * s for s in schedule)


def random_flexvar_schedule(rng: random.Random, last: int = 16, max_len: int = 680) -> tuple[int, ...]:
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
    while total_length(sched) > max_len:
        sched.pop(rng.choice(range(max(2, len(sched) - 4), len(sched) - 1)))
    return tuple(sched)
