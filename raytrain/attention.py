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

import torch

ATTENTION = "raytrain_documents"


def document_spans(positions: torch.Tensor) -> dict:
    """The keyword arguments that carry a micro-batch's documents to ``document_attention``: cumulative lengths
    (int32, starting 0, ending rows x L) of the spans of the flattened (rows, L) ``positions`` that start where
    the position is 0, and the longest span (one host sync per forward, not per layer)."""
    flat = positions.flatten()
    starts = torch.nonzero(flat == 0).flatten()
    bounds = torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)
    longest = int((bounds[1:] - bounds[:-1]).max())
    return {"cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": longest, "max_length_k": longest}


def document_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                       cu_seq_lens_q=None, max_length_q=None, **kwargs):
    """transformers' attention-function contract: (rows, heads, L, dim) in, ((rows, L, heads, dim), None) out."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    if cu_seq_lens_q is None:  # no documents to keep apart: plain causal SDPA
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    rows, heads, length, dim = query.shape
    half = _half_precision(query)
    if half is not None and not dropout and query.is_cuda and torch.cuda.get_device_capability(query.device) >= (8, 0):
        from torch.nn.attention.varlen import varlen_attn  # FlashAttention-2: Ampere (sm80) and newer
        q, k, v = (t.transpose(1, 2).reshape(rows * length, t.shape[1], dim).to(half) for t in (query, key, value))
        out = varlen_attn(q, k, v, cu_seq_lens_q, cu_seq_lens_q, max_length_q, max_length_q,
                          window_size=(-1, 0), scale=scaling, enable_gqa=k.shape[1] != heads)  # (-1, 0): causal
        return out.view(rows, length, heads, dim), None
    bounds = cu_seq_lens_q.tolist()
    documents: dict[int, list[int]] = {}  # row -> the lengths of its documents, in order
    for start, end in zip(bounds[:-1], bounds[1:]):
        documents.setdefault(start // length, []).append(end - start)

    def attend(q, k, v):  # (rows, heads, span, dim) -> (rows, span, heads, dim), causal within the span
        return sdpa_attention_forward(module, q, k, v, None, dropout, scaling, is_causal=True, **kwargs)[0]

    split = {row: spans for row, spans in documents.items() if len(spans) > 1}
    if not split:
        return attend(query, key, value), None
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
    return torch.stack(out), None


def _half_precision(query: torch.Tensor) -> torch.dtype | None:
    """The 16-bit type the kernel runs in: the tensor's own, or autocast's (RoPE hands fp32 queries to it)."""
    if query.dtype in (torch.bfloat16, torch.float16):
        return query.dtype
    if torch.is_autocast_enabled(query.device.type):
        return torch.get_autocast_dtype(query.device.type)
    return None


def use_document_attention(model) -> None:
    """Register ``document_attention`` with transformers (once) and switch ``model`` to it."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import flash_attention_mask
    AttentionInterface.register(ATTENTION, document_attention)
    AttentionMaskInterface.register(ATTENTION, flash_attention_mask)  # no padding here, so it builds no mask
    model.set_attn_implementation(ATTENTION)
    if model.config._attn_implementation != ATTENTION:  # transformers only warns; config validation refuses first
        raise ValueError(f"{type(model).__name__} does not use transformers' AttentionInterface: documents cannot "
                         "be kept apart in it (set data.cross_documents: true)")
