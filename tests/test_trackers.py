"""run.loggers: TensorBoard, MLflow and W&B read back with their own readers hold the same values as
metrics.jsonl and eval.jsonl at the same steps (a plain run, a two-trial search); an unreachable MLflow
server does not fail the run; a missing library is refused before Ray starts. raytrain generate."""
import json
import sys

import pytest
import yaml

from raytrain.cli import main
from raytrain.loading import load_config
from raytrain.trackers import MLflow
from tests.helpers import TINY, read_jsonl
from tests.trackers_read import (
    assert_every_tracker_holds_the_records,
    assert_holds,
    expected,
    mlflow_client,
    tensorboard_scalars,
)

ALL = "run.loggers=[tensorboard,mlflow,wandb]"


def test_trackers_skip_what_an_earlier_attempt_sent_and_continue_the_same_runs(tmp_path):
    """Two attempts of one run (the second a resume re-sending step 2): each tracker holds every record once."""
    from raytrain.trackers import Trackers
    run_dir = tmp_path / "r1"
    run_dir.mkdir()
    cfg = load_config(None, [ALL, "run.name=r1", f"run.dir={tmp_path}"], environment=False)
    evals = [{"step": s, "tokens": 100 * s, "val/loss@64": 5.0 - s, "val/loss@64/pos0-0": 5.5 - s,
              "val/loss@256/pos128-255": 4.0 - s} for s in (0, 4)]
    metrics = [{"step": s, "tokens": 100 * s, "loss": 3.0 / s, "lr": 0.1, "mfu": 0.5, "grad_norm": None}
               for s in (2, 4)]
    for attempt in ([("eval", evals[0]), ("metrics", metrics[0])],
                    [("eval", evals[0]), ("metrics", metrics[0]), ("metrics", metrics[1]), ("eval", evals[1])]):
        trackers, sent = Trackers(run_dir, cfg, print), {}
        for kind, record in attempt:
            trackers.log(kind, record)
            sent.setdefault(kind, []).append(json.dumps(record))
        trackers.close()
        for kind, lines in sent.items():  # the jsonl files as the attempt leaves them
            (run_dir / f"{kind}.jsonl").write_text("\n".join(lines) + "\n")
    run = assert_every_tracker_holds_the_records(run_dir, need={"loss", "tokens", "val/loss@64/pos0-0"})
    assert run["files"] == 2 and sorted(run["history"]) == [0, 2, 4]
    assert set(json.loads((run_dir / "trackers.json").read_text())) == {"tensorboard", "mlflow", "wandb", "sent"}


def test_a_record_sent_but_not_noted_before_a_kill_is_not_sent_twice(tmp_path):
    """An attempt killed after sending step 4 to TensorBoard and MLflow but before noting it in trackers.json
    (the window a killed worker hits): the resumed attempt sends step 4 again, and each holds it once."""
    from raytrain.trackers import Trackers
    run_dir = tmp_path / "r1"
    run_dir.mkdir()
    cfg = load_config(None, ["run.loggers=[tensorboard,mlflow]", "run.name=r1", f"run.dir={tmp_path}"],
                      environment=False)
    records = [("eval", {"step": 0, "tokens": 0, "val/loss@64": 5.0}),
               *[("metrics", {"step": s, "tokens": 100 * s, "loss": 3.0 / s}) for s in (2, 4)]]
    killed = Trackers(run_dir, cfg, print)  # never closed: the process died
    for kind, record in records:
        killed.log(kind, record)
    state = json.loads((run_dir / "trackers.json").read_text())
    for name in ("tensorboard", "mlflow"):
        state["sent"][name]["metrics"] = 2  # the note of step 4 never written
    (run_dir / "trackers.json").write_text(json.dumps(state))
    (run_dir / "eval.jsonl").write_text(json.dumps(records[0][1]) + "\n")  # as the checkpoint at step 2 left
    (run_dir / "metrics.jsonl").write_text(json.dumps(records[1][1]) + "\n")
    resumed = Trackers(run_dir, cfg, print)
    resumed.replay(run_dir)
    for kind, record in records[2:] + [("eval", {"step": 4, "tokens": 400, "val/loss@64": 4.0})]:
        resumed.log(kind, record)
        with open(run_dir / f"{kind}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
    resumed.close()
    want = expected(run_dir)
    assert want["loss"] == {2: 1.5, 4: 0.75} and want["val/loss@64"] == {0: 5.0, 4: 4.0}
    assert_holds(tensorboard_scalars(run_dir), want)
    client, run_id = mlflow_client(run_dir)
    assert_holds({k: [(m.step, m.value) for m in client.get_metric_history(run_id, MLflow.key(k))]
                  for k in want}, want)


@pytest.fixture(scope="module")
def runs(ray_session, cache_dir, tmp_path_factory):
    from raytrain.launch import fit
    root = tmp_path_factory.mktemp("tracked")
    common = TINY + [f"data.cache_dir={cache_dir}", f"run.dir={root}"]
    fit(load_config(None, common + [ALL, "run.name=plain"]))
    # an MLflow server that cannot be reached (nothing listens on port 9): reported once, the run goes on
    fit(load_config(None, common + ["run.loggers=[mlflow,tensorboard]", "run.name=unreachable"]),
        runtime_env={"env_vars": {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}})
    return root


@pytest.mark.ray
def test_a_plain_run_is_in_every_tracker_with_its_config(runs):
    run = assert_every_tracker_holds_the_records(runs / "plain")
    assert run["config"]["train"]["tokens_per_step"] == 1024 and run["group"] == ""
    client, run_id = mlflow_client(runs / "plain")
    params = client.get_run(run_id).data.params
    assert json.loads(params["train.tokens_per_step"]) == 1024 and json.loads(params["run.name"]) == "plain"
    assert client.get_experiment(client.get_run(run_id).info.experiment_id).name == "raytrain"
    assert client.get_run(run_id).info.status == "FINISHED"


@pytest.mark.ray
def test_an_unreachable_mlflow_server_does_not_fail_the_run(runs):
    run_dir = runs / "unreachable"
    assert read_jsonl(run_dir / "metrics.jsonl")[-1]["step"] == 6 and (run_dir / "model" / "config.json").is_file()
    assert_holds(tensorboard_scalars(run_dir), expected(run_dir))
    state = json.loads((run_dir / "trackers.json").read_text())
    assert "run_id" not in state["mlflow"] and "http://127.0.0.1:9/" in state["dropped"]["mlflow"]  # names the server
    assert set(state["dropped"]) == {"mlflow"}


@pytest.mark.ray
def test_a_two_trial_search_is_two_tracked_runs_grouped_by_the_search(ray_session, cache_dir, tmp_path, capsys):
    from mlflow import MlflowClient

    from raytrain.tune import tune_main
    from tests.helpers import TINY_BASE
    base = {**TINY_BASE, "data.cache_dir": cache_dir, "run.loggers": ["tensorboard", "mlflow", "wandb"],
            "lengths.schedule": "staged", "lengths.stages": [[4, 64]]}
    # a list-valued key: Tune would read a raw list as a nested search space, so raytrain passes JSON text
    spec = {"name": "grouped", "dir": str(tmp_path / "exp"), "base": {"overrides": base},
            "search": {"lengths.stages": {"grid": [[[4, 64]], [[2, 32], [8, 64]]]},
                       "lengths.schedule": {"grid": ["staged"]}}, "scheduler": {"type": "fifo"},
            "objective": {"metric": "val/loss@max", "mode": "min"}}
    (tmp_path / "tune.yaml").write_text(yaml.safe_dump(spec))
    capsys.readouterr()
    tune_main(str(tmp_path / "tune.yaml"), [])
    shown = capsys.readouterr().out  # Tune's own tables show the values as written: staged, not "staged"
    assert "staged" in shown and '"staged"' not in shown and "[[2, 32], [8, 64]]" in shown
    trials = sorted(p for p in (tmp_path / "exp" / "grouped" / "trials").iterdir() if (p / "trackers.json").exists())
    assert len(trials) == 2
    for trial in trials:
        run = assert_every_tracker_holds_the_records(trial, need={"loss", "tokens", "val/loss@64/pos32-63"})
        assert run["group"] == "grouped"
    client = MlflowClient(json.loads((trials[0] / "trackers.json").read_text())["mlflow"]["tracking_uri"])
    experiment = client.get_experiment_by_name("grouped")
    names = sorted(r.info.run_name for r in client.search_runs([experiment.experiment_id]))
    assert names == [t.name for t in trials]
    stages = sorted(yaml.safe_load((t / "config.yaml").read_text())["lengths"]["stages"] for t in trials)
    assert stages == [[[2, 32], [8, 64]], [[4, 64]]]


def test_a_tracker_that_is_not_installed_is_refused_before_ray_starts(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    assert main(["train", "run.loggers=[wandb,tensorboard]"]) == 2
    err = capsys.readouterr().err
    assert "run.loggers = 'wandb': the wandb library is not installed: pip install 'raytrain[tracking]'" in err
    assert "'tensorboard'" not in err


@pytest.mark.ray
def test_generate_is_seeded_and_greedy_equals_transformers_generate(runs, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model_dir = runs / "plain" / "model"
    texts = []
    for _ in range(2):
        assert main(["generate", str(model_dir), "--prompt", "def ", "--max-new-tokens", "20", "--seed", "3"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].startswith("def ") and len(texts[0]) > 5
    assert main(["generate", str(model_dir), "--prompt", "import ", "--max-new-tokens", "20",
                 "--temperature", "0"]) == 0
    ours = capsys.readouterr().out.rstrip("\n")
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    ids = tokenizer("import ", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=20, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert ours == tokenizer.decode(out[0], skip_special_tokens=True)
    assert main(["report", str(runs / "plain")]) == 0
    assert "--- 'def ' (greedy, 48 tokens)" in capsys.readouterr().out
    assert (runs / "plain" / "samples.txt").read_text().count("--- ") == 3


def tracked_trial(runs_dir: str, name: str, steps: int) -> None:
    """One search trial's rank 0 as far as MLflow sees it: its tracker sends a metrics record per step."""
    from pathlib import Path

    from raytrain.trackers import Trackers
    run_dir = Path(runs_dir) / name
    run_dir.mkdir()
    cfg = load_config(None, ["run.loggers=[mlflow]", f"run.name={name}", f"run.dir={runs_dir}", "run.group=search"],
                      environment=False)
    trackers = Trackers(run_dir, cfg, print)
    for step in range(steps):
        trackers.log("metrics", {"step": step, "tokens": 64 * step, "loss": 1.0 + step / 1000})
    trackers.close()
    assert "dropped" not in trackers.state, trackers.state


def test_four_trials_writing_to_the_default_mlflow_store_at_once_lose_no_record(tmp_path, monkeypatch):
    """The default store is MLflow's SQLite store (no file-store consent variable set anywhere): created once
    by the driver, then 4 processes write 60 steps each at the same time; MLflow's client reads back every
    loss of every trial."""
    import multiprocessing

    from mlflow import MlflowClient

    from raytrain.trackers import create_mlflow_store, mlflow_uri
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    create_mlflow_store(tmp_path)
    context = multiprocessing.get_context("spawn")
    trials = [context.Process(target=tracked_trial, args=(str(tmp_path), f"trial-{i}", 60)) for i in range(4)]
    for trial in trials:
        trial.start()
    for trial in trials:
        trial.join(300)
        assert trial.exitcode == 0
    assert mlflow_uri(tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    client = MlflowClient(mlflow_uri(tmp_path))
    runs = client.search_runs([client.get_experiment_by_name("search").experiment_id])
    assert sorted(r.info.run_name for r in runs) == [f"trial-{i}" for i in range(4)]
    for run in runs:
        history = client.get_metric_history(run.info.run_id, "loss")
        assert sorted((m.step, m.value) for m in history) == [(s, 1.0 + s / 1000) for s in range(60)]
