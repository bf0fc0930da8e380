"""``raytrain train | eval``: parse, validate, hand off."""
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

    ev = commands.add_parser(
        "eval", help="validation loss/perplexity per length of an exported model directory",
        description="Evaluate MODEL_DIR (a raytrain export or any local Hugging Face causal LM) per length, "
                    "on the validation split of the data it was trained on (or --data).")
    ev.add_argument("model_dir", metavar="MODEL_DIR")
    ev.add_argument("--data", metavar="PATH", help="data.path to evaluate on (default: the training run's)")
    ev.add_argument("--lengths", metavar="L,L,...", help="eval lengths (default: the training run's eval.lengths)")
    ev.add_argument("--tokens", type=int, help="target tokens per length (default: the run's eval.tokens)")

    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            from raytrain.train import fit
            fit(load_config(args.config, args.overrides))
        else:
            print(json.dumps(evaluate_dir(args), indent=2))
    except ConfigError as err:
        print(f"raytrain: {err}", file=sys.stderr)
        return 2
    return 0


def evaluate_dir(args) -> dict:
    """Single-process evaluation of a saved model on the same windows the trainer scores."""
    import torch
    from transformers import AutoModelForCausalLM

    from raytrain.data import check_corpus, load_tokenizer, prepare_corpus
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
    tokenizer = load_tokenizer(cfg.tokenizer)
    corpus = prepare_corpus(cfg.data, tokenizer)
    check_corpus(corpus, 0, cfg.eval.lengths)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
    batch_tokens = cfg.train.micro_batch_tokens or cfg.train.tokens_per_step
    eot = None if cfg.data.cross_documents else tokenizer.eos_token_id
    return evaluate(model, corpus.val, cfg.eval.lengths, cfg.eval.tokens, batch_tokens, eot=eot)


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


if __name__ == "__main__":
    sys.exit(main())
