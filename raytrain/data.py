"""Tokenizers, the corpus as a memory-mapped token stream, and the windows of a step.

The corpus is tokenized once into ``train.bin`` / ``val.bin`` (flat token ids,
documents separated by the tokenizer's end-of-text token) under a cache key
built from the inputs and the tokenizer, so unchanged inputs are never
re-tokenized. A step's batch is ``rows`` windows of ``L + 1`` tokens: inputs
are the first ``L``, targets the last ``L``. Nothing is padded.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from raytrain.config import ConfigError, DataConfig
from raytrain.lengths import step_rng

TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".text"}
DATA_SUFFIXES = TEXT_SUFFIXES | {".jsonl", ".parquet"}
WINDOW_STREAM = 2  # step_rng stream for window offsets (lengths use stream 1)
BUILTIN_BYTES = 6_000_000  # enough for a few hundred tiny-model steps without repeating much
EOT = "<|endoftext|>"


# --- tokenizers ---------------------------------------------------------------

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


# --- corpus -------------------------------------------------------------------

def builtin_files() -> list[Path]:
    """The built-in corpus: this Python's standard-library sources, sorted, up to BUILTIN_BYTES.

    It exists on every machine that runs raytrain and is the same for a given Python version.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__", "turtledemo"}
    files, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if skip & set(path.relative_to(root).parts) or not path.is_file():
            continue
        files.append(path)
        total += path.stat().st_size
        if total >= BUILTIN_BYTES:
            break
    return files


def data_files(path: Optional[str]) -> list[Path]:
    if path is None:
        return builtin_files()
    root = Path(path).expanduser()
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES)


def iter_documents(files: list[Path], text_field: str) -> Iterator[str]:
    for path in files:
        if path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as f:
                for line_no, line in enumerate(f, 1):
                    if line.strip():
                        record = json.loads(line)
                        if text_field not in record:
                            raise ConfigError([("data.text_field", text_field,
                                                f"missing in {path} line {line_no}; fields: {sorted(record)}")])
                        yield record[text_field]
        elif path.suffix == ".parquet":
            import pyarrow.parquet as pq
            table = pq.read_table(path)
            if text_field not in table.column_names:
                raise ConfigError([("data.text_field", text_field,
                                    f"missing in {path}; columns: {table.column_names}")])
            yield from (t for t in table.column(text_field).to_pylist() if t)
        else:
            yield path.read_text(encoding="utf-8", errors="replace")


@dataclass
class Corpus:
    """Memory-mapped token streams of the train and validation splits."""
    train: np.ndarray
    val: np.ndarray
    directory: Path


def prepare_corpus(data: DataConfig, tokenizer) -> Corpus:
    """Tokenize the corpus into the cache (once per distinct input) and memory-map it."""
    files = data_files(data.path)
    if not files:
        raise ConfigError([("data.path", data.path, f"holds no {sorted(DATA_SUFFIXES)} files")])
    key = hashlib.sha256(json.dumps({
        "files": [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files],
        "text_field": data.text_field, "val_fraction": data.val_fraction,
        "tokenizer": tokenizer_fingerprint(tokenizer), "python": sys.version if data.path is None else None,
    }).encode()).hexdigest()[:20]
    directory = Path(data.cache_dir).expanduser() / "tokens" / key
    if not (directory / "meta.json").is_file():
        _tokenize(files, data, tokenizer, directory)
    return open_corpus(directory)


def _tokenize(files: list[Path], data: DataConfig, tokenizer, directory: Path) -> None:
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max else np.uint32
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    chunks, batch = [], []

    def flush():
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            chunks.append(np.asarray(ids + separator, dtype=dtype))
        batch.clear()

    for text in iter_documents(files, data.text_field):
        batch.append(text)
        if len(batch) == 256:
            flush()
    flush()
    stream = np.concatenate(chunks) if chunks else np.zeros(0, dtype)
    if stream.size == 0:
        raise ConfigError([("data.path", data.path, "contains no text")])
    n_val = max(1, int(stream.size * data.val_fraction))
    # Write to a private temp dir, then rename: concurrent workers never see a half-written cache.
    tmp = directory.with_name(f"{directory.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    stream[:-n_val].tofile(tmp / "train.bin")
    stream[-n_val:].tofile(tmp / "val.bin")
    (tmp / "meta.json").write_text(json.dumps({
        "dtype": np.dtype(dtype).name, "train_tokens": int(stream.size - n_val), "val_tokens": n_val,
        "files": len(files), "source": data.path or "builtin: Python standard library"}))
    try:
        tmp.rename(directory)
    except OSError:  # another process finished first; theirs is identical
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)


def open_corpus(directory: Path) -> Corpus:
    meta = json.loads((directory / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    return Corpus(train=np.memmap(directory / "train.bin", dtype=dtype, mode="r"),
                  val=np.memmap(directory / "val.bin", dtype=dtype, mode="r"),
                  directory=directory)


def check_corpus(corpus: Corpus, longest_train: int, eval_lengths: list[int]) -> None:
    """Every split must hold at least one window of each length it is used at."""
    problems = []
    if corpus.train.size < longest_train + 1:
        problems.append(("data.path", str(corpus.directory),
                         f"the train split has {corpus.train.size} tokens, fewer than one window of "
                         f"lengths.max + 1 = {longest_train + 1}; add data or lower lengths.max"))
    for length in eval_lengths:
        if corpus.val.size < length + 1:
            problems.append(("eval.lengths", length,
                             f"the validation split has {corpus.val.size} tokens, fewer than one window of "
                             f"{length + 1}; add data, raise data.val_fraction or lower the length"))
    if problems:
        raise ConfigError(problems)


# --- windows ------------------------------------------------------------------

def random_offsets(n_tokens: int, seed: int, step: int, length: int, rows: int) -> np.ndarray:
    """Uniformly random window starts: a pure function of (seed, step, length, rows)."""
    return step_rng(seed, step, WINDOW_STREAM).integers(0, n_tokens - length, size=rows)


class SequentialOffsets:
    """Consecutive windows through the stream, whatever each step's L: every token is a target once per epoch.

    A window that would cross the end of the stream starts the next epoch at 0
    instead (the < L tokens left at the end of an epoch are skipped). The
    cursor before each step is a pure function of the earlier steps' lengths,
    computed once and memoized, so a resumed run continues where it left off.
    """

    def __init__(self, n_tokens: int, schedule, tokens_per_step: int):
        self.n_tokens, self.schedule, self.tokens_per_step = n_tokens, schedule, tokens_per_step
        self.cursor = [0]  # start of the next window before step i

    def _lay(self, start: int, length: int, rows: int) -> tuple[np.ndarray, int]:
        offsets, cursor = [], start
        for _ in range(rows):
            if cursor + length >= self.n_tokens:  # the window's last token would be past the end
                cursor = 0
            offsets.append(cursor)
            cursor += length  # the next window's first input is this one's last target
        return np.asarray(offsets, dtype=np.int64), cursor

    def __call__(self, step: int, length: int, rows: int) -> np.ndarray:
        while len(self.cursor) <= step:
            i = len(self.cursor) - 1
            n = self.schedule(i)
            self.cursor.append(self._lay(self.cursor[i], n, self.tokens_per_step // n)[1])
        return self._lay(self.cursor[step], length, rows)[0]


def window_offsets(mode: str, n_tokens: int, seed: int, schedule, tokens_per_step: int):
    """``offsets(step, length, rows)`` for ``data.windows``: the global batch's window starts."""
    if mode == "sequential":
        return SequentialOffsets(n_tokens, schedule, tokens_per_step)
    return lambda step, length, rows: random_offsets(n_tokens, seed, step, length, rows)


def gather_windows(stream: np.ndarray, offsets: np.ndarray, length: int) -> np.ndarray:
    """(rows, L + 1) int64 windows starting at ``offsets``."""
    index = offsets[:, None] + np.arange(length + 1)[None, :]
    return stream[index].astype(np.int64)


def eval_offsets(n_tokens: int, length: int, tokens: int) -> np.ndarray:
    """Deterministic non-overlapping windows of the validation split: no target is scored twice."""
    rows = min(max(1, tokens // length), (n_tokens - 1) // length)
    return np.arange(rows) * length


def shard(rows: int, rank: int, world: int) -> slice:
    """This rank's contiguous share of ``rows`` (shares differ by at most one row)."""
    return slice(rank * rows // world, (rank + 1) * rows // world)


def micro_batches(rows: int, world: int, rows_per_micro: int) -> int:
    """Micro-batches per rank for a step; the same on every rank so collective calls stay in step."""
    most = -(-rows // world)  # the largest rank share
    return -(-most // rows_per_micro)


def rank_batches(stream: np.ndarray, offsets: np.ndarray, length: int, micro_tokens: int,
                 rank: int, world: int) -> list[np.ndarray]:
    """This rank's micro-batches of (rows, L+1) windows, from the global batch's window ``offsets``.

    The global batch is fixed by the step; ranks take contiguous shares and cut
    them into equally many micro-batches (one may be empty when a share is
    smaller than the count).
    """
    rows = offsets.size
    windows = gather_windows(stream, offsets[shard(rows, rank, world)], length)
    return np.array_split(windows, micro_batches(rows, world, max(1, micro_tokens // length)))
