"""Model FLOPs per token against torch's own FLOP counter, and the meter's per-interval telemetry."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import GPT2Config, GPT2LMHeadModel

from raytrain.loading import load_config
from raytrain.meter import Meter
from raytrain.model import build_model, model_shape
from raytrain.steps import ModelShape, StepPlan


def counted_flops_per_token(model, length: int, rows: int = 2) -> float:
    """Forward and backward under torch.utils.flop_counter (eager attention: the fused SDPA kernel is invisible)."""
    ids = torch.randint(0, model.config.vocab_size, (rows, length))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids).logits.float().sum().backward()
    return counter.get_total_flops() / (rows * length)


@pytest.mark.parametrize("length", [64, 256, 1024])
def test_built_in_llama_flops_match_the_counter(length):
    model = build_model(load_config(environment=False).model, 257, 256)
    model.config._attn_implementation = "eager"
    ours, counted = model_shape(model).flops_per_token(length), counted_flops_per_token(model, length)
    assert ours == pytest.approx(counted, rel=0.05)
    assert model_shape(model).flops_per_token(2 * length) > ours  # attention grows with L


def test_gpt2_conv1d_layers_are_counted():
    model = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=512, n_embd=64, n_layer=2, n_head=4,
                                       attn_implementation="eager"))
    assert model_shape(model).flops_per_token(128) == pytest.approx(counted_flops_per_token(model, 128), rel=0.05)


def test_meter_reports_tflops_mfu_and_data_share_from_its_steps():
    from raytrain.config import TrainConfig
    model = ModelShape(weights=5e9 / 1024 / 6, layers=0, attention_width=0)  # 5e9 FLOPs per 1,024-token step
    meter = Meter(TrainConfig(), model, peak_flops=1e12)
    meter.start()
    plan = StepPlan(1, 128, 8, torch.zeros(8).numpy(), 1, 8)
    with meter.waiting_for_data():
        sum(range(10**5))
    held = torch.ones(64 * 2**20 // 4)  # 64 MiB allocated since the meter's gauge was made, every page written
    meter.update(plan, torch.tensor(2.0, dtype=torch.float64), True, 3.0)
    meter.update(plan, torch.tensor(float("nan"), dtype=torch.float64), False, None)
    record = meter.flush(plan, 2048, 1e-3)
    assert record["loss"] == 2.0 and record["skipped"] == 1 and record["grad_norm"] == 3.0
    assert record["tflops"] == pytest.approx(1e10 / record["interval_s"] / 1e12)
    assert record["mfu"] == pytest.approx(record["tflops"] * 1e12 / 1e12)
    assert 0 < record["data_wait"] < 1 and record["peak_memory_gb"] == pytest.approx(1 / 16, abs=0.01)
    assert held[-1] == 1.0


def test_the_log_line_shows_tflops_mfu_grad_norm_and_memory(tmp_path, capsys):
    from raytrain.runlog import RunLog
    RunLog(tmp_path, 10).metrics({"step": 5, "tokens": 4096, "seq_len": 128, "rows": 8, "loss": 2.5, "lr": 1e-3,
                                  "skipped": 0, "grad_norm": 0.75, "tokens_per_s": 9000.0, "tflops": 0.123,
                                  "mfu": 0.256, "data_wait": 0.012, "peak_memory_gb": 1.5, "interval_s": 0.5,
                                  "elapsed_s": 2.5})
    line = capsys.readouterr().out
    assert "| 9,000 tok/s | 0.123 TFLOP/s | MFU 25.6% | grad norm 0.75 | data 1.2% | mem 1.50 GB |" in line


GAUGED = """
import numpy as np
from raytrain.meter import MemoryGauge
gauge = MemoryGauge()
held = np.ones(100 * 2**20 // 8)  # 100 MiB, every page written
print(gauge.peak())
"""


def test_the_memory_gauge_counts_what_this_process_allocates_not_its_parent():
    """A process started by fork and exec (as Ray starts its workers, torch its spawned ranks) inherits its
    parent's resident size as getrusage's peak. Started from this process holding 600 MiB more, a child that
    allocates 100 MiB after making its gauge must read 100 MiB, not the parent's size."""
    import subprocess
    import sys

    import numpy as np
    ballast = np.ones(600 * 2**20 // 8)
    done = subprocess.run([sys.executable, "-c", GAUGED], capture_output=True, text=True, check=True)
    assert ballast[-1] == 1.0
    assert int(done.stdout.split()[-1]) / 2**20 == pytest.approx(100, abs=8)
