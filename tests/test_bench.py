"""The bench scripts' own logic, on CPU: the GPU check's rows (what each asks for, how it is labelled) and its
refusal on a machine without a GPU."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from raytrain.loading import load_config

ROOT = Path(__file__).resolve().parents[1]


def bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("gpus", [1, 8])
def test_gpu_check_rows_run_on_every_gpu_of_any_type(gpus, tmp_path):
    check = bench("gpu_check")
    rows = check.rows(gpus)
    assert ("uniform 256-2048, ZeRO-3" in rows) == (gpus > 1)  # one GPU runs ZeRO-0 whatever is asked
    keys = check.common(gpus, 16, 60, str(tmp_path / "model"), str(tmp_path))
    for name, extra in rows.items():
        cfg = load_config(str(check.CONFIG), keys + extra, environment=False)
        assert cfg.scaling.num_workers == gpus and cfg.scaling.resources_per_worker == {}  # no accelerator type
        assert cfg.scaling.cpus_per_worker == max(1, 16 // gpus - 1) and cfg.bf16
        assert cfg.model.pretrained == str(tmp_path / "model") and cfg.tokenizer == "bytes"
        assert cfg.data.cross_documents == ("crossed" in name)
        assert cfg.lengths.schedule == ("fixed" if "fixed" in name else "uniform")
        assert cfg.deepspeed.zero_stage == (3 if "ZeRO-3" in name else 2)
        assert cfg.train.compile == (False if "eager" in name else "auto")  # auto: compiled on a GPU
    probe = {"zero_stage": 0, "linear_dtype": "bfloat16", "attention": "varlen FlashAttention-2", "peak_gib": 9.5,
             "compiled": {"compilations": 3, "block_graphs": 2}}
    assert check.label(probe, "bf16") == "ZeRO-0, bf16, linear layers in bfloat16, attention varlen " \
                                         "FlashAttention-2, compiled (2 block graphs)"
    assert check.label({**probe, "compiled": {"compilations": 0}}, "bf16").endswith(", eager")


def test_gpu_check_says_in_one_line_that_there_is_no_gpu_and_exits_2():
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py")], capture_output=True, text=True,
                          timeout=120, env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2, done.stderr
    assert done.stdout.startswith("bench/gpu_check.py: no CUDA GPU visible to torch") and \
        len(done.stdout.strip().splitlines()) == 1


def test_study_counts_flops_per_step_and_interpolates_the_time_flops_and_tokens_to_target(tmp_path):
    """bench/study.py: a run's model FLOPs per step from steps.json and its model (counted here by hand from the
    Llama's shapes), and the point where val/loss first reaches the target, interpolated between evaluations."""
    import json

    from transformers import LlamaConfig
    study = bench("study")
    h, inter, layers, vocab = 16, 48, 2, 257
    LlamaConfig(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=2,
                num_key_value_heads=2, vocab_size=vocab).save_pretrained(tmp_path / "model")
    steps = [[64, 256], [128, 256], [128, 300], [256, 256]]  # (L, budget): budget // L rows of L targets
    (tmp_path / "steps.json").write_text(json.dumps(steps))
    weights = layers * (4 * h * h + 3 * h * inter) + h * vocab  # q, k, v, o; gate, up, down; the head
    per_token = {L: 6 * weights + 12 * layers * h * L for L in (64, 128, 256)}  # 3 x (2 W + 4 layers h L)
    expected, total = {0: 0.0}, 0.0
    for i, (length, budget) in enumerate(steps, start=1):
        total += (budget // length) * length * per_token[length]
        expected[i] = total
    flops = study.cumulative_flops(tmp_path)
    assert flops == pytest.approx(expected, rel=1e-12) and flops[3] - flops[2] == 256 * per_token[128]

    run = study.Run(evals=[{"step": 0, "tokens": 0, "k": 5.0}, {"step": 2, "tokens": 512, "k": 4.0},
                           {"step": 4, "tokens": 1024, "k": 3.0}],
                    metrics=[], seconds={0: 0.0, 2: 10.0, 4: 30.0}, tokens={0: 0, 2: 512, 4: 1024}, flops=flops)
    seconds, at_flops, tokens = run.reach("k", 3.25)  # three quarters of the way from step 2 to step 4
    assert (seconds, tokens) == pytest.approx((25.0, 896.0)) and at_flops == pytest.approx(
        flops[2] + 0.75 * (flops[4] - flops[2]))
    assert run.reach("k", 2.9) is None and run.reach("k", 6.0) == (0.0, 0.0, 0)
