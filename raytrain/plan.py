"""``raytrain plan``: what a run will do and whether it fits, from the config alone, before any GPU is rented.

Memory per rank is model states plus activations at the largest micro-batch.
Model states follow DeepSpeed's own estimators (``estimate_zero2/3_model_states
_mem_needs``), corrected for what raytrain keeps: fp32 working weights at every
precision (DeepSpeed's figures assume 16-bit weights beside an fp32 master) and
fp32 gradients only. Activations count what autograd keeps per token and layer
of a Llama block and the logits with their fp32 loss
copies. The model is built on the meta device: exact parameter counts, no memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from raytrain.config import Config, ConfigError
from raytrain.lengths import build_schedule
from raytrain.model import ACCELERATORS, Accelerator, find_accelerator
from raytrain.recipe import Shape, step_shape

GiB = 2**30
USABLE = 0.9  # of a GPU's memory: the CUDA context, NCCL buffers and allocator fragmentation take the rest
SHM_WORKSPACE = 2 * 2**20 + 2 * 32 * 2**20  # DeepSpeed's CPU all-reduce workspace per rank (shm.cpp), mapped by all


@dataclass(frozen=True)
class Memory:
    states: int
    activations: int
    logits: int
    communication: int  # CPU: DeepSpeed's shared-memory all-reduce workspaces (GPU: NCCL's, outside the allocator)

    @property
    def total(self) -> int:
        return self.states + self.activations + self.logits + self.communication


def model_state_bytes(stage: int, params: int, largest_layer: int, world: int) -> int:
    """Bytes per rank for weights, gradients, master weights and Adam moments with fp32 weights.

    From DeepSpeed's estimators (16-bit weights): ZeRO-2 ``2P + 18P/N`` (18 =
    2 16-bit grads + 4 fp32 grads + 4 fp32 master + 8 Adam), ZeRO-3
    ``4 * largest layer + 18P/N``. raytrain's weights are fp32 (+2P at ZeRO-2,
    +4P/N at ZeRO-3, where the weights are partitioned) and it keeps no 16-bit
    gradient (-2P/N). DeepSpeed has no ZeRO-0/1 estimator: ZeRO-1 is ZeRO-2 with
    whole fp32 gradients on every rank; ZeRO-0 is plain AdamW, 4 + 4 + 8 bytes.
    """
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    if stage == 0:
        return 16 * params
    if stage == 3:
        _, ds, _ = estimate_zero3_model_states_mem_needs(params, largest_layer, world, 1, cpu_offload=False)
        return ds + (4 - 2) * params // world
    _, ds = estimate_zero2_model_states_mem_needs(params, world, 1, cpu_offload=False)
    zero2 = ds + 2 * params - 2 * params // world
    return zero2 + (4 * params - 4 * params // world if stage == 1 else 0)


def activation_bytes(config, rows: int, length: int, bf16: bool, recompute: bool,
                     loss_chunk: Optional[int] = None) -> tuple[int, int]:
    """(block activations, logits and loss) bytes for one micro-batch's forward and backward.

    Per token and layer a Llama block keeps its fp32 residual input twice (both
    norms) and, at the autocast width, the norm outputs, q, k, v, rotated q and
    k, the attention output, and the MLP's gate, up, activation and product: 2
    fp32 + 8 hidden + 4 intermediate values. Recompute keeps only each block's
    input plus one block's set. The loss keeps the logits, their fp32 copy and
    log-softmax, and the gradient (fp32), for the whole micro-batch or, with
    ``loss_chunk``, for one chunk of positions at a time. Keeping documents apart
    adds nothing (``raytrain.attention`` builds no mask); autocast caches a 16-bit
    copy of every weight.
    """
    width = 2 if bf16 else 4
    hidden, inner, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    per_layer = 2 * 4 * hidden + width * (8 * hidden + 4 * inner)
    tokens = rows * length
    kept = (4 * hidden * layers + per_layer) if recompute else per_layer * layers
    blocks = tokens * (kept + 4 * hidden)
    logits = min(tokens, loss_chunk or tokens) * config.vocab_size * (12 + (width if bf16 else 0))
    return blocks, logits


@dataclass
class RunPlan:
    cfg: Config
    params: int
    largest_layer: int
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
        m = self.memory
        return (f"does not fit: needs {m.total / GiB:.1f} GiB per rank (model states {m.states / GiB:.1f}, "
                f"activations {m.activations / GiB:.1f}, logits and loss {m.logits / GiB:.1f}"
                + (f", CPU all-reduce buffers {m.communication / GiB:.1f}" if m.communication else "") + " at "
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

    from raytrain.model import tiny_llama
    with torch.device("meta"):
        if cfg.model.pretrained:
            config = AutoConfig.from_pretrained(Path(cfg.model.pretrained).expanduser(), local_files_only=True)
            return AutoModelForCausalLM.from_config(config)
        return LlamaForCausalLM(tiny_llama(cfg.model, vocab_size, 0))


def vocab_size_of(cfg: Config, vocab: Optional[int]) -> int:
    if vocab:
        return vocab
    from raytrain.tokenizer import load_tokenizer
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


def plan_run(cfg: Config, vocab: Optional[int] = None, gpu: Optional[str] = None, with_time: bool = True) -> RunPlan:
    from raytrain.model import training_flops_per_token
    model = meta_model(cfg, vocab_size_of(cfg, vocab))
    params = sum(p.numel() for p in model.parameters())
    largest_layer = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    world, train = cfg.scaling.num_workers, cfg.train
    support = cfg.lengths.support()
    shapes = [step_shape(L, train.tokens_per_step, train.micro_batch_tokens, world) for L in support]
    largest = max(shapes, key=lambda s: (s.micro_rows * s.length, s.length))
    bf16 = cfg.bf16
    # the probe and every step at a length: the largest of (block activations + logits) over the lengths
    peak = max((activation_bytes(model.config, s.micro_rows, s.length, bf16, cfg.model.activation_checkpointing,
                                 train.loss_chunk_tokens) for s in shapes), key=sum)
    cast = 2 * params if bf16 else 0
    from raytrain.engine import zero_stage
    memory = Memory(model_state_bytes(zero_stage(cfg.deepspeed.zero_stage, world), params, largest_layer, world),
                    peak[0] + cast, peak[1], 0 if cfg.scaling.use_gpu else world * SHM_WORKSPACE)
    accelerator = accelerator_of(cfg, gpu)
    if accelerator:
        available = USABLE * accelerator.memory_gib * GiB
    elif not cfg.scaling.use_gpu:
        import psutil
        available = psutil.virtual_memory().total / world
    else:
        available = None
    total_tokens = train.max_steps * train.tokens_per_step
    total_flops = 0.0
    if with_time:
        schedule = build_schedule(cfg.lengths, cfg.run.seed, train.max_steps, train.tokens_per_step)
        per_token = {L: training_flops_per_token(model, L) for L in support}
        for step in range(train.max_steps):
            length = schedule(step)
            total_flops += (train.tokens_per_step // length) * length * per_token[length]
    return RunPlan(cfg, params, largest_layer, shapes[0], shapes[-1], largest, memory, accelerator, available,
                   total_tokens, total_flops)


def describe(plan: RunPlan, mfu: float) -> str:
    """The plan as the lines ``raytrain plan`` prints."""
    from raytrain.engine import deepspeed_config, zero_stage
    cfg, s = plan.cfg, plan.cfg.scaling
    device = f"1 GPU ({plan.accelerator.name if plan.accelerator else 'any type'})" if s.use_gpu else "CPU only"
    lines = [f"workers: {s.num_workers} x ({s.cpus_per_worker} CPU, {device}), placement {s.placement_strategy}",
             f"model: {plan.params / 1e6:.1f}M parameters (largest layer {plan.largest_layer / 1e6:.1f}M), "
             f"ZeRO-{zero_stage(cfg.deepspeed.zero_stage, s.num_workers)}, precision {cfg.train.precision}",
             f"steps: {cfg.train.max_steps:,} x {cfg.train.tokens_per_step:,} tokens = {plan.total_tokens:,} tokens; "
             f"lengths {cfg.lengths.schedule} {cfg.lengths.min}-{cfg.lengths.max}"]
    for name, shape in (("shortest", plan.shortest), ("longest", plan.longest)):
        lines.append(f"  {name} L={shape.length}: {shape.rows} rows per step, up to {shape.rank_rows} per rank in "
                     f"{shape.micro_batches} micro-batch(es) of up to {shape.micro_rows} rows")
    lines.append(f"deepspeed config: {deepspeed_config(cfg.deepspeed, cfg.train, s.num_workers)}")
    m = plan.memory
    verdict = ("memory not checked: name the GPU (--gpu, or accelerator_type:NAME in scaling.resources_per_worker)"
               if plan.available is None else
               f"{'fits' if plan.fits else 'DOES NOT FIT'}: {plan.device_phrase()} {plan.available / GiB:.1f} GiB")
    lines.append(f"memory per rank: {m.total / GiB:.2f} GiB = model states {m.states / GiB:.2f} + activations "
                 f"{m.activations / GiB:.2f} + logits and loss {m.logits / GiB:.2f}"
                 + (f" + CPU all-reduce buffers {m.communication / GiB:.2f}" if m.communication else "") +
                 f" (largest micro-batch "
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
