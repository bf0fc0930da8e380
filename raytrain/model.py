"""The causal LM: a tiny Llama (RoPE) built from a transformers config, or a local pretrained directory."""
from __future__ import annotations

import json
from pathlib import Path

from raytrain.config import ConfigError, ModelConfig


def model_vocab_size(cfg: ModelConfig, tokenizer) -> int:
    if cfg.pretrained is None:
        return len(tokenizer)  # the built-in model is sized to the tokenizer
    return json.loads((Path(cfg.pretrained).expanduser() / "config.json").read_text())["vocab_size"]


def check_vocab(cfg: ModelConfig, tokenizer, tokenizer_spec: str) -> None:
    vocab = model_vocab_size(cfg, tokenizer)
    if len(tokenizer) > vocab:
        raise ConfigError([("tokenizer", tokenizer_spec,
                            f"has {len(tokenizer)} tokens but model.pretrained embeds only {vocab}; "
                            f"use the model's own tokenizer")])


def build_model(cfg: ModelConfig, tokenizer):
    """A fresh tiny Llama, or the pretrained model (fp32 weights; DeepSpeed casts for bf16)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if cfg.pretrained is not None:
        return AutoModelForCausalLM.from_pretrained(Path(cfg.pretrained).expanduser(), local_files_only=True,
                                                    dtype=torch.float32)
    eot = tokenizer.eos_token_id
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads, max_position_embeddings=cfg.max_positions,
        tie_word_embeddings=True, bos_token_id=eot, eos_token_id=eot,
        pad_token_id=None, attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config)
