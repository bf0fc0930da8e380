"""``raytrain tune``: Ray Tune over Ray Train runs, searching length ranges, schedules and anything else.

Candidates are drawn up front (Tune's own distributions, seeded) and each is
validated as a full training config before anything launches: an invalid
combination (min above max, ...) is redrawn, or skipped with a note when only
grid values make it invalid. Each trial is a real Ray Train run (Train V2: a
Tune function that builds the TorchTrainer with ``TuneReportCallback``), and
ASHA compares trials on tokens seen (or wall time), not iterations, because a
short-length step costs less than a long one.
"""
from __future__ import annotations

import csv
import itertools
import json
import os
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import yaml
from pydantic import Field

from raytrain.config import Config, ConfigError, flatten, load_config, validate_section
from raytrain.lengths import SCHEDULES
from raytrain.section import Section

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
    type: Literal["asha", "fifo"] = "asha"
    """asha stops the worst trials early; fifo runs every trial to the end."""
    time_attr: Literal["tokens", "elapsed_s"] = "tokens"
    """The time axis ASHA compares trials on: tokens seen, or training wall time in seconds."""
    grace_period: Optional[float] = Field(None, gt=0)
    """Time (in time_attr units) every trial gets before it can be stopped; null: an eighth of the run."""
    reduction_factor: float = Field(2, gt=1)
    """ASHA keeps 1 / reduction_factor of the trials at each rung."""


class TuneSpec(Section):
    name: str = "search"
    """Experiment name: the directory under dir."""
    dir: str = "runs/tune"
    """Parent of the experiment directory."""
    base: BaseRun = BaseRun()
    search: dict[str, Any] = Field(default_factory=dict)
    """Training key -> {choice: [...]}, {uniform: [lo, hi]}, {loguniform: [lo, hi]}, {randint: [lo, hi]}, {quniform: [lo, hi, q]} or {grid: [...]}."""
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
    from raytrain.config import _yaml_reason, apply_overrides
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as err:
        raise ConfigError([("-c", path, f"cannot read the tune config: {err.strerror}")]) from None
    except yaml.YAMLError as err:
        raise ConfigError([("-c", path, f"not valid YAML: {_yaml_reason(err)}")]) from None
    problems = apply_overrides(raw, list(overrides)) if isinstance(raw, dict) else []
    spec, found = validate_section(TuneSpec, raw, "")
    problems += [(key.lstrip("."), value, fix) for key, value, fix in found]
    base_path = _base_path(spec, path)
    if not spec.search:
        problems.append(("search", spec.search, "is empty: give at least one training key to search, e.g. "
                                                "{train.lr: {loguniform: [1.0e-4, 1.0e-2]}}"))
    problems += search_problems(spec, base_path)
    if problems:
        raise ConfigError(problems)
    return spec


def _base_path(spec: TuneSpec, tune_path: str) -> Optional[str]:
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
            import difflib
            close = difflib.get_close_matches(key, sorted(keys), n=1)
            problems.append((where, dist, "not a training key" + (f"; did you mean '{close[0]}'?" if close else "")))
            continue
        if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
            problems.append((where, dist, f"write one distribution: {{NAME: args}} with NAME in {sorted(DISTRIBUTIONS)}"))
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
    metric = spec.objective.metric
    lengths = set(base.eval.lengths)
    if "lengths.max" not in spec.search:
        lengths.add(base.lengths.max)
    valid = {"val/loss@max", "val/loss@mean"} | {f"val/loss@{L}" for L in lengths}
    if metric not in valid:
        problems.append(("objective.metric", metric, f"not a reported metric; choose one of {sorted(valid)}"))
    return problems


def _domain(kind: str, args: list):
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
    random = {k: _domain(*next(iter(d.items()))) for k, d in spec.search.items() if "grid" not in d}
    trials, notes = [], []
    for point in itertools.product(*grid.values()) if grid else [()]:
        fixed = dict(zip(grid, point))
        for sample in range(spec.num_samples):
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
    from raytrain.plan import fit_problem
    try:
        cfg = trial_config(spec, base_path, params, "check", "/tmp")
    except ConfigError as err:
        return "; ".join(f"{k} = {v!r}: {fix}" for k, v, fix in err.problems)
    return fit_problem(cfg)


def trial_config(spec: TuneSpec, base_path: Optional[str], params: dict, name: str, runs_dir: str) -> Config:
    cfg = base_config(spec, base_path, trial_overrides(params) + [f"run.name={name}", f"run.dir={runs_dir}",
                                                                  f"run.group={spec.name}"])
    if cfg.lengths.max not in cfg.eval.lengths:  # the objective val/loss@max needs it evaluated
        cfg.eval.lengths = sorted(cfg.eval.lengths + [cfg.lengths.max])
    return cfg


def as_tune_point(params: dict) -> dict[str, str]:
    """A candidate as Tune carries it: each value as JSON text. Tune reads a list value (lengths.stages) as a
    nested search space and fails on it; a string is opaque to it."""
    return {key: json.dumps(value) for key, value in params.items()}


def from_tune_point(point: dict, keys) -> dict:
    return {key: json.loads(point[key]) for key in keys}


def run_trial(params: dict, spec: dict, base_path: Optional[str], runs_dir: str) -> None:
    """One Tune trial: a full raytrain run on its own Ray Train workers, reporting to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raytrain.train import fit
    spec = TuneSpec.model_validate(spec)
    cfg = trial_config(spec, base_path, from_tune_point(params, spec.search), tune.get_context().get_trial_name(),
                       runs_dir)
    fit(cfg, callbacks=[TuneReportCallback()])


def tune_main(tune_path: str, overrides: list[str], resume: bool = False):
    """Run (or resume) the search; write results.csv, best_config.yaml and objective.png."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    spec = load_spec(tune_path, overrides)
    base_path = _base_path(spec, tune_path)
    base_path = str(Path(base_path).resolve()) if base_path else None
    experiment = Path(spec.dir).expanduser().resolve() / spec.name
    trials, notes = candidates(spec, base_path)
    for note in notes:
        print(f"raytrain tune: {note}")
    if not trials:
        raise ConfigError([("search", spec.search, "every combination is invalid; see the notes above")])
    base = base_config(spec, base_path)
    if not ray.is_initialized():
        from raytrain.train import worker_env_vars
        ray.init(address=os.environ.get("RAY_ADDRESS"),
                 runtime_env={"env_vars": worker_env_vars(base.scaling.use_gpu, os.environ)})
    from raytrain.prepare import prepare
    prepare(base.data, base.tokenizer)  # once, before the trials (which share it unless they search data keys)
    total = base.train.max_steps * base.train.tokens_per_step if spec.scheduler.time_attr == "tokens" else None
    scheduler = FIFOScheduler() if spec.scheduler.type == "fifo" else ASHAScheduler(
        time_attr=spec.scheduler.time_attr, max_t=total or 10**9,
        grace_period=spec.scheduler.grace_period or (total / 8 if total else 60),
        reduction_factor=spec.scheduler.reduction_factor)
    # The trial function only drives: no CPU of its own (its Ray Train workers hold the CPUs/GPUs), and
    # a memory reservation because Ray needs a non-empty request.
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, spec=spec.model_dump(mode="json"), base_path=base_path,
                             runs_dir=str(experiment / "trials")),
        {"CPU": 0, "memory": 256 * 2**20})
    if resume:
        tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        # The validated candidates are evaluated exactly as drawn: the searcher replays them in order.
        points = [as_tune_point(t) for t in trials]
        searcher = BasicVariantGenerator(points_to_evaluate=points,
                                         max_concurrent=spec.max_concurrent or concurrency(base))
        space = {key: tune.choice(sorted({p[key] for p in points})) for key in spec.search}
        tuner = tune.Tuner(
            trainable, param_space=space,
            tune_config=tune.TuneConfig(metric=spec.objective.metric, mode=spec.objective.mode, scheduler=scheduler,
                                        search_alg=searcher, num_samples=len(trials),
                                        trial_name_creator=lambda trial: f"trial-{trial.trial_id[-5:]}",
                                        trial_dirname_creator=lambda trial: f"trial-{trial.trial_id[-5:]}"),
            run_config=tune.RunConfig(name=spec.name, storage_path=str(experiment.parent)))
    results = tuner.fit()
    return summarize(results, spec, base_path, experiment, total)


def concurrency(base: Config) -> int:
    """Trials that can run at once: from what the cluster can grow to (the autoscaler's node types, as Ray
    Train itself reads them), not only from what is up now; a cluster scaling from zero GPU nodes counts."""
    import ray
    from ray._private.state import state
    return trials_that_fit(base.scaling, ray.cluster_resources(), state.get_max_resources_from_cluster_config())


def trials_that_fit(scaling, now: dict, most: Optional[dict]) -> int:
    need = {"GPU": scaling.num_workers} if scaling.use_gpu else {"CPU": scaling.num_workers * scaling.cpus_per_worker}
    (name, per_trial), = need.items()
    available = max(now.get(name, 0), (most or {}).get(name, 0))
    return max(1, int(available // per_trial))


def summarize(results, spec: TuneSpec, base_path: Optional[str], experiment: Path, total: Optional[int]):
    """results.csv (sorted by the objective), best_config.yaml, objective.png; print the table."""
    metric = spec.objective.metric
    rows = []
    for result in results:
        params = from_tune_point(result.config, spec.search)
        last = result.metrics or {}
        finished = last.get("step") == base_config(spec, base_path, trial_overrides(params),
                                                   environment=False).train.max_steps
        status = "error" if result.error else ("completed" if finished else "stopped early")
        rows.append({"trial": Path(result.path).name, **params, metric: last.get(metric), "error": result.error,
                     "tokens": last.get("tokens"), "wall_s": round(last.get("elapsed_s", 0.0), 1), "status": status,
                     "_history": result.metrics_dataframe})
    sign = 1 if spec.objective.mode == "min" else -1
    rows.sort(key=lambda r: (r[metric] is None, sign * (r[metric] or 0)))
    columns = ["trial", *spec.search, metric, "tokens", "wall_s", "status"]
    with (experiment / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    if all(r[metric] is None for r in rows):
        errors = [f"  {r['trial']}: {str(r['error']).strip().splitlines()[-1] if r['error'] else 'no ' + metric}"
                  for r in rows]
        raise SearchFailed(f"every trial of {experiment} failed ({len(rows)} of {len(rows)}); nothing to pick "
                           f"a best config from. Each trial's last error:\n" + "\n".join(errors) +
                           f"\nEach trial's run directory is under {experiment / 'trials'}.")
    best = next(r for r in rows if r[metric] is not None)
    best_cfg = trial_config(spec, base_path, {key: best[key] for key in spec.search}, f"best-of-{spec.name}", "runs")
    (experiment / "best_config.yaml").write_text(best_cfg.to_yaml())
    _plot(rows, metric, experiment / "objective.png")
    print(markdown_table(rows, columns))
    print(f"\nbest: {best['trial']} -> {experiment / 'best_config.yaml'} (raytrain train -c that file)")
    return rows


class SearchFailed(RuntimeError):
    """No trial of a search produced its objective."""


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else \
            (f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _plot(rows: list[dict], metric: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for row in rows:
        history = row["_history"]
        if history is not None and metric in history:
            ax.plot(history["tokens"], history[metric], "o-", markersize=3, label=row["trial"])
    ax.set(xlabel="tokens seen", ylabel=metric, title="objective by trial")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
