"""The per-worker training loop and ``fit``, which runs it on Ray Train workers."""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

import yaml

from raytrain.config import Config, ConfigError, flatten
from raytrain.data import check_corpus, load_tokenizer, prepare_corpus, rank_batches, window_offsets
from raytrain.lengths import build_schedule

CHECKPOINT_TAG = "engine"
STOPPED = "stopped.txt"  # rank 0 writes why it stopped the run early; fit() raises it


def train_worker(payload: dict) -> None:
    """One data-parallel rank: schedule the length, build the batch, forward, backward, step, log, evaluate."""
    cfg = Config.model_validate(payload["config"])
    run_dir = Path(payload["run_dir"])
    from raytrain.engine import (deepspeed_config, discard_gradients, export_hf, init_engine, lr_schedule, set_lr,
                                 worker_env)
    worker_env(cfg.scaling.use_gpu)
    import ray.train
    import torch
    import torch.distributed as dist

    from raytrain.evaluate import evaluate
    from raytrain.loss import count_targets, window_loss
    from raytrain.model import build_model

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(cfg.scaling.cpus_per_worker)
    torch.manual_seed(cfg.run.seed)
    tokenizer = load_tokenizer(cfg.tokenizer)
    corpus = prepare_corpus(cfg.data, tokenizer)
    engine = init_engine(build_model(cfg.model, tokenizer),
                         deepspeed_config(cfg.deepspeed, cfg.train, cfg.scaling.use_gpu, world))
    device = engine.device
    _say(f"rank {rank}/{world} on node {ray.get_runtime_context().get_node_id()[:12]}, device {device}, "
         f"ZeRO-{cfg.deepspeed.zero_stage}")
    train, per_step = cfg.train, cfg.train.tokens_per_step
    schedule = build_schedule(cfg.lengths, cfg.run.seed, train.max_steps, per_step)
    offsets_at = window_offsets(cfg.data.windows, corpus.train.size, cfg.run.seed, schedule, per_step)
    lr_at = lr_schedule(train)
    micro_tokens = train.micro_batch_tokens or per_step
    eot = None if cfg.data.cross_documents else tokenizer.eos_token_id

    def reduce(tensor):
        dist.all_reduce(tensor)
        return tensor

    def run_eval() -> dict:
        return evaluate(engine, corpus.val, cfg.eval.lengths, cfg.eval.tokens, micro_tokens, rank, world, reduce,
                        eot)

    log = RunLog(run_dir) if rank == 0 else None
    step, tokens = resume(engine, log)
    results = run_eval()  # at step 0, or after a restart so every report carries the latest evaluation
    if step == 0:
        record_eval(log, step, tokens, results)
    last_eval = summarize_eval(results, cfg.lengths.max)
    probe_memory(engine, cfg.lengths.max, micro_tokens, device, eot, log)
    start, start_step = time.time(), step
    interval = {"loss": 0.0, "targets": 0, "tokens": tokens, "time": start}  # finite steps since the last log line
    bad_in_a_row, skipped = 0, 0
    while step < train.max_steps:
        length = schedule(step)
        rows = per_step // length
        chunks = rank_batches(corpus.train, offsets_at(step, length, rows), length, micro_tokens, rank, world)
        # Normalize by the targets of the whole global step (summed over ranks), not per micro-batch.
        targets = reduce(torch.tensor([sum(map(count_targets, chunks))], dtype=torch.float64, device=device)).item()
        set_lr(engine, lr_at(step if train.lr_by == "steps" else tokens / per_step))
        step_loss = torch.zeros((), dtype=torch.float64, device=device)
        for i, chunk in enumerate(chunks):
            engine.set_gradient_accumulation_boundary(i == len(chunks) - 1)
            loss_sum = window_loss(engine, torch.from_numpy(chunk).to(device), eot)
            # DeepSpeed averages gradients over ranks; * world turns that average back into the global sum.
            engine.backward(loss_sum * (world / targets))
            step_loss += loss_sum.detach().double()
        step_loss = reduce(step_loss).item() / targets  # one scalar per step: every rank agrees on finiteness
        if math.isfinite(step_loss):
            engine.step()
            bad_in_a_row = 0
            interval["loss"] += step_loss * targets
            interval["targets"] += targets
        else:
            discard_gradients(engine)
            bad_in_a_row, skipped = bad_in_a_row + 1, skipped + 1
            if log:
                _say(f"step {step + 1}: non-finite loss {step_loss} at seq_len {length}; update skipped "
                     f"({bad_in_a_row} in a row, {skipped} in all)")
            if bad_in_a_row >= train.max_nonfinite:
                stop = (f"stopped: {bad_in_a_row} non-finite losses in a row (train.max_nonfinite), the last at "
                        f"step {step + 1}, seq_len {length}; last good checkpoint: {last_checkpoint(run_dir)}")
                if log:
                    _say(stop)
                    (run_dir / STOPPED).write_text(stop)
                return
        step, tokens = step + 1, tokens + int(targets)

        if step % train.log_every == 0 or step == train.max_steps:
            now = time.time()
            record = {"step": step, "tokens": tokens, "seq_len": length, "rows": rows,
                      "loss": interval["loss"] / max(1, interval["targets"]),
                      "lr": engine.optimizer.param_groups[0]["lr"],
                      "tokens_per_s": (tokens - interval["tokens"]) / (now - interval["time"]),
                      "elapsed_s": now - start, "skipped": skipped}
            if log:
                log.metrics(record, max_steps=train.max_steps,
                            eta_s=(now - start) / (step - start_step) * (train.max_steps - step))
            interval = {"loss": 0.0, "targets": 0, "tokens": tokens, "time": now}
        evaluate_now = step % cfg.eval.every == 0 or step == train.max_steps
        checkpoint_now = step % cfg.run.checkpoint_every == 0 or step == train.max_steps
        if evaluate_now or checkpoint_now:
            paused = time.time()
            if evaluate_now:
                last_eval = summarize_eval(record_eval(log, step, tokens, run_eval()), cfg.lengths.max)
            report(engine, {"step": step, "tokens": tokens, "elapsed_s": paused - start, **last_eval}, rank,
                   checkpoint_now)
            interval["time"] += time.time() - paused  # tokens/s measures training, not evaluation

    export_hf(engine, tokenizer, run_dir / "model", rank, {"raytrain.yaml": cfg.to_yaml()})


def probe_memory(engine, longest: int, micro_tokens: int, device, eot, log) -> None:
    """Forward and backward one micro-batch at the longest length before training, weighted by zero.

    An out-of-memory then shows at step 0, not hours in (Composer's and
    OLMo-core's pre-allocation). The gradients it leaves are exact zeros,
    accumulated into the first step without changing it; no optimizer step runs.
    """
    import torch

    from raytrain.loss import window_loss
    rows = max(1, micro_tokens // longest)
    if log:
        _say(f"memory probe: forward/backward of {rows} x {longest} tokens (the longest micro-batch) before step 1")
    engine.set_gradient_accumulation_boundary(False)
    engine.backward(window_loss(engine, torch.zeros((rows, longest + 1), dtype=torch.long, device=device), eot) * 0.0)


def summarize_eval(results: dict, longest_trained: int) -> dict:
    """Adds val/loss@max (at lengths.max, when evaluated) and val/loss@mean (over eval lengths): Tune objectives."""
    losses = {k: v for k, v in results.items() if k.startswith("val/loss@")}
    summary = dict(results, **{"val/loss@mean": sum(losses.values()) / len(losses)})
    if f"val/loss@{longest_trained}" in results:
        summary["val/loss@max"] = results[f"val/loss@{longest_trained}"]
    return summary


def record_eval(log, step: int, tokens: int, results: dict) -> dict:
    if log:
        log.eval({"step": step, "tokens": tokens, **results})
    return results


def report(engine, metrics: dict, rank: int, checkpoint: bool) -> None:
    """Report to Ray Train (a barrier on all ranks); with ``checkpoint``, every rank's DeepSpeed shards
    go into one Ray checkpoint with the loop state to resume from."""
    import ray.train
    if not checkpoint:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, tag=CHECKPOINT_TAG, client_state={})
        if rank == 0:
            Path(tmp, "state.json").write_text(json.dumps({"step": metrics["step"], "tokens": metrics["tokens"]}))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """The run's Ray checkpoint directories, oldest first (their names carry a timestamp)."""
    return sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())


def last_checkpoint(run_dir: Path) -> str:
    found = checkpoint_dirs(run_dir)
    return str(found[-1]) if found else "none yet"


def resume(engine, log) -> tuple[int, int]:
    """(step, tokens) of the newest checkpoint, its engine state loaded; (0, 0) for a fresh run."""
    import ray.train
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:  # fresh, or restarted before Ray registered any checkpoint: start over exactly
        if log:
            log.truncate_after(-1)
        return 0, 0
    with checkpoint.as_directory() as directory:
        engine.load_checkpoint(directory, tag=CHECKPOINT_TAG)
        state = json.loads(Path(directory, "state.json").read_text())
    if log:
        log.truncate_after(state["step"])
        _say(f"resumed from checkpoint at step {state['step']} ({state['tokens']:,} tokens): {checkpoint.path}")
    return state["step"], state["tokens"]


class RunLog:
    """Rank 0's files in the run directory: metrics.jsonl, eval.jsonl, and the log line."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)

    def metrics(self, record: dict, eta_s: float, max_steps: int) -> None:
        self._append("metrics.jsonl", record)
        _say(f"step {record['step']}/{max_steps} | seq_len {record['seq_len']} | rows {record['rows']} | "
              f"loss {record['loss']:.4f} | lr {record['lr']:.2e} | {record['tokens_per_s']:,.0f} tok/s | "
              f"elapsed {timedelta(seconds=round(record['elapsed_s']))} | ETA {timedelta(seconds=round(eta_s))}")

    def eval(self, record: dict) -> None:
        self._append("eval.jsonl", record)
        losses = "  ".join(f"{k.split('@')[1]}: {v:.4f}" for k, v in record.items() if k.startswith("val/loss@"))
        _say(f"eval step {record['step']} | val loss by length  {losses}")

    def truncate_after(self, step: int) -> None:
        """Drop records a crashed attempt wrote after the checkpoint it resumes from."""
        for name in ("metrics.jsonl", "eval.jsonl"):
            path = self.run_dir / name
            if path.exists():
                kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
                path.write_text("".join(line + "\n" for line in kept))

    def _append(self, name: str, record: dict) -> None:
        with (self.run_dir / name).open("a") as f:
            f.write(json.dumps(record) + "\n")


def _say(line: str) -> None:
    # Not print(): Ray Train patches print in workers and would echo each line twice.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# --- driver -------------------------------------------------------------------

def run_directory(cfg: Config) -> Path:
    name = cfg.run.name or f"{cfg.lengths.schedule}-{datetime.now():%Y%m%d-%H%M%S}"
    return Path(cfg.run.dir).expanduser().resolve() / name


def fit(cfg: Config, callbacks: list = ()):
    """Check the data, start (or join) Ray, and run ``train_worker`` on ``scaling.num_workers`` workers."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from raytrain.model import check_vocab

    tokenizer = load_tokenizer(cfg.tokenizer)
    check_vocab(cfg.model, tokenizer, cfg.tokenizer)
    if not cfg.data.cross_documents and tokenizer.eos_token_id is None:
        raise ConfigError([("data.cross_documents", False,
                            f"needs an end-of-text token to find documents; tokenizer {cfg.tokenizer} has none")])
    corpus = prepare_corpus(cfg.data, tokenizer)
    check_corpus(corpus, cfg.lengths.max, cfg.eval.lengths)

    run_dir = run_directory(cfg)
    cfg.run.name = run_dir.name
    check_same_run(run_dir, cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True,
                 runtime_env={"env_vars": {"DS_ACCELERATOR": "cuda" if cfg.scaling.use_gpu else "cpu"}})
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "run_dir": str(run_dir)},
        scaling_config=scaling_config(cfg.scaling),
        # Same name and storage as an earlier attempt: Ray Train resumes from its newest checkpoint.
        run_config=RunConfig(name=run_dir.name, storage_path=cfg.run.storage or str(run_dir.parent),
                             failure_config=FailureConfig(max_failures=cfg.run.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
                             callbacks=list(callbacks)),
    )
    (run_dir / STOPPED).unlink(missing_ok=True)
    result = trainer.fit()
    print(f"run directory: {run_dir}")
    if (run_dir / STOPPED).exists():  # the workers ended the run on purpose; say why
        raise TrainingStopped((run_dir / STOPPED).read_text())
    return result


class TrainingStopped(RuntimeError):
    """The run stopped itself (non-finite losses); retrying would only repeat them."""


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
