"""Length schedules: pure functions ``schedule(step) -> L``, each owning its config keys.

A schedule depends only on its config, the run seed and the step, so every rank
and every restart agrees on the length of every step without communicating.

Each schedule is a typed section: the keys every schedule reads (``Lengths``)
plus its own, and ``lengths.schedule`` picks which. The clock a schedule runs on
(steps, or tokens seen) is the step plan's (``steps.build_schedule``). A key the chosen schedule does
not read is refused (``config`` names the schedules that read it). Each one's
``length_at(seed, total_steps)`` returns ``f(step, t) -> L``: ``step`` seeds the
random draws, ``t`` is the schedule's clock in steps (``step`` itself, or with
``lengths.by: tokens`` the tokens seen before the step / ``tokens_per_step``).
"""
from __future__ import annotations

import math
from typing import Callable, Literal

import numpy as np
from pydantic import Field

from raytrain.section import Problem, Section

LENGTH_STREAM = 1  # step_rng stream for length draws (windows use another)


class Lengths(Section):
    """The keys every schedule reads."""
    schedule: str = "uniform"
    """Length schedule: fixed, uniform, linear, root, staged or pow2 (each reads the keys marked with its name)."""
    min: int = Field(32, ge=1)
    """Shortest training length (tokens of input per row)."""
    max: int = Field(256, ge=1)
    """Longest training length; the fixed schedule always uses it."""
    multiple_of: int = Field(8, ge=1)
    """Every length is a multiple of this (keeps kernels efficient)."""
    by: Literal["steps", "tokens"] = "steps"
    """Clock the schedule runs on: optimizer steps, or tokens seen / train.tokens_per_step."""

    def problems(self) -> list[Problem]:
        """What is wrong with the keys every schedule reads; subclasses add their own."""
        problems, m = [], self.multiple_of
        if self.min > self.max:
            problems.append(("lengths.min", self.min, f"must be <= lengths.max ({self.max})"))
        for key in ("min", "max"):
            value = getattr(self, key)
            if value % m:
                problems.append((f"lengths.{key}", value,
                                 f"must be a multiple of lengths.multiple_of ({m}); try {max(m, value // m * m)}"))
        return problems

    def length_at(self, seed: int, total_steps: int) -> Callable[[int, float], int]:
        raise NotImplementedError

    def support(self) -> list[int]:
        """Every length the schedule can draw (the memory probe sizes itself by the largest micro-batch)."""
        return list(range(self.min, self.max + 1, self.multiple_of))


SCHEDULES: dict[str, type[Lengths]] = {}


def register(cls: type[Lengths]) -> type[Lengths]:
    SCHEDULES[cls.model_fields["schedule"].default] = cls
    return cls


def readers(key: str) -> list[str]:
    """The schedules that read ``key`` (of the lengths section)."""
    return sorted(name for name, cls in SCHEDULES.items() if key in cls.model_fields)


def schedule_model(cfg) -> Lengths:
    """A lengths section as its schedule's model (from the model itself or a dict of its keys)."""
    if not isinstance(cfg, dict):
        return cfg
    name = cfg.get("schedule", "uniform")
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    return SCHEDULES[name].model_validate(cfg)


def step_rng(seed: int, step: int, stream: int) -> np.random.Generator:
    """A generator that is a pure function of (seed, step, stream)."""
    return np.random.default_rng([seed, step, stream])


def warmup_length(t: float, cfg: Lengths, warmup_steps: int, root_degree: float) -> int:
    """DeepSpeed's fixed_root curriculum (fixed_linear is root_degree 1), at DeepSpeed step t + 1.

    ``floor((s / T) ** (1 / root) * (max - min) + min)``, rounded down to a
    multiple of ``multiple_of``, capped at ``max``; DeepSpeed counts the first
    step as 1, so a migrated config gives the same length at every step.
    """
    if warmup_steps == 0:
        return cfg.max
    progress = ((t + 1) / warmup_steps) ** (1.0 / root_degree)
    length = math.floor(progress * (cfg.max - cfg.min) + cfg.min)
    return min(length - length % cfg.multiple_of, cfg.max)


def uniform_multiple(rng: np.random.Generator, lo: int, hi: int, m: int) -> int:
    """Uniform over the multiples of m in [lo, hi] (lo, hi multiples of m)."""
    return int(rng.integers(lo // m, hi // m + 1)) * m


@register
class Fixed(Lengths):
    """Always ``max``: the usual fixed-length baseline."""
    schedule: Literal["fixed"] = "fixed"

    def length_at(self, seed, total_steps):
        return lambda step, t: self.max

    def support(self):
        return [self.max]


class Warmup(Lengths):
    """The schedules that grow toward ``max`` over ``warmup_steps``."""
    warmup_steps: int = Field(0, ge=0)
    """Steps over which the length (linear, root) or uniform's upper bound grows from min to max."""


@register
class Uniform(Warmup):
    """Uniform over the multiples of ``multiple_of`` in [min, hi(t)]; hi grows like ``linear`` over
    ``warmup_steps`` (hi = max when warmup_steps is 0)."""
    schedule: Literal["uniform"] = "uniform"

    def length_at(self, seed, total_steps):
        def length(step: int, t: float) -> int:
            hi = warmup_length(t, self, self.warmup_steps, 1.0)
            return uniform_multiple(step_rng(seed, step, LENGTH_STREAM), self.min, hi, self.multiple_of)
        return length


@register
class Linear(Warmup):
    """Sequence-length warmup, DeepSpeed ``fixed_linear``: min to max over ``warmup_steps``."""
    schedule: Literal["linear"] = "linear"

    def length_at(self, seed, total_steps):
        return lambda step, t: warmup_length(t, self, self.warmup_steps, 1.0)


@register
class Root(Warmup):
    """Sequence-length warmup, DeepSpeed ``fixed_root`` with ``root_degree``: fast early growth."""
    schedule: Literal["root"] = "root"
    root_degree: float = Field(2.0, ge=1)
    """root: the curriculum grows like (t / warmup_steps) ** (1 / root_degree)."""

    def length_at(self, seed, total_steps):
        return lambda step, t: warmup_length(t, self, self.warmup_steps, self.root_degree)


@register
class Staged(Lengths):
    """Shortformer-style stages: ``stages = [[until_step, length], ...]``; ``max`` after the last."""
    schedule: Literal["staged"] = "staged"
    stages: list[tuple[int, int]] = Field(default_factory=list)
    """staged: [[until_step, length], ...]: length for steps before until_step; lengths.max after the last stage."""

    def problems(self):
        problems, m = super().problems(), self.multiple_of
        if not self.stages:
            problems.append(("lengths.stages", [], "the staged schedule needs [[until_step, length], ...]"))
        untils = [until for until, _ in self.stages]
        if untils != sorted(set(untils)):
            problems.append(("lengths.stages", self.stages, "until_step values must strictly increase"))
        for until, length in self.stages:
            if not self.min <= length <= self.max or length % m:
                problems.append(("lengths.stages", [until, length],
                                 f"stage length must be a multiple of {m} in [lengths.min, lengths.max] = "
                                 f"[{self.min}, {self.max}]"))
        return problems

    def support(self):
        return sorted({length for _, length in self.stages} | {self.max})

    def length_at(self, seed, total_steps):
        def length(step: int, t: float) -> int:
            for until, value in self.stages:
                if t < until:
                    return value
            return self.max
        return length


def pow2_lengths(lo: int, hi: int) -> list[int]:
    return [2 ** k for k in range(math.ceil(math.log2(lo)), math.floor(math.log2(hi)) + 1)]


def pow2_weights(n: int, progress: float) -> np.ndarray:
    """Mixture over n buckets (short to long) moving linearly from favouring short to favouring long.

    At progress 0 the odds are n : n-1 : ... : 1; at progress 1 they are 1 : 2 : ... : n.
    """
    i = np.arange(n)
    weights = (1 - progress) * (n - i) + progress * (i + 1)
    return weights / weights.sum()


@register
class Pow2(Lengths):
    """Powers of two in [min, max], sampled per step from a mixture that grows from short to long over
    the run, repeated ``cycles`` times (Dataset Decomposition's "Grow-P2" variable sequence length curriculum)."""
    schedule: Literal["pow2"] = "pow2"
    cycles: int = Field(1, ge=1)
    """pow2: times the short-to-long mixture sweep repeats over the run."""

    def buckets(self) -> list[int]:
        return [b for b in pow2_lengths(self.min, self.max) if b % self.multiple_of == 0]

    def problems(self):
        problems = super().problems()
        if self.min <= self.max and not self.buckets():
            problems.append(("lengths.schedule", "pow2",
                             f"no power of two that is a multiple of {self.multiple_of} lies in [lengths.min, "
                             f"lengths.max] = [{self.min}, {self.max}]; widen the range"))
        return problems

    def support(self):
        return self.buckets()

    def length_at(self, seed, total_steps):
        buckets = self.buckets()

        def length(step: int, t: float) -> int:
            progress = min(1.0, (t * self.cycles / total_steps) % 1.0 if t < total_steps else 1.0)
            weights = pow2_weights(len(buckets), progress)
            return int(step_rng(seed, step, LENGTH_STREAM).choice(buckets, p=weights))
        return length
