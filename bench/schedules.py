"""Which length schedule wins? Train the built-in default under each schedule, same token budget and seeds.

For each schedule and seed: tokens/s, training wall time, final val/loss@L at each
eval length (one above lengths.max), and the wall time and tokens needed to reach
the fixed baseline's final val/loss@max (linear interpolation between evaluations;
"-" if never reached), as a speedup over the baseline. Every run shares one Ray
instance; the table is printed as Markdown.

    python bench/schedules.py [--steps 120] [--seeds 0 1] [--out runs/schedules]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

SCHEDULES = {  # lengths.* overrides on top of the built-in default (min 32, max 256, multiple_of 8)
    "fixed": ["lengths.schedule=fixed"],
    "uniform": ["lengths.schedule=uniform"],
    "linear": ["lengths.schedule=linear", "lengths.warmup_steps={warmup}"],
    "staged": ["lengths.schedule=staged", "lengths.stages=[[{third},64],[{two_thirds},128]]"],
    "pow2": ["lengths.schedule=pow2"],
}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def training_seconds(metrics: list[dict]) -> dict[int, float]:
    """Cumulative training time (evaluation excluded) at each logged step."""
    total, previous, at = 0.0, 0, {0: 0.0}
    for m in metrics:
        total += (m["tokens"] - previous) / m["tokens_per_s"]
        previous = m["tokens"]
        at[m["step"]] = total
    return at


def time_to_reach(evals: list[dict], seconds: dict[int, float], key: str, target: float):
    """(seconds, tokens) at which ``key`` first reaches ``target``, interpolating between evaluations."""
    for before, after in zip(evals, evals[1:]):
        if after[key] <= target:
            f = (before[key] - target) / (before[key] - after[key]) if before[key] > target else 0.0
            s0, s1 = seconds[before["step"]], seconds[after["step"]]
            return s0 + f * (s1 - s0), before["tokens"] + f * (after["tokens"] - before["tokens"])
    return None


def plot(runs: dict, names: list[str], seed: int, key: str, path: Path) -> None:
    """val/loss@max against training time for each schedule (one seed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in names:
        evals = read_jsonl(runs[name, seed] / "eval.jsonl")[1:]
        seconds = training_seconds(read_jsonl(runs[name, seed] / "metrics.jsonl"))
        ax.plot([seconds[e["step"]] for e in evals], [e[key] for e in evals], "o-", markersize=3, label=name)
    ax.set(xlabel="training wall time (s)", ylabel=key, title=f"length schedules, seed {seed}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES))
    parser.add_argument("--out", default="runs/schedules")
    args = parser.parse_args()

    import ray

    from raytrain.config import load_config
    from raytrain.train import fit

    ray.init(runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}})
    out = Path(args.out).resolve()
    fill = {"warmup": args.steps // 2, "third": args.steps // 3, "two_thirds": 2 * args.steps // 3}
    runs = {}
    for name in args.schedules:
        for seed in args.seeds:
            run_dir = out / f"{name}-seed{seed}"
            if not (run_dir / "model").exists():
                extra = [o.format(**fill) for o in SCHEDULES[name]]
                fit(load_config(None, extra + [
                    f"train.max_steps={args.steps}", "eval.every=20", "eval.tokens=8192",
                    "run.checkpoint_every=100000", f"run.seed={seed}", f"run.dir={out}", f"run.name={run_dir.name}"]))
            runs[name, seed] = run_dir

    cfg = load_config(str(runs[args.schedules[0], args.seeds[0]] / "config.yaml"))
    key = f"val/loss@{cfg.lengths.max}"
    lengths = cfg.eval.lengths
    rows = []
    for name in args.schedules:
        per_seed = []
        for seed in args.seeds:
            metrics, evals = read_jsonl(runs[name, seed] / "metrics.jsonl"), read_jsonl(runs[name, seed] / "eval.jsonl")
            base_evals = read_jsonl(runs["fixed", seed] / "eval.jsonl")
            base_seconds = training_seconds(read_jsonl(runs["fixed", seed] / "metrics.jsonl"))
            seconds = training_seconds(metrics)
            reached = time_to_reach(evals, seconds, key, base_evals[-1][key])
            per_seed.append({
                "tokens_per_s": metrics[-1]["tokens"] / seconds[metrics[-1]["step"]],
                "wall_s": seconds[metrics[-1]["step"]],
                **{L: evals[-1][f"val/loss@{L}"] for L in lengths},
                "speedup_time": base_seconds[base_evals[-1]["step"]] / reached[0] if reached else None,
                "speedup_tokens": base_evals[-1]["tokens"] / reached[1] if reached else None,
            })
        rows.append((name, per_seed))

    plot(runs, args.schedules, args.seeds[0], key, out / "schedules.png")

    def cell(values, fmt):
        values = [v for v in values if v is not None]
        if not values:
            return "-"
        spread = f" ± {statistics.pstdev(values):{fmt}}" if len(values) > 1 else ""
        return f"{statistics.mean(values):{fmt}}{spread}"

    header = ["schedule", "tokens/s", "train wall s"] + [f"val/loss@{L}" for L in lengths] + \
        [f"speedup to fixed's {key} (time)", "(tokens)"]
    print(f"\n{args.steps} steps x {cfg.train.tokens_per_step} tokens, seeds {args.seeds} "
          f"(mean ± spread over seeds), lengths {cfg.lengths.min}-{cfg.lengths.max}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, per_seed in rows:
        cells = [cell([r["tokens_per_s"] for r in per_seed], ",.0f"), cell([r["wall_s"] for r in per_seed], ".0f")]
        cells += [cell([r[L] for r in per_seed], ".3f") for L in lengths]
        cells += [cell([r["speedup_time"] for r in per_seed], ".2f") + "x",
                  cell([r["speedup_tokens"] for r in per_seed], ".2f") + "x"]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
