"""The step plan: what every optimizer step trains on, as a pure function of the config, corpus size and step.

The single owner of step arithmetic, asked by the loop, ``raytrain plan``,
``raytrain report``, evaluation and ``bench/``: the length of a step, its rows
(``budget // L``, nothing padded; the budget is ``tokens_per_step``, or less in
a batch warmup), where its windows start, each rank's share, the micro-batches
(the same count on every rank, so collective calls stay in step), the largest
micro-batch any rank runs, and the model FLOPs of a step.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from raytrain.lengths import schedule_model, step_rng

WINDOW_STREAM = 2  # step_rng stream for window offsets (lengths use stream 1)


def shard(rows: int, rank: int, world: int) -> slice:
    """This rank's contiguous share of ``rows`` (shares differ by at most one row)."""
    return slice(rank * rows // world, (rank + 1) * rows // world)


def rows_of(tokens: int, length: int) -> int:
    """Rows of L + 1 tokens a budget of ``tokens`` targets holds at length L: nothing is padded."""
    return tokens // length


def rows_per_micro(tokens_per_step: int, micro_batch_tokens: Optional[int], length: int, world: int) -> int:
    """The most rows one forward and backward takes at length L: ``micro_batch_tokens // L`` when set, else a
    rank's whole share of the step (the one definition of the default micro-batch; evaluation uses it too)."""
    if micro_batch_tokens:
        return max(1, micro_batch_tokens // length)
    return -(-rows_of(tokens_per_step, length) // world)


def micro_batches(rows: int, world: int, per_micro: int) -> int:
    """Micro-batches per rank for ``rows`` split over ``world``; the same on every rank."""
    largest_share = -(-rows // world)
    return -(-largest_share // per_micro)


@dataclass(frozen=True)
class Shape:
    """One step at length L: global rows, the largest rank share, micro-batches per rank, rows per micro-batch."""
    length: int
    rows: int
    rank_rows: int
    micro_batches: int
    micro_rows: int


def step_shape(length: int, tokens_per_step: int, micro_batch_tokens: Optional[int], world: int) -> Shape:
    rows = rows_of(tokens_per_step, length)
    rank_rows = -(-rows // world)
    count = micro_batches(rows, world, rows_per_micro(tokens_per_step, micro_batch_tokens, length, world))
    return Shape(length, rows, rank_rows, count, -(-rank_rows // count))


@dataclass(frozen=True)
class ModelShape:
    """What a model's FLOPs per token depend on: the matmul weights a token passes through (every linear layer,
    the output head included), and the layers and width of attention."""
    weights: int
    layers: int
    attention_width: int

    def flops_per_token(self, length: int) -> float:
        """Model FLOPs of one token's forward and backward at length L (backward = 2x forward): 2 per matmul
        weight, plus attention's two L-long matmuls per layer over the full L x L square (PaLM's convention)."""
        return 3 * (2 * self.weights + 4 * self.layers * self.attention_width * length)


def batch_budget(train) -> Callable[[int], int]:
    """``budget(tokens seen) -> int``: a step's target tokens. With ``train.batch_warmup_tokens`` it grows
    linearly from ``train.batch_start_tokens`` to ``tokens_per_step`` over that many tokens seen (the token
    clock, so a schedule of short steps does not stretch it), then stays; without, it is ``tokens_per_step``."""
    full, start, over = train.tokens_per_step, train.batch_start_tokens, train.batch_warmup_tokens
    if not over:
        return lambda seen: full
    return lambda seen: int(start + (full - start) * min(1.0, seen / over))


class StepClock:
    """``clock(step) -> (L, budget)``: the length and the target-token budget of every step.

    A schedule runs on steps or on tokens seen / ``tokens_per_step``, and a batch
    warmup on tokens seen; tokens seen before a step are themselves a pure
    function of the earlier steps' lengths and budgets (``budget // L`` rows of L
    targets), computed once and memoized, so a resumed run recomputes the same.
    """

    def __init__(self, length_at, by_tokens: bool, tokens_per_step: int, budget_at: Callable[[int], int]):
        self.length_at, self.by_tokens, self.tokens_per_step = length_at, by_tokens, tokens_per_step
        self.budget_at, self.seen, self.steps = budget_at, [0], []
        self.lock = threading.Lock()  # the read-ahead thread plans steps while the loop asks too

    def __call__(self, step: int) -> tuple[int, int]:
        with self.lock:
            return self._fill(step)

    def _fill(self, step: int) -> tuple[int, int]:
        while len(self.steps) <= step:
            i, seen = len(self.steps), self.seen[-1]
            length = self.length_at(i, seen / self.tokens_per_step if self.by_tokens else i)
            budget = self.budget_at(seen)
            self.steps.append((length, budget))
            self.seen.append(seen + rows_of(budget, length) * length)
        return self.steps[step]

    def adopt(self, history: list[tuple[int, int]]) -> None:
        """Take the (L, budget) of the steps already trained as given (a run continued from a checkpoint made
        under other settings trained those); steps after them are this clock's own."""
        with self.lock:
            self.steps, self.seen = [tuple(s) for s in history], [0]
            for length, budget in self.steps:
                self.seen.append(self.seen[-1] + rows_of(budget, length) * length)

    def history(self, steps: int) -> list[tuple[int, int]]:
        """(L, budget) of the first ``steps`` steps."""
        with self.lock:
            self._fill(steps - 1)
            return self.steps[:steps]

    def tokens_before(self, step: int) -> int:
        with self.lock:
            self._fill(step)
            return self.seen[step]


def build_schedule(cfg, seed: int = 0, total_steps: int = 1000,
                   tokens_per_step: int | None = None) -> Callable[[int], int]:
    """``schedule(step) -> L`` of a lengths section alone, every step at ``tokens_per_step`` (default
    ``lengths.max``) when the schedule runs on tokens seen."""
    cfg = schedule_model(cfg)
    full = tokens_per_step or cfg.max
    clock = StepClock(cfg.length_at(seed, total_steps), cfg.by == "tokens", full, lambda seen: full)
    return lambda step: clock(step)[0]


@dataclass(frozen=True)
class StepPlan:
    """What one optimizer step trains on."""
    step: int
    length: int  # L: every row has L inputs and L targets
    rows: int  # rows of the global batch: budget // L
    offsets: np.ndarray  # (rows,) window starts in the train stream
    world: int
    rows_per_micro: int
    budget: int = 0  # the step's target-token budget (train.tokens_per_step, or less in a batch warmup)

    @property
    def targets(self) -> int:
        """Targets of the whole global step: nothing is padded, so every row has L."""
        return self.rows * self.length

    @property
    def micro_batches(self) -> int:
        return micro_batches(self.rows, self.world, self.rows_per_micro)

    @property
    def micro_rows(self) -> int:
        """The most rows any rank's micro-batch of this step holds."""
        largest_share = -(-self.rows // self.world)
        return -(-largest_share // self.micro_batches)

    def share(self, rank: int) -> np.ndarray:
        return self.offsets[shard(self.rows, rank, self.world)]

    def rank_batches(self, stream, rank: int) -> list[np.ndarray]:
        """This rank's (rows, L + 1) micro-batches; one may be empty when a share is smaller than the count."""
        return np.array_split(stream.windows(self.share(rank), self.length), self.micro_batches)

    def flops(self, model: ModelShape) -> float:
        return self.targets * model.flops_per_token(self.length)


class Planner:
    """``plan(step) -> StepPlan`` for the lengths and train sections, ``data.windows``, the seed, the corpus
    size and the number of ranks."""

    def __init__(self, lengths, train, windows: str, seed: int, n_tokens: int, world: int):
        self.lengths, self.train, self.world = lengths, train, world
        schedule = schedule_model(lengths)
        self.clock = StepClock(schedule.length_at(seed, train.max_steps), schedule.by == "tokens",
                               train.tokens_per_step, batch_budget(train))
        self.offsets = window_offsets(windows, n_tokens, seed, self.clock)
        self.adopt = self.clock.adopt  # sequential windows' cursor reads the clock, so it follows too

    def __call__(self, step: int) -> StepPlan:
        length, budget = self.clock(step)
        rows = rows_of(budget, length)
        return StepPlan(step, length, rows, self.offsets(step, length, rows), self.world, self.rows_per_micro(length),
                        budget)

    def schedule(self, step: int) -> int:
        """The length of ``step``."""
        return self.clock(step)[0]

    def rows_per_micro(self, length: int) -> int:
        """The most rows one forward takes at length L (training's micro-batch; evaluation's batch too), sized by
        the full budget: a batch warmup's smaller steps only take fewer micro-batches."""
        return rows_per_micro(self.train.tokens_per_step, self.train.micro_batch_tokens, length, self.world)

    def shape(self, length: int) -> Shape:
        return step_shape(length, self.train.tokens_per_step, self.train.micro_batch_tokens, self.world)

    def shapes(self) -> list[Shape]:
        """The shape of a step at every length the schedule can draw, shortest first."""
        return [self.shape(length) for length in self.lengths.support()]

    def largest_micro_batch(self) -> Shape:
        """The step shape whose micro-batch is the largest any rank runs (most tokens, then the longest)."""
        return max(self.shapes(), key=lambda s: (s.micro_rows * s.length, s.length))

    def total_flops(self, model: ModelShape) -> float:
        """Model FLOPs of the whole run, every step at its scheduled length and budget."""
        return sum(self.flops(step, model) for step in range(self.train.max_steps))

    def total_tokens(self) -> int:
        """Targets of the whole run."""
        return self.clock.tokens_before(self.train.max_steps)

    def flops(self, step: int, model: ModelShape) -> float:
        length, budget = self.clock(step)
        return rows_of(budget, length) * length * model.flops_per_token(length)


# --- where windows start ------------------------------------------------------

def random_offsets(n_tokens: int, seed: int, step: int, length: int, rows: int) -> np.ndarray:
    """Uniformly random window starts: a pure function of (seed, step, length, rows)."""
    return step_rng(seed, step, WINDOW_STREAM).integers(0, n_tokens - length, size=rows)


class SequentialOffsets:
    """Consecutive windows through the stream, whatever each step's L: every token is a target once per epoch.

    A window that would cross the end of the stream starts the next epoch at 0
    instead (the < L tokens left at the end of an epoch are skipped). The
    cursor before each step is a pure function of the earlier steps' lengths,
    computed once and memoized, so a resumed run continues where it left off.
    """

    def __init__(self, n_tokens: int, clock: Callable[[int], tuple[int, int]]):
        self.n_tokens, self.clock = n_tokens, clock  # clock(step) -> (L, budget)
        self.cursor = [0]  # start of the next window before step i

    def _lay(self, start: int, length: int, rows: int) -> tuple[np.ndarray, int]:
        offsets, cursor = [], start
        for _ in range(rows):
            if cursor + length >= self.n_tokens:  # the window's last token would be past the end
                cursor = 0
            offsets.append(cursor)
            cursor += length  # the next window's first input is this one's last target
        return np.asarray(offsets, dtype=np.int64), cursor

    def __call__(self, step: int, length: int, rows: int) -> np.ndarray:
        while len(self.cursor) <= step:
            i = len(self.cursor) - 1
            n, budget = self.clock(i)
            self.cursor.append(self._lay(self.cursor[i], n, rows_of(budget, n))[1])
        return self._lay(self.cursor[step], length, rows)[0]


def window_offsets(mode: str, n_tokens: int, seed: int, clock):
    """``offsets(step, length, rows)`` for ``data.windows``: the global batch's window starts."""
    if mode == "sequential":
        return SequentialOffsets(n_tokens, clock)
    return lambda step, length, rows: random_offsets(n_tokens, seed, step, length, rows)


def eval_offsets(n_tokens: int, length: int, tokens: int) -> np.ndarray:
    """Deterministic non-overlapping windows of the validation split: no target is scored twice."""
    rows = min(max(1, tokens // length), (n_tokens - 1) // length)
    return np.arange(rows) * length
