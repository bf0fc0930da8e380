"""Training time blocked per checkpoint: synchronous against asynchronous upload, to a local path and to S3.

    python bench/checkpoint.py [--steps 12] [--every 4]

One script, one Ray instance, 2 workers x 1 CPU at ZeRO-1, for the built-in model
and for a 57M-parameter Llama (768 wide, 8 layers), each to a local path and to an
S3 API on 127.0.0.1 (moto's server mode, started here), with
``run.checkpoint_upload`` sync and async. The blocked time is what the loop spent
in checkpoints (``checkpoint_s`` in metrics.jsonl: writing, and for async the
snapshot and any wait for the previous upload), per checkpoint; the final
checkpoint's upload, which the run waits for before it ends, is not training
time in either mode and is left out. Prints a Markdown table and the async /
sync ratio per model and storage.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
MODELS = {"built-in (0.9M)": [],
          "57M Llama (768 x 8)": ["model.hidden_size=768", "model.num_layers=8", "model.num_heads=12",
                                  "model.intermediate_size=2048"]}


def s3_server() -> dict:
    """An S3 API on 127.0.0.1 and the environment that points pyarrow (and so Ray's storage) at it."""
    import boto3
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(env)
    boto3.client("s3").create_bucket(Bucket="bench")
    return env


def blocked_per_checkpoint(run_dir: Path, steps: int, every: int) -> float:
    """Seconds the loop was blocked per checkpoint, the final one aside (it runs after the last record)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return sum(r["checkpoint_s"] for r in records) / (steps // every - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=4, help="steps between checkpoints")
    args = parser.parse_args()

    import ray

    from raytrain.launch import fit, run_directory
    from raytrain.loading import load_config
    env = s3_server()
    ray.init(num_cpus=2, runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", **env}})
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        common = [f"train.max_steps={args.steps}", f"train.log_every={args.every}", "train.tokens_per_step=512",
                  "lengths.schedule=fixed", "lengths.max=256", "eval.lengths=[256]", "eval.tokens=512",
                  f"eval.every={args.steps}", f"run.checkpoint_every={args.every}", f"run.dir={tmp}",
                  f"data.cache_dir={tmp}/cache", "run.keep_checkpoints=2"]
        for model, keys in MODELS.items():
            for storage, where in (("local path", []), ("S3 on 127.0.0.1", ["run.storage=s3://bench/runs"])):
                for mode in ("sync", "async"):
                    name = f"run{len(rows)}"
                    cfg = load_config(None, common + keys + where + [f"run.checkpoint_upload={mode}",
                                                                     f"run.name={name}"])
                    started = time.perf_counter()
                    fit(cfg)
                    rows[(model, storage, mode)] = (blocked_per_checkpoint(run_directory(cfg), args.steps,
                                                                           args.every), time.perf_counter() - started)
    print(f"\n2 workers x 1 CPU, ZeRO-1, {args.steps} steps x 512 tokens, a checkpoint every {args.every} steps "
          "(the final one left out)\n")
    print("| model | storage | sync: blocked per checkpoint (s) | async: blocked per checkpoint (s) | async / sync |")
    print("|---|---|---:|---:|---:|")
    for model in MODELS:
        for storage in ("local path", "S3 on 127.0.0.1"):
            sync, asynchronous = rows[(model, storage, "sync")][0], rows[(model, storage, "async")][0]
            print(f"| {model} | {storage} | {sync:.3f} | {asynchronous:.3f} | {asynchronous / sync:.2f} |")


if __name__ == "__main__":
    main()
