"""Training throughput of raytrain against a bare PyTorch loop, on equal resources.

One script, three loops, the same built-in model, corpus, length and token budget
per step, the same 2 CPU threads in all:

- bare PyTorch: one process, ``torch.set_num_threads(2)``, random windows from the
  same token stream, ``model(...)``, cross-entropy, clip, AdamW;
- raytrain with 2 Ray workers x 1 CPU (DeepSpeed ZeRO-1, gloo all-reduce);
- raytrain with 1 Ray worker x 2 CPUs.

Warm-up steps are left out of every timing; raytrain's figure comes from its own
``metrics.jsonl`` (evaluation and checkpoints excluded, as in its log line), at
its default ``train.log_every`` of 10: the meter syncs with the host and a line
is printed (and shipped by Ray to the driver) once per interval, as a user's run
does. ``--log-every 1`` measures the per-step logging cost as well.
The three loops run in turn, ``--rounds`` times (this machine's speed drifts by
several percent over minutes); each loop's figure is its mean over the rounds.
Prints a Markdown table and the two ratios raytrain / bare.

``--compile``: the same loops at a length drawn per step (uniform from 32 to
``--length``), each eager and with the decoder blocks compiled
(``raytrain.compiled``: dynamic shapes, one graph for every length; the head and
loss too in raytrain), so the ratios say what ``train.compile: true`` gains and
whether raytrain keeps it. The warm-up steps hold the compilation.

``--slow-reads MS``: every window read in the workers waits MS milliseconds
first (a stand-in for a network file system where random windows of a large
corpus never stay in the page cache), and raytrain runs with ``data.read_ahead``
0 and 1: the data-wait share of training time, and tokens/s, with and without
reading the next step's windows while the current one trains.

    python bench/throughput.py [--rounds 2] [--steps 70] [--skip 10] [--length 256] [--tokens-per-step 8192]
                               [--log-every 10] [--compile] [--slow-reads MS]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
ROOT = Path(__file__).resolve().parents[1]
THREADS = 2  # this machine's cores; every loop below uses exactly this many


def bare_loop(cfg, steps: int, skip: int, compile_blocks: bool = False) -> float:
    """The plainest loop on the same step plan (lengths, rows, windows); tokens/s over the steps after ``skip``."""
    import torch

    from raytrain import compiled
    from raytrain.model import build_model
    from raytrain.prepare import open_prepared
    from raytrain.steps import Planner

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    corpus = open_prepared(cfg.data, cfg.tokenizer)
    stream = corpus.train
    model = build_model(cfg.model, corpus.index["vocab_size"], corpus.index["eot"])
    if compile_blocks:
        compiled.compile_blocks(model, documents_apart=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=(0.9, 0.95),
                                  weight_decay=cfg.train.weight_decay)
    plan, tokens = Planner(cfg.lengths, cfg.train, cfg.data.windows, cfg.run.seed, stream.size, world=1), 0
    for step in range(steps):
        if step == skip:
            start, tokens = time.perf_counter(), 0
        p = plan(step)
        batch = torch.from_numpy(stream.windows(p.offsets, p.length))
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += p.targets
    return tokens / (time.perf_counter() - start)


def data_wait(metrics: Path, after: int) -> float:
    """The share of training time spent waiting for the step's windows, over the steps after ``after``."""
    timed = [json.loads(line) for line in metrics.read_text().splitlines() if json.loads(line)["step"] > after]
    return sum(r["data_wait"] * r["interval_s"] for r in timed) / sum(r["interval_s"] for r in timed)


def run_keys(length: int, tokens_per_step: int, steps: int, log_every: int, tmp: str,
             schedule: str = "fixed") -> list[str]:
    """The raytrain runs' keys (layout aside): one length (or uniform lengths), one evaluation and one
    checkpoint, at the end."""
    return [f"lengths.schedule={schedule}", f"lengths.max={length}", f"lengths.min={min(32, length)}",
            f"train.tokens_per_step={tokens_per_step}", f"train.max_steps={steps}", f"train.log_every={log_every}",
            f"eval.every={steps}", "eval.tokens=2048", f"eval.lengths=[{length}]", f"run.checkpoint_every={steps}",
            f"run.dir={tmp}", f"data.cache_dir={tmp}/cache"]


def logged_rate(metrics: Path, after: int, upto: int | None = None) -> float:
    """tokens/s from a run's metrics.jsonl over steps ``after`` + 1 to ``upto`` (both ends at log records)."""
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    timed = [r for r in records if r["step"] > after and (upto is None or r["step"] <= upto)]
    tokens = timed[-1]["tokens"] - next(r["tokens"] for r in records if r["step"] == after)
    return tokens / sum(r["interval_s"] for r in timed)


def raytrain_loop(cfg, skip: int) -> float:
    """tokens/s from raytrain's own metrics.jsonl over the steps after ``skip`` (a multiple of log_every)."""
    from raytrain.launch import fit, run_directory
    fit(cfg)
    return logged_rate(run_directory(cfg) / "metrics.jsonl", skip)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=70)
    parser.add_argument("--skip", type=int, default=10, help="warm-up steps left out of every timing")
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--tokens-per-step", type=int, default=8192)
    parser.add_argument("--log-every", type=int, default=10, help="raytrain's train.log_every (its default: 10)")
    parser.add_argument("--compile", action="store_true", help="eager against compiled blocks, lengths per step")
    parser.add_argument("--slow-reads", type=float, metavar="MS", help="delay each window read; read-ahead 0 and 1")
    args = parser.parse_args()
    if args.skip % args.log_every or (args.steps - args.skip) % args.log_every:
        parser.error("--skip and --steps must be multiples of --log-every (timings come from whole log intervals)")

    import ray

    from raytrain.loading import load_config
    ray.init(num_cpus=THREADS, runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}})
    if args.slow_reads is not None:
        return read_ahead_table(args, load_config)
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        common = run_keys(args.length, args.tokens_per_step, args.steps, args.log_every, tmp,
                          "uniform" if args.compile else "fixed")
        one = ["scaling.num_workers=1", "scaling.cpus_per_worker=2"]
        layouts = {"raytrain, 1 worker x 2 CPUs, eager": one + ["train.compile=false"],
                   "raytrain, 1 worker x 2 CPUs, train.compile=true": one + ["train.compile=true"]} \
            if args.compile else {"raytrain, 2 workers x 1 CPU": ["scaling.num_workers=2", "scaling.cpus_per_worker=1"],
                                  "raytrain, 1 worker x 2 CPUs": one}
        cfg = load_config(None, common + one + ["run.name=warm"])
        for r in range(args.rounds):
            results.setdefault(f"bare PyTorch, 1 process x {THREADS} threads", []).append(
                bare_loop(cfg, args.steps, args.skip))
            if args.compile:
                results.setdefault("bare PyTorch, blocks compiled", []).append(
                    bare_loop(cfg, args.steps, args.skip, compile_blocks=True))
            for i, (name, layout) in enumerate(layouts.items()):
                run = load_config(None, common + layout + [f"run.name=round{r}-{i}"])
                results.setdefault(name, []).append(raytrain_loop(run, args.skip))
    results = {name: sum(rates) / len(rates) for name, rates in results.items()}
    bare = next(iter(results.values()))
    lengths = f"lengths uniform 32-{args.length} per step" if args.compile else f"length {args.length}"
    print(f"\n{args.steps - args.skip} timed steps (after {args.skip} warm-up) x {args.tokens_per_step:,} tokens at "
          f"{lengths}, built-in model, {THREADS} CPU threads in every loop, raytrain logging every "
          f"{args.log_every} steps, mean of {args.rounds} rounds\n")
    print("| loop | tokens/s | ratio to bare |\n|---|---:|---:|")
    for name, rate in results.items():
        print(f"| {name} | {rate:,.0f} | {rate / bare:.3f} |")


def read_ahead_table(args, load_config) -> None:
    """raytrain (1 worker x 2 CPUs) with every window read delayed, reading ahead 0 and 1 steps."""
    from raytrain.launch import fit, run_directory
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        common = run_keys(args.length, args.tokens_per_step, args.steps, args.log_every, tmp, "uniform") + \
            ["scaling.num_workers=1", "scaling.cpus_per_worker=2"]
        for r in range(args.rounds):
            for depth in (0, 1):
                cfg = load_config(None, common + [f"data.read_ahead={depth}", f"run.name=round{r}-{depth}"])
                # tests/worker_site runs tests.hooks.slow_reads in each worker (Ray ignores an actor's own
                # worker_process_setup_hook)
                fit(cfg, runtime_env={"env_vars": {"PYTHONPATH": f"{ROOT / 'tests' / 'worker_site'}:{ROOT}",
                                                   "RAYTRAIN_WORKER_HOOK": "tests.hooks.slow_reads",
                                                   "RAYTRAIN_READ_DELAY_MS": str(args.slow_reads)}})
                metrics = run_directory(cfg) / "metrics.jsonl"
                rows.setdefault(depth, []).append((logged_rate(metrics, args.skip), data_wait(metrics, args.skip)))
    print(f"\n{args.steps - args.skip} timed steps x {args.tokens_per_step:,} tokens, lengths uniform "
          f"32-{args.length}, each window read delayed {args.slow_reads:g} ms, 1 worker x {THREADS} CPUs, "
          f"mean of {args.rounds} rounds\n")
    print("| data.read_ahead | tokens/s | data wait (share of training time) |\n|---:|---:|---:|")
    for depth, measured in rows.items():
        rate, wait = (sum(m[i] for m in measured) / len(measured) for i in (0, 1))
        print(f"| {depth} | {rate:,.0f} | {wait:.1%} |")


if __name__ == "__main__":
    main()
