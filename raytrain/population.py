"""Population-based training (``scheduler.type: pbt``): Ray Tune's PBT over raytrain runs, exact exploits,
and the schedule a search found written back as one plain training config.

Ray Tune's ``PopulationBasedTraining`` decides: at each perturbation interval
(on tokens seen) a trial in the bottom quantile copies a top trial's newest
checkpoint and perturbs the searched keys (length keys along their lists,
``train.lr`` by 0.8x / 1.2x or a fresh draw). A perturbed config that is not
valid is drawn again. A trial reports a Tune checkpoint that only points at its
raytrain checkpoint; an exploited trial starts a new run directory (its
``life``) from that checkpoint with ``run.init_from``: the donor's step,
weights, optimizer state, lengths trained and records, with the perturbed keys
applied from that step on. Each run directory's ``lineage.json`` says which run
it came from at which step and what changed; ``steps.json`` lists the length
and budget of every step it trained. ``replay_config`` turns the best trial's
two files into a config with an explicit staged schedule and its learning-rate
changes, which ``raytrain train -c`` runs from scratch to the same losses.
"""
from __future__ import annotations

import json
import math
import tempfile
import threading
from functools import reduce
from pathlib import Path

import yaml

from raytrain.checkpoint import STEPS
from raytrain.config import Config
from raytrain.launch import fit, run_directory
from raytrain.loading import load_config
from raytrain.runlog import read_lineage
from raytrain.section import ConfigError
from raytrain.tune_spec import as_tune_point, tune_domain

POINTER = "raytrain.json"  # the Tune checkpoint's one file: where the raytrain checkpoint is
REDRAWS = 50


def scheduler(spec, valid, interval: float):
    """Ray Tune's PBT on ``spec``'s keys; ``valid(tune_config) -> bool`` refuses a perturbed config that could not
    run (a lengths.min above lengths.max), which is then drawn again."""
    from ray.tune.schedulers import PopulationBasedTraining

    class ValidPBT(PopulationBasedTraining):
        def _get_new_config(self, trial, trial_to_clone):  # PBT's own explore step, kept to valid configs
            for _ in range(REDRAWS):
                config, operations = super()._get_new_config(trial, trial_to_clone)
                if valid(config):
                    return config, operations
            return dict(trial_to_clone.config), {}

    mutations = {}
    for key, dist in spec.search.items():
        kind, args = next(iter(dist.items()))
        mutations[key] = [as_tune_point({key: v})[key] for v in args] if kind in ("choice", "grid") \
            else tune_domain(kind, args)
    return ValidPBT(time_attr=spec.scheduler.time_attr, perturbation_interval=interval,
                    hyperparam_mutations=mutations, quantile_fraction=spec.scheduler.quantile_fraction,
                    resample_probability=spec.scheduler.resample_probability, synch=spec.scheduler.synch)


def member(cfg: Config, pointer) -> None:
    """One trial of a PBT search: a raytrain run reporting each result to Tune with a pointer checkpoint when
    Ray Train made a checkpoint. ``pointer``: the Tune checkpoint it starts from (a donor's after an exploit, its
    own after a restart), or None."""
    from ray import tune
    from ray.train.v2.api.callback import UserCallback
    from ray.util.queue import Queue

    if pointer is not None:
        with pointer.as_directory() as directory:
            source = json.loads((Path(directory) / POINTER).read_text())
        if Path(source["run_dir"]).name.split(".")[0] == cfg.run.name:  # its own: Ray Train resumes it
            cfg.run.name = Path(source["run_dir"]).name
        else:  # exploited: a new life of this trial, from the donor's checkpoint
            cfg.run.name, cfg.run.init_from = next_life(Path(cfg.run.dir), cfg.run.name), source["checkpoint"]
    run_dir = run_directory(cfg)
    results = Queue(maxsize=1, actor_options={"num_cpus": 0})  # Ray Train waits for Tune, as with Tune's own

    class Relay(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            results.put({**metrics[0], "checkpoint_path": checkpoint.path if checkpoint else None})

    outcome = {}

    def train():
        try:
            fit(cfg, callbacks=[Relay()])
        except BaseException as err:  # noqa: BLE001 - raised again in the trial's own thread below
            outcome["error"] = err
        finally:
            results.put(None)

    thread = threading.Thread(target=train, name="raytrain-member", daemon=True)
    thread.start()
    while (result := results.get()) is not None:
        path, checkpoint = result.pop("checkpoint_path"), None
        if path:
            directory = Path(tempfile.mkdtemp(prefix="raytrain-pointer-"))
            (directory / POINTER).write_text(json.dumps({"checkpoint": path, "run_dir": str(run_dir),
                                                         "step": result["step"]}))
            checkpoint = tune.Checkpoint.from_directory(str(directory))
        tune.report({**result, "run": run_dir.name}, checkpoint=checkpoint)
    thread.join()
    if "error" in outcome:
        raise outcome["error"]


def next_life(runs_dir: Path, trial: str) -> str:
    """``trial.N``: the trial's next run directory after an exploit (the earlier ones stay as they were)."""
    lives = [int(p.name.rsplit(".", 1)[1]) for p in Path(runs_dir).expanduser().glob(f"{trial}.*")
             if p.name.rsplit(".", 1)[1].isdigit()]
    return f"{trial}.{max(lives, default=1) + 1}"


def lineage(run_dir: Path) -> list[dict]:
    """[{from_step, run, lr, changed}, ...] of a finished run: where each stretch of its steps was trained."""
    return read_lineage(run_dir, yaml_config(run_dir)["train"]["lr"])


def describe(segments: list[dict]) -> list[str]:
    """The lineage as the search's summary prints it."""
    first = segments[0]
    lines = [f"lineage of the best: from step {first['from_step']} in {first['run']} (lr {first['lr']:.3g})"]
    for seg in segments[1:]:
        changes = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in seg["changed"].items()) or "nothing"
        lines.append(f"  step {seg['from_step']}: copied into {seg['run']} (lr {seg['lr']:.3g}), changed {changes}")
    return lines


def replay_config(run_dir: Path, name: str, runs_dir: str = "runs") -> Config:
    """A config that trains ``run_dir``'s model from scratch through the same steps: its lengths as an explicit
    staged schedule (``steps.json``), its peak learning rate per stretch as ``train.lr_changes``
    (``lineage.json``), and its last config for everything else."""
    steps = json.loads((run_dir / STEPS).read_text())
    lengths = [length for length, _ in steps]
    stages = []
    for i, length in enumerate(lengths):
        if stages and stages[-1][1] == length:
            stages[-1][0] = i + 1
        else:
            stages.append([i + 1, length])
    segments = lineage(run_dir)
    raw = yaml_config(run_dir)
    raw["lengths"] = {"schedule": "staged", "min": min(lengths), "max": max(lengths),
                      "multiple_of": reduce(math.gcd, lengths), "stages": stages}
    raw["train"].update(lr=segments[0]["lr"], lr_changes=[[s["from_step"], s["lr"]] for s in segments[1:]])
    raw["run"].update(init_from=None, name=name, dir=runs_dir)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(json.dumps(raw))
        f.flush()
        try:
            return load_config(f.name, environment=False)
        except ConfigError as err:  # a bug of ours, not the user's: say what the replay could not express
            raise RuntimeError(f"the replay of {run_dir} is not a valid config: {err}") from None


def yaml_config(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / "config.yaml").read_text())
