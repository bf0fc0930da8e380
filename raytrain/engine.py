"""DeepSpeed: the engine's config built from our sections and the model, the engine itself, and the LR schedule.

DeepSpeed picks its accelerator when it is imported (from ``DS_ACCELERATOR``,
which ``launch`` sets for the driver and the workers' runtime environment), so
it is imported inside the functions that use it, never at the top.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from raytrain.config import DeepSpeedConfig, TrainConfig


@dataclass(frozen=True)
class Buckets:
    """DeepSpeed's communication sizes, in elements, from the model rather than DeepSpeed's defaults.

    DeepSpeed's defaults (a 5e8-element reduce bucket; at ZeRO-3 up to 1e9 live
    parameters kept for reuse) are sized for models of billions of parameters:
    at 125M the reduce bucket alone is 1.86 GiB of fp32, four times the whole
    gradient, and ZeRO-3 would keep every gathered parameter until the backward.
    One transformer block is the natural unit instead: gradients are reduced
    block by block as the backward produces them (overlapping the next block's
    backward), ZeRO-3 prefetches the next block and keeps two blocks plus the
    largest layer (the embedding) gathered at most.
    """
    block: int  # parameters of one transformer block (the largest share of the rest: embeddings and norms)
    largest_layer: int  # the largest single module's own parameters (usually the embedding)

    @property
    def reduce(self) -> int:
        return self.block

    @property
    def live(self) -> int:
        return 2 * self.block + self.largest_layer

    @staticmethod
    def of(model) -> "Buckets":
        """From a model (on any device, the meta device included; ZeRO-3 keeps a partitioned size in ds_numel)."""
        import torch

        def size(p):
            return getattr(p, "ds_numel", p.numel())
        params = sum(size(p) for p in model.parameters())
        embeddings = sum(size(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding))
        config = getattr(model, "config", None) or model.lm.config
        layers = getattr(config, "num_hidden_layers", None) or config.n_layer
        largest = max(sum(size(p) for p in m.parameters(recurse=False)) for m in model.modules())
        return Buckets(block=max(2**16, (params - embeddings) // layers), largest_layer=largest)


PERSISTENCE_THRESHOLD = 10**5  # ZeRO-3 keeps parameters this small whole on every rank (DeepSpeed's default)


def zero_stage(asked: int, world: int) -> int:
    """The stage DeepSpeed runs: ZeRO over one rank partitions nothing, so one worker runs stage 0 (the same
    update, without ZeRO's flat buffers and fp32 partition copy: 4 bytes a parameter less)."""
    return asked if world > 1 else 0


def zero_section(stage: int, buckets: Buckets) -> dict:
    """ZeRO's section: communication overlapped with the backward where the stage supports it (1-3), buckets
    sized from the model (``Buckets``)."""
    if stage == 0:
        return {"stage": 0}
    section = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True,
               "reduce_bucket_size": buckets.reduce}
    if stage == 3:
        section.update({"stage3_prefetch_bucket_size": buckets.block, "stage3_max_live_parameters": buckets.live,
                        "stage3_max_reuse_distance": buckets.block,
                        "stage3_param_persistence_threshold": PERSISTENCE_THRESHOLD})
    return section


def deepspeed_config(ds: DeepSpeedConfig, train: TrainConfig, world: int, bf16: bool, buckets: Buckets) -> dict:
    """ZeRO stage, clipping and AdamW for an fp32 model; bf16 through DeepSpeed's own ``torch_autocast``.

    bf16 is torch.autocast over fp32 weights, entered by DeepSpeed's engine around
    every forward (``torch_autocast``): an autocast entered outside the engine
    would be switched off inside it on CUDA (DeepSpeed's ``autocast_if_enabled``
    reads CUDA's autocast state and disables it when its own section is off).
    ``lower_precision_safe_modules: []`` keeps every gradient's communication in
    fp32 (its default would reduce linear layers' gradients in bf16). DeepSpeed's
    own ``bf16.enabled`` is not used: it keeps bf16 weights and treats gradients
    differently at each stage, so the exported model would depend on the stage.

    Batch sizes vary per step (constant tokens, varying rows), so DeepSpeed's own
    batch bookkeeping is set to one row per rank and the loop marks the
    accumulation boundary itself (``set_gradient_accumulation_boundary``).
    """
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero_section(zero_stage(ds.zero_stage, world), buckets),
        # torch_adam: torch's AdamW, no JIT-compiled fused kernel to build on first run.
        "optimizer": {"type": "AdamW", "params": {"lr": train.lr, "betas": [0.9, 0.95], "eps": 1e-8,
                                                  "weight_decay": train.weight_decay, "torch_adam": True}},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if bf16:
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    return config


def init_engine(module, config: dict):
    import deepspeed
    weight_decay = config["optimizer"]["params"]["weight_decay"]
    engine, *_ = deepspeed.initialize(model=module, model_parameters=param_groups(module, weight_decay),
                                      config=config)
    return engine


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on the weight matrices of linear layers only, never on norms, biases or embeddings
    (a tied output head is the embedding itself). Decaying gains and embeddings toward zero only hurts."""
    import torch
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, rest = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 and id(param) not in embeddings else rest).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


LR_POWER = {"sqrt": 0.5, "linear": 1.0, "none": 0.0}  # train.batch_lr_scaling


def lr_schedule(train: TrainConfig) -> Callable[[int, int, int], float]:
    """``lr_at(step, tokens seen, budget)``: linear warmup to ``lr``, then cosine decay to ``min_lr_ratio * lr``
    at ``max_steps``, on the clock ``train.lr_by`` names (steps, or tokens seen / tokens_per_step); a step
    whose token budget is below ``tokens_per_step`` (a batch warmup) scales it by the ratio to the power
    ``train.batch_lr_scaling`` names (square root by default: Adam's noise scale follows the batch's root).
    ``train.lr_changes`` replaces the peak from the steps they name on."""
    power = LR_POWER[train.batch_lr_scaling]

    def lr_at(step: int, tokens: int, budget: int) -> float:
        peak = next((lr for start, lr in reversed(train.lr_changes) if step >= start), train.lr)
        if train.lr_by == "tokens":
            step = tokens / train.tokens_per_step
        if step < train.warmup_steps:
            lr = peak * (step + 1) / train.warmup_steps
        else:
            progress = (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps)
            cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
            lr = peak * (train.min_lr_ratio + (1 - train.min_lr_ratio) * cosine)
        return lr * (budget / train.tokens_per_step) ** power
    return lr_at


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def discard_gradients(engine) -> None:
    """Drop the accumulated gradients of a step without an optimizer update (a non-finite loss).

    Mirrors what DeepSpeed's ZeRO optimizers do themselves on an fp16 overflow,
    which they only detect for fp16 (stage 3) or with clipping (stages 1-2).
    """
    optimizer, stage = engine.optimizer, engine.zero_optimization_stage()
    if stage == 0:
        engine.zero_grad()
    elif stage in (1, 2):
        optimizer.zero_grad(set_to_none=True)
        getattr(optimizer, "_release_preflattened_grad_buffers", lambda: None)()
        for key in optimizer.averaged_gradients:
            optimizer.averaged_gradients[key] = None
    else:
        optimizer._overflow_clean_up(optimizer.loss_scale)
