"""Length schedules: pure functions ``schedule(step) -> L``.

A schedule depends only on its config, the run seed and the step, so every rank
and every restart agrees on the length of every step without communicating.
Schedules are registered by name; ``lengths.schedule=NAME`` picks one.

Each registered builder returns ``length_at(step, t)``: ``step`` seeds the
random draws, ``t`` is the schedule's clock in steps (``step`` itself, or with
``lengths.by: tokens`` the tokens seen before the step / ``tokens_per_step``).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

Schedule = Callable[[int], int]
SCHEDULES: dict[str, Callable] = {}
LENGTH_STREAM = 1  # step_rng stream for length draws (windows use another)


def register(name: str):
    def add(builder):
        SCHEDULES[name] = builder
        return builder
    return add


def build_schedule(cfg, seed: int = 0, total_steps: int = 1000, tokens_per_step: int | None = None) -> Schedule:
    """Return ``schedule(step) -> int`` for the lengths section ``cfg``.

    ``cfg`` is a ``LengthsConfig`` or a dict with the same keys (validated here).
    ``total_steps`` is the run's length (pow2 spreads its sweep over it);
    ``tokens_per_step`` drives the clock when ``cfg.by == "tokens"``.
    """
    from raytrain.config import LengthsConfig  # config imports this module's registry

    if isinstance(cfg, dict):
        cfg = LengthsConfig.model_validate(cfg)
    length_at = SCHEDULES[cfg.schedule](cfg, seed, total_steps)
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
            self.seen.append(self.seen[i] + self.tokens_per_step // length * length)
        return self.length_at(step, self.seen[step] / self.tokens_per_step)


def step_rng(seed: int, step: int, stream: int) -> np.random.Generator:
    """A generator that is a pure function of (seed, step, stream)."""
    return np.random.default_rng([seed, step, stream])


def warmup_length(t: float, cfg, root_degree: float) -> int:
    """DeepSpeed's fixed_root curriculum (fixed_linear is root_degree 1), at DeepSpeed step t + 1.

    ``floor((s / T) ** (1 / root) * (max - min) + min)``, rounded down to a
    multiple of ``multiple_of``, capped at ``max``; DeepSpeed counts the first
    step as 1, so a migrated config gives the same length at every step.
    """
    if cfg.warmup_steps == 0:
        return cfg.max
    progress = ((t + 1) / cfg.warmup_steps) ** (1.0 / root_degree)
    length = math.floor(progress * (cfg.max - cfg.min) + cfg.min)
    return min(length - length % cfg.multiple_of, cfg.max)


def uniform_multiple(rng: np.random.Generator, lo: int, hi: int, m: int) -> int:
    """Uniform over the multiples of m in [lo, hi] (lo, hi multiples of m)."""
    return int(rng.integers(lo // m, hi // m + 1)) * m


@register("fixed")
def fixed(cfg, seed: int, total_steps: int):
    """Always ``max``: the usual fixed-length baseline."""
    return lambda step, t: cfg.max


@register("uniform")
def uniform(cfg, seed: int, total_steps: int):
    """Uniform over the multiples of ``multiple_of`` in [min, hi(t)]; hi grows like ``linear`` over
    ``warmup_steps`` (hi = max when warmup_steps is 0)."""
    def length_at(step: int, t: float) -> int:
        hi = warmup_length(t, cfg, 1.0)
        return uniform_multiple(step_rng(seed, step, LENGTH_STREAM), cfg.min, hi, cfg.multiple_of)
    return length_at


@register("linear")
def linear(cfg, seed: int, total_steps: int):
    """Sequence-length warmup, DeepSpeed ``fixed_linear``: min to max over ``warmup_steps``."""
    return lambda step, t: warmup_length(t, cfg, 1.0)


@register("root")
def root(cfg, seed: int, total_steps: int):
    """Sequence-length warmup, DeepSpeed ``fixed_root`` with ``root_degree``: fast early growth."""
    return lambda step, t: warmup_length(t, cfg, cfg.root_degree)


@register("staged")
def staged(cfg, seed: int, total_steps: int):
    """Shortformer-style stages: ``stages = [[until_step, length], ...]``; ``max`` after the last."""
    def length_at(step: int, t: float) -> int:
        for until, length in cfg.stages:
            if t < until:
                return length
        return cfg.max
    return length_at


def pow2_lengths(lo: int, hi: int) -> list[int]:
    return [2 ** k for k in range(math.ceil(math.log2(lo)), math.floor(math.log2(hi)) + 1)]


def pow2_weights(n: int, progress: float) -> np.ndarray:
    """Mixture over n buckets (short to long) moving linearly from favouring short to favouring long.

    At progress 0 the odds are n : n-1 : ... : 1; at progress 1 they are 1 : 2 : ... : n.
    """
    i = np.arange(n)
    weights = (1 - progress) * (n - i) + progress * (i + 1)
    return weights / weights.sum()


@register("pow2")
def pow2(cfg, seed: int, total_steps: int):
    """Powers of two in [min, max], sampled per step from a mixture that grows from short to long over
    the run, repeated ``cycles`` times (Dataset Decomposition's "Grow-P2" variable sequence length curriculum)."""
    buckets = [b for b in pow2_lengths(cfg.min, cfg.max) if b % cfg.multiple_of == 0]

    def length_at(step: int, t: float) -> int:
        progress = min(1.0, (t * cfg.cycles / total_steps) % 1.0 if t < total_steps else 1.0)
        weights = pow2_weights(len(buckets), progress)
        return int(step_rng(seed, step, LENGTH_STREAM).choice(buckets, p=weights))
    return length_at
