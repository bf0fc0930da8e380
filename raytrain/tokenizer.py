"""Tokenizers: the built-in byte-level one and local Hugging Face directories (never a download)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

EOT = "<|endoftext|>"


def byte_tokenizer():
    """A Hugging Face fast tokenizer whose ids are the UTF-8 byte values (0-255), plus EOT = 256.

    Built in code so nothing is downloaded; saved with the model, it reloads with
    ``AutoTokenizer.from_pretrained``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_char = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins ByteLevel maps bytes to
    table = _bytes_to_unicode()
    vocab = {table[b]: b for b in range(256)}
    assert set(vocab) == set(byte_char)
    vocab[EOT] = 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOT])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT, bos_token=EOT, unk_token=None)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character table (what ByteLevel uses)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def load_tokenizer(spec: str):
    """'bytes' or a local Hugging Face tokenizer directory (never downloads)."""
    if spec == "bytes":
        return byte_tokenizer()
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(Path(spec).expanduser(), local_files_only=True)


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


