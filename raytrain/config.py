"""The config schema: typed sections, each key documented in one sentence where it is declared.

The schema imports nothing of the package but the section base and the length
schedules (which are sections themselves), so every component can stand on it.
Loading and overrides live in ``loading``, checks in ``checks``; the docstrings
become ``--help`` and ``docs/configuration.md`` (generated, checked by a test).
"""
from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

import yaml
from pydantic import Field

from raytrain.lengths import SCHEDULES, Lengths, Uniform, readers
from raytrain.section import Section


class ModelConfig(Section):
    pretrained: Optional[str] = None
    """Local Hugging Face model directory to fine-tune; null builds the tiny Llama below."""
    hidden_size: int = Field(128, ge=8)
    """Width of the built-in model."""
    num_layers: int = Field(4, ge=1)
    """Transformer blocks of the built-in model."""
    num_heads: int = Field(4, ge=1)
    """Attention heads of the built-in model (must divide hidden_size)."""
    intermediate_size: int = Field(384, ge=8)
    """MLP width of the built-in model."""
    max_positions: int = Field(1024, ge=2)
    """Longest sequence the built-in model supports (RoPE positions)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward (less memory, a third more compute)."""


class DataConfig(Section):
    path: Optional[str] = None
    """Text, .jsonl or .parquet files, a directory of them or a datasets directory (local or URI); null: built in."""
    text_field: str = "text"
    """Field holding the text in .jsonl, .parquet and datasets records."""
    val_fraction: float = Field(0.02, gt=0, lt=0.5)
    """Fraction of the token stream (its tail) held out for validation."""
    windows: Literal["random", "sequential"] = "random"
    """random: window starts drawn per step; sequential: every token a target once per epoch."""
    cross_documents: bool = True
    """false: attention and positions stay within each document, without an L x L mask."""
    shard_bytes: Optional[int] = Field(None, ge=1)
    """Input bytes per raytrain prepare task and shard; null: a 16th of the corpus (16 to 256 MiB)."""
    cache_dir: str = "~/.cache/raytrain"
    """Where prepared token shards are kept (on a cluster: a path every node shares)."""
    read_ahead: int = Field(1, ge=0)
    """Steps whose windows a background thread reads ahead of the step that trains on them (0: none)."""


# One model per schedule, chosen by lengths.schedule: each reads only its own keys.
LengthsConfig = Annotated[Union[tuple(SCHEDULES.values())], Field(discriminator="schedule")]


class TrainConfig(Section):
    tokens_per_step: int = Field(8192, ge=1)
    """Global target tokens per optimizer step; a step at length L has tokens_per_step // L rows."""
    batch_warmup_tokens: int = Field(0, ge=0)
    """Tokens seen over which a step's token budget grows linearly from batch_start_tokens to tokens_per_step
    (a batch-size warmup; 0: every step has tokens_per_step)."""
    batch_start_tokens: int = Field(2048, ge=1)
    """The first step's token budget in a batch-size warmup."""
    batch_lr_scaling: Literal["sqrt", "linear", "none"] = "sqrt"
    """How the learning rate follows the budget in a batch-size warmup: lr x (budget / tokens_per_step) to the
    power 1/2 (Adam's square-root rule), 1, or 0."""
    max_steps: int = Field(240, ge=1)
    """Optimizer steps to train."""
    log_every: int = Field(10, ge=1)
    """Steps between log lines and metrics.jsonl records."""
    lr: float = Field(3e-3, gt=0)
    """Peak learning rate (AdamW)."""
    warmup_steps: int = Field(20, ge=0)
    """Linear learning-rate warmup steps, then cosine decay to min_lr_ratio * lr."""
    lr_by: Literal["steps", "tokens"] = "steps"
    """Clock the learning-rate schedule runs on: optimizer steps, or tokens seen / tokens_per_step."""
    lr_changes: list[tuple[int, float]] = Field(default_factory=list)
    """[[from_step, lr], ...]: from each step on, the peak learning rate is this instead of lr (the warmup and
    decay keep their shape); a population-based search's replay config lists its changes here."""
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """Final learning rate as a fraction of lr."""
    weight_decay: float = Field(0.1, ge=0)
    """AdamW weight decay, on linear layers' weight matrices only."""
    grad_clip: float = Field(1.0, ge=0)
    """Gradient norm clip (0 disables)."""
    max_nonfinite: int = Field(5, ge=1)
    """Non-finite step losses in a row that stop the run (each one's update is skipped)."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto: bf16 on GPU, fp32 on CPU; bf16 is autocast over fp32 weights, gradients and reduction."""
    micro_batch_tokens: Optional[int] = Field(None, ge=1)
    """Most tokens one worker runs per forward and backward; null: its whole share of the step."""
    loss_chunk_tokens: Optional[int] = Field(None, ge=1)
    """Positions the output head and loss take at a time (no whole-batch logits); null: all at once."""
    compile: Union[Literal["auto"], bool] = "auto"
    """Compile the blocks and the head and loss (torch.compile, dynamic shapes); auto: on GPU only."""


class EvalConfig(Section):
    lengths: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [64, 256, 512], min_length=1)
    """Validation lengths; may exceed lengths.max ("train short, test long")."""
    every: int = Field(80, ge=1)
    """Steps between evaluations (also at step 0 and at the end)."""
    tokens: int = Field(32768, ge=1)
    """Validation target tokens per length (the same leading stretch of the split for every length)."""
    documents: Literal["as_trained", "apart", "crossed"] = "as_trained"
    """Validation windows' documents: as data.cross_documents trains, kept apart, or crossed (compare runs
    trained both ways on one footing)."""


class DeepSpeedConfig(Section):
    zero_stage: int = Field(1, ge=0, le=3)
    """ZeRO stage: 0 (plain data parallel), 1 (optimizer states), 2 (+gradients), 3 (+parameters)."""


class ScalingConfig(Section):
    num_workers: int = Field(2, ge=1)
    """Ray Train workers (data-parallel ranks)."""
    use_gpu: bool = False
    """One GPU per worker with nccl and bf16; otherwise CPU, gloo and fp32."""
    cpus_per_worker: int = Field(1, ge=1)
    """CPUs (and torch threads) per worker."""
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    """Extra Ray resources per worker, e.g. {"accelerator_type:A10G": 0.001}."""
    peak_tflops: Optional[float] = Field(None, gt=0)
    """Peak TFLOP/s of one worker's device for MFU; null: a GPU table, or a matmul measured on CPU."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """How Ray places the workers' bundles on nodes: PACK fills nodes first, SPREAD uses many."""
    start_timeout_s: float = Field(600, gt=0)
    """Seconds the workers may wait to be placed (autoscaled nodes boot) before the run fails, saying why."""


class RunConfig(Section):
    dir: str = "runs"
    """Parent directory of run directories (on a multi-node cluster: a path every node shares)."""
    storage: Optional[str] = None
    """Where Ray keeps checkpoints: null for run.dir, a shared path, or a URI such as s3://bucket/path."""
    name: Optional[str] = None
    """Run directory name under dir; null makes a timestamped name."""
    seed: int = Field(0, ge=0, lt=2**32)
    """Seeds model init, the length schedule and the data windows (0 to 2**32 - 1)."""
    checkpoint_every: int = Field(80, ge=1)
    """Steps between checkpoints (also at the end); a restart resumes from the newest."""
    checkpoint_upload: Literal["async", "sync"] = "async"
    """async: checkpoints are written and uploaded while training goes on; sync: training waits for both."""
    keep_checkpoints: int = Field(2, ge=1)
    """Newest checkpoints kept."""
    init_from: Optional[str] = None
    """Another run's checkpoint (a path or URI) to start from: its weights, optimizer state, step, tokens, the
    lengths it trained and its records; this config applies from that step on (a population-based search's
    exploit, or a branch by hand). Ignored once this run has a checkpoint of its own."""
    max_failures: int = Field(2, ge=0)
    """Worker-group failures Ray Train recovers from (from the newest checkpoint) before giving up."""
    loggers: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(default_factory=list)
    """Trackers that also receive every record: tensorboard, mlflow, wandb (pip install 'raytrain[tracking]')."""
    group: Optional[str] = None
    """What the run belongs to in the trackers (MLflow experiment, W&B group); tune sets the search's name."""


class Config(Section):
    model: ModelConfig = ModelConfig()
    tokenizer: str = "bytes"
    """'bytes' (the built-in byte tokenizer) or a local Hugging Face tokenizer directory."""
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
    """Every key (or those of the sections ``only``) with its default and its sentence (--help, the docs)."""
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
