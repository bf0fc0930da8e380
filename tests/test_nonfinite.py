"""A non-finite loss skips its step's update (counted); too many in a row stop the run with a clear message.

The non-finite loss is real: a pretrained model whose embedding row for '~' is infinite, so every window
that feeds '~' to the model produces inf/NaN, and no other does.
"""
import math

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from raytrain.cli import main
from raytrain.config import load_config
from raytrain.data import byte_tokenizer, prepare_corpus, random_offsets
from raytrain.lengths import build_schedule
from tests.test_training import read_jsonl

pytestmark = pytest.mark.ray
POISON = ord("~")


@pytest.fixture(scope="module")
def poisoned_model(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight[POISON] = float("inf")
    path = tmp_path_factory.mktemp("poisoned")
    model.save_pretrained(path)
    return path


def corpus_file(tmp_path, every: int | None, poison_positions=()) -> str:
    text = list(("def step(x):\n    return x + 1\n" * 700)[:20_000])
    for i in poison_positions:
        text[i] = "~"
    if every:
        text[::every] = "~" * len(text[::every])
    path = tmp_path / "corpus.txt"
    path.write_text("".join(text))
    return str(path)


def overrides(model, data, tmp_path, *extra):
    return [f"model.pretrained={model}", f"data.path={data}", f"data.cache_dir={tmp_path / 'cache'}",
            "data.val_fraction=0.1", f"run.dir={tmp_path / 'runs'}", "lengths.min=32", "lengths.max=128",
            "lengths.multiple_of=32", "train.tokens_per_step=1024", "train.max_steps=12", "train.log_every=1",
            "eval.lengths=[64]", "eval.every=12", "eval.tokens=1024", *extra]


@pytest.mark.parametrize("stage", [2, 3])
def test_non_finite_steps_are_skipped_and_counted(ray_session, poisoned_model, tmp_path, stage):
    from raytrain.train import fit
    data = corpus_file(tmp_path, None, poison_positions=[1500, 6100, 9000, 13000])
    cfg = load_config(None, overrides(poisoned_model, data, tmp_path, f"deepspeed.zero_stage={stage}",
                                      "run.name=skip"))
    # Independently: which steps feed '~' to the model (as an input, i.e. in the first L tokens of a window)?
    stream = prepare_corpus(cfg.data, byte_tokenizer()).train
    schedule = build_schedule(cfg.lengths, cfg.run.seed, 12, 1024)
    poisoned = []
    for step in range(12):
        length = schedule(step)
        starts = random_offsets(stream.size, cfg.run.seed, step, length, 1024 // length)
        poisoned.append(any((np.asarray(stream[s:s + length]) == POISON).any() for s in starts))
    assert 1 <= sum(poisoned) < 12
    fit(cfg)
    metrics = read_jsonl(tmp_path / "runs" / "skip" / "metrics.jsonl")
    assert [m["skipped"] for m in metrics] == list(np.cumsum(poisoned))
    assert all(math.isfinite(m["loss"]) for m, bad in zip(metrics, poisoned) if not bad)
    evals = read_jsonl(tmp_path / "runs" / "skip" / "eval.jsonl")
    assert evals[-1]["val/loss@64"] < evals[0]["val/loss@64"] - 0.5  # the skipped updates did not poison it


def test_too_many_non_finite_steps_stop_the_run(ray_session, poisoned_model, tmp_path, capsys):
    data = corpus_file(tmp_path, every=16)
    code = main(["train", *overrides(poisoned_model, data, tmp_path, "deepspeed.zero_stage=0",
                                     "train.max_nonfinite=3", "run.name=stop")])
    err = capsys.readouterr().err
    assert code == 1
    assert "raytrain: stopped: 3 non-finite losses in a row (train.max_nonfinite), the last at step 3, seq_len " in err
    assert "last good checkpoint: none yet" in err
    assert not (tmp_path / "runs" / "stop" / "model").exists()
