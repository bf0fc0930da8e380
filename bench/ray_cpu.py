"""Where the CPU goes while raytrain trains: the worker against Ray's own processes, in the steady state.

The layout ``bench/throughput.py`` finds slowest (1 worker x 2 CPUs on a 2-core
machine: the worker's two threads fill both cores, so any other process that
runs stalls them). Every process's CPU time is read (psutil) when the run's
``metrics.jsonl`` reaches step ``--from`` and again at ``--to``; printed per
process group as a share of one core over that window, once per ``--log-every``.

    python bench/ray_cpu.py [--log-every 1 10] [--steps 70]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")
GROUPS = ("gcs_server", "raylet", "dashboard/agent", "dashboard.py", "log_monitor", "monitor.py", "runtime_env")


def group(process, driver: int) -> str | None:
    try:
        name, command = process.name(), " ".join(process.cmdline())
    except Exception:
        return None
    if process.pid == driver:
        return "driver (fit)"
    if "RayTrainWorker" in name:
        return "training worker"
    for key in GROUPS:
        if key in command:
            return key
    return name if name.startswith(("ray::", "ray-")) else "other processes"


def cpu_seconds() -> dict[int, tuple[str | None, float]]:
    import psutil
    seen = {}
    for process in psutil.process_iter():
        try:
            times = process.cpu_times()
            seen[process.pid] = (group(process, os.getpid()), times.user + times.system)
        except Exception:
            pass
    return seen


def measure(log_every: int, steps: int, first: int, last: int, tmp: str) -> tuple[float, float, dict[str, float]]:
    """(tokens/s over the window, window seconds, CPU seconds per group over the window)."""
    from throughput import logged_rate, run_keys  # the same runs as bench/throughput.py's 1 x 2 layout

    from raytrain.launch import fit, run_directory
    from raytrain.loading import load_config
    cfg = load_config(None, run_keys(256, 8192, steps, log_every, tmp) + [
        "scaling.num_workers=1", "scaling.cpus_per_worker=2", f"run.name=log{log_every}"])
    metrics, marks, done = run_directory(cfg) / "metrics.jsonl", {}, threading.Event()

    def watch():
        while not done.is_set():
            step = json.loads(metrics.read_text().splitlines()[-1])["step"] if metrics.exists() else 0
            for name, at in (("from", first), ("to", last)):
                if step >= at and name not in marks:
                    marks[name] = (time.perf_counter(), cpu_seconds())
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    fit(cfg)
    done.set()
    watcher.join()
    (start, before), (end, after) = marks["from"], marks["to"]
    by_group: dict[str, float] = {}
    for pid, (name, seconds) in after.items():
        by_group[name] = by_group.get(name, 0.0) + seconds - before.get(pid, (name, 0.0))[1]
    rate = logged_rate(metrics, first, last)
    return rate, end - start, by_group


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-every", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--steps", type=int, default=70)
    parser.add_argument("--from", dest="first", type=int, default=10)
    parser.add_argument("--to", dest="last", type=int, default=60)
    args = parser.parse_args()
    if any(args.first % n or args.last % n for n in args.log_every):
        parser.error("--from and --to must be multiples of every --log-every")
    import ray
    ray.init(num_cpus=2, runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}})
    with tempfile.TemporaryDirectory() as tmp:
        for log_every in args.log_every:
            rate, window, by_group = measure(log_every, args.steps, args.first, args.last, tmp)
            others = sum(s for name, s in by_group.items() if name != "training worker")
            print(f"\ntrain.log_every={log_every}: {rate:,.0f} tokens/s; steps {args.first}-{args.last}, "
                  f"{window:.1f} s; everything but the worker: {others / window:.1%} of one core\n")
            print("| process | CPU s | share of one core |\n|---|---:|---:|")
            for name, seconds in sorted(by_group.items(), key=lambda item: -item[1]):
                if seconds / window >= 0.002:
                    print(f"| {name} | {seconds:.2f} | {seconds / window:.1%} |")


if __name__ == "__main__":
    main()
