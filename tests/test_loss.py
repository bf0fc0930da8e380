import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from raytrain.data import TokenStream
from raytrain.loss import CausalLMLoss, count_targets, token_loss_sum, window_logits
from raytrain.steps import StepPlan, random_offsets


def rank_batches(stream, offsets, length, micro_tokens, rank, world):
    plan = StepPlan(0, length, offsets.size, offsets, world, max(1, micro_tokens // length))
    return plan.rank_batches(TokenStream([stream]), rank)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
    return LlamaForCausalLM(config).double()


def test_loss_equals_transformers_causal_lm_loss(model):
    windows = torch.randint(0, 50, (3, 17))
    reference = model(input_ids=windows, labels=windows).loss  # transformers shifts internally
    logits = model(input_ids=windows).logits[:, :-1]
    ours = token_loss_sum(logits, windows[:, 1:]) / count_targets(windows)
    assert count_targets(windows) == 3 * 16
    assert ours.item() == pytest.approx(reference.item(), abs=1e-10)


def test_ignored_targets_are_not_counted(model):
    windows = torch.randint(0, 50, (2, 9))
    windows[0, 5] = -100
    assert count_targets(windows) == 2 * 8 - 1
    logits = model(input_ids=windows.clamp(min=0)).logits[:, :-1]
    labels = windows.clone()
    reference = model(input_ids=windows.clamp(min=0), labels=labels).loss
    assert (token_loss_sum(logits, windows[:, 1:]) / count_targets(windows)).item() == \
        pytest.approx(reference.item(), abs=1e-10)


def grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()]).clone()


def split_gradient(model, stream, world, micro_tokens, length=16, tokens_per_step=7 * 16):
    """Gradient as the training loop makes it: per rank, micro-batches scaled by world / global targets;
    then averaged over ranks, as DeepSpeed's data-parallel reduction does."""
    offsets = random_offsets(stream.size, 0, 5, length, tokens_per_step // length)
    per_rank = [rank_batches(stream, offsets, length, micro_tokens, r, world) for r in range(world)]
    targets = sum(count_targets(c) for chunks in per_rank for c in chunks)
    total = 0
    for chunks in per_rank:
        assert len(chunks) == len(per_rank[0])  # the same number of collective calls on every rank
        model.zero_grad()
        for chunk in chunks:
            (CausalLMLoss(model)(torch.from_numpy(chunk)) * (world / targets)).backward()
        total = total + grads(model)
    return total / world


def test_gradient_is_the_same_for_any_split(model):
    stream = np.random.default_rng(0).integers(0, 50, 5000)
    offsets = random_offsets(stream.size, 0, 5, 16, 7)
    full = rank_batches(stream, offsets, 16, 10**9, 0, 1)
    assert len(full) == 1 and full[0].shape == (7, 17)
    model.zero_grad()
    inputs = torch.from_numpy(full[0])
    model(input_ids=inputs, labels=inputs).loss.backward()  # the whole global batch at once
    reference = grads(model)
    # 7 rows: 2 ranks x 2 micro-batches (uneven: 3 and 4 rows), and 1 rank x 4 micro-batches.
    for world, micro_tokens in [(2, 2 * 16), (1, 2 * 16), (2, 1 * 16)]:
        got = split_gradient(model, stream, world, micro_tokens)
        torch.testing.assert_close(got, reference, rtol=0, atol=1e-5)
    assert len(rank_batches(stream, offsets, 16, 2 * 16, 0, 2)) == 2
    assert len(rank_batches(stream, offsets, 16, 2 * 16, 0, 1)) == 4


def test_empty_micro_batch_contributes_nothing(model):
    model.zero_grad()
    loss = CausalLMLoss(model)(torch.zeros((0, 9), dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is not None and p.grad.abs().max().item() == 0.0 for p in model.parameters())


def test_documents_do_not_see_each_other_when_kept_apart():
    from raytrain.loss import document_positions
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    eot = 256
    doc_b = torch.randint(0, 256, (10,))
    first = torch.cat([torch.randint(0, 256, (7,)), torch.tensor([eot]), doc_b])[None]
    other = torch.cat([torch.randint(0, 256, (7,)), torch.tensor([eot]), doc_b])[None]  # previous doc changed
    assert document_positions(first, eot).tolist() == [[0, 1, 2, 3, 4, 5, 6] + list(range(11))]

    def logits(ids, keep_apart):
        positions = document_positions(ids, eot) if keep_apart else None
        return model(input_ids=ids, position_ids=positions, use_cache=False).logits[0, 7:]  # from EOT on

    torch.testing.assert_close(logits(first, True), logits(other, True), rtol=0, atol=1e-5)
    assert (logits(first, False) - logits(other, False)).abs().max() > 1e-3  # attention did cross before
    # and the document on its own, starting at its EOT, gives the same logits: nothing leaked
    alone = torch.cat([torch.tensor([eot]), doc_b])[None]
    torch.testing.assert_close(logits(first, True), model(input_ids=alone).logits[0], rtol=0, atol=1e-5)
    windows = torch.cat([first, other])
    assert CausalLMLoss(model, eot)(windows).item() > 0


def test_document_spans_are_the_flattened_documents():
    from raytrain.attention import document_spans
    from raytrain.loss import document_positions
    eot = 9
    inputs = torch.tensor([[1, 2, eot, 3, eot, eot], [4, 5, 6, 7, 8, 1]])
    spans = document_spans(document_positions(inputs, eot))
    assert spans["cu_seq_lens_q"].tolist() == [0, 2, 4, 5, 6, 12] and spans["cu_seq_lens_q"].dtype == torch.int32
    assert spans["max_length_q"] == 6 and spans["cu_seq_lens_k"] is spans["cu_seq_lens_q"]


@pytest.mark.parametrize("kv_heads, most_rows_split", [(4, False), (2, True)])
def test_document_attention_equals_the_masked_path_without_a_mask(kv_heads, most_rows_split):
    """Logits and gradients of ``raytrain.attention`` against transformers' SDPA with its (rows, 1, L, L) packed mask
    (fp32, 1e-5), on rows of one document, of several, starting mid-document, and grouped-query heads."""
    from raytrain.attention import use_document_attention
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64)
    masked = LlamaForCausalLM(config)
    apart = LlamaForCausalLM(copy.deepcopy(config))  # a model's attention is its config's
    apart.load_state_dict(masked.state_dict())
    use_document_attention(apart)
    eot, length = 256, 48
    windows = torch.randint(0, 256, (5, length + 1), generator=torch.Generator().manual_seed(3))
    windows[1, [5, 6, 30]] = eot  # an empty document between two ends
    windows[2, [1, 47]] = eot
    windows[3, 0] = eot  # a row that opens with a new document
    if most_rows_split:  # the other way of grouping rows (raytrain.attention picks by how many rows are split)
        windows[[0, 4], 20] = eot
    masks = {id(masked): [], id(apart): []}  # the attention_mask each model's layers receive
    for model in (masked, apart):
        for layer in model.model.layers:
            layer.self_attn.register_forward_pre_hook(
                lambda m, args, kw, seen=masks[id(model)]: seen.append(kw["attention_mask"]), with_kwargs=True)
    logits = [window_logits(m, windows, eot)[0] for m in (masked, apart)]
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=1e-5)
    for model in (masked, apart):
        CausalLMLoss(model, eot)(windows).backward()
    torch.testing.assert_close(grads(apart), grads(masked), rtol=0, atol=1e-5)
    assert all(m.shape == (5, 1, length, length) for m in masks[id(masked)])  # what no longer exists
    assert len(masks[id(apart)]) == 4 and all(m is None for m in masks[id(apart)])
    # without documents to keep apart the same model is plain causal SDPA
    torch.testing.assert_close(window_logits(apart, windows)[0], window_logits(masked, windows)[0], rtol=0, atol=1e-5)


def documents_alone(model, windows: torch.Tensor, eot: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, loss sum) of every document of every window run alone through ``model`` (an end-of-text token
    opens a document): what keeping documents apart means, computed without spans or masks."""
    logits, total = [], 0
    for row in windows:
        inputs, targets = row[:-1], row[1:]
        starts = [0] + [i for i in range(1, len(inputs)) if inputs[i] == eot] + [len(inputs)]
        pieces = [model(input_ids=inputs[s:e][None]).logits[0] for s, e in zip(starts[:-1], starts[1:])]
        total = total + sum(F.cross_entropy(p, targets[s:e], reduction="sum") for p, s, e in
                            zip(pieces, starts[:-1], starts[1:]))
        logits.append(torch.cat(pieces))
    return torch.stack(logits), total


def test_document_attention_honours_a_sliding_window():
    """A tiny Mistral with an 8-token sliding window and documents up to 40 tokens long: document attention
    (per-document SDPA with the window as a band) equals each document run alone through transformers' own
    sliding-window masked path, logits and gradients (fp32, 1e-5); without the window it would not."""
    from transformers import MistralConfig, MistralForCausalLM

    from raytrain.attention import KERNELS, use_document_attention
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, sliding_window=8)
    reference = MistralForCausalLM(config)
    apart = MistralForCausalLM(copy.deepcopy(config))
    apart.load_state_dict(reference.state_dict())
    use_document_attention(apart)
    windows = torch.randint(0, 256, (3, 41), generator=torch.Generator().manual_seed(4))
    windows[1, [12, 30]] = 256
    expected_logits, expected_loss = documents_alone(reference, windows, 256)
    before = KERNELS["SDPA per document"]
    ours = CausalLMLoss(apart, 256)
    logits = window_logits(apart, windows, 256)[0]
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-5)
    assert KERNELS["SDPA per document"] > before
    ours(windows).backward()
    expected_loss.backward()
    torch.testing.assert_close(grads(apart), grads(reference), rtol=0, atol=1e-5)
    unwindowed = MistralForCausalLM(copy.deepcopy(config))
    unwindowed.load_state_dict(reference.state_dict())
    unwindowed.config.sliding_window = None
    use_document_attention(unwindowed)
    assert (window_logits(unwindowed, windows, 256)[0] - expected_logits).abs().max() > 1e-3


def test_document_attention_refuses_a_model_that_would_ignore_it():
    from transformers import BloomConfig, BloomForCausalLM

    from raytrain.attention import use_document_attention
    model = BloomForCausalLM(BloomConfig(vocab_size=50, hidden_size=16, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="BloomForCausalLM does not use transformers' AttentionInterface"):
        use_document_attention(model)


def test_weight_decay_only_on_linear_weight_matrices():
    from raytrain.engine import param_groups
    from raytrain.loading import load_config
    from raytrain.model import build_model
    model = build_model(load_config(environment=False).model, 257, 256)
    decay, rest = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and rest["weight_decay"] == 0.0
    linear = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)} - \
        {id(model.model.embed_tokens.weight)}  # the tied output head is the embedding
    assert {id(p) for p in decay["params"]} == linear and len(linear) == 4 * 7  # q k v o gate up down per layer
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("norm" in names[id(p)] or "embed" in names[id(p)] for p in rest["params"])
    assert len(decay["params"]) + len(rest["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("pretrained", [False, True])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(tmp_path, pretrained):
    from raytrain.loading import load_config
    from raytrain.model import build_model
    keys = ["model.hidden_size=32", "model.num_layers=2", "model.intermediate_size=64"]
    if pretrained:
        build_model(load_config(None, keys, environment=False).model, 257, 256).save_pretrained(tmp_path)
        keys = [f"model.pretrained={tmp_path}"]
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_model(load_config(None, keys + [f"model.activation_checkpointing={checkpointing}"],
                                        environment=False).model, 257, 256)
        assert model.is_activation_checkpointing == checkpointing
        model.train()
        windows = torch.randint(0, 257, (3, 33), generator=torch.Generator().manual_seed(1))
        loss = CausalLMLoss(model, eot=256)(windows)
        loss.backward()
        results.append((loss.detach(), grads(model)))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=0, atol=1e-6)


def _model(layers: int):
    from raytrain.config import ModelConfig
    from raytrain.model import tiny_llama
    torch.manual_seed(0)
    config = tiny_llama(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), 257, 256)
    config.num_hidden_layers = layers  # 0: embedding, final norm and head only
    return LlamaForCausalLM(config)


def test_position_buckets_are_powers_of_two_cut_at_the_window():
    from raytrain.loss import position_buckets
    assert position_buckets(100) == [(0, 0), (1, 1), (2, 3), (4, 7), (8, 15), (16, 31), (32, 63), (64, 99)]
    assert position_buckets(512)[-1] == (256, 511) and position_buckets(1) == [(0, 0)]


@pytest.mark.parametrize("eot", [None, 256])
def test_position_buckets_sum_back_to_the_overall_loss_and_match_an_independent_count(eot):
    """Token-weighted, the buckets give val/loss@L (1e-6); each bucket equals cross-entropy computed directly
    on the same windows at those positions."""
    from raytrain.data import TokenStream
    from raytrain.evaluate import evaluate
    from raytrain.runlog import position_losses
    from raytrain.steps import eval_offsets
    stream = TokenStream([np.random.RandomState(1).randint(0, 257, size=5000)])
    model = _model(2)
    results = evaluate(CausalLMLoss(model, eot), stream, [100, 64], 1600, lambda length: 300 // length)
    for length in (100, 64):
        buckets = position_losses(results, length)
        weighted = sum((b - a + 1) * loss for a, b, loss in buckets) / length  # every position has every row
        assert weighted == pytest.approx(results[f"val/loss@{length}"], rel=1e-6)
        windows = torch.from_numpy(stream.windows(eval_offsets(stream.size, length, 1600), length))
        with torch.no_grad():
            from raytrain.loss import window_logits
            logits, targets = window_logits(model, windows, eot)
            each = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (rows, L)
        for a, b, loss in buckets:
            assert loss == pytest.approx(each[:, a:b + 1].mean().item(), rel=1e-5)


def test_a_model_that_ignores_context_has_equal_losses_in_every_bucket():
    """Zero transformer blocks: the logits at a position depend on that token alone. On a stream of one token
    repeated, every position sees the same input and target, so every bucket has the same loss."""
    from raytrain.data import TokenStream
    from raytrain.evaluate import evaluate
    from raytrain.runlog import position_losses
    results = evaluate(CausalLMLoss(_model(0)), TokenStream([np.full(3000, 97)]), [128], 1024, lambda length: 4)
    losses = [loss for *_, loss in position_losses(results, 128)]
    assert len(losses) == 8 and losses == pytest.approx([results["val/loss@128"]] * 8, rel=1e-6)
    # the same model with attention on a real stream does not: the buckets differ
    stream = TokenStream([np.random.RandomState(2).randint(0, 257, size=3000)])
    mixed = [loss for *_, loss in position_losses(evaluate(CausalLMLoss(_model(2)), stream, [128], 1024,
                                                             lambda length: 4), 128)]
    assert max(mixed) - min(mixed) > 1e-4


@pytest.mark.parametrize("eot,bf16", [(None, False), (256, False), (None, True)])
def test_chunked_loss_equals_the_whole_logits_loss_with_the_same_gradients(eot, bf16):
    """The head and loss in chunks of 7 positions (not dividing 3 x 20), recomputed in the backward: the same
    loss and gradients as materializing all logits (1e-6; bf16 within autocast's own rounding)."""
    torch.manual_seed(3)
    windows = torch.randint(0, 257, (3, 21))
    windows[1, 9] = 256
    grads = []
    for chunk in (None, 7):
        model = _model(2) if bf16 else _model(2).double()  # fp64: only the summation order differs
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = CausalLMLoss(model, eot, chunk)(windows)
        loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    (whole, g_whole), (chunked, g_chunked) = grads
    tolerance = 1e-2 if bf16 else 1e-6
    assert chunked == pytest.approx(whole, rel=tolerance)
    for a, b in zip(g_whole, g_chunked):
        assert (a - b).abs().max() <= tolerance * a.abs().max()


@pytest.mark.parametrize("cross_documents", [True, False])
def test_eval_documents_sets_the_validation_windows_alone(cross_documents):
    """``eval.documents``: training's loss stays as data.cross_documents says; validation keeps documents apart
    or crosses them as asked, equal to a module built that way (1e-12), and the two footings differ."""
    from raytrain.data import TokenStream
    from raytrain.evaluate import evaluate
    from raytrain.loss import document_eots
    stream = TokenStream([np.random.RandomState(2).choice([97, 98, 256], size=3000, p=[0.45, 0.45, 0.1])])
    model = _model(2)
    windows = torch.from_numpy(stream.windows(np.array([0, 500]), 64))
    train_eot, _ = document_eots(cross_documents, "as_trained", 256)
    assert document_eots(cross_documents, "as_trained", 256) == (train_eot, train_eot)
    scores = {}
    for documents, eot in (("apart", 256), ("crossed", None)):
        ours = CausalLMLoss(model, *document_eots(cross_documents, documents, 256)[:1],
                            eval_eot=document_eots(cross_documents, documents, 256)[1])
        with torch.no_grad():
            assert ours(windows).item() == pytest.approx(CausalLMLoss(model, train_eot)(windows).item(), rel=1e-12)
        scores[documents] = evaluate(ours, stream, [64], 640, lambda length: 4)["val/loss@64"]
        alone = evaluate(CausalLMLoss(model, eot), stream, [64], 640, lambda length: 4)["val/loss@64"]
        assert scores[documents] == pytest.approx(alone, rel=1e-12)
    assert abs(scores["apart"] - scores["crossed"]) > 1e-4  # an untrained model: 5e-4 apart
