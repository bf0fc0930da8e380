"""Shifted next-token cross-entropy with shift-aware normalization.

A micro-batch contributes ``sum of token losses / targets in the whole global
step``: summing these over micro-batches and ranks gives the mean over the
global batch, so the gradient equals one full-batch step whatever the split
(no mean-of-means, the gradient-accumulation normalization bug).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from raytrain.attention import document_spans

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


def _forward(model, windows: torch.Tensor, eot: int | None, bf16: bool, body: bool = False):
    """(output, targets): the model's (or with ``body``, its base model's) output on the windows' inputs, under
    autocast when ``bf16``, with positions restarting at documents when ``eot`` is given."""
    inputs, targets = split_window(windows)
    positions = None if eot is None else document_positions(inputs, eot)
    spans = {} if eot is None else document_spans(positions)  # read by raytrain.attention; SDPA builds a mask
    module = getattr(model, "module", model)  # a DeepSpeed engine's model
    net = getattr(module, module.base_model_prefix) if body else model
    with torch.autocast(device_type=windows.device.type, dtype=torch.bfloat16, enabled=bf16):
        return net(input_ids=inputs, position_ids=positions, use_cache=False, **spans), targets


def window_logits(model, windows: torch.Tensor, eot: int | None = None, bf16: bool = False):
    """(logits (B, L, V), targets (B, L)) of ``model`` on (B, L+1) windows.

    ``eot`` given: documents are kept apart (``document_positions``). ``bf16``:
    the forward runs under ``torch.autocast`` (the loss itself is fp32).
    """
    out, targets = _forward(model, windows, eot, bf16)
    return out.logits, targets


def window_loss(model, windows: torch.Tensor, eot: int | None = None, bf16: bool = False,
                chunk_tokens: int | None = None) -> torch.Tensor:
    """Summed shifted cross-entropy of ``model`` on (B, L+1) windows.

    ``chunk_tokens``: the output head and the loss run that many positions at a
    time and each chunk's logits are recomputed in the backward, so no more than
    one chunk's logits (and their fp32 copy) ever exist, instead of B x L x vocab.
    An empty batch (a rank with fewer rows than micro-batches) runs one
    zero-weighted row instead, so every rank makes the same collective calls:
    ZeRO-3 gathers parameters inside forward and backward.
    """
    if windows.shape[0] == 0:
        return window_loss(model, _one_row(windows), eot, bf16, chunk_tokens) * 0.0
    if not chunk_tokens:
        return token_loss_sum(*window_logits(model, windows, eot, bf16))
    out, targets = _forward(model, windows, eot, bf16, body=True)
    head = getattr(model, "module", model).get_output_embeddings()
    with torch.autocast(device_type=windows.device.type, dtype=torch.bfloat16, enabled=bf16):
        return chunked_loss_sum(out[0], head, targets, chunk_tokens)


def _one_row(windows: torch.Tensor) -> torch.Tensor:
    return torch.zeros((1, windows.shape[1]), dtype=windows.dtype, device=windows.device)


def chunked_loss_sum(hidden: torch.Tensor, head, targets: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """``token_loss_sum(head(hidden), targets)`` without the whole logits tensor: (B, L, H) hidden states go
    through the head ``chunk_tokens`` positions at a time under non-reentrant checkpointing."""
    from torch.utils.checkpoint import checkpoint
    flat, goal = hidden.flatten(0, 1), targets.flatten()
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, goal.numel(), chunk_tokens):
        end = start + chunk_tokens
        total = total + checkpoint(_head_loss, flat[start:end], goal[start:end], head, use_reentrant=False)
    return total


def _head_loss(hidden: torch.Tensor, targets: torch.Tensor, head) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


def position_loss_sums(model, windows: torch.Tensor, eot: int | None = None,
                       bf16: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss sum, target count) per position 0..L-1 of the windows, summed over rows (evaluation)."""
    length = windows.shape[1] - 1
    if windows.shape[0] == 0:
        sums, _ = position_loss_sums(model, _one_row(windows), eot, bf16)
        return sums * 0.0, torch.zeros(length, dtype=torch.float64, device=windows.device)
    logits, targets = window_logits(model, windows, eot, bf16)
    losses = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    return losses.double().sum(0), (targets != IGNORE_INDEX).double().sum(0)


def position_buckets(length: int) -> list[tuple[int, int]]:
    """Position 0, 1, 2-3, 4-7, ... up to length - 1 (the last bucket cut at the window's end)."""
    buckets, start = [(0, 0)], 1
    while start < length:
        buckets.append((start, min(2 * start, length) - 1))
        start *= 2
    return buckets
