"""What several test modules share: the tiny training keys, record readers, tune specs, checkpoint listings.

Test modules import from here, never from each other.
"""
import json
from pathlib import Path

import yaml

# Two layers of 64, lengths 32-128 in 6 steps of 1,024 tokens, two micro-batches per rank, documents kept apart
TINY = ["model.hidden_size=64", "model.num_layers=2", "model.intermediate_size=128",
        "lengths.min=32", "lengths.max=128", "lengths.multiple_of=32",
        "train.tokens_per_step=1024", "train.max_steps=6", "train.log_every=1", "train.warmup_steps=2",
        "train.micro_batch_tokens=256", "eval.lengths=[64,256]", "eval.every=3", "eval.tokens=2048",
        "data.windows=sequential", "data.cross_documents=false"]

# The base of small searches: one worker, 16 steps
TINY_BASE = {"model.hidden_size": 32, "model.num_layers": 1, "model.intermediate_size": 64,
             "lengths.min": 32, "lengths.max": 128, "lengths.multiple_of": 32,
             "train.max_steps": 16, "train.tokens_per_step": 1024, "train.log_every": 4, "train.warmup_steps": 2,
             "eval.every": 4, "eval.tokens": 1024, "eval.lengths": [64], "run.checkpoint_every": 4,
             "scaling.num_workers": 1}

# Telemetry that depends on time or on the process (a restarted worker starts its memory peak afresh)
TIMING = {"tokens_per_s", "interval_s", "elapsed_s", "tflops", "mfu", "data_wait", "peak_memory_gb", "checkpoint_s",
          "compilations"}  # compilations: a restarted process compiles (or loads from the cache) again


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_spec(tmp_path, **fields) -> str:
    """A tune config over TINY_BASE in ``tmp_path``; ``fields`` set or replace its top-level keys."""
    spec = {"name": "t", "dir": str(tmp_path / "exp"), "base": {"overrides": TINY_BASE}, **fields}
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def checkpoint_dirs(run_dir) -> list[Path]:
    """A run's checkpoint directories (local storage), oldest first."""
    from raytrain.checkpoint import run_checkpoints
    return [Path(p) for p in run_checkpoints(str(Path(run_dir).parent), Path(run_dir).name)]


def train_workers() -> list:
    import psutil
    return [p for p in psutil.process_iter(["cmdline"]) if "ray::RayTrainWorker" in " ".join(p.info["cmdline"] or [])]


def complete_checkpoint_at(storage: Path, step: int) -> bool:
    """Whether a checkpoint of ``step`` is in ``storage`` with every rank's manifest."""
    for checkpoint in storage.glob("checkpoint_*"):
        state = checkpoint / "state.json"
        if state.is_file():
            saved = json.loads(state.read_text())
            if saved["step"] == step and all((checkpoint / f"manifest-rank-{r}.json").is_file()
                                             for r in range(saved["world"])):
                return True
    return False


def kill_a_worker_after_checkpoint(storage: Path, step: int, timeout: float = 300, refresh=lambda: None):
    """A thread that SIGKILLs one training worker as soon as the checkpoint of ``step`` is complete in
    ``storage`` (a run's directory under run.storage, or a local mirror that ``refresh`` updates before each
    look): the process dies mid-step, as on a lost node."""
    import threading
    import time

    def watch():
        deadline = time.time() + timeout
        while time.time() < deadline and not complete_checkpoint_at(storage, step):
            refresh()
            time.sleep(0.01)
        workers = train_workers()
        if workers:
            workers[-1].kill()
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread
