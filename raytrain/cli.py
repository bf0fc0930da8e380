"""``raytrain prepare | train | plan | tune | eval | generate | export | report``: parse, validate, hand off."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from raytrain.config import ConfigError, load_config, reference


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="raytrain", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train", help="train a model (the built-in default needs no arguments)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train with a length-sampling shifted loss on Ray Train workers running DeepSpeed ZeRO.",
        epilog="config keys (set in FILE or as section.key=value):\n" + _indent(reference()))
    train.add_argument("-c", "--config", metavar="FILE", help="YAML config; keys not given keep their defaults")
    train.add_argument("overrides", nargs="*", metavar="section.key=value",
                       help="override a key; the value is parsed as YAML (e.g. eval.lengths=[64,512])")

    prep = commands.add_parser(
        "prepare", help="tokenize the corpus into token shards with Ray Data (train runs it when needed)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Read data.path (files, a directory, a datasets directory or a URI) with parallel Ray Data "
                    "tasks on every node, tokenize it and write token shards and index.json under "
                    "data.cache_dir/tokens/KEY/. Prints a summary and, last, that directory.",
        epilog="keys it reads (the data section and tokenizer; set in FILE or as key=value):\n" +
               _indent(reference(["data", "tokenizer"])))
    prep.add_argument("-c", "--config", metavar="FILE", help="YAML config (only its data section and tokenizer "
                                                              "are read)")
    prep.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data.path=corpus/ tokenizer=DIR")

    pl = commands.add_parser(
        "plan", help="what a run will do and whether it fits in memory, before any GPU is rented",
        description="Print the workers and their placement, rows and micro-batches per rank at the shortest and "
                    "longest length, steps and tokens, the DeepSpeed config, the estimated memory per GPU against "
                    "the GPU's, and the estimated wall time at --mfu. Exits 1 when the run cannot fit.")
    pl.add_argument("-c", "--config", metavar="FILE", help="YAML config (paths on a cluster volume need not exist)")
    pl.add_argument("overrides", nargs="*", metavar="section.key=value", help="override a key, as for train")
    pl.add_argument("--gpu", metavar="NAME", help="GPU to plan for (A10G, L4, L40S, A100-40G, A100-80G, H100, H200, "
                                                   "B200); default: accelerator_type:NAME in "
                                                   "scaling.resources_per_worker")
    pl.add_argument("--mfu", type=float, default=0.35, help="model FLOPs utilization for the time (default 0.35)")
    pl.add_argument("--vocab", type=int, help="vocabulary size, when the tokenizer is not readable here")

    ev = commands.add_parser(
        "eval", help="validation loss/perplexity per length of an exported model directory",
        description="Evaluate MODEL_DIR (a raytrain export or any local Hugging Face causal LM) per length, "
                    "on the validation split of the data it was trained on (or --data).")
    ev.add_argument("model_dir", metavar="MODEL_DIR")
    ev.add_argument("--data", metavar="PATH", help="data.path to evaluate on (default: the training run's)")
    ev.add_argument("--lengths", metavar="L,L,...", help="eval lengths (default: the training run's eval.lengths)")
    ev.add_argument("--tokens", type=int, help="target tokens per length (default: the run's eval.tokens)")

    rep = commands.add_parser(
        "report", help="plots (loss.png, lengths.png, eval.png, positions.png) and the per-length table of a run",
        description="Write loss against tokens, the length of every step (and their histogram), validation loss "
                    "against evaluation length, and the final validation loss by token position into RUN_DIR as "
                    "PNG; print the per-length table. Several runs: also positions.png comparing them (--out).")
    rep.add_argument("run_dir", metavar="RUN_DIR")
    rep.add_argument("more_runs", nargs="*", metavar="RUN_DIR", help="more runs to compare by token position")
    rep.add_argument("--out", metavar="PNG", help="where the comparison goes (default: RUN_DIR/positions-compared.png)")

    tun = commands.add_parser(
        "tune", help="Ray Tune search over length ranges, schedules and any training key",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Search with Ray Tune: each trial is a full raytrain run on its own Ray Train workers; ASHA "
                    "stops poor trials early on tokens seen. Writes results.csv, best_config.yaml and "
                    "objective.png into the experiment directory.",
        epilog="tune config keys:\n" + _indent(tune_reference()))
    tun.add_argument("-c", "--config", metavar="FILE", required=True, help="tune config (see tune_configs/)")
    tun.add_argument("overrides", nargs="*", metavar="key=value", help="override a tune config key (e.g. num_samples=2)")
    tun.add_argument("--resume", action="store_true", help="continue the interrupted experiment of this config")

    gen = commands.add_parser(
        "generate", help="text from an exported model (transformers' generate)",
        description="Continue --prompt with MODEL_DIR (a raytrain export or any local Hugging Face causal LM) "
                    "through transformers' own generation; prints the prompt and its continuation.")
    gen.add_argument("model_dir", metavar="MODEL_DIR")
    gen.add_argument("--prompt", required=True, help="text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    gen.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 is greedy (default 0.8)")
    gen.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed: the same seed gives the same text")

    exp = commands.add_parser(
        "export", help="consolidate a checkpoint (any ZeRO stage) into a Hugging Face model directory",
        description="Merge the DeepSpeed shards of CHECKPOINT (a run's checkpoint_* directory) into a Hugging "
                    "Face model directory that AutoModelForCausalLM and raytrain eval load.")
    exp.add_argument("checkpoint", metavar="CHECKPOINT")
    exp.add_argument("--out", metavar="DIR", help="output directory (default: CHECKPOINT/model)")

    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            from raytrain.prepare import prepare
            cfg = load_config(args.config, args.overrides, only=("data", "tokenizer"))
            prepare(cfg.data, cfg.tokenizer)
        elif args.command == "train":
            from raytrain.train import fit
            fit(load_config(args.config, args.overrides))
        elif args.command == "tune":
            from raytrain.tune import tune_main
            tune_main(args.config, args.overrides, resume=args.resume)
        elif args.command == "plan":
            from raytrain.plan import plan_main
            return plan_main(load_config(args.config, args.overrides, environment=False), args.vocab, args.gpu,
                             args.mfu)
        elif args.command == "export":
            from raytrain.engine import export_checkpoint
            checkpoint = Path(args.checkpoint)
            cfg = load_config(str(checkpoint.parent / "config.yaml"), environment=False)
            print(f"wrote {export_checkpoint(checkpoint, Path(args.out or checkpoint / 'model'), cfg)}")
        elif args.command == "generate":
            from raytrain.generate import generate, load
            model_dir = Path(args.model_dir)
            if not (model_dir / "config.json").is_file():
                raise ConfigError([("MODEL_DIR", str(model_dir), "is not a model directory (no config.json); give "
                                                                 "a run's model/ or an export")])
            if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
                raise ConfigError([(k, v, fix) for k, v, fix, bad in [
                    ("--max-new-tokens", args.max_new_tokens, "must be at least 1", args.max_new_tokens < 1),
                    ("--temperature", args.temperature, "must be 0 (greedy) or more", args.temperature < 0),
                    ("--top-p", args.top_p, "must be in (0, 1]", not 0 < args.top_p <= 1)] if bad])
            print(generate(*load(model_dir), args.prompt, args.max_new_tokens, args.temperature, args.top_p,
                           args.seed))
        elif args.command == "eval":
            print(json.dumps(evaluate_dir(args), indent=2))
        else:
            from raytrain.report import read_jsonl, table, write_report
            run_dir = Path(args.run_dir)
            print(table(read_jsonl(run_dir / "eval.jsonl")))
            for path in write_report(run_dir):
                print(f"wrote {path}")
            if (run_dir / "model" / "config.json").is_file():
                from raytrain.generate import samples
                text = samples(run_dir / "model")
                (run_dir / "samples.txt").write_text(text + "\n")
                print(f"samples from {run_dir / 'model'}:\n{text}\nwrote {run_dir / 'samples.txt'}")
            if args.more_runs:
                from raytrain.report import plot_positions
                out = Path(args.out or run_dir / "positions-compared.png")
                print(f"wrote {plot_positions([run_dir, *map(Path, args.more_runs)], out)}")
    except ConfigError as err:
        print(f"raytrain: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        from raytrain.train import TrainingStopped
        from raytrain.tune import SearchFailed
        if not isinstance(err, (TrainingStopped, SearchFailed)):
            raise
        print(f"raytrain: {err}", file=sys.stderr)
        return 1
    return 0


def evaluate_dir(args) -> dict:
    """Single-process evaluation of a saved model on the same windows the trainer scores."""
    import torch
    from transformers import AutoModelForCausalLM

    from raytrain.data import check_corpus, open_prepared
    from raytrain.evaluate import evaluate

    model_dir = Path(args.model_dir)
    saved = model_dir / "raytrain.yaml"
    overrides = [f"tokenizer={model_dir}", f"model.pretrained={model_dir}"]
    if args.data:
        overrides.append(f"data.path={args.data}")
    if args.lengths:
        overrides.append(f"eval.lengths=[{args.lengths}]")
    if args.tokens:
        overrides.append(f"eval.tokens={args.tokens}")
    cfg = load_config(str(saved) if saved.is_file() else None, overrides + ["scaling.num_workers=1"])
    corpus = open_prepared(cfg.data, cfg.tokenizer, say=lambda line: print(line, file=sys.stderr))
    check_corpus(corpus, 0, cfg.eval.lengths)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
    batch_tokens = cfg.train.micro_batch_tokens or cfg.train.tokens_per_step
    eot = None if cfg.data.cross_documents else corpus.index["eot"]
    bf16 = cfg.bf16
    return evaluate(model, corpus.val, cfg.eval.lengths, cfg.eval.tokens, batch_tokens, eot=eot, bf16=bf16)


def tune_reference() -> str:
    from raytrain.tune import TuneSpec
    lines = []
    for name, field in TuneSpec.model_fields.items():
        sub = getattr(field.annotation, "model_fields", None)
        for key, f in (sub.items() if sub else [(None, field)]):
            lines.append(f"{name}.{key}: {f.description}" if key else f"{name}: {field.description}")
    return "\n".join(lines)


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


if __name__ == "__main__":
    sys.exit(main())
