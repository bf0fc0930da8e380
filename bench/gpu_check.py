"""The GPU check: what runs on a GPU, on whatever GPUs this machine has, labelled with what really ran.

    python bench/gpu_check.py [--steps 60] [--skip 20] [--out bench/results]

First, document attention on the GPU: logits and gradients of the varlen
FlashAttention-2 path against the same documents run one by one through
transformers' SDPA, both in bf16. Then a few runs of the 125M config's model shape
with a real 50,304-row output head (a randomly initialised model saved to a
temporary directory: nothing is downloaded), on every GPU of this machine (one
worker each, any type: no accelerator_type is asked for), 65,536 tokens a step in
micro-batches of 16,384, bf16. Each row says what really ran, as the workers'
memory probe recorded it: the ZeRO stage (one worker runs ZeRO-0), the dtype the
linear layers computed in, the attention kernel called, whether the blocks were
compiled (``train.compile: auto`` compiles on a GPU; one row runs eager to show
what compilation gains); and it compares the
probe's measured peak memory with ``raytrain plan``'s estimate for the same
config. Writes ``gpu_check.md`` and ``gpu_check.json`` into ``--out``. On a
machine without a CUDA GPU it says so in one line and exits 2. Sized for 8
minutes on one GPU (not yet run on one: no GPU has been lent to this project).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "cluster" / "configs" / "gpu-125m-zero2.yaml"
VOCAB = 50_304  # GPT-2's 50,257 rounded up to a multiple of 64, as GPU trainers pad it


def rows(gpus: int) -> dict[str, list[str]]:
    """The runs: name -> overrides on top of ``common``. With one GPU every stage runs ZeRO-0, so ZeRO-3 is
    a row only where there are several."""
    runs = {"uniform 256-2048, documents apart": [],
            "uniform 256-2048, documents apart, eager": ["train.compile=false"],  # what train.compile gains
            "fixed 2048, documents apart": ["lengths={schedule: fixed, min: 256, max: 2048, multiple_of: 64}"],
            "uniform 256-2048, documents crossed": ["data.cross_documents=true"]}
    if gpus > 1:
        runs["uniform 256-2048, ZeRO-3"] = ["deepspeed.zero_stage=3"]
    return runs


def common(gpus: int, cpus: int, steps: int, model_dir: str, tmp: str) -> list[str]:
    """Keys every run shares: this machine's GPUs and CPUs, the built-in corpus and byte tokenizer, bf16."""
    return ["tokenizer=bytes", "data.path=null", f"data.cache_dir={tmp}/cache", f"model.pretrained={model_dir}",
            "lengths.warmup_steps=0", "train.tokens_per_step=65536", "train.micro_batch_tokens=16384",
            f"train.max_steps={steps}", "train.warmup_steps=10", "train.log_every=10", "train.precision=bf16",
            "eval.lengths=[2048]", f"eval.every={steps}", "eval.tokens=16384", f"scaling.num_workers={gpus}",
            f"scaling.cpus_per_worker={max(1, cpus // gpus - 1)}", "scaling.resources_per_worker={}",
            f"run.dir={tmp}", f"run.checkpoint_every={steps}", "run.max_failures=0"]


def label(probe: dict, precision: str) -> str:
    """What really ran, from the worker's memory probe record (probe.json)."""
    compiled = probe.get("compiled", {})
    return (f"ZeRO-{probe['zero_stage']}, {precision}, linear layers in {probe['linear_dtype']}, "
            f"attention {probe['attention']}, "
            + (f"compiled ({compiled['block_graphs']} block graphs)" if compiled.get("compilations") else "eager"))


def measure(run_dir: Path, skip: int) -> dict:
    """tokens/s, model TFLOP/s, MFU and peak memory over the steps after ``skip``."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if r["step"] > skip]
    seconds = sum(r["interval_s"] for r in timed)
    tokens = timed[-1]["tokens"] - max(r["tokens"] for r in records if r["step"] <= skip)
    return {"tokens_per_s": tokens / seconds, "tflops": sum(r["tflops"] * r["interval_s"] for r in timed) / seconds,
            "mfu": sum(r["mfu"] * r["interval_s"] for r in timed) / seconds,
            "peak_gib": max(r["peak_memory_gb"] for r in records)}


def check_document_attention() -> dict:
    """The varlen kernel against the documents run one by one (bf16: agreement to bf16's rounding)."""
    import copy

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from raytrain.attention import KERNELS, use_document_attention
    from raytrain.loss import window_logits
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=257, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    alone = LlamaForCausalLM(config).cuda()
    apart = LlamaForCausalLM(copy.deepcopy(config)).cuda()
    apart.load_state_dict(alone.state_dict())
    use_document_attention(apart)
    windows = torch.randint(0, 256, (4, 1025), device="cuda")
    windows[:, 100::150] = 256
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ours = window_logits(apart, windows, 256)[0].float()
        pieces = []
        for row in windows[:, :-1]:
            starts = [0] + [i for i in range(1, 1024) if row[i] == 256] + [1024]
            pieces.append(torch.cat([alone(input_ids=row[s:e][None]).logits[0] for s, e in
                                     zip(starts[:-1], starts[1:])]).float())
        reference = torch.stack(pieces)
    for out in (ours, reference):
        out.square().mean().backward()
    grads = [torch.cat([p.grad.flatten() for p in m.parameters()]) for m in (alone, apart)]
    return {"logits_max_abs_diff": float((ours - reference).abs().max()), "logits_max": float(reference.abs().max()),
            "gradients_relative_diff": float((grads[1] - grads[0]).norm() / grads[0].norm()),
            "kernel": ",".join(KERNELS)}


def save_model(directory: Path) -> str:
    """The 125M config's Llama shape with a 50,304-row head, randomly initialised, as a pretrained directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from raytrain.loading import load_config
    shape = load_config(str(CONFIG), environment=False).model
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_heads, max_position_embeddings=shape.max_positions, tie_word_embeddings=True,
        bos_token_id=256, eos_token_id=256))
    model.save_pretrained(directory)
    return str(directory)


def table(results: dict) -> str:
    lines = [f"{results['device']} x {results['gpus']}, {results['date']}, 125M Llama shape with a {VOCAB:,}-row "
             f"head, bf16, {results['timed_steps']} timed steps x 65,536 tokens (`python bench/gpu_check.py`)", "",
             "| run | what ran | tokens/s | model TFLOP/s | MFU | peak memory (GiB) | probe peak / plan |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, row in results["rows"].items():
        lines.append(f"| {name} | {row['ran']} | {row['tokens_per_s']:,.0f} | {row['tflops']:.1f} | {row['mfu']:.1%} "
                     f"| {row['peak_gib']:.1f} | {row['probe_gib']:.1f} / {row['plan_gib']:.1f} |")
    attention = results["document_attention"]
    lines += ["", f"document attention ({attention['kernel']}) against each document alone, bf16: logits max |diff| "
              f"{attention['logits_max_abs_diff']:.2e} (logits up to {attention['logits_max']:.1f}), gradients "
              f"relative {attention['gradients_relative_diff']:.2e}"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--skip", type=int, default=20, help="warm-up steps left out (a multiple of 10)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for gpu_check.md/.json")
    args = parser.parse_args()
    import torch
    if not torch.cuda.is_available():
        print(f"bench/gpu_check.py: no CUDA GPU visible to torch {torch.__version__} on this machine; run it on one")
        return 2
    import ray

    from raytrain.launch import fit, run_directory
    from raytrain.loading import load_config
    from raytrain.plan import GiB, plan_run
    gpus, cpus = torch.cuda.device_count(), os.cpu_count() or 1
    results = {"device": torch.cuda.get_device_name(), "gpus": gpus, "date": time.strftime("%Y-%m-%d"),
               "timed_steps": args.steps - args.skip, "document_attention": check_document_attention(), "rows": {}}
    ray.init(runtime_env={"env_vars": {"DS_ACCELERATOR": "cuda"}})
    with tempfile.TemporaryDirectory() as tmp:
        keys = common(gpus, cpus, args.steps, save_model(Path(tmp) / "model"), tmp)
        for i, (name, extra) in enumerate(rows(gpus).items()):
            cfg = load_config(str(CONFIG), keys + extra + [f"run.name=run{i}"])
            fit(cfg)
            probe = json.loads((run_directory(cfg) / "probe.json").read_text())
            results["rows"][name] = {**measure(run_directory(cfg), args.skip), "ran": label(probe, "bf16"),
                                     "probe_gib": probe["peak_gib"],
                                     "plan_gib": plan_run(cfg, vocab=VOCAB, with_time=False).memory.total / GiB}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1))
    (out / "gpu_check.md").write_text(table(results) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
