"""Typed config sections, loaded from YAML and ``section.key=value`` overrides.

Each field is documented where it is declared; the docstrings become the CLI's
``--help`` and the README's reference. Validation happens once, before Ray
starts, and reports every problem together as ``key = value: fix``.
"""
from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import Field, ValidationError

from raytrain.lengths import SCHEDULES, Lengths, Uniform, readers
from raytrain.section import ConfigError, Problem, Section


class ModelConfig(Section):
    pretrained: Optional[str] = None
    """Local Hugging Face model directory to fine-tune; null builds the tiny Llama described by the keys below."""
    hidden_size: int = Field(128, ge=8)
    """Width of the built-in model."""
    num_layers: int = Field(4, ge=1)
    """Transformer blocks of the built-in model."""
    num_heads: int = Field(4, ge=1)
    """Attention heads of the built-in model (must divide hidden_size)."""
    intermediate_size: int = Field(384, ge=8)
    """MLP width of the built-in model."""
    max_positions: int = Field(1024, ge=2)
    """Longest sequence the built-in model supports (RoPE max_position_embeddings)."""
    activation_checkpointing: bool = False
    """Recompute each transformer block's activations in the backward instead of keeping them (less memory, about a third more compute); built-in and pretrained models."""


class DataConfig(Section):
    path: Optional[str] = None
    """A text (.txt/.md/.py/.rst), .jsonl or .parquet file, a directory of them, or a Hugging Face datasets directory (save_to_disk); a local path or a URI Ray Data reads (s3://, file://); null uses the built-in corpus (Python standard library sources)."""
    text_field: str = "text"
    """Field holding the text in .jsonl, .parquet and Hugging Face datasets records."""
    val_fraction: float = Field(0.02, gt=0, lt=0.5)
    """Fraction of the token stream (its tail) held out for validation."""
    windows: Literal["random", "sequential"] = "random"
    """random: window starts drawn per step; sequential: consecutive windows, each token a target once per epoch."""
    cross_documents: bool = True
    """false: no target is predicted from another document's context (positions restart at each end-of-text token and attention stays within each document, without an L x L mask)."""
    shard_bytes: Optional[int] = Field(None, ge=1)
    """Input bytes each raytrain prepare task reads into one token shard: the unit of parallelism and of resuming; null: a 16th of the corpus, between 16 MiB and 256 MiB (the token stream is the same for any value)."""
    cache_dir: str = "~/.cache/raytrain"
    """Where raytrain prepare writes token shards (keyed by inputs and tokenizer; re-used when unchanged); on a cluster, a path every node shares."""


# One model per schedule, chosen by lengths.schedule: each reads only its own keys.
LengthsConfig = Annotated[Union[tuple(SCHEDULES.values())], Field(discriminator="schedule")]


class TrainConfig(Section):
    tokens_per_step: int = Field(8192, ge=1)
    """Global target tokens per optimizer step; a step at length L has tokens_per_step // L rows."""
    max_steps: int = Field(240, ge=1)
    """Optimizer steps to train."""
    log_every: int = Field(10, ge=1)
    """Steps between log lines and metrics.jsonl records."""
    lr: float = Field(3e-3, gt=0)
    """Peak learning rate (AdamW)."""
    warmup_steps: int = Field(20, ge=0)
    """Linear LR warmup steps; cosine decay to min_lr_ratio * lr follows."""
    lr_by: Literal["steps", "tokens"] = "steps"
    """Clock the LR schedule runs on: optimizer steps, or tokens seen / tokens_per_step."""
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """Final LR as a fraction of lr."""
    weight_decay: float = Field(0.1, ge=0)
    """AdamW weight decay, on the linear layers' weight matrices only (not norms, biases or embeddings)."""
    grad_clip: float = Field(1.0, ge=0)
    """Gradient norm clip (0 disables)."""
    max_nonfinite: int = Field(5, ge=1)
    """Non-finite step losses in a row that stop the run (each one's update is skipped and counted)."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto: bf16 on GPU, fp32 on CPU. bf16: forward and backward under torch.autocast(bfloat16) on fp32 weights (bf16 matmuls and activations; fp32 master weights, gradient accumulation and gradient all-reduce at every ZeRO stage)."""
    micro_batch_tokens: Optional[int] = Field(None, ge=1)
    """Most tokens one worker runs per forward/backward (gradient accumulation); null runs its whole share at once."""
    loss_chunk_tokens: Optional[int] = Field(None, ge=1)
    """Positions the output head and the loss take at a time, recomputed in the backward: at most one chunk's logits exist instead of a whole micro-batch's (tokens x vocabulary x 4+ bytes); null: all at once."""


class EvalConfig(Section):
    lengths: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [64, 256, 512], min_length=1)
    """Validation lengths; may exceed lengths.max ("train short, test long")."""
    every: int = Field(80, ge=1)
    """Steps between evaluations (also at step 0 and at the end)."""
    tokens: int = Field(32768, ge=1)
    """Validation target tokens per length (the same leading stretch of the validation split for every length)."""


class DeepSpeedConfig(Section):
    zero_stage: int = Field(1, ge=0, le=3)
    """DeepSpeed ZeRO stage: 0 (plain data parallel), 1 (optimizer states), 2 (+gradients), 3 (+parameters)."""


class ScalingConfig(Section):
    num_workers: int = Field(2, ge=1)
    """Ray Train workers (data-parallel ranks)."""
    use_gpu: bool = False
    """One GPU per worker, nccl and bf16; otherwise CPU, gloo and fp32."""
    cpus_per_worker: int = Field(1, ge=1)
    """CPUs (and torch threads) per worker."""
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    """Extra Ray resources per worker (e.g. {"accelerator_type:A10G": 0.001}); CPU and GPU come from the keys above."""
    peak_tflops: Optional[float] = Field(None, gt=0)
    """Peak TFLOP/s of one worker's device for MFU; null: from a table of GPUs (A10G, L4, L40S, A100, H100, H200, B200, bf16 dense), or on CPU a matmul measured at start-up."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """How Ray places the workers' bundles on nodes: PACK fills nodes first, SPREAD uses many."""


class RunConfig(Section):
    dir: str = "runs"
    """Parent directory of run directories (on a multi-node cluster: a path every node shares)."""
    storage: Optional[str] = None
    """Where Ray keeps checkpoints: null for run.dir, or a shared path or a cloud URI Ray understands (s3://...)."""
    name: Optional[str] = None
    """Run directory name under dir; null makes a timestamped name."""
    seed: int = Field(0, ge=0, lt=2**32)
    """Seeds model init, the length schedule and the data windows (0 to 2**32 - 1)."""
    checkpoint_every: int = Field(80, ge=1)
    """Steps between checkpoints (also at the end); a restart resumes from the newest."""
    keep_checkpoints: int = Field(2, ge=1)
    """Newest checkpoints kept on disk."""
    max_failures: int = Field(2, ge=0)
    """Worker-group failures Ray Train recovers from (restarting from the newest checkpoint) before giving up."""
    loggers: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(default_factory=list)
    """Trackers that also receive every metrics and eval record (rank 0): tensorboard (event files in the run directory), mlflow (MLFLOW_TRACKING_URI, else a file store in run.dir/mlruns), wandb (offline unless logged in); needs pip install 'raytrain[tracking]'."""
    group: Optional[str] = None
    """What the run belongs to in the trackers (MLflow experiment, W&B group); raytrain tune sets the search's name."""


class Config(Section):
    model: ModelConfig = ModelConfig()
    tokenizer: str = "bytes"
    """'bytes' (built-in byte-level tokenizer, 256 bytes + end-of-document) or a local Hugging Face tokenizer directory."""
    data: DataConfig = DataConfig()
    lengths: LengthsConfig = Uniform()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    scaling: ScalingConfig = ScalingConfig()
    run: RunConfig = RunConfig()

    @property
    def bf16(self) -> bool:
        """train.precision resolved: auto is bf16 on GPU, fp32 on CPU."""
        return self.train.precision == "bf16" or (self.train.precision == "auto" and self.scaling.use_gpu)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


SECTIONS: dict[str, type[Section]] = {
    "model": ModelConfig, "data": DataConfig, "lengths": Lengths, "train": TrainConfig, "eval": EvalConfig,
    "deepspeed": DeepSpeedConfig, "scaling": ScalingConfig, "run": RunConfig}
LENGTHS_KEYS = sorted({key for cls in SCHEDULES.values() for key in cls.model_fields})


def apply_overrides(raw: dict, overrides: list[str]) -> list[Problem]:
    """Set ``section.key=value`` items (values parsed as YAML) in ``raw``; return problems."""
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            problems.append((item, None, "overrides are written section.key=value"))
            continue
        try:
            value = yaml.safe_load(text) if text else None
        except yaml.YAMLError as err:
            problems.append((key, text, f"the value does not parse as YAML ({_yaml_reason(err)}); quote it"))
            continue
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append((key, text, f"'{part}' is not a section"))
                break
        else:
            node[leaf] = value
    return problems


def _yaml_reason(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    return where + str(getattr(err, "problem", None) or err)


def _unknown(names, bad: str) -> str:
    close = difflib.get_close_matches(bad, names, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"unknown key; {hint}valid keys: {', '.join(names)}"


def validate_section(cls: type[Section], value: Any, prefix: str, names=None) -> tuple[Section, list[Problem]]:
    """Validate one section; report each bad key and keep the section with those keys at their defaults,
    so the cross-key checks still run on the rest (one mistake never hides another)."""
    if value is None:
        value = {}
    if isinstance(value, cls):
        return value, []
    if not isinstance(value, dict):
        return cls(), [(prefix, value, f"must be a mapping of keys ({', '.join(cls.model_fields)})")]
    try:
        return cls.model_validate(value), []
    except ValidationError as err:
        problems, bad = [], set()
        for e in err.errors():
            bad.add(e["loc"][0])
            key = ".".join([prefix, *map(str, e["loc"])])
            if e["type"] == "extra_forbidden":
                problems.append((key, e["input"], _unknown(names or list(cls.model_fields), str(e["loc"][-1]))))
            else:
                problems.append((key, e.get("input"), e["msg"].removeprefix("Value error, ")))
        return cls.model_validate({k: v for k, v in value.items() if k not in bad}), problems


def validate_lengths(value: Any) -> tuple[Lengths, list[Problem]]:
    """The chosen schedule's model; keys it does not read are refused, naming the schedules that read them."""
    if not isinstance(value, dict):
        return validate_section(Lengths, value, "lengths")
    name, problems = value.get("schedule", "uniform"), []
    cls = SCHEDULES.get(name)
    if cls is None:  # still check the keys every schedule reads
        problems.append(("lengths.schedule", name, f"unknown schedule; choose one of {sorted(SCHEDULES)}"))
        cls, value = Lengths, {k: v for k, v in value.items() if k in Lengths.model_fields and k != "schedule"}
    foreign = [k for k in value if k not in cls.model_fields and readers(k)]
    for key in foreign:
        names = readers(key)
        problems.append((f"lengths.{key}", value[key], f"the {name} schedule does not read it ("
                         f"{', '.join(names)} {'reads' if len(names) == 1 else 'read'} it); remove it or choose "
                         f"{'that schedule' if len(names) == 1 else 'one of those schedules'}"))
    parsed, more = validate_section(cls, {k: v for k, v in value.items() if k not in foreign}, "lengths",
                                    LENGTHS_KEYS)
    return parsed, problems + more


def _schema_problems(raw: dict) -> tuple[dict, list[Problem]]:
    """Validate each section on its own so one bad section does not hide another's problems."""
    parsed, problems = {}, []
    for top, value in raw.items():
        if top not in Config.model_fields:
            problems.append((top, value, _unknown(list(Config.model_fields), top)))
    for name in Config.model_fields:
        value = raw.get(name)
        if name == "tokenizer":
            parsed[name] = value if isinstance(value, str) and value else "bytes"
            if value is not None and not isinstance(value, str):
                problems.append((name, value, "must be 'bytes' or a local Hugging Face tokenizer directory"))
            continue
        parsed[name], found = validate_lengths(value or {}) if name == "lengths" else \
            validate_section(SECTIONS[name], value, name)
        problems += found
    return parsed, problems


def _cross_problems(s: dict) -> list[Problem]:
    """Checks that involve several keys (no files, no machine)."""
    lengths, train, model, scaling, ev = (s[k] for k in ("lengths", "train", "model", "scaling", "eval"))
    problems = lengths.problems()
    if train.loss_chunk_tokens and s["deepspeed"].zero_stage == 3 and scaling.num_workers > 1:
        problems.append(("train.loss_chunk_tokens", train.loss_chunk_tokens,
                         "not with deepspeed.zero_stage 3: calling the output head once per chunk, recomputed in "
                         "the backward, gives wrong gradients under ZeRO-3's parameter gathering (measured); "
                         "use null, or ZeRO 0-2"))
    if train.tokens_per_step < lengths.max:
        problems.append(("train.tokens_per_step", train.tokens_per_step,
                         f"must be >= lengths.max ({lengths.max}) so every step has at least one row"))
    elif train.tokens_per_step // lengths.max < scaling.num_workers:
        problems.append(("train.tokens_per_step", train.tokens_per_step,
                         f"gives {train.tokens_per_step // lengths.max} row(s) at lengths.max, fewer than "
                         f"scaling.num_workers ({scaling.num_workers}); use at least "
                         f"{lengths.max * scaling.num_workers}"))
    if model.pretrained is None:
        if model.hidden_size % model.num_heads:
            problems.append(("model.num_heads", model.num_heads,
                             f"must divide model.hidden_size ({model.hidden_size})"))
        problems += _position_problems(model.max_positions, lengths, ev, "raise model.max_positions")
    return problems


def _position_problems(positions: int, lengths: Lengths, ev: EvalConfig, fix: str) -> list[Problem]:
    problems = []
    if lengths.max > positions:
        problems.append(("lengths.max", lengths.max, f"exceeds the model's {positions} positions; lower it or {fix}"))
    for value in ev.lengths:
        if value > positions:
            problems.append(("eval.lengths", value, f"exceeds the model's {positions} positions; lower it or {fix}"))
    return problems


def _environment_problems(s: dict) -> list[Problem]:
    """Checks against this machine: CPUs, input files, the tokenizer and pretrained model, writable outputs."""
    from raytrain.sources import source_problems
    from raytrain.tokenizer import load_tokenizer

    scaling, data, model, run = s["scaling"], s["data"], s["model"], s["run"]
    problems = []
    if not scaling.use_gpu and not os.environ.get("RAY_ADDRESS"):
        need, have = scaling.num_workers * scaling.cpus_per_worker, os.cpu_count() or 1
        if need > have:
            problems.append(("scaling.num_workers", scaling.num_workers,
                             f"{scaling.num_workers} workers x {scaling.cpus_per_worker} CPU(s) need {need} CPUs "
                             f"but this machine has {have}; use at most {have // scaling.cpus_per_worker} workers "
                             f"or connect to a cluster with RAY_ADDRESS"))
    problems += source_problems(data.path, "data.path")
    problems += _writable_problems("data.cache_dir", data.cache_dir) + _writable_problems("run.dir", run.dir)
    tokenizer, spec = None, s["tokenizer"]
    if spec != "bytes" and not Path(spec).expanduser().is_dir():
        problems.append(("tokenizer", spec, "must be 'bytes' or a local Hugging Face tokenizer directory"))
    else:
        try:
            tokenizer = load_tokenizer(spec)
        except Exception as err:  # a broken directory: say what the loader said
            problems.append(("tokenizer", spec, f"does not load as a Hugging Face tokenizer: {err}"))
    if tokenizer is not None and tokenizer.eos_token_id is None:
        problems.append(("tokenizer", spec, "has no end-of-text (eos) token, which separates documents in the "
                                            "token stream; use a tokenizer that defines one"))
    if model.pretrained is not None:
        pretrained = _pretrained_problems(model.pretrained, s["lengths"], s["eval"], tokenizer, spec)
        problems += pretrained
        if not data.cross_documents and not any(key == "model.pretrained" for key, _, _ in pretrained):
            problems += _document_attention_problems(model.pretrained)
    from raytrain.trackers import EXTRA, missing_trackers
    for name in missing_trackers(run.loggers):
        problems.append(("run.loggers", name, f"the {name} library is not installed: {EXTRA}"))
    return problems


def _pretrained_problems(directory: str, lengths: Lengths, ev: EvalConfig, tokenizer, spec: str) -> list[Problem]:
    path = Path(directory).expanduser() / "config.json"
    if not path.is_file():
        return [("model.pretrained", directory, "must be a local Hugging Face model directory (with config.json)")]
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return [("model.pretrained", directory, f"its config.json does not read as JSON: {err}")]
    problems = []
    positions = next((config[k] for k in ("max_position_embeddings", "n_positions", "n_ctx") if k in config), None)
    if positions:
        problems += _position_problems(positions, lengths, ev, "use a model with more positions")
    vocab = config.get("vocab_size")
    if tokenizer is not None and vocab and len(tokenizer) > vocab:
        problems.append(("tokenizer", spec, f"has {len(tokenizer)} tokens but model.pretrained embeds only "
                                            f"{vocab}; use the model's own tokenizer"))
    return problems


def _document_attention_problems(directory: str) -> list[Problem]:
    """Documents are kept apart by raytrain's attention function, which a model runs only if it routes attention
    through transformers' AttentionInterface (Bloom, Falcon, GPT-Neo, MPT, ... do not: they would silently
    attend across documents)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    try:
        config = AutoConfig.from_pretrained(Path(directory).expanduser(), local_files_only=True)
        architecture = AutoModelForCausalLM._model_mapping[type(config)]
    except (OSError, ValueError, KeyError) as err:
        return [("model.pretrained", directory, f"is not a causal language model transformers knows: {err}")]
    if architecture._can_set_attn_implementation():
        return []
    return [("data.cross_documents", False, f"{architecture.__name__} (model.pretrained) does not route attention "
             "through transformers' AttentionInterface, so documents cannot be kept apart in it; set "
             "data.cross_documents: true, or use a model that does (Llama, Mistral, Qwen2, GPT-2, ...)")]


def _writable_problems(key: str, value: str) -> list[Problem]:
    """A directory we will create or write into: its nearest existing ancestor must be a writable directory."""
    if "://" in value:
        return []
    probe = Path(value).expanduser().absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return [(key, value, f"{probe} is a file, not a directory; choose a directory")]
    if not os.access(probe, os.W_OK):
        return [(key, value, f"{probe} is not writable; choose a directory you can write to")]
    return []


def load_config(path: Optional[str] = None, overrides: list[str] = (), environment: bool = True,
                only: Optional[tuple[str, ...]] = None, adapt_lengths: bool = False) -> Config:
    """Load YAML (if given), apply overrides and validate; raise ConfigError with every problem.

    ``environment=False`` skips the checks against this machine (paths, CPUs, the
    tokenizer and pretrained model): for configs meant for a cluster whose paths
    live on its shared volume. ``only`` reads just those top-level keys of the file
    (the rest keep their defaults), for commands that need one section.
    ``adapt_lengths`` drops the lengths keys the chosen schedule does not read
    instead of refusing them: for tune trials that switch the schedule of a base
    config.
    """
    raw: dict = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as err:
            raise ConfigError([("-c", path, f"cannot read the config file: {err.strerror}")]) from None
        except yaml.YAMLError as err:
            raise ConfigError([("-c", path, f"not valid YAML: {_yaml_reason(err)}")]) from None
        if not isinstance(raw, dict):
            raise ConfigError([("-c", path, "the config file must be a mapping of sections")])
    problems = apply_overrides(raw, list(overrides))
    if only:
        problems += [(key, raw[key], f"this command reads only {', '.join(only)}") for key in raw
                     if key not in only and key in Config.model_fields and any(o.startswith(key) for o in overrides)]
        raw = {key: value for key, value in raw.items() if key in only or key not in Config.model_fields}
    lengths = raw.get("lengths")
    if adapt_lengths and isinstance(lengths, dict) and lengths.get("schedule", "uniform") in SCHEDULES:
        reads = SCHEDULES[lengths.get("schedule", "uniform")].model_fields
        raw["lengths"] = {k: v for k, v in lengths.items() if k in reads or not readers(k)}
    parsed, schema = _schema_problems(raw)
    problems += schema + _cross_problems(parsed)
    if environment:
        problems += _environment_problems(parsed)
    if problems:
        raise ConfigError(_unique(problems))
    return Config(**parsed)


def _unique(problems: list[Problem]) -> list[Problem]:
    seen, kept = set(), []
    for key, value, fix in problems:
        if (key, repr(value), fix) not in seen:
            seen.add((key, repr(value), fix))
            kept.append((key, value, fix))
    return kept


def flatten(tree: dict) -> dict:
    """{"lengths": {"max": 256}, "tokenizer": "bytes"} -> {"lengths.max": 256, "tokenizer": "bytes"}."""
    flat = {}
    for section, value in tree.items():
        if isinstance(value, dict):
            flat.update({f"{section}.{key}": v for key, v in value.items()})
        else:
            flat[section] = value
    return flat


def reference(only: Optional[list[str]] = None) -> str:
    """Every key (or those of the sections ``only``) with its default and documentation (--help, the README)."""
    lines = []
    for name, field in Config.model_fields.items():
        if only and name not in only:
            continue
        if name not in SECTIONS:
            lines.append(f"{name} (default {field.default!r}): {field.description}")
            continue
        for key, f in SECTIONS[name].model_fields.items():
            lines.append(f"{name}.{key} (default {f.get_default(call_default_factory=True)!r}): {f.description}")
        if name == "lengths":
            seen = set(Lengths.model_fields)
            for cls in SCHEDULES.values():
                for key, f in cls.model_fields.items():
                    if key not in seen:
                        seen.add(key)
                        lines.append(f"lengths.{key} ({', '.join(readers(key))}; default "
                                     f"{f.get_default(call_default_factory=True)!r}): {f.description}")
    return "\n".join(lines)
