import os

import pytest
import yaml

from raytrain.cli import main
from raytrain.config import Config, ConfigError, load_config


def problems(*overrides, path=None):
    with pytest.raises(ConfigError) as err:
        load_config(path, list(overrides))
    return {key: (value, fix) for key, value, fix in err.value.problems}, str(err.value)


def test_defaults_are_valid_and_round_trip_through_yaml(tmp_path):
    cfg = load_config()
    assert cfg.scaling.num_workers == 2 and cfg.tokenizer == "bytes" and cfg.model.pretrained is None
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(str(path)) == cfg


def test_file_then_overrides_parsed_as_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"lengths": {"max": 128, "min": 64}, "train": {"lr": 0.01}}))
    cfg = load_config(str(path), ["lengths.max=512", "eval.lengths=[64, 1024]", "model.pretrained=null"])
    assert (cfg.lengths.min, cfg.lengths.max, cfg.train.lr, cfg.eval.lengths) == (64, 512, 0.01, [64, 1024])


def test_min_above_max():
    found, _ = problems("lengths.min=512", "lengths.max=256")
    assert found["lengths.min"] == (512, "must be <= lengths.max (256)")


def test_max_above_model_positions():
    found, _ = problems("lengths.max=2048", "train.tokens_per_step=4096")
    assert found["lengths.max"][1] == "exceeds the model's 1024 positions; lower it or raise model.max_positions"


def test_length_not_a_multiple():
    found, _ = problems("lengths.min=36")
    assert found["lengths.min"] == (36, "must be a multiple of lengths.multiple_of (8); try 32")


def test_tokens_per_step_below_max():
    found, _ = problems("train.tokens_per_step=100")
    assert found["train.tokens_per_step"] == (100, "must be >= lengths.max (256) so every step has at least one row")


def test_unknown_schedule_and_unknown_keys():
    found, _ = problems("lengths.schedule=cosine", "lengths.schedul=uniform", "trian.lr=1")
    assert found["lengths.schedule"][1].startswith("unknown schedule; choose one of ['fixed', ")
    assert found["lengths.schedul"][1].startswith("unknown key; did you mean 'schedule'?")
    assert found["trian"][1].startswith("unknown key; did you mean 'train'?")


def test_missing_data_path(tmp_path):
    found, _ = problems(f"data.path={tmp_path / 'nope.txt'}")
    assert "does not exist" in found["data.path"][1]


def test_empty_data_file(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    found, _ = problems(f"data.path={tmp_path / 'empty.txt'}")
    assert found["data.path"][1] == "is empty"


def test_too_many_workers_for_this_machine(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    n = os.cpu_count() + 1
    found, _ = problems(f"scaling.num_workers={n}", f"train.tokens_per_step={256 * n}")
    assert f"need {n} CPUs but this machine has {os.cpu_count()}" in found["scaling.num_workers"][1]


def test_three_mistakes_are_reported_together():
    found, text = problems("lengths.min=512", "train.lr=-1", "deepspeed.zero_stage=4")
    assert set(found) == {"lengths.min", "train.lr", "deepspeed.zero_stage"}
    assert text.startswith("3 problem(s) in the config:")
    assert "deepspeed.zero_stage = 4: Input should be less than or equal to 3" in text


def test_cli_reports_every_problem_before_ray_starts():
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "raytrain.cli", "train", "lengths.min=512", "lengths.multiple_of=7",
                           "bogus.key=1"], capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert done.returncode == 2
    assert "lengths.min = 512: must be <= lengths.max (256)" in done.stderr
    assert "lengths.max = 256: must be a multiple of lengths.multiple_of (7)" in done.stderr
    assert "bogus = {'key': 1}: unknown key" in done.stderr
    assert "Ray" not in done.stdout + done.stderr  # nothing started


def test_help_documents_every_key(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for section, field in Config.model_fields.items():
        keys = getattr(field.annotation, "model_fields", {None: None})
        for key in keys:
            assert (f"{section}.{key} (default" if key else f"{section} (default") in out


def test_schedule_mistakes():
    found, _ = problems("lengths.schedule=staged", "lengths.min=64", "lengths.max=256",
                        "lengths.stages=[[20, 64], [10, 128], [30, 512]]")
    assert found["lengths.stages"] in [([30, 512], "stage length must be a multiple of 8 in [lengths.min, "
                                        "lengths.max] = [64, 256]"),
                                       ([(20, 64), (10, 128), (30, 512)], "until_step values must strictly increase")]
    _, text = problems("lengths.schedule=staged", "lengths.stages=[[20, 64], [10, 128], [30, 512]]")
    assert "until_step values must strictly increase" in text and "[30, 512]: stage length must be" in text
    found, _ = problems("lengths.schedule=pow2", "lengths.min=72", "lengths.max=120")
    assert found["lengths.schedule"][1].startswith("no power of two that is a multiple of 8 lies in")
    found, _ = problems("lengths.root_degree=0.5", "lengths.warmup_steps=-3")
    assert found["lengths.root_degree"] == (0.5, "Input should be greater than or equal to 1")
    assert found["lengths.warmup_steps"] == (-3, "Input should be greater than or equal to 0")
    found, _ = problems("lengths.schedule=staged")
    assert found["lengths.stages"][1] == "the staged schedule needs [[until_step, length], ...]"
