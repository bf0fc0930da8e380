"""``raytrain plan``: what a run will do and whether it fits, from the config alone, before any GPU is rented.

Memory per rank is model states, DeepSpeed's buffers, activations of the largest
micro-batch, the logits and loss, and autocast's weight copies. Model states
follow DeepSpeed's own estimators (``estimate_zero2/3_model_states_mem_needs``),
corrected for what raytrain keeps (fp32 working weights and fp32 gradients
only). Buffers are the ones the engine's config (``engine.zero_section``) makes
DeepSpeed allocate. Activations are what autograd saves per token and layer of a
Llama block (``block_bytes_per_token``, measured from autograd's saved tensors and
checked by a test). The model is built on the meta device: exact parameter counts.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from raytrain.config import Config
from raytrain.devices import ACCELERATORS, Accelerator, find_accelerator
from raytrain.engine import PERSISTENCE_THRESHOLD, Buckets, deepspeed_config, zero_stage
from raytrain.model import model_shape, tiny_llama
from raytrain.section import ConfigError
from raytrain.steps import Planner, Shape
from raytrain.tokenizer import load_tokenizer

GiB = 2**30
USABLE = 0.9  # of a GPU's memory: the CUDA context, NCCL buffers and allocator fragmentation take the rest
# DeepSpeed's CPU all-reduce workspace (shm.cpp): a shared segment per rank, written whole at start; every rank maps
# all of them, but each segment's memory is its own rank's (counted once per rank, not once per mapping)
SHM_WORKSPACE = 2 * 2**20 + 2 * 32 * 2**20
FLAT_ALLREDUCE = 500_000_000  # ZeRO-0 all-reduces gradients flattened into buffers of this many elements (engine.py)


@dataclass(frozen=True)
class Memory:
    states: int
    buffers: dict[str, int]  # DeepSpeed's (and on CPU its shared-memory workspaces), by name
    activations: int
    logits: int
    casts: int  # autocast's 16-bit copy of every weight

    @property
    def total(self) -> int:
        return self.states + sum(self.buffers.values()) + self.activations + self.logits + self.casts

    def terms(self) -> str:
        parts = [("model states", self.states), *self.buffers.items(), ("activations", self.activations),
                 ("logits and loss", self.logits), ("autocast weight copies", self.casts)]
        return " + ".join(f"{name} {size / GiB:.2f}" if size >= 0.005 * GiB else f"{name} <0.01"
                          for name, size in parts if size)


def model_state_bytes(stage: int, params: int, world: int) -> int:
    """Bytes per rank for weights, gradients, master weights and Adam moments with fp32 weights.

    From DeepSpeed's estimators (16-bit weights): ZeRO-2 ``2P + 18P/N`` (18 =
    2 16-bit grads + 4 fp32 grads + 4 fp32 master + 8 Adam), ZeRO-3 ``18P/N``
    plus gathered layers (counted with the buffers here). raytrain's weights are
    fp32 (+2P at ZeRO-2, +4P/N at ZeRO-3, where they are partitioned) and it keeps
    no 16-bit gradient (-2P/N). DeepSpeed has no ZeRO-0/1 estimator: ZeRO-1 is
    ZeRO-2 with whole fp32 gradients on every rank; ZeRO-0 is plain AdamW, 16 bytes.
    """
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    if stage == 0:
        return 16 * params
    if stage == 3:
        _, ds, _ = estimate_zero3_model_states_mem_needs(params, 0, world, 1, cpu_offload=False)
        return ds + (4 - 2) * params // world
    _, ds = estimate_zero2_model_states_mem_needs(params, world, 1, cpu_offload=False)
    zero2 = ds + 2 * params - 2 * params // world
    return zero2 + (4 * params - 4 * params // world if stage == 1 else 0)


def buffer_bytes(stage: int, buckets: Buckets, params: int, persistent: int, use_gpu: bool, world: int) -> dict:
    """What DeepSpeed allocates beyond the model states with the engine's config, in bytes per rank (fp32)."""
    buffers = {}
    if stage == 0:
        buffers["gradient all-reduce copy"] = 4 * min(params, FLAT_ALLREDUCE)  # engine.allreduce_bucket's flatten
    elif stage in (1, 2):
        buffers["reduce buckets (2, overlapped)"] = 2 * 4 * buckets.reduce  # setup_buckets: a double buffer
    else:
        buffers["reduce bucket"] = 4 * buckets.reduce
        buffers["gathered parameters"] = 4 * (buckets.live + buckets.block)  # kept live + prefetched
        buffers["persistent parameters"] = 4 * persistent  # ZeRO-3 keeps small ones whole on every rank
    if not use_gpu:
        buffers["CPU all-reduce workspace"] = SHM_WORKSPACE
    return buffers


def block_bytes_per_token(config, bf16: bool) -> int:
    """Bytes autograd saves per token in one Llama block (measured: ``tests/test_plan.py`` counts the saved
    tensors). h hidden width, w key/value width, i MLP width, n heads: fp32 keeps 32h + 8w + 16i + 8 + 4n;
    under bf16 autocast over fp32 weights 30h + 4w + 8i + 8 + 4n (fp32 norm inputs and outputs, separate bf16
    casts of one activation for q, k, v and for gate and up, the attention's bf16 q, k, v and output, its
    fp32 log-sum-exp per head, the MLP's four bf16 intermediates)."""
    h, i, n = config.hidden_size, config.intermediate_size, config.num_attention_heads
    w = getattr(config, "num_key_value_heads", n) * (getattr(config, "head_dim", None) or h // n)
    return 30 * h + 4 * w + 8 * i + 8 + 4 * n if bf16 else 32 * h + 8 * w + 16 * i + 8 + 4 * n


def activation_bytes(config, rows: int, length: int, bf16: bool, recompute: bool,
                     loss_chunk: Optional[int] = None) -> tuple[int, int]:
    """(block activations, logits and loss) bytes for one micro-batch's forward and backward.

    Recompute keeps only each block's fp32 input plus one block's set. Outside
    the blocks a model keeps its final norm's input and output and the head's
    input (12h + 12 bytes a token in fp32, 10h + 12 in bf16). The loss keeps the
    logits, their fp32 copy and log-softmax, and the gradient (fp32), for the
    whole micro-batch or, with ``loss_chunk``, for one chunk of positions at a
    time. Keeping documents apart adds nothing (no mask is built).
    """
    tokens, layers, h = rows * length, config.num_hidden_layers, config.hidden_size
    block = block_bytes_per_token(config, bf16)
    kept = (4 * h * layers + block) if recompute else block * layers
    blocks = tokens * (kept + (10 if bf16 else 12) * h + 12)
    logits = min(tokens, loss_chunk or tokens) * config.vocab_size * (12 + (2 if bf16 else 0))
    return blocks, logits


@dataclass
class RunPlan:
    cfg: Config
    params: int
    buckets: Buckets
    shortest: Shape
    longest: Shape
    largest: Shape  # the largest micro-batch any rank runs
    memory: Memory
    accelerator: Optional[Accelerator]
    available: Optional[float]  # bytes per rank the plan is checked against
    total_tokens: int
    total_flops: float

    @property
    def fits(self) -> bool:
        return self.available is None or self.memory.total <= self.available

    def refusal(self) -> str:
        return (f"does not fit: needs {self.memory.total / GiB:.1f} GiB per rank ({self.memory.terms()} at "
                f"{self.largest.micro_rows} x {self.largest.length} tokens), {self.device_phrase()} "
                f"{self.available / GiB:.1f} GiB; lower train.micro_batch_tokens, set train.loss_chunk_tokens, raise "
                "deepspeed.zero_stage, set model.activation_checkpointing=true or use more or larger GPUs")

    def device_phrase(self) -> str:
        if self.accelerator:
            return f"{self.accelerator.name} has {self.accelerator.memory_gib:.1f} GiB ({USABLE:.0%} usable):"
        return "this machine's memory per rank is"


def meta_model(cfg: Config, vocab_size: int):
    """The run's model on the meta device (no memory, no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM
    with torch.device("meta"):
        if cfg.model.pretrained:
            config = AutoConfig.from_pretrained(Path(cfg.model.pretrained).expanduser(), local_files_only=True)
            return AutoModelForCausalLM.from_config(config)
        return LlamaForCausalLM(tiny_llama(cfg.model, vocab_size, 0))


def vocab_size_of(cfg: Config, vocab: Optional[int]) -> int:
    if vocab:
        return vocab
    try:
        return len(load_tokenizer(cfg.tokenizer))
    except Exception as err:  # a path that lives on the cluster's shared volume
        raise ConfigError([("tokenizer", cfg.tokenizer, f"cannot be read here ({err.__class__.__name__}); give "
                                                        "its vocabulary size with --vocab N")]) from None


def accelerator_of(cfg: Config, gpu: Optional[str]) -> Optional[Accelerator]:
    """--gpu, else the ``accelerator_type:NAME`` resource the workers ask Ray for."""
    names = [gpu] if gpu else [k.split(":", 1)[1] for k in cfg.scaling.resources_per_worker
                               if k.startswith("accelerator_type:")]
    for name in names:
        found = find_accelerator(name)
        if found is None:
            raise ConfigError([("--gpu" if gpu else "scaling.resources_per_worker", name,
                                f"not a known GPU; one of {sorted(ACCELERATORS)}")])
        return found
    return None


def memory_of(cfg: Config, model, planner: Planner, buckets: Buckets) -> Memory:
    params = sum(p.numel() for p in model.parameters())
    persistent = sum(p.numel() for p in model.parameters() if p.numel() <= PERSISTENCE_THRESHOLD)
    world, train = cfg.scaling.num_workers, cfg.train
    stage = zero_stage(cfg.deepspeed.zero_stage, world)
    # the probe and every step at a length: the largest of (block activations + logits) over the lengths
    blocks, logits = max((activation_bytes(model.config, s.micro_rows, s.length, cfg.bf16,
                                           cfg.model.activation_checkpointing, train.loss_chunk_tokens)
                          for s in planner.shapes()), key=sum)
    return Memory(model_state_bytes(stage, params, world),
                  buffer_bytes(stage, buckets, params, persistent, cfg.scaling.use_gpu, world),
                  blocks, logits, 2 * params if cfg.bf16 else 0)


def plan_run(cfg: Config, vocab: Optional[int] = None, gpu: Optional[str] = None, with_time: bool = True) -> RunPlan:
    model = meta_model(cfg, vocab_size_of(cfg, vocab))
    planner = Planner(cfg.lengths, cfg.train, cfg.data.windows, cfg.run.seed, 2**62, cfg.scaling.num_workers)
    buckets = Buckets.of(model)
    shapes = planner.shapes()
    accelerator = accelerator_of(cfg, gpu)
    if accelerator:
        available = USABLE * accelerator.memory_gib * GiB
    elif not cfg.scaling.use_gpu:
        import psutil
        available = psutil.virtual_memory().total / cfg.scaling.num_workers
    else:
        available = None
    return RunPlan(cfg, sum(p.numel() for p in model.parameters()), buckets, shapes[0], shapes[-1],
                   planner.largest_micro_batch(), memory_of(cfg, model, planner, buckets), accelerator, available,
                   planner.total_tokens(),
                   planner.total_flops(model_shape(model)) if with_time else 0.0)


def batch_warmup(train) -> str:
    if not train.batch_warmup_tokens:
        return ""
    return (f" (a batch warmup from {train.batch_start_tokens:,} tokens per step over "
            f"{train.batch_warmup_tokens:,} tokens, lr by {train.batch_lr_scaling})")


def describe(plan: RunPlan, mfu: float) -> str:
    """The plan as the lines ``raytrain plan`` prints."""
    cfg, s = plan.cfg, plan.cfg.scaling
    device = f"1 GPU ({plan.accelerator.name if plan.accelerator else 'any type'})" if s.use_gpu else "CPU only"
    lines = [f"workers: {s.num_workers} x ({s.cpus_per_worker} CPU, {device}), placement {s.placement_strategy}",
             f"model: {plan.params / 1e6:.1f}M parameters (a block {plan.buckets.block / 1e6:.1f}M, largest layer "
             f"{plan.buckets.largest_layer / 1e6:.1f}M), ZeRO-{zero_stage(cfg.deepspeed.zero_stage, s.num_workers)}, "
             f"precision {'bf16' if cfg.bf16 else 'fp32'}",
             f"steps: {cfg.train.max_steps:,} x up to {cfg.train.tokens_per_step:,} tokens = {plan.total_tokens:,} "
             f"targets{batch_warmup(cfg.train)}; lengths {cfg.lengths.schedule} {cfg.lengths.min}-{cfg.lengths.max}"]
    for name, shape in (("shortest", plan.shortest), ("longest", plan.longest)):
        lines.append(f"  {name} L={shape.length}: {shape.rows} rows per step, up to {shape.rank_rows} per rank in "
                     f"{shape.micro_batches} micro-batch(es) of up to {shape.micro_rows} rows")
    ds = deepspeed_config(cfg.deepspeed, cfg.train, s.num_workers, cfg.bf16, plan.buckets)
    lines.append(f"deepspeed config: {ds}")
    verdict = ("memory not checked: name the GPU (--gpu, or accelerator_type:NAME in scaling.resources_per_worker)"
               if plan.available is None else
               f"{'fits' if plan.fits else 'DOES NOT FIT'}: {plan.device_phrase()} {plan.available / GiB:.1f} GiB")
    lines.append(f"memory per rank: {plan.memory.total / GiB:.2f} GiB = {plan.memory.terms()} (largest micro-batch "
                 f"{plan.largest.micro_rows} x {plan.largest.length}); {verdict}")
    if plan.total_flops and plan.accelerator:
        seconds = plan.total_flops / (s.num_workers * plan.accelerator.peak_tflops * 1e12 * mfu)
        lines.append(f"time: {plan.total_flops:.3g} model FLOPs at {mfu:.0%} MFU of {s.num_workers} x "
                     f"{plan.accelerator.peak_tflops:g} TFLOP/s = {seconds / 3600:.1f} h "
                     f"({seconds / 3600 * s.num_workers:.0f} GPU-hours; evaluation and checkpoints not included)")
    elif plan.total_flops:
        lines.append(f"time: {plan.total_flops:.3g} model FLOPs (name the GPU for an estimate)")
    return "\n".join(lines)


def plan_main(cfg: Config, vocab: Optional[int], gpu: Optional[str], mfu: float) -> int:
    plan = plan_run(cfg, vocab, gpu)
    print(describe(plan, mfu))
    if not plan.fits:
        print(f"raytrain plan: {plan.refusal()}")
        return 1
    return 0


def fit_problem(cfg: Config) -> Optional[str]:
    """For ``raytrain tune``: why a candidate config cannot fit, or None (unknown vocabulary or GPU: unchecked)."""
    try:
        plan = plan_run(cfg, with_time=False)
    except ConfigError:
        return None
    return None if plan.fits else plan.refusal()
