"""``raytrain generate``: text from an exported model through transformers' own generation."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

REPORT_PROMPTS = ["def ", "import ", "The "]  # raytrain report's fixed prompts (the built-in corpus is Python)


def load(model_dir: Path):
    """(model, tokenizer) of a raytrain export or any local Hugging Face causal LM; fp32, eval mode."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.8,
             top_p: float = 0.95, seed: int = 0) -> str:
    """The prompt and its continuation; temperature 0 is greedy. A fixed seed gives the same text every time."""
    torch.manual_seed(seed)
    inputs = tokenizer(prompt, return_tensors="pt")
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else \
        {"do_sample": False}
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.eos_token_id,
                             **sampling)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def samples(model_dir: Path, max_new_tokens: int = 48) -> str:
    """Greedy continuations of the report's fixed prompts, one block each (for raytrain report)."""
    model, tokenizer = load(model_dir)
    return "\n".join(f"--- {prompt!r} (greedy, {max_new_tokens} tokens)\n"
                     f"{generate(model, tokenizer, prompt, max_new_tokens, temperature=0)}"
                     for prompt in REPORT_PROMPTS)
