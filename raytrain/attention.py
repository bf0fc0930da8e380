"""Causal attention that keeps documents apart without an L x L mask (``data.cross_documents: false``).

transformers reads restarting position ids as packed sequences and, for SDPA,
builds a (rows, 1, L, L) mask from them: memory quadratic in the length, and a
mask rules out the flash kernels. Here the documents of a micro-batch are
spans of the flattened (rows x L) tokens instead (every row starts one, every
end-of-text token opens the next), given once per forward as cumulative
lengths, the varlen convention of FlashAttention-2:

- CUDA (Ampere or newer) in bf16/fp16 without attention dropout: one call to
  PyTorch's ``varlen_attn`` (FlashAttention-2's varlen kernel, shipped with
  PyTorch): no mask, no cross-document block computed;
- elsewhere (CPU, fp32, older GPUs, dropout): transformers' SDPA attention,
  causal, in one call for the rows that hold a single document and once per
  document of the others: the same result without a mask (``bench/attention.py``
  times it).

Registered with transformers as ``ATTENTION`` (its mask function builds no
mask); without spans (generation, ``cross_documents: true``) it is SDPA.
"""
from __future__ import annotations

from collections import Counter

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import flash_attention_mask

ATTENTION = "raytrain_documents"
KERNELS: Counter = Counter()  # which path computed attention, per call (the GPU check labels its rows with it)


def document_spans(positions: torch.Tensor) -> dict:
    """The keyword arguments that carry a micro-batch's documents to ``document_attention``: cumulative lengths
    (int32, starting 0, ending rows x L) of the spans of the flattened (rows, L) ``positions`` that start where
    the position is 0, and the longest span (one host sync per forward, not per layer)."""
    flat = positions.flatten()
    starts = torch.nonzero(flat == 0).flatten()
    bounds = torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)
    longest = int((bounds[1:] - bounds[:-1]).max())
    return {"cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": longest, "max_length_k": longest}


UNSUPPORTED = {"softcap": "attention-logit soft-capping (Gemma-2)", "s_aux": "attention sinks (gpt-oss)"}


def document_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                       sliding_window=None, softcap=None, s_aux=None, cu_seq_lens_q=None, max_length_q=None,
                       **kwargs):
    """transformers' attention-function contract: (rows, heads, L, dim) in, ((rows, L, heads, dim), None) out.

    A sliding window (Mistral, Qwen2's sliding layers) is honoured on every path;
    soft-capping and attention sinks are refused, never dropped in silence (the
    config check refuses such models before Ray starts).
    """
    for name, given in (("softcap", softcap), ("s_aux", s_aux)):
        if given is not None:
            raise ValueError(f"{type(module).__name__} uses {UNSUPPORTED[name]} ({name}), which raytrain's document "
                             "attention does not compute; set data.cross_documents: true")

    def attend(q, k, v):  # (rows, heads, span, dim) -> (rows, span, heads, dim), causal within the span
        return causal_attention(module, q, k, v, dropout, scaling, sliding_window, kwargs)

    if cu_seq_lens_q is None:  # no documents to keep apart: causal over each row (a padding mask if one is given)
        if attention_mask is not None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
        return attend(query, key, value), None
    half = _half_precision(query)
    if half is not None and not dropout and query.is_cuda and torch.cuda.get_device_capability(query.device) >= (8, 0):
        KERNELS["varlen FlashAttention-2"] += 1
        return varlen(query, key, value, half, cu_seq_lens_q, max_length_q, scaling, sliding_window), None
    KERNELS["SDPA per document"] += 1
    return per_document(query, key, value, cu_seq_lens_q, attend), None


def causal_attention(module, q, k, v, dropout: float, scaling, sliding_window, kwargs):
    """SDPA, causal; with a sliding window a key is seen from its own position to sliding_window - 1 positions
    later (transformers' overlay), as a (span, span) band when the span is longer than the window."""
    span = q.shape[2]
    if sliding_window is None or span <= sliding_window:
        return sdpa_attention_forward(module, q, k, v, None, dropout, scaling, is_causal=True, **kwargs)[0]
    index = torch.arange(span, device=q.device)
    band = (index[None, :] <= index[:, None]) & (index[None, :] > index[:, None] - sliding_window)
    return sdpa_attention_forward(module, q, k, v, band, dropout, scaling, is_causal=False, **kwargs)[0]


def varlen(query, key, value, half: torch.dtype, bounds, longest: int, scaling, sliding_window):
    """One call of PyTorch's varlen_attn (FlashAttention-2's kernel, Ampere and newer) over every document."""
    from torch.nn.attention.varlen import varlen_attn  # CUDA only: imported where it runs
    rows, heads, length, dim = query.shape
    q, k, v = (t.transpose(1, 2).reshape(rows * length, t.shape[1], dim).to(half) for t in (query, key, value))
    left = -1 if sliding_window is None else sliding_window - 1  # (-1, 0): causal; (w - 1, 0): the last w keys
    out = varlen_attn(q, k, v, bounds, bounds, longest, longest, window_size=(left, 0), scale=scaling,
                      enable_gqa=k.shape[1] != heads)
    return out.view(rows, length, heads, dim)


def per_document(query, key, value, bounds, attend):
    """``attend`` once for the rows that hold one document and once per document of the others."""
    rows, length = query.shape[0], query.shape[2]
    starts = bounds.tolist()
    documents: dict[int, list[int]] = {}  # row -> the lengths of its documents, in order
    for start, end in zip(starts[:-1], starts[1:]):
        documents.setdefault(start // length, []).append(end - start)
    split = {row: spans for row, spans in documents.items() if len(spans) > 1}
    if not split:
        return attend(query, key, value)
    # Rows are taken apart with unbind/split and put back with stack/cat: views whose backward is one copy each
    # (indexing or slicing instead costs a full-size zero tensor per piece in the backward).
    per_row = [t.unbind(0) for t in (query, key, value)]
    if 2 * len(split) <= rows:  # mostly whole rows: attend over all rows in one call, then redo the split ones
        out = list(attend(query, key, value).unbind(0))
    else:  # mostly split rows: the whole ones gathered for one call
        whole = [row for row in range(rows) if row not in split]
        out = [None] * rows
        if whole:
            for row, result in zip(whole, attend(*(torch.stack([t[r] for r in whole]) for t in per_row)).unbind(0)):
                out[row] = result
    for row, spans in split.items():
        pieces = zip(*(t[row].split(spans, dim=1) for t in per_row))
        out[row] = torch.cat([attend(*(p.unsqueeze(0) for p in piece))[0] for piece in pieces])
    return torch.stack(out)


def _half_precision(query: torch.Tensor) -> torch.dtype | None:
    """The 16-bit type the kernel runs in: the tensor's own, or autocast's (RoPE hands fp32 queries to it)."""
    if query.dtype in (torch.bfloat16, torch.float16):
        return query.dtype
    if torch.is_autocast_enabled(query.device.type):
        return torch.get_autocast_dtype(query.device.type)
    return None


def use_document_attention(model) -> None:
    """Register ``document_attention`` with transformers (once) and switch ``model`` to it."""
    AttentionInterface.register(ATTENTION, document_attention)
    AttentionMaskInterface.register(ATTENTION, flash_attention_mask)  # no padding here, so it builds no mask
    model.set_attn_implementation(ATTENTION)
    if model.config._attn_implementation != ATTENTION:  # transformers only warns; config validation refuses first
        raise ValueError(f"{type(model).__name__} does not use transformers' AttentionInterface: documents cannot "
                         "be kept apart in it (set data.cross_documents: true)")
