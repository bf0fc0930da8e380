"""Length schedules: pure functions ``schedule(step) -> L``.

A schedule depends only on its config, the run seed and the step, so every rank
and every restart agrees on the length of every step without communicating.
Schedules are registered by name; ``lengths.schedule=NAME`` picks one.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

Schedule = Callable[[int], int]
SCHEDULES: dict[str, Callable[..., Schedule]] = {}


def register(name: str):
    def add(builder):
        SCHEDULES[name] = builder
        return builder
    return add


def build_schedule(cfg, seed: int = 0) -> Schedule:
    """Return ``schedule(step) -> int`` for the lengths section ``cfg``.

    ``cfg`` is a ``LengthsConfig`` or a dict with the same keys (validated here).
    """
    from raytrain.config import LengthsConfig  # config imports this module's registry

    if isinstance(cfg, dict):
        cfg = LengthsConfig.model_validate(cfg)
    return SCHEDULES[cfg.schedule](cfg, seed)


def step_rng(seed: int, step: int, stream: int) -> np.random.Generator:
    """A generator that is a pure function of (seed, step, stream).

    ``stream`` separates independent uses (lengths, windows) of the same step.
    """
    return np.random.default_rng([seed, step, stream])


LENGTH_STREAM = 1


@register("fixed")
def fixed(cfg, seed: int) -> Schedule:
    """Always ``max``: the usual fixed-length baseline."""
    return lambda step: cfg.max


@register("uniform")
def uniform(cfg, seed: int) -> Schedule:
    """Uniform over the multiples of ``multiple_of`` in [min, max]."""
    lo, hi, m = cfg.min // cfg.multiple_of, cfg.max // cfg.multiple_of, cfg.multiple_of

    def schedule(step: int) -> int:
        return int(step_rng(seed, step, LENGTH_STREAM).integers(lo, hi + 1)) * m
    return schedule
