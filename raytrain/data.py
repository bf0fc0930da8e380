"""The prepared corpus read as one token stream, and the windows a step trains on.

``raytrain prepare`` (``prepare.py``) writes shards and ``index.json``; here the
train and validation shards are memory-mapped and read as one stream each, so a
window may cross a shard boundary exactly as it would cross a document's end.
A step's batch is ``rows`` windows of ``L + 1`` tokens (where they start is the
step plan's: ``steps``): inputs are the first ``L``, targets the last ``L``.
Nothing is padded. Workers only open the stream; they never tokenize.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raytrain.section import ConfigError
from raytrain.steps import Planner, StepPlan


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


class ReadAhead:
    """``reader(step) -> (StepPlan, this rank's micro-batches)``, the windows of the next ``depth`` steps read by
    a background thread while the current step trains. Reading is memory-mapped I/O and numpy copies (the GIL is
    released), so on a network file system, where random windows of a large corpus never stay in the page cache,
    the step does not wait for them; the plan is a pure function of the step, so what is read ahead is exactly
    what the step would have read. ``depth`` 0 reads each step's windows when it starts."""

    def __init__(self, plan: Planner, stream: TokenStream, rank: int, depth: int):
        self.plan, self.stream, self.rank, self.depth = plan, stream, rank, depth
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead") if depth else None
        self.pending: dict = {}

    def read(self, step: int) -> tuple[StepPlan, list[np.ndarray]]:
        planned = self.plan(step)
        return planned, planned.rank_batches(self.stream, self.rank)

    def __call__(self, step: int) -> tuple[StepPlan, list[np.ndarray]]:
        if not self.depth:
            return self.read(step)
        for ahead in range(step, min(step + self.depth + 1, self.plan.train.max_steps)):
            if ahead not in self.pending:
                self.pending[ahead] = self.pool.submit(self.read, ahead)
        return self.pending.pop(step).result()
