"""Accelerators: the table of GPUs raytrain knows (bf16 peak, memory), and one worker's peak FLOP/s for MFU."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Accelerator:
    """A GPU as Ray names it (``accelerator_type:NAME``): bf16 dense peak and memory per device."""
    name: str
    peak_tflops: float  # bf16 dense tensor-core peak
    memory_gib: float  # total device memory as nvidia-smi reports it


# Peaks from the vendors' datasheets, except the A10G (AWS's part, for which NVIDIA publishes none: 70 is the
# figure commonly quoted for it, well below the A10's 125); scaling.peak_tflops overrides any of them. Longer
# names first, so "A100-80G" matches before "A100" (a bare "A100" is taken as the 40 GB part: the safe side).
ACCELERATORS = {a.name: a for a in [
    Accelerator("A100-80G", 312.0, 80.0), Accelerator("A100-40G", 312.0, 40.0), Accelerator("A100", 312.0, 40.0),
    Accelerator("A10G", 70.0, 22.5), Accelerator("L40S", 362.0, 45.0), Accelerator("L4", 121.0, 22.5),
    Accelerator("H100", 989.0, 79.6), Accelerator("H200", 989.0, 140.4), Accelerator("B200", 2250.0, 179.1)]}


def find_accelerator(name: str) -> Accelerator | None:
    """The table entry a device or Ray accelerator-type name refers to ("NVIDIA A10G", "A100-SXM4-80GB")."""
    squeezed = name.replace(" ", "").upper().replace("80GB", "80G").replace("40GB", "40G")
    for key, accelerator in ACCELERATORS.items():
        parts = key.split("-")
        if parts[0] in squeezed and all(p in squeezed for p in parts[1:]):
            return accelerator
    return None


def peak_flops(use_gpu: bool, override_tflops: float | None, threads: int) -> tuple[float, str]:
    """Peak FLOP/s of one worker's device and where the figure comes from (said in the log)."""
    if override_tflops:
        return override_tflops * 1e12, "scaling.peak_tflops"
    if use_gpu:
        name = torch.cuda.get_device_name()
        accelerator = find_accelerator(name)
        if accelerator:
            return accelerator.peak_tflops * 1e12, f"{accelerator.name} bf16 datasheet"
        return float("nan"), f"unknown device {name!r}: set scaling.peak_tflops"
    # CPU: what a fp32 matmul reaches on these threads. The best of many short windows, not one average: workers
    # measure at start-up, when Ray's and the other ranks' start-up work can take the CPU for a while, and a
    # deflated peak shows as an MFU above 100%.
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    torch.mm(a, b)
    best, deadline = 0.0, time.perf_counter() + 0.6
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        best = max(best, 4 * 2 * 512**3 / (time.perf_counter() - start))
    return best, f"a fp32 matmul measured on {threads} CPU thread(s)"
