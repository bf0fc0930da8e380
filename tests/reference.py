"""A small single-process reference for the token stream, independent of raytrain's preparation code.

The stream is defined by the inputs alone: files in sorted path order (a
datasets directory: its data files in state.json order), records in file order,
every non-empty document's ids followed by the end-of-text token. Text files
are one document each, decoded as UTF-8 with undecodable bytes replaced.
"""
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SUFFIXES = {".txt", ".md", ".py", ".rst", ".text", ".jsonl", ".parquet"}


def files_of(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if (path / "state.json").is_file():
        return [path / f["filename"] for f in json.loads((path / "state.json").read_text())["_data_files"]]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)


def documents(path: Path, field: str):
    for file in files_of(path):
        if file.suffix == ".jsonl":
            for line in file.read_bytes().decode("utf-8", errors="replace").splitlines():
                if line.strip():
                    yield json.loads(line)[field]
        elif file.suffix == ".parquet":
            yield from pq.read_table(file).column(field).to_pylist()
        elif file.suffix == ".arrow":
            with pa.OSFile(str(file)) as f:
                yield from pa.ipc.open_stream(f).read_all().column(field).to_pylist()
        else:
            yield file.read_bytes().decode("utf-8", errors="replace")


def reference_stream(path: Path, tokenizer, field: str = "text") -> np.ndarray:
    ids = []
    for text in documents(path, field):
        if text:
            ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return np.asarray(ids, dtype=np.int64)


def split(stream: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    n_val = max(1, int(stream.size * val_fraction))
    return stream[:-n_val], stream[-n_val:]
