"""``raytrain tune``: Ray Tune over Ray Train runs, searching length ranges, schedules and anything else.

Each trial is a real Ray Train run (Train V2: a Tune function that builds the
TorchTrainer with ``TuneReportCallback``), and ASHA compares trials on tokens
seen (or wall time), not iterations, because a short-length step costs less
than a long one. The spec and its candidates are ``tune_spec``'s.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Optional

from matplotlib.figure import Figure

from raytrain import population
from raytrain.config import Config
from raytrain.console import say
from raytrain.errors import SearchFailed
from raytrain.launch import fit, worker_env_vars
from raytrain.prepare import prepare
from raytrain.section import ConfigError
from raytrain.trackers import create_mlflow_store
from raytrain.tune_spec import (
    TuneSpec,
    as_tune_point,
    base_config,
    base_path_of,
    candidates,
    from_tune_point,
    load_spec,
    trial_config,
    trial_overrides,
    trial_problem,
)

HEAD_NODE = "node:__internal_head__"  # the resource Ray gives the head node, and only the head node


def run_trial(params: dict, spec: dict, base_path: Optional[str], runs_dir: str) -> None:
    """One Tune trial: a full raytrain run on its own Ray Train workers, reporting to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback
    spec = TuneSpec.model_validate(spec)
    cfg = trial_config(spec, base_path, from_tune_point(params, spec.search), tune.get_context().get_trial_name(),
                       runs_dir)
    if spec.scheduler.type == "pbt":
        population.member(cfg, tune.get_checkpoint())
    else:
        fit(cfg, callbacks=[TuneReportCallback()])


def tune_main(tune_path: str, overrides: list[str], resume: bool = False):
    """Run (or resume) the search; write results.csv, best_config.yaml and objective.png."""
    import ray  # here, not at the top: the CLI answers --help and spec errors without importing Ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    spec = load_spec(tune_path, overrides)
    base_path = base_path_of(spec, tune_path)
    base_path = str(Path(base_path).resolve()) if base_path else None
    experiment = Path(spec.dir).expanduser().resolve() / spec.name
    trials, notes = candidates(spec, base_path)
    for note in notes:
        say(f"raytrain tune: {note}")
    if not trials:
        raise ConfigError([("search", spec.search, "every combination is invalid; see the notes above")])
    base = base_config(spec, base_path)
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"),
                 runtime_env={"env_vars": worker_env_vars(base.scaling.use_gpu, os.environ)})
    if "mlflow" in base.run.loggers:
        create_mlflow_store(experiment / "trials")  # once, before trials write to it at once
    prepare(base.data, base.tokenizer)  # once, before the trials (which share it unless they search data keys)
    total = base.train.max_steps * base.train.tokens_per_step if spec.scheduler.time_attr == "tokens" else None
    if spec.scheduler.type == "pbt":
        scheduler = population.scheduler(
            spec, lambda point: trial_problem(spec, base_path, from_tune_point(point, spec.search)) is None,
            spec.scheduler.perturbation_interval or (total / 4 if total else 60))
    elif spec.scheduler.type == "fifo":
        scheduler = FIFOScheduler()
    else:
        scheduler = ASHAScheduler(time_attr=spec.scheduler.time_attr, max_t=total or 10**9,
                                  grace_period=spec.scheduler.grace_period or (total / 8 if total else 60),
                                  reduction_factor=spec.scheduler.reduction_factor)
    # The trial function only drives: no CPU of its own (its Ray Train workers hold the CPUs/GPUs), a memory
    # reservation, and a sliver of the head node's own resource, so that a trial's driver (and with it its Ray
    # Train controller, which runs beside it) lives on the head and never on a preemptible GPU node.
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, spec=spec.model_dump(mode="json"), base_path=base_path,
                             runs_dir=str(experiment / "trials")),
        {"CPU": 0, "memory": 256 * 2**20, HEAD_NODE: 0.001})
    if resume:
        tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        # The validated candidates are evaluated exactly as drawn: the searcher replays them in order.
        points = [as_tune_point(t) for t in trials]
        searcher = BasicVariantGenerator(points_to_evaluate=points,
                                         max_concurrent=spec.max_concurrent or concurrency(base))
        space = {key: tune.choice(sorted({p[key] for p in points}, key=repr)) for key in spec.search}
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
        rows.append({"trial": last.get("run") or Path(result.path).name, **params, metric: last.get(metric),
                     "error": result.error,
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
    if spec.scheduler.type == "pbt":  # the best model's own path through the search, replayed from scratch
        best_dir = experiment / "trials" / best["trial"]
        best_cfg = population.replay_config(best_dir, f"replay-of-{spec.name}")
        (experiment / "best_lineage.json").write_text(json.dumps(population.lineage(best_dir), indent=1))
    else:
        best_cfg = trial_config(spec, base_path, {key: best[key] for key in spec.search}, f"best-of-{spec.name}",
                                "runs")
    (experiment / "best_config.yaml").write_text(best_cfg.to_yaml())
    _plot(rows, metric, experiment / "objective.png")
    say(markdown_table(rows, columns))
    if spec.scheduler.type == "pbt":
        say("\n".join(population.describe(population.lineage(experiment / "trials" / best["trial"]))))
    values = ", ".join(f"{key} = {best[key]!r}" for key in spec.search)
    say(f"\nbest: {best['trial']} ({metric} {best[metric]:.4f}): {values}\n"
        f"config: {experiment / 'best_config.yaml'}\nnext:   raytrain train -c {experiment / 'best_config.yaml'}"
        f"\n        raytrain report {experiment / 'trials' / best['trial']}"
        + (f"\nevery library's log: {experiment / 'libraries.log'}" if (experiment / "libraries.log").exists() else ""))
    return rows


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else \
            (f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _plot(rows: list[dict], metric: str, path: Path) -> None:
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for row in rows:
        history = row["_history"]
        if history is not None and metric in history:
            ax.plot(history["tokens"], history[metric], "o-", markersize=3, label=row["trial"])
    ax.set(xlabel="tokens seen", ylabel=metric, title="objective by trial")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
