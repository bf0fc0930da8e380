"""Read a run's trackers back with each one's own reader: TensorBoard's event accumulator, the MLflow client,
and W&B's offline transaction log (its records are W&B's own protobuf messages, in LevelDB's log format)."""
import json
import struct
from pathlib import Path

import pytest

from raytrain.trackers import MLflow, numeric
from tests.helpers import read_jsonl


def tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def mlflow_client(run_dir: Path):

    from mlflow import MlflowClient
    state = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    return MlflowClient(tracking_uri=state["tracking_uri"]), state["run_id"]


def mlflow_metrics(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    client, run_id = mlflow_client(run_dir)
    keys = client.get_run(run_id).data.metrics
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)) for key in keys}


def wandb_records(path: Path):
    """W&B's Record messages of one offline run file: a 7-byte header (':W&B', magic, version), then LevelDB log
    blocks of 32 KiB holding records (crc32c, length, type: full / first / middle / last)."""
    from wandb.proto import wandb_internal_pb2
    data, block, pos, pending = path.read_bytes(), 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full or last
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_runs(run_dir: Path) -> dict[str, dict]:
    """{run id: {"history": {step: {key: value}}, "config": {...}, "group": str, "files": n}} over every offline
    run directory under the run (a resumed run adds one directory per attempt, with the same id)."""
    runs = {}
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run = runs.setdefault(record.run.run_id, {"history": {}, "config": {}, "files": 0})
                run["files"] += 1
                run["group"] = record.run.run_group
                for item in record.run.config.update:
                    run["config"][item.key] = json.loads(item.value_json)
            elif kind == "history":
                values = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
                step = values.pop("_step", None)
                step = record.history.step.num if step is None else step
                history = run["history"].setdefault(step, {})
                assert not set(values) - {"_runtime", "_timestamp"} & set(history), f"step {step} logged twice"
                history.update(values)
    return runs


def expected(run_dir) -> dict[str, dict[int, float]]:
    """{name: {step: value}} from the jsonl files, as the trackers should hold it."""
    points = {}
    for kind in ("metrics", "eval"):
        for record in read_jsonl(run_dir / f"{kind}.jsonl"):
            for key, value in numeric(record, kind).items():
                points.setdefault(key, {})[record["step"]] = value
    return points


def assert_holds(tracked: dict[str, list[tuple[int, float]]], want: dict[str, dict[int, float]], name=lambda k: k):
    for key, by_step in want.items():
        steps = [step for step, _ in tracked[name(key)]]
        assert len(steps) == len(set(steps)), f"{key}: a step logged twice"
        got = dict(tracked[name(key)])
        assert set(got) == set(by_step), key
        assert [got[s] for s in sorted(got)] == pytest.approx([by_step[s] for s in sorted(got)], rel=1e-6), key


FULL_RUN = {"loss", "tokens", "lr", "mfu", "grad_norm", "val/loss@64", "val/loss@256/pos128-255"}


def assert_every_tracker_holds_the_records(run_dir, ignore=(), need=FULL_RUN):
    """``ignore``: names whose values may differ (a resumed run's timing: the trackers keep the first attempt's)."""
    want = {k: v for k, v in expected(run_dir).items() if k not in ignore}
    assert need <= set(want)
    assert_holds(tensorboard_scalars(run_dir), want)
    assert_holds(mlflow_metrics(run_dir), want, MLflow.key)
    (run,) = wandb_runs(run_dir).values()  # one W&B run, however many attempts
    history = {}
    for step, values in run["history"].items():
        for key, value in values.items():
            history.setdefault(key, []).append((step, value))
    assert_holds(history, want)
    return run
