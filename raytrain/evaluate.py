"""Per-length validation loss and perplexity on deterministic, non-overlapping windows, and the evaluator that
decides when the loop evaluates."""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from raytrain.config import EvalConfig
from raytrain.data import TokenStream
from raytrain.loss import position_buckets
from raytrain.runlog import length_losses
from raytrain.steps import eval_offsets, micro_batches, shard


@torch.no_grad()
def evaluate(module, val: TokenStream, lengths: list[int], tokens: int, rows_per_forward: Callable[[int], int],
             rank: int = 0, world: int = 1) -> dict[str, float]:
    """``val/loss@L``, ``val/ppl@L`` and ``val/loss@L/posA-B`` (positions A to B of the window, in buckets
    0, 1, 2-3, 4-7, ...) for each L; the windows are split across ranks, the sums all-reduced.

    ``module``: a ``CausalLMLoss`` or a DeepSpeed engine around one (collective
    at ZeRO-3: every rank runs the same number of forwards). ``rows_per_forward(L)``
    bounds one forward, as training's micro-batch does.
    """
    was_training = module.training
    module.eval()
    device = getattr(module, "device", None) or next(module.parameters()).device
    results = {}
    for length in lengths:
        offsets = eval_offsets(val.size, length, tokens)
        mine = offsets[shard(offsets.size, rank, world)]
        totals = torch.zeros(2, length, dtype=torch.float64, device=device)  # per position: (loss sum, count)
        for chunk in np.array_split(mine, micro_batches(offsets.size, world, rows_per_forward(length))):
            totals += module(torch.from_numpy(val.windows(chunk, length)).to(device), per_position=True)
        if world > 1:
            torch.distributed.all_reduce(totals)
        loss_sum, count = totals.sum(1).tolist()
        results[f"val/loss@{length}"] = loss_sum / count
        results[f"val/ppl@{length}"] = math.exp(loss_sum / count)
        for start, end in position_buckets(length):
            results[f"val/loss@{length}/pos{start}-{end}"] = float(totals[0, start:end + 1].sum()
                                                                  / totals[1, start:end + 1].sum())
    module.train(was_training)
    return results


class Evaluator:
    """Evaluates the engine at step 0, every ``eval.every`` steps and at the end; rank 0 records each result."""

    def __init__(self, cfg: EvalConfig, max_steps: int, longest_trained: int, val: TokenStream, engine,
                 rows_per_forward: Callable[[int], int], rank: int, world: int, log):
        self.cfg, self.max_steps, self.longest_trained = cfg, max_steps, longest_trained
        self.val, self.engine, self.rows_per_forward, self.rank, self.world, self.log = \
            val, engine, rows_per_forward, rank, world, log

    def due(self, step: int) -> bool:
        return step % self.cfg.every == 0 or step == self.max_steps

    def __call__(self, state) -> dict:
        """The evaluation at a loop state, summarized for Tune (``val/loss@max``, ``val/loss@mean``)."""
        results = evaluate(self.engine, self.val, self.cfg.lengths, self.cfg.tokens, self.rows_per_forward,
                           self.rank, self.world)
        self.log.eval({"step": state.step, "tokens": state.tokens, **results})
        return summarize_eval(results, self.longest_trained)


def summarize_eval(results: dict, longest_trained: int) -> dict:
    """Adds val/loss@max (at lengths.max, when evaluated) and val/loss@mean (over eval lengths): Tune objectives."""
    losses = length_losses(results)
    summary = dict(results, **{"val/loss@mean": sum(losses.values()) / len(losses)})
    if f"val/loss@{longest_trained}" in results:
        summary["val/loss@max"] = results[f"val/loss@{longest_trained}"]
    return summary
