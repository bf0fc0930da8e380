"""Which length schedule wins, honestly: each at its own tuned learning rate, three seeds, loss by position.

For each of fixed, uniform, linear, staged and pow2 (tune_configs/study/NAME.yaml):
  1. ``raytrain tune``: a grid over train.lr and the schedule's own main setting, equal tokens, ASHA on tokens;
  2. the best config trained again at seeds 1, 2 and 3 (``raytrain tune`` over run.seed, FIFO);
  3. per schedule: final val/loss at 64, 256 and 1024 (mean and spread over seeds), tokens/s, and the training
     time and tokens it needs to reach the tuned fixed baseline's final val/loss@1024 (its seed mean),
     interpolated between evaluations, as a fraction of the baseline's own training time and tokens.
Everything runs through one Ray instance on this machine, two 1-worker runs at a time. Prints a Markdown
table and writes study.md, curves.png and positions.png into --out (and the PNGs into docs/ with --docs).

    python bench/study.py [--out runs/study] [--docs]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raytrain.evaluate import position_losses  # noqa: E402
from raytrain.report import read_jsonl  # noqa: E402

SCHEDULES = ["fixed", "uniform", "linear", "staged", "pow2"]
SEEDS = [1, 2, 3]
LONGEST = 1024
KEY = f"val/loss@{LONGEST}"


def run_study(out: Path) -> None:
    """Steps 1 and 2 for every schedule (an interrupted study resumes where each search stopped)."""
    import yaml

    from raytrain.tune import tune_main
    for schedule in SCHEDULES:
        search = out / f"study-{schedule}"
        if not (search / "best_config.yaml").is_file():
            tune_main(str(ROOT / "tune_configs" / "study" / f"{schedule}.yaml"), [f"dir={out}"],
                      resume=(search / "tuner.pkl").is_file())
        seeds = out / f"study-{schedule}-seeds"
        if not (seeds / "best_config.yaml").is_file():
            spec = {"name": seeds.name, "dir": str(out), "base": {"config": str(search / "best_config.yaml")},
                    "search": {"run.seed": {"grid": SEEDS}}, "objective": {"metric": KEY, "mode": "min"},
                    "scheduler": {"type": "fifo"}}
            path = out / f"{seeds.name}.yaml"
            path.write_text(yaml.safe_dump(spec))
            tune_main(str(path), [], resume=(seeds / "tuner.pkl").is_file())


def seed_runs(out: Path, schedule: str) -> list[Path]:
    return sorted((out / f"study-{schedule}-seeds" / "trials").iterdir())


def training_seconds(metrics: list[dict]) -> dict[int, float]:
    """Training time (evaluation and checkpoints excluded) at each logged step."""
    return {0: 0.0, **{m["step"]: m["elapsed_s"] for m in metrics}}


def reach(evals: list[dict], seconds: dict[int, float], target: float):
    """(seconds, tokens) at which val/loss@LONGEST first reaches ``target``, interpolated; None if never."""
    for before, after in zip(evals, evals[1:]):
        if after[KEY] <= target:
            f = (before[KEY] - target) / (before[KEY] - after[KEY]) if before[KEY] > target else 0.0
            s0, s1 = seconds[before["step"]], seconds[after["step"]]
            return s0 + f * (s1 - s0), before["tokens"] + f * (after["tokens"] - before["tokens"])
    return None


def mean_sd(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{format(statistics.mean(values), fmt)} ± {format(sd, fmt)}"


def analyse(out: Path) -> tuple[str, dict]:
    runs = {s: [(read_jsonl(r / "eval.jsonl"), read_jsonl(r / "metrics.jsonl"), r) for r in seed_runs(out, s)]
            for s in SCHEDULES}
    baseline = runs["fixed"]
    target = statistics.mean(e[-1][KEY] for e, _, _ in baseline)
    base_seconds = statistics.mean(m[-1]["elapsed_s"] for _, m, _ in baseline)
    base_tokens = statistics.mean(m[-1]["tokens"] for _, m, _ in baseline)
    lines = [f"Target: the tuned `fixed` baseline's final {KEY}, mean of seeds {SEEDS}: {target:.4f} "
             f"(its training time {base_seconds:.0f} s, {base_tokens:,.0f} tokens).", "",
             "| schedule | tuned setting | tokens/s | val/loss@64 | val/loss@256 | val/loss@1024 | "
             "seeds reaching target | time to target (x fixed) | tokens to target (x fixed) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    summary = {"target": target}
    for schedule, seeds in runs.items():
        cfg = json.loads(json.dumps(__import__("yaml").safe_load(
            (out / f"study-{schedule}" / "best_config.yaml").read_text())))
        setting = f"lr {cfg['train']['lr']:g}" + {
            "uniform": f", warmup {cfg['lengths'].get('warmup_steps')}",
            "linear": f", warmup {cfg['lengths'].get('warmup_steps')}",
            "staged": f", stages {cfg['lengths'].get('stages')}",
            "pow2": f", cycles {cfg['lengths'].get('cycles')}"}.get(schedule, "")
        reached = [reach(e, training_seconds(m), target) for e, m, _ in seeds]
        times = [r[0] / base_seconds for r in reached if r]
        tokens = [r[1] / base_tokens for r in reached if r]
        speed = [statistics.mean(x["tokens_per_s"] for x in m) for _, m, _ in seeds]
        finals = {L: [e[-1][f"val/loss@{L}"] for e, _, _ in seeds] for L in (64, 256, LONGEST)}
        lines.append(f"| {schedule} | {setting} | {mean_sd(speed, ',.0f')} | {mean_sd(finals[64], '.3f')} | "
                     f"{mean_sd(finals[256], '.3f')} | {mean_sd(finals[LONGEST], '.3f')} | "
                     f"{len(times)}/{len(seeds)} | {mean_sd(times, '.2f')} | {mean_sd(tokens, '.2f')} |")
        summary[schedule] = {"setting": setting, "final": {L: statistics.mean(v) for L, v in finals.items()},
                             "time_to_target": times, "tokens_to_target": tokens}
    return "\n".join(lines), runs


def plot(runs: dict, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colors = dict(zip(SCHEDULES, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for schedule, seeds in runs.items():
        for i, (evals, metrics, _) in enumerate(seeds):
            seconds = training_seconds(metrics)
            ax.plot([seconds[e["step"]] for e in evals[1:]], [e[KEY] for e in evals[1:]], color=colors[schedule],
                    alpha=0.8, label=schedule if i == 0 else None)
    ax.set(xlabel="training time (s; evaluation excluded)", ylabel=KEY, ylim=(None, 3.2),
           title=f"{KEY} against training time, seeds {SEEDS}, each schedule at its tuned setting")
    ax.legend()
    fig.tight_layout()
    curves = out / "curves.png"
    fig.savefig(curves, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for schedule, seeds in runs.items():
        buckets = [position_losses(evals[-1], LONGEST) for evals, _, _ in seeds]
        x = [(a + b) / 2 + 1 for a, b, _ in buckets[0]]
        y = [statistics.mean(b[i][2] for b in buckets) for i in range(len(x))]
        ax.plot(x, y, "o-", markersize=3, color=colors[schedule], label=schedule)
    ax.set(xscale="log", xlabel="token position in the 1024-token window (bucket middle, 1-based)",
           ylabel="validation loss", title=f"final loss by position at {LONGEST}, mean of seeds {SEEDS}")
    ax.legend()
    fig.tight_layout()
    positions = out / "positions.png"
    fig.savefig(positions, dpi=110)
    plt.close(fig)
    return [curves, positions]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/study", help="where searches, runs and results go")
    parser.add_argument("--docs", action="store_true", help="also copy the plots into docs/ (for the README)")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    run_study(out)
    table, runs = analyse(out)
    written = plot(runs, out)
    if args.docs:
        import shutil
        for path in written:
            shutil.copy(path, ROOT / "docs" / f"study-{path.name}")
    text = f"{table}\n\nStudy wall time (this invocation): {(time.perf_counter() - start) / 60:.1f} min\n"
    (out / "study.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
