import dataclasses
import functools
import json
import pickle
import random

import numpy as np
import pytest
import torch

from sar_fast import schedules
from sar_fast.schedules import (DIGITS_SCHEDULE, STANDARD_SCHEDULE, Schedule, parse_schedule, random_flexvar_schedule,
                                scale_offsets, total_length)


def test_standard_schedule_has_680_tokens():
    assert total_length(STANDARD_SCHEDULE) == 680 and STANDARD_SCHEDULE.total == 680
    assert scale_offsets((1, 2, 3)) == [0, 1, 5, 14]
    assert DIGITS_SCHEDULE == (1, 2, 3, 4, 6, 8) and DIGITS_SCHEDULE.total == 130


@pytest.mark.parametrize("bad, err", [
    ((), ValueError), ((0, 1), ValueError), ((1, 3, 2), ValueError), ((1, 1, 2), ValueError),
    ((1, 2.5), TypeError), ("1,2", TypeError), ((1, True), TypeError), (5, TypeError), (None, TypeError),
])
def test_construction_rejects_and_names_the_argument(bad, err):
    with pytest.raises(err, match="^schedule "):
        Schedule(bad)
    with pytest.raises(err, match="^--schedule "):
        Schedule(bad, name="--schedule")


def test_numpy_and_tensor_sides_become_ints():
    s = Schedule(np.array([1, 2, 4]))
    assert s == (1, 2, 4) and all(type(x) is int for x in s)
    assert Schedule(torch.tensor([1, 3])) == (1, 3)


def test_latent_side():
    assert Schedule([1, 2, 4], latent_side=4) == (1, 2, 4)
    with pytest.raises(ValueError, match="^cache must end at the latent side 8"):
        Schedule([1, 2, 4], latent_side=8, name="cache")
    s = Schedule([1, 2, 4])
    assert Schedule(s, latent_side=4) is s
    with pytest.raises(ValueError, match="latent side 8"):  # checked on an existing Schedule too
        Schedule(s, latent_side=8)


@pytest.mark.parametrize("seed", range(5))
def test_layout_matches_an_independent_computation(seed):
    rng = random.Random(seed)
    sides = sorted(rng.sample(range(1, 40), rng.randint(1, 12)))
    s = Schedule(sides)
    # the layout of a concatenated [L] sequence, built scale by scale with a tensor
    scale_of_token = torch.cat([torch.full((side ** 2,), i) for i, side in enumerate(sides)])
    assert s.total == len(scale_of_token) == sum(x ** 2 for x in sides)
    assert s.lengths == tuple(int((scale_of_token == i).sum()) for i in range(len(sides)))
    starts = [int((scale_of_token < i).sum()) for i in range(len(sides) + 1)]
    assert s.offsets == tuple(starts) and s.offsets[0] == 0 and s.offsets[-1] == s.total
    for i in range(len(sides)):
        assert (scale_of_token[s.scale(i)] == i).all() and len(scale_of_token[s.scale(i)]) == sides[i] ** 2
    assert s.num_scales == len(sides)
    assert all(type(x) is int for x in s.lengths + s.offsets) and type(s.total) is int
    k = rng.randint(1, len(sides))
    assert s.prefix(k) == tuple(sides[:k]) and isinstance(s.prefix(k), Schedule)
    assert s.prefix(k).offsets == s.offsets[:k + 1]


def test_converting_a_schedule_is_free(monkeypatch):
    s = Schedule((1, 2, 4))
    assert Schedule(s) is s
    monkeypatch.setattr(schedules, "_checked_sides", lambda *a: pytest.fail("a Schedule was re-validated"))
    assert Schedule(s) is s and Schedule(Schedule(s)) is s


def test_tuple_semantics_hash_equality_and_cache_keys():
    s = Schedule([1, 2, 3])
    assert isinstance(s, tuple) and s == (1, 2, 3) and (1, 2, 3) == s and hash(s) == hash((1, 2, 3))
    assert s != [1, 2, 3]  # a tuple, not a list
    assert {(1, 2, 3): "x"}[s] == "x" and {s: "y"}[(1, 2, 3)] == "y"
    assert s[:2] == (1, 2) and type(s[:2]) is tuple and s[-1] == 3 and list(s) == [1, 2, 3]
    assert str(s) == "(1, 2, 3)" and f"{s}" == "(1, 2, 3)" and repr(s) == "Schedule((1, 2, 3))"
    calls = []

    @functools.lru_cache
    def f(schedule):
        calls.append(schedule)
        return len(calls)
    assert f(s) == f((1, 2, 3)) == 1


def test_immutable():
    s = Schedule([1, 2])
    with pytest.raises(AttributeError, match="immutable"):
        s.total = 3
    with pytest.raises(AttributeError, match="immutable"):
        s.offsets = (0, 1, 5)
    with pytest.raises(AttributeError, match="immutable"):
        del s.lengths
    assert s.total == 5 and s.offsets == (0, 1, 5)


def test_pickle_json_and_dataclass_round_trips():
    s = Schedule([1, 2, 5])
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        back = pickle.loads(pickle.dumps(s, protocol))
        assert type(back) is Schedule and back == s and back.offsets == s.offsets and back.total == 30
    assert json.loads(json.dumps(s)) == [1, 2, 5] and json.dumps({"schedule": s}) == '{"schedule": [1, 2, 5]}'

    @dataclasses.dataclass
    class Holder:
        schedule: tuple
    assert dataclasses.asdict(Holder(s))["schedule"] == s


def test_configs_store_a_schedule_and_serialise_plain_lists():
    """What the trainer writes (trainer.json: the run's and the model's config) holds the
    schedule as a plain list, and loads back as one."""
    from sar_fast.models import preset_config
    from sar_fast.train.config import parse_config

    cfg = parse_config(["--schedule", "1,2,4", "--max-steps", "1"])
    assert type(cfg.data.schedule) is Schedule and cfg.data.schedule == (1, 2, 4)
    text = json.dumps(cfg.to_dict())
    assert type(cfg.to_dict()["data"]["schedule"]) is list and json.loads(text)["data"]["schedule"] == [1, 2, 4]
    mcfg = preset_config("flexvar-tiny", schedule=[1, 2, 3])
    assert type(mcfg.schedule) is Schedule and type(mcfg.to_dict()["schedule"]) is list
    with pytest.raises(ValueError, match="^config.schedule "):
        preset_config("flexvar-tiny", schedule=(1, 3, 2))


def test_parse_schedule():
    assert parse_schedule("1,2, 4") == (1, 2, 4) and type(parse_schedule("1,2")) is Schedule
    assert parse_schedule("standard") is STANDARD_SCHEDULE
    with pytest.raises(ValueError, match="comma-separated"):
        parse_schedule("1,a")


def test_random_flexvar_schedules_are_valid_and_seeded():
    rng = random.Random(0)
    seen = set()
    for _ in range(2000):
        s = random_flexvar_schedule(rng)
        assert type(s) is Schedule and s[-1] == 16
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
            assert Schedule(s, latent_side=last) is s
        assert len(seen) > 3
    with pytest.raises(TypeError, match="rng"):
        random_flexvar_schedule(3)
