"""torch.compile for a length that changes every step.

Each decoder block's ``forward`` is compiled with its dimensions dynamic, so one
graph serves every (rows, L) the schedule draws instead of one per length; all
blocks share it (the same code). Only ``forward`` is compiled, not the module's
call: DeepSpeed's hooks stay outside the graph, and at ZeRO-3 the blocks are
marked as leaf modules so that a block's parameters are gathered whole before
its compiled forward runs (per-linear gathers inside it would cut the graph at
every layer). With documents kept apart the attention module stays out of the
graph (document attention walks the micro-batch's documents in Python). The head
and loss are compiled too, per chunk of positions when ``train.loss_chunk_tokens``
is set: inductor fuses the cross-entropy, so no fp32 copy or log-softmax of the
logits is kept. Compiled artifacts go to ``cache_dir`` (inductor's FX graph and
AOTAutograd caches): the installation's, or on a cluster ``data.cache_dir``'s,
so every worker, restart and trial after the first loads them instead.
"""
from __future__ import annotations

import os
from collections import Counter
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import torch

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
DISABLE_ENV = "TORCHDYNAMO_DISABLE"
GRAPHS: Counter = Counter()  # graphs handed to inductor, by what they are part of ("block", "head")


@cache
def backend(family: str):
    """Inductor, counting the graphs it is given (a recompilation is one more graph). One callable per family:
    dynamo guards on the backend's identity, so a new one per block would recompile the shared code per block."""
    def compile_graph(graph, example_inputs):
        from torch._inductor.compile_fx import compile_fx  # inductor's own entry point, as torch.compile uses it
        GRAPHS[family] += 1
        return compile_fx(graph, example_inputs)
    return compile_graph


def compile_function(function, family: str):
    return torch.compile(function, dynamic=True, backend=backend(family))


def enabled(setting, use_gpu: bool) -> bool:
    """train.compile resolved: true, false, or auto: compiled on GPU, eager on CPU (docs/results.md has why)."""
    return setting is True or (setting == "auto" and use_gpu)


@contextmanager
def unless_compiling(compiling: bool):
    """TorchDynamo switched off while an eager run starts its DeepSpeed engine.

    ``deepspeed.initialize`` imports DeepSpeed's Muon optimizer only to check
    the optimizer's type (``zero/utils.py``), and that module wraps three
    functions in ``torch.compile`` as it loads, which builds inductor's wrapper:
    1.2-1.7 s of every worker's start-up (cProfile of a worker; a bare import
    with dynamo loaded: 1.2 s, and 0.0 s switched off), for functions an eager
    run never calls. Dynamo's own switch (read at each ``torch.compile``) turns
    those wrappers into no-ops. A compiled run leaves it on: it loads inductor
    anyway.
    """
    before = os.environ.get(DISABLE_ENV)
    if not compiling:
        os.environ[DISABLE_ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(DISABLE_ENV, None)
        else:
            os.environ[DISABLE_ENV] = before


def cache_dir(data_cache_dir: str) -> str:
    """Where compiled artifacts are kept: beside the prepared corpus (a path every node shares on a cluster)."""
    return str(Path(data_cache_dir).expanduser() / "compiled")


def blocks(lm) -> list[torch.nn.Module]:
    """The transformer blocks of a Hugging Face model (the classes its ``_no_split_modules`` names)."""
    names = set(getattr(lm, "_no_split_modules", None) or [])
    return [m for m in lm.modules() if type(m).__name__ in names]


def mark_zero3_leaves(module, lm) -> None:
    """At ZeRO-3, gather each block's parameters at the block (before its compiled forward), not per layer."""
    from deepspeed.utils import set_z3_leaf_modules  # at call time: DeepSpeed reads its accelerator at import
    set_z3_leaf_modules(module, list({type(b) for b in blocks(lm)}))


def compile_blocks(lm, documents_apart: bool) -> int:
    """Compile every block's forward with dynamic shapes; the number of blocks.

    With documents kept apart the attention module runs eagerly (its kernel choice walks the micro-batch's
    documents in Python): the block's graph stops before it and resumes after it, two graphs in all, rather
    than a graph break deep inside the attention that splits it into several frames. Sizes that happen to be
    equal are not assumed equal ("duck shapes" would recompile when they differ later)."""
    torch.fx.experimental._config.use_duck_shape = False
    found = blocks(lm)
    for block in found:
        if documents_apart:
            for child in block.children():
                if "Attention" in type(child).__name__:
                    child._call_impl = torch.compiler.disable(child._call_impl)
        block.forward = compile_function(block.forward, "block")
    return len(found)


def report() -> dict:
    """What compilation did in this process so far: graphs compiled per family (a recompilation is one more),
    seconds compiling (forward and backward), and inductor's cache hits and misses."""
    from torch._dynamo.utils import compilation_time_metrics, counters  # here: the driver never loads dynamo
    seconds = sum(sum(values) for name, values in compilation_time_metrics.items()
                  if name in ("_compile.compile_inner", "compile_fx.<locals>.bw_compiler"))
    return {"block_graphs": GRAPHS["block"], "head_graphs": GRAPHS["head"],
            "compilations": GRAPHS["block"] + GRAPHS["head"], "compile_s": seconds,
            "cache_hits": counters["inductor"]["fxgraph_cache_hit"],
            "cache_misses": counters["inductor"]["fxgraph_cache_miss"]}
