"""raytrain tune: search specs, their errors, and real searches of Ray Train runs under ASHA."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from raytrain.loading import load_config
from raytrain.section import ConfigError
from raytrain.tune_spec import base_config, base_path_of, candidates, load_spec
from tests.helpers import TINY_BASE, read_jsonl, write_spec

ROOT = Path(__file__).resolve().parents[1]
def problems(tmp_path, **fields):
    with pytest.raises(ConfigError) as err:
        load_spec(write_spec(tmp_path, **fields))
    return {key: fix for key, _, fix in err.value.problems}


@pytest.mark.parametrize("path", sorted((ROOT / "tune_configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_tune_config_validates(path):
    spec = load_spec(str(path))
    assert spec.search and spec.objective.metric.startswith("val/loss@")
    if "cluster" not in path.name:  # the cluster search's paths live on the cluster's shared volume
        trials, notes = candidates(spec, base_path_of(spec, str(path)))
        assert len(trials) == spec.num_samples and not notes


def test_bad_search_specs_report_every_problem(tmp_path):
    found = problems(tmp_path, search={
        "lengths.mxa": {"choice": [1]},
        "lengths.min": {"gaussian": [0, 1]},
        "lengths.schedule": {"choice": []},
        "train.warmup_steps": {"grid": []},
        "train.lr": {"loguniform": [0.01, 0.001]},
    }, objective={"metric": "val/loss@999"})
    assert found["search.lengths.mxa"] == "not a training key; did you mean 'lengths.max'?"
    assert found["search.lengths.min"].startswith("write one distribution: {NAME: args} with NAME in ['choice'")
    assert found["search.lengths.schedule"] == "choice needs a non-empty list of values"
    assert found["search.train.warmup_steps"] == "grid needs a non-empty list of values"
    assert found["search.train.lr"] == "bounds reversed or empty: lo (0.01) must be below hi (0.001)"
    assert found["objective.metric"].startswith("not a reported metric; choose one of ['val/loss@128', ")


def test_invalid_combinations_are_redrawn_or_skipped_with_a_note(tmp_path):
    path = write_spec(tmp_path, num_samples=5, search={"lengths.min": {"choice": [64, 512]},
                                                       "train.lr": {"loguniform": [1e-4, 1e-2]}})
    spec = load_spec(path)
    trials, notes = candidates(spec, base_path_of(spec, path))
    assert len(trials) == 5 and {t["lengths.min"] for t in trials} == {64} and not notes  # 512 > max: redrawn
    path = write_spec(tmp_path, search={"lengths.min": {"grid": [32, 64, 512]}})
    spec = load_spec(path)
    trials, notes = candidates(spec, base_path_of(spec, path))
    assert [t["lengths.min"] for t in trials] == [32, 64]
    assert notes == ["skipped {'lengths.min': 512}: lengths.min = 512: must be <= lengths.max (128)"]


def read_results(experiment):
    with (experiment / "results.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.mark.ray
def test_search_with_asha_on_tokens(ray_session, cache_dir, tmp_path, capsys):
    from raytrain.cli import main
    base = {**TINY_BASE, "data.cache_dir": cache_dir}
    path = tmp_path / "tune.yaml"
    # Good learning rates first: ASHA (2 at a time) then stops the hopeless ones at the first rung.
    path.write_text(yaml.safe_dump({
        "name": "asha", "dir": str(tmp_path / "exp"), "base": {"overrides": base},
        "search": {"train.lr": {"grid": [8e-3, 5e-3, 1e-6, 2e-6]}},
        "scheduler": {"type": "asha", "time_attr": "tokens", "grace_period": 4000, "reduction_factor": 2},
        "max_concurrent": 2}))
    assert main(["tune", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    experiment = tmp_path / "exp" / "asha"
    rows = read_results(experiment)
    assert len(rows) == 4
    assert [float(r["val/loss@max"]) for r in rows] == sorted(float(r["val/loss@max"]) for r in rows)
    by_lr = {float(r["train.lr"]): r for r in rows}
    full = 16 * 1024
    # ASHA is asynchronous: which trial reaches a rung first varies, so assert what must hold either way.
    assert float(rows[0]["train.lr"]) in (8e-3, 5e-3) and rows[0]["status"] == "completed"
    assert int(rows[0]["tokens"]) > full - 16 * 32  # a completed trial saw all its steps (L rounding aside)
    assert max(float(by_lr[lr]["val/loss@max"]) for lr in (8e-3, 5e-3)) < \
        min(float(by_lr[lr]["val/loss@max"]) for lr in (1e-6, 2e-6))
    stopped = [r for r in rows if r["status"] == "stopped early"]
    assert stopped and all(int(r["tokens"]) < full / 2 for r in stopped)  # stopped at the first rung
    best = load_config(str(experiment / "best_config.yaml"))
    assert best.train.lr == float(rows[0]["train.lr"]) and best.model.hidden_size == 32
    assert (experiment / "objective.png").read_bytes()[:4] == b"\x89PNG"
    assert "| trial | train.lr | val/loss@max | tokens | wall_s | status |" in out


@pytest.mark.ray
def test_population_based_search_exploits_exactly_and_replays_a_lineage(ray_session, cache_dir, tmp_path, capsys):
    """Two trials at once on the built-in model; at the perturbation point (12 steps' tokens; synchronous, so both
    get there) the worse copies the better's checkpoint and perturbs lengths.max and train.lr. The exploited
    life's records equal a run by hand from its config (the donor's checkpoint in run.init_from, the perturbed
    keys), and its replay config (explicit staged lengths, lr changes) trains from scratch to its losses. The
    summary's best_config.yaml is the best trial's replay. (tune_configs/pbt.yaml is the 4-trial search.)"""
    from raytrain.cli import main
    from raytrain.launch import fit
    from raytrain.population import lineage, replay_config
    base = {**TINY_BASE, "data.cache_dir": cache_dir, "eval.lengths": [64, 128]}
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump({
        "name": "pbt", "dir": str(tmp_path / "exp"), "base": {"overrides": base},
        "search": {"lengths.max": {"choice": [64, 128]}, "train.lr": {"loguniform": [1e-3, 1e-2]}},
        "objective": {"metric": "val/loss@128"}, "num_samples": 2, "max_concurrent": 2,
        "scheduler": {"type": "pbt", "perturbation_interval": 9 * 1024, "quantile_fraction": 0.5, "synch": True}}))
    assert main(["tune", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    experiment = tmp_path / "exp" / "pbt"
    trials = experiment / "trials"
    (life,) = [d for d in trials.iterdir() if (d / "lineage.json").is_file()]
    segments = lineage(life)
    assert [s["from_step"] for s in segments] == [0, 12] and segments[-1]["run"] == life.name
    assert (life / "steps.json").is_file()  # it ran to the end
    by_hand = load_config(str(life / "config.yaml"), ["run.name=by-hand", f"run.dir={tmp_path / 'again'}"])
    assert by_hand.run.init_from  # the donor's checkpoint
    fit(by_hand)
    assert_same_losses(tmp_path / "again" / "by-hand", life, tolerance=1e-9)
    replay = replay_config(life, "replay", str(tmp_path / "again"))
    assert replay.lengths.schedule == "staged" and replay.run.init_from is None
    assert [list(c) for c in replay.train.lr_changes] == [[12, segments[1]["lr"]]]
    fit(replay)
    assert_same_losses(tmp_path / "again" / "replay", life, tolerance=1e-4)
    best = read_results(experiment)[0]["trial"]
    written = load_config(str(experiment / "best_config.yaml"), environment=False)
    assert written.model_dump(exclude={"run"}) == replay_config(trials / best, "x").model_dump(exclude={"run"})
    assert "lineage of the best" in out


def test_a_replay_config_is_the_runs_lengths_as_stages_and_its_lr_per_stretch(tmp_path):
    """replay_config from a run directory's files alone: the steps' lengths as staged runs of equal lengths, which
    the step plan turns back into the same lengths and budgets; the lineage's lr per stretch as lr changes."""
    from raytrain.population import replay_config
    from raytrain.steps import Planner
    run = tmp_path / "trial-00001.2"
    run.mkdir()
    cfg = load_config(None, ["train.max_steps=6", "lengths.min=32", "lengths.max=256", "run.name=trial-00001.2",
                             "run.init_from=/elsewhere/checkpoint_1"], environment=False)
    (run / "config.yaml").write_text(cfg.to_yaml())
    steps = [[64, 8192], [64, 8192], [192, 8192], [32, 8192], [32, 8192], [96, 8192]]
    (run / "steps.json").write_text(json.dumps(steps))
    (run / "lineage.json").write_text(json.dumps([
        {"from_step": 0, "run": "trial-00000", "lr": 2e-3, "changed": {}},
        {"from_step": 4, "run": "trial-00001.2", "lr": 1.6e-3, "changed": {"train.lr": [2e-3, 1.6e-3]}}]))
    replay = replay_config(run, "replay", str(tmp_path))
    assert replay.lengths.schedule == "staged" and replay.lengths.stages == [(2, 64), (3, 192), (5, 32), (6, 96)]
    assert (replay.lengths.min, replay.lengths.max, replay.lengths.multiple_of) == (32, 192, 32)
    assert replay.train.lr == 2e-3 and replay.train.lr_changes == [(4, 1.6e-3)]
    assert replay.run.init_from is None and replay.run.name == "replay"
    plan = Planner(replay.lengths, replay.train, "random", 0, 10**6, world=2)
    assert [[plan(i).length, plan(i).budget] for i in range(6)] == steps


def assert_same_losses(ours: Path, theirs: Path, tolerance: float) -> None:
    """Every loss of two runs' records equal: each metrics record's loss and lr, each evaluation's losses."""
    for name, keys in (("metrics.jsonl", ("step", "tokens", "loss", "lr", "seq_len", "rows")),
                       ("eval.jsonl", None)):
        a, b = read_jsonl(ours / name), read_jsonl(theirs / name)
        assert [r["step"] for r in a] == [r["step"] for r in b], name
        for x, y in zip(a, b):
            pick = keys or [k for k in y if k.startswith("val/loss")]
            assert {k: x[k] for k in pick} == pytest.approx({k: y[k] for k in pick}, rel=tolerance), (name, y["step"])


def terminated_trials(experiment: Path) -> list[str]:
    """Trials the experiment's saved state records as finished (what Tuner.restore will not rerun)."""
    for state in sorted(experiment.glob("experiment_state-*.json"))[-1:]:
        try:
            trials = [json.loads(t[0]) for t in json.loads(state.read_text())["trial_data"]]
        except ValueError:  # caught mid-write
            return []
        return [f"trial-{t['trial_id'][-5:]}" for t in trials if t.get("status") == "TERMINATED"]
    return []


@pytest.mark.ray
def test_interrupted_search_resumes_without_rerunning_finished_trials(ray_session, cache_dir, tmp_path):
    import ray

    from raytrain.tune import tune_main
    base = {**TINY_BASE, "data.cache_dir": cache_dir, "train.max_steps": 16}
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump({
        "name": "resume", "dir": str(tmp_path / "exp"), "base": {"overrides": base},
        "search": {"train.lr": {"grid": [3e-3, 5e-3]}}, "scheduler": {"type": "fifo"}, "max_concurrent": 1}))
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    driver = subprocess.Popen([sys.executable, "-m", "raytrain.cli", "tune", "-c", str(path)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    experiment = tmp_path / "exp" / "resume"
    trials = experiment / "trials"
    deadline = time.time() + 600
    while time.time() < deadline and not terminated_trials(experiment):  # Tune has saved one as finished
        time.sleep(0.2)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    done = terminated_trials(experiment)
    finished = {name: (trials / name / "model" / "model.safetensors").stat().st_mtime_ns for name in done}
    assert len(finished) == 1  # killed while the second trial runs
    time.sleep(5)  # Ray reaps the dead driver's trial actors
    rows = tune_main(str(path), [], resume=True)
    assert sorted(r["status"] for r in rows) == ["completed"] * 2
    for name, stamp in finished.items():  # the finished trial was not run again
        assert (trials / name / "model" / "model.safetensors").stat().st_mtime_ns == stamp
    assert len(list(trials.glob("*/model/model.safetensors"))) == 2


@pytest.mark.ray
def test_a_search_in_which_every_trial_fails_says_so_and_why(ray_session, tmp_path, capsys):
    from raytrain.cli import main
    from tests.poison import corpus_file, poisoned_model
    model = poisoned_model(tmp_path / "model")
    data = corpus_file(tmp_path, every=16)  # every window feeds '~': every step is non-finite
    base = {**TINY_BASE, "model.pretrained": str(model), "data.path": data, "data.cache_dir": str(tmp_path / "c"),
            "data.val_fraction": 0.1, "train.max_nonfinite": 1}
    for key in ("model.hidden_size", "model.num_layers", "model.intermediate_size"):
        base.pop(key)
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump({"name": "doomed", "dir": str(tmp_path / "exp"), "base": {"overrides": base},
                                    "search": {"train.lr": {"grid": [1e-3, 2e-3]}}, "scheduler": {"type": "fifo"},
                                    "max_concurrent": 2}))
    assert main(["tune", "-c", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"every trial of {tmp_path / 'exp' / 'doomed'} failed (2 of 2)" in err
    assert err.count("stopped: 1 non-finite losses in a row (train.max_nonfinite)") == 2


def test_candidates_travel_through_tune_as_written_lists_as_text_and_come_back_equal():
    """Tune's table shows what it is given: scalars as written (staged, not "staged"); a list as its JSON text
    (Tune would read a raw list as a nested search space)."""
    from raytrain.tune_spec import as_tune_point, from_tune_point
    trial = {"train.lr": 0.002, "lengths.stages": [[30, 256], [60, 512]], "lengths.schedule": "staged",
             "lengths.warmup_steps": None}
    point = as_tune_point(trial)
    assert point == {"train.lr": 0.002, "lengths.stages": "[[30, 256], [60, 512]]", "lengths.schedule": "staged",
                     "lengths.warmup_steps": None}
    assert from_tune_point(point, trial) == trial


@pytest.mark.parametrize("path", sorted((ROOT / "tune_configs" / "study").glob("*.yaml")), ids=lambda p: p.name)
def test_every_schedule_study_config_validates(path):
    """bench/study.py's searches: the lr grid crossed with the schedule's own setting, equal tokens, ASHA."""
    if path.name == "base.yaml":  # the shared training config
        cfg = load_config(str(path), environment=False)
        assert cfg.lengths.max == 1024 and 1024 in cfg.eval.lengths and cfg.scaling.num_workers == 1
        return
    spec = load_spec(str(path))
    trials, notes = candidates(spec, base_path_of(spec, str(path)))
    schedule = path.stem
    assert not notes and len(trials) == (3 if schedule == "fixed" else 6)
    assert {t["train.lr"] for t in trials} == {0.002, 0.004, 0.008}
    assert spec.objective.metric == "val/loss@1024" and spec.scheduler.time_attr == "tokens"
    base = load_config(str(base_path_of(spec, str(path))), [f"lengths.schedule={schedule}"] +
                       (["lengths.stages=[[30,256]]"] if schedule == "staged" else []), environment=False)
    assert base.train.max_steps * base.train.tokens_per_step == 819_200  # equal tokens for every schedule


@pytest.mark.parametrize("path", sorted((ROOT / "tune_configs" / "study-long").glob("*.yaml")), ids=lambda p: p.name)
def test_every_long_study_config_validates_at_equal_tokens(path):
    """bench/study.py --long: lengths to 4096, documents apart in training (the crossed arm aside) and always in
    validation, and every arm's budget is the same 196,608 tokens at 4096 (the batch warmup's short steps counted;
    a length that does not divide a step's 8,192 leaves the remainder untrained, up to 10% in the schedules)."""
    from raytrain.steps import batch_budget, rows_of
    spec = load_spec(str(path)) if path.name != "base.yaml" else None
    if spec is None:
        cfg = load_config(str(path), environment=False)
        assert (cfg.lengths.max, cfg.model.max_positions, cfg.eval.lengths[-1]) == (4096, 4096, 4096)
        assert not cfg.data.cross_documents and cfg.eval.documents == "apart" and cfg.scaling.num_workers == 1
        return
    trials, notes = candidates(spec, base_path_of(spec, str(path)))
    assert not notes and spec.objective.metric == "val/loss@4096"
    assert len(trials) == 4 and spec.scheduler.type == ("pbt" if path.stem == "pbt" else "fifo")
    base = base_config(spec, base_path_of(spec, str(path)), environment=False)
    budget, seen = batch_budget(base.train), 0
    for _ in range(base.train.max_steps):  # at 4096: the longest step, and the batch arm's only length
        seen += rows_of(budget(seen), 4096) * 4096
    assert seen == 196_608
