"""Which length schedule wins, honestly: each arm at its own tuned settings, several seeds, loss by position.

The study (default): fixed, uniform, linear, staged and pow2 at lengths 64-1024, documents crossed
(tune_configs/study/NAME.yaml). The long study (--long): lengths up to 4096 with documents kept apart
(tune_configs/study-long/NAME.yaml), arms fixed (the baseline), crossed (the baseline's tuned config with
documents crossed: concatenate and chunk), batch (a batch-size warmup at 4096), the four schedules, and pbt
(a population-based search whose replayed schedule is the arm). For every arm:
  1. ``raytrain tune``: a grid over train.lr and the arm's own main setting, equal tokens (the study: ASHA on
     tokens; the long study: every trial to the end, since ASHA's stops on one noisy evaluation of 24-step runs
     cut the baseline's better learning rates; pbt: Ray Tune's PBT; crossed: no search of its own);
  2. the best config trained again at every seed (``raytrain tune`` over run.seed, FIFO);
  3. final validation losses (mean and spread over seeds), tokens/s, and the training time, model FLOPs
     and tokens each run needs to reach the baseline's final val/loss at the longest length (its seed
     mean), interpolated between evaluations, as fractions of the baseline's own.
Everything runs through one Ray instance on this machine, two 1-worker runs at a time; an interrupted study
resumes where each search stopped. Prints a Markdown table and writes study.md, curves.png and positions.png
into --out (and the PNGs into docs/ with --docs).

    python bench/study.py [--long] [--out DIR] [--docs]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raytrain.report import read_jsonl  # noqa: E402
from raytrain.runlog import position_losses  # noqa: E402


@dataclass(frozen=True)
class Study:
    prefix: str  # searches are <out>/<prefix><arm>, seed runs <out>/<prefix><arm>-seeds
    configs: Path
    arms: list[str]
    seeds: list[int]
    lengths: tuple[int, ...]  # validation lengths in the table; the last is the target's
    derived: dict[str, tuple[str, dict]] = field(default_factory=dict)  # arm: (arm whose best config, overrides)
    baseline: str = "fixed"
    goal: float = 0.6  # the best arm's time to target, as a fraction of the baseline's

    @property
    def key(self) -> str:
        return f"val/loss@{self.lengths[-1]}"


SHORT = Study("study-", ROOT / "tune_configs" / "study", ["fixed", "uniform", "linear", "staged", "pow2"],
              [1, 2, 3], (64, 256, 1024))
LONG = Study("long-", ROOT / "tune_configs" / "study-long",
             ["fixed", "crossed", "batch", "uniform", "linear", "staged", "pow2", "pbt"], [1, 2, 3, 4], (512, 4096),
             derived={"crossed": ("fixed", {"data.cross_documents": True})})


def run_study(study: Study, out: Path) -> bool:
    """Steps 1 and 2 for every arm (each step skipped once its best_config.yaml exists); whether any ran."""
    import yaml

    from raytrain.tune import tune_main
    ran = False
    for arm in study.arms:
        source, overrides = study.derived.get(arm, (arm, {}))
        search = out / f"{study.prefix}{source}"
        if not (search / "best_config.yaml").is_file():
            tune_main(str(study.configs / f"{source}.yaml"), [f"dir={out}"], resume=(search / "tuner.pkl").is_file())
            ran = True
        seeds = out / f"{study.prefix}{arm}-seeds"
        if not (seeds / "best_config.yaml").is_file():
            spec = {"name": seeds.name, "dir": str(out),
                    "base": {"config": str(search / "best_config.yaml"), "overrides": overrides},
                    "search": {"run.seed": {"grid": study.seeds}}, "objective": {"metric": study.key, "mode": "min"},
                    "scheduler": {"type": "fifo"}}
            path = out / f"{seeds.name}.yaml"
            path.write_text(yaml.safe_dump(spec))
            tune_main(str(path), [], resume=(seeds / "tuner.pkl").is_file())
            ran = True
    return ran


@dataclass
class Run:
    """One seed run's records, and its training time, tokens and model FLOPs at each logged step."""
    evals: list[dict]
    metrics: list[dict]
    seconds: dict[int, float]
    tokens: dict[int, float]
    flops: dict[int, float]

    @classmethod
    def read(cls, run: Path) -> Run:
        evals, metrics = read_jsonl(run / "eval.jsonl"), read_jsonl(run / "metrics.jsonl")
        return cls(evals, metrics, {0: 0.0, **{m["step"]: m["elapsed_s"] for m in metrics}},
                   {0: 0, **{e["step"]: e["tokens"] for e in evals}}, cumulative_flops(run))

    def reach(self, key: str, target: float):
        """(seconds, FLOPs, tokens) at which ``key`` first reaches ``target``, interpolated between evaluations
        (training time excludes evaluation and checkpoints); None if it never does."""
        for before, after in zip(self.evals, self.evals[1:]):
            if after[key] <= target:
                f = (before[key] - target) / (before[key] - after[key]) if before[key] > target else 0.0
                a, b = before["step"], after["step"]
                return tuple(x[a] + f * (x[b] - x[a]) for x in (self.seconds, self.flops, self.tokens))
        return None


def cumulative_flops(run: Path) -> dict[int, float]:
    """Model FLOPs trained up to each step, from the length and budget of every step (steps.json) and the
    model's shape (raytrain's PaLM convention: attention over the whole L x L square, even with documents apart)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from raytrain.model import model_shape
    from raytrain.steps import rows_of
    with torch.device("meta"):
        shape = model_shape(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(run / "model")))
    total, flops = 0.0, {0: 0.0}
    for step, (length, budget) in enumerate(json.loads((run / "steps.json").read_text()), start=1):
        total += rows_of(budget, length) * length * shape.flops_per_token(length)
        flops[step] = total
    return flops


def mean_sd(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{format(statistics.mean(values), fmt)} ± {format(sd, fmt)}"


def tuned_setting(study: Study, out: Path, arm: str) -> str:
    """The values the arm's search chose (its searched keys read from its best config)."""
    import yaml
    source, overrides = study.derived.get(arm, (arm, {}))
    cfg = yaml.safe_load((out / f"{study.prefix}{arm}-seeds" / "best_config.yaml").read_text())
    spec = yaml.safe_load((study.configs / f"{source}.yaml").read_text())
    if spec["scheduler"]["type"] == "pbt":  # the replay: one stage per step trained, and any lr changes
        stages, changes = cfg["lengths"]["stages"], cfg["train"].get("lr_changes") or []
        return (f"lr {cfg['train']['lr']:.2g}, {len(stages)} replayed stages of lengths {min(L for _, L in stages)}-"
                f"{cfg['lengths']['max']}, {len(changes)} lr changes")
    keys = list(spec["search"])
    shown = []
    for key in keys:
        section, name = key.split(".")
        value = cfg.get(section, {}).get(name)
        if value not in (None, []):
            shown.append(f"{name} {value:g}" if isinstance(value, float) else f"{name} {value}")
    return ", ".join(shown + [f"{k}: {json.dumps(v)}" for k, v in overrides.items()]).replace("|", "/")


def seed_runs(study: Study, out: Path, arm: str) -> list[Path]:
    return sorted((out / f"{study.prefix}{arm}-seeds" / "trials").iterdir())


def analyse(study: Study, out: Path) -> tuple[str, dict]:
    runs = {arm: [Run.read(r) for r in seed_runs(study, out, arm)] for arm in study.arms}
    key, base = study.key, runs[study.baseline]
    target = statistics.mean(r.evals[-1][key] for r in base)
    scale = [statistics.mean(getattr(r, x)[r.metrics[-1]["step"]] for r in base)
             for x in ("seconds", "flops", "tokens")]
    lines = [f"Target: the tuned `{study.baseline}` baseline's final {key}, mean of seeds {study.seeds}: "
             f"{target:.4f} (its training time {scale[0]:.0f} s, {scale[1]:.3g} model FLOPs, "
             f"{scale[2]:,.0f} tokens).", "",
             "| arm | tuned setting | tokens/s | " + " | ".join(f"val/loss@{L}" for L in study.lengths) +
             f" | seeds reaching target | time to target (x baseline) | against the goal ({study.goal}x) | "
             "FLOPs to target (x) | tokens to target (x) |",
             "|---|---|---:|" + "---:|" * len(study.lengths) + "---:|---:|---:|---:|---:|"]
    summary = {"target": target}
    for arm, seeds in runs.items():
        reached = [r.reach(key, target) for r in seeds]
        fractions = [[x[i] / scale[i] for x in reached if x] for i in range(3)]
        speed = [statistics.mean(m["tokens_per_s"] for m in r.metrics) for r in seeds]
        finals = {L: [r.evals[-1][f"val/loss@{L}"] for r in seeds] for L in study.lengths}
        gap = f"{statistics.mean(fractions[0]) - study.goal:+.2f}" if fractions[0] else "never reached"
        lines.append(f"| {arm} | {tuned_setting(study, out, arm)} | {mean_sd(speed, ',.0f')} | " +
                     " | ".join(mean_sd(finals[L], ".3f") for L in study.lengths) +
                     f" | {len(fractions[0])}/{len(seeds)} | {mean_sd(fractions[0], '.2f')} | {gap} | " +
                     " | ".join(mean_sd(f, ".2f") for f in fractions[1:]) + " |")
        summary[arm] = {"final": {L: statistics.mean(v) for L, v in finals.items()}, "time_to_target": fractions[0],
                        "flops_to_target": fractions[1], "tokens_to_target": fractions[2]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return "\n".join(lines + ["", verdict(study, summary)]), runs


def verdict(study: Study, summary: dict) -> str:
    """The winner in plain words: the arm with the lowest mean time to target among those every seed of which
    reaches it, against the goal."""
    full = {arm: statistics.mean(s["time_to_target"]) for arm, s in summary.items()
            if arm not in ("target", study.baseline) and len(s["time_to_target"]) == len(study.seeds)}
    if not full:
        return (f"No arm reaches the baseline's {study.key} at every seed: no winner; the goal "
                f"({study.goal}x the baseline's time) is not met.")
    arm = min(full, key=full.get)
    met = "meets" if full[arm] <= study.goal else "does not meet"
    return (f"Winner: `{arm}`, at every seed, in {full[arm]:.2f}x the baseline's training time on average; "
            f"it {met} the goal of {study.goal}x.")


def plot(study: Study, runs: dict, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    key, longest = study.key, study.lengths[-1]
    colors = dict(zip(study.arms, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm, seeds in runs.items():
        for i, run in enumerate(seeds):
            ax.plot([run.seconds[e["step"]] for e in run.evals[1:]], [e[key] for e in run.evals[1:]],
                    color=colors[arm], alpha=0.8, label=arm if i == 0 else None)
    finals = [e[key] for seeds in runs.values() for r in seeds for e in r.evals[-1:]]
    ax.set(xlabel="training time (s; evaluation excluded)", ylabel=key, ylim=(None, max(finals) + 0.6),
           title=f"{key} against training time, each arm tuned, seeds {study.seeds}")
    ax.legend()
    fig.tight_layout()
    curves = out / "curves.png"
    fig.savefig(curves, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm, seeds in runs.items():
        buckets = [position_losses(r.evals[-1], longest) for r in seeds]
        x = [(a + b) / 2 + 1 for a, b, _ in buckets[0]]
        y = [statistics.mean(b[i][2] for b in buckets) for i in range(len(x))]
        ax.plot(x, y, "o-", markersize=3, color=colors[arm], label=arm)
    ax.set(xscale="log", xlabel=f"token position in the {longest}-token window (bucket middle, 1-based)",
           ylabel="validation loss", title=f"final loss by position at {longest}, mean of seeds {study.seeds}")
    ax.legend()
    fig.tight_layout()
    positions = out / "positions.png"
    fig.savefig(positions, dpi=110)
    plt.close(fig)
    return [curves, positions]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--long", action="store_true", help="the long-context study (lengths to 4096)")
    parser.add_argument("--out", help="where searches, runs and results go (runs/study or runs/study-long)")
    parser.add_argument("--docs", action="store_true", help="also copy the plots into docs/ (for the README)")
    args = parser.parse_args()
    study = LONG if args.long else SHORT
    out = Path(args.out or ("runs/study-long" if args.long else "runs/study")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    trained = run_study(study, out)
    table, runs = analyse(study, out)
    written = plot(study, runs, out)
    if args.docs:
        import shutil
        for path in written:
            shutil.copy(path, ROOT / "docs" / f"{study.prefix}{path.name}")
    spent = out / "wall_minutes.json"  # every invocation's minutes: a resumed study's total is their sum
    minutes = json.loads(spent.read_text()) if spent.is_file() else []
    if trained:  # an invocation that only analyses adds nothing
        spent.write_text(json.dumps(minutes := minutes + [round((time.perf_counter() - start) / 60, 1)]))
    text = f"{table}\n\nStudy wall time: {sum(minutes):.1f} min ({' + '.join(map(str, minutes))}, per invocation)\n"
    (out / "study.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
