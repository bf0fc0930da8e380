"""Shifted next-token cross-entropy with shift-aware normalization, as the module the engine trains.

A micro-batch contributes ``sum of token losses / targets in the whole global
step``: summing these over micro-batches and ranks gives the mean over the
global batch, so the gradient equals one full-batch step whatever the split
(no mean-of-means, the gradient-accumulation normalization bug).

``CausalLMLoss`` holds the language model and computes the loss in its own
forward, so that DeepSpeed's ``engine.forward`` runs around all of it: its
autocast, ZeRO-3's parameter hooks and its output backward hooks cover the
output head and the (chunked) loss as well as the transformer.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from raytrain.attention import document_spans
from raytrain.compiled import compile_function

IGNORE_INDEX = -100


def split_window(windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L+1) windows -> (B, L) inputs and (B, L) targets: the shift."""
    return windows[:, :-1], windows[:, 1:]


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of cross-entropies over valid targets; logits (B, L, V), targets (B, L)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def count_targets(windows) -> int:
    """Valid targets in (B, L+1) windows (numpy or torch); counted before any device transfer."""
    return int((windows[:, 1:] != IGNORE_INDEX).sum())


def document_positions(inputs: torch.Tensor, eot: int) -> torch.Tensor:
    """Position ids that restart at 0 at every end-of-text token, which opens the next document.

    Restarting positions tell the model where documents start: ``raytrain.attention``
    (and transformers' own masks, for a model not switched to it) keep attention
    within each document, so no target sees another document's tokens.
    """
    index = torch.arange(inputs.shape[1], device=inputs.device).expand_as(inputs)
    starts = torch.where(inputs == eot, index, torch.zeros_like(index))
    return index - torch.cummax(starts, dim=1).values


def model_inputs(windows: torch.Tensor, eot: int | None) -> tuple[dict, torch.Tensor]:
    """(keyword arguments for the language model, targets) of (B, L+1) windows; with ``eot`` the positions
    restart at documents and their spans go to ``raytrain.attention`` (SDPA would build a mask from them)."""
    inputs, targets = split_window(windows)
    positions = None if eot is None else document_positions(inputs, eot)
    spans = {} if eot is None else document_spans(positions)
    return {"input_ids": inputs, "position_ids": positions, "use_cache": False, **spans}, targets


def window_logits(model, windows: torch.Tensor, eot: int | None = None):
    """(logits (B, L, V), targets (B, L)) of a Hugging Face causal LM on (B, L+1) windows."""
    kwargs, targets = model_inputs(windows, eot)
    return model(**kwargs).logits, targets


def document_eots(cross_documents: bool, eval_documents: str, eot: int) -> tuple[int | None, int | None]:
    """The end-of-text id that keeps documents apart (None: crossed) in training and in evaluation, from
    ``data.cross_documents`` and ``eval.documents``."""
    train_eot = None if cross_documents else eot
    if eval_documents == "as_trained":
        return train_eot, train_eot
    return train_eot, eot if eval_documents == "apart" else None


class CausalLMLoss(torch.nn.Module):
    """A causal LM and its summed shifted cross-entropy: ``forward(windows)`` -> the loss sum (fp32), or with
    ``per_position`` a (2, L) float64 tensor of loss sums and target counts per position (evaluation).

    ``eot``: documents are kept apart; ``eval_eot`` (default: as ``eot``) likewise in
    evaluation. ``chunk_tokens``: the output head and the loss run that many
    positions at a time and each chunk's logits are recomputed in the backward,
    so at most one chunk's logits (and their fp32 copy) exist instead of
    B x L x vocab.

    Every rank must make the same collective calls, and at ZeRO-3 each call of a
    module gathers its parameters. So an empty batch (a rank with fewer rows than
    micro-batches) runs one zero-weighted row, and the head runs as many chunks
    on every rank: enough for ``rows`` rows (the most any rank's micro-batch of
    the step holds), the chunks past a rank's own positions empty.
    """

    def __init__(self, lm, eot: int | None = None, chunk_tokens: int | None = None, compiled: bool = False,
                 eval_eot: int | None | str = "as eot"):
        super().__init__()
        self.lm, self.eot, self.chunk_tokens = lm, eot, chunk_tokens
        self.eval_eot = eot if eval_eot == "as eot" else eval_eot
        # compiled, inductor fuses the cast and cross-entropy into one pass: no fp32 copy or log-softmax of the
        # logits is kept. The head's matmul stays outside the graph (inductor would call the same GEMM), and with
        # it DeepSpeed's hooks on the head, which at ZeRO-3 gather its weight and would otherwise be traced.
        self.head_loss = partial(head_loss, loss=compile_function(logits_loss, "head")) if compiled else head_loss

    def forward(self, windows: torch.Tensor, per_position: bool = False, rows: int | None = None) -> torch.Tensor:
        if windows.shape[0] == 0:
            one_row = torch.zeros((1, windows.shape[1]), dtype=windows.dtype, device=windows.device)
            return self.forward(one_row, per_position, rows) * 0.0
        kwargs, targets = model_inputs(windows, self.eval_eot if per_position else self.eot)
        if per_position:
            losses = F.cross_entropy(self.lm(**kwargs).logits.float().transpose(1, 2), targets,
                                     ignore_index=IGNORE_INDEX, reduction="none")
            return torch.stack([losses.double().sum(0), (targets != IGNORE_INDEX).double().sum(0)])
        hidden = getattr(self.lm, self.lm.base_model_prefix)(**kwargs)[0]
        head = self.lm.get_output_embeddings()
        if not self.chunk_tokens:
            return self.head_loss(hidden.flatten(0, 1), targets.flatten(), head)
        chunks = -(-max(rows or 0, windows.shape[0]) * targets.shape[1] // self.chunk_tokens)
        return chunked_loss_sum(hidden, head, targets, self.chunk_tokens, chunks, self.head_loss)


def chunked_loss_sum(hidden: torch.Tensor, head, targets: torch.Tensor, chunk_tokens: int,
                     chunks: int | None = None, loss=None) -> torch.Tensor:
    """``token_loss_sum(head(hidden), targets)`` without the whole logits tensor: (B, L, H) hidden states go
    through the head ``chunk_tokens`` positions at a time under non-reentrant checkpointing, in ``chunks``
    calls (at least enough for every position; those past the end take no positions)."""
    flat, goal, loss = hidden.flatten(0, 1), targets.flatten(), loss or head_loss
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, max(chunks or 0, -(-goal.numel() // chunk_tokens)) * chunk_tokens, chunk_tokens):
        end = start + chunk_tokens
        total = total + checkpoint(loss, flat[start:end], goal[start:end], head, use_reentrant=False)
    return total


def head_loss(hidden: torch.Tensor, targets: torch.Tensor, head, loss=None) -> torch.Tensor:
    """Summed cross-entropy of the head's logits for (positions, H) hidden states."""
    return (loss or logits_loss)(head(hidden), targets)


def logits_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


def position_buckets(length: int) -> list[tuple[int, int]]:
    """Position 0, 1, 2-3, 4-7, ... up to length - 1 (the last bucket cut at the window's end)."""
    buckets, start = [(0, 0)], 1
    while start < length:
        buckets.append((start, min(2 * start, length) - 1))
        start *= 2
    return buckets
