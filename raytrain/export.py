"""Hugging Face model directories out of a training engine or out of a checkpoint, at any ZeRO stage.

Loading never unpickles anything from a path the user did not point at: models
and tokenizers load from safetensors or JSON; only DeepSpeed's own checkpoint
shards (inside a run's checkpoint) are ``torch.load``ed.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from raytrain.checkpoint import CONFIG, STATE, copy_out, full_state, run_checkpoints
from raytrain.loading import load_config
from raytrain.model import build_model
from raytrain.section import ConfigError
from raytrain.tokenizer import load_tokenizer

LM_PREFIX = "lm."  # the engine trains raytrain.loss.CausalLMLoss, which holds the language model as .lm


def export_hf(engine, tokenizer_dir: Path, directory: Path, rank: int, extra_files: dict[str, str]) -> None:
    """Write a Hugging Face model directory (fp32 safetensors + config + the tokenizer's files) from any ZeRO
    stage. Collective: every rank must call it (ZeRO-3 gathers its parameter shards)."""
    import deepspeed  # at call time: DeepSpeed picks its accelerator at import
    lm = engine.module.lm
    with deepspeed.zero.GatheredParameters(list(lm.parameters()), modifier_rank=None):
        if rank == 0:
            directory.mkdir(parents=True, exist_ok=True)
            state = {k: v.detach().to("cpu", torch.float32).clone() for k, v in lm.state_dict().items()}
            lm.save_pretrained(directory, state_dict=state, safe_serialization=True)
            for path in Path(tokenizer_dir).iterdir():
                shutil.copy(path, directory / path.name)
            for name, text in extra_files.items():
                (directory / name).write_text(text)


def language_model_state(state: dict) -> dict:
    """A checkpoint's state dict (keys of the engine's module) as the language model's own keys."""
    return {k.removeprefix(LM_PREFIX): v for k, v in state.items()}


def export_run(checkpoint_or_run: str, out: str | None) -> Path:
    """Export a checkpoint (a local path or a storage URI) or a run directory's newest checkpoint; the model
    directory written."""
    source = checkpoint_or_run
    if "://" not in source and (Path(source) / "config.yaml").is_file() and not (Path(source) / STATE).is_file():
        cfg = load_config(str(Path(source) / "config.yaml"), environment=False)  # a run directory
        found = run_checkpoints(cfg.run.storage or cfg.run.dir, cfg.run.name)
        if not found:
            raise ConfigError([("RUN_DIR", source, "has no checkpoint yet; give a checkpoint directory")])
        source = found[-1]
    with tempfile.TemporaryDirectory() as scratch:
        directory = copy_out(source, Path(scratch) / "checkpoint")
        if not (directory / STATE).is_file():
            raise ConfigError([("CHECKPOINT", source, "is not a raytrain checkpoint (no state.json)")])
        cfg = load_config(str(directory / CONFIG), environment=False)
        step = json.loads((directory / STATE).read_text())["step"]
        default = Path(cfg.run.dir).expanduser() / cfg.run.name / f"exported-{step}"
        return export_checkpoint(directory, Path(out) if out else default, cfg)


def export_checkpoint(checkpoint_dir: Path, out_dir: Path, cfg) -> Path:
    """Consolidate a raytrain checkpoint (any ZeRO stage, any number of ranks) into a Hugging Face directory."""
    tokenizer = load_tokenizer(cfg.tokenizer)
    model = build_model(cfg.model, len(tokenizer), tokenizer.eos_token_id)
    tensors, _ = full_state(checkpoint_dir)
    state = language_model_state({name: saved["fp32"] for name, saved in tensors.items()})
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in getattr(model, "_tied_weights_keys", {})]
    if missing or unexpected:
        raise ValueError(f"checkpoint {checkpoint_dir} does not fit the run's model: missing {missing}, "
                         f"unexpected {unexpected}")
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "raytrain.yaml").write_text(cfg.to_yaml())
    return out_dir
