"""A crash loses nothing: a killed worker or a stopped driver resumes from the newest checkpoint and the run's
records equal an uninterrupted run's, record for record and field for field (timing aside), even when the
log interval does not divide the checkpoint interval, non-finite steps are skipped along the way and a batch
warmup grows each step's budget across the kill."""
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from raytrain.loading import load_config
from tests.helpers import TIMING, read_jsonl
from tests.poison import corpus_file, poisoned_model

pytestmark = pytest.mark.ray
STEPS = 24


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
def common(ray_session, tmp_path_factory):
    """A pretrained (poisoned) model on a corpus with a few '~': some steps are non-finite and skipped."""
    root = tmp_path_factory.mktemp("fault-runs")
    model = poisoned_model(root / "model")
    data = corpus_file(root, poison_positions=[1500, 4000, 9000, 13000])
    overrides = [f"model.pretrained={model}", f"data.path={data}", f"data.cache_dir={root / 'cache'}",
                 "data.val_fraction=0.1", f"run.dir={root}", "lengths.min=32", "lengths.max=128",
                 "lengths.multiple_of=32", "train.tokens_per_step=1024", f"train.max_steps={STEPS}",
                 "train.warmup_steps=2", "train.log_every=7", "run.checkpoint_every=10", "eval.every=12",
                 "eval.lengths=[64,128]", "eval.tokens=1024", "train.micro_batch_tokens=256",
                 "train.batch_warmup_tokens=12000", "train.batch_start_tokens=512"]  # budgets grow across the kill
    return overrides, root


@pytest.fixture(scope="module")
def reference(common):
    from raytrain.launch import fit
    overrides, root = common
    fit(load_config(None, overrides + ["run.name=reference"]))
    return root / "reference"


def assert_same_records(run_dir, reference):
    for name in ("metrics.jsonl", "eval.jsonl"):
        ours, theirs = read_jsonl(run_dir / name), read_jsonl(reference / name)
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            assert set(a) == set(b)
            assert {k: v for k, v in a.items() if k not in TIMING} == \
                pytest.approx({k: v for k, v in b.items() if k not in TIMING}, rel=1e-6, abs=1e-9)


def test_reference_has_skipped_steps_on_both_sides_of_the_checkpoint(reference):
    metrics = read_jsonl(reference / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [7, 14, 21, 24]  # 7 does not divide the checkpoint interval 10
    skipped = [m["skipped"] for m in metrics]
    assert skipped[1] >= 1 and skipped[-1] > skipped[1]  # skips before the kill (at >= 14) and after it
    assert [e["step"] for e in read_jsonl(reference / "eval.jsonl")] == [0, 12, 24]


def test_killed_worker_restarts_and_matches_an_uninterrupted_run(common, reference):
    from raytrain.launch import fit
    overrides, root = common
    run_dir = root / "killed"
    killed = {}

    def kill_a_worker():
        killed["at_step"] = wait_for_step(run_dir, 14)  # after the checkpoint at 10, mid-interval
        victim = train_workers()[-1]
        killed["pid"] = victim.pid
        victim.send_signal(signal.SIGKILL)  # a real kill: the process dies mid-step

    thread = threading.Thread(target=kill_a_worker)
    thread.start()
    fit(load_config(None, overrides + ["run.name=killed", "run.loggers=[tensorboard,mlflow,wandb]"]))
    thread.join()
    assert 14 <= killed["at_step"] < STEPS and not psutil.pid_exists(killed["pid"])
    assert_same_records(run_dir, reference)
    # the trackers continued the same runs: one MLflow run, one W&B run, no step sent twice, the same values
    from tests.trackers_read import assert_every_tracker_holds_the_records, mlflow_client
    assert_every_tracker_holds_the_records(run_dir, ignore=TIMING,
                                           need={"loss", "skipped", "val/loss@128/pos64-127"})
    client, run_id = mlflow_client(run_dir)
    assert [r.info.run_id for r in client.search_runs([client.get_run(run_id).info.experiment_id])] == [run_id]


def test_stopped_driver_resumes_on_rerun_and_matches(common, reference):
    import ray

    from raytrain.launch import fit
    overrides, root = common
    run_dir = root / "stopped"
    command = [sys.executable, "-m", "raytrain.cli", "train", *overrides, "run.name=stopped"]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stopped_at = wait_for_step(run_dir, 14)
    driver.kill()
    driver.wait()
    assert stopped_at < STEPS and len(read_jsonl(run_dir / "metrics.jsonl")) < 4
    deadline = time.time() + 60
    while train_workers() and time.time() < deadline:  # Ray reaps the dead driver's workers
        time.sleep(0.5)
    fit(load_config(None, overrides + ["run.name=stopped"]))  # the same command again
    assert_same_records(run_dir, reference)


def test_rerun_with_a_different_config_is_refused(common, reference):
    from raytrain.launch import fit
    from raytrain.section import ConfigError
    overrides, _ = common
    with pytest.raises(ConfigError, match="train.lr = 0.5: run .* exists with train.lr = 0.003"):
        fit(load_config(None, overrides + ["run.name=reference", "train.lr=0.5"]))
