"""Per-length validation loss and perplexity on deterministic, non-overlapping windows."""
from __future__ import annotations

import math

import numpy as np
import torch

from raytrain.data import TokenStream, eval_offsets, micro_batches, shard
from raytrain.loss import count_targets, window_loss


@torch.no_grad()
def evaluate(model, val: TokenStream, lengths: list[int], tokens: int, batch_tokens: int,
             rank: int = 0, world: int = 1, eot: int | None = None, bf16: bool = False) -> dict[str, float]:
    """``val/loss@L`` and ``val/ppl@L`` for each L; the windows are split across ranks, the sums all-reduced.

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
        totals = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, target count)
        for chunk in np.array_split(mine, chunks):
            windows = val.windows(chunk, length)
            totals[0] += window_loss(model, torch.from_numpy(windows).to(device), eot, bf16).double()
            totals[1] += count_targets(windows)
        if world > 1:
            torch.distributed.all_reduce(totals)
        loss_sum, count = totals.tolist()
        results[f"val/loss@{length}"] = loss_sum / count
        results[f"val/ppl@{length}"] = math.exp(loss_sum / count)
    model.train(was_training)
    return results
