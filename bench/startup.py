"""Time from `raytrain train` to the first step of the built-in default, stage by stage, cold and warm.

    python bench/startup.py [--runs 2]

Runs the README's command (`raytrain train`, the built-in default, 5 steps) as a
user would, in a subprocess that starts its own Ray, ``--runs`` times in fresh run
directories sharing one data cache; the first run may prepare the corpus and build
DeepSpeed's communication op (cold), later runs find both (warm). Each run's rank
0 writes ``startup.json``: the seconds from the command to the first step, by
stage (Ray, corpus and op, Ray Train's workers, model and engine, checkpoint and
first evaluation, memory probe). Prints a Markdown table with the goal beside
the warm total, and the command's whole wall time (start-up, 5 steps, export,
shutdown).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL_S = 15.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--cache-dir", default=None, help="data.cache_dir (default: a fresh one, so run 1 is cold)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="raytrain-startup-"))
    cache = args.cache_dir or str(root / "cache")
    rows = []
    for i in range(args.runs):
        started = time.perf_counter()
        done = subprocess.run(["raytrain", "train", f"run.dir={root}", f"run.name=run{i}", f"data.cache_dir={cache}",
                               "train.max_steps=5", "run.checkpoint_every=5", "eval.every=5"],
                              capture_output=True, text=True)
        wall = time.perf_counter() - started
        if done.returncode:
            sys.exit(f"run {i} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        rows.append(({**json.loads((root / f"run{i}" / "startup.json").read_text())}, wall))
    stages = [k for k in rows[0][0] if k != "total"]
    print("| run | " + " | ".join(stages) + " | to the first step | goal | whole command |")
    print("|---|" + "---|" * (len(stages) + 3))
    for i, (times, wall) in enumerate(rows):
        kind = "cold" if i == 0 and not args.cache_dir else "warm"
        print(f"| {i + 1} ({kind}) | " + " | ".join(f"{times[s]:.1f}" for s in stages) +
              f" | **{times['total']:.1f} s** | < {GOAL_S:.0f} s | {wall:.1f} s |")


if __name__ == "__main__":
    main()
