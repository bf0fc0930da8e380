"""The meter: steps aggregated into one record per log interval, with the only ``.item()`` at log time.

It decides its own cadence (``due``), counts non-finite steps (``exhausted``),
and its state (the open interval, the skip counters, the training time so far)
goes into every checkpoint, so a resumed run's records equal an uninterrupted
run's whether or not the interval was open at the checkpoint.
"""
from __future__ import annotations

import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import psutil
import torch

from raytrain import compiled
from raytrain.config import TrainConfig
from raytrain.steps import ModelShape


class MemoryGauge:
    """Bytes training holds at its peak: the GPU allocator's peak; on CPU this process's peak resident memory
    since the gauge was made, above what it held then (before the model: Python, torch, Ray, the communication
    op), so both count what training allocates.

    On Linux the gauge resets the kernel's high-water mark when it is made. getrusage's ``ru_maxrss`` cannot
    serve: the kernel carries it across exec, so a process started by fork and exec (a Ray worker, a spawned
    rank) begins with its parent's resident size as its peak; a test's ranks spawned from a long-running
    pytest process measured 0.30 GiB where the same ranks from a fresh process measured 0.21.
    """

    def __init__(self):
        try:
            Path(CLEAR_REFS).write_text("5")  # 5: reset the peak resident size to the current one
        except OSError:
            pass
        self.baseline = psutil.Process().memory_info().rss

    def peak(self) -> int:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return torch.cuda.max_memory_allocated()
        return resident_peak() - self.baseline


CLEAR_REFS, STATUS = "/proc/self/clear_refs", "/proc/self/status"


def resident_peak() -> int:
    """This process's peak resident bytes: VmHWM where Linux has it (reset by MemoryGauge), else ru_maxrss."""
    try:
        found = [line for line in Path(STATUS).read_text().splitlines() if line.startswith("VmHWM:")]
        return int(found[0].split()[1]) * 1024  # kB
    except (OSError, IndexError):
        scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class Startup:
    """Where the time from the command to the first step went: stages stamped (wall clock, so the driver's and
    the workers' stamps line up) in the driver, then on rank 0, each ending when it is marked."""

    def __init__(self, stamps: list, stage: str):
        """``stamps``: the driver's; ``stage``: what ended when this process got control."""
        self.stamps = [tuple(s) for s in stamps] or [("command", time.time())]
        self.mark(stage)

    def mark(self, stage: str) -> None:
        self.stamps.append((stage, time.time()))

    def done(self, stage: str, log) -> None:
        """The last stage: say where the time went and keep it in ``startup.json``."""
        self.mark(stage)
        log.say(self.line())
        log.record("startup.json", self.stages())

    def stages(self) -> dict[str, float]:
        """{stage: seconds}, in order, and the total."""
        pairs = zip(self.stamps, self.stamps[1:])
        return {**{stage: end - begin for (_, begin), (stage, end) in pairs},
                "total": self.stamps[-1][1] - self.stamps[0][1]}

    def line(self) -> str:
        stages = self.stages()
        total = stages.pop("total")
        return f"start-up: {total:.1f} s from the command to the first step (" + \
            ", ".join(f"{stage} {s:.1f} s" for stage, s in stages.items()) + ")"


STATE = ("loss_sum", "targets", "skipped", "bad_in_a_row", "interval_s", "elapsed_s", "interval_tokens", "flops",
         "data_s", "norm_sum", "norms", "checkpoint_s")


class Meter:
    """Aggregates steps into one record per ``train.log_every`` steps (and the last); ``peak_flops`` is the whole
    job's (every worker's device) for MFU."""

    def __init__(self, train: TrainConfig, model: ModelShape, peak_flops: float = float("nan"),
                 memory: Optional[MemoryGauge] = None, log=None):
        self.log_every, self.max_steps, self.max_nonfinite = train.log_every, train.max_steps, train.max_nonfinite
        self.model, self.peak_flops, self.memory, self.log = model, peak_flops, memory or MemoryGauge(), log
        self.loss_sum, self.targets, self.skipped, self.bad_in_a_row = 0.0, 0, 0, 0
        self.interval_s, self.elapsed_s, self.interval_tokens = 0.0, 0.0, 0
        self.flops, self.data_s, self.norm_sum, self.norms = 0.0, 0.0, 0.0, 0
        self.checkpoint_s = 0.0  # training time blocked by checkpoints (not counted in interval_s)
        self._started: Optional[float] = None

    def due(self, step: int) -> bool:
        """A record is due after ``step`` steps."""
        return step % self.log_every == 0 or step == self.max_steps

    @property
    def exhausted(self) -> bool:
        """Too many non-finite losses in a row: the run stops."""
        return self.bad_in_a_row >= self.max_nonfinite

    def start(self) -> None:
        self._started = time.perf_counter()

    def pause(self) -> None:
        """Stop the training clock (evaluation and checkpoints are not training time)."""
        if self._started is not None:
            spent = time.perf_counter() - self._started
            self.interval_s, self.elapsed_s, self._started = self.interval_s + spent, self.elapsed_s + spent, None

    @contextmanager
    def paused(self):
        self.pause()
        yield
        self.start()

    @contextmanager
    def waiting_for_data(self):
        """Time the step waited for its batches (the share of step time waiting for data)."""
        start = time.perf_counter()
        yield
        self.data_s += time.perf_counter() - start

    def update(self, step, loss, finite: bool, grad_norm) -> None:
        """Count a trained step (a StepPlan) with its loss tensor, finiteness and gradient norm."""
        targets = step.targets
        self.interval_tokens, self.flops = self.interval_tokens + targets, self.flops + step.flops(self.model)
        if grad_norm is not None:
            self.norm_sum, self.norms = self.norm_sum + grad_norm, self.norms + 1
        if finite:
            self.loss_sum = self.loss_sum + loss * targets  # a tensor: no host sync until flush
            self.targets += targets
            self.bad_in_a_row = 0
        else:
            self.skipped, self.bad_in_a_row = self.skipped + 1, self.bad_in_a_row + 1
            if self.log:
                self.log.say(f"step {step.step + 1}: non-finite loss {float(loss)} at seq_len {step.length}; update "
                             f"skipped ({self.bad_in_a_row} in a row, {self.skipped} in all)")

    def flush(self, step, tokens: int, lr: float) -> dict:
        """The interval's record (loss token-weighted over its finite steps), ending with ``step`` (a StepPlan);
        opens the next interval."""
        self.pause()
        loss = float(self.loss_sum) / self.targets if self.targets else None
        seconds = max(self.interval_s, 1e-9)
        record = {"step": step.step + 1, "tokens": tokens, "seq_len": step.length, "rows": step.rows, "loss": loss,
                  "lr": lr, "skipped": self.skipped, "grad_norm": float(self.norm_sum) / self.norms if self.norms
                  else None, "tokens_per_s": self.interval_tokens / seconds, "tflops": self.flops / seconds / 1e12,
                  "mfu": self.flops / seconds / self.peak_flops, "data_wait": self.data_s / seconds,
                  "peak_memory_gb": self.memory.peak() / 2**30, "interval_s": self.interval_s,
                  "elapsed_s": self.elapsed_s, "checkpoint_s": self.checkpoint_s,
                  "compilations": compiled.report()["compilations"]}  # recompilations show as this growing
        self.loss_sum, self.targets, self.interval_s, self.interval_tokens = 0.0, 0, 0.0, 0
        self.flops, self.data_s, self.norm_sum, self.norms, self.checkpoint_s = 0.0, 0.0, 0.0, 0, 0.0
        self.start()
        return record

    def state_dict(self) -> dict:
        return {key: float(v) if torch.is_tensor(v := getattr(self, key)) else v for key in STATE}

    def load_state_dict(self, state: dict) -> None:
        for key in STATE:
            setattr(self, key, state[key])
