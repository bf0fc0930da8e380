"""The engine on the path a GPU takes, with real DeepSpeed engines on two gloo ranks (no Ray):

- bf16 survives DeepSpeed's engine: under the CUDA view of autocast (``tests.ranks``)
  the linear layers compute in bf16 in a training step, in evaluation and in the
  memory probe, at ZeRO 0-3; an autocast entered outside the engine (the previous
  release) is switched off inside it there, and only there;
- the chunked head and loss run inside the engine's forward, so ZeRO-3 equals ZeRO-1;
- ``train_step``'s gradient scaling gives the full-batch gradient for any split.
"""
from contextlib import nullcontext

import numpy as np
import pytest
import torch

from raytrain.data import TokenStream
from raytrain.loading import load_config
from raytrain.steps import StepPlan
from tests.ranks import cuda_autocast_view, run_ranks

KEYS = ["model.hidden_size=32", "model.num_layers=2", "model.intermediate_size=64", "model.num_heads=4",
        "lengths.min=16", "lengths.max=32", "lengths.multiple_of=16", "train.tokens_per_step=224",
        "train.micro_batch_tokens=64", "train.warmup_steps=1", "data.cross_documents=false"]
EOT = 256


def config(*extra):
    return load_config(None, KEYS + list(extra), environment=False)


def stream() -> TokenStream:
    tokens = np.random.default_rng(0).integers(0, 256, 4000)
    tokens[::37] = EOT  # documents of 37 tokens
    return TokenStream([tokens])


def plan_at(step: int, world: int, length: int = 32, rows: int = 7) -> StepPlan:
    """7 rows of 32: 2 ranks x 2 micro-batches (2 and 2, 2 and 1 rows), or 1 rank x 4."""
    offsets = np.random.default_rng(step).integers(0, 3900, rows)
    return StepPlan(step, length, rows, offsets, world, 2)


def linear_outputs(engine) -> list:
    """Records the dtype of every linear layer's output."""
    seen = []
    for module in engine.module.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    return seen


def bf16_through_the_engine(rank, world, out):
    from raytrain.evaluate import evaluate
    from raytrain.meter import MemoryGauge
    from raytrain.runlog import NullRunLog
    from raytrain.steps import Planner
    from raytrain.train import build_engine, probe_memory, train_step
    found, windows = {}, torch.from_numpy(stream().windows(plan_at(0, 1).offsets, 32))
    engine = build_engine(config("deepspeed.zero_stage=1"), 257, EOT, world)  # no torch_autocast section
    seen = linear_outputs(engine)
    for gpu_view in (False, True):  # the previous release: autocast entered outside the engine
        with cuda_autocast_view() if gpu_view else nullcontext(), torch.autocast("cpu", dtype=torch.bfloat16):
            engine(windows)
        found[f"outside, gpu view {gpu_view}"] = set(seen)
        seen.clear()
    for stage in range(4):
        cfg = config(f"deepspeed.zero_stage={stage}", "train.precision=bf16")
        engine = build_engine(cfg, 257, EOT, world)
        seen = linear_outputs(engine)
        with cuda_autocast_view():
            plan = plan_at(0, world)
            train_step(engine, plan, plan.rank_batches(stream(), rank), world)
            found[f"ZeRO-{stage} training step"], _ = set(seen), seen.clear()
            evaluate(engine, stream(), [32], 96, lambda length: 2, rank, world)
            found[f"ZeRO-{stage} evaluation"], _ = set(seen), seen.clear()
            probe = probe_memory(engine, Planner(cfg.lengths, cfg.train, "random", 0, 4000, world), MemoryGauge(),
                                 NullRunLog())
            found[f"ZeRO-{stage} memory probe"], _ = set(seen), seen.clear()
            found[f"ZeRO-{stage} probe says"] = (probe["linear_dtype"], probe["attention"], probe["zero_stage"])
            found[f"ZeRO-{stage} stage"] = engine.zero_optimization_stage()
    if rank == 0:
        torch.save(found, out)


def test_linear_layers_compute_in_bf16_through_the_engine_on_the_gpu_path(tmp_path):
    run_ranks(bf16_through_the_engine, 2, tmp_path / "found.pt")
    found = torch.load(tmp_path / "found.pt")
    # the branch CPU tests never took: an outer autocast is switched off inside the engine on a GPU
    assert found["outside, gpu view False"] == {torch.bfloat16}
    assert found["outside, gpu view True"] == {torch.float32}
    for stage in range(4):
        assert found[f"ZeRO-{stage} stage"] == stage
        for where in ("training step", "evaluation", "memory probe"):
            assert found[f"ZeRO-{stage} {where}"] == {torch.bfloat16}, (stage, where)
        assert found[f"ZeRO-{stage} probe says"] == ("bfloat16", "SDPA per document", stage)  # what the log says


def three_steps(rank, world, stage, chunk, out):
    """Losses and gradient norms of 3 steps and every parameter's whole gradient at the first, at a ZeRO stage."""
    from deepspeed.utils import safe_get_full_grad

    from raytrain.engine import set_lr
    from raytrain.train import build_engine, train_step
    torch.manual_seed(0)
    engine = build_engine(config(f"deepspeed.zero_stage={stage}", f"train.loss_chunk_tokens={chunk}"), 257, EOT,
                          world)
    grads, optimizer_step = {}, engine.optimizer.step

    def capture(*args, **kwargs):  # the reduced gradient, before the update (collective at ZeRO-3: every rank)
        if not grads:
            grads.update({n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()})
        return optimizer_step(*args, **kwargs)
    engine.optimizer.step = capture
    steps = []
    for step in range(3):
        set_lr(engine, 1e-2)
        plan = plan_at(step, world)
        loss, _, norm = train_step(engine, plan, plan.rank_batches(stream(), rank), world)
        steps.append((float(loss), float(norm)))
    if rank == 0:
        torch.save({"steps": steps, "grads": grads}, out)


def test_chunked_loss_at_zero3_equals_zero1_in_loss_gradient_and_weights(tmp_path):
    """The head and loss 48 positions at a time (not dividing a micro-batch, one rank's micro-batches holding
    fewer rows than the other's), inside the engine's forward: ZeRO-3's parameter gathering and backward hooks
    cover them, every rank calls the head as often, and it equals ZeRO-1 (fp32: losses and gradient norms of
    3 steps and the first step's whole gradient, 1e-5)."""
    for stage in (1, 3):
        run_ranks(three_steps, 2, stage, 48, tmp_path / f"zero{stage}.pt")
    one, three = (torch.load(tmp_path / f"zero{s}.pt") for s in (1, 3))
    assert np.array(three["steps"]) == pytest.approx(np.array(one["steps"]), rel=1e-5)
    assert set(three["grads"]) == set(one["grads"]) and len(one["grads"]) == 2 * 9 + 2
    for name, grad in one["grads"].items():
        torch.testing.assert_close(three["grads"][name], grad, rtol=1e-5, atol=1e-8)
    assert one["steps"][0] != one["steps"][1]  # it trained


def captured_gradient(rank, world, out):
    """One train_step at ZeRO-0 on the 7-row step split over ``world`` ranks and 2-row micro-batches; the
    averaged gradient DeepSpeed hands the optimizer."""
    from raytrain.train import build_engine, train_step
    torch.manual_seed(0)
    engine = build_engine(config("deepspeed.zero_stage=0"), 257, EOT, world)
    grads, step = {}, engine.optimizer.step

    def capture(*args, **kwargs):
        grads.update({n: p.grad.clone() for n, p in engine.module.named_parameters()})
        return step(*args, **kwargs)
    engine.optimizer.step = capture
    plan = plan_at(0, world)
    batches = plan.rank_batches(stream(), rank)
    loss, finite, _ = train_step(engine, plan, batches, world)
    if rank == 0:
        torch.save({"grads": grads, "loss": float(loss), "micro_batches": len(batches)}, out)


def test_train_step_gives_the_full_batch_gradient_for_any_split(tmp_path):
    """2 ranks x 2 micro-batches (rows 2+2 and 2+1) and 1 rank x 4: train_step's loss and the gradient DeepSpeed
    reduces equal the whole 7-row batch's, computed independently: every document of every row run alone
    through the plain transformers model, cross-entropy summed over the 7 x 32 targets (1e-5)."""
    import torch.nn.functional as F

    from raytrain.model import build_model
    torch.manual_seed(0)
    lm = build_model(config().model, 257, EOT)  # the same weights as every rank's
    windows = torch.from_numpy(stream().windows(plan_at(0, 1).offsets, 32))
    total = 0
    for row in windows:
        inputs, targets = row[:-1], row[1:]
        starts = [0] + [i for i in range(1, 32) if inputs[i] == EOT] + [32]  # an end-of-text opens a document
        for start, end in zip(starts[:-1], starts[1:]):
            logits = lm(input_ids=inputs[start:end][None]).logits[0]
            total = total + F.cross_entropy(logits, targets[start:end], reduction="sum")
    whole = total / windows[:, 1:].numel()
    whole.backward()
    reference = {f"lm.{n}": p.grad for n, p in lm.named_parameters()}
    for world in (2, 1):
        run_ranks(captured_gradient, world, tmp_path / f"w{world}.pt")
        got = torch.load(tmp_path / f"w{world}.pt")
        assert got["micro_batches"] == (2 if world == 2 else 4)
        assert got["loss"] == pytest.approx(whole.item(), rel=1e-6)
        for name, grad in reference.items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=0, atol=1e-5)


def thirty_steps(rank, world, stage, compile_mode, out):
    """30 steps of the uniform schedule over 16-256 (lengths drawn per step), as train_step runs them."""
    from raytrain.compiled import report
    from raytrain.engine import set_lr
    from raytrain.steps import Planner
    from raytrain.train import build_engine, train_step
    cfg = load_config(None, ["model.hidden_size=64", "model.num_layers=2", "model.intermediate_size=128",
                             f"deepspeed.zero_stage={stage}", f"train.compile={compile_mode}",
                             "train.tokens_per_step=2048", "lengths.min=16", "lengths.max=256", "lengths.multiple_of=4",
                             "train.max_steps=30",
                             "data.cross_documents=false"], environment=False)
    torch.manual_seed(0)
    engine = build_engine(cfg, 257, EOT, world)
    plan = Planner(cfg.lengths, cfg.train, "random", 0, 4000, world)
    losses, lengths = [], set()
    for step in range(30):
        set_lr(engine, 1e-3)
        planned = plan(step)
        lengths.add(planned.length)
        losses.append(float(train_step(engine, planned, planned.rank_batches(stream(), rank), world)[0]))
    if rank == 0:
        torch.save({"losses": losses, "lengths": len(lengths), "compiled": report()}, out)


@pytest.mark.parametrize("stage", [1, 3])
def test_compiled_blocks_compile_once_for_every_length_and_train_like_eager(tmp_path, stage, monkeypatch):
    """Each decoder block compiled with dynamic rows and length (at ZeRO-3 a leaf module, gathered whole before
    its compiled forward): 30 steps over 20 or more lengths compile the block's graph at most 3 times
    (document attention, kept out of the graph, splits it in two), and the losses equal eager training's
    (fp32, 1e-4). At ZeRO-1 a second run with the same cache (new processes, as a restart or the next trial)
    finds every graph in inductor's cache and compiles nothing new."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "compiled"))  # the spawned ranks inherit it
    modes = ("false", "true", "true again") if stage == 1 else ("false", "true")
    for mode in modes:
        run_ranks(thirty_steps, 2, stage, mode.split()[0], tmp_path / f"{mode}.pt")
    eager, compiled, *again = (torch.load(tmp_path / f"{mode}.pt") for mode in modes)
    assert compiled["lengths"] >= 20 and eager["compiled"]["compilations"] == 0
    assert 1 <= compiled["compiled"]["block_graphs"] <= 3 and compiled["compiled"]["head_graphs"] == 1
    assert compiled["losses"] == pytest.approx(eager["losses"], rel=1e-4)
    if again:
        assert compiled["compiled"]["cache_misses"] >= 1
        assert again[0]["compiled"]["cache_misses"] == 0 and again[0]["compiled"]["cache_hits"] >= 1
        assert again[0]["losses"] == compiled["losses"]


def eager_start(rank, world, out):
    """An eager engine at ZeRO-1 (DeepSpeed's optimizer check imports its Muon module, which torch.compiles at
    import): whether inductor's compiler got loaded, and TorchDynamo's switch afterwards."""
    import os
    import sys

    from raytrain.train import build_engine
    build_engine(config("deepspeed.zero_stage=1", "train.compile=false"), 257, EOT, world)
    if rank == 0:
        torch.save({"inductor": "torch._inductor.compile_fx" in sys.modules,
                    "muon": "deepspeed.runtime.zero.muon.original_muon" in sys.modules,
                    "switch": os.environ.get("TORCHDYNAMO_DISABLE")}, out)


def test_an_eager_engine_starts_without_loading_the_compiler(tmp_path):
    """DeepSpeed's Muon module is imported (so the check ran) but its torch.compile wrappers built nothing: the
    1.2-1.7 s of inductor per worker is not paid, and TorchDynamo is left switched on for anything later."""
    run_ranks(eager_start, 2, tmp_path / "start.pt")
    assert torch.load(tmp_path / "start.pt") == {"inductor": False, "muon": True, "switch": None}
