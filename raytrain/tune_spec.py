"""A search's spec (the tune config), its validation, and the candidates it draws.

Candidates are drawn up front (Tune's own distributions, seeded) and each is
validated as a full training config before anything launches: an invalid
combination (min above max, ...) is redrawn, or skipped with a note when only
grid values make it invalid, and one that cannot fit in memory is skipped with
``raytrain plan``'s numbers.
"""
from __future__ import annotations

import difflib
import itertools
import json
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
from pydantic import Field

from raytrain.config import Config, flatten
from raytrain.lengths import SCHEDULES
from raytrain.loading import apply_overrides, load_config, read_yaml, validate_section
from raytrain.section import ConfigError, Section

DISTRIBUTIONS = {"choice", "uniform", "loguniform", "randint", "quniform", "grid"}
REDRAWS = 50


class BaseRun(Section):
    config: Optional[str] = None
    """Training config file (relative to the tune config) every trial starts from; null for the defaults."""
    overrides: dict[str, Any] = Field(default_factory=dict)
    """Training keys set for every trial, e.g. {train.max_steps: 60}."""


class Objective(Section):
    metric: str = "val/loss@max"
    """val/loss@max (the trial's lengths.max), val/loss@mean (over eval.lengths), or val/loss@L for an eval length."""
    mode: Literal["min", "max"] = "min"
    """min for losses."""


class Scheduler(Section):
    type: Literal["asha", "fifo", "pbt"] = "asha"
    """asha stops the worst trials early; fifo runs every trial to the end; pbt (population-based training) has
    the worst trials copy a better one's checkpoint mid-run and perturb its length keys and train.lr."""
    time_attr: Literal["tokens", "elapsed_s"] = "tokens"
    """The time axis trials are compared on: tokens seen, or training wall time in seconds."""
    grace_period: Optional[float] = Field(None, gt=0)
    """asha: time (in time_attr units) every trial gets before it can be stopped; null: an eighth of the run."""
    reduction_factor: float = Field(2, gt=1)
    """asha: keeps 1 / reduction_factor of the trials at each rung."""
    perturbation_interval: Optional[float] = Field(None, gt=0)
    """pbt: time (in time_attr units) between a trial's exploits; null: a quarter of the run."""
    quantile_fraction: float = Field(0.25, gt=0, le=0.5)
    """pbt: the bottom fraction of trials that copy one of the top fraction."""
    resample_probability: float = Field(0.25, ge=0, le=1)
    """pbt: the chance a perturbed key is drawn afresh from its distribution instead of moved a step."""
    synch: bool = False
    """pbt: true waits until every trial reaches each perturbation point and exploits then (each trial pauses
    and resumes from its checkpoint); false lets each trial exploit when it gets there."""


class TuneSpec(Section):
    name: str = "search"
    """Experiment name: the directory under dir."""
    dir: str = "runs/tune"
    """Parent of the experiment directory."""
    base: BaseRun = BaseRun()
    search: dict[str, Any] = Field(default_factory=dict)
    """Training key -> one distribution: choice, uniform, loguniform, randint, quniform or grid."""
    num_samples: int = Field(4, ge=1)
    """Random draws (each crossed with every grid combination)."""
    seed: int = Field(0, ge=0, lt=2**32)
    """Seeds the draws (0 to 2**32 - 1)."""
    objective: Objective = Objective()
    scheduler: Scheduler = Scheduler()
    max_concurrent: Optional[int] = Field(None, ge=1)
    """Trials at once; null: as many as the cluster's CPUs (or GPUs) host, given each trial's workers."""


def load_spec(path: str, overrides: list[str] = ()) -> TuneSpec:
    """Read and validate a tune config; every problem is reported at once."""
    raw = read_yaml(path, "tune config")
    problems = apply_overrides(raw, list(overrides))
    spec, found = validate_section(TuneSpec, raw, "")
    problems += found
    base_path = base_path_of(spec, path)
    if not spec.search:
        problems.append(("search", spec.search, "is empty: give at least one training key to search, e.g. "
                                                "{train.lr: {loguniform: [1.0e-4, 1.0e-2]}}"))
    problems += search_problems(spec, base_path)
    if problems:
        raise ConfigError(problems)
    return spec


def base_path_of(spec: TuneSpec, tune_path: str) -> Optional[str]:
    return None if spec.base.config is None else str(Path(tune_path).parent / spec.base.config)


def base_config(spec: TuneSpec, base_path: Optional[str], extra: list[str] = (), environment: bool = True) -> Config:
    overrides = [f"{k}={json.dumps(v)}" for k, v in spec.base.overrides.items()] + list(extra)
    return load_config(base_path, overrides, environment=environment, adapt_lengths=True)


def search_problems(spec: TuneSpec, base_path: Optional[str]) -> list:
    problems = []
    try:
        base = base_config(spec, base_path, environment=False)
    except ConfigError as err:
        return [("base." + key, value, fix) for key, value, fix in err.problems]
    keys = set(flatten(base.model_dump(mode="json")))
    for key, dist in spec.search.items():
        where = f"search.{key}"
        if key not in keys:
            close = difflib.get_close_matches(key, sorted(keys), n=1)
            problems.append((where, dist, "not a training key" + (f"; did you mean '{close[0]}'?" if close else "")))
            continue
        if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
            problems.append((where, dist,
                             f"write one distribution: {{NAME: args}} with NAME in {sorted(DISTRIBUTIONS)}"))
            continue
        kind, args = next(iter(dist.items()))
        if not isinstance(args, list) or not args:
            problems.append((where, dist, f"{kind} needs a non-empty list" + (" of values" if kind in ("choice", "grid")
                                                                             else "")))
        elif kind in ("uniform", "loguniform", "randint", "quniform"):
            need = 3 if kind == "quniform" else 2
            if len(args) != need or not all(isinstance(a, (int, float)) for a in args):
                problems.append((where, dist, f"{kind} takes [{'lo, hi, q' if need == 3 else 'lo, hi'}] numbers"))
            elif args[0] >= args[1]:
                problems.append((where, dist, f"bounds reversed or empty: lo ({args[0]}) must be below hi ({args[1]})"))
            elif kind == "loguniform" and args[0] <= 0:
                problems.append((where, dist, "loguniform bounds must be positive"))
    if spec.scheduler.type == "pbt":
        problems += population_problems(spec)
    metric = spec.objective.metric
    lengths = set(base.eval.lengths)
    if "lengths.max" not in spec.search:
        lengths.add(base.lengths.max)
    valid = {"val/loss@max", "val/loss@mean"} | {f"val/loss@{L}" for L in lengths}
    if metric not in valid:
        problems.append(("objective.metric", metric, f"not a reported metric; choose one of {sorted(valid)}"))
    return problems


MID_RUN = ("lengths.", "train.lr")  # what a population-based exploit may change: the rest fixes the run's math


def population_problems(spec: TuneSpec) -> list:
    """PBT changes the searched keys mid-run, exactly: only length keys and train.lr can change there, and a
    length key moves along a list (a numeric step of 0.8x or 1.2x would leave the lengths' multiple)."""
    problems = []
    for key, dist in spec.search.items():
        kind = next(iter(dist)) if isinstance(dist, dict) and dist else None
        if not (key.startswith("lengths.") or key == "train.lr"):
            problems.append((f"search.{key}", dist, "pbt changes keys mid-run and only length keys and train.lr "
                                                    "can change there; search it with asha or fifo"))
        elif key.startswith("lengths.") and kind not in ("choice", "grid"):
            problems.append((f"search.{key}", dist, "pbt moves a length key along a list: write {choice: [...]}"))
    if "lengths.max" in spec.search and spec.objective.metric == "val/loss@max":
        problems.append(("objective.metric", spec.objective.metric,
                         "pbt changes lengths.max mid-run, so val/loss@max would compare different lengths; "
                         "use val/loss@L for one L, or val/loss@mean"))
    return problems


def population_lengths(spec: TuneSpec) -> list[int]:
    """Every lengths.max a PBT search may reach: each trial evaluates them all, so an exploit keeps its records'
    keys and the objective one meaning."""
    dist = spec.search.get("lengths.max")
    return sorted(next(iter(dist.values()))) if spec.scheduler.type == "pbt" and dist else []


def tune_domain(kind: str, args: list):
    from ray import tune
    return {"choice": lambda: tune.choice(args), "uniform": lambda: tune.uniform(*args),
            "loguniform": lambda: tune.loguniform(*args), "randint": lambda: tune.randint(args[0], args[1] + 1),
            "quniform": lambda: tune.quniform(*args)}[kind]()


def candidates(spec: TuneSpec, base_path: Optional[str]) -> tuple[list[dict], list[str]]:
    """The trials to launch (each a dict of searched keys -> values, validated) and notes on what was skipped.

    Grid keys are crossed; random keys are drawn num_samples times with Tune's
    distributions. A draw whose config is invalid is redrawn (up to REDRAWS times).
    """
    rng = np.random.RandomState(spec.seed)
    base_schedule = base_config(spec, base_path, environment=False).lengths.schedule
    grid = {k: next(iter(d.values())) for k, d in spec.search.items() if "grid" in d}
    random = {k: tune_domain(*next(iter(d.items()))) for k, d in spec.search.items() if "grid" not in d}
    trials, notes = [], []
    for point in itertools.product(*grid.values()) if grid else [()]:
        fixed = dict(zip(grid, point))
        for _sample in range(spec.num_samples):
            for _ in range(REDRAWS):
                params = unread_as_none({**fixed, **{k: _plain(d.sample(random_state=rng)) for k, d in random.items()}},
                                        base_schedule)
                problem = trial_problem(spec, base_path, params)
                if problem is None:
                    trials.append(params)
                    break
                if not random:  # nothing to redraw: the grid point itself is invalid
                    break
            if problem is not None:
                notes.append(f"skipped {params}: {problem}")
            if not random:
                break  # a pure grid point is one trial, not num_samples copies
    return trials, notes


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def unread_as_none(params: dict, base_schedule: str) -> dict:
    """A search over schedules crossed with one schedule's own key (say lengths.warmup_steps) gives trials
    whose schedule does not read that key: it is left out of their config and shown as None."""
    schedule = SCHEDULES.get(params.get("lengths.schedule", base_schedule))
    return {k: None if schedule and k.startswith("lengths.") and k[8:] not in schedule.model_fields else v
            for k, v in params.items()}


def trial_overrides(params: dict) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in params.items() if v is not None]


def trial_problem(spec: TuneSpec, base_path: Optional[str], params: dict) -> Optional[str]:
    """Why a candidate cannot run: an invalid config, or a plan that does not fit in memory (``raytrain plan``)."""
    try:
        cfg = trial_config(spec, base_path, params, "check", "/tmp")
    except ConfigError as err:
        return "; ".join(f"{k} = {v!r}: {fix}" for k, v, fix in err.problems)
    from raytrain.plan import fit_problem  # here: it loads transformers' models, and every command's help reads this
    return fit_problem(cfg)


def trial_config(spec: TuneSpec, base_path: Optional[str], params: dict, name: str, runs_dir: str) -> Config:
    cfg = base_config(spec, base_path, trial_overrides(params) + [f"run.name={name}", f"run.dir={runs_dir}",
                                                                  f"run.group={spec.name}"])
    cfg.eval.lengths = sorted(set(cfg.eval.lengths) | {cfg.lengths.max} | set(population_lengths(spec)))
    if spec.scheduler.type == "pbt":  # an exploit copies a checkpoint made where the scores were compared
        cfg.run.checkpoint_every, cfg.run.checkpoint_upload = cfg.eval.every, "sync"
        cfg.run.keep_checkpoints = cfg.train.max_steps // cfg.eval.every + 1  # any of them may be copied
    return cfg


def as_tune_point(params: dict) -> dict:
    """A candidate as Tune carries it: values as written, but a list or mapping (lengths.stages) as its JSON
    text, which Tune's table shows as written too: Tune would read a raw list as a nested search space."""
    return {key: json.dumps(value) if isinstance(value, (list, dict)) else value for key, value in params.items()}


def from_tune_point(point: dict, keys) -> dict:
    return {key: json.loads(point[key]) if isinstance(point[key], str) and point[key][:1] in "[{" else point[key]
            for key in keys}
