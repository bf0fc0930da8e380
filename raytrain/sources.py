"""The corpus's inputs: which files, in which order, cut into parts, and the documents each part holds.

The token stream is defined by the inputs alone, never by how it is prepared:
files in sorted path order, records in file order, every document followed by
the end-of-text token. Files are cut into *parts* (a byte range of a .jsonl file
starting at a line, a Parquet row group, a datasets Arrow file, a whole text
file) that can be read independently, in any process, on any node: the
preparation tasks each read a run of consecutive parts. Paths are local paths
or URIs that pyarrow's filesystems understand (``file://``, ``s3://``, ...).
"""
from __future__ import annotations

import json
import sysconfig
from dataclasses import dataclass
from typing import Iterator, Optional

from raytrain.section import ConfigError, Problem

TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".text"}
RECORD_SUFFIXES = {".jsonl", ".parquet"}
SUPPORTED = ", ".join(sorted(TEXT_SUFFIXES | RECORD_SUFFIXES))
BUILTIN_BYTES = 6_000_000  # enough for a few hundred tiny-model steps without repeating much
JSONL_PART_BYTES = 4 * 2**20  # a .jsonl file is cut into parts of about this many bytes (tasks balance by parts)


@dataclass(frozen=True)
class Part:
    """An independently readable piece of one input file."""
    path: str
    kind: str  # text | jsonl | parquet | arrow
    size: int  # input bytes (for grouping parts into tasks and for MB/s)
    start: int = 0  # jsonl: first byte of the range; parquet: row group
    end: int = 0  # jsonl: end of the range (a line belongs to the part holding its first byte)


def _filesystem(path: str):
    from pathlib import Path

    import pyarrow.fs as pafs
    if "://" not in path:
        path = str(Path(path).expanduser().absolute())
    return pafs.FileSystem.from_uri(path)


def builtin_files() -> list[str]:
    """The built-in corpus: this Python's standard-library sources, sorted, up to BUILTIN_BYTES.

    It exists on every machine that runs raytrain and is the same for a given Python version.
    """
    from pathlib import Path
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__", "turtledemo"}
    files, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if skip & set(path.relative_to(root).parts) or not path.is_file():
            continue
        files.append(str(path))
        total += path.stat().st_size
        if total >= BUILTIN_BYTES:
            break
    return files


def list_files(path: Optional[str]) -> list[tuple[str, int, int]]:
    """(path, size, mtime_ns) of every input file, in stream order; raises ConfigError when there are none."""
    import pyarrow.fs as pafs
    if path is None:
        return [(p, *_stat(p)) for p in builtin_files()]
    fs, root = _filesystem(path)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise ConfigError([("data.path", path, "does not exist; give a file, a directory or a URI")])
    prefix = path[: len(path) - len(root)] if "://" in path else ""
    if info.type == pafs.FileType.File:
        found = [info]
    elif fs.get_file_info(f"{root}/dataset_dict.json").type == pafs.FileType.File:
        raise ConfigError([("data.path", path, "is a Hugging Face DatasetDict; point data.path at one split's "
                                               "directory (for example PATH/train)")])
    elif fs.get_file_info(f"{root}/state.json").type == pafs.FileType.File:  # datasets' save_to_disk
        with fs.open_input_stream(f"{root}/state.json") as f:
            names = [d["filename"] for d in json.loads(f.read())["_data_files"]]
        found = fs.get_file_info([f"{root}/{name}" for name in names])
    else:
        found = sorted((i for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                        if i.type == pafs.FileType.File and _kind(i.path)), key=lambda i: i.path)
    files = [(prefix + i.path, i.size, i.mtime_ns or 0) for i in found if i.type == pafs.FileType.File]
    if not files:
        raise ConfigError([("data.path", path, f"holds no input files ({SUPPORTED} or a datasets directory)")])
    return files


def _stat(path: str) -> tuple[int, int]:
    import os
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _kind(path: str) -> Optional[str]:
    suffix = "." + path.rsplit(".", 1)[-1].lower() if "." in path.rsplit("/", 1)[-1] else ""
    if suffix in TEXT_SUFFIXES:
        return "text"
    return {".jsonl": "jsonl", ".parquet": "parquet", ".arrow": "arrow"}.get(suffix)


def source_problems(path: Optional[str], key: str) -> list[Problem]:
    """What is wrong with ``data.path`` as far as listing it tells (its records are checked as they are read)."""
    if path is None:
        return []
    try:
        files = list_files(path)
    except ConfigError as err:
        return err.problems
    except OSError as err:  # unreadable, or a filesystem pyarrow cannot reach
        return [(key, path, f"cannot be listed: {err}")]
    if len(files) == 1 and _kind(files[0][0]) is None:
        return [(key, path, f"is not a supported file ({SUPPORTED})")]
    if sum(size for _, size, _ in files) == 0:
        return [(key, path, "is empty")]
    return []


def parts(files: list[tuple[str, int, int]]) -> list[Part]:
    """Cut the files into independently readable parts, in stream order."""
    out = []
    for path, size, _ in files:
        kind = _kind(path) or "text"
        if kind == "jsonl":
            cuts = list(range(0, size, JSONL_PART_BYTES)) or [0]
            out += [Part(path, kind, min(size, b + JSONL_PART_BYTES) - b, b, min(size, b + JSONL_PART_BYTES))
                    for b in cuts]
        elif kind == "parquet":
            import pyarrow.parquet as pq
            fs, local = _filesystem(path)
            meta = pq.ParquetFile(fs.open_input_file(local)).metadata
            out += [Part(path, kind, meta.row_group(g).total_byte_size, g) for g in range(meta.num_row_groups)]
        else:
            out.append(Part(path, kind, size))
    return out


class Counts:
    """What reading replaced or skipped: undecodable bytes and empty documents."""

    def __init__(self):
        self.replaced = 0
        self.empty = 0

    def decode(self, data: bytes) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            text = data.decode("utf-8", errors="replace")
            self.replaced += text.count("\ufffd") - data.count("\ufffd".encode())
            return text


def documents(part: Part, text_field: str, counts: Counts) -> Iterator[str]:
    """The documents of one part, in order; empty ones are skipped (and counted)."""
    for text in _texts(part, text_field, counts):
        if text:
            yield text
        else:
            counts.empty += 1


def _texts(part: Part, text_field: str, counts: Counts) -> Iterator[str]:
    fs, local = _filesystem(part.path)
    if part.kind == "text":
        with fs.open_input_stream(local) as f:
            yield counts.decode(f.read())
    elif part.kind == "jsonl":
        yield from _jsonl(fs, local, part, text_field, counts)
    elif part.kind == "parquet":
        import pyarrow.parquet as pq
        pf = pq.ParquetFile(fs.open_input_file(local))
        if text_field not in pf.schema_arrow.names:
            raise ConfigError([("data.text_field", text_field,
                                f"missing in {part.path}; its columns: {pf.schema_arrow.names}")])
        first = sum(pf.metadata.row_group(g).num_rows for g in range(part.start))
        yield from _column(pf.read_row_group(part.start, columns=[text_field]).column(0), part.path, first,
                           text_field)
    else:  # a datasets Arrow file: an IPC stream of record batches
        import pyarrow as pa
        with fs.open_input_stream(local) as f:
            reader = pa.ipc.open_stream(f)
            if text_field not in reader.schema.names:
                raise ConfigError([("data.text_field", text_field,
                                    f"missing in {part.path}; its columns: {reader.schema.names}")])
            row = 0
            for batch in reader:
                yield from _column(batch.column(text_field), part.path, row, text_field)
                row += batch.num_rows


def _column(column, path: str, first_row: int, text_field: str) -> Iterator[str]:
    for i, text in enumerate(column.to_pylist()):
        if not isinstance(text, str):
            raise ConfigError([("data.text_field", text_field,
                                f"row {first_row + i} of {path} holds {text!r}, not text; fix or drop that row")])
        yield text


def _jsonl(fs, local: str, part: Part, text_field: str, counts: Counts) -> Iterator[str]:
    import io
    with fs.open_input_file(local) as raw:
        position = part.start
        raw.seek(max(0, position - 1))
        f = io.BufferedReader(raw, buffer_size=1 << 20)
        if position > 0:  # the line holding the byte before our start belongs to the part before
            position += len(f.readline()) - 1
        while position < part.end:
            line = f.readline()
            if not line:
                break
            where, position = position, position + len(line)
            if not line.strip():
                continue
            try:
                record = json.loads(counts.decode(line))
            except ValueError as err:
                raise ConfigError([("data.path", part.path, f"line {_line_number(fs, local, where)} is not JSON "
                                                            f"({err}); fix or drop it")]) from None
            if not isinstance(record, dict) or text_field not in record:
                fields = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ConfigError([("data.text_field", text_field, f"missing in {part.path} line "
                                    f"{_line_number(fs, local, where)}; its fields: {fields}")])
            text = record[text_field]
            if not isinstance(text, str):
                raise ConfigError([("data.text_field", text_field, f"{part.path} line "
                                    f"{_line_number(fs, local, where)} holds {text!r}, not text")])
            yield text


def _line_number(fs, local: str, offset: int) -> int:
    """1-based number of the line starting at byte ``offset`` (counted only to report an error)."""
    with fs.open_input_stream(local) as f:
        return f.read(offset).count(b"\n") + 1
