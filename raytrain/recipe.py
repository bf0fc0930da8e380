"""The pieces of the training loop: a pure step plan, one step, a meter, and the checkpointer.

``train.train_worker`` strings them together (torchtitan's and torchtune's
recipe shape): ``Planner(step)`` says what a step trains on without touching the
engine, ``train_step`` runs it and returns its numbers, ``Meter`` aggregates
steps into one log record per interval, and ``Checkpointer`` saves and restores
every piece of loop state with the engine, so a resumed run writes the same
records as an uninterrupted one.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Optional

import numpy as np

from raytrain.data import TokenStream, micro_batches, shard, window_offsets
from raytrain.lengths import build_schedule

CHECKPOINT_TAG = "engine"


@dataclass(frozen=True)
class StepPlan:
    """What one optimizer step trains on: a pure function of the config, the corpus size and the step."""
    step: int
    length: int  # L: every row has L inputs and L targets
    rows: int  # rows of the global batch: tokens_per_step // L
    offsets: np.ndarray  # (rows,) window starts in the train stream
    world: int
    rows_per_micro: int  # the most rows one forward/backward takes

    @property
    def targets(self) -> int:
        """Targets of the whole global step: nothing is padded, so every row has L."""
        return self.rows * self.length

    @property
    def micro_batches(self) -> int:
        """Micro-batches per rank, equal on every rank so collective calls stay in step."""
        return micro_batches(self.rows, self.world, self.rows_per_micro)

    def share(self, rank: int) -> np.ndarray:
        """This rank's contiguous share of the window starts (shares differ by at most one row)."""
        return self.offsets[shard(self.rows, rank, self.world)]

    def rank_batches(self, stream: TokenStream, rank: int) -> list[np.ndarray]:
        """This rank's (rows, L + 1) micro-batches; one may be empty when a share is smaller than the count."""
        return np.array_split(stream.windows(self.share(rank), self.length), self.micro_batches)


@dataclass(frozen=True)
class Shape:
    """One step at length L: global rows, each rank's largest share, micro-batches per rank, rows per micro-batch."""
    length: int
    rows: int
    rank_rows: int
    micro_batches: int
    micro_rows: int


def step_shape(length: int, tokens_per_step: int, micro_batch_tokens: Optional[int], world: int) -> Shape:
    """How a step at length L splits: nothing padded, the same micro-batch count on every rank."""
    rows = tokens_per_step // length
    rank_rows = -(-rows // world)
    count = micro_batches(rows, world, max(1, (micro_batch_tokens or tokens_per_step) // length))
    return Shape(length, rows, rank_rows, count, -(-rank_rows // count))


class Planner:
    """``plan(step) -> StepPlan`` for the lengths and train sections, ``data.windows`` and the seed."""

    def __init__(self, lengths, train, windows: str, seed: int, n_tokens: int, world: int):
        self.schedule = build_schedule(lengths, seed, train.max_steps, train.tokens_per_step)
        self.offsets = window_offsets(windows, n_tokens, seed, self.schedule, train.tokens_per_step)
        self.tokens_per_step, self.world = train.tokens_per_step, world
        self.micro_tokens = train.micro_batch_tokens or train.tokens_per_step
        self.lengths = lengths

    def __call__(self, step: int) -> StepPlan:
        length = self.schedule(step)
        rows = self.tokens_per_step // length
        return StepPlan(step, length, rows, self.offsets(step, length, rows), self.world,
                        max(1, self.micro_tokens // length))

    def largest_micro_batch(self) -> tuple[int, int]:
        """(rows, L) of the largest micro-batch any rank runs at any length the schedule may draw."""
        shapes = [step_shape(L, self.tokens_per_step, self.micro_tokens, self.world) for L in self.lengths.support()]
        largest = max(shapes, key=lambda s: (s.micro_rows * s.length, s.length))
        return largest.micro_rows, largest.length


def train_step(engine, batches: list[np.ndarray], targets: int, world: int, loss):
    """Forward and backward every micro-batch, then update unless the loss is non-finite.

    ``loss(engine, windows)`` is the summed shifted cross-entropy of a micro-batch
    (``loss.window_loss`` with the run's document masking, precision and chunking).
    Returns the step's loss, summed over ranks and divided by the global step's
    targets (a float64 tensor), whether it was finite, and the gradient norm
    before clipping (DeepSpeed's, over all ranks; None for a skipped step). Each micro-batch's
    gradient is scaled by ``world / targets``: DeepSpeed averages gradients over
    ranks, and this turns the average back into the global-batch mean whatever
    the split. The finiteness check is the one host sync per step: every rank
    must agree to skip, and DeepSpeed's own gradient clipping syncs there anyway.
    """
    import torch
    import torch.distributed as dist

    from raytrain.engine import discard_gradients
    loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
    for i, batch in enumerate(batches):
        engine.set_gradient_accumulation_boundary(i == len(batches) - 1)
        micro_sum = loss(engine, torch.from_numpy(batch).to(engine.device))
        engine.backward(micro_sum * (world / targets))
        loss_sum += micro_sum.detach().double()
    dist.all_reduce(loss_sum)
    loss = loss_sum / targets
    finite = bool(torch.isfinite(loss))
    if not finite:
        discard_gradients(engine)
        return loss, finite, None
    # ZeRO 1-3 and DeepSpeed's bf16 optimizer keep the norm they clip with; plain ZeRO-0 clips without keeping it
    norm = None if engine.zero_optimization_stage() else torch.nn.utils.get_total_norm(
        [p.grad for p in engine.module.parameters() if p.grad is not None])
    engine.step()
    return loss, finite, engine.get_global_grad_norm() if norm is None else norm  # a tensor: read at log time


class Meter:
    """Aggregates steps into one record per log interval; the only ``.item()`` is at log time.

    Its state (the open interval, the skip counters, the training time so far)
    goes into every checkpoint, so a resumed run's records equal an uninterrupted
    run's whether or not the interval was open at the checkpoint. ``peak_flops``
    is the whole job's (every worker's device) for MFU.
    """

    def __init__(self, peak_flops: float = float("nan")):
        self.peak_flops = peak_flops
        self.loss_sum, self.targets, self.skipped, self.bad_in_a_row = 0.0, 0, 0, 0
        self.interval_s, self.elapsed_s, self.interval_tokens = 0.0, 0.0, 0
        self.flops, self.data_s, self.norm_sum, self.norms = 0.0, 0.0, 0.0, 0
        self._started: Optional[float] = None

    def start(self) -> None:
        self._started = time.perf_counter()

    def pause(self) -> None:
        """Stop the training clock (evaluation and checkpoints are not training time)."""
        if self._started is not None:
            spent = time.perf_counter() - self._started
            self.interval_s, self.elapsed_s, self._started = self.interval_s + spent, self.elapsed_s + spent, None

    @contextmanager
    def waiting_for_data(self):
        """Time spent building the step's batches on the host (the share of step time waiting for data)."""
        start = time.perf_counter()
        yield
        self.data_s += time.perf_counter() - start

    def update(self, loss, finite: bool, grad_norm, targets: int, flops: float) -> None:
        self.interval_tokens, self.flops = self.interval_tokens + targets, self.flops + flops
        if grad_norm is not None:
            self.norm_sum, self.norms = self.norm_sum + grad_norm, self.norms + 1
        if finite:
            self.loss_sum = self.loss_sum + loss * targets  # a tensor: no host sync until flush
            self.targets += targets
            self.bad_in_a_row = 0
        else:
            self.skipped, self.bad_in_a_row = self.skipped + 1, self.bad_in_a_row + 1

    def flush(self, plan: StepPlan, tokens: int, lr: float) -> dict:
        """The interval's record (loss token-weighted over its finite steps); opens the next interval."""
        self.pause()
        loss = float(self.loss_sum) / self.targets if self.targets else None
        seconds = max(self.interval_s, 1e-9)
        record = {"step": plan.step + 1, "tokens": tokens, "seq_len": plan.length, "rows": plan.rows, "loss": loss,
                  "lr": lr, "skipped": self.skipped, "grad_norm": float(self.norm_sum) / self.norms if self.norms
                  else None, "tokens_per_s": self.interval_tokens / seconds, "tflops": self.flops / seconds / 1e12,
                  "mfu": self.flops / seconds / self.peak_flops, "data_wait": self.data_s / seconds,
                  "peak_memory_gb": peak_memory() / 2**30, "interval_s": self.interval_s, "elapsed_s": self.elapsed_s}
        self.loss_sum, self.targets, self.interval_s, self.interval_tokens = 0.0, 0, 0.0, 0
        self.flops, self.data_s, self.norm_sum, self.norms = 0.0, 0.0, 0.0, 0
        self.start()
        return record

    def state_dict(self) -> dict:
        return {"loss_sum": float(self.loss_sum), "targets": self.targets, "skipped": self.skipped,
                "bad_in_a_row": self.bad_in_a_row, "interval_s": self.interval_s, "elapsed_s": self.elapsed_s,
                "interval_tokens": self.interval_tokens, "flops": self.flops, "data_s": self.data_s,
                "norm_sum": float(self.norm_sum), "norms": self.norms}

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)


_RESIDENT_BEFORE_MODEL = 0


def mark_memory_baseline() -> None:
    """On CPU, remember this process's resident memory before the model is built (Python, torch, Ray, the
    communication op), so the peak below counts what training allocates, as a GPU allocator's peak does."""
    import psutil
    global _RESIDENT_BEFORE_MODEL
    _RESIDENT_BEFORE_MODEL = psutil.Process().memory_info().rss


def peak_memory() -> int:
    """Bytes: the GPU allocator's peak on GPU; on CPU this process's peak resident memory above the baseline
    marked before the model was built."""
    import resource

    import torch
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - _RESIDENT_BEFORE_MODEL  # Linux: KiB


@dataclass
class LoopState:
    """Where the loop stands: everything besides the engine and the meter that a resume needs."""
    step: int = 0
    tokens: int = 0
    last_eval: Optional[dict] = None  # the newest evaluation, carried in every report to Ray (Tune's objective)


class Checkpointer:
    """Saves the engine (every rank's DeepSpeed shards), the loop state and the meter in one Ray checkpoint,
    and restores them; a fresh or restored run's records after its checkpoint are dropped and rewritten."""

    def __init__(self, rank: int, log: Optional["RunLog"]):
        self.rank, self.log = rank, log

    def restore(self, engine, meter: Meter) -> LoopState:
        import ray.train
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:  # fresh, or restarted before Ray registered any checkpoint: start over exactly
            if self.log:
                self.log.truncate_after(-1)
            return LoopState()
        with checkpoint.as_directory() as directory:
            engine.load_checkpoint(directory, tag=CHECKPOINT_TAG)
            saved = json.loads(Path(directory, "state.json").read_text())
        meter.load_state_dict(saved.pop("meter"))
        state = LoopState(**saved)
        if self.log:
            self.log.truncate_after(state.step)
            say(f"resumed from checkpoint at step {state.step} ({state.tokens:,} tokens): {checkpoint.path}")
        return state

    def report(self, engine, state: LoopState, meter: Meter, checkpoint: bool) -> None:
        """Report to Ray Train (a barrier on all ranks), with a checkpoint when ``checkpoint``."""
        import ray.train
        metrics = {"step": state.step, "tokens": state.tokens, "elapsed_s": meter.elapsed_s, **(state.last_eval or {})}
        if not checkpoint:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(tmp, tag=CHECKPOINT_TAG, client_state={})
            if self.rank == 0:
                Path(tmp, "state.json").write_text(json.dumps({**state.__dict__, "meter": meter.state_dict()}))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


class RunLog:
    """Rank 0's files in the run directory (metrics.jsonl, eval.jsonl), its log lines and its trackers."""

    def __init__(self, run_dir: Path, max_steps: int, trackers=None):
        self.run_dir, self.max_steps, self.trackers = run_dir, max_steps, trackers
        run_dir.mkdir(parents=True, exist_ok=True)

    def metrics(self, record: dict) -> None:
        self._append("metrics.jsonl", record)
        self.trackers and self.trackers.log("metrics", record)
        step, elapsed = record["step"], record["elapsed_s"]
        eta = elapsed / step * (self.max_steps - step)  # resumed runs carry their elapsed time: an honest rate
        loss = "n/a (every step skipped)" if record["loss"] is None else f"{record['loss']:.4f}"
        norm = "n/a" if record["grad_norm"] is None else f"{record['grad_norm']:.2f}"
        say(f"step {step}/{self.max_steps} | seq_len {record['seq_len']} | rows {record['rows']} | loss {loss} | "
            f"lr {record['lr']:.2e} | {record['tokens_per_s']:,.0f} tok/s | {record['tflops']:.3f} TFLOP/s | "
            f"MFU {record['mfu']:.1%} | grad norm {norm} | data {record['data_wait']:.1%} | "
            f"mem {record['peak_memory_gb']:.2f} GB | elapsed {timedelta(seconds=round(elapsed))} | "
            f"ETA {timedelta(seconds=round(eta))}")

    def eval(self, record: dict) -> None:
        self._append("eval.jsonl", record)
        self.trackers and self.trackers.log("eval", record)
        from raytrain.evaluate import length_losses
        losses = "  ".join(f"{length}: {loss:.4f}" for length, loss in length_losses(record).items())
        say(f"eval step {record['step']} | val loss by length  {losses}")

    def close(self) -> None:
        self.trackers and self.trackers.close()

    def truncate_after(self, step: int) -> None:
        """Drop records a crashed attempt wrote after the checkpoint it resumes from; trackers get what is kept
        and they lack."""
        for name in ("metrics.jsonl", "eval.jsonl"):
            path = self.run_dir / name
            if path.exists():
                kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
                path.write_text("".join(line + "\n" for line in kept))
        self.trackers and self.trackers.replay(self.run_dir)

    def _append(self, name: str, record: dict) -> None:
        with (self.run_dir / name).open("a") as f:
            f.write(json.dumps(record) + "\n")


def summarize_eval(results: dict, longest_trained: int) -> dict:
    """Adds val/loss@max (at lengths.max, when evaluated) and val/loss@mean (over eval lengths): Tune objectives."""
    from raytrain.evaluate import length_losses
    losses = length_losses(results)
    summary = dict(results, **{"val/loss@mean": sum(losses.values()) / len(losses)})
    if f"val/loss@{longest_trained}" in results:
        summary["val/loss@max"] = results[f"val/loss@{longest_trained}"]
    return summary


def say(line: str) -> None:
    # Not print(): Ray Train patches print in workers and would echo each line twice.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def non_finite_message(bad: int, skipped: int, plan: StepPlan, loss) -> str:
    return (f"step {plan.step + 1}: non-finite loss {float(loss)} at seq_len {plan.length}; update skipped "
            f"({bad} in a row, {skipped} in all)")

