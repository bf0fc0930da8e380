"""Time from `raytrain train` to the first step of the built-in default, stage by stage, cold and warm.

    python bench/startup.py [--runs 2]

Runs the README's command (`raytrain train`, the built-in default, 5 steps) as a
user would, in a subprocess that starts its own Ray, ``--runs`` times in fresh run
directories sharing one data cache; the first run may prepare the corpus and build
DeepSpeed's communication op (cold), later runs find both (warm). Each run's rank
0 writes ``startup.json``: the seconds from the command to the first step, by
stage (Ray, corpus and op, Ray Train's workers, model and engine, checkpoint and
first evaluation, memory probe). Then `raytrain tune` runs two such trials one
after the other (one Ray for both, as a search has): each trial's start-up, from
the trial's function starting to its first step. Prints a Markdown table with
the goal beside the totals, and each command's whole wall time (start-up,
5 steps, export, shutdown). A second table splits the stage "Ray Train's
workers" as Ray Train's controller logged it (its JSON log in the Ray session's
``logs/train``): worker processes created, their train context set up, the
train function shipped (which imports raytrain.train and so torch, DeepSpeed
and transformers in each worker). First, the floor: a bare Ray Train script
(start Ray, a TorchTrainer whose train function only notes the time, 2 workers x
1 CPU, as the default), timed the same way, so what raytrain adds shows apart
from what any trainer on Ray Train pays on this machine.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

GOAL_S = 15.0
SHORT = ["train.max_steps=5", "run.checkpoint_every=5", "eval.every=5"]
RAY_TRAIN = {"worker actors created": "worker processes created",
             "Train context initialized on workers": "train context set up",
             "Train function launched on workers": "train function shipped (imports)",
             "Worker group startup completed": "worker group in all"}
STEP = re.compile(r"\[Worker Group Initialization\] (?:\d+ )?(.+?) in ([\d.]+)s")


def ray_train_split() -> dict[str, dict[str, float]]:
    """{run name: {stage: seconds}} from the controller logs of the newest Ray session on this machine."""
    split = {}
    for log in sorted((Path("/tmp/ray/session_latest").resolve() / "logs" / "train").glob("*sys-controller*")):
        for line in log.read_text().splitlines():
            record = json.loads(line) if line.startswith("{") else {}
            found = STEP.match(record.get("message", ""))
            if found and found[1] in RAY_TRAIN:
                split.setdefault(record["run_name"], {})[RAY_TRAIN[found[1]]] = float(found[2])
    return split


def floor() -> None:
    """The bare Ray Train script (run with ``--floor`` in its own process): prints its stages as JSON."""
    import psutil
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    stamps = {"command": psutil.Process().create_time(), "Python, imports and the config": time.time()}
    ray.init(log_to_driver=False)
    stamps["Ray"] = time.time()
    entered = Path(tempfile.mkdtemp(prefix="raytrain-floor-")) / "entered"
    TorchTrainer(lambda: entered.write_text(str(time.time())),  # the workers share this machine's disk
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(name="floor", storage_path=str(entered.parent))).fit()
    stamps["Ray Train's workers"] = float(entered.read_text())
    times = list(stamps.values())
    print(json.dumps({stage: end - begin for stage, begin, end in zip(list(stamps)[1:], times, times[1:])} |
                     {"total": times[-1] - times[0]}))


def run(command: list[str]) -> tuple[float, str]:
    """(the command's wall time, its output)."""
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return time.perf_counter() - started, done.stdout


def tune_trials(root: Path, cache: str) -> list[tuple[dict, float]]:
    """Two trials of the default, one at a time, in one `raytrain tune`: each trial's startup.json."""
    spec = {"name": "startup", "dir": str(root), "num_samples": 1, "max_concurrent": 1,
            "base": {"config": None, "overrides": {k: yaml.safe_load(v) for k, v in (o.split("=") for o in SHORT)} |
                     {"data.cache_dir": cache}},
            "search": {"run.seed": {"grid": [1, 2]}}, "objective": {"metric": "val/loss@512", "mode": "min"},
            "scheduler": {"type": "fifo"}}
    (root / "startup.yaml").write_text(yaml.safe_dump(spec))
    wall, _ = run(["raytrain", "tune", "-c", str(root / "startup.yaml")])
    split = ray_train_split()
    trials = sorted((root / "startup" / "trials").iterdir())
    return [(json.loads((t / "startup.json").read_text()), wall, split.get(t.name, {})) for t in trials]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--cache-dir", default=None, help="data.cache_dir (default: a fresh one, so run 1 is cold)")
    parser.add_argument("--floor", action="store_true", help=argparse.SUPPRESS)  # the bare script's own process
    args = parser.parse_args()
    if args.floor:
        return floor()
    root = Path(tempfile.mkdtemp(prefix="raytrain-startup-"))
    cache = args.cache_dir or str(root / "cache")
    wall, out = run([sys.executable, __file__, "--floor"])
    rows = [("bare Ray Train (the floor)", json.loads(out.splitlines()[-1]), wall,
             ray_train_split().get("floor", {}))]
    for i in range(args.runs):
        wall, _ = run(["raytrain", "train", f"run.dir={root}", f"run.name=run{i}", f"data.cache_dir={cache}", *SHORT])
        kind = "cold" if i == 0 and not args.cache_dir else "warm"
        rows.append((f"`raytrain train` {i + 1} ({kind})", json.loads((root / f"run{i}" / "startup.json").read_text()),
                     wall, ray_train_split().get(f"run{i}", {})))
    rows += [(f"Tune trial {i + 1} of 2", *trial) for i, trial in enumerate(tune_trials(root, cache))]
    stages = [k for k in rows[1][1] if k != "total"]
    print("| run | " + " | ".join(stages) + " | to the first step | goal | whole command |")
    print("|---|" + "---|" * (len(stages) + 3))
    for name, times, wall, _ in rows:
        print(f"| {name} | " + " | ".join(f"{times.get(s, 0.0):.1f}" for s in stages) +
              f" | **{times['total']:.1f} s** | < {GOAL_S:.0f} s | {wall:.1f} s |")
    print("\nRay Train's workers, as its controller logged them (seconds):\n")
    print("| run | " + " | ".join(RAY_TRAIN.values()) + " |")
    print("|---|" + "---|" * len(RAY_TRAIN))
    for name, _, _, split in rows:
        print(f"| {name} | " + " | ".join(f"{split.get(s, float('nan')):.1f}" for s in RAY_TRAIN.values()) + " |")


if __name__ == "__main__":
    main()
