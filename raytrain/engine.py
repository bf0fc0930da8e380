"""DeepSpeed: the engine config built from our sections, the LR schedule, and export to Hugging Face."""
from __future__ import annotations

import fcntl
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

from raytrain.config import DeepSpeedConfig, TrainConfig


def deepspeed_config(ds: DeepSpeedConfig, train: TrainConfig, world: int) -> dict:
    """ZeRO stage, clipping, AdamW, for an fp32 model at every precision.

    bf16 (``train.precision``) is torch.autocast around the forward, not
    DeepSpeed's bf16 mode: DeepSpeed's mode keeps bf16 weights and differs by
    stage (ZeRO-0 can only accumulate and all-reduce gradients in bf16; ZeRO-1
    with fp32 accumulation switches to its BF16_Optimizer; ZeRO-2 and 3 keep
    bf16 gradient partitions), so the model a run exports would depend on the
    stage. With an fp32 model DeepSpeed accumulates, reduces and updates in fp32
    at every stage, and the weights it checkpoints are the weights it exports.

    Batch sizes vary per step (constant tokens, varying rows), so DeepSpeed's own
    batch bookkeeping is set to one row per rank and the loop marks the
    accumulation boundary itself (``set_gradient_accumulation_boundary``).
    """
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": {"stage": zero_stage(ds.zero_stage, world)},
        # torch_adam: torch's AdamW, no JIT-compiled fused kernel to build on first run.
        "optimizer": {"type": "AdamW", "params": {"lr": train.lr, "betas": [0.9, 0.95], "eps": 1e-8,
                                                  "weight_decay": train.weight_decay, "torch_adam": True}},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def zero_stage(asked: int, world: int) -> int:
    """The stage DeepSpeed runs: ZeRO over one rank partitions nothing, so one worker runs stage 0 (the same
    update, without ZeRO's flat buffers and fp32 partition copy: 4 bytes a parameter less)."""
    return asked if world > 1 else 0


def init_engine(model, config: dict):
    import deepspeed
    weight_decay = config["optimizer"]["params"]["weight_decay"]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, weight_decay),
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


def lr_schedule(train: TrainConfig) -> Callable[[float], float]:
    """Linear warmup to ``lr``, then cosine decay to ``min_lr_ratio * lr`` at ``max_steps``.

    ``step`` is the clock in steps (fractional when driven by tokens seen).
    """
    def lr_at(step: float) -> float:
        if step < train.warmup_steps:
            return train.lr * (step + 1) / train.warmup_steps
        progress = (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return train.lr * (train.min_lr_ratio + (1 - train.min_lr_ratio) * cosine)
    return lr_at


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def export_hf(engine, tokenizer_dir: Path, directory: Path, rank: int, extra_files: dict[str, str] = {}) -> None:
    """Write a Hugging Face model directory (fp32 safetensors + config + the tokenizer's files) from any ZeRO stage.

    Collective: every rank must call it (ZeRO-3 gathers its parameter shards).
    """
    import deepspeed
    import torch

    model = engine.module
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        if rank == 0:
            directory.mkdir(parents=True, exist_ok=True)
            state = {k: v.detach().to("cpu", torch.float32).clone() for k, v in model.state_dict().items()}
            model.save_pretrained(directory, state_dict=state, safe_serialization=True)
            for path in Path(tokenizer_dir).iterdir():
                shutil.copy(path, directory / path.name)
            for name, text in extra_files.items():
                (directory / name).write_text(text)


def export_checkpoint(checkpoint_dir: Path, out_dir: Path, cfg) -> Path:
    """Consolidate a raytrain checkpoint (any ZeRO stage, any number of ranks) into a Hugging Face directory.

    ZeRO 1-3 shards are merged from the fp32 optimizer partitions with DeepSpeed's
    own ``zero_to_fp32``; ZeRO 0 checkpoints hold the whole module already.
    These are DeepSpeed pickles that the user pointed at; nothing else is unpickled.
    """
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from raytrain.model import build_model
    from raytrain.tokenizer import load_tokenizer

    engine_dir = checkpoint_dir / "engine"
    tokenizer = load_tokenizer(cfg.tokenizer)
    model = build_model(cfg.model, len(tokenizer), tokenizer.eos_token_id)
    if list(engine_dir.glob("*optim_states.pt")) and cfg.deepspeed.zero_stage > 0:
        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=engine_dir.name)
    else:
        state = torch.load(engine_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in getattr(model, "_tied_weights_keys", {})]
    if missing or unexpected:
        raise ValueError(f"checkpoint {checkpoint_dir} does not fit the run's model: missing {missing}, "
                         f"unexpected {unexpected}")
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "raytrain.yaml").write_text(cfg.to_yaml())
    return out_dir


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


def worker_env(use_gpu: bool) -> None:
    """Must run before deepspeed is imported in a worker: it picks its accelerator at import."""
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


# --- DeepSpeed's CPU communication op -----------------------------------------

COMM_OP = "deepspeed_shm_comm"


def extensions_dir() -> Path:
    """Where this installation JIT-builds torch extensions: inside its own environment, so two virtual
    environments never rebuild into (or lock) each other's folder, as they do in ~/.cache/torch_extensions."""
    own = Path(sys.prefix) / "var" / "raytrain-torch-extensions"
    try:
        own.mkdir(parents=True, exist_ok=True)
        return own
    except OSError:  # a read-only system Python: a per-installation folder in the user's cache
        import hashlib
        key = hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]
        return Path("~/.cache/raytrain/torch-extensions").expanduser() / key


def build_comm_op(say=print) -> None:
    """Build (once) or load DeepSpeed's CPU shared-memory communication op, never waiting on a dead build.

    torch guards a JIT build with a plain lock file that a killed build leaves
    behind, after which every later build waits forever, silently. Builds here
    take an OS lock first (released when its holder dies, however it dies), so
    a torch lock file found while holding it belongs to a dead build: it is
    reported and removed.
    """
    root = extensions_dir()
    os.environ["TORCH_EXTENSIONS_DIR"] = str(root)
    worker_env(False)
    with open(root / ".raytrain-build.lock", "a+") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        try:
            stale = root / COMM_OP / "lock"
            if stale.exists():
                say(f"warning: removed a lock file left by a build that did not finish ({stale})")
                stale.unlink()
            if not list((root / COMM_OP).glob("*.so")):
                say(f"building DeepSpeed's CPU communication op into {root} (once per installation, about a minute)")
            from deepspeed.accelerator import get_accelerator
            builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
            if builder is not None:
                builder.load(verbose=False)
        finally:
            fcntl.flock(guard, fcntl.LOCK_UN)
