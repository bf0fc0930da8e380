"""Integration: real Ray Train workers running real DeepSpeed engines on CPU."""
import contextlib
import io
import json

import pytest
import torch
import yaml

from raytrain.cli import main
from raytrain.loading import load_config
from raytrain.steps import build_schedule
from tests.helpers import TINY, checkpoint_dirs, read_jsonl

pytestmark = pytest.mark.ray

RUNS = {  # name: extra overrides
    "zero1": ["deepspeed.zero_stage=1"],  # through the CLI, end to end
    "zero2": ["deepspeed.zero_stage=2"],
    "zero3": ["deepspeed.zero_stage=3"],
    "one_worker": ["deepspeed.zero_stage=0", "scaling.num_workers=1"],  # 1 rank x 4 micro-batches
    # bf16 at ZeRO 1 and 2 runs through the engine in tests/test_engine.py (2 gloo ranks, the GPU's autocast view)
    **{f"bf16_zero{stage}": [f"deepspeed.zero_stage={stage}", "train.precision=bf16"] for stage in (0, 3)},
    "bf16_one_worker": ["deepspeed.zero_stage=0", "scaling.num_workers=1", "train.precision=bf16"],
    # recomputed blocks, and the head and loss 48 positions at a time: one run, each changes no number
    "recompute_chunked_zero3": ["deepspeed.zero_stage=3", "model.activation_checkpointing=true",
                                "train.loss_chunk_tokens=48"],
}
# bf16 against fp32 over the same 6 steps: bf16 keeps 8 significant bits (relative rounding up to 2**-9 = 0.2%
# per value), but the errors are independent across the 1,024 targets a step averages, so the loss moves by
# about 0.2% / sqrt(1024) = 6e-5 (measured: at most 7.3e-5 at any stage). 1e-3 allows 6 steps of drift with
# a margin; a run that silently stayed in fp32 is caught by the difference being exactly 0.
BF16_REL = 1e-3


@pytest.fixture(scope="module")
def runs(ray_session, cache_dir, tmp_path_factory):
    from raytrain.launch import fit
    from raytrain.ops import COMM_OP, extensions_dir
    root = tmp_path_factory.mktemp("runs")
    common = TINY + [f"data.cache_dir={cache_dir}", f"run.dir={root}"]
    for name, extra in RUNS.items():
        overrides = common + extra + [f"run.name={name}"]
        if name == "zero1":  # through the CLI, with the lock a killed op build leaves behind
            stale = extensions_dir() / COMM_OP / "lock"
            stale.parent.mkdir(parents=True, exist_ok=True)
            stale.touch()
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                assert main(["train", *overrides]) == 0
            (root / "zero1.out").write_text(out.getvalue())
            assert not stale.exists()
        else:
            fit(load_config(None, overrides))
    return root


def test_a_lock_left_by_a_killed_op_build_is_reported_and_cleared(runs):
    from raytrain.ops import COMM_OP, extensions_dir
    out = (runs / "zero1.out").read_text()
    assert f"warning: removed a lock file left by a build that did not finish ({extensions_dir() / COMM_OP}/lock)" \
        in out
    assert (runs / "zero1" / "model" / "model.safetensors").is_file()  # and the run finished


def test_run_directory_files(runs):
    run = runs / "zero1"
    cfg = load_config(str(run / "config.yaml"))
    assert cfg.run.name == "zero1" and cfg.deepspeed.zero_stage == 1 and cfg.train.max_steps == 6
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert {"step", "tokens", "seq_len", "loss", "lr", "tokens_per_s"} <= set(metrics[0])
    evals = read_jsonl(run / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 3, 6]
    buckets = {64: ["0-0", "1-1", "2-3", "4-7", "8-15", "16-31", "32-63"]}
    buckets[256] = buckets[64] + ["64-127", "128-255"]
    assert set(evals[0]) == {"step", "tokens", "val/loss@64", "val/ppl@64", "val/loss@256", "val/ppl@256"} | {
        f"val/loss@{L}/pos{b}" for L, names in buckets.items() for b in names}
    assert checkpoint_dirs(run)  # Ray checkpoints with every rank's shards
    shards = {p.name for p in checkpoint_dirs(run)[-1].rglob("*.pt")}
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= shards


def test_lengths_and_token_counts_follow_the_schedule(runs):
    metrics = read_jsonl(runs / "zero1" / "metrics.jsonl")
    schedule = build_schedule({"schedule": "uniform", "min": 32, "max": 128, "multiple_of": 32}, seed=0)
    lengths = [schedule(step) for step in range(6)]
    assert [m["seq_len"] for m in metrics] == lengths
    assert [m["rows"] for m in metrics] == [1024 // L for L in lengths]
    tokens, expected = 0, []
    for L in lengths:
        tokens += (1024 // L) * L
        expected.append(tokens)
    assert [m["tokens"] for m in metrics] == expected


def test_loss_starts_near_uniform_and_falls(runs):
    metrics = read_jsonl(runs / "zero1" / "metrics.jsonl")
    evals = read_jsonl(runs / "zero1" / "eval.jsonl")
    assert abs(evals[0]["val/loss@64"] - torch.log(torch.tensor(257.0)).item()) < 0.3
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.3
    assert evals[-1]["val/loss@64"] < evals[0]["val/loss@64"] - 0.3
    assert evals[-1]["val/ppl@64"] == pytest.approx(torch.exp(torch.tensor(evals[-1]["val/loss@64"])).item())


@pytest.mark.parametrize("name", ["zero1", "zero3", "one_worker"])
def test_records_carry_model_tflops_mfu_grad_norm_and_memory(runs, name):
    from raytrain.model import build_model, model_shape
    cfg = load_config(str(runs / name / "config.yaml"), environment=False)
    model = build_model(cfg.model, 257, 256)
    previous = 0
    for m in read_jsonl(runs / name / "metrics.jsonl"):  # log_every = 1: one step per record
        flops = (m["tokens"] - previous) * model_shape(model).flops_per_token(m["seq_len"])
        previous = m["tokens"]
        assert m["tflops"] == pytest.approx(flops / m["interval_s"] / 1e12, rel=1e-9)
        assert m["mfu"] > 0 and m["grad_norm"] > 0 and 0 <= m["data_wait"] < 0.5 and 0 < m["peak_memory_gb"] < 1


@pytest.mark.parametrize("name", ["zero2", "zero3", "recompute_chunked_zero3"])
def test_zero_stages_match_step_for_step(runs, name):
    reference = read_jsonl(runs / "zero1" / "metrics.jsonl")
    other = read_jsonl(runs / name / "metrics.jsonl")
    assert [m["seq_len"] for m in other] == [m["seq_len"] for m in reference]
    assert [m["loss"] for m in other] == pytest.approx([m["loss"] for m in reference], rel=1e-5)
    assert read_jsonl(runs / name / "eval.jsonl")[-1]["val/loss@256"] == \
        pytest.approx(read_jsonl(runs / "zero1" / "eval.jsonl")[-1]["val/loss@256"], rel=1e-5)


def test_one_worker_sees_the_same_data_and_losses(runs):
    two = read_jsonl(runs / "zero1" / "metrics.jsonl")
    one = read_jsonl(runs / "one_worker" / "metrics.jsonl")
    assert [m["tokens"] for m in one] == [m["tokens"] for m in two]
    assert [m["loss"] for m in one] == pytest.approx([m["loss"] for m in two], rel=1e-4)


@pytest.mark.parametrize("name", ["zero1", "zero3"])
def test_exported_model_reloads_and_evaluates_to_the_reported_loss(runs, name, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model_dir = runs / name / "model"
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    assert AutoTokenizer.from_pretrained(model_dir, local_files_only=True).eos_token_id == 256
    assert sum(p.numel() for p in model.parameters()) > 0
    capsys.readouterr()
    assert main(["eval", str(model_dir)]) == 0
    ours = json.loads(capsys.readouterr().out)
    reported = read_jsonl(runs / name / "eval.jsonl")[-1]
    for key in ("val/loss@64", "val/loss@256"):
        assert ours[key] == pytest.approx(reported[key], abs=1e-5)
    assert yaml.safe_load((model_dir / "raytrain.yaml").read_text())["run"]["name"] == name


def test_export_of_a_zero3_checkpoint_equals_the_reported_loss(runs, capsys, tmp_path):
    final = checkpoint_dirs(runs / "zero3")[-1]
    assert main(["export", str(final), "--out", str(tmp_path / "exported")]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "exported")]) == 0
    ours = json.loads(capsys.readouterr().out)
    reported = read_jsonl(runs / "zero3" / "eval.jsonl")[-1]
    assert ours["val/loss@256"] == pytest.approx(reported["val/loss@256"], abs=1e-5)


def test_report_writes_plots_and_prints_the_table(runs, capsys):
    assert main(["report", str(runs / "zero1")]) == 0
    out = capsys.readouterr().out
    assert "| step | tokens | val/loss@64 | val/loss@256 |" in out
    final = read_jsonl(runs / "zero1" / "eval.jsonl")[-1]
    assert f"| 6 | {final['tokens']:,} | {final['val/loss@64']:.4f} | {final['val/loss@256']:.4f} |" in out
    for name in ("loss.png", "lengths.png", "eval.png", "positions.png"):
        assert (runs / "zero1" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(k for k in final if k.startswith("val/loss@256/")) == sorted(
        f"val/loss@256/pos{a}-{b}" for a, b in [(0, 0), (1, 1), (2, 3), (4, 7), (8, 15), (16, 31), (32, 63),
                                                 (64, 127), (128, 255)])
    assert main(["report", str(runs / "zero1"), str(runs / "zero3"), "--out", str(runs / "both.png")]) == 0
    assert (runs / "both.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("stage", [0, 3])
def test_bf16_runs_stay_near_fp32(runs, stage):
    fp32 = read_jsonl(runs / ("one_worker" if stage == 0 else f"zero{stage}") / "metrics.jsonl")
    if stage == 0:  # ZeRO-0 ran on one worker in fp32; its bf16 twin on two
        fp32 = read_jsonl(runs / "zero1" / "metrics.jsonl")
    bf16 = read_jsonl(runs / f"bf16_zero{stage}" / "metrics.jsonl")
    assert [m["tokens"] for m in bf16] == [m["tokens"] for m in fp32]
    differences = [abs(b["loss"] - f["loss"]) / f["loss"] for b, f in zip(bf16, fp32)]
    assert max(differences) < BF16_REL and max(differences) > 0  # near, and really in bf16
    final = read_jsonl(runs / f"bf16_zero{stage}" / "eval.jsonl")[-1]["val/loss@256"]
    assert final == pytest.approx(read_jsonl(runs / "zero1" / "eval.jsonl")[-1]["val/loss@256"], rel=BF16_REL)


def test_bf16_split_over_workers_or_micro_batches_agrees(runs):
    two = read_jsonl(runs / "bf16_zero0" / "metrics.jsonl")
    one = read_jsonl(runs / "bf16_one_worker" / "metrics.jsonl")  # 1 worker x 4 micro-batches, fp32 accumulation
    assert [m["loss"] for m in one] == pytest.approx([m["loss"] for m in two], rel=BF16_REL / 10)


def test_bf16_model_dir_equals_the_export_of_its_final_checkpoint(runs, tmp_path, capsys):
    from transformers import AutoModelForCausalLM
    for name in ("bf16_zero3", "bf16_zero0"):
        final = checkpoint_dirs(runs / name)[-1]
        assert main(["export", str(final), "--out", str(tmp_path / name)]) == 0
        ours = AutoModelForCausalLM.from_pretrained(runs / name / "model", local_files_only=True).state_dict()
        exported = AutoModelForCausalLM.from_pretrained(tmp_path / name, local_files_only=True).state_dict()
        assert set(ours) == set(exported) and all(v.dtype == torch.float32 for v in ours.values())
        assert all(torch.equal(ours[k], exported[k]) for k in ours)  # one final model, bit for bit
