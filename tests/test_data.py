import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from raytrain.config import ConfigError, DataConfig, ModelConfig
from raytrain.data import (SequentialOffsets, check_corpus, eval_offsets, gather_windows, prepare_corpus,
                           random_offsets, rank_batches)
from raytrain.model import check_vocab

TEXT = "def f(x):\n    return x * 2  # é€\n"


def test_byte_tokenizer_ids_are_utf8_bytes_and_survive_save(tokenizer, tmp_path):
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert ids == list(TEXT.encode("utf-8"))
    assert len(tokenizer) == 257 and tokenizer.eos_token_id == 256
    assert tokenizer.decode(ids) == TEXT
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert again(TEXT, add_special_tokens=False)["input_ids"] == ids and again.eos_token_id == 256


def corpus_for(path, tokenizer, cache, **kw):
    return prepare_corpus(DataConfig(path=str(path), cache_dir=str(cache), **kw), tokenizer)


def test_text_file_tokens_and_split(tokenizer, tmp_path):
    (tmp_path / "a.txt").write_text(TEXT * 50)
    corpus = corpus_for(tmp_path / "a.txt", tokenizer, tmp_path / "cache", val_fraction=0.1)
    stream = np.concatenate([corpus.train, corpus.val])
    expected = list((TEXT * 50).encode()) + [256]
    assert stream.tolist() == expected
    assert corpus.val.size == int(len(expected) * 0.1)


def test_cache_is_reused_until_inputs_change(tokenizer, tmp_path):
    path = tmp_path / "a.txt"
    path.write_text(TEXT * 10)
    first = corpus_for(path, tokenizer, tmp_path / "cache")
    stamp = (first.directory / "train.bin").stat().st_mtime_ns
    again = corpus_for(path, tokenizer, tmp_path / "cache")
    assert again.directory == first.directory and (again.directory / "train.bin").stat().st_mtime_ns == stamp
    path.write_text(TEXT * 11)
    changed = corpus_for(path, tokenizer, tmp_path / "cache")
    assert changed.directory != first.directory
    assert changed.train.size + changed.val.size == len((TEXT * 11).encode()) + 1


def test_jsonl_parquet_and_directories(tokenizer, tmp_path):
    docs = ["first doc", "second", "third one"]
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs[:2]))
    pq.write_table(pa.table({"body": docs[2:]}), folder / "b.parquet")
    (folder / "ignored.bin").write_bytes(b"\x00\x01")
    corpus = corpus_for(folder, tokenizer, tmp_path / "cache", text_field="body", val_fraction=0.05)
    stream = np.concatenate([corpus.train, corpus.val]).tolist()
    expected = []
    for d in docs:
        expected += list(d.encode()) + [256]
    assert stream == expected
    with pytest.raises(ConfigError, match="data.text_field = 'text': missing in .*a.jsonl line 1"):
        corpus_for(folder, tokenizer, tmp_path / "cache2")


def test_directory_without_data_files(tokenizer, tmp_path):
    (tmp_path / "x.bin").write_bytes(b"1")
    with pytest.raises(ConfigError, match="holds no"):
        corpus_for(tmp_path, tokenizer, tmp_path / "cache")


def test_corpus_shorter_than_one_window(tokenizer, tmp_path):
    (tmp_path / "a.txt").write_text("x" * 300)
    corpus = corpus_for(tmp_path / "a.txt", tokenizer, tmp_path / "cache", val_fraction=0.1)
    with pytest.raises(ConfigError) as err:
        check_corpus(corpus, 512, [16, 64])
    text = str(err.value)
    assert "the train split has 271 tokens, fewer than one window of lengths.max + 1 = 513" in text
    assert "eval.lengths = 64: the validation split has 30 tokens, fewer than one window of 65" in text
    assert "eval.lengths = 16" not in text


def test_tokenizer_larger_than_model_vocabulary(tokenizer, tmp_path):
    config = LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="has 257 tokens but model.pretrained embeds only 100"):
        check_vocab(ModelConfig(pretrained=str(tmp_path)), tokenizer, "bytes")


def test_step_batch_shapes_budget_and_no_padding():
    stream = np.arange(10_000) % 251
    for length in (8, 24, 128):
        rows = 1000 // length
        offsets = random_offsets(stream.size, 1, 4, length, rows)
        chunks = rank_batches(stream, offsets, length, micro_tokens=10**9, rank=0, world=1)
        windows = np.concatenate(chunks)
        assert windows.shape == (rows, length + 1)
        assert 1000 - length < rows * length <= 1000  # constant token budget
        for row, start in zip(windows, offsets):  # every window is a contiguous slice: nothing padded
            assert row.tolist() == stream[start:start + length + 1].tolist()


@pytest.mark.parametrize("world,micro_tokens", [(2, 10**9), (2, 64), (3, 40), (1, 64)])
def test_global_batch_is_independent_of_workers_and_micro_batches(world, micro_tokens):
    stream = np.random.default_rng(0).integers(0, 257, 50_000)
    offsets = random_offsets(stream.size, 0, 9, 32, 13)
    reference = np.concatenate(rank_batches(stream, offsets, 32, 10**9, 0, 1))
    parts = [rank_batches(stream, offsets, 32, micro_tokens, r, world) for r in range(world)]
    assert len({len(p) for p in parts}) == 1  # equally many micro-batches on every rank
    assert all(c.shape[0] <= max(1, micro_tokens // 32) for p in parts for c in p)
    assert np.array_equal(np.concatenate([c for p in parts for c in p]), reference)


def test_eval_windows_do_not_overlap():
    offsets = eval_offsets(1000, 64, 10_000)
    assert offsets.tolist() == [64 * i for i in range(15)]  # (1000 - 1) // 64 windows fit
    windows = gather_windows(np.arange(1000), offsets, 64)
    targets = windows[:, 1:].flatten()
    assert len(set(targets.tolist())) == targets.size == 15 * 64
    assert eval_offsets(1000, 64, 200).size == 3


def test_sequential_windows_target_every_token_once_per_epoch():
    n = 5_000
    lengths = [64, 16, 128, 48, 16, 96] * 40
    windows = SequentialOffsets(n, lambda step: lengths[step], tokens_per_step=512)
    targets = []
    for step, length in enumerate(lengths):
        rows = 512 // length
        for start in windows(step, length, rows):
            assert 0 <= start and start + length < n  # the whole window lies in the stream
            targets.extend(range(start + 1, start + length + 1))
    epochs, current = [], []
    for t in targets:  # an epoch ends where the targets jump back to the start
        if current and t <= current[-1]:
            epochs.append(current)
            current = []
        current.append(t)
    assert len(epochs) >= 2
    for epoch in epochs:
        assert epoch == list(range(1, len(epoch) + 1))  # consecutive, none twice, none skipped
        assert n - 1 - len(epoch) < 128  # only a tail shorter than one window is left out
    fresh = SequentialOffsets(n, lambda step: lengths[step], tokens_per_step=512)
    assert fresh(100, lengths[100], 512 // lengths[100]).tolist() == \
        windows(100, lengths[100], 512 // lengths[100]).tolist()  # a resumed run continues exactly
