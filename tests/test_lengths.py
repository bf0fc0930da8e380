import collections

import pytest

from raytrain.config import LengthsConfig
from raytrain.lengths import build_schedule


def test_fixed_is_always_max():
    schedule = build_schedule({"schedule": "fixed", "min": 32, "max": 256, "multiple_of": 8})
    assert {schedule(step) for step in range(500)} == {256}


def test_uniform_covers_every_multiple_evenly():
    cfg = {"schedule": "uniform", "min": 32, "max": 256, "multiple_of": 32}
    schedule = build_schedule(cfg, seed=3)
    counts = collections.Counter(schedule(step) for step in range(8000))
    assert sorted(counts) == [32, 64, 96, 128, 160, 192, 224, 256]
    for length, n in counts.items():  # 1000 expected each; binomial sd ~ 30
        assert 850 < n < 1150, (length, n)


def test_uniform_is_a_pure_function_of_seed_and_step():
    cfg = LengthsConfig(schedule="uniform", min=8, max=512, multiple_of=8)
    a, b = build_schedule(cfg, seed=7), build_schedule(cfg, seed=7)
    steps = [0, 1, 2, 500, 99999, 3]
    assert [a(s) for s in steps] == [b(s) for s in steps]
    assert [a(s) for s in reversed(steps)] == [b(s) for s in steps][::-1]  # order of calls does not matter
    other = build_schedule(cfg, seed=8)
    assert [a(s) for s in range(50)] != [other(s) for s in range(50)]
    assert all(8 <= a(s) <= 512 and a(s) % 8 == 0 for s in range(2000))


def test_min_equal_max_gives_that_length():
    schedule = build_schedule({"schedule": "uniform", "min": 64, "max": 64, "multiple_of": 16})
    assert {schedule(step) for step in range(100)} == {64}


def test_dict_config_is_validated():
    with pytest.raises(Exception, match="unknown schedule"):
        build_schedule({"schedule": "nope", "min": 8, "max": 16, "multiple_of": 8})
