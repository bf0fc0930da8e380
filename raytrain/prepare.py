"""``raytrain prepare``: tokenize a corpus of any size with Ray Data into token shards and ``index.json``.

The inputs are cut into parts (``sources``); consecutive parts are grouped into
units of about ``data.shard_bytes`` of input, and Ray Data's streaming executor runs
one task per unit on any node: it reads its parts, tokenizes in batches of about
a million characters with the fast tokenizer and streams the ids into its own
shard file. No process ever
holds more than one batch of one unit, so memory stays flat in the corpus size.
The driver only sees each unit's counts, puts the shards in stream order, cuts
the validation tail and writes the index.

Crash safety: shards are written into ``tokens/<key>.partial/`` (each renamed
into place when whole, with a small JSON of its counts), under an exclusive lock
on ``tokens/<key>.lock``; a rerun keeps the whole shards and redoes the rest.
The finished directory is renamed to ``tokens/<key>/`` in one step, after its
``index.json`` is written: a directory named by its key is always complete.

The format (``index.json``, documented in the README) is open: each shard is a
flat little-endian array of token ids of the index's dtype.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np

from raytrain import console
from raytrain.data import Corpus, open_corpus
from raytrain.section import ConfigError
from raytrain.sources import Counts, Part, documents, list_files, parts
from raytrain.tokenizer import load_tokenizer, tokenizer_fingerprint

FORMAT = "raytrain-tokens/1"
BATCH_CHARS = 2**20  # characters tokenized per call: bounds a task's memory (the encodings of a batch) and
# is large enough that the tokenizer's per-call cost vanishes


def corpus_key(data, files: list[tuple[str, int, int]], fingerprint: str) -> str:
    """The cache key: the inputs (paths, sizes, modification times), how they are read, and the tokenizer."""
    return hashlib.sha256(json.dumps({
        "format": FORMAT, "files": files, "text_field": data.text_field, "val_fraction": data.val_fraction,
        "tokenizer": fingerprint, "python": sys.version if data.path is None else None,
    }).encode()).hexdigest()[:20]


def prepare(data, tokenizer_spec: str, say=console.say) -> Path:
    """Prepare the corpus of ``data`` (a DataConfig) unless it is already; return its directory.

    Needs Ray (it starts a local instance when none is running); every problem
    with the inputs raises ConfigError and leaves no complete-looking directory.
    """
    tokenizer = load_tokenizer(tokenizer_spec)
    if tokenizer.eos_token_id is None:
        raise ConfigError([("tokenizer", tokenizer_spec, "has no end-of-text (eos) token to separate documents")])
    files = list_files(data.path)
    final = cache_path(data, files, tokenizer)
    if (final / "index.json").is_file():
        return found(final, say)
    final.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(final.with_suffix(".lock"), say):
        if (final / "index.json").is_file():  # another command finished it while we waited
            return found(final, say)
        started = time.time()
        all_parts = parts(files)
        units = group(all_parts, data.shard_bytes or auto_shard_bytes(sum(p.size for p in all_parts)))
        partial = final.with_suffix(".partial")
        plan = hashlib.sha256(json.dumps(units).encode()).hexdigest()
        if (partial / "plan.txt").is_file() and (partial / "plan.txt").read_text() != plan:
            shutil.rmtree(partial)  # cut differently: nothing in it can be reused
        partial.mkdir(exist_ok=True)
        (partial / "plan.txt").write_text(plan)
        dtype = np.dtype("<u2" if len(tokenizer) <= 2**16 else "<u4")
        try:
            metas = run_units(units, partial, data.text_field, tokenizer, dtype.str, say)
            summary = write_index(metas, partial, data, tokenizer_spec, tokenizer, dtype)
        except ConfigError:  # a bad input: its fix changes the key, so nothing here is worth keeping
            shutil.rmtree(partial, ignore_errors=True)
            raise
        partial.rename(final)
    seconds = time.time() - started
    size = sum(m["bytes"] for m in metas)
    notes = "".join(f", {summary[k]:,} {label}" for k, label in (("replaced_characters", "undecodable bytes "
                    "replaced"), ("empty_documents", "empty documents skipped")) if summary[k])
    say(f"prepared {summary['documents']:,} documents, {summary['tokens']:,} tokens "
        f"({summary['train_tokens']:,} train, {summary['val_tokens']:,} val) from {size / 1e6:,.1f} MB in "
        f"{seconds:,.1f} s ({size / 1e6 / max(seconds, 1e-9):,.1f} MB/s), "
        f"{len(summary['train']) + len(summary['val'])} shards{notes}, in {final}")
    return final


def cache_path(data, files: list[tuple[str, int, int]], tokenizer) -> Path:
    return Path(data.cache_dir).expanduser().absolute() / "tokens" / corpus_key(data, files,
                                                                              tokenizer_fingerprint(tokenizer))


def corpus_directory(data, tokenizer_spec: str) -> Path | None:
    """Where the corpus of ``data`` is prepared, when it is (for raytrain doctor); None when it is not yet."""
    directory = cache_path(data, list_files(data.path), load_tokenizer(tokenizer_spec))
    return directory if (directory / "index.json").is_file() else None


def found(directory: Path, say) -> Path:
    index = json.loads((directory / "index.json").read_text())
    say(f"prepared corpus found: {index['documents']:,} documents, {index['tokens']:,} tokens, in {directory}")
    return directory


def auto_shard_bytes(total: int) -> int:
    """About 16 tasks, each 16 MiB to 256 MiB: large enough that a task's start-up (about 0.15 s) is small
    against its work, small enough to spread a corpus over a cluster (a 40 GB corpus is 160 tasks).

    A function of the input alone, so a resumed prepare cuts the same units.
    """
    return min(256 * 2**20, max(16 * 2**20, total // 16))


def group(all_parts: list[Part], unit_bytes: int) -> list[list[dict]]:
    """Consecutive parts grouped into units of about ``unit_bytes`` of input (at least one part each)."""
    units, current, size = [], [], 0
    for part in all_parts:
        current.append(part.__dict__)
        size += part.size
        if size >= unit_bytes:
            units.append(current)
            current, size = [], 0
    return units + ([current] if current else [])


@contextmanager
def exclusive(path: Path, say):
    """An exclusive lock the OS drops when its holder dies, so a killed prepare never blocks the next."""
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another command preparing the same corpus ({path})")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_units(units: list[list[dict]], partial: Path, text_field: str, tokenizer, dtype: str, say) -> list[dict]:
    """Tokenize every unit not already whole in ``partial`` with Ray Data tasks; their counts in stream order."""
    import ray
    from tqdm import tqdm

    metas = {i: done for i in range(len(units)) if (done := finished_unit(partial, i, dtype)) is not None}
    todo = [{"index": i, "parts": json.dumps(unit)} for i, unit in enumerate(units) if i not in metas]
    if todo:
        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=False)
        import ray.data
        ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts input bytes
        total = sum(p["size"] for i in range(len(units)) if i not in metas for p in units[i])
        if metas:
            say(f"resuming: {len(metas)} of {len(units)} units already tokenized")
        tasks = ray.data.from_items(todo, override_num_blocks=len(todo)).map_batches(
            tokenize_units, batch_size=1, num_cpus=1,
            # The tokenizer travels as its own JSON: tasks load it with the tokenizers library alone (no
            # transformers import per worker) and it is exactly the one the cache key's fingerprint names.
            fn_kwargs={"partial": str(partial), "text_field": text_field, "dtype": dtype,
                       "tokenizer_json": tokenizer.backend_tokenizer.to_str(), "eot": tokenizer.eos_token_id},
            # Two encoding threads per one-CPU task: a task spends a third of its time in Python (reading, JSON,
            # ids to numpy), and its second thread fills that gap on the core a neighbour leaves idle
            # (measured on 2 cores, 200 MB: 7.2 MB/s with one thread, 8.9 MB/s with two).
            runtime_env={"env_vars": {"RAYON_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "true"}})
        with tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", file=console.stream()) as bar:
            for row in tasks.iter_rows():
                meta = json.loads(row["meta"])
                if "problems" in meta:  # a bad input, found by the task reading it
                    raise ConfigError([tuple(problem) for problem in meta["problems"]])
                metas[meta["index"]] = meta
                bar.update(meta["bytes"])
    ordered = [metas[i] for i in range(len(units))]
    for meta in ordered:  # written by a task on another node to a path not shared with this one?
        if finished_unit(partial, meta["index"], dtype) is None:
            raise ConfigError([("data.cache_dir", str(partial.parent.parent.parent),
                                f"the shard of unit {meta['index']}, written on node {meta['node']}, is not "
                                f"visible here: data.cache_dir must be a path every node shares")])
    return ordered


def shard_name(index: int) -> str:
    return f"unit-{index:06d}.bin"


def finished_unit(partial: Path, index: int, dtype: str) -> Optional[dict]:
    """The counts of a unit whose shard is whole on disk, or None."""
    meta_path = partial / f"unit-{index:06d}.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    shard = partial / shard_name(index)
    if not shard.is_file() or shard.stat().st_size != meta["tokens"] * np.dtype(dtype).itemsize:
        return None
    return meta


def tokenize_units(batch: dict, partial: str, text_field: str, tokenizer_json: str, eot: int, dtype: str) -> dict:
    """Ray Data task: tokenize each unit of ``batch`` into its shard; return its counts (or the input's problems,
    as data: Ray's exception wrappers would bury the message under a traceback)."""
    try:
        tokenizer = _cached_tokenizer(tokenizer_json)
        return {"meta": [json.dumps(tokenize_unit(int(index), json.loads(unit), partial, text_field, tokenizer, eot,
                                                  dtype)) for index, unit in zip(batch["index"], batch["parts"])]}
    except ConfigError as err:
        return {"meta": [json.dumps({"problems": err.problems})]}


def tokenize_unit(index: int, unit: list[dict], partial: str, text_field: str, tokenizer, eot: int,
                  dtype: str) -> dict:
    """Read one unit's parts, tokenize in batches and stream the ids into its shard; its counts."""
    import ray
    counts, tokens, docs, size = Counts(), 0, 0, 0
    shard = Path(partial) / shard_name(index)
    scratch = shard.with_name(f"{shard.name}.{os.getpid()}.tmp")
    try:
        with open(scratch, "wb") as f:
            for spec in unit:
                part = Part(**spec)
                size += part.size
                texts, chars = [], 0
                for text in documents(part, text_field, counts):
                    texts.append(text)
                    chars += len(text)
                    if chars >= BATCH_CHARS:
                        tokens += _write(f, tokenizer, texts, eot, dtype)
                        docs, texts, chars = docs + len(texts), [], 0
                tokens += _write(f, tokenizer, texts, eot, dtype)
                docs += len(texts)
    except BaseException:
        scratch.unlink(missing_ok=True)
        raise
    scratch.rename(shard)  # whole, then its counts: a shard with counts is complete
    meta = {"index": index, "tokens": tokens, "documents": docs, "bytes": size, "replaced": counts.replaced,
            "empty": counts.empty, "node": ray.get_runtime_context().get_node_id()[:12]}
    (Path(partial) / f"unit-{index:06d}.json").write_text(json.dumps(meta))
    return meta


def _write(f, tokenizer, texts: list[str], eot: int, dtype: str) -> int:
    """Tokenize ``texts`` (one call) and append their ids, each document followed by ``eot``."""
    if not texts:
        return 0
    flat = []
    # encode_batch_fast skips the character offsets we never use: 1.5x the speed of encode_batch (same ids)
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    for encoding in encode(texts, add_special_tokens=False):
        flat.extend(encoding.ids)
        flat.append(eot)
    f.write(np.asarray(flat, dtype=dtype).tobytes())
    return len(flat)


_TOKENIZERS: dict = {}


def _cached_tokenizer(tokenizer_json: str):
    """A ``tokenizers.Tokenizer`` from its JSON, built once per worker process (Ray reuses them)."""
    key = hashlib.sha256(tokenizer_json.encode()).hexdigest()
    if key not in _TOKENIZERS:
        from tokenizers import Tokenizer
        _TOKENIZERS[key] = Tokenizer.from_str(tokenizer_json)
    return _TOKENIZERS[key]


def write_index(metas: list[dict], directory: Path, data, tokenizer_spec: str, tokenizer, dtype: np.dtype) -> dict:
    """Cut the validation tail (the last ``val_fraction`` of the stream) and write ``index.json``."""
    total = sum(m["tokens"] for m in metas)
    if total == 0:
        raise ConfigError([("data.path", data.path, "contains no text (every document is empty)")])
    n_val = max(1, int(total * data.val_fraction))
    train, val, left = [], [], n_val
    for meta in reversed(metas):
        name, count = shard_name(meta["index"]), meta["tokens"]
        if count == 0:
            continue
        if left >= count:  # wholly validation
            val.insert(0, {"path": name, "tokens": count})
            left -= count
        elif left > 0:  # the boundary shard: its tail becomes a validation shard of its own
            tail = np.memmap(directory / name, dtype=dtype, mode="r")[count - left:]
            tail.tofile(directory / "val-tail.bin")
            del tail
            os.truncate(directory / name, (count - left) * dtype.itemsize)
            val.insert(0, {"path": "val-tail.bin", "tokens": left})
            train.insert(0, {"path": name, "tokens": count - left})
            left = 0
        else:
            train.insert(0, {"path": name, "tokens": count})
    index = {
        "format": FORMAT, "dtype": dtype.name, "byte_order": "little", "eot": tokenizer.eos_token_id,
        "vocab_size": len(tokenizer), "tokenizer": tokenizer_spec, "tokenizer_fingerprint": tokenizer_fingerprint(
            tokenizer), "source": data.path or "builtin: Python standard library", "text_field": data.text_field,
        "documents": sum(m["documents"] for m in metas), "tokens": total, "train_tokens": total - n_val,
        "val_tokens": n_val, "empty_documents": sum(m["empty"] for m in metas),
        "replaced_characters": sum(m["replaced"] for m in metas), "train": train, "val": val}
    (directory / "index.json").write_text(json.dumps(index, indent=1))
    return index


def open_prepared(data, tokenizer_spec: str, say=console.say) -> Corpus:
    """Prepare the corpus of ``data`` if it is not yet (Ray Data), then open it."""
    return open_corpus(prepare(data, tokenizer_spec, say), data.cache_dir)
