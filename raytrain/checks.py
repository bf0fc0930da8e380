"""Checks a config must pass before Ray starts: between keys, and against this machine.

``cross_problems`` needs nothing but the parsed sections; ``environment_problems``
looks at the machine: CPUs and GPUs a local run would ask for, input files, the
tokenizer and pretrained model, and output directories (created and written to,
then removed again, rather than guessed at from permission bits).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import yaml

from raytrain.config import EvalConfig
from raytrain.devices import ACCELERATORS
from raytrain.lengths import Lengths
from raytrain.section import Problem
from raytrain.sources import source_problems
from raytrain.steps import rows_of
from raytrain.tokenizer import load_tokenizer
from raytrain.trackers import EXTRA, missing_trackers


def cross_problems(s: dict) -> list[Problem]:
    """Checks that involve several keys (no files, no machine)."""
    lengths, train, model, scaling, ev = (s[k] for k in ("lengths", "train", "model", "scaling", "eval"))
    problems = lengths.problems()
    budgets = [("train.tokens_per_step", train.tokens_per_step)]
    if train.batch_warmup_tokens:  # the warmup's first step is its smallest
        budgets.append(("train.batch_start_tokens", train.batch_start_tokens))
        if train.batch_start_tokens > train.tokens_per_step:
            problems.append(("train.batch_start_tokens", train.batch_start_tokens,
                             f"must be <= train.tokens_per_step ({train.tokens_per_step}): a batch warmup grows"))
    for key, budget in budgets:
        problems += at_least_one_row(key, budget, lengths.max, "every step")
        longest = rows_of(budget, lengths.max)
        if budget >= lengths.max and longest < scaling.num_workers:
            problems.append((key, budget, f"gives {longest} row(s) at lengths.max, fewer than scaling.num_workers "
                                          f"({scaling.num_workers}); use at least {lengths.max * scaling.num_workers}"))
    if train.micro_batch_tokens is not None:
        problems += at_least_one_row("train.micro_batch_tokens", train.micro_batch_tokens, lengths.max,
                                     "every micro-batch")
    problems += at_least_one_row("eval.tokens", ev.tokens, max(ev.lengths), "every evaluation length",
                                 "max(eval.lengths)")
    if model.pretrained is None:
        if model.hidden_size % model.num_heads:
            problems.append(("model.num_heads", model.num_heads,
                             f"must divide model.hidden_size ({model.hidden_size})"))
        problems += position_problems(model.max_positions, lengths, ev, "raise model.max_positions")
    return problems


def at_least_one_row(key: str, tokens: int, length: int, what: str, name: str = "lengths.max") -> list[Problem]:
    """A token budget below one row of the longest length would round to zero rows (the class of 'too small')."""
    if tokens >= length:
        return []
    return [(key, tokens, f"must be >= {name} ({length}) so {what} has at least one row")]


def position_problems(positions: int, lengths: Lengths, ev: EvalConfig, fix: str) -> list[Problem]:
    problems = []
    if lengths.max > positions:
        problems.append(("lengths.max", lengths.max, f"exceeds the model's {positions} positions; lower it or {fix}"))
    for value in ev.lengths:
        if value > positions:
            problems.append(("eval.lengths", value, f"exceeds the model's {positions} positions; lower it or {fix}"))
    return problems


def environment_problems(s: dict) -> list[Problem]:
    """Checks against this machine: resources, input files, the tokenizer and pretrained model, outputs."""
    scaling, data, model, run = s["scaling"], s["data"], s["model"], s["run"]
    problems = resource_problems(scaling)
    problems += source_problems(data.path, "data.path")
    problems += writable_problems("data.cache_dir", data.cache_dir) + writable_problems("run.dir", run.dir)
    tokenizer, spec = None, s["tokenizer"]
    if spec != "bytes" and not Path(spec).expanduser().is_dir():
        problems.append(("tokenizer", spec, "must be 'bytes' or a local Hugging Face tokenizer directory"))
    else:
        try:
            tokenizer = load_tokenizer(spec)
        except Exception as err:  # a broken directory: say what the loader said
            problems.append(("tokenizer", spec, f"does not load as a Hugging Face tokenizer: {err}"))
    if tokenizer is not None and tokenizer.eos_token_id is None:
        problems.append(("tokenizer", spec, "has no end-of-text (eos) token, which separates documents in the "
                                            "token stream; use a tokenizer that defines one"))
    if model.pretrained is not None:
        pretrained = pretrained_problems(model.pretrained, s["lengths"], s["eval"], tokenizer, spec)
        problems += pretrained
        apart = ("data.cross_documents", False, "set data.cross_documents: true") if not data.cross_documents \
            else ("eval.documents", "apart", "set eval.documents: crossed") if s["eval"].documents == "apart" else None
        if apart and not any(key == "model.pretrained" for key, _, _ in pretrained):
            problems += document_attention_problems(model.pretrained, *apart)
    if run.init_from is not None and "://" not in run.init_from:
        problems += init_from_problems(run.init_from, model)
    for name in missing_trackers(run.loggers):
        problems.append(("run.loggers", name, f"the {name} library is not installed: {EXTRA}"))
    return problems


def init_from_problems(path: str, model) -> list[Problem]:
    """A local checkpoint to start from: one of raytrain's, made by the same model (its weights must fit)."""
    directory = Path(path).expanduser()
    if not (directory / "state.json").is_file() or not (directory / "config.yaml").is_file():
        return [("run.init_from", path, "must be a raytrain checkpoint directory (with state.json and config.yaml), "
                                        "e.g. RUN_DIR/checkpoint_<time>")]
    theirs = (yaml.safe_load((directory / "config.yaml").read_text()) or {}).get("model", {})
    return [("run.init_from", path, f"was made by another model (model.{key} = {theirs.get(key)!r} there); "
                                    f"it can only continue a run of the same model")
            for key, value in model.model_dump(mode="json").items() if theirs.get(key) != value][:1]


def resource_problems(scaling) -> list[Problem]:
    """What the workers ask for against what they would run on, so that Ray Train never waits for a resource
    that cannot come: this machine for a local run, or the Ray this process is already connected to (what it has
    or its autoscaler can grow to). A run that joins RAY_ADDRESS is checked by its bounded start instead."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        from ray._private.state import state
        have = {**ray.cluster_resources()}
        for name, most in (state.get_max_resources_from_cluster_config() or {}).items():
            have[name] = max(have.get(name, 0), most)
        where, fix = "the Ray cluster this process is connected to", "or add nodes that have it"
    elif os.environ.get("RAY_ADDRESS"):
        return []
    else:
        have, where, fix = local_resources(), "this machine", "or connect to a cluster that has it with RAY_ADDRESS"
    problems, workers = [], scaling.num_workers
    for name, per_worker in worker_resources(scaling).items():
        need, available = per_worker * workers, have.get(name, 0)
        if need <= available:
            continue
        key, value = {"CPU": ("scaling.num_workers", workers), "GPU": ("scaling.use_gpu", True)}.get(
            name, (f"scaling.resources_per_worker.{name}", per_worker))
        fits = int(available // per_worker)
        problems.append((key, value, f"{workers} workers need {need:g} {name} but {where} has {available:g}; use at "
                         f"most {fits} workers{', set scaling.use_gpu=false' if name == 'GPU' else ''} {fix}"))
    return problems


def worker_resources(scaling) -> dict[str, float]:
    """The Ray resources one worker asks for (the same bundle ``launch.scaling_config`` gives Ray Train)."""
    return {"CPU": scaling.cpus_per_worker, **({"GPU": 1} if scaling.use_gpu else {}),
            **scaling.resources_per_worker}


def local_resources() -> dict[str, float]:
    """What a local Ray offers: the CPUs, the GPUs this machine's torch sees, and their accelerator type."""
    import torch  # here, not at the top: the CLI answers --help and plain config errors without it
    have = {"CPU": os.cpu_count() or 1, "GPU": torch.cuda.device_count()}
    if have["GPU"]:
        name = torch.cuda.get_device_name().upper()
        have.update({f"accelerator_type:{known}": 1 for known in ACCELERATORS if known.split("-")[0] in name})
    return have


def pretrained_problems(directory: str, lengths: Lengths, ev: EvalConfig, tokenizer, spec: str) -> list[Problem]:
    path = Path(directory).expanduser() / "config.json"
    if not path.is_file():
        return [("model.pretrained", directory, "must be a local Hugging Face model directory (with config.json)")]
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return [("model.pretrained", directory, f"its config.json does not read as JSON: {err}")]
    problems = []
    positions = next((config[k] for k in ("max_position_embeddings", "n_positions", "n_ctx") if k in config), None)
    if positions:
        problems += position_problems(positions, lengths, ev, "use a model with more positions")
    vocab = config.get("vocab_size")
    if tokenizer is not None and vocab and len(tokenizer) > vocab:
        problems.append(("tokenizer", spec, f"has {len(tokenizer)} tokens but model.pretrained embeds only "
                                            f"{vocab}; use the model's own tokenizer"))
    return problems


def document_attention_problems(directory: str, key: str, value, fix: str) -> list[Problem]:
    """Documents are kept apart by raytrain's attention function, which a model runs only if it routes attention
    through transformers' AttentionInterface (Bloom, Falcon, GPT-Neo, MPT do not), and which computes a sliding
    window but neither soft-capping (Gemma-2) nor attention sinks (gpt-oss)."""
    import torch  # here: torch and transformers take seconds to import
    from transformers import AutoConfig, AutoModelForCausalLM

    from raytrain.attention import UNSUPPORTED  # imports transformers: only when a pretrained model needs it
    try:
        config = AutoConfig.from_pretrained(Path(directory).expanduser(), local_files_only=True)
        architecture = AutoModelForCausalLM._model_mapping[type(config)]
    except (OSError, ValueError, KeyError) as err:
        return [("model.pretrained", directory, f"is not a causal language model transformers knows: {err}")]
    if not architecture._can_set_attn_implementation():
        return [(key, value, f"{architecture.__name__} (model.pretrained) does not route attention through "
                 f"transformers' AttentionInterface, so documents cannot be kept apart in it; {fix}, or "
                 "use a model that does (Llama, Mistral, Qwen2, GPT-2, ...)")]
    with torch.device("meta"):  # no memory, no weights read: only which modules the architecture has
        modules = list(AutoModelForCausalLM.from_config(config).modules())
    used = {"softcap": getattr(config, "attn_logit_softcapping", None) is not None,
            "s_aux": any(isinstance(getattr(m, "sinks", None), torch.nn.Parameter) for m in modules)}
    return [(key, value, f"{architecture.__name__} (model.pretrained) uses {UNSUPPORTED[name]} ({name}), which "
             f"raytrain's document attention does not compute; {fix}")
            for name, uses in used.items() if uses]


def writable_problems(key: str, value: str) -> list[Problem]:
    """A directory we will create and write into, tried for real: created (with its parents), a file written in
    it, and what the try created removed again."""
    if "://" in value:
        return []
    target = Path(value).expanduser().absolute()
    missing = [p for p in [target, *target.parents] if not p.exists()]
    try:
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target, prefix=".raytrain-write-test-"):
            pass
    except OSError as err:
        where = f" ({err.filename})" if err.filename else ""
        return [(key, value, f"cannot be created or written: {err.strerror}{where}; choose a directory you can "
                             "write to")]
    finally:
        for path in missing:  # deepest first
            try:
                path.rmdir()
            except OSError:
                break
    return []
