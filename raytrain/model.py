"""The causal LM: a tiny Llama (RoPE) built from a transformers config, or a local pretrained directory."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from raytrain.config import ModelConfig


def build_model(cfg: ModelConfig, vocab_size: int, eot: int):
    """A fresh tiny Llama sized to the tokenizer's vocabulary, or the pretrained model; fp32 weights at every
    precision (bf16 is autocast around the forward)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    if cfg.pretrained is not None:
        model = AutoModelForCausalLM.from_pretrained(Path(cfg.pretrained).expanduser(), local_files_only=True,
                                                     dtype=torch.float32)
    else:
        model = LlamaForCausalLM(tiny_llama(cfg, vocab_size, eot))
    if cfg.activation_checkpointing:  # non-reentrant: the variant that composes with ZeRO-3's parameter hooks
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5 renamed it
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def tiny_llama(cfg: ModelConfig, vocab_size: int, eot: int):
    from transformers import LlamaConfig
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads, max_position_embeddings=cfg.max_positions,
        tie_word_embeddings=True, bos_token_id=eot, eos_token_id=eot,
        pad_token_id=None, attn_implementation="sdpa",
    )


def matmul_weights(model) -> int:
    """Weights a token is multiplied by: every linear layer (GPT-2's Conv1D too), the output head included.

    Counted from the module itself, so pretrained models of any architecture are
    covered; ZeRO-3 leaves partitioned parameters empty and keeps their size in
    ``ds_numel``.
    """
    import torch
    from transformers.pytorch_utils import Conv1D
    return sum(getattr(m.weight, "ds_numel", m.weight.numel()) for m in model.modules()
               if isinstance(m, (torch.nn.Linear, Conv1D)))


def training_flops_per_token(model, length: int, weights: int | None = None) -> float:
    """Model FLOPs of one token's forward and backward at sequence length ``length`` (backward = 2x forward).

    Forward: 2 FLOPs per matmul weight, plus attention's two matmuls per layer
    (scores QK^T and the weighted sum AV), each 2 * L * width for a token, over
    the full L x L square as PaLM's MFU convention counts it (and as eager
    attention computes it).
    """
    config = model.config
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    width = heads * (getattr(config, "head_dim", None) or config.hidden_size // heads)
    weights = matmul_weights(model) if weights is None else weights
    return 3 * (2 * weights + 4 * layers * width * length)


@dataclass(frozen=True)
class Accelerator:
    """A GPU as Ray names it (``accelerator_type:NAME``): bf16 dense peak and memory per device."""
    name: str
    peak_tflops: float  # bf16 dense tensor-core peak
    memory_gib: float  # total device memory as nvidia-smi reports it


# Peaks from the vendors' datasheets, except the A10G (AWS's part, for which NVIDIA publishes none: 70 is the
# figure commonly quoted for it, well below the A10's 125); scaling.peak_tflops overrides any of them. Longer
# names first, so "A100-80G" matches before "A100" (a bare "A100" is taken as the 40 GB part: the safe side).
ACCELERATORS = {a.name: a for a in [
    Accelerator("A100-80G", 312.0, 80.0), Accelerator("A100-40G", 312.0, 40.0), Accelerator("A100", 312.0, 40.0),
    Accelerator("A10G", 70.0, 22.5), Accelerator("L40S", 362.0, 45.0), Accelerator("L4", 121.0, 22.5),
    Accelerator("H100", 989.0, 79.6), Accelerator("H200", 989.0, 140.4), Accelerator("B200", 2250.0, 179.1)]}


def find_accelerator(name: str) -> Accelerator | None:
    """The table entry a device or Ray accelerator-type name refers to ("NVIDIA A10G", "A100-SXM4-80GB")."""
    squeezed = name.replace(" ", "").upper().replace("80GB", "80G").replace("40GB", "40G")
    for key, accelerator in ACCELERATORS.items():
        parts = key.split("-")
        if parts[0] in squeezed and all(p in squeezed for p in parts[1:]):
            return accelerator
    return None


def peak_flops(use_gpu: bool, override_tflops: float | None, threads: int) -> tuple[float, str]:
    """Peak FLOP/s of one worker's device and where the figure comes from (said in the log)."""
    import time

    import torch
    if override_tflops:
        return override_tflops * 1e12, "scaling.peak_tflops"
    if use_gpu:
        name = torch.cuda.get_device_name()
        accelerator = find_accelerator(name)
        if accelerator:
            return accelerator.peak_tflops * 1e12, f"{accelerator.name} bf16 datasheet"
        return float("nan"), f"unknown device {name!r}: set scaling.peak_tflops"
    # CPU: what a fp32 matmul reaches on these threads. The best of many short windows, not one average: workers
    # measure at start-up, when Ray's and the other ranks' start-up work can take the CPU for a while, and a
    # deflated peak shows as an MFU above 100%.
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    torch.mm(a, b)
    best, deadline = 0.0, time.perf_counter() + 0.6
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        best = max(best, 4 * 2 * 512**3 / (time.perf_counter() - start))
    return best, f"a fp32 matmul measured on {threads} CPU thread(s)"
