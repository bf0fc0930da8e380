"""The prepared GPU check: the 125M config in bf16 at ZeRO 1 and 2, uniform and fixed lengths, on this machine's GPUs.

Runs as it is on a machine with CUDA torch installed (no download: the built-in
corpus and byte tokenizer stand in for the cluster's data, the model keeps the
125M config's shape):

    python bench/gpu_check.py [--steps 150] [--skip 30]

First, document attention on the GPU: logits and gradients of the varlen
FlashAttention-2 path (``raytrain.attention``) against transformers' masked SDPA,
both in bf16 autocast, on windows holding several documents. Then four runs
(ZeRO-1 uniform, ZeRO-2 uniform, ZeRO-2 fixed at 2048, all with documents kept
apart as the config says; ZeRO-2 uniform with documents crossed, for the cost of
keeping them apart), one worker per GPU, 65,536 tokens a step in micro-batches
of 16,384; prints tokens/s, model TFLOP/s, MFU and peak memory per run (after
``--skip`` warm-up steps), and the uniform / fixed tokens/s ratio at ZeRO-2.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def check_document_attention() -> None:
    """The varlen kernel against the masked path on this GPU (bf16: agreement to bf16's rounding, not bit for bit)."""
    import copy

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from raytrain.attention import use_document_attention
    from raytrain.loss import window_logits
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=257, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    masked = LlamaForCausalLM(config).cuda()
    apart = LlamaForCausalLM(copy.deepcopy(config)).cuda()
    apart.load_state_dict(masked.state_dict())
    use_document_attention(apart)
    windows = torch.randint(0, 256, (4, 1025), device="cuda")
    windows[:, 100::150] = 256
    logits = [window_logits(m, windows, 256, bf16=True)[0].float() for m in (masked, apart)]
    for out in logits:
        out.square().mean().backward()
    grads = [torch.cat([p.grad.flatten() for p in m.parameters()]) for m in (masked, apart)]
    print(f"document attention (varlen FlashAttention-2) vs masked SDPA, bf16: logits max |diff| "
          f"{(logits[1] - logits[0]).abs().max():.2e} (logits up to {logits[0].abs().max():.1f}), gradients "
          f"relative {(grads[1] - grads[0]).norm() / grads[0].norm():.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--skip", type=int, default=30, help="warm-up steps left out")
    args = parser.parse_args()

    import ray
    import torch

    from raytrain.config import load_config
    from raytrain.train import fit
    gpus = torch.cuda.device_count()
    assert gpus, "no GPU visible: this check is for a GPU machine"
    check_document_attention()
    ray.init(runtime_env={"env_vars": {"DS_ACCELERATOR": "cuda"}})
    runs = {"ZeRO-1, uniform 256-2048": ["deepspeed.zero_stage=1"],
            "ZeRO-2, uniform 256-2048": ["deepspeed.zero_stage=2"],
            "ZeRO-2, fixed 2048": ["deepspeed.zero_stage=2",
                                   "lengths={schedule: fixed, min: 256, max: 2048, multiple_of: 64}"],
            "ZeRO-2, uniform 256-2048, documents crossed": ["deepspeed.zero_stage=2", "data.cross_documents=true"]}
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, extra) in enumerate(runs.items()):
            overrides = [
                "tokenizer=bytes", "data.path=null", f"data.cache_dir={tmp}/cache",
                "lengths.warmup_steps=0", "train.tokens_per_step=65536", "train.micro_batch_tokens=16384",
                f"train.max_steps={args.steps}", "train.warmup_steps=20", "train.log_every=10",
                "train.precision=bf16", "eval.lengths=[2048]", "eval.every=100000", "eval.tokens=65536",
                f"scaling.num_workers={gpus}", "scaling.cpus_per_worker=2", f"run.dir={tmp}", f"run.name=run{i}",
                f"run.checkpoint_every={args.steps}", "run.max_failures=0", *extra]
            cfg = load_config(str(ROOT / "cluster/configs/gpu-125m-zero2.yaml"), overrides)
            fit(cfg)
            records = [json.loads(line) for line in (Path(tmp) / f"run{i}" / "metrics.jsonl").read_text().splitlines()]
            timed = [r for r in records if r["step"] > args.skip]
            seconds = sum(r["interval_s"] for r in timed)
            tokens = timed[-1]["tokens"] - max(r["tokens"] for r in records if r["step"] <= args.skip)
            rows[name] = (tokens / seconds, sum(r["tflops"] * r["interval_s"] for r in timed) / seconds,
                          sum(r["mfu"] * r["interval_s"] for r in timed) / seconds,
                          max(r["peak_memory_gb"] for r in records))
    print(f"\n{torch.cuda.get_device_name()} x {gpus}, 125M Llama shape, bf16, {args.steps - args.skip} timed steps "
          f"x 65,536 tokens\n")
    print("| run | tokens/s | model TFLOP/s | MFU | peak memory (GB) |\n|---|---:|---:|---:|---:|")
    for name, (rate, tflops, mfu, memory) in rows.items():
        print(f"| {name} | {rate:,.0f} | {tflops:.1f} | {mfu:.1%} | {memory:.1f} |")
    print(f"\nuniform / fixed tokens/s at ZeRO-2: "
          f"{rows['ZeRO-2, uniform 256-2048'][0] / rows['ZeRO-2, fixed 2048'][0]:.2f}x")


if __name__ == "__main__":
    main()
