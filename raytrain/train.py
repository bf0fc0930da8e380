"""The per-worker training loop, read top to bottom: plan the step, train it, log, evaluate, checkpoint."""
from __future__ import annotations

import os
from pathlib import Path

import ray.train
import torch
import torch.distributed as dist

from raytrain import compiled
from raytrain.attention import KERNELS, use_document_attention
from raytrain.checkpoint import Checkpointer, newest_checkpoint, snapshot_writer
from raytrain.config import Config
from raytrain.data import ReadAhead, open_corpus
from raytrain.devices import peak_flops
from raytrain.engine import Buckets, deepspeed_config, discard_gradients, init_engine, lr_schedule, set_lr
from raytrain.evaluate import Evaluator
from raytrain.export import export_hf
from raytrain.loss import CausalLMLoss, document_eots
from raytrain.meter import MemoryGauge, Meter, Startup
from raytrain.model import build_model, model_shape
from raytrain.ops import build_comm_op
from raytrain.runlog import NullRunLog, RunLog, say
from raytrain.steps import Planner, StepPlan
from raytrain.trackers import Trackers

STOPPED = "stopped.txt"  # rank 0 writes why it stopped the run early; the driver raises it


def train_worker(payload: dict) -> None:
    """One data-parallel rank; resumes where a crash left off."""
    cfg, run_dir = Config.model_validate(payload["config"]), Path(payload["run_dir"])
    startup = Startup(payload.get("stamps", []), "Ray Train's workers")
    rank, world, engine, corpus, memory = setup_worker(cfg, payload["corpus"])
    startup.mark("model and DeepSpeed engine")
    log = RunLog(run_dir, cfg.train.max_steps, Trackers.open(run_dir, cfg, say)) if rank == 0 else NullRunLog()
    plan = Planner(cfg.lengths, cfg.train, cfg.data.windows, cfg.run.seed, corpus.train.size, world)
    meter = Meter(cfg.train, model_shape(engine.module.lm), worker_peak_flops(cfg.scaling, log) * world, memory, log)
    checkpointer = Checkpointer(cfg, rank, world, log, plan, run_dir)
    evaluator = Evaluator(cfg.eval, cfg.train.max_steps, cfg.lengths.max, corpus.val, engine, plan.rows_per_micro,
                          rank, world, log)
    lr_at, state = lr_schedule(cfg.train), checkpointer.restore(engine, meter)
    reader = ReadAhead(plan, corpus.train, rank, cfg.data.read_ahead)
    state.last_eval = state.last_eval or evaluator(state)
    startup.mark("checkpoint and first evaluation")
    log.record("probe.json", probe_memory(engine, plan, memory, log))
    startup.done("memory probe", log)
    meter.start()
    while state.step < cfg.train.max_steps:
        with meter.waiting_for_data():
            step, batches = reader(state.step)
        set_lr(engine, lr_at(state.step, state.tokens, step.budget))
        loss, finite, grad_norm = train_step(engine, step, batches, world)
        state.advance(step)
        meter.update(step, loss, finite, grad_norm)
        if meter.exhausted:
            return stop_run(run_dir, log, meter, step)
        if meter.due(state.step):
            log.metrics(meter.flush(step, state.tokens, engine.optimizer.param_groups[0]["lr"]))
        if evaluator.due(state.step) or checkpointer.due(state.step):
            with meter.paused():
                state.last_eval = evaluator(state) if evaluator.due(state.step) else state.last_eval
                checkpointer.report(engine, state, meter)
    export_hf(engine, payload["tokenizer_dir"], run_dir / "model", rank, {"raytrain.yaml": cfg.to_yaml()})
    log.close()


def train_step(engine, step: StepPlan, batches: list, world: int):
    """Forward and backward this rank's micro-batches of ``step``, then update unless the loss is non-finite.

    The engine trains a ``CausalLMLoss``: each micro-batch's summed shifted
    cross-entropy (told the most rows any rank's micro-batch holds, so that every
    rank calls the output head as often: ZeRO-3 gathers at each call). Returns
    the step's loss, summed over ranks and divided by the global step's targets
    (a float64 tensor), whether it was finite, and the gradient norm before
    clipping (None for a skipped step). Each micro-batch's
    gradient is scaled by ``world / targets``: DeepSpeed averages gradients over
    ranks, and this turns the average back into the global-batch mean whatever
    the split. The finiteness check is the one host sync per step: every rank
    must agree to skip, and DeepSpeed's own gradient clipping syncs there anyway.
    """
    loss_sum, targets = torch.zeros((), dtype=torch.float64, device=engine.device), step.targets
    for i, batch in enumerate(batches):
        engine.set_gradient_accumulation_boundary(i == len(batches) - 1)
        micro_sum = engine(torch.from_numpy(batch).to(engine.device), rows=step.micro_rows)
        engine.backward(micro_sum * (world / targets))
        loss_sum += micro_sum.detach().double()
    dist.all_reduce(loss_sum)
    loss = loss_sum / targets
    finite = bool(torch.isfinite(loss))
    if not finite:
        discard_gradients(engine)
        return loss, finite, None
    # ZeRO 1-3 keep the norm they clip with; plain ZeRO-0 clips without keeping it
    norm = None if engine.zero_optimization_stage() else torch.nn.utils.get_total_norm(
        [p.grad for p in engine.module.parameters() if p.grad is not None])
    engine.step()
    return loss, finite, engine.get_global_grad_norm() if norm is None else norm  # a tensor: read at log time


def probe_memory(engine, plan: Planner, memory: MemoryGauge, log) -> dict:
    """Forward and backward the largest micro-batch any rank will run, before training, weighted by zero; what
    ran and the peak memory it reached.

    An out-of-memory then shows at step 0, not hours in (Composer's and
    OLMo-core's pre-allocation). The input carries an end-of-text token so the
    document-masking path runs when training uses it. The gradients it leaves
    are exact zeros, accumulated into the first step without changing it. Hooks
    on the linear layers record the dtype they computed in, and the attention
    function which kernel it called, so the log (and the GPU check) say what ran.
    """
    largest = plan.largest_micro_batch()
    windows = torch.zeros((largest.micro_rows, largest.length + 1), dtype=torch.long, device=engine.device)
    windows[:, largest.length // 2] = engine.module.eot if engine.module.eot is not None else 0
    dtypes, kernels = set(), dict(KERNELS)
    hooks = [m.register_forward_hook(lambda m, args, out: dtypes.add(str(out.dtype).removeprefix("torch.")))
             for m in engine.module.modules() if isinstance(m, torch.nn.Linear)]
    engine.set_gradient_accumulation_boundary(False)
    engine.backward(engine(windows) * 0.0)
    for hook in hooks:
        hook.remove()
    called = [name for name, count in KERNELS.items() if count > kernels.get(name, 0)]
    probe = {"rows": largest.micro_rows, "length": largest.length, "zero_stage": engine.zero_optimization_stage(),
             "linear_dtype": ",".join(sorted(dtypes)), "attention": ",".join(called) or "SDPA (documents crossed)",
             "peak_gib": memory.peak() / 2**30, "compiled": compiled.report()}
    log.say(f"memory probe: forward/backward of {probe['rows']} x {probe['length']} tokens (the largest "
            f"micro-batch) at ZeRO-{probe['zero_stage']}: linear layers in {probe['linear_dtype']}, attention "
            f"{probe['attention']}, peak {probe['peak_gib']:.2f} GiB")
    if probe["compiled"]["compilations"]:
        c = probe["compiled"]
        log.say(f"compiled {c['block_graphs']} graph(s) of the blocks and {c['head_graphs']} of the head and loss in "
                f"{c['compile_s']:.1f} s (forward and backward); inductor's cache: {c['cache_hits']} hit(s), "
                f"{c['cache_misses']} miss(es)")
    return probe


def stop_run(run_dir: Path, log, meter: Meter, step) -> None:
    """Too many non-finite losses in a row: rank 0 says why; the driver raises it and the CLI exits 1."""
    stop = (f"stopped: {meter.bad_in_a_row} non-finite losses in a row (train.max_nonfinite), the last at "
            f"step {step.step + 1}, seq_len {step.length}; last good checkpoint: {newest_checkpoint()}")
    log.say(stop)
    if not isinstance(log, NullRunLog):
        (run_dir / STOPPED).write_text(stop)
    log.close()


def worker_peak_flops(scaling, log) -> float:
    """One worker's peak FLOP/s for MFU; rank 0 says where the figure comes from."""
    peak, source = peak_flops(scaling.use_gpu, scaling.peak_tflops, scaling.cpus_per_worker)
    log.say(f"MFU against {peak / 1e12:.3f} TFLOP/s per worker ({source})")
    return peak


def setup_worker(cfg: Config, corpus_dir: str):
    """(rank, world, DeepSpeed engine, corpus, memory gauge) of this Ray Train worker; the corpus is only
    opened, never made."""
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    normal_priority()
    torch.set_num_threads(cfg.scaling.cpus_per_worker)
    torch.manual_seed(cfg.run.seed)
    corpus = open_corpus(Path(corpus_dir), cfg.data.cache_dir)
    if not cfg.scaling.use_gpu:
        build_comm_op(say if rank == 0 else lambda line: None)
    memory = MemoryGauge()  # before the model: what training allocates is counted from here
    engine = build_engine(cfg, corpus.index["vocab_size"], corpus.index["eot"], world)
    stage = engine.zero_optimization_stage()
    note = "" if stage == cfg.deepspeed.zero_stage else \
        f" (one rank: deepspeed.zero_stage={cfg.deepspeed.zero_stage} would partition nothing)"
    say(f"rank {rank}/{world} on node {ray.get_runtime_context().get_node_id()[:12]}, device {engine.device}, "
        f"ZeRO-{stage}{note}")
    return rank, world, engine, corpus, memory


def build_engine(cfg: Config, vocab_size: int, eot: int, world: int):
    """The DeepSpeed engine training the run's language model and its loss (``CausalLMLoss``), its blocks and
    head compiled when train.compile says so."""
    lm = build_model(cfg.model, vocab_size, eot)
    train_eot, eval_eot = document_eots(cfg.data.cross_documents, cfg.eval.documents, eot)
    if train_eot is not None or eval_eot is not None:
        use_document_attention(lm)  # documents kept apart without an L x L mask (crossed windows: SDPA)
    compiling = compiled.enabled(cfg.train.compile, cfg.scaling.use_gpu)
    module = CausalLMLoss(lm, train_eot, cfg.train.loss_chunk_tokens, compiling, eval_eot)
    ds = deepspeed_config(cfg.deepspeed, cfg.train, world, cfg.bf16, Buckets.of(module))
    if compiling and ds["zero_optimization"]["stage"] == 3:
        compiled.mark_zero3_leaves(module, lm)
    with compiled.unless_compiling(compiling):
        engine = init_engine(module, ds)
    if compiling:
        compiled.compile_blocks(lm, documents_apart=not cfg.data.cross_documents)
    snapshot_writer(engine)  # checkpoints copied and written in the background (checkpoint.py)
    return engine


def normal_priority() -> None:
    """Undo the niceness Ray gives its workers (15): a training worker is the job, not background work.

    At niceness 15 every other process (Ray's own, the driver) preempts the
    worker's threads, and a multi-threaded step waits at each parallel region for
    the descheduled one (measured: 1 worker x 2 CPUs at 0.84x a bare loop, 0.95x
    at niceness 0). Linux keeps niceness per thread, so every thread is reset;
    without the privilege to raise priority this is a no-op.
    """
    for tid in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else []:
        try:
            os.setpriority(os.PRIO_PROCESS, int(tid), 0)
        except (PermissionError, ProcessLookupError):
            return
