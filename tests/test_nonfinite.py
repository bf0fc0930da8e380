"""A non-finite loss skips its step's update (counted); too many in a row stop the run with a clear message.

The non-finite loss is real (tests/poison.py): every window that feeds '~' to the model produces inf/NaN.
"""
import math

import numpy as np
import pytest

from raytrain.cli import main
from raytrain.loading import load_config
from raytrain.prepare import open_prepared
from raytrain.steps import Planner
from tests.helpers import read_jsonl
from tests.poison import POISON, corpus_file, poisoned_model

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory):
    return poisoned_model(tmp_path_factory.mktemp("poisoned"))


def overrides(model, data, tmp_path, *extra):
    return [f"model.pretrained={model}", f"data.path={data}", f"data.cache_dir={tmp_path / 'cache'}",
            "data.val_fraction=0.1", f"run.dir={tmp_path / 'runs'}", "lengths.min=32", "lengths.max=128",
            "lengths.multiple_of=32", "train.tokens_per_step=1024", "train.max_steps=12", "train.log_every=1",
            "eval.lengths=[64]", "eval.every=12", "eval.tokens=1024", *extra]


@pytest.mark.parametrize("precision,stage", [("bf16", 0), ("fp32", 2), ("bf16", 3)])  # ZeRO-0 drops its own
def test_non_finite_steps_are_skipped_and_counted(ray_session, poisoned, tmp_path, precision, stage):
    from raytrain.launch import fit
    data = corpus_file(tmp_path, None, poison_positions=[1500, 6100, 9000, 13000])
    cfg = load_config(None, overrides(poisoned, data, tmp_path, f"deepspeed.zero_stage={stage}",
                                      f"train.precision={precision}", "run.name=skip"))
    # Independently: which steps feed '~' to the model (as an input, i.e. in the first L tokens of a window)?
    stream = open_prepared(cfg.data, cfg.tokenizer).train
    plan = Planner(cfg.lengths, cfg.train, cfg.data.windows, cfg.run.seed, stream.size, 1)
    bad_steps = [bool((stream.windows(p.offsets, p.length)[:, :-1] == POISON).any()) for p in map(plan, range(12))]
    assert 1 <= sum(bad_steps) < 12
    fit(cfg)
    metrics = read_jsonl(tmp_path / "runs" / "skip" / "metrics.jsonl")
    assert [m["skipped"] for m in metrics] == list(np.cumsum(bad_steps))
    assert all(math.isfinite(m["loss"]) for m, bad in zip(metrics, bad_steps) if not bad)
    assert all(m["loss"] is None for m, bad in zip(metrics, bad_steps) if bad)  # its only step was skipped
    evals = read_jsonl(tmp_path / "runs" / "skip" / "eval.jsonl")
    assert evals[-1]["val/loss@64"] < evals[0]["val/loss@64"] - 0.5  # the skipped updates did not poison it


def test_too_many_non_finite_steps_stop_the_run(ray_session, poisoned, tmp_path, capsys):
    data = corpus_file(tmp_path, every=16)
    code = main(["train", *overrides(poisoned, data, tmp_path, "deepspeed.zero_stage=0",
                                     "train.max_nonfinite=3", "run.name=stop")])
    err = capsys.readouterr().err
    assert code == 1
    assert "raytrain: stopped: 3 non-finite losses in a row (train.max_nonfinite), the last at step 3, seq_len " in err
    assert "last good checkpoint: none yet" in err
    assert not (tmp_path / "runs" / "stop" / "model").exists()
