"""The driver: prepare the corpus once, start (or join) Ray, run ``train.train_worker`` on Ray Train workers."""
from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import ray
import yaml
from ray.train import CheckpointConfig, ControllerError, FailureConfig, RunConfig
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

from raytrain import compiled, console
from raytrain.checks import worker_resources
from raytrain.config import Config, ScalingConfig, flatten
from raytrain.data import check_corpus, open_corpus
from raytrain.errors import StartFailed, TrainingStopped
from raytrain.ops import build_comm_op, comm_op_built
from raytrain.prepare import prepare
from raytrain.section import ConfigError
from raytrain.summary import closing_summary
from raytrain.tokenizer import load_tokenizer
from raytrain.trackers import create_mlflow_store

START_TIMEOUT = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
POLL_INTERVAL, POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25"
LIBRARIES_LOG = "libraries.log"  # what every other library printed (console.capture)
STOPPED = "stopped.txt"  # rank 0 writes why it stopped the run early (non-finite losses)
# Keys a resumed run may change: where and how wide it runs, not what it computes (the loss is normalized over
# the global step, so any number of workers and any ZeRO stage gives the same update).
RESUMABLE = ("scaling.", "deepspeed.zero_stage", "run.max_failures", "run.keep_checkpoints", "run.loggers",
             "run.init_from")  # a run with a checkpoint of its own resumes from it, wherever it started


def run_directory(cfg: Config) -> Path:
    name = cfg.run.name or f"{cfg.lengths.schedule}-{datetime.now():%Y%m%d-%H%M%S}"
    return Path(cfg.run.dir).expanduser().resolve() / name


def fit(cfg: Config, callbacks: list = (), runtime_env: dict | None = None, command_started: float | None = None):
    """Train ``cfg`` on ``scaling.num_workers`` Ray Train workers; ``runtime_env`` is merged into theirs.
    ``command_started``: when the command's process started (the CLI's), so start-up counts its imports."""
    started, stamps = time.monotonic(), [("command", time.time())]
    if command_started is not None:
        stamps = [("command", command_started), ("Python, imports and the config", time.time())]
    run_dir = run_directory(cfg)
    cfg.run.name = run_dir.name
    check_same_run(run_dir, cfg)
    worker_vars = {**worker_env_vars(cfg.scaling.use_gpu, os.environ),
                   compiled.CACHE_ENV: os.environ.get(compiled.CACHE_ENV, compiled.cache_dir(cfg.data.cache_dir))}
    os.environ.setdefault("DS_ACCELERATOR", worker_vars["DS_ACCELERATOR"])
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True, runtime_env={"env_vars": worker_vars})
    stamps.append(("Ray", time.time()))
    corpus_dir = prepare(cfg.data, cfg.tokenizer)
    corpus = open_corpus(corpus_dir)
    check_corpus(corpus, cfg.lengths.max, cfg.eval.lengths)
    if not cfg.scaling.use_gpu and not comm_op_built():  # here, where its progress shows, not in the workers
        build_comm_op(console.say)
    stamps.append(("corpus and DeepSpeed's op", time.time()))
    run_dir.mkdir(parents=True, exist_ok=True)
    if "mlflow" in cfg.run.loggers:
        create_mlflow_store(run_dir.parent)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    (run_dir / "corpus.json").write_text(json.dumps({"directory": str(corpus_dir), "train_tokens": corpus.train.size,
                                                     "val_tokens": corpus.val.size}))
    load_tokenizer(cfg.tokenizer).save_pretrained(run_dir / "tokenizer")  # the export's; workers never load one
    env = dict(runtime_env or {})
    env["env_vars"] = {**worker_vars, **env.get("env_vars", {})}
    trainer = TorchTrainer(
        run_worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "run_dir": str(run_dir), "stamps": stamps,
                           "corpus": str(corpus_dir), "tokenizer_dir": str(run_dir / "tokenizer")},
        scaling_config=scaling_config(cfg.scaling),
        # Same name and storage as an earlier attempt: Ray Train resumes from its newest checkpoint.
        # A worker group that cannot be placed is a controller failure: fail it (after scaling.start_timeout_s),
        # never retry it forever.
        run_config=RunConfig(name=run_dir.name, storage_path=cfg.run.storage or str(run_dir.parent),
                             failure_config=FailureConfig(max_failures=cfg.run.max_failures,
                                                          controller_failure_limit=0),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
                             callbacks=list(callbacks), worker_runtime_env=env),
    )
    (run_dir / STOPPED).unlink(missing_ok=True)
    with controller_settings(cfg.scaling.start_timeout_s):
        try:
            result = trainer.fit()
        except ControllerError as err:
            if not isinstance(err.controller_failure, WorkerGroupStartupTimeoutError):
                raise
            raise StartFailed(unplaced(cfg.scaling)) from None
    console.settle()  # rank 0's last lines come through Ray's log stream
    if (run_dir / STOPPED).exists():  # the workers ended the run on purpose; say why
        raise TrainingStopped((run_dir / STOPPED).read_text())
    console.say(closing_summary(run_dir, cfg, time.monotonic() - started,
                                LIBRARIES_LOG if (run_dir / LIBRARIES_LOG).exists() else None))
    return result


def run_worker(payload: dict) -> None:
    """What Ray Train ships to each worker (by reference): ``train.train_worker``, imported there, so that the
    driver (and each Tune trial's process) never imports what only workers run: the model code of transformers,
    DeepSpeed and torch's compiler, seconds of every command's start-up."""
    from raytrain.train import train_worker  # in the worker: see the docstring
    train_worker(payload)


@contextmanager
def controller_settings(start_timeout_s: float):
    """What Ray Train's controller reads from the variables Ray Train hands it from the driver's environment:
    how long it waits for the worker group to be placed (scaling.start_timeout_s), and how often it polls the
    workers, unless the environment says. The controller notices that training finished only at a poll; its
    default of every 2 s left each run's end waiting 1 s on average, a poll costs a few milliseconds."""
    settings = {START_TIMEOUT: str(start_timeout_s), POLL_INTERVAL: os.environ.get(POLL_INTERVAL, POLL_S)}
    before = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value


def unplaced(scaling: ScalingConfig) -> str:
    """Why the workers were not placed: what they ask for against what the cluster has and can grow to."""
    from ray._private.state import state  # the autoscaler's node types, as Ray Train reads them
    most = state.get_max_resources_from_cluster_config() or {}
    have = {k: v for k, v in ray.cluster_resources().items() if not k.startswith(("node:", "object_store"))}
    need = {k: v * scaling.num_workers for k, v in worker_resources(scaling).items()}
    return (f"the {scaling.num_workers} workers could not be placed within scaling.start_timeout_s "
            f"({scaling.start_timeout_s:g} s): they ask for {need} in all ({worker_resources(scaling)} each, "
            f"{scaling.placement_strategy}); the cluster has {have}"
            + (f" and can grow to {most}" if most else " and cannot grow (no autoscaler)") + ". Lower "
            "scaling.num_workers or what each worker asks for, add nodes that have it, or raise "
            "scaling.start_timeout_s while autoscaled nodes boot")


def worker_env_vars(use_gpu: bool, here: dict) -> dict[str, str]:
    """The workers' environment: DeepSpeed's accelerator, and on GPU an allocator for shapes that vary per step.

    Every step has its own (rows, L), so the CUDA caching allocator would keep
    carving differently sized blocks and fragment; expandable segments grow one
    mapping instead (PyTorch's advice for varying shapes). A value the user set
    (``PYTORCH_CUDA_ALLOC_CONF`` here) is kept.
    """
    env = {"DS_ACCELERATOR": "cuda" if use_gpu else "cpu"}
    if use_gpu:
        env["PYTORCH_CUDA_ALLOC_CONF"] = here.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    return env


def scaling_config(scaling: ScalingConfig):
    from ray.train import ScalingConfig as RayScaling  # beside raytrain's own ScalingConfig
    resources = {"CPU": scaling.cpus_per_worker, **scaling.resources_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = 1
    return RayScaling(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu, resources_per_worker=resources,
                      placement_strategy=scaling.placement_strategy)


def check_same_run(run_dir: Path, cfg: Config) -> None:
    """Re-running a run name resumes it, which is exact only with the same config (where and how wide it runs
    aside: ``RESUMABLE``)."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    old, new = flatten(yaml.safe_load(saved.read_text())), flatten(cfg.model_dump(mode="json"))
    changed = [key for key in new if old.get(key) != new[key] and not key.startswith(RESUMABLE)]
    if changed:
        raise ConfigError([(key, new[key], f"run {run_dir} exists with {key} = {old.get(key)!r}; re-running a "
                            f"run resumes it, so keep its value or choose a new run.name") for key in changed])
