"""Corpus preparation at two sizes: throughput, and memory that must not grow with the corpus.

Makes two deterministic synthetic JSONL corpora (about 200 MB and 2 GB by
default, files of 64 MB), then measures in one script, one Ray instance:

- the previous release's single-process tokenization (the driver read every
  document, tokenized in batches of 256 and concatenated the whole stream in
  memory before writing it), on the small corpus only: it holds about 4 bytes
  per token in one process, which is the problem this replaces;
- ``raytrain prepare`` (Ray Data tasks streaming shards) on both corpora.

Memory is sampled every 0.2 s over the whole process tree (this process, Ray's
daemons and its workers): the proportional set size (PSS) summed over the tree
(shared pages counted once in all), and the largest single process's PSS. Prints
a Markdown table and the ratios the README quotes.

    python bench/prepare.py [--small-mb 200] [--large-mb 2048] [--dir /tmp/raytrain-bench-prepare]
"""
from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import psutil

WORDS = ("the of and to in is was for on that with as by at from his it an were are which this be or has had "
         "not but first one their its new after who they have her she two been other when there all during into "
         "school time may years more most only over city some world would where later up such used many can state "
         "about national out known university united then made def return class import self value data train ray "
         "é ü 日本 → ∑").split()


def make_corpus(directory: Path, megabytes: int, seed: int) -> int:
    """Deterministic JSONL files of about 64 MB each; returns the bytes written."""
    if (directory / "done.json").is_file():
        return json.loads((directory / "done.json").read_text())["bytes"]
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    vocab = np.array(WORDS)
    pool = [json.dumps({"text": " ".join(vocab[rng.integers(0, len(vocab), rng.integers(30, 700))]),
                        "source": "synthetic"}, ensure_ascii=False) + "\n" for _ in range(4000)]
    written, file_index, target = 0, 0, megabytes * 2**20
    while written < target:
        with open(directory / f"part-{file_index:04d}.jsonl", "w", encoding="utf-8") as f:
            size = 0
            for i in rng.integers(0, len(pool), 200_000):
                line = pool[i]
                f.write(line)
                size += len(line.encode())
                if size >= 64 * 2**20 or written + size >= target:
                    break
        written, file_index = written + size, file_index + 1
    (directory / "done.json").write_text(json.dumps({"bytes": written}))
    return written


class PeakMemory:
    """Peak PSS summed over this process tree, and the largest single process's PSS, sampled in a thread."""

    def __init__(self):
        self.total = self.largest = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self):
        root = psutil.Process(os.getpid())
        while not self._stop.is_set():
            total = largest = 0
            for proc in [root, *root.children(recursive=True)]:
                try:
                    pss = proc.memory_full_info().pss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                total, largest = total + pss, max(largest, pss)
            self.total, self.largest = max(self.total, total), max(self.largest, largest)
            time.sleep(0.2)


def previous_single_process(source: Path, out: Path) -> None:
    """The previous release's driver-side tokenization (kept here as the baseline, not in the package)."""
    from raytrain.tokenizer import load_tokenizer
    tokenizer = load_tokenizer("bytes")
    separator = [tokenizer.eos_token_id]
    chunks, batch = [], []

    def flush():
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            chunks.append(np.asarray(ids + separator, dtype=np.uint16))
        batch.clear()

    for path in sorted(source.glob("*.jsonl")):
        with path.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    batch.append(json.loads(line)["text"])
                    if len(batch) == 256:
                        flush()
    flush()
    stream = np.concatenate(chunks)
    n_val = max(1, int(stream.size * 0.02))
    out.mkdir(parents=True, exist_ok=True)
    stream[:-n_val].tofile(out / "train.bin")
    stream[-n_val:].tofile(out / "val.bin")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small-mb", type=int, default=200)
    parser.add_argument("--large-mb", type=int, default=2048)
    parser.add_argument("--dir", default="/tmp/raytrain-bench-prepare")
    args = parser.parse_args()

    import shutil

    import ray

    from raytrain.loading import load_config
    from raytrain.prepare import prepare
    root = Path(args.dir)
    sizes = {"small": make_corpus(root / "small", args.small_mb, 0), "large": make_corpus(root / "large",
                                                                                           args.large_mb, 1)}
    rows = {}
    with PeakMemory() as memory:
        start = time.perf_counter()
        previous_single_process(root / "small", root / "previous")
        seconds = time.perf_counter() - start
    rows["previous release, single process (small)"] = (sizes["small"], seconds, memory.total, memory.largest)
    shutil.rmtree(root / "previous")

    ray.init(num_cpus=os.cpu_count(), log_to_driver=False)
    time.sleep(5)
    with PeakMemory() as idle:
        time.sleep(3)
    for name in ("small", "large"):
        shutil.rmtree(root / f"cache-{name}", ignore_errors=True)
        data = load_config(None, [f"data.path={root / name}", f"data.cache_dir={root / f'cache-{name}'}"],
                           only=("data", "tokenizer")).data
        with PeakMemory() as memory:
            start = time.perf_counter()
            prepare(data, "bytes")
            seconds = time.perf_counter() - start
        rows[f"raytrain prepare ({name})"] = (sizes[name], seconds, memory.total, memory.largest)

    print(f"\n{os.cpu_count()} CPUs; idle Ray: {idle.total / 2**30:.2f} GiB PSS over its processes\n")
    print("| run | input | MB/s | peak PSS, whole tree | largest process (PSS) |\n|---|---:|---:|---:|---:|")
    for name, (size, seconds, total, largest) in rows.items():
        print(f"| {name} | {size / 1e6:,.0f} MB | {size / 1e6 / seconds:,.1f} | {total / 2**30:.2f} GiB | "
              f"{largest / 2**30:.2f} GiB |")
    small, large = rows["raytrain prepare (small)"], rows["raytrain prepare (large)"]
    previous = rows["previous release, single process (small)"]
    print(f"\npeak PSS large / small: {large[2] / small[2]:.2f} (goal <= 1.25; large under 2 GiB: "
          f"{large[2] < 2 * 2**30})")
    print(f"throughput raytrain prepare / previous single process, small corpus: "
          f"{(small[0] / small[1]) / (previous[0] / previous[1]):.2f}x (goal >= 1.5)")


if __name__ == "__main__":
    main()
