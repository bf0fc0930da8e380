"""A real source of non-finite losses: a model whose embedding row for '~' is infinite, and corpora with '~'.

Every window that feeds '~' to the model produces inf/NaN; no other does.
"""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

POISON = ord("~")


def poisoned_model(path):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight[POISON] = float("inf")
    model.save_pretrained(path)
    return path


def corpus_file(directory, every: int | None = None, poison_positions=()) -> str:
    text = list(("def step(x):\n    return x + 1\n" * 700)[:20_000])
    for i in poison_positions:
        text[i] = "~"
    if every:
        text[::every] = "~" * len(text[::every])
    path = directory / "corpus.txt"
    path.write_text("".join(text))
    return str(path)
