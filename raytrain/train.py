"""The per-worker training loop, read top to bottom, and ``fit``, which runs it on Ray Train workers."""
from __future__ import annotations

import json
import os
from datetime import datetime
from functools import partial
from pathlib import Path

import yaml

from raytrain.config import Config, ConfigError, flatten
from raytrain.recipe import (Checkpointer, Meter, Planner, RunLog, non_finite_message, say, summarize_eval,
                             train_step)

STOPPED = "stopped.txt"  # rank 0 writes why it stopped the run early; fit() raises it


def train_worker(payload: dict) -> None:
    """One data-parallel rank: plan the step, train it, log, evaluate, checkpoint; resume where a crash left off."""
    from raytrain.engine import export_hf, lr_schedule, set_lr
    from raytrain.loss import window_loss
    from raytrain.trackers import Trackers
    cfg, run_dir = Config.model_validate(payload["config"]), Path(payload["run_dir"])
    rank, world, engine, corpus = setup_worker(cfg, payload["corpus"])
    plan = Planner(cfg.lengths, cfg.train, cfg.data.windows, cfg.run.seed, corpus.train.size, world)
    eot = None if cfg.data.cross_documents else corpus.index["eot"]
    loss = partial(window_loss, eot=eot, bf16=cfg.bf16, chunk_tokens=cfg.train.loss_chunk_tokens)
    trackers = Trackers(run_dir, cfg, say) if rank == 0 and cfg.run.loggers else None
    log = RunLog(run_dir, cfg.train.max_steps, trackers) if rank == 0 else None
    flops_per_token, peak = model_flops(engine, cfg.scaling, log)
    meter, checkpointer, lr_at = Meter(peak * world), Checkpointer(rank, log), lr_schedule(cfg.train)
    state = checkpointer.restore(engine, meter)
    evaluate = Evaluator(cfg, corpus, engine, rank, world, eot, cfg.bf16, log)
    state.last_eval = state.last_eval or evaluate(state)
    probe_memory(engine, *plan.largest_micro_batch(), eot, loss, log)
    meter.start()
    while state.step < cfg.train.max_steps:
        step = plan(state.step)
        set_lr(engine, lr_at(state.step if cfg.train.lr_by == "steps" else state.tokens / cfg.train.tokens_per_step))
        with meter.waiting_for_data():
            batches = step.rank_batches(corpus.train, rank)
        step_loss, finite, grad_norm = train_step(engine, batches, step.targets, world, loss)
        meter.update(step_loss, finite, grad_norm, step.targets, step.targets * flops_per_token(step.length))
        state.step, state.tokens = state.step + 1, state.tokens + step.targets
        if not finite and log:
            say(non_finite_message(meter.bad_in_a_row, meter.skipped, step, step_loss))
        if meter.bad_in_a_row >= cfg.train.max_nonfinite:
            return stop_run(run_dir, log, meter, step)
        if state.step % cfg.train.log_every == 0 or state.step == cfg.train.max_steps:
            record = meter.flush(step, state.tokens, engine.optimizer.param_groups[0]["lr"])
            log and log.metrics(record)
        evaluate_now = state.step % cfg.eval.every == 0 or state.step == cfg.train.max_steps
        checkpoint_now = state.step % cfg.run.checkpoint_every == 0 or state.step == cfg.train.max_steps
        if evaluate_now or checkpoint_now:
            meter.pause()
            state.last_eval = evaluate(state) if evaluate_now else state.last_eval
            checkpointer.report(engine, state, meter, checkpoint_now)
            meter.start()
    export_hf(engine, payload["tokenizer_dir"], run_dir / "model", rank, {"raytrain.yaml": cfg.to_yaml()})
    log and log.close()


class Evaluator:
    """Per-length validation of the engine's model at a loop state; rank 0 records it in eval.jsonl."""

    def __init__(self, cfg: Config, corpus, engine, rank: int, world: int, eot, bf16: bool, log):
        self.cfg, self.corpus, self.engine, self.rank, self.world, self.eot, self.bf16, self.log = \
            cfg, corpus, engine, rank, world, eot, bf16, log

    def __call__(self, state) -> dict:
        from raytrain.evaluate import evaluate
        micro = self.cfg.train.micro_batch_tokens or self.cfg.train.tokens_per_step // self.world
        results = evaluate(self.engine, self.corpus.val, self.cfg.eval.lengths, self.cfg.eval.tokens, micro,
                           self.rank, self.world, self.eot, self.bf16)
        if self.log:
            self.log.eval({"step": state.step, "tokens": state.tokens, **results})
        return summarize_eval(results, self.cfg.lengths.max)


def model_flops(engine, scaling, log):
    """(training FLOPs per token at length L, one worker's peak FLOP/s) for the log line's TFLOP/s and MFU."""
    from raytrain.model import matmul_weights, peak_flops, training_flops_per_token
    weights = matmul_weights(engine.module)
    peak, source = peak_flops(scaling.use_gpu, scaling.peak_tflops, scaling.cpus_per_worker)
    if log:
        say(f"MFU against {peak / 1e12:.3f} TFLOP/s per worker ({source})")
    return (lambda length: training_flops_per_token(engine.module, length, weights)), peak


def probe_memory(engine, rows: int, length: int, eot, loss, log) -> None:
    """Forward and backward the largest micro-batch any rank will run, before training, weighted by zero.

    An out-of-memory then shows at step 0, not hours in (Composer's and
    OLMo-core's pre-allocation). The input carries an end-of-text token so the
    document-masking path runs when training uses it. The gradients it leaves
    are exact zeros, accumulated into the first step without changing it.
    """
    import torch
    if log:
        say(f"memory probe: forward/backward of {rows} x {length} tokens (the largest micro-batch) before step 1")
    windows = torch.zeros((rows, length + 1), dtype=torch.long, device=engine.device)
    if eot is not None:
        windows[:, length // 2] = eot
    engine.set_gradient_accumulation_boundary(False)
    engine.backward(loss(engine, windows) * 0.0)


def stop_run(run_dir: Path, log, meter: Meter, step) -> None:
    """Too many non-finite losses in a row: rank 0 says why; fit() raises it and the CLI exits 1."""
    if log:
        stop = (f"stopped: {meter.bad_in_a_row} non-finite losses in a row (train.max_nonfinite), the last at "
                f"step {step.step + 1}, seq_len {step.length}; last good checkpoint: {last_checkpoint(run_dir)}")
        say(stop)
        (run_dir / STOPPED).write_text(stop)
        log.close()


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """The run's Ray checkpoint directories, oldest first (their names carry a timestamp)."""
    return sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())


def last_checkpoint(run_dir: Path) -> str:
    found = checkpoint_dirs(run_dir)
    return str(found[-1]) if found else "none yet"


def setup_worker(cfg: Config, corpus_dir: str):
    """(rank, world, DeepSpeed engine, corpus) of this Ray Train worker; the corpus is only opened, never made."""
    from raytrain.engine import build_comm_op, deepspeed_config, init_engine, worker_env
    worker_env(cfg.scaling.use_gpu)
    import ray.train
    import torch

    from raytrain.attention import use_document_attention
    from raytrain.data import open_corpus
    from raytrain.model import build_model
    from raytrain.recipe import mark_memory_baseline
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    normal_priority()
    torch.set_num_threads(cfg.scaling.cpus_per_worker)
    torch.manual_seed(cfg.run.seed)
    corpus = open_corpus(Path(corpus_dir), cfg.data.cache_dir)
    if not cfg.scaling.use_gpu:
        build_comm_op(say if rank == 0 else lambda line: None)
    mark_memory_baseline()
    model = build_model(cfg.model, corpus.index["vocab_size"], corpus.index["eot"])
    if not cfg.data.cross_documents:
        use_document_attention(model)  # documents kept apart without an L x L mask
    engine = init_engine(model, deepspeed_config(cfg.deepspeed, cfg.train, world))
    stage = engine.zero_optimization_stage()
    note = "" if stage == cfg.deepspeed.zero_stage else \
        f" (one rank: deepspeed.zero_stage={cfg.deepspeed.zero_stage} would partition nothing)"
    say(f"rank {rank}/{world} on node {ray.get_runtime_context().get_node_id()[:12]}, device {engine.device}, "
        f"ZeRO-{stage}{note}")
    return rank, world, engine, corpus


def normal_priority() -> None:
    """Undo the niceness Ray gives its workers (15): a training worker is the job, not background work.

    At niceness 15 every other process (Ray's own, the driver) preempts the
    worker's threads, and a multi-threaded step waits at each parallel region for
    the descheduled one (measured: 1 worker x 2 CPUs at 0.84x a bare loop, 0.95x
    at niceness 0). Linux keeps niceness per thread, so every thread is reset;
    without the privilege to raise priority this is a no-op.
    """
    for tid in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else []:
        try:
            os.setpriority(os.PRIO_PROCESS, int(tid), 0)
        except (PermissionError, ProcessLookupError):
            return


# --- driver -------------------------------------------------------------------

def run_directory(cfg: Config) -> Path:
    name = cfg.run.name or f"{cfg.lengths.schedule}-{datetime.now():%Y%m%d-%H%M%S}"
    return Path(cfg.run.dir).expanduser().resolve() / name


def fit(cfg: Config, callbacks: list = (), runtime_env: dict | None = None):
    """Prepare the corpus (once), start (or join) Ray, and run ``train_worker`` on ``scaling.num_workers`` workers.

    ``runtime_env`` is merged into the workers' Ray runtime environment (for
    example extra ``env_vars``).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from raytrain.data import check_corpus, open_corpus
    from raytrain.engine import build_comm_op
    from raytrain.prepare import prepare
    from raytrain.tokenizer import load_tokenizer

    run_dir = run_directory(cfg)
    cfg.run.name = run_dir.name
    check_same_run(run_dir, cfg)
    worker_vars = worker_env_vars(cfg.scaling.use_gpu, os.environ)
    os.environ.setdefault("DS_ACCELERATOR", worker_vars["DS_ACCELERATOR"])
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True, runtime_env={"env_vars": worker_vars})
    corpus_dir = prepare(cfg.data, cfg.tokenizer)
    corpus = open_corpus(corpus_dir)
    check_corpus(corpus, cfg.lengths.max, cfg.eval.lengths)
    if not cfg.scaling.use_gpu:  # once, here, where its progress shows: never a silent wait in the workers
        build_comm_op(print)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    (run_dir / "corpus.json").write_text(json.dumps({"directory": str(corpus_dir), "train_tokens": corpus.train.size,
                                                     "val_tokens": corpus.val.size}))
    load_tokenizer(cfg.tokenizer).save_pretrained(run_dir / "tokenizer")  # the export's; workers never load one
    env = dict(runtime_env or {})
    env["env_vars"] = {**worker_vars, **env.get("env_vars", {})}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "run_dir": str(run_dir),
                           "corpus": str(corpus_dir), "tokenizer_dir": str(run_dir / "tokenizer")},
        scaling_config=scaling_config(cfg.scaling),
        # Same name and storage as an earlier attempt: Ray Train resumes from its newest checkpoint.
        run_config=RunConfig(name=run_dir.name, storage_path=cfg.run.storage or str(run_dir.parent),
                             failure_config=FailureConfig(max_failures=cfg.run.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
                             callbacks=list(callbacks), worker_runtime_env=env),
    )
    (run_dir / STOPPED).unlink(missing_ok=True)
    result = trainer.fit()
    print(f"run directory: {run_dir}")
    if (run_dir / STOPPED).exists():  # the workers ended the run on purpose; say why
        raise TrainingStopped((run_dir / STOPPED).read_text())
    return result
class TrainingStopped(RuntimeError):
    """The run stopped itself (non-finite losses); retrying would only repeat them."""


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


def scaling_config(scaling):
    from ray.train import ScalingConfig
    resources = {"CPU": scaling.cpus_per_worker, **scaling.resources_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = 1
    return ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu, resources_per_worker=resources,
                         placement_strategy=scaling.placement_strategy)


def check_same_run(run_dir: Path, cfg: Config) -> None:
    """Re-running a run name resumes it, which is only exact with the same config."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    old, new = flatten(yaml.safe_load(saved.read_text())), flatten(cfg.model_dump(mode="json"))
    changed = [key for key in new if old.get(key) != new[key]]
    if changed:
        raise ConfigError([(key, new[key], f"run {run_dir} exists with {key} = {old.get(key)!r}; re-running a "
                            f"run resumes it, so keep its value or choose a new run.name") for key in changed])
