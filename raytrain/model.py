"""The causal LM: a tiny Llama (RoPE) built from a transformers config, or a local pretrained directory."""
from __future__ import annotations

from pathlib import Path

from raytrain.config import ModelConfig


def build_model(cfg: ModelConfig, vocab_size: int, eot: int):
    """A fresh tiny Llama sized to the tokenizer's vocabulary, or the pretrained model (fp32 weights; DeepSpeed
    casts for bf16)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if cfg.pretrained is not None:
        return AutoModelForCausalLM.from_pretrained(Path(cfg.pretrained).expanduser(), local_files_only=True,
                                                    dtype=torch.float32)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads, max_position_embeddings=cfg.max_positions,
        tie_word_embeddings=True, bos_token_id=eot, eos_token_id=eot,
        pad_token_id=None, attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config)
