"""Per-length validation loss and perplexity on deterministic, non-overlapping windows."""
from __future__ import annotations

import math

import numpy as np
import torch

from raytrain.data import TokenStream, eval_offsets, micro_batches, shard
from raytrain.loss import position_buckets, position_loss_sums


@torch.no_grad()
def evaluate(model, val: TokenStream, lengths: list[int], tokens: int, batch_tokens: int,
             rank: int = 0, world: int = 1, eot: int | None = None, bf16: bool = False) -> dict[str, float]:
    """``val/loss@L``, ``val/ppl@L`` and ``val/loss@L/posA-B`` (positions A to B of the window, in buckets
    0, 1, 2-3, 4-7, ...) for each L; the windows are split across ranks, the sums all-reduced.

    ``batch_tokens`` bounds one forward pass (as ``train.micro_batch_tokens`` does);
    ``eot`` given: documents are kept apart, as in training with ``data.cross_documents: false``.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    results = {}
    for length in lengths:
        offsets = eval_offsets(val.size, length, tokens)
        mine = offsets[shard(offsets.size, rank, world)]
        chunks = micro_batches(offsets.size, world, max(1, batch_tokens // length))
        totals = torch.zeros(2, length, dtype=torch.float64, device=device)  # per position: (loss sum, count)
        for chunk in np.array_split(mine, chunks):
            sums, counts = position_loss_sums(model, torch.from_numpy(val.windows(chunk, length)).to(device), eot,
                                              bf16)
            totals[0] += sums
            totals[1] += counts
        if world > 1:
            torch.distributed.all_reduce(totals)
        loss_sum, count = totals.sum(1).tolist()
        results[f"val/loss@{length}"] = loss_sum / count
        results[f"val/ppl@{length}"] = math.exp(loss_sum / count)
        for start, end in position_buckets(length):
            results[f"val/loss@{length}/pos{start}-{end}"] = float(totals[0, start:end + 1].sum()
                                                                  / totals[1, start:end + 1].sum())
    model.train(was_training)
    return results


def length_losses(record: dict) -> dict[int, float]:
    """{L: val/loss@L} of an evaluation record (not its position buckets, nor @max / @mean)."""
    return dict(sorted((int(key[9:]), value) for key, value in record.items()
                       if key.startswith("val/loss@") and key[9:].isdigit()))


def position_losses(record: dict, length: int) -> list[tuple[int, int, float]]:
    """[(first position, last position, loss)] of the buckets at ``length``, in position order."""
    prefix = f"val/loss@{length}/pos"
    found = [(*map(int, key[len(prefix):].split("-")), value) for key, value in record.items()
             if key.startswith(prefix)]
    return sorted(found)
