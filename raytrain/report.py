"""``raytrain report RUN_DIR``: plots of a run and its per-length validation table."""
from __future__ import annotations

import json
from pathlib import Path

from matplotlib.figure import Figure  # no pyplot: no backend, no window, no global figure state

from raytrain.generate import samples
from raytrain.loading import load_config
from raytrain.runlog import length_losses, position_losses, read_records
from raytrain.steps import Planner


def read_jsonl(path: Path) -> list[dict]:
    return read_records(path)[0]


def report_run(run_dir: Path, more_runs: list[Path], out: str | None) -> None:
    """``raytrain report``: the per-length table, the plots, samples from the exported model, and with more runs
    their final losses by position on one plot."""
    print(table(read_jsonl(run_dir / "eval.jsonl")))
    for path in write_report(run_dir):
        print(f"wrote {path}")
    if (run_dir / "model" / "config.json").is_file():
        text = samples(run_dir / "model")
        (run_dir / "samples.txt").write_text(text + "\n")
        print(f"samples from {run_dir / 'model'}:\n{text}\nwrote {run_dir / 'samples.txt'}")
    if more_runs:
        print(f"wrote {plot_positions([run_dir, *more_runs], Path(out or run_dir / 'positions-compared.png'))}")


def table(evals: list[dict]) -> str:
    """Markdown table: one row per evaluation, one column per eval length."""
    lengths = list(length_losses(evals[0]))
    lines = ["| step | tokens | " + " | ".join(f"val/loss@{L}" for L in lengths) + " |",
             "|---:|---:|" + "---:|" * len(lengths)]
    for e in evals:
        lines.append(f"| {e['step']} | {e['tokens']:,} | " +
                     " | ".join(f"{e[f'val/loss@{L}']:.4f}" for L in lengths) + " |")
    return "\n".join(lines)


def step_lengths(run_dir: Path) -> list[int]:
    """The length of every step, re-planned from the run's config: the step plan is a pure function."""
    cfg = load_config(str(run_dir / "config.yaml"), environment=False)
    n_tokens = json.loads((run_dir / "corpus.json").read_text())["train_tokens"]
    plan = Planner(cfg.lengths, cfg.train, cfg.data.windows, cfg.run.seed, n_tokens, cfg.scaling.num_workers)
    return [plan(step).length for step in range(cfg.train.max_steps)]


def write_report(run_dir: Path) -> list[Path]:
    """Write loss.png, lengths.png and eval.png into ``run_dir``; return their paths."""
    metrics, evals = read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(run_dir / "eval.jsonl")
    written = []

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.plot([m["tokens"] for m in metrics], [m["loss"] for m in metrics], label="train (per log interval)")
    for L in length_losses(evals[0]):
        ax.plot([e["tokens"] for e in evals], [e[f"val/loss@{L}"] for e in evals], "o--", label=f"val @ {L}")
    ax.set(xlabel="tokens seen", ylabel="loss (nats/token)", title=f"{run_dir.name}: loss")
    ax.legend()
    written.append(_save(fig, run_dir / "loss.png"))

    fig = Figure(figsize=(10, 4))
    over_run, histogram = fig.subplots(1, 2)
    lengths = step_lengths(run_dir)
    over_run.plot(range(1, len(lengths) + 1), lengths, ".", markersize=3)
    over_run.set(xlabel="step", ylabel="sequence length", title="length of every step")
    histogram.hist(lengths, bins=min(30, len(set(lengths))))
    histogram.set(xlabel="sequence length", ylabel="steps", title="length histogram")
    written.append(_save(fig, run_dir / "lengths.png"))

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for e in evals:
        ax.plot(list(length_losses(e)), list(length_losses(e).values()), "o-", label=f"step {e['step']}")
    ax.set(xscale="log", xlabel="evaluation length", ylabel="validation loss", title="loss by evaluation length")
    ax.legend()
    written.append(_save(fig, run_dir / "eval.png"))
    written.append(plot_positions([run_dir], run_dir / "positions.png"))
    return written


def plot_positions(run_dirs: list[Path], path: Path) -> Path:
    """Final validation loss by token position (buckets 0, 1, 2-3, ...): one curve per run and length.

    A model that ignores its context gives a flat curve; one that uses it keeps falling with position.
    """
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for run_dir in run_dirs:
        final = read_jsonl(Path(run_dir) / "eval.jsonl")[-1]
        for length in length_losses(final):
            buckets = position_losses(final, length)
            ax.plot([(a + b) / 2 + 1 for a, b, _ in buckets], [loss for *_, loss in buckets], "o-", markersize=3,
                    label=f"{Path(run_dir).name} @ {length}" if len(run_dirs) > 1 else f"L = {length}")
    ax.set(xscale="log", xlabel="token position in the window (bucket middle, 1-based)",
           ylabel="validation loss", title="final validation loss by token position")
    ax.legend(fontsize=7)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
