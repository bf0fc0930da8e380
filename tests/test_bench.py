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
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
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
