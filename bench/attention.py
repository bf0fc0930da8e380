"""Document masking (``data.cross_documents: false``) without an L x L mask, against transformers' masked SDPA.

One process, 2 CPU threads, the built-in model and corpus, the same windows for
both: forward and backward of one micro-batch of ``--tokens`` tokens at each
length, on the corpus's own documents (Python source files: long) and on the same
windows cut into ``--short``-token documents, with

- transformers' SDPA, which turns restarting position ids into a (rows, 1, L, L)
  mask (the path before ``raytrain.attention``), and
- ``raytrain.attention.document_attention``: one SDPA call for the rows that hold
  a single document, one per document in the others; no mask.

Prints seconds per micro-batch (median of ``--repeats``), the ratio mask / documents
(above 1: the new path is faster) and the mask's size, which the new path never
allocates. On a GPU the new path is one FlashAttention-2 varlen call instead.

    python bench/attention.py [--lengths 256 1024 4096] [--tokens 8192] [--repeats 5] [--short 100]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time


def seconds(model, windows, eot: int, repeats: int) -> float:
    from raytrain.loss import window_loss
    times = []
    for _ in range(repeats + 1):  # the first call is a warm-up
        start = time.perf_counter()
        window_loss(model, windows, eot).backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per micro-batch at every length")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--short", type=int, default=100, help="the short-document case: an end-of-text every N")
    args = parser.parse_args()

    import torch

    from raytrain.attention import use_document_attention
    from raytrain.loading import load_config
    from raytrain.model import build_model
    from raytrain.prepare import open_prepared
    from raytrain.steps import random_offsets

    torch.set_num_threads(2)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, [f"data.cache_dir={tmp}"], environment=False)
        corpus = open_prepared(cfg.data, cfg.tokenizer)
        eot, stream = corpus.index["eot"], corpus.train
        masked = build_model(cfg.model, corpus.index["vocab_size"], eot)
        apart = build_model(cfg.model, corpus.index["vocab_size"], eot)
        apart.load_state_dict(masked.state_dict())
        use_document_attention(apart)
        print(f"\nbuilt-in model and corpus, 2 CPU threads, {args.tokens:,} tokens per micro-batch, forward + "
              f"backward, median of {args.repeats}\n")
        print("| length | documents from | rows | documents | masked SDPA s | document attention s | ratio "
              "| mask MiB |")
        print("|---:|---|---:|---:|---:|---:|---:|---:|")
        for length in args.lengths:
            rows = max(1, args.tokens // length)
            corpus_windows = torch.from_numpy(stream.windows(random_offsets(stream.size, 0, 0, length, rows), length))
            short = corpus_windows.clone()
            short[:, args.short::args.short] = eot
            for name, windows in (("corpus", corpus_windows), (f"{args.short}-token", short)):
                documents = rows + int((windows[:, 1:-1] == eot).sum())
                old, new = seconds(masked, windows, eot, args.repeats), seconds(apart, windows, eot, args.repeats)
                mask_mib = rows * length * length * 4 / 2**20  # fp32 additive mask, as transformers builds for SDPA
                print(f"| {length:,} | {name} | {rows} | {documents} | {old:.3f} | {new:.3f} | {old / new:.2f} | "
                      f"{mask_mib:,.0f} |")


if __name__ == "__main__":
    main()
