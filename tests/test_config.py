"""Every bad input is refused before Ray starts, all at once, naming key, value and fix."""
import json
import os
import subprocess
import sys

import pytest
import yaml
from transformers import (
    BloomConfig,
    Gemma2Config,
    GPT2Config,
    GPT2LMHeadModel,
    GptOssConfig,
    LlamaConfig,
    LlamaForCausalLM,
)

from raytrain.cli import main
from raytrain.config import Config, reference
from raytrain.lengths import SCHEDULES
from raytrain.loading import load_config
from raytrain.section import ConfigError


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


def test_each_schedule_gets_its_own_model_and_only_its_keys():
    cfg = load_config(None, ["lengths.schedule=root", "lengths.root_degree=3", "lengths.warmup_steps=40"],
                      environment=False)
    assert type(cfg.lengths) is SCHEDULES["root"] and cfg.lengths.root_degree == 3
    assert not hasattr(load_config(environment=False).lengths, "stages")
    reloaded = load_config(None, [f"lengths={json.dumps(cfg.lengths.model_dump())}"], environment=False)
    assert reloaded.lengths == cfg.lengths  # the schedule's model round-trips (workers rebuild it from JSON)


def test_help_documents_every_key(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for line in reference().splitlines():
        assert line.split(" (")[0] in out
    for cls in SCHEDULES.values():
        for key in cls.model_fields:
            assert f"lengths.{key} (" in out


# --- the table of bad inputs --------------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer):
    """Real files the bad inputs point at."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "empty.txt").write_text("")
    (root / "data.bin").write_bytes(b"\x00\x01")
    (root / "no-data").mkdir()
    (root / "no-data" / "notes.csv").write_text("a,b\n")
    (root / "not-a-tokenizer").mkdir()
    (root / "no-config-model").mkdir()
    (root / "a-file").write_text("x")
    (root / "bad.yaml").write_text("train:\n  lr: 0.1\n   max_steps: 3\n")
    (root / "list.yaml").write_text("- train\n- lr\n")
    (root / "wrong.yaml").write_text(yaml.safe_dump({"lengths": {"min": 600, "schedul": "x"}, "train": {"lr": 0}}))
    (root / "dict").mkdir()
    (root / "dict" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    gpt2 = GPT2Config(vocab_size=300, n_positions=256, n_embd=16, n_layer=1, n_head=2)
    GPT2LMHeadModel(gpt2).save_pretrained(root / "gpt2-256")
    llama = LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2)
    LlamaForCausalLM(llama).save_pretrained(root / "small-vocab")
    BloomConfig(vocab_size=300, hidden_size=16, n_layer=1, n_head=2).save_pretrained(root / "bloom")  # its config
    attention = {"vocab_size": 300, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                 "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8}
    Gemma2Config(**attention).save_pretrained(root / "gemma2")  # attention-logit soft-capping
    GptOssConfig(**attention, num_local_experts=2, num_experts_per_tok=1).save_pretrained(root / "gpt-oss")  # sinks
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    no_eos = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, "[UNK]")))
    no_eos.save_pretrained(root / "no-eos")
    tune_base = {"model.hidden_size": 32, "model.num_layers": 1, "scaling.num_workers": 1}
    specs = {
        "tune-typos.yaml": {"name": "t", "num_sample": 3, "search": {}, "base": {"overrides": tune_base}},
        "tune-space.yaml": {"name": "t", "base": {"overrides": tune_base}, "seed": -1,
                            "search": {"train.lrr": {"choice": [1]}, "train.lr": {"gauss": [1, 2]},
                                       "lengths.max": {"choice": []}}},
        "tune-metric.yaml": {"name": "t", "base": {"overrides": tune_base}, "objective": {"metric": "val/loss@9"},
                             "search": {"train.lr": {"loguniform": [0.01, 0.001]}}},
        "tune-base.yaml": {"name": "t", "base": {"overrides": {**tune_base, "lengths.min": 999}},
                           "search": {"train.lr": {"uniform": [0.001, 0.01]}}},
        "tune-pbt.yaml": {"name": "t", "base": {"overrides": tune_base}, "scheduler": {"type": "pbt"},
                          "search": {"train.tokens_per_step": {"choice": [4096, 8192]},
                                     "lengths.max": {"randint": [64, 256]}}},
    }
    for name, spec in specs.items():
        (root / name).write_text(yaml.safe_dump(spec))
    (root / "tune-bad.yaml").write_text("name: t\nsearch:\n  train.lr: {choice: [1, 2]\n")
    other = Config().model_dump(mode="json")
    other["model"]["hidden_size"] = 64
    (root / "checkpoint-of-another-model").mkdir()
    (root / "checkpoint-of-another-model" / "state.json").write_text("{}")
    (root / "checkpoint-of-another-model" / "config.yaml").write_text(yaml.safe_dump(other))
    return root


N = os.cpu_count() + 1
# (arguments after `raytrain`, [(key, value, part of the fix)]): every listed problem must be reported.
CASES = {
    "a checkpoint to start from that is not one": (
        ["run.init_from={root}/no-data"], [("run.init_from", "{root}/no-data", "raytrain checkpoint directory")]),
    "a checkpoint of another model to start from": (
        ["run.init_from={root}/checkpoint-of-another-model"],
        [("run.init_from", "{root}/checkpoint-of-another-model", "model.hidden_size = 64 there")]),
    "unknown tracker": (["run.loggers=[nope]"],
                        [("run.loggers.0", "nope", "Input should be 'tensorboard', 'mlflow' or 'wandb'")]),
    # the classes issue 23 found past validation: non-finite numbers, resources a local run cannot have, budgets
    # below one row, outputs that cannot be created
    "non-finite numbers": (["train.lr=.nan", "train.grad_clip=.inf", "data.val_fraction=-.inf"],
                           [("train.lr", float("nan"), "finite number"), ("train.grad_clip", float("inf"),
                                                                           "finite number"),
                            ("data.val_fraction", float("-inf"), "finite number")]),
    "GPU on a machine without one": (["scaling.use_gpu=true"],
                                     [("scaling.use_gpu", True, "2 workers need 2 GPU but this machine has 0; use "
                                                                "at most 0 workers, set scaling.use_gpu=false")]),
    "a resource no local node has": (["scaling.resources_per_worker={accelerator_type:A10G: 0.001}"],
                                     [("scaling.resources_per_worker.accelerator_type:A10G", 0.001,
                                       "2 workers need 0.002 accelerator_type:A10G but this machine has 0")]),
    "micro-batch below one row": (["train.micro_batch_tokens=100"],
                                  [("train.micro_batch_tokens", 100, "must be >= lengths.max (256) so every "
                                                                     "micro-batch has at least one row")]),
    "evaluation below one window": (["eval.tokens=100"],
                                    [("eval.tokens", 100, "must be >= max(eval.lengths) (512)")]),
    "run.dir that cannot be created": (["run.dir=/proc/raytrain-runs"],
                                       [("run.dir", "/proc/raytrain-runs", "cannot be created or written")]),
    "min above max": (["lengths.min=512"], [("lengths.min", 512, "must be <= lengths.max (256)")]),
    "max above positions": (["lengths.max=2048", "train.tokens_per_step=4096"],
                            [("lengths.max", 2048, "exceeds the model's 1024 positions")]),
    "not a multiple": (["lengths.min=36"], [("lengths.min", 36, "multiple of lengths.multiple_of (8); try 32")]),
    "budget below max": (["train.tokens_per_step=100"], [("train.tokens_per_step", 100, "must be >= lengths.max")]),
    "too few rows for workers": (["lengths.max=512", "train.tokens_per_step=512"],
                                 [("train.tokens_per_step", 512, "fewer than scaling.num_workers (2); use at least "
                                                                 "1024")]),
    "unknown schedule": (["lengths.schedule=cosine"], [("lengths.schedule", "cosine", "unknown schedule; choose")]),
    "key typo": (["lengths.schedul=uniform"], [("lengths.schedul", "uniform", "did you mean 'schedule'?")]),
    "section typo": (["trian.lr=1"], [("trian", {"lr": 1}, "did you mean 'train'?")]),
    "key another schedule reads": (["lengths.stages=[[5,64]]"],
                                   [("lengths.stages", [[5, 64]], "the uniform schedule does not read it "
                                                                  "(staged reads it)")]),
    "warmup on fixed": (["lengths.schedule=fixed", "lengths.warmup_steps=9"],
                        [("lengths.warmup_steps", 9, "(linear, root, uniform read it)")]),
    "staged without stages": (["lengths.schedule=staged"], [("lengths.stages", [], "needs [[until_step, length]")]),
    "pow2 without a power of two": (["lengths.schedule=pow2", "lengths.min=72", "lengths.max=120"],
                                    [("lengths.schedule", "pow2", "no power of two that is a multiple of 8")]),
    "root degree below 1": (["lengths.schedule=root", "lengths.root_degree=0.5"],
                            [("lengths.root_degree", 0.5, "greater than or equal to 1")]),
    "zero stage 4": (["deepspeed.zero_stage=4"], [("deepspeed.zero_stage", 4, "less than or equal to 3")]),
    "negative lr": (["train.lr=-1"], [("train.lr", -1, "greater than 0")]),
    "negative seed": (["run.seed=-1"], [("run.seed", -1, "greater than or equal to 0")]),
    "seed too large": ([f"run.seed={2**32}"], [("run.seed", 2**32, "less than 4294967296")]),
    "steps not a number": (["train.max_steps=abc"], [("train.max_steps", "abc", "valid integer")]),
    "unknown window mode": (["data.windows=zigzag"], [("data.windows", "zigzag", "'random' or 'sequential'")]),
    "eval length zero": (["eval.lengths=[0,64]"], [("eval.lengths.0", 0, "greater than or equal to 1")]),
    "eval length above positions": (["eval.lengths=[64,4096]"],
                                    [("eval.lengths", 4096, "exceeds the model's 1024 positions")]),
    "heads do not divide width": (["model.num_heads=3"], [("model.num_heads", 3, "must divide model.hidden_size")]),
    "section not a mapping": (["lengths=5"], [("lengths", 5, "must be a mapping of keys")]),
    "override without =": (["lengths.max"], [("lengths.max", None, "overrides are written section.key=value")]),
    "tokenizer not a string": (["tokenizer=5"], [("tokenizer", 5, "must be 'bytes' or a local")]),
    "too many workers": ([f"scaling.num_workers={N}", f"train.tokens_per_step={256 * N}"],
                         [("scaling.num_workers", N, f"need {N} CPU but this machine has {N - 1}; use at most "
                                                     f"{N - 1} workers")]),
    "placement strategy": (["scaling.placement_strategy=RANDOM"], [("scaling.placement_strategy", "RANDOM",
                                                                    "'PACK', 'SPREAD'")]),
    "missing data": (["data.path={root}/nope.txt"], [("data.path", "{root}/nope.txt", "does not exist")]),
    "empty data file": (["data.path={root}/empty.txt"], [("data.path", "{root}/empty.txt", "is empty")]),
    "unsupported data file": (["data.path={root}/data.bin"], [("data.path", "{root}/data.bin",
                                                              "is not a supported file")]),
    "directory without data": (["data.path={root}/no-data"], [("data.path", "{root}/no-data", "holds no input files")]),
    "datasets dict": (["data.path={root}/dict"], [("data.path", "{root}/dict", "point data.path at one split")]),
    "missing tokenizer": (["tokenizer={root}/nope"], [("tokenizer", "{root}/nope", "must be 'bytes' or a local")]),
    "broken tokenizer": (["tokenizer={root}/not-a-tokenizer"], [("tokenizer", "{root}/not-a-tokenizer",
                                                                "does not load as a Hugging Face tokenizer")]),
    "tokenizer without end-of-text": (["tokenizer={root}/no-eos"], [("tokenizer", "{root}/no-eos",
                                                                     "has no end-of-text (eos) token")]),
    "model without config.json": (["model.pretrained={root}/no-config-model"],
                                  [("model.pretrained", "{root}/no-config-model", "with config.json")]),
    "GPT-2 positions": (["model.pretrained={root}/gpt2-256", "lengths.max=512"],
                        [("lengths.max", 512, "exceeds the model's 256 positions; lower it or use a model with more"),
                         ("eval.lengths", 512, "exceeds the model's 256 positions")]),
    "documents apart in a model without the attention interface": (
        ["model.pretrained={root}/bloom", "data.cross_documents=false"],
        [("data.cross_documents", False, "BloomForCausalLM (model.pretrained) does not route attention through "
                                         "transformers' AttentionInterface, so documents cannot be kept apart in "
                                         "it; set data.cross_documents: true")]),
    "validation documents apart in a model without the attention interface": (
        ["model.pretrained={root}/bloom", "eval.documents=apart"],
        [("eval.documents", "apart", "BloomForCausalLM (model.pretrained) does not route attention through "
                                     "transformers' AttentionInterface")]),
    "documents apart with soft-capped attention": (
        ["model.pretrained={root}/gemma2", "data.cross_documents=false"],
        [("data.cross_documents", False, "Gemma2ForCausalLM (model.pretrained) uses attention-logit soft-capping "
                                         "(Gemma-2) (softcap), which raytrain's document attention does not compute")]),
    "documents apart with attention sinks": (
        ["model.pretrained={root}/gpt-oss", "data.cross_documents=false"],
        [("data.cross_documents", False, "GptOssForCausalLM (model.pretrained) uses attention sinks (gpt-oss) "
                                         "(s_aux)")]),
    "vocabulary too small": (["model.pretrained={root}/small-vocab"],
                             [("tokenizer", "bytes", "has 257 tokens but model.pretrained embeds only 100")]),
    "run.dir under a file": (["run.dir={root}/a-file/runs"], [("run.dir", "{root}/a-file/runs",
                                                               "cannot be created or written: Not a directory")]),
    "cache_dir under a file": (["data.cache_dir={root}/a-file/cache"],
                               [("data.cache_dir", "{root}/a-file/cache", "cannot be created or written")]),
    "YAML that does not parse": (["-c", "{root}/bad.yaml"], [("-c", "{root}/bad.yaml", "line 3, column")]),
    "YAML that is not a mapping": (["-c", "{root}/list.yaml"], [("-c", "{root}/list.yaml", "must be a mapping")]),
    "missing config file": (["-c", "{root}/nope.yaml"], [("-c", "{root}/nope.yaml", "cannot read the config file")]),
    # several mistakes at once: every one is shown
    "the issue's four": (["lengths.schedule=zigzag", "lengths.min=600", "lengths.max=512",
                          "train.tokens_per_step=100"],
                         [("lengths.schedule", "zigzag", "unknown schedule"), ("lengths.min", 600, "<= lengths.max"),
                          ("train.tokens_per_step", 100, "must be >= lengths.max (512)")]),
    "typo beside bad values": (["trian.lr=1", "lengths.min=512", "run.seed=-1", "lengths.warmup_step=3"],
                               [("trian", {"lr": 1}, "did you mean"), ("lengths.min", 512, "<= lengths.max"),
                                ("run.seed", -1, "greater than or equal to 0"),
                                ("lengths.warmup_step", 3, "did you mean 'warmup_steps'?")]),
    "paths all wrong": (["data.path={root}/nope", "tokenizer={root}/nope", "run.dir={root}/a-file/x"],
                        [("data.path", "{root}/nope", "does not exist"), ("tokenizer", "{root}/nope", "local"),
                         ("run.dir", "{root}/a-file/x", "Not a directory")]),
    "schedule keys and model": (["lengths.schedule=linear", "lengths.stages=[[1,8]]", "lengths.cycles=2",
                                 "model.num_heads=5", "deepspeed.zero_stage=7"],
                                [("lengths.stages", [[1, 8]], "linear schedule does not read it"),
                                 ("lengths.cycles", 2, "(pow2 reads it)"), ("model.num_heads", 5, "must divide"),
                                 ("deepspeed.zero_stage", 7, "less than or equal to 3")]),
    "pretrained limits and data": (["model.pretrained={root}/gpt2-256", "lengths.max=512", "eval.lengths=[1024]",
                                    "data.path={root}/no-data", "train.max_steps=0"],
                                   [("lengths.max", 512, "256 positions"), ("eval.lengths", 1024, "256 positions"),
                                    ("data.path", "{root}/no-data", "holds no input files"),
                                    ("train.max_steps", 0, "greater than or equal to 1")]),
    "file and overrides": (["-c", "{root}/wrong.yaml", "eval.lengths=[0]"],
                           [("lengths.min", 600, "<= lengths.max"), ("lengths.schedul", "x", "did you mean"),
                            ("train.lr", 0, "greater than 0"), ("eval.lengths.0", 0, "greater than or equal to 1")]),
}
TUNE_CASES = {
    "tune: unknown key and empty search": ("tune-typos.yaml", [("num_sample", 3, "did you mean 'num_samples'?"),
                                                               ("search", {}, "is empty")]),
    "tune: keys and spaces": ("tune-space.yaml", [("search.train.lrr", {"choice": [1]}, "did you mean 'train.lr'"),
                                                  ("search.train.lr", {"gauss": [1, 2]}, "write one distribution"),
                                                  ("search.lengths.max", {"choice": []}, "non-empty list"),
                                                  ("seed", -1, "greater than or equal to 0")]),
    "tune: reversed bounds and metric": ("tune-metric.yaml", [("search.train.lr", {"loguniform": [0.01, 0.001]},
                                                               "bounds reversed"),
                                                              ("objective.metric", "val/loss@9", "not a reported")]),
    "tune: bad base": ("tune-base.yaml", [("base.lengths.min", 999, "must be <= lengths.max")]),
    "tune: YAML that does not parse": ("tune-bad.yaml", [("-c", "{root}/tune-bad.yaml", "not valid YAML: line")]),
    "tune: what pbt cannot change mid-run": ("tune-pbt.yaml", [
        ("search.train.tokens_per_step", {"choice": [4096, 8192]}, "only length keys and train.lr"),
        ("search.lengths.max", {"randint": [64, 256]}, "moves a length key along a list"),
        ("objective.metric", "val/loss@max", "use val/loss@L for one L")]),
}


@pytest.fixture
def no_ray(monkeypatch):
    """Starting Ray fails the test: every refusal must come before it."""
    import ray
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def started(*args, **kwargs):
        raise AssertionError("Ray was started before the config was refused")
    monkeypatch.setattr(ray, "init", started)
    monkeypatch.setattr("raytrain.launch.fit", started)  # nor a run begun on a Ray another test started
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # checked as a local run, whatever ran before


def check_refusal(argv, expected, root, capsys):
    fill = lambda v: v.replace("{root}", str(root)) if isinstance(v, str) else v  # noqa: E731
    capsys.readouterr()
    assert main([fill(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("raytrain: ") and "problem(s) in the config:" in err
    for key, value, fix in expected:
        line = f"  {key} = {fill(value)!r}: "
        assert any(lo.startswith(line) and fill(fix) in lo for lo in err.splitlines()), (line, fix, err)
    return err


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_refused_before_ray_with_key_value_and_fix(name, files, no_ray, capsys):
    args, expected = CASES[name]
    config_args = args[:2] if args[0] == "-c" else []
    overrides = args[2:] if config_args else args
    check_refusal(["train", *config_args, *overrides], expected, files, capsys)


@pytest.mark.parametrize("name", TUNE_CASES)
def test_bad_tune_spec_is_refused_before_ray(name, files, no_ray, capsys):
    spec, expected = TUNE_CASES[name]
    check_refusal(["tune", "-c", str(files / spec)], expected, files, capsys)


def test_the_table_is_large_and_mixes_several_mistakes():
    assert len(CASES) + len(TUNE_CASES) >= 30
    assert sum(len(e) >= 2 for _, e in [*CASES.values(), *TUNE_CASES.values()]) >= 5


def test_cli_reports_every_problem_before_ray_starts():
    done = subprocess.run([sys.executable, "-m", "raytrain.cli", "train", "lengths.min=512", "lengths.multiple_of=7",
                           "bogus.key=1"], capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert done.returncode == 2
    assert "lengths.min = 512: must be <= lengths.max (256)" in done.stderr
    assert "lengths.max = 256: must be a multiple of lengths.multiple_of (7)" in done.stderr
    assert "bogus = {'key': 1}: unknown key" in done.stderr
    assert "Ray" not in done.stdout + done.stderr  # nothing started


def test_prepare_reads_only_its_sections(tmp_path, files):
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({"scaling": {"num_workers": 64}, "data": {"val_fraction": 0.1}}))
    cfg = load_config(str(path), [], only=("data", "tokenizer"))
    assert cfg.data.val_fraction == 0.1 and cfg.scaling.num_workers == 2  # the 64 workers are not its concern
    with pytest.raises(ConfigError, match="this command reads only data, tokenizer"):
        load_config(str(path), ["scaling.num_workers=3"], only=("data", "tokenizer"))
