"""The prepared corpus read as one token stream, and the windows a step trains on.

``raytrain prepare`` (``prepare.py``) writes shards and ``index.json``; here the
train and validation shards are memory-mapped and read as one stream each, so a
window may cross a shard boundary exactly as it would cross a document's end.
A step's batch is ``rows`` windows of ``L + 1`` tokens: inputs are the first
``L``, targets the last ``L``. Nothing is padded. Workers only open the stream;
they never tokenize.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raytrain.lengths import step_rng
from raytrain.section import ConfigError

WINDOW_STREAM = 2  # step_rng stream for window offsets (lengths use stream 1)


class TokenStream:
    """Shards (memory-mapped flat arrays) read as one stream of ``size`` tokens."""

    def __init__(self, shards: list[np.ndarray]):
        self.shards = [s for s in shards if s.size]
        self.starts = np.cumsum([0] + [s.size for s in self.shards])  # (shards + 1,) stream offsets
        self.size = int(self.starts[-1])

    def __getitem__(self, span: slice) -> np.ndarray:
        """Tokens ``[start, stop)`` of the stream, across shard boundaries."""
        start, stop, _ = span.indices(self.size)
        pieces = []
        for i in range(np.searchsorted(self.starts, start, side="right") - 1, len(self.shards)):
            lo, hi = max(start, self.starts[i]), min(stop, self.starts[i + 1])
            if lo >= hi:
                break
            pieces.append(self.shards[i][lo - self.starts[i]:hi - self.starts[i]])
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)

    def windows(self, offsets: np.ndarray, length: int) -> np.ndarray:
        """(rows, L + 1) int64 windows starting at ``offsets``."""
        offsets = np.asarray(offsets, dtype=np.int64)
        out = np.empty((offsets.size, length + 1), dtype=np.int64)
        first = np.searchsorted(self.starts, offsets, side="right") - 1
        last = np.searchsorted(self.starts, offsets + length, side="right") - 1
        within = np.arange(length + 1)
        for i in np.unique(first):
            rows = np.nonzero((first == i) & (last == i))[0]
            if rows.size:
                out[rows] = self.shards[i][(offsets[rows] - self.starts[i])[:, None] + within]
        for row in np.nonzero(first != last)[0]:  # the few windows that cross a shard boundary
            out[row] = self[offsets[row]:offsets[row] + length + 1]
        return out


@dataclass
class Corpus:
    """The prepared corpus: train and validation streams and what ``index.json`` says of them."""
    train: TokenStream
    val: TokenStream
    directory: Path
    index: dict


def open_corpus(directory: Path, cache_dir: str = "") -> Corpus:
    """Memory-map a prepared corpus. A worker that cannot see it (a node-local ``data.cache_dir`` on a
    multi-node cluster) is refused before step 1."""
    directory = Path(directory)
    if not (directory / "index.json").is_file():
        raise ConfigError([("data.cache_dir", cache_dir or str(directory.parent.parent),
                            f"the prepared corpus {directory} is not visible on this node; data.cache_dir must "
                            f"be a path every node shares (a shared volume or network file system)")])
    index = json.loads((directory / "index.json").read_text())
    dtype = np.dtype(index["dtype"]).newbyteorder("<")

    def stream(split: str) -> TokenStream:
        return TokenStream([np.memmap(directory / s["path"], dtype=dtype, mode="r", shape=(s["tokens"],))
                            for s in index[split]])
    return Corpus(train=stream("train"), val=stream("val"), directory=directory, index=index)


def open_prepared(data, tokenizer_spec: str, say=print) -> Corpus:
    """Prepare the corpus of ``data`` if it is not yet (Ray Data), then open it."""
    from raytrain.prepare import prepare
    return open_corpus(prepare(data, tokenizer_spec, say), data.cache_dir)


def check_corpus(corpus: Corpus, longest_train: int, eval_lengths: list[int]) -> None:
    """Every split must hold at least one window of each length it is used at."""
    problems = []
    if corpus.train.size < longest_train + 1:
        problems.append(("data.path", corpus.index["source"],
                         f"the train split has {corpus.train.size} tokens, fewer than one window of "
                         f"lengths.max + 1 = {longest_train + 1}; add data or lower lengths.max"))
    for length in eval_lengths:
        if corpus.val.size < length + 1:
            problems.append(("eval.lengths", length,
                             f"the validation split has {corpus.val.size} tokens, fewer than one window of "
                             f"{length + 1}; add data, raise data.val_fraction or lower the length"))
    if problems:
        raise ConfigError(problems)


# --- where windows start ------------------------------------------------------

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
