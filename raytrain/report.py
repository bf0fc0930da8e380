"""``raytrain report RUN_DIR``: plots of a run and its per-length validation table."""
from __future__ import annotations

import json
from pathlib import Path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def eval_lengths(record: dict) -> list[int]:
    return sorted(int(key.split("@")[1]) for key in record if key.startswith("val/loss@"))


def table(evals: list[dict]) -> str:
    """Markdown table: one row per evaluation, one column per eval length."""
    lengths = eval_lengths(evals[0])
    lines = ["| step | tokens | " + " | ".join(f"val/loss@{L}" for L in lengths) + " |",
             "|---:|---:|" + "---:|" * len(lengths)]
    for e in evals:
        lines.append(f"| {e['step']} | {e['tokens']:,} | " +
                     " | ".join(f"{e[f'val/loss@{L}']:.4f}" for L in lengths) + " |")
    return "\n".join(lines)


def step_lengths(run_dir: Path) -> list[int]:
    """The length of every step, re-planned from the run's config: the step plan is a pure function."""
    from raytrain.config import load_config
    from raytrain.recipe import Planner
    cfg = load_config(str(run_dir / "config.yaml"), environment=False)
    n_tokens = json.loads((run_dir / "corpus.json").read_text())["train_tokens"]
    plan = Planner(cfg.lengths, cfg.train, cfg.data.windows, cfg.run.seed, n_tokens, cfg.scaling.num_workers)
    return [plan(step).length for step in range(cfg.train.max_steps)]


def write_report(run_dir: Path) -> list[Path]:
    """Write loss.png, lengths.png and eval.png into ``run_dir``; return their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics, evals = read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(run_dir / "eval.jsonl")
    written = []

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([m["tokens"] for m in metrics], [m["loss"] for m in metrics], label="train (per log interval)")
    for L in eval_lengths(evals[0]):
        ax.plot([e["tokens"] for e in evals], [e[f"val/loss@{L}"] for e in evals], "o--", label=f"val @ {L}")
    ax.set(xlabel="tokens seen", ylabel="loss (nats/token)", title=f"{run_dir.name}: loss")
    ax.legend()
    written.append(_save(fig, run_dir / "loss.png"))

    fig, (over_run, histogram) = plt.subplots(1, 2, figsize=(10, 4))
    lengths = step_lengths(run_dir)
    over_run.plot(range(1, len(lengths) + 1), lengths, ".", markersize=3)
    over_run.set(xlabel="step", ylabel="sequence length", title="length of every step")
    histogram.hist(lengths, bins=min(30, len(set(lengths))))
    histogram.set(xlabel="sequence length", ylabel="steps", title="length histogram")
    written.append(_save(fig, run_dir / "lengths.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    for e in evals:
        ax.plot(eval_lengths(e), [e[f"val/loss@{L}"] for L in eval_lengths(e)], "o-", label=f"step {e['step']}")
    ax.set(xscale="log", xlabel="evaluation length", ylabel="validation loss", title="loss by evaluation length")
    ax.legend()
    written.append(_save(fig, run_dir / "eval.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path
