"""The causal LM: a tiny Llama (RoPE) built from a transformers config, or a local pretrained directory."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from raytrain.config import ModelConfig
from raytrain.steps import ModelShape


def build_model(cfg: ModelConfig, vocab_size: int, eot: int):
    """A fresh tiny Llama sized to the tokenizer's vocabulary, or the pretrained model; fp32 weights at every
    precision (bf16 is autocast around the forward)."""
    if cfg.pretrained is not None:
        model = AutoModelForCausalLM.from_pretrained(Path(cfg.pretrained).expanduser(), local_files_only=True,
                                                     dtype=torch.float32)
    else:
        model = LlamaForCausalLM(tiny_llama(cfg, vocab_size, eot))
    if cfg.activation_checkpointing:  # non-reentrant: the variant that composes with ZeRO-3's parameter hooks
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def tiny_llama(cfg: ModelConfig, vocab_size: int, eot: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads, max_position_embeddings=cfg.max_positions,
        tie_word_embeddings=True, bos_token_id=eot, eos_token_id=eot,
        pad_token_id=None, attn_implementation="sdpa",
    )


def model_shape(model) -> ModelShape:
    """What the model's FLOPs per token depend on (``steps.ModelShape``), read from the module itself, so that
    pretrained models of any architecture are covered: every linear layer (GPT-2's Conv1D too), the output head
    included, is a matmul weight; ZeRO-3 leaves partitioned parameters empty and keeps their size in ds_numel."""
    config = model.config
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    weights = sum(getattr(m.weight, "ds_numel", m.weight.numel()) for m in model.modules()
                  if isinstance(m, (torch.nn.Linear, Conv1D)))
    return ModelShape(weights=weights, layers=getattr(config, "num_hidden_layers", None) or config.n_layer,
                      attention_width=heads * (getattr(config, "head_dim", None) or config.hidden_size // heads))
