"""Checkpoints that resume anywhere: a run stopped after its step-20 checkpoint continues on a different number
of workers at ZeRO-1 and ZeRO-3 (resharded), past a torn last record line and past a damaged newest checkpoint,
and with its storage on an S3 API; every one writes the uninterrupted run's records."""
import json
from pathlib import Path

import pytest
import torch
from ray.train import WorkerGroupError

from raytrain.cli import main
from raytrain.launch import fit
from raytrain.loading import load_config
from tests.helpers import TIMING, TINY, checkpoint_dirs, kill_a_worker_after_checkpoint, read_jsonl

pytestmark = pytest.mark.ray
STEPS = 40
KEYS = TINY + [f"train.max_steps={STEPS}", "train.log_every=5", "run.checkpoint_every=10", "eval.every=10"]


@pytest.fixture(scope="module")
def root(ray_session, cache_dir, tmp_path_factory):
    return tmp_path_factory.mktemp("checkpoint-runs"), cache_dir


@pytest.fixture(scope="module")
def reference(root):
    """Uninterrupted: 2 workers at ZeRO-1."""
    path, cache = root
    fit(load_config(None, KEYS + [f"run.dir={path}", f"data.cache_dir={cache}", "run.name=reference"]))
    return path / "reference"


def assert_same_records(run_dir, reference):
    """Record for record and field for field, timing aside; numbers within 1e-4 (a different split of a step's
    rows sums its gradient in a different order)."""
    for name in ("metrics.jsonl", "eval.jsonl"):
        ours, theirs = read_jsonl(run_dir / name), read_jsonl(reference / name)
        assert [r["step"] for r in ours] == [r["step"] for r in theirs]
        for a, b in zip(ours, theirs):
            assert set(a) == set(b)
            assert {k: v for k, v in a.items() if k not in TIMING} == \
                pytest.approx({k: v for k, v in b.items() if k not in TIMING}, rel=1e-4, abs=1e-9)


def interrupted(root, name: str, first: list[str], then: list[str], between=lambda run_dir: None):
    """Run ``first`` until a worker is killed after the step-20 checkpoint (no restarts: the node is gone), call
    ``between``, then run the same config again with ``then`` (fewer or more workers): it resumes."""
    path, cache = root
    keys = KEYS + [f"run.dir={path}", f"data.cache_dir={cache}", f"run.name={name}"]
    run_dir = path / name
    killer = kill_a_worker_after_checkpoint(run_dir, 20)
    with pytest.raises(WorkerGroupError):
        fit(load_config(None, keys + first + ["run.max_failures=0"]))
    killer.join()
    assert 20 <= read_jsonl(run_dir / "metrics.jsonl")[-1]["step"] < STEPS
    between(run_dir)
    fit(load_config(None, keys + then))
    return run_dir


def saved_by(checkpoint) -> tuple[int, int]:
    state = json.loads((checkpoint / "state.json").read_text())
    return state["world"], state["stage"]


def tear(run_dir):
    """A process stopped mid-append leaves half a record at the end of each record file."""
    for name in ("metrics.jsonl", "eval.jsonl"):
        with (run_dir / name).open("a") as f:
            f.write('{"step": 99, "loss": 1.')


def damage(run_dir) -> tuple:
    """The newest checkpoint (step 20) loses a shard after Ray registered it; (its directory, the shard)."""
    newest = checkpoint_dirs(run_dir)[-1]
    assert json.loads((newest / "state.json").read_text())["step"] == 20
    shard = next((newest / "engine").glob("zero_pp_rank_1_*optim_states.pt"))
    shard.unlink()
    return newest, shard


def test_two_workers_at_zero1_resume_on_one_past_a_torn_record(root, reference):
    run_dir = interrupted(root, "two-to-one-zero1", ["deepspeed.zero_stage=1"], ["scaling.num_workers=1"], tear)
    assert_same_records(run_dir, reference)
    assert saved_by(checkpoint_dirs(run_dir)[-1]) == (1, 0)  # the newest written by one worker (ZeRO-0)


def test_two_workers_at_zero3_resume_on_one_past_a_damaged_newest_checkpoint(root, reference):
    damaged = []
    run_dir = interrupted(root, "two-to-one-zero3", ["deepspeed.zero_stage=3"], ["scaling.num_workers=1"],
                          lambda run_dir: damaged.extend(damage(run_dir)))
    assert_same_records(run_dir, reference)  # resumed (resharded) from step 10: step 20's could not load
    newest, shard = damaged
    assert newest.is_dir() and not shard.exists()  # left as it was, for the user to see
    from raytrain.checkpoint import DamagedCheckpoint, verify
    with pytest.raises(DamagedCheckpoint, match="zero_pp_rank_1_mp_rank_00_optim_states.pt is missing"):
        verify(newest)


@pytest.mark.parametrize("stage", [1, 3])
def test_one_worker_resumes_on_two(root, reference, stage, capfd):
    """Resharded, not started over: a run trained again from step 0 would match the reference too (it did, while
    Ray Train's controller, polling every 2 s, had not registered the checkpoint when the worker was killed, and
    resharding into ZeRO-1 was broken)."""
    run_dir = interrupted(root, f"one-to-two-zero{stage}", ["scaling.num_workers=1"],
                          [f"deepspeed.zero_stage={stage}"])
    assert f"resharded the checkpoint from 1 worker(s) at ZeRO-0 to 2 at ZeRO-{stage}" in capfd.readouterr().out
    assert_same_records(run_dir, reference)
    assert saved_by(checkpoint_dirs(run_dir)[-1]) == (2, stage)


def kill_a_worker_after_s3_checkpoint(bucket: str, prefix: str, step: int):
    """kill_a_worker_after_checkpoint for storage on S3: the bucket's run prefix mirrored to a local folder."""
    import tempfile

    import boto3
    mirror, s3 = Path(tempfile.mkdtemp()), boto3.client("s3")

    def refresh():
        for item in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []):
            name = item["Key"][len(prefix) + 1:]
            if name.startswith("checkpoint_") and name.endswith(".json"):
                target = mirror / name
                target.parent.mkdir(parents=True, exist_ok=True)
                s3.download_file(bucket, item["Key"], str(target))
    return kill_a_worker_after_checkpoint(mirror, step, refresh=refresh)


def test_storage_on_s3_resumes_a_killed_worker_exactly_and_exports_and_reports(root, reference, s3_endpoint,
                                                                                capsys):
    import boto3
    boto3.client("s3").create_bucket(Bucket="raytrain-runs")
    path, cache = root
    cfg = load_config(None, KEYS + [f"run.dir={path}", f"data.cache_dir={cache}", "run.name=on-s3",
                                    "run.storage=s3://raytrain-runs/runs"])
    run_dir = path / "on-s3"
    killer = kill_a_worker_after_s3_checkpoint("raytrain-runs", "runs/on-s3", 20)
    fit(cfg)  # a killed worker: Ray Train restarts the group from the newest checkpoint on S3
    killer.join()
    assert_same_records(run_dir, reference)
    assert not list(run_dir.glob("checkpoint_*"))  # nothing in run.dir: the checkpoints are on S3
    from raytrain.checkpoint import run_checkpoints
    listed = run_checkpoints("s3://raytrain-runs/runs", "on-s3")
    assert listed and all(p.startswith("s3://raytrain-runs/runs/on-s3/checkpoint_") for p in listed)
    capsys.readouterr()
    assert main(["export", str(run_dir), "--out", str(path / "on-s3-exported")]) == 0
    from transformers import AutoModelForCausalLM
    final = AutoModelForCausalLM.from_pretrained(run_dir / "model", local_files_only=True).state_dict()
    exported = AutoModelForCausalLM.from_pretrained(path / "on-s3-exported", local_files_only=True).state_dict()
    assert all(torch.equal(final[k], exported[k]) for k in final)  # the newest S3 checkpoint is the final model
    assert main(["report", str(run_dir)]) == 0
    assert (run_dir / "positions.png").is_file() and "| 40 |" in capsys.readouterr().out
