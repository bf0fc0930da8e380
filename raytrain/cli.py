"""``raytrain prepare | train | plan | tune | eval | generate | export | report``: parse, validate, hand off.

Each command has one handler. The handlers import what they run when they run
(Ray, torch, DeepSpeed and transformers take seconds to import), so ``--help``
and a config error answer at once.
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path

import psutil  # when this process started: the start-up's first stage

from raytrain.config import DataConfig, reference
from raytrain.console import capture, say
from raytrain.errors import SearchFailed, StartFailed, TrainingStopped
from raytrain.loading import load_config
from raytrain.section import ConfigError


def prepare(args) -> int:
    from raytrain.prepare import prepare as prepare_corpus
    cfg = load_config(args.config, args.overrides, only=("data", "tokenizer"))
    with capture(command_log("prepare", cfg.data.cache_dir), args.verbose):
        say(str(prepare_corpus(cfg.data, cfg.tokenizer)))  # last, alone: scripts read the directory from it
    return 0


def train(args) -> int:
    from raytrain.launch import LIBRARIES_LOG, fit, run_directory
    cfg = load_config(args.config, args.overrides)
    cfg.run.name = run_directory(cfg).name  # fixed now: the library log goes into the run's directory
    with capture(run_directory(cfg) / LIBRARIES_LOG, args.verbose):
        fit(cfg, command_started=psutil.Process().create_time())
    return 0


def tune(args) -> int:
    from raytrain.launch import LIBRARIES_LOG
    from raytrain.tune import tune_main
    from raytrain.tune_spec import load_spec
    spec = load_spec(args.config, args.overrides)
    with capture(Path(spec.dir).expanduser().resolve() / spec.name / LIBRARIES_LOG, args.verbose, tune_table=True):
        tune_main(args.config, args.overrides, resume=args.resume)
    return 0


def command_log(command: str, cache_dir: str = DataConfig().cache_dir) -> Path:
    """Where the other libraries' output of a command without a run directory goes."""
    return Path(cache_dir).expanduser() / "logs" / f"{command}-{datetime.now():%Y%m%d-%H%M%S}.log"


def plan(args) -> int:
    from raytrain.plan import plan_main
    return plan_main(load_config(args.config, args.overrides, environment=False), args.vocab, args.gpu, args.mfu)


def export(args) -> int:
    from raytrain.export import export_run
    with capture(command_log("export"), args.verbose):
        say(f"wrote {export_run(args.checkpoint, args.out)}")
    return 0


def generate(args) -> int:
    model_dir = Path(args.model_dir)
    problems = [(k, v, fix) for k, v, fix, bad in [
        ("MODEL_DIR", str(model_dir), "is not a model directory (no config.json); give a run's model/ or an export",
         not (model_dir / "config.json").is_file()),
        ("--max-new-tokens", args.max_new_tokens, "must be at least 1", args.max_new_tokens < 1),
        ("--temperature", args.temperature, "must be 0 (greedy) or more", args.temperature < 0),
        ("--top-p", args.top_p, "must be in (0, 1]", not 0 < args.top_p <= 1)] if bad]
    if problems:
        raise ConfigError(problems)
    from raytrain.generate import generate as continue_text
    from raytrain.generate import load
    print(continue_text(*load(model_dir), args.prompt, args.max_new_tokens, args.temperature, args.top_p, args.seed))
    return 0


def evaluate(args) -> int:
    """Single-process evaluation of a saved model on the same windows, batches and precision as training."""
    model_dir, saved = Path(args.model_dir), Path(args.model_dir) / "raytrain.yaml"
    overrides = [f"tokenizer={model_dir}", f"model.pretrained={model_dir}", "scaling.num_workers=1"] + \
        ([f"data.path={args.data}"] if args.data else []) + \
        ([f"eval.lengths=[{args.lengths}]"] if args.lengths else []) + \
        ([f"eval.tokens={args.tokens}"] if args.tokens else [])
    cfg = load_config(str(saved) if saved.is_file() else None, overrides)
    with capture(command_log("eval", cfg.data.cache_dir), args.verbose):
        say(json.dumps(evaluate_model(model_dir, cfg), indent=2))
    return 0


def evaluate_model(model_dir: Path, cfg) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from raytrain.data import check_corpus, open_corpus
    from raytrain.evaluate import evaluate as evaluate_module
    from raytrain.loss import CausalLMLoss, document_eots
    from raytrain.prepare import prepare as prepare_corpus
    from raytrain.steps import rows_per_micro
    # stdout carries the results' JSON alone; the preparation's line goes to stderr
    corpus = open_corpus(prepare_corpus(cfg.data, cfg.tokenizer, say=lambda line: print(line, file=sys.stderr)))
    check_corpus(corpus, 0, cfg.eval.lengths)
    lm = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
    _, eot = document_eots(cfg.data.cross_documents, cfg.eval.documents, corpus.index["eot"])
    module = CausalLMLoss(lm, eot)  # transformers' own attention keeps documents apart by the restarted positions
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
        return evaluate_module(module, corpus.val, cfg.eval.lengths, cfg.eval.tokens, lambda length: rows_per_micro(
            cfg.train.tokens_per_step, cfg.train.micro_batch_tokens, length, 1))


def report(args) -> int:
    from raytrain.report import report_run
    report_run(Path(args.run_dir), [Path(p) for p in args.more_runs], args.out)
    return 0


def doctor(args) -> int:
    from raytrain.doctor import doctor as check_cluster
    return check_cluster(load_config(args.config, args.overrides, environment=False))


HANDLERS = {"prepare": prepare, "train": train, "tune": tune, "plan": plan, "doctor": doctor, "export": export,
            "generate": generate, "eval": evaluate, "report": report}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return HANDLERS[args.command](args)
    except ConfigError as err:
        print(f"raytrain: {err}", file=sys.stderr)
        return 2
    except (TrainingStopped, StartFailed, SearchFailed) as err:
        print(f"raytrain: {err}", file=sys.stderr)
        return 1


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="raytrain", description=__doc__.splitlines()[0])
    commands = top.add_subparsers(dest="command", required=True)
    raw = argparse.RawDescriptionHelpFormatter
    train = commands.add_parser(
        "train", help="train a model (the built-in default needs no arguments)", formatter_class=raw,
        description="Train with a length-sampling shifted loss on Ray Train workers running DeepSpeed ZeRO.",
        epilog="config keys (set in FILE or as section.key=value):\n" + indent(reference()))
    config_arguments(train, "YAML config; keys not given keep their defaults")
    verbose_argument(train)
    prep = commands.add_parser(
        "prepare", help="tokenize the corpus into token shards with Ray Data (train runs it when needed)",
        formatter_class=raw,
        description="Read data.path (files, a directory, a datasets directory or a URI) with parallel Ray Data "
                    "tasks on every node, tokenize it and write token shards and index.json under "
                    "data.cache_dir/tokens/KEY/. Prints a summary and, last, that directory.",
        epilog="keys it reads (the data section and tokenizer):\n" + indent(reference(["data", "tokenizer"])))
    config_arguments(prep, "YAML config (only its data section and tokenizer are read)")
    verbose_argument(prep)
    plan_arguments(commands)
    doc = commands.add_parser(
        "doctor", help="a minute's check of the cluster a run would use: paths, corpus, drivers, network, storage",
        description="On the workers the config asks for (the same nodes a run gets): token authentication, "
                    "data.cache_dir and run.dir visible and writable, the prepared corpus complete, accelerators "
                    "and their driver, bf16, an all-reduce across all workers (bus bandwidth), run.storage. "
                    "Prints ok or the fix per check; exits 1 if any fails. Joins RAY_ADDRESS.")
    config_arguments(doc, "YAML config (the one the run will use)")
    tun = commands.add_parser(
        "tune", help="Ray Tune search over length ranges, schedules and any training key", formatter_class=raw,
        description="Search with Ray Tune: each trial is a full raytrain run on its own Ray Train workers; ASHA "
                    "stops poor trials early on tokens seen. Writes results.csv, best_config.yaml and "
                    "objective.png into the experiment directory.",
        epilog="tune config keys:\n" + indent(tune_reference()))
    tun.add_argument("-c", "--config", metavar="FILE", required=True, help="tune config (see tune_configs/)")
    tun.add_argument("overrides", nargs="*", metavar="key=value",
                     help="override a tune config key (e.g. num_samples=2)")
    tun.add_argument("--resume", action="store_true", help="continue the interrupted experiment of this config")
    verbose_argument(tun)
    model_commands(commands)
    return top


def plan_arguments(commands) -> None:
    pl = commands.add_parser(
        "plan", help="what a run will do and whether it fits in memory, before any GPU is rented",
        description="Print the workers and their placement, rows and micro-batches per rank at the shortest and "
                    "longest length, steps and tokens, the DeepSpeed config, the estimated memory per GPU (every "
                    "term, DeepSpeed's buffers included) against the GPU's, and the estimated wall time at --mfu. "
                    "Exits 1 when the run cannot fit.")
    config_arguments(pl, "YAML config (paths on a cluster volume need not exist)")
    pl.add_argument("--gpu", metavar="NAME", help="GPU to plan for (A10G, L4, L40S, A100-40G, A100-80G, H100, H200, "
                                                   "B200); default: accelerator_type:NAME in "
                                                   "scaling.resources_per_worker")
    pl.add_argument("--mfu", type=float, default=0.35, help="model FLOPs utilization for the time (default 0.35)")
    pl.add_argument("--vocab", type=int, help="vocabulary size, when the tokenizer is not readable here")


def model_commands(commands) -> None:
    """The commands that work on a trained model or a run: eval, report, generate, export."""
    ev = commands.add_parser(
        "eval", help="validation loss/perplexity per length of an exported model directory",
        description="Evaluate MODEL_DIR (a raytrain export or any local Hugging Face causal LM) per length, "
                    "on the validation split of the data it was trained on (or --data).")
    ev.add_argument("model_dir", metavar="MODEL_DIR")
    ev.add_argument("--data", metavar="PATH", help="data.path to evaluate on (default: the training run's)")
    ev.add_argument("--lengths", metavar="L,L,...", help="eval lengths (default: the training run's eval.lengths)")
    ev.add_argument("--tokens", type=int, help="target tokens per length (default: the run's eval.tokens)")
    verbose_argument(ev)
    rep = commands.add_parser(
        "report", help="plots (loss.png, lengths.png, eval.png, positions.png) and the per-length table of a run",
        description="Write loss against tokens, the length of every step (and their histogram), validation loss "
                    "against evaluation length, and the final validation loss by token position into RUN_DIR as "
                    "PNG; print the per-length table. Several runs: also positions.png comparing them (--out).")
    rep.add_argument("run_dir", metavar="RUN_DIR")
    rep.add_argument("more_runs", nargs="*", metavar="RUN_DIR", help="more runs to compare by token position")
    rep.add_argument("--out", metavar="PNG", help="where the comparison goes (default: RUN_DIR/positions-compared.png)")
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
        description="Merge the DeepSpeed shards of CHECKPOINT (a run's checkpoint directory, local or at a storage "
                    "URI such as s3://...) or of a run's newest checkpoint (RUN_DIR) into a Hugging Face model "
                    "directory that AutoModelForCausalLM and raytrain eval load.")
    exp.add_argument("checkpoint", metavar="CHECKPOINT|RUN_DIR")
    exp.add_argument("--out", metavar="DIR", help="output directory (default: RUN_DIR/exported-STEP)")
    verbose_argument(exp)


def config_arguments(command, config_help: str) -> None:
    command.add_argument("-c", "--config", metavar="FILE", help=config_help)
    command.add_argument("overrides", nargs="*", metavar="section.key=value",
                         help="override a key; the value is parsed as YAML (e.g. eval.lengths=[64,512])")


def verbose_argument(command) -> None:
    command.add_argument("--verbose", action="store_true",
                         help="show every library's output on the console too (it always goes to the log file)")


def tune_reference() -> str:
    from raytrain.tune_spec import TuneSpec  # light: pydantic models only
    lines = []
    for name, field in TuneSpec.model_fields.items():
        sub = getattr(field.annotation, "model_fields", None)
        for key, f in (sub.items() if sub else [(None, field)]):
            lines.append(f"{name}.{key}: {f.description}" if key else f"{name}: {field.description}")
    return "\n".join(lines)


def indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


if __name__ == "__main__":
    sys.exit(main())
