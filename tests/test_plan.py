"""raytrain plan: the shipped GPU configs fit, what cannot fit is refused with its numbers, the estimate
matches a real run's measured peak, and raytrain tune plans its candidates and sizes its concurrency."""
import subprocess
import sys
from pathlib import Path

import pytest

from raytrain.loading import load_config
from raytrain.plan import GiB, model_state_bytes, plan_run
from raytrain.steps import step_shape

ROOT = Path(__file__).resolve().parents[1]
GPU_CONFIGS = sorted((ROOT / "cluster" / "configs").glob("*.yaml"))


def plan_cli(*args):
    return subprocess.run([sys.executable, "-m", "raytrain.cli", "plan", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_gpu_config_plans_and_fits(path):
    done = plan_cli("-c", str(path), "--vocab", "50257")
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    cfg = load_config(str(path), environment=False)
    assert f"workers: {cfg.scaling.num_workers} x (8 CPU, 1 GPU (A10G)), placement PACK" in out
    assert f"shortest L={cfg.lengths.min}:" in out and f"longest L={cfg.lengths.max}:" in out
    assert f"'zero_optimization': {{'stage': {cfg.deepspeed.zero_stage}, 'overlap_comm': True" in out
    assert "'torch_autocast': {'enabled': True, 'dtype': 'bfloat16', 'lower_precision_safe_modules': []}" in out
    assert "fits: A10G has 22.5 GiB (90% usable): 20.2 GiB" in out and " h (" in out


def test_a_config_that_cannot_fit_is_refused_with_memory_needed_and_available():
    done = plan_cli("-c", str(ROOT / "cluster/configs/gpu-350m-zero3.yaml"), "--vocab", "50257",
                    "deepspeed.zero_stage=0", "train.micro_batch_tokens=16384")
    assert done.returncode == 1
    refusal = done.stdout.strip().splitlines()[-1]
    assert refusal.startswith("raytrain plan: does not fit: needs ") and "A10G has 22.5 GiB" in refusal
    needed = float(refusal.split("needs ")[1].split(" GiB")[0])
    assert needed > 20.2 and "model states 5.36" in refusal  # 16 bytes x 360M parameters at ZeRO-0
    assert "gradient all-reduce copy 1.34" in refusal  # ZeRO-0 flattens every gradient to all-reduce it


def test_model_states_follow_deepspeeds_estimators_with_fp32_weights():
    """Independent arithmetic: fp32 weights (4) + fp32 gradients (4) + fp32 master copy (4) + Adam (8)."""
    P, N = 124_000_000, 8
    assert model_state_bytes(0, P, N) == 16 * P
    assert model_state_bytes(1, P, N) == pytest.approx(4 * P + 4 * P + 12 * P / N, rel=1e-6)
    assert model_state_bytes(2, P, N) == pytest.approx(4 * P + 16 * P / N, rel=1e-6)
    assert model_state_bytes(3, P, N) == pytest.approx(20 * P / N, rel=1e-6)  # gathered layers: the buffers


def test_step_shapes_split_like_the_loop():
    shape = step_shape(248, 8192, None, 2)  # 33 rows over 2 ranks: 17 and 16
    assert (shape.rows, shape.rank_rows, shape.micro_batches, shape.micro_rows) == (33, 17, 1, 17)
    shape = step_shape(2048, 524288, 16384, 8)  # 256 rows, 32 per rank, 8 rows per 16K-token micro-batch
    assert (shape.rows, shape.rank_rows, shape.micro_batches, shape.micro_rows) == (256, 32, 4, 8)


def test_tune_skips_a_candidate_that_cannot_fit_and_counts_what_the_cluster_can_grow_to(tmp_path):
    from raytrain.tune import trials_that_fit
    from raytrain.tune_spec import base_path_of, candidates, load_spec
    from tests.helpers import write_spec
    path = write_spec(tmp_path, search={"model.hidden_size": {"grid": [32, 32768]}}, num_samples=1)
    trials, notes = candidates(load_spec(path), base_path_of(load_spec(path), path))
    assert trials == [{"model.hidden_size": 32}]
    assert len(notes) == 1 and "does not fit: needs" in notes[0] and "this machine's memory per rank" in notes[0]
    gpu = load_config(str(GPU_CONFIGS[0]), environment=False).scaling  # 8 GPUs per trial
    assert trials_that_fit(gpu, {"CPU": 8}, {"GPU": 16, "CPU": 192}) == 2  # scaled to zero, grows to 4 x 4 GPUs
    assert trials_that_fit(gpu, {"GPU": 8}, None) == 1  # no autoscaler: what is up now
    cpu = load_config(None, ["scaling.num_workers=2", "scaling.cpus_per_worker=1"], environment=False).scaling
    assert trials_that_fit(cpu, {"CPU": 2}, None) == 1


def test_gpu_workers_get_expandable_segments_unless_the_user_chose_an_allocator():
    from raytrain.launch import worker_env_vars
    assert worker_env_vars(True, {}) == {"DS_ACCELERATOR": "cuda",
                                         "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    assert worker_env_vars(True, {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:256"})["PYTORCH_CUDA_ALLOC_CONF"] == \
        "max_split_size_mb:256"
    assert worker_env_vars(False, {}) == {"DS_ACCELERATOR": "cpu"}


def test_chunked_loss_shrinks_the_logits_term_to_one_chunk():
    cfg = load_config(str(GPU_CONFIGS[0]), ["train.loss_chunk_tokens=null"], environment=False)
    whole = plan_run(cfg, vocab=50257, with_time=False).memory.logits
    chunked = plan_run(load_config(str(GPU_CONFIGS[0]), environment=False), vocab=50257, with_time=False).memory.logits
    assert whole == 8 * 2048 * 50257 * (12 + 2)  # the largest micro-batch: 8 rows x 2048, bf16 logits + fp32 loss
    assert chunked == 2048 * 50257 * (12 + 2)


def test_one_rank_runs_zero_0_because_zero_over_one_rank_partitions_nothing():
    from raytrain.engine import Buckets, deepspeed_config
    cfg = load_config(None, ["deepspeed.zero_stage=3"], environment=False)
    buckets = Buckets(block=2**16, largest_layer=2**15)
    assert deepspeed_config(cfg.deepspeed, cfg.train, 1, False, buckets)["zero_optimization"] == {"stage": 0}
    assert deepspeed_config(cfg.deepspeed, cfg.train, 2, False, buckets)["zero_optimization"]["stage"] == 3
    one = plan_run(load_config(None, ["scaling.num_workers=1"], environment=False), with_time=False)
    assert one.memory.states == 16 * one.params  # plain AdamW: weights, gradients, two moments, no master copy


def test_plan_refuses_an_unknown_gpu_and_an_unreadable_tokenizer_naming_the_fix(capsys):
    from raytrain.cli import main
    assert main(["plan", "--gpu", "T4"]) == 2
    assert "--gpu = 'T4': not a known GPU; one of ['A100', 'A100-40G', 'A100-80G', 'A10G'" in capsys.readouterr().err
    assert main(["plan", "-c", str(GPU_CONFIGS[0])]) == 2  # its tokenizer lives on the cluster's volume
    err = capsys.readouterr().err
    assert "tokenizer = '/mnt/shared/tokenizers/gpt2': cannot be read here" in err and "--vocab N" in err


def test_generate_refuses_bad_options_all_at_once_and_a_directory_without_a_model(tmp_path, capsys):
    from raytrain.cli import main
    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 2
    assert "MODEL_DIR = '" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    assert main(["generate", str(tmp_path), "--prompt", "x", "--max-new-tokens", "0", "--temperature", "-1",
                 "--top-p", "1.5"]) == 2
    err = capsys.readouterr().err
    assert "--max-new-tokens = 0: must be at least 1" in err and "--temperature = -1.0: must be 0 (greedy) or more" \
        in err and "--top-p = 1.5: must be in (0, 1]" in err


def measured_peak(rank, world, stage, precision, out):
    """Rank 0's measured peak over the memory probe and 4 steps of the built-in default (train.py's own gauge:
    resident memory above what the process held before the model was built)."""
    import numpy as np
    import torch

    from raytrain.data import TokenStream
    from raytrain.engine import set_lr
    from raytrain.meter import MemoryGauge
    from raytrain.runlog import NullRunLog
    from raytrain.steps import Planner
    from raytrain.train import build_engine, probe_memory, train_step
    cfg = load_config(None, [f"train.precision={precision}", f"deepspeed.zero_stage={stage}"], environment=False)
    tokens = np.random.default_rng(0).integers(0, 256, 200_000)
    tokens[::500] = 256
    stream = TokenStream([tokens])
    torch.manual_seed(0)
    memory = MemoryGauge()
    engine = build_engine(cfg, 257, 256, world)
    plan = Planner(cfg.lengths, cfg.train, cfg.data.windows, 0, stream.size, world)
    probe_memory(engine, plan, memory, NullRunLog())
    for step in range(4):
        set_lr(engine, 1e-3)
        train_step(engine, plan(step), plan(step).rank_batches(stream, rank), world)
    if rank == 0:
        torch.save(memory.peak(), out)


@pytest.mark.parametrize("stage, precision, within", [(1, "bf16", 0.15), (3, "bf16", 0.15), (1, "fp32", 0.35)])
def test_estimate_is_near_a_measured_peak(tmp_path, stage, precision, within, monkeypatch):
    """The built-in default on its 2 workers (2 gloo ranks here): the plan (model states, DeepSpeed's buffers and CPU
    all-reduce workspaces, activations as autocast keeps them, logits, weight casts) against rank 0's measured
    peak. glibc returns large blocks at free (MALLOC_MMAP_THRESHOLD_) so that the peak is what training holds.
    Measured 2026-12-03 in bf16: 0.215 GiB planned against 0.206 measured at ZeRO-1, 0.217 against 0.207 at
    ZeRO-3. In fp32 the plan is high (0.273 against 0.219, not yet explained); it errs on the safe side, and
    on a GPU bf16 is what runs."""
    from tests.ranks import run_ranks
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")  # the spawned ranks' allocator reads it at start
    cfg = load_config(None, [f"train.precision={precision}", f"deepspeed.zero_stage={stage}"], environment=False)
    estimate = plan_run(cfg, vocab=257, with_time=False).memory.total
    run_ranks(measured_peak, 2, stage, precision, tmp_path / "peak.pt")
    import torch
    measured = torch.load(tmp_path / "peak.pt")
    assert estimate == pytest.approx(measured, rel=within), (estimate / GiB, measured / GiB)
