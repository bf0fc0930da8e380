"""Typed config sections, loaded from YAML and ``section.key=value`` overrides.

Each field is documented where it is declared; the docstrings become the CLI's
``--help`` and the README's reference. Validation happens once, before Ray
starts, and reports every problem together as ``key = value: fix``.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from raytrain.lengths import SCHEDULES


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


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


class DataConfig(Section):
    path: Optional[str] = None
    """Local text (.txt/.md/.py), .jsonl or .parquet file, or a directory of them; null uses the built-in corpus (Python standard library sources)."""
    text_field: str = "text"
    """Field holding the text in .jsonl and .parquet files."""
    val_fraction: float = Field(0.02, gt=0, lt=0.5)
    """Fraction of the token stream (its tail) held out for validation."""
    windows: Literal["random", "sequential"] = "random"
    """random: window starts drawn per step; sequential: consecutive windows, each token a target once per epoch."""
    cross_documents: bool = True
    """false: no target is predicted from another document's context (attention blocked and positions restarted at each end-of-text token)."""
    cache_dir: str = "~/.cache/raytrain"
    """Where tokenized corpora are cached (keyed by inputs and tokenizer; re-used when unchanged)."""


class LengthsConfig(Section):
    schedule: str = "uniform"
    """Length schedule: one of the registered names (fixed, uniform, ...)."""
    min: int = Field(32, ge=1)
    """Shortest training length (tokens of input per row)."""
    max: int = Field(256, ge=1)
    """Longest training length; the fixed schedule always uses it."""
    multiple_of: int = Field(8, ge=1)
    """Every length is a multiple of this (keeps kernels efficient)."""
    warmup_steps: int = Field(0, ge=0)
    """linear/root: steps to grow from min to max; uniform: steps over which its upper bound grows from min to max (0: none)."""
    root_degree: float = Field(2.0, ge=1)
    """root: the curriculum grows like (t / warmup_steps) ** (1 / root_degree)."""
    stages: list[tuple[int, int]] = Field(default_factory=list)
    """staged: [[until_step, length], ...]: length for steps before until_step; lengths.max after the last stage."""
    cycles: int = Field(1, ge=1)
    """pow2: times the short-to-long mixture sweep repeats over the run."""
    by: Literal["steps", "tokens"] = "steps"
    """Clock the schedule runs on: optimizer steps, or tokens seen / train.tokens_per_step."""

    @field_validator("schedule")
    @classmethod
    def known_schedule(cls, name: str) -> str:
        if name not in SCHEDULES:
            raise ValueError(f"unknown schedule; choose one of {sorted(SCHEDULES)}")
        return name


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
    """AdamW weight decay."""
    grad_clip: float = Field(1.0, ge=0)
    """Gradient norm clip (0 disables)."""
    max_nonfinite: int = Field(5, ge=1)
    """Non-finite step losses in a row that stop the run (each one's update is skipped and counted)."""
    micro_batch_tokens: Optional[int] = Field(None, ge=1)
    """Most tokens one worker runs per forward/backward (gradient accumulation); null runs its whole share at once."""


class EvalConfig(Section):
    lengths: list[int] = Field(default_factory=lambda: [64, 256, 512], min_length=1)
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
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """How Ray places the workers' bundles on nodes: PACK fills nodes first, SPREAD uses many."""


class RunConfig(Section):
    dir: str = "runs"
    """Parent directory of run directories (on a multi-node cluster: a path every node shares)."""
    storage: Optional[str] = None
    """Where Ray keeps checkpoints: null for run.dir, or a shared path or a cloud URI Ray understands (s3://...)."""
    name: Optional[str] = None
    """Run directory name under dir; null makes a timestamped name."""
    seed: int = 0
    """Seeds model init, the length schedule and the data windows."""
    checkpoint_every: int = Field(80, ge=1)
    """Steps between checkpoints (also at the end); a restart resumes from the newest."""
    keep_checkpoints: int = Field(2, ge=1)
    """Newest checkpoints kept on disk."""
    max_failures: int = Field(2, ge=0)
    """Worker-group failures Ray Train recovers from (restarting from the newest checkpoint) before giving up."""


class Config(Section):
    model: ModelConfig = ModelConfig()
    tokenizer: str = "bytes"
    """'bytes' (built-in byte-level tokenizer, 256 bytes + end-of-document) or a local Hugging Face tokenizer directory."""
    data: DataConfig = DataConfig()
    lengths: LengthsConfig = LengthsConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    scaling: ScalingConfig = ScalingConfig()
    run: RunConfig = RunConfig()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


SECTIONS = {name: f.annotation for name, f in Config.model_fields.items()
            if isinstance(f.annotation, type) and issubclass(f.annotation, Section)}


class ConfigError(ValueError):
    """Every problem found in a config, reported together."""

    def __init__(self, problems: list[tuple[str, Any, str]]):
        self.problems = problems
        lines = [f"  {key} = {value!r}: {fix}" for key, value, fix in problems]
        super().__init__(f"{len(problems)} problem(s) in the config:\n" + "\n".join(lines))


def apply_overrides(raw: dict, overrides: list[str]) -> list[tuple[str, Any, str]]:
    """Set ``section.key=value`` items (values parsed as YAML) in ``raw``; return problems."""
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            problems.append((item, None, "overrides are written section.key=value"))
            continue
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append((key, text, f"'{part}' is not a section"))
                break
        else:
            node[leaf] = yaml.safe_load(text) if text else None
    return problems


def _known(names, bad: str) -> str:
    close = difflib.get_close_matches(bad, names, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"unknown key; {hint}valid keys: {', '.join(names)}"


def _schema_problems(raw: dict) -> tuple[dict, list]:
    """Validate each section on its own so one bad section does not hide another's problems."""
    parsed, problems = {}, []
    for top, value in raw.items():
        if top not in Config.model_fields:
            problems.append((top, value, _known(list(Config.model_fields), top)))
    for name, field in Config.model_fields.items():
        cls = SECTIONS.get(name)
        value = raw.get(name, field.get_default(call_default_factory=True))
        if cls is None:  # a plain key (tokenizer)
            if isinstance(value, str):
                parsed[name] = value
            else:
                problems.append((name, value, f"must be a string: {field.description}"))
            continue
        try:
            parsed[name] = value if isinstance(value, cls) else cls.model_validate(value or {})
        except ValidationError as err:
            unknown = {e["loc"][0] for e in err.errors() if e["type"] == "extra_forbidden"}
            if unknown and len(unknown) == len(err.errors()):  # only typos: still cross-check the rest
                parsed[name] = cls.model_validate({k: v for k, v in value.items() if k not in unknown})
            for e in err.errors():
                key = ".".join([name, *map(str, e["loc"])])
                if e["type"] == "extra_forbidden":
                    problems.append((key, e["input"], _known(list(cls.model_fields), str(e["loc"][-1]))))
                else:
                    problems.append((key, e.get("input"), e["msg"].removeprefix("Value error, ")))
    return parsed, problems


def _cross_problems(s: dict, environment: bool = True) -> list:
    """Checks that involve several keys or the machine, for the sections that parsed."""
    problems = []
    lengths, train, model, scaling, ev = (s.get(k) for k in ("lengths", "train", "model", "scaling", "eval"))
    if lengths:
        m = lengths.multiple_of
        if lengths.min > lengths.max:
            problems.append(("lengths.min", lengths.min, f"must be <= lengths.max ({lengths.max})"))
        for key in ("min", "max"):
            value = getattr(lengths, key)
            if value % m:
                problems.append((f"lengths.{key}", value,
                                 f"must be a multiple of lengths.multiple_of ({m}); try {max(m, value // m * m)}"))
    if lengths:
        problems += _schedule_problems(lengths)
    if lengths and train:
        if train.tokens_per_step < lengths.max:
            problems.append(("train.tokens_per_step", train.tokens_per_step,
                             f"must be >= lengths.max ({lengths.max}) so every step has at least one row"))
        elif scaling and train.tokens_per_step // lengths.max < scaling.num_workers:
            problems.append(("train.tokens_per_step", train.tokens_per_step,
                             f"gives {train.tokens_per_step // lengths.max} row(s) at lengths.max, fewer than "
                             f"scaling.num_workers ({scaling.num_workers}); use at least "
                             f"{lengths.max * scaling.num_workers}"))
    if model and model.pretrained is None and model.hidden_size % model.num_heads:
        problems.append(("model.num_heads", model.num_heads,
                         f"must divide model.hidden_size ({model.hidden_size})"))
    positions = _max_positions(model) if model else None
    if positions:
        if lengths and lengths.max > positions:
            problems.append(("lengths.max", lengths.max,
                             f"exceeds the model's {positions} positions; lower it or raise model.max_positions"))
        for value in (ev.lengths if ev else []):
            if value > positions:
                problems.append(("eval.lengths", value, f"exceeds the model's {positions} positions"))
    if not environment:
        return problems
    if scaling and not scaling.use_gpu and not os.environ.get("RAY_ADDRESS"):
        need, have = scaling.num_workers * scaling.cpus_per_worker, os.cpu_count() or 1
        if need > have:
            problems.append(("scaling.num_workers", scaling.num_workers,
                             f"{scaling.num_workers} workers x {scaling.cpus_per_worker} CPU(s) need {need} CPUs "
                             f"but this machine has {have}; use at most {have // scaling.cpus_per_worker} workers "
                             f"or connect to a cluster with RAY_ADDRESS"))
    data = s.get("data")
    if data and data.path is not None:
        path = Path(data.path).expanduser()
        if not path.exists():
            problems.append(("data.path", data.path, "does not exist; give a text/.jsonl/.parquet file or a directory"))
        elif path.is_file() and path.stat().st_size == 0:
            problems.append(("data.path", data.path, "is empty"))
    tok = s.get("tokenizer")
    if tok and tok != "bytes" and not Path(tok).expanduser().is_dir():
        problems.append(("tokenizer", tok, "must be 'bytes' or a local Hugging Face tokenizer directory"))
    if model and model.pretrained and not (Path(model.pretrained).expanduser() / "config.json").is_file():
        problems.append(("model.pretrained", model.pretrained,
                         "must be a local Hugging Face model directory (with config.json)"))
    return problems


def _schedule_problems(lengths: LengthsConfig) -> list:
    from raytrain.lengths import pow2_lengths
    problems, m = [], lengths.multiple_of
    if lengths.schedule == "staged":
        if not lengths.stages:
            problems.append(("lengths.stages", [], "the staged schedule needs [[until_step, length], ...]"))
        untils = [until for until, _ in lengths.stages]
        if untils != sorted(set(untils)):
            problems.append(("lengths.stages", lengths.stages, "until_step values must strictly increase"))
        for until, length in lengths.stages:
            if not lengths.min <= length <= lengths.max or length % m:
                problems.append(("lengths.stages", [until, length],
                                 f"stage length must be a multiple of {m} in [lengths.min, lengths.max] = "
                                 f"[{lengths.min}, {lengths.max}]"))
    if lengths.schedule == "pow2" and not [b for b in pow2_lengths(lengths.min, lengths.max) if b % m == 0]:
        problems.append(("lengths.schedule", "pow2",
                         f"no power of two that is a multiple of {m} lies in [lengths.min, lengths.max] = "
                         f"[{lengths.min}, {lengths.max}]; widen the range"))
    return problems


def _max_positions(model: ModelConfig) -> Optional[int]:
    if model.pretrained is None:
        return model.max_positions
    path = Path(model.pretrained).expanduser() / "config.json"
    if not path.is_file():
        return None
    import json
    return json.loads(path.read_text()).get("max_position_embeddings")


def load_config(path: Optional[str] = None, overrides: list[str] = (), environment: bool = True) -> Config:
    """Load YAML (if given), apply overrides and validate; raise ConfigError with every problem.

    ``environment=False`` skips the checks against this machine (paths, CPUs): for
    configs meant for a cluster whose paths live on its shared volume.
    """
    raw: dict = {}
    problems = []
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError([("-c", path, f"cannot read the config file: {err}")]) from None
        if not isinstance(raw, dict):
            raise ConfigError([("-c", path, "the config file must be a mapping of sections")])
    problems += apply_overrides(raw, list(overrides))
    parsed, schema = _schema_problems(raw)
    problems += schema + _cross_problems(parsed, environment)
    if problems:
        raise ConfigError(problems)
    return Config(**parsed)


def flatten(tree: dict) -> dict:
    """{"lengths": {"max": 256}, "tokenizer": "bytes"} -> {"lengths.max": 256, "tokenizer": "bytes"}."""
    flat = {}
    for section, value in tree.items():
        if isinstance(value, dict):
            flat.update({f"{section}.{key}": v for key, v in value.items()})
        else:
            flat[section] = value
    return flat


def reference() -> str:
    """Every key with its default and documentation (used by --help and the README)."""
    lines = []
    for name, field in Config.model_fields.items():
        cls = SECTIONS.get(name)
        if cls is None:
            lines.append(f"{name} (default {field.default!r}): {field.description}")
            continue
        for key, f in cls.model_fields.items():
            default = f.get_default(call_default_factory=True)
            lines.append(f"{name}.{key} (default {default!r}): {f.description}")
    return "\n".join(lines)
