"""A crash loses nothing: a killed worker or a stopped driver resumes from the newest checkpoint and the
run's records match an uninterrupted run step for step."""
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from raytrain.config import load_config
from tests.test_training import TINY, read_jsonl

pytestmark = pytest.mark.ray

LONGER = TINY + ["train.max_steps=12", "run.checkpoint_every=3", "eval.every=6"]


def wait_for_step(run_dir, step, timeout=300):
    """Poll metrics.jsonl until it records ``step``; return the last step seen."""
    deadline = time.time() + timeout
    path = run_dir / "metrics.jsonl"
    while time.time() < deadline:
        if path.exists():
            records = read_jsonl(path) if path.read_text().endswith("\n") else []
            if records and records[-1]["step"] >= step:
                return records[-1]["step"]
        time.sleep(0.02)
    raise TimeoutError(f"step {step} never logged in {run_dir}")


def train_workers():
    return [p for p in psutil.process_iter(["cmdline"]) if "ray::RayTrainWorker" in " ".join(p.info["cmdline"] or [])]


@pytest.fixture(scope="module")
def common(ray_session, cache_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fault-runs")
    return LONGER + [f"data.cache_dir={cache_dir}", f"run.dir={root}"], root


@pytest.fixture(scope="module")
def reference(common):
    from raytrain.train import fit
    overrides, root = common
    fit(load_config(None, overrides + ["run.name=reference"]))
    return root / "reference"


def assert_same_records(run_dir, reference):
    ours, theirs = read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(reference / "metrics.jsonl")
    assert [m["step"] for m in ours] == list(range(1, 13))
    assert [(m["seq_len"], m["tokens"], m["rows"]) for m in ours] == \
        [(m["seq_len"], m["tokens"], m["rows"]) for m in theirs]
    assert [m["loss"] for m in ours] == pytest.approx([m["loss"] for m in theirs], abs=1e-5)
    ours_eval, theirs_eval = read_jsonl(run_dir / "eval.jsonl"), read_jsonl(reference / "eval.jsonl")
    assert [e["step"] for e in ours_eval] == [0, 6, 12]
    for a, b in zip(ours_eval, theirs_eval):
        assert a == pytest.approx(b, abs=1e-5)


def test_killed_worker_restarts_and_matches_an_uninterrupted_run(common, reference):
    from raytrain.train import fit
    overrides, root = common
    run_dir = root / "killed"
    killed = {}

    def kill_a_worker():
        killed["at_step"] = wait_for_step(run_dir, 4)
        victim = train_workers()[-1]
        killed["pid"] = victim.pid
        victim.send_signal(signal.SIGKILL)  # a real kill: the process dies mid-step

    thread = threading.Thread(target=kill_a_worker)
    thread.start()
    fit(load_config(None, overrides + ["run.name=killed"]))
    thread.join()
    assert 4 <= killed["at_step"] < 12 and not psutil.pid_exists(killed["pid"])
    assert_same_records(run_dir, reference)


def test_stopped_driver_resumes_on_rerun_and_matches(common, reference):
    import ray
    from raytrain.train import fit
    overrides, root = common
    run_dir = root / "stopped"
    command = [sys.executable, "-m", "raytrain.cli", "train", *overrides, "run.name=stopped"]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stopped_at = wait_for_step(run_dir, 4)
    driver.kill()
    driver.wait()
    assert stopped_at < 12 and len(read_jsonl(run_dir / "metrics.jsonl")) < 12
    deadline = time.time() + 60
    while train_workers() and time.time() < deadline:  # Ray reaps the dead driver's workers
        time.sleep(0.5)
    fit(load_config(None, overrides + ["run.name=stopped"]))  # the same command again
    assert_same_records(run_dir, reference)


def test_rerun_with_a_different_config_is_refused(common, reference):
    from raytrain.config import ConfigError
    from raytrain.train import fit
    overrides, _ = common
    with pytest.raises(ConfigError, match="train.lr = 0.5: run .* exists with train.lr = 0.003"):
        fit(load_config(None, overrides + ["run.name=reference", "train.lr=0.5"]))
