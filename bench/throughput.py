"""Training throughput of raytrain (1 Ray worker, DeepSpeed) against a bare PyTorch loop.

Both train the same tiny model on the same corpus at the same lengths and token
budget per step, with the same number of CPU threads, in this one process run.
Prints tokens/s for each and the ratio raytrain / bare.

    python bench/throughput.py [--steps 60] [--threads 1] [--schedule uniform]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def bare_loop(cfg, steps: int, skip: int, threads: int) -> float:
    """The plainest loop: random windows, model(labels=...), AdamW; tokens/s after ``skip`` warm-up steps."""
    import numpy as np
    import torch

    from raytrain.data import load_tokenizer, prepare_corpus
    from raytrain.lengths import build_schedule
    from raytrain.model import build_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tokenizer = load_tokenizer(cfg.tokenizer)
    stream = prepare_corpus(cfg.data, tokenizer).train
    model = build_model(cfg.model, tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=(0.9, 0.95),
                                  weight_decay=cfg.train.weight_decay)
    schedule = build_schedule(cfg.lengths, cfg.run.seed)
    rng = np.random.default_rng(0)
    tokens, start = 0, None
    for step in range(steps):
        if step == skip:
            tokens, start = 0, time.time()
        length = schedule(step)
        rows = cfg.train.tokens_per_step // length
        offsets = rng.integers(0, stream.size - length, rows)
        batch = torch.from_numpy(np.stack([stream[o:o + length + 1] for o in offsets]).astype(np.int64))
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += rows * length
    return tokens / (time.time() - start)


def raytrain_loop(cfg, skip: int) -> float:
    """tokens/s from raytrain's own metrics.jsonl, excluding the first ``skip`` steps' intervals."""
    from raytrain.train import fit, run_directory
    fit(cfg)
    records = [json.loads(line) for line in (run_directory(cfg) / "metrics.jsonl").read_text().splitlines()]
    intervals = [(r["tokens"] - prev["tokens"], r["tokens_per_s"])
                 for prev, r in zip(records, records[1:]) if r["step"] > skip]
    return sum(t for t, _ in intervals) / sum(t / rate for t, rate in intervals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--skip", type=int, default=10, help="warm-up steps left out of the timing")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--schedule", default="uniform")
    args = parser.parse_args()

    from raytrain.config import load_config
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, [
            f"lengths.schedule={args.schedule}", f"train.max_steps={args.steps}", "train.log_every=1",
            f"eval.every={args.steps}", "eval.tokens=2048", "scaling.num_workers=1",
            f"scaling.cpus_per_worker={args.threads}", f"run.dir={tmp}", "run.name=bench"])
        bare = bare_loop(cfg, args.steps, args.skip, args.threads)
        ours = raytrain_loop(cfg, args.skip)
    print(f"\n| loop | tokens/s |\n|---|---|\n| bare PyTorch (1 process) | {bare:,.0f} |\n"
          f"| raytrain (1 Ray worker, DeepSpeed ZeRO-{cfg.deepspeed.zero_stage}) | {ours:,.0f} |\n"
          f"\nratio raytrain / bare: {ours / bare:.3f}  ({args.threads} thread(s), {args.steps - args.skip} timed "
          f"steps, {cfg.train.tokens_per_step} tokens/step, {args.schedule} lengths "
          f"{cfg.lengths.min}-{cfg.lengths.max})")


if __name__ == "__main__":
    main()
