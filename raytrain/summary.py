"""The closing summary of a run: what it reached, what it cost, where everything is, and what to run next."""
from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from raytrain.config import Config
from raytrain.runlog import read_records
from raytrain.trackers import mlflow_uri


def closing_summary(run_dir: Path, cfg: Config, wall_s: float, log_name: str | None = None) -> str:
    metrics, _ = read_records(run_dir / "metrics.jsonl")
    evals, _ = read_records(run_dir / "eval.jsonl")
    if not metrics:
        return f"run directory: {run_dir} (no step was recorded)"
    last, final = metrics[-1], evals[-1] if evals else {}
    timed = [m for m in metrics if m.get("interval_s")]
    seconds = sum(m["interval_s"] for m in timed) or 1e-9
    mfu = sum(m["mfu"] * m["interval_s"] for m in timed if m.get("mfu") is not None) / seconds
    losses = "  ".join(f"{length}: {final[f'val/loss@{length}']:.4f}" for length in cfg.eval.lengths
                       if f"val/loss@{length}" in final)
    lines = [
        f"done: {last['step']:,} steps, {last['tokens']:,} tokens in {clock(wall_s)} "
        f"({clock(last['elapsed_s'])} of it training)",
        f"final val loss by length  {losses}  (step {final.get('step', '-')})" if losses else "no evaluation",
        f"throughput {last['tokens'] / max(last['elapsed_s'], 1e-9):,.0f} tok/s, MFU {mfu:.1%}, "
        f"peak memory {max(m.get('peak_memory_gb') or 0 for m in metrics):.2f} GB",
        f"run directory   {run_dir}",
        f"model           {run_dir / 'model'} (Hugging Face: AutoModelForCausalLM.from_pretrained)",
        "records         metrics.jsonl, eval.jsonl, config.yaml (raytrain train -c runs it again)"
        + (f"; every library's log: {log_name}" if log_name else ""),
        "next:",
        f"  raytrain report {run_dir}",
        f"  raytrain generate {run_dir / 'model'} --prompt \"def \"",
        f"  raytrain eval {run_dir / 'model'}",
    ]
    viewers = {"tensorboard": f"tensorboard --logdir {run_dir / 'tensorboard'}",
               "mlflow": f"mlflow ui --backend-store-uri {mlflow_uri(run_dir.parent)}  (the full mlflow package's "
                         "UI: docs/outputs.md)",
               "wandb": f"wandb sync {run_dir / 'wandb'}/offline-run-*  (when it ran offline)"}
    lines += [f"  {viewers[name]}" for name in cfg.run.loggers]
    return "\n".join(lines)


def clock(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))
