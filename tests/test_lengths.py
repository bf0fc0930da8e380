import collections

import pytest

from raytrain.lengths import Uniform
from raytrain.steps import build_schedule


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
    cfg = Uniform(min=8, max=512, multiple_of=8)
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


def ds_curriculum(schedule_type, min_len, max_len, step_size, total, root_degree=None):
    """DeepSpeed's own curriculum scheduler: the independent reference for linear/root."""
    from deepspeed.runtime.data_pipeline.curriculum_scheduler import CurriculumScheduler
    config = {"curriculum_type": "seqlen", "min_difficulty": min_len, "max_difficulty": max_len,
              "schedule_type": schedule_type,
              "schedule_config": {"total_curriculum_step": total, "difficulty_step": step_size}}
    if root_degree is not None:
        config["schedule_config"]["root_degree"] = root_degree
    return CurriculumScheduler(config)


def test_linear_matches_hand_computed_deepspeed_formula():
    schedule = build_schedule({"schedule": "linear", "min": 64, "max": 512, "multiple_of": 8, "warmup_steps": 100})
    # floor((s/100) * 448 + 64) rounded down to a multiple of 8, s = step + 1 (DeepSpeed counts from 1)
    assert [schedule(s) for s in (0, 9, 49, 98, 99, 150)] == [64, 104, 288, 504, 512, 512]


@pytest.mark.parametrize("kind,degree", [("linear", None), ("root", 2), ("root", 3), ("root", 1.5)])
def test_linear_and_root_equal_deepspeed_at_every_step(kind, degree):
    cfg = {"schedule": kind, "min": 32, "max": 1024, "multiple_of": 16, "warmup_steps": 300}
    if degree:
        cfg["root_degree"] = degree
    ours = build_schedule(cfg)
    ds = ds_curriculum("fixed_linear" if kind == "linear" else "fixed_root", 32, 1024, 16, 300, degree)
    assert [ours(s) for s in range(400)] == [ds.get_difficulty(s + 1) for s in range(400)]


def test_root_grows_faster_than_linear():
    base = {"min": 64, "max": 512, "multiple_of": 8, "warmup_steps": 100}
    lin, sq = build_schedule({**base, "schedule": "linear"}), build_schedule({**base, "schedule": "root"})
    assert sq(24) == 288 and lin(24) == 176  # sqrt(25/100) = 0.5 of the range vs 0.25
    assert all(sq(s) >= lin(s) for s in range(120))


def test_staged_boundaries():
    schedule = build_schedule({"schedule": "staged", "min": 64, "max": 256, "multiple_of": 64,
                               "stages": [[10, 64], [20, 128]]})
    assert [schedule(s) for s in (0, 9, 10, 19, 20, 1000)] == [64, 64, 128, 128, 256, 256]


def test_pow2_support_and_moving_mixture():
    cfg = {"schedule": "pow2", "min": 24, "max": 300, "multiple_of": 8}
    schedule = build_schedule(cfg, seed=1, total_steps=20_000)
    early = collections.Counter(schedule(s) for s in range(0, 2000))
    late = collections.Counter(schedule(s) for s in range(18_000, 20_000))
    assert sorted(early) == sorted(late) == [32, 64, 128, 256]  # the powers of two in [24, 300]
    # odds move from 4:3:2:1 (short first) toward 1:2:3:4; the first and last tenth average near
    # 3.85:3.15:2.15:1.15 and 1.15:2.15:3.15:3.85 (of 10.3) -> 32 drawn ~37% early, ~11% late
    assert 0.33 < early[32] / 2000 < 0.42 and 0.08 < late[32] / 2000 < 0.14
    assert 0.08 < early[256] / 2000 < 0.14 and 0.33 < late[256] / 2000 < 0.42
    from raytrain.lengths import pow2_weights
    assert pow2_weights(4, 0.0).tolist() == [0.4, 0.3, 0.2, 0.1]
    assert pow2_weights(4, 0.5).tolist() == [0.25, 0.25, 0.25, 0.25]


def test_pow2_cycles_restart_the_sweep():
    cfg = {"schedule": "pow2", "min": 32, "max": 256, "multiple_of": 8, "cycles": 2}
    schedule = build_schedule(cfg, seed=0, total_steps=4000)

    def mean(lo, hi):
        return sum(schedule(s) for s in range(lo, hi)) / (hi - lo)
    assert mean(1800, 2000) > mean(2000, 2200) + 30  # the second cycle starts short again
    assert mean(0, 200) == pytest.approx(mean(2000, 2200), abs=15)


def test_uniform_warmup_grows_the_upper_bound():
    cfg = {"schedule": "uniform", "min": 64, "max": 512, "multiple_of": 8, "warmup_steps": 100}
    schedule = build_schedule(cfg, seed=0)
    linear = build_schedule({**cfg, "schedule": "linear"})
    assert schedule(0) == 64 and schedule(1) in (64, 72)  # upper bound 64 at step 0, 72 at step 1
    assert all(64 <= schedule(s) <= linear(s) for s in range(200))
    assert max(schedule(s) for s in range(100, 400)) == 512


def test_tokens_clock_follows_tokens_seen():
    cfg = {"schedule": "linear", "min": 64, "max": 512, "multiple_of": 64, "warmup_steps": 50, "by": "tokens"}
    by_tokens = build_schedule(cfg, tokens_per_step=1000)
    seen, expected = 0, []
    for _step in range(80):  # independent: run DeepSpeed's formula on tokens seen / tokens_per_step
        t = seen / 1000
        length = min(512, int((t + 1) / 50 * 448 + 64) // 64 * 64)
        expected.append(length)
        seen += 1000 // length * length
    assert [by_tokens(s) for s in range(80)] == expected
    by_steps = build_schedule({**cfg, "by": "steps"})
    assert [by_tokens(s) for s in range(80)] != [by_steps(s) for s in range(80)]  # rounding makes them differ


@pytest.mark.parametrize("cfg", [
    {"schedule": "uniform", "min": 24, "max": 200, "multiple_of": 8, "warmup_steps": 30},
    {"schedule": "linear", "min": 16, "max": 208, "multiple_of": 16, "warmup_steps": 77},
    {"schedule": "root", "min": 16, "max": 208, "multiple_of": 16, "warmup_steps": 77, "root_degree": 3},
    {"schedule": "staged", "min": 32, "max": 96, "multiple_of": 32, "stages": [[5, 32], [50, 64]]},
    {"schedule": "pow2", "min": 8, "max": 200, "multiple_of": 8, "cycles": 3},
])
def test_every_schedule_stays_in_range_on_the_grid_and_is_deterministic(cfg):
    a, b = build_schedule(cfg, seed=5, total_steps=300), build_schedule(cfg, seed=5, total_steps=300)
    values = [a(s) for s in range(300)]
    assert all(cfg["min"] <= v <= cfg["max"] and v % cfg["multiple_of"] == 0 for v in values)
    assert values == [b(s) for s in reversed(range(300))][::-1]
