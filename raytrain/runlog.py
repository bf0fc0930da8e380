"""The run's records and log lines: rank 0's ``RunLog`` (metrics.jsonl, eval.jsonl, its trackers), and a
``NullRunLog`` on the other ranks, so the loop never asks which rank it is on.

Records are appended a line at a time; a process stopped mid-append (a node
lost, a full disk) leaves a torn last line, which the next attempt drops (and
says so) when it rewrites the files to its checkpoint, atomically.
"""
from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

from raytrain import console

RECORDS = ("metrics.jsonl", "eval.jsonl")
LINEAGE = "lineage.json"  # a run started from another's checkpoint: [{from_step, run, lr, changed}, ...]


def say(line: str) -> None:
    """A line of rank 0's for the user's console (marked, so the driver's console shows it: console.py)."""
    console.say(line, rank=0)


def read_records(path: Path) -> tuple[list[dict], str | None]:
    """(the whole records of a .jsonl file, its torn last line or None)."""
    lines = path.read_text().split("\n") if path.is_file() else []
    records, torn = [], None
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if i < len(lines) - 1 and any(rest.strip() for rest in lines[i + 1:]):
                raise ValueError(f"{path}: line {i + 1} is not a JSON record and is not the last line") from None
            torn = line
    return records, torn


def rewrite(path: Path, records: list[dict]) -> None:
    """Replace a records file in one step (a crash leaves the old or the new file, never half of one)."""
    scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    scratch.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(scratch, path)


def read_lineage(run_dir: Path, lr: float) -> list[dict]:
    """A run's ``lineage.json``; a run that never started from another's checkpoint is one stretch at ``lr``."""
    path = run_dir / LINEAGE
    if path.is_file():
        return json.loads(path.read_text())
    return [{"from_step": 0, "run": run_dir.name, "lr": lr, "changed": {}}]


class RunLog:
    """Rank 0's records in the run directory, its log lines and its trackers."""

    def __init__(self, run_dir: Path, max_steps: int, trackers=None):
        self.run_dir, self.max_steps, self.trackers = run_dir, max_steps, trackers
        run_dir.mkdir(parents=True, exist_ok=True)

    def say(self, line: str) -> None:
        say(line)

    def metrics(self, record: dict) -> None:
        self._append("metrics.jsonl", record)
        if self.trackers:
            self.trackers.log("metrics", record)
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
        if self.trackers:
            self.trackers.log("eval", record)
        losses = "  ".join(f"{length}: {loss:.4f}" for length, loss in length_losses(record).items())
        say(f"eval step {record['step']} | val loss by length  {losses}")

    def record(self, name: str, values: dict | list) -> None:
        """A JSON file of the run directory, written whole."""
        (self.run_dir / name).write_text(json.dumps(values, indent=1 if isinstance(values, dict) else None))

    def close(self) -> None:
        if self.trackers:
            self.trackers.close()

    def truncate_after(self, step: int) -> None:
        """Keep only the records up to ``step`` (the checkpoint a run resumes from; -1 for a fresh start),
        dropping a torn last line; trackers get what is kept and they lack."""
        for name in RECORDS:
            path = self.run_dir / name
            if not path.exists():
                continue
            records, torn = read_records(path)
            if torn is not None:
                say(f"warning: {path} ended in a torn record ({torn[:60]!r}...), written by an attempt that was "
                    "stopped mid-write; dropped")
            rewrite(path, [r for r in records if r["step"] <= step])
        if self.trackers:
            self.trackers.replay(self.run_dir)

    def adopt(self, donor_dir: Path, step: int, lineage: dict) -> None:
        """Start from another run's checkpoint at ``step``: its records up to there become this run's (the model
        carries that history), and ``lineage.json`` says which run it came from and what changed."""
        for name in RECORDS:
            records = read_records(donor_dir / name)[0] if (donor_dir / name).is_file() else []
            rewrite(self.run_dir / name, [r for r in records if r["step"] <= step])
        segments = [seg for seg in read_lineage(donor_dir, lineage["donor_lr"]) if seg["from_step"] < step] + [
            {"from_step": step, "run": self.run_dir.name, "lr": lineage["lr"], "changed": lineage["changed"]}]
        self.record(LINEAGE, segments)
        if self.trackers:
            self.trackers.replay(self.run_dir)

    def _append(self, name: str, record: dict) -> None:
        with (self.run_dir / name).open("a") as f:
            f.write(json.dumps(record) + "\n")


class NullRunLog:
    """What the ranks that do not log hold instead of a RunLog: every call does nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def length_losses(record: dict) -> dict[int, float]:
    """{L: val/loss@L} of an evaluation record (not its position buckets, nor @max / @mean)."""
    return dict(sorted((int(key[9:]), value) for key, value in record.items()
                       if key.startswith("val/loss@") and key[9:].isdigit()))


def position_losses(record: dict, length: int) -> list[tuple[int, int, float]]:
    """[(first position, last position, loss)] of the buckets at ``length``, in position order."""
    prefix = f"val/loss@{length}/pos"
    found = [(*map(int, key[len(prefix):].split("-")), value) for key, value in record.items()
             if key.startswith(prefix)]
    return sorted(found)
