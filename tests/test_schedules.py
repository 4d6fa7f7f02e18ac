import random

import pytest

from sar_fast.schedules import (STANDARD_SCHEDULE, parse_schedule, random_flexvar_schedule, scale_offsets,
                                total_length, validate_schedule)


def test_standard_schedule_has_680_tokens():
    assert total_length(STANDARD_SCHEDULE) == 680
    assert scale_offsets((1, 2, 3))[-1] == 14


@pytest.mark.parametrize("bad, err", [
    ((), ValueError), ((0, 1), ValueError), ((1, 3, 2), ValueError), ((1, 1, 2), ValueError),
    ((1, 2.5), TypeError), ("1,2", TypeError), ((1, True), TypeError), (5, TypeError),
])
def test_validate_rejects(bad, err):
    with pytest.raises(err, match="schedule"):
        validate_schedule(bad)


def test_validate_latent_side():
    assert validate_schedule([1, 2, 4], latent_side=4) == (1, 2, 4)
    with pytest.raises(ValueError, match="latent side 8"):
        validate_schedule([1, 2, 4], latent_side=8)


def test_parse_schedule():
    assert parse_schedule("1,2, 4") == (1, 2, 4)
    assert parse_schedule("standard") == STANDARD_SCHEDULE
    with pytest.raises(ValueError, match="comma-separated"):
        parse_schedule("1,a")


def test_random_flexvar_schedules_are_valid_and_seeded():
    rng = random.Random(0)
    seen = set()
    for _ in range(2000):
        s = random_flexvar_schedule(rng)
        validate_schedule(s, latent_side=16)
        assert s[:2] == (1, 2) and total_length(s) <= 680
        seen.add(s)
    assert STANDARD_SCHEDULE in seen and len(seen) > 100
    a = [random_flexvar_schedule(random.Random(7)) for _ in range(3)]
    b = [random_flexvar_schedule(random.Random(7)) for _ in range(3)]
    assert a == b


def test_random_schedule_other_sides():
    rng = random.Random(1)
    for last in (8, 12, 24):
        seen = {random_flexvar_schedule(rng, last=last, max_len=10**6) for _ in range(50)}
        for s in seen:
            validate_schedule(s, latent_side=last)
        assert len(seen) > 3
    with pytest.raises(TypeError, match="rng"):
        random_flexvar_schedule(3)
