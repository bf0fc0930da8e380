"""Fast tier: the token stream over shards, windows, the step plan, and the byte tokenizer (no Ray)."""
import numpy as np
import pytest
from transformers import AutoTokenizer

from raytrain.data import TokenStream
from raytrain.loading import load_config
from raytrain.steps import Planner, SequentialOffsets, StepPlan, eval_offsets, random_offsets

TEXT = "def f(x):\n    return x * 2  # é€\n"


def test_byte_tokenizer_ids_are_utf8_bytes_and_survive_save(tokenizer, tmp_path):
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert ids == list(TEXT.encode("utf-8"))
    assert len(tokenizer) == 257 and tokenizer.eos_token_id == 256
    assert tokenizer.decode(ids) == TEXT
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert again(TEXT, add_special_tokens=False)["input_ids"] == ids and again.eos_token_id == 256


def sharded(stream: np.ndarray, cuts: list[int]) -> TokenStream:
    edges = [0, *cuts, stream.size]
    return TokenStream([stream[a:b].astype(np.uint16) for a, b in zip(edges, edges[1:])])


def test_windows_across_shard_boundaries_equal_the_single_stream():
    stream = np.random.default_rng(0).integers(0, 257, 5_000)
    tokens = sharded(stream, [7, 8, 1000, 1001, 3333])  # tiny and empty-adjacent shards too
    assert tokens.size == stream.size and len(tokens.shards) == 6
    assert tokens[0:5000].tolist() == stream.tolist() and tokens[995:1010].tolist() == stream[995:1010].tolist()
    for length in (1, 16, 64, 999):
        offsets = np.array([0, 3, 6, 7, 8, 990, 999, 1000, 3300, 5000 - length - 1])
        windows = tokens.windows(offsets, length)
        assert windows.shape == (offsets.size, length + 1) and windows.dtype == np.int64
        for row, start in zip(windows, offsets):  # every window is a contiguous slice: nothing padded
            assert row.tolist() == stream[start:start + length + 1].tolist()


def plan_config(**keys):
    return load_config(None, [f"{k}={v}" for k, v in keys.items()], environment=False)


def test_step_plan_shapes_budget_and_no_padding():
    stream = np.arange(10_000) % 251
    tokens = sharded(stream, [4000])
    cfg = plan_config(**{"lengths.min": 8, "lengths.max": 128, "train.tokens_per_step": 1000})
    plan = Planner(cfg.lengths, cfg.train, "random", 1, stream.size, world=1)
    for step in range(20):
        p = plan(step)
        assert p.length == plan.schedule(step) and p.rows == 1000 // p.length
        assert p.targets == p.rows * p.length and 1000 - p.length < p.targets <= 1000  # constant token budget
        (windows,) = p.rank_batches(tokens, 0)
        assert windows.shape == (p.rows, p.length + 1)
        for row, start in zip(windows, p.offsets):
            assert row.tolist() == stream[start:start + p.length + 1].tolist()
    again = Planner(cfg.lengths, cfg.train, "random", 1, stream.size, world=1)
    assert [again(s).offsets.tolist() for s in (5, 2, 19)] == [plan(s).offsets.tolist() for s in (5, 2, 19)]


@pytest.mark.parametrize("world,micro_tokens", [(2, 10**9), (2, 64), (3, 40), (1, 64)])
def test_global_batch_is_independent_of_workers_and_micro_batches(world, micro_tokens):
    stream = np.random.default_rng(0).integers(0, 257, 50_000)
    tokens = sharded(stream, [20_000])
    offsets = random_offsets(stream.size, 0, 9, 32, 13)
    whole = StepPlan(9, 32, 13, offsets, 1, 10**9)
    reference = np.concatenate(whole.rank_batches(tokens, 0))
    plan = StepPlan(9, 32, 13, offsets, world, max(1, micro_tokens // 32))
    parts = [plan.rank_batches(tokens, r) for r in range(world)]
    assert len({len(p) for p in parts}) == 1 == len({plan.micro_batches})  # equally many on every rank
    assert all(c.shape[0] <= max(1, micro_tokens // 32) for p in parts for c in p)
    assert np.array_equal(np.concatenate([c for p in parts for c in p]), reference)


@pytest.mark.parametrize("keys,world,expected", [
    # no micro_batch_tokens, a rank runs its whole share: 8192 // 248 = 33 rows, 17 on the larger of 2 ranks
    ({}, 2, (17, 248)),
    ({}, 1, (32, 256)),  # one rank: 32 x 256 = 8192 tokens beats 33 x 248 = 8184
    ({"train.micro_batch_tokens": 1000}, 2, (5, 200)),  # 40 rows, 20 a rank, 4 micro-batches of 5
    ({"lengths.schedule": "fixed"}, 2, (16, 256)),  # fixed draws only lengths.max
    # staged 64 then 256: 64 x 64 and 16 x 256 tokens tie; the longer length wins (attention grows with L)
    ({"lengths.schedule": "staged", "lengths.stages": "[[10,64]]", "lengths.min": 64}, 2, (16, 256)),
])
def test_largest_micro_batch_over_every_length(keys, world, expected):
    cfg = plan_config(**keys)
    plan = Planner(cfg.lengths, cfg.train, "random", 0, 10**6, world)
    largest = plan.largest_micro_batch()
    assert (largest.micro_rows, largest.length) == expected
    # independently: over every length the schedule can draw, the largest micro-batch any rank runs
    best = (0, 0)
    drawn = {plan.schedule(step) for step in range(3000)}  # what the schedule really draws
    for length in drawn:
        p = StepPlan(0, length, 8192 // length, np.zeros(8192 // length, dtype=np.int64), world,
                     max(1, (cfg.train.micro_batch_tokens or 8192) // length))
        biggest = max(len(c) for r in range(world) for c in np.array_split(np.arange(len(p.share(r))),
                                                                            p.micro_batches))
        best = max(best, (biggest, length), key=lambda s: (s[0] * s[1], s[1]))
    assert best == expected


def test_eval_windows_do_not_overlap():
    offsets = eval_offsets(1000, 64, 10_000)
    assert offsets.tolist() == [64 * i for i in range(15)]  # (1000 - 1) // 64 windows fit
    windows = TokenStream([np.arange(1000)]).windows(offsets, 64)
    targets = windows[:, 1:].flatten()
    assert len(set(targets.tolist())) == targets.size == 15 * 64
    assert eval_offsets(1000, 64, 200).size == 3


def test_a_batch_warmup_grows_each_steps_budget_on_tokens_seen_and_scales_the_lr():
    """Budget = start + (full - start) x min(1, tokens seen / warmup tokens), recomputed here step by step from
    the lengths drawn; a length schedule on tokens seen runs on the same tokens; the lr follows sqrt(budget)."""
    from raytrain.engine import lr_schedule
    keys = {"lengths.schedule": "linear", "lengths.min": 16, "lengths.max": 128, "lengths.multiple_of": 16,
            "lengths.warmup_steps": 5, "lengths.by": "tokens", "train.tokens_per_step": 4096,
            "train.batch_warmup_tokens": 20_000, "train.batch_start_tokens": 512, "train.max_steps": 30,
            "train.warmup_steps": 0, "train.min_lr_ratio": 1.0}
    cfg = plan_config(**keys)
    plan = Planner(cfg.lengths, cfg.train, "sequential", 0, 10**6, world=2)
    seen, lr_at = 0, lr_schedule(cfg.train)
    for step in range(30):
        p = plan(step)
        budget = int(512 + (4096 - 512) * min(1.0, seen / 20_000))
        length = min(128, int((seen / 4096 + 1) / 5 * (128 - 16) + 16) // 16 * 16)  # DeepSpeed's, t = seen / 4096
        assert (p.budget, p.rows, p.length) == (budget, budget // length, length), step
        assert lr_at(step, seen, p.budget) == pytest.approx(3e-3 * (budget / 4096) ** 0.5)
        seen += p.targets
    assert p.budget == 4096 and plan.total_tokens() == seen
    assert plan(0).budget == 512 and plan(0).rows == 512 // plan(0).length
    linear = lr_schedule(plan_config(**keys, **{"train.batch_lr_scaling": "linear"}).train)
    assert linear(0, 0, 512) == pytest.approx(3e-3 / 8)


@pytest.mark.parametrize("start, fix", [(16384, "must be <= train.tokens_per_step"), (100, "at least one row"),
                                        (256, "fewer than scaling.num_workers")])
def test_a_batch_warmups_first_step_is_checked_like_every_step(start, fix):
    from raytrain.section import ConfigError
    with pytest.raises(ConfigError, match=fix) as err:
        load_config(None, ["train.batch_warmup_tokens=10000", f"train.batch_start_tokens={start}",
                           "lengths.max=256", "lengths.min=32"], environment=False)
    assert "train.batch_start_tokens" in str(err.value)


def test_sequential_windows_target_every_token_once_per_epoch():
    n = 5_000
    lengths = [64, 16, 128, 48, 16, 96] * 40
    windows = SequentialOffsets(n, lambda step: (lengths[step], 512))
    targets = []
    for step, length in enumerate(lengths):
        rows = 512 // length
        for start in windows(step, length, rows):
            assert 0 <= start and start + length < n  # the whole window lies in the stream
            targets.extend(range(start + 1, start + length + 1))
    epochs, current = [], []
    for t in targets:  # an epoch ends where the targets jump back to the start
        if current and t <= current[-1]:
            epochs.append(current)
            current = []
        current.append(t)
    assert len(epochs) >= 2
    for epoch in epochs:
        assert epoch == list(range(1, len(epoch) + 1))  # consecutive, none twice, none skipped
        assert n - 1 - len(epoch) < 128  # only a tail shorter than one window is left out
    fresh = SequentialOffsets(n, lambda step: (lengths[step], 512))
    assert fresh(100, lengths[100], 512 // lengths[100]).tolist() == \
        windows(100, lengths[100], 512 // lengths[100]).tolist()  # a resumed run continues exactly
