"""raytrain prepare: Ray Data tasks write the same token stream as a single-process reference, whatever the
number of tasks, for every input kind; a kill mid-way resumes; bad records are named; workers never tokenize."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raytrain.data import open_corpus
from raytrain.loading import load_config
from raytrain.prepare import prepare
from raytrain.section import ConfigError
from tests.reference import reference_stream, split

pytestmark = pytest.mark.ray


def data_config(path, cache, **keys):
    overrides = [f"data.cache_dir={cache}"] + [f"data.{k}={v}" for k, v in keys.items()]
    if path is not None:
        overrides.append(f"data.path={path}")
    return load_config(None, overrides, only=("data", "tokenizer")).data


def stream_of(directory: Path) -> tuple[np.ndarray, np.ndarray]:
    corpus = open_corpus(directory)
    return corpus.train[0:corpus.train.size].astype(np.int64), corpus.val[0:corpus.val.size].astype(np.int64)


def assert_matches_reference(directory, source, tokenizer, val_fraction=0.02, field="text"):
    train, val = stream_of(directory)
    ref_train, ref_val = split(reference_stream(Path(source), tokenizer, field), val_fraction)
    assert train.size == ref_train.size and val.size == ref_val.size
    assert np.array_equal(train, ref_train) and np.array_equal(val, ref_val)


def test_builtin_corpus_equals_the_reference_for_any_number_of_tasks(ray_session, tokenizer, tmp_path, capsys):
    from raytrain.sources import builtin_files
    one = prepare(data_config(None, tmp_path / "a"), "bytes")  # 32 MiB tasks: the 6 MB corpus in one
    many = prepare(data_config(None, tmp_path / "b", shard_bytes=500_000), "bytes")  # about 13 tasks
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("prepared ") and " MB/s), " in out[-1] and out[-1].endswith(f", in {many}")
    index = json.loads((many / "index.json").read_text())
    assert len(index["train"]) >= 10 and index["dtype"] == "uint16" and index["eot"] == 256
    ids = []
    for path in builtin_files():  # the reference, over the same files
        text = Path(path).read_bytes().decode("utf-8", errors="replace")
        if text:
            ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [256]
    ref_train, ref_val = split(np.asarray(ids), 0.02)
    for directory in (one, many):
        train, val = stream_of(directory)
        assert np.array_equal(train, ref_train) and np.array_equal(val, ref_val)
    assert index["documents"] == sum(1 for p in builtin_files() if Path(p).stat().st_size)
    for shard in index["train"] + index["val"]:  # each shard: a flat little-endian array of its token count
        assert (many / shard["path"]).stat().st_size == 2 * shard["tokens"]


@pytest.fixture(scope="module")
def every_kind(tmp_path_factory):
    """A directory of every input kind, with multi-part jsonl, multi-row-group parquet and odd records."""
    root = tmp_path_factory.mktemp("kinds")
    rng = np.random.default_rng(0)
    words = ["def", "ray", "train", "é", "€", "日本", "\n", "  ", "x=1;"]
    doc = lambda: "".join(rng.choice(words, rng.integers(0, 60)))  # noqa: E731 (some documents are empty)
    (root / "a.txt").write_text(doc() + "first")
    (root / "b.md").write_text("# title\n" + doc())
    (root / "sub").mkdir()
    (root / "sub" / "c.jsonl").write_text("".join(json.dumps({"text": doc(), "id": i}) + "\n" for i in range(300)))
    (root / "sub" / "d.py").write_bytes(b"print('hi')\n\xff\xfe broken bytes \x80\n")
    pq.write_table(pa.table({"text": [doc() for _ in range(250)]}), root / "e.parquet", row_group_size=40)
    (root / "z.jsonl").write_text(json.dumps({"text": "last doc"}) + "\n\n")
    (root / "ignored.csv").write_text("not,read\n")
    return root


@pytest.fixture(scope="module")
def hf_dataset(tmp_path_factory):
    """A Hugging Face datasets directory as save_to_disk writes it: Arrow IPC streams listed in state.json."""
    root = tmp_path_factory.mktemp("hf")
    names = []
    for i in range(2):
        name = f"data-{i:05d}-of-00002.arrow"
        table = pa.table({"content": [f"record {i}-{j} " * (j % 7) for j in range(120)], "n": list(range(120))})
        with pa.OSFile(str(root / name), "wb") as f, pa.ipc.new_stream(f, table.schema) as writer:
            writer.write_table(table, max_chunksize=50)
        names.append({"filename": name})
    (root / "state.json").write_text(json.dumps({"_data_files": names, "_split": "train"}))
    (root / "dataset_info.json").write_text("{}")
    return root


def test_every_input_kind_equals_the_reference(ray_session, tokenizer, every_kind, monkeypatch, tmp_path):
    import raytrain.sources
    monkeypatch.setattr(raytrain.sources, "JSONL_PART_BYTES", 700)  # cut the .jsonl files in many parts
    for shard_bytes in (10**9, 3000):
        directory = prepare(data_config(every_kind, tmp_path / f"cache{shard_bytes}", shard_bytes=shard_bytes,
                                        val_fraction=0.1), "bytes")
        assert_matches_reference(directory, every_kind, tokenizer, 0.1)
    index = json.loads((directory / "index.json").read_text())
    assert index["replaced_characters"] == 3 and index["empty_documents"] > 0  # b"\xff\xfe" and b"\x80"


def test_datasets_directory_and_file_uri(ray_session, tokenizer, hf_dataset, every_kind, tmp_path):
    directory = prepare(data_config(hf_dataset, tmp_path / "hf", text_field="content"), "bytes")
    assert_matches_reference(directory, hf_dataset, tokenizer, field="content")
    uri = prepare(data_config(f"file://{every_kind}/sub/c.jsonl", tmp_path / "uri"), "bytes")
    assert_matches_reference(uri, every_kind / "sub" / "c.jsonl", tokenizer)


@pytest.mark.parametrize("lines,field,message", [
    (['{"text": "ok"}', '{"body": "no text"}'], "text",
     "data.text_field = 'text': missing in {path} line 2; its fields: ['body']"),
    (['{"text": "ok"}', "", '{"text": 5}'], "text", "data.text_field = 'text': {path} line 3 holds 5, not text"),
    (['{"text": "ok"}', "{not json"], "text", "data.path = '{path}': line 2 is not JSON"),
    (['{"text": ""}', '{"text": ""}'], "text", "contains no text (every document is empty)"),
])
def test_bad_records_are_named_and_nothing_half_written_is_left(ray_session, tmp_path, lines, field, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    cache = tmp_path / "cache"
    with pytest.raises(ConfigError) as err:
        prepare(data_config(path, cache, text_field=field), "bytes")
    assert message.format(path=path) in str(err.value)
    assert not [p for p in (cache / "tokens").iterdir() if p.is_dir()]  # no shard, no partial directory


def test_parquet_row_without_text_is_named(ray_session, tmp_path):
    pq.write_table(pa.table({"text": ["a", "b", None, "d"]}), tmp_path / "t.parquet", row_group_size=2)
    with pytest.raises(ConfigError, match=r"row 2 of .*t.parquet holds None, not text"):
        prepare(data_config(tmp_path / "t.parquet", tmp_path / "cache"), "bytes")


def big_corpus(root: Path) -> Path:
    """About 12 MB of JSONL in 24 files: long enough to kill a prepare mid-way."""
    root.mkdir()
    rng = np.random.default_rng(1)
    for i in range(24):
        with open(root / f"part-{i:03d}.jsonl", "w") as f:
            for _ in range(500):
                f.write(json.dumps({"text": "".join(rng.choice(list("abcdef ghij\n"), 1000))}) + "\n")
    return root


def test_killed_prepare_resumes_to_the_identical_cache_and_concurrent_prepares_agree(ray_session, tokenizer,
                                                                                      tmp_path):
    import ray
    source = big_corpus(tmp_path / "big")
    command = [sys.executable, "-m", "raytrain.cli", "prepare", f"data.path={source}", "data.shard_bytes=500000",
               f"data.cache_dir={tmp_path / 'cache'}"]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tokens = tmp_path / "cache" / "tokens"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(tokens.glob("*.partial/unit-*.json"))) < 3:
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)  # mid-way: some shards whole, others being written
    first.wait()
    done = len(list(tokens.glob("*.partial/unit-*.json")))
    assert 3 <= done < 24 and not list(tokens.glob("*/index.json"))  # nothing looks complete
    # two commands at once on the same key: one resumes it, the other waits and finds it done
    again = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in again]
    assert [p.returncode for p in again] == [0, 0], outputs
    paths = {out.strip().splitlines()[-1] for out, _ in outputs}
    assert len(paths) == 1
    assert any("resuming: " in out + err for out, err in outputs)
    assert_matches_reference(Path(paths.pop()), source, tokenizer)


def test_a_worker_that_cannot_see_the_corpus_refuses_before_step_1(ray_session, tmp_path, cache_dir):
    from ray.train import RunConfig
    from ray.train.torch import TorchTrainer

    from raytrain.train import train_worker
    cfg = load_config(None, ["scaling.num_workers=1", f"data.cache_dir={cache_dir}"])
    trainer = TorchTrainer(train_worker, train_loop_config={
        "config": cfg.model_dump(mode="json"), "run_dir": str(tmp_path / "run"),
        "corpus": str(tmp_path / "node-local" / "tokens" / "abc"), "tokenizer_dir": str(tmp_path)},
        run_config=RunConfig(name="unseen", storage_path=str(tmp_path)))
    with pytest.raises(Exception) as err:
        trainer.fit()
    text = str(err.value)
    assert f"data.cache_dir = '{cache_dir}': the prepared corpus {tmp_path}/node-local/tokens/abc is not visible on " \
           "this node; data.cache_dir must be a path every node shares" in text
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_training_workers_never_tokenize(ray_session, cache_dir, tmp_path):
    """Every tokenizer entry point raises inside the training workers; the run still trains and exports."""
    from raytrain.launch import fit
    from tests.helpers import TINY
    from tests.hooks import worker_hook

    cfg = load_config(None, TINY + [f"data.cache_dir={cache_dir}", f"run.dir={tmp_path}", "run.name=no-tokenizer",
                                    "train.max_steps=2"])
    hooked = tmp_path / "hooked"
    hooked.mkdir()
    fit(cfg, runtime_env=worker_hook("forbid_tokenizing", RAYTRAIN_HOOKED=str(hooked)))
    assert len(list(hooked.iterdir())) >= 2  # both workers ran the hook
    assert len((tmp_path / "no-tokenizer" / "metrics.jsonl").read_text().splitlines()) == 2
    assert (tmp_path / "no-tokenizer" / "model" / "tokenizer.json").is_file()
