"""The step plan: what every optimizer step trains on, as a pure function of the config, corpus size and step.

The single owner of step arithmetic, asked by the loop, ``raytrain plan``,
``raytrain report``, evaluation and ``bench/``: the length of a step, its rows
(``tokens_per_step // L``, nothing padded), where its windows start, each rank's
share, the micro-batches (the same count on every rank, so collective calls stay
in step), the largest micro-batch any rank runs, and the model FLOPs of a step.
"""
from __future__ import annotations

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


def build_schedule(cfg, seed: int = 0, total_steps: int = 1000,
                   tokens_per_step: int | None = None) -> Callable[[int], int]:
    """Return ``schedule(step) -> int`` for a lengths section (a schedule's model or a dict of its keys).

    ``total_steps`` is the run's length (pow2 spreads its sweep over it);
    ``tokens_per_step`` drives the clock when ``cfg.by == "tokens"``.
    """
    cfg = schedule_model(cfg)
    length_at = cfg.length_at(seed, total_steps)
    if cfg.by == "tokens":
        return TokenClock(length_at, tokens_per_step or cfg.max)
    return lambda step: length_at(step, step)


class TokenClock:
    """Runs a schedule on tokens seen: t = tokens before the step / tokens_per_step.

    With constant-token batches this differs from the step clock only by the
    rounding of ``tokens_per_step // L``; tokens seen are themselves a pure
    function of the earlier steps' lengths, computed once and memoized.
    """

    def __init__(self, length_at, tokens_per_step: int):
        self.length_at, self.tokens_per_step, self.seen = length_at, tokens_per_step, [0]

    def __call__(self, step: int) -> int:
        while len(self.seen) <= step:
            i = len(self.seen) - 1
            length = self.length_at(i, self.seen[i] / self.tokens_per_step)
            self.seen.append(self.seen[i] + rows_of(self.tokens_per_step, length) * length)
        return self.length_at(step, self.seen[step] / self.tokens_per_step)


@dataclass(frozen=True)
class StepPlan:
    """What one optimizer step trains on."""
    step: int
    length: int  # L: every row has L inputs and L targets
    rows: int  # rows of the global batch
    offsets: np.ndarray  # (rows,) window starts in the train stream
    world: int
    rows_per_micro: int

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
        self.schedule = build_schedule(lengths, seed, train.max_steps, train.tokens_per_step)
        self.offsets = window_offsets(windows, n_tokens, seed, self.schedule, train.tokens_per_step)

    def __call__(self, step: int) -> StepPlan:
        length = self.schedule(step)
        rows = rows_of(self.train.tokens_per_step, length)
        return StepPlan(step, length, rows, self.offsets(step, length, rows), self.world, self.rows_per_micro(length))

    def rows_per_micro(self, length: int) -> int:
        """The most rows one forward takes at length L (training's micro-batch; evaluation's batch too)."""
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
        """Model FLOPs of the whole run, every step at its scheduled length."""
        return sum(self.flops(step, model) for step in range(self.train.max_steps))

    def flops(self, step: int, model: ModelShape) -> float:
        length = self.schedule(step)
        return rows_of(self.train.tokens_per_step, length) * length * model.flops_per_token(length)


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

    def __init__(self, n_tokens: int, schedule, tokens_per_step: int):
        self.n_tokens, self.schedule, self.tokens_per_step = n_tokens, schedule, tokens_per_step
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
            n = self.schedule(i)
            self.cursor.append(self._lay(self.cursor[i], n, rows_of(self.tokens_per_step, n))[1])
        return self._lay(self.cursor[step], length, rows)[0]


def window_offsets(mode: str, n_tokens: int, seed: int, schedule, tokens_per_step: int):
    """``offsets(step, length, rows)`` for ``data.windows``: the global batch's window starts."""
    if mode == "sequential":
        return SequentialOffsets(n_tokens, schedule, tokens_per_step)
    return lambda step, length, rows: random_offsets(n_tokens, seed, step, length, rows)


def eval_offsets(n_tokens: int, length: int, tokens: int) -> np.ndarray:
    """Deterministic non-overlapping windows of the validation split: no target is scored twice."""
    rows = min(max(1, tokens // length), (n_tokens - 1) // length)
    return np.arange(rows) * length
