"""Checkpoints: every piece of loop state saved with the engine in one Ray checkpoint, uploaded without stalling
training, checked when loaded, and loadable on any number of workers at any ZeRO stage.

A checkpoint directory holds every rank's DeepSpeed files under ``engine/``, one
``manifest-rank-R.json`` per rank (its files and their sizes) and rank 0's
``state.json`` (step, tokens, the newest evaluation, the meter, and how it was
saved: ranks, ZeRO stage, the optimizer's parameter order). Saving hands the
directory to Ray Train in its asynchronous upload mode and goes on; at most one
upload is in flight (the next save waits for it) and the last one is complete
before the run ends. Loading takes the newest checkpoint whose files are all
there, saying which one was damaged; with a different number of ranks or ZeRO
stage it is resharded: each parameter's fp32 weights and Adam moments are
reassembled whole from the saved partitions and cut again for the new engine.
The loss is normalized over the global step, so any split of a step's rows
gives the same gradient, and a resharded run continues with the same math.
"""
from __future__ import annotations

import json
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import yaml

from raytrain.config import Config, flatten

ENGINE = "engine"  # DeepSpeed's tag: the folder of its files
STATE = "state.json"
CONFIG = "config.yaml"  # the run's config, in every checkpoint: raytrain export needs nothing else
MOMENTS = ("exp_avg", "exp_avg_sq")
STEPS = "steps.json"  # [[L, budget], ...] of every step a finished run trained, in its run directory


@dataclass
class LoopState:
    """Where the loop stands: everything besides the engine and the meter that a resume needs."""
    step: int = 0
    tokens: int = 0
    last_eval: Optional[dict] = None  # the newest evaluation, carried in every report to Ray (Tune's objective)

    def advance(self, step) -> None:
        """After training ``step`` (a StepPlan)."""
        self.step, self.tokens = self.step + 1, self.tokens + step.targets


class DamagedCheckpoint(ValueError):
    """A checkpoint whose files are not all there as they were written."""


def manifest_name(rank: int) -> str:
    return f"manifest-rank-{rank}.json"


def write_manifest(directory: Path, rank: int) -> None:
    """The files this rank wrote into its staging directory, with their sizes."""
    files = {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}
    (directory / manifest_name(rank)).write_text(json.dumps(files))


def verify(directory: Path) -> dict:
    """The checkpoint's state.json, once every rank's manifest is there and every file it lists has its size."""
    state_path = directory / STATE
    if not state_path.is_file():
        raise DamagedCheckpoint(f"{STATE} is missing")
    saved = json.loads(state_path.read_text())
    for rank in range(saved["world"]):
        manifest = directory / manifest_name(rank)
        if not manifest.is_file():
            raise DamagedCheckpoint(f"{manifest.name} is missing (rank {rank}'s files)")
        for name, size in json.loads(manifest.read_text()).items():
            path = directory / name
            if not path.is_file():
                raise DamagedCheckpoint(f"{name} is missing")
            if path.stat().st_size != size:
                raise DamagedCheckpoint(f"{name} has {path.stat().st_size} bytes, {size} were written")
    return saved


class Checkpointer:
    """Saves and restores the engine, the loop state, the meter and the steps trained so far (``plan``'s
    lengths and budgets); decides when a checkpoint is due."""

    def __init__(self, cfg: Config, rank: int, world: int, log, plan, run_dir: Path):
        self.every, self.max_steps, self.rank, self.world, self.log = \
            cfg.run.checkpoint_every, cfg.train.max_steps, rank, world, log
        self.config_yaml, self.asynchronous = cfg.to_yaml(), cfg.run.checkpoint_upload == "async"
        self.cfg, self.plan, self.run_dir = cfg, plan, run_dir
        self.uploaded = threading.Event()  # set when the newest checkpoint's upload has ended
        self.uploaded.set()

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.max_steps

    def restore(self, engine, meter) -> LoopState:
        """The newest complete checkpoint loaded into the engine and meter (resharded when saved by a different
        number of ranks or ZeRO stage); a fresh state when there is none. Records after it are dropped. A run
        without a checkpoint of its own starts from ``run.init_from`` when set (its records and lineage too)."""
        own = candidates()
        for checkpoint in own or self.donor():
            with checkpoint.as_directory() as directory:
                try:
                    saved = verify(Path(directory))
                except DamagedCheckpoint as err:
                    if not own:
                        raise DamagedCheckpoint(f"run.init_from = {checkpoint.path}: {err}") from None
                    self.log.say(f"warning: checkpoint {checkpoint.path} is damaged ({err}); it is left in place "
                                 "and the run resumes from the one before it")
                    continue
                self._load(engine, Path(directory), saved)
                donor = None if own else Config.model_validate(yaml.safe_load((Path(directory) / CONFIG).read_text()))
            meter.load_state_dict(saved["meter"])
            if "steps" in saved:
                self.plan.adopt(saved["steps"])
            state = LoopState(step=saved["step"], tokens=saved["tokens"], last_eval=saved["last_eval"])
            if donor is None:
                self.log.truncate_after(state.step)
                self.log.say(f"resumed from checkpoint at step {state.step} ({state.tokens:,} tokens): "
                             f"{checkpoint.path}")
            else:
                self.log.adopt(Path(saved["run_dir"]), state.step, lineage(donor, self.cfg))
                self.log.say(f"started from {saved['run_dir']}'s checkpoint at step {state.step} "
                             f"({state.tokens:,} tokens): {checkpoint.path}")
            return state
        self.log.truncate_after(-1)  # fresh, or restarted before any checkpoint was complete: start over exactly
        return LoopState()

    def donor(self) -> list:
        from ray.train import Checkpoint
        return [Checkpoint(self.cfg.run.init_from)] if self.cfg.run.init_from else []

    def _load(self, engine, directory: Path, saved: dict) -> None:
        stage = engine.zero_optimization_stage()
        if (saved["world"], saved["stage"]) == (self.world, stage):
            engine.load_checkpoint(str(directory), tag=ENGINE)
            return
        tensors, step = full_state(directory)
        load_full_state(engine, tensors, step)
        self.log.say(f"resharded the checkpoint from {saved['world']} worker(s) at ZeRO-{saved['stage']} to "
                     f"{self.world} at ZeRO-{stage}")

    def report(self, engine, state: LoopState, meter) -> None:
        """Report the loop's position to Ray Train (a barrier on all ranks), with a checkpoint when one is due."""
        import ray.train
        metrics = {"step": state.step, "tokens": state.tokens, "elapsed_s": meter.elapsed_s, **state.last_eval}
        if self.due(state.step):
            self.save(engine, state, meter, metrics)
        else:
            ray.train.report(metrics)

    def save(self, engine, state: LoopState, meter, metrics: dict) -> None:
        """Snapshot this rank's part into host memory and hand the checkpoint to Ray (a barrier on all ranks).

        Asynchronous (``run.checkpoint_upload``, the default): a background thread
        writes the snapshot to a local staging directory and Ray's upload thread
        then copies it to storage, while training goes on; the previous upload is
        waited for first, so at most one is in flight. Synchronous: both happen
        before this returns. The training time it blocked is logged and recorded.
        """
        import ray.train
        started = time.perf_counter()
        if state.step == self.max_steps:  # finished: what it trained, for a search's replay (population.py)
            self.log.record(STEPS, self.plan.clock.history(state.step))
        self.uploaded.wait()  # the previous checkpoint's upload: at most one in flight
        waited, self.uploaded = time.perf_counter() - started, threading.Event()
        staging = Path(tempfile.mkdtemp(prefix="raytrain-checkpoint-"))
        engine.save_checkpoint(str(staging), tag=ENGINE, client_state={})  # SnapshotWriter: host copies, queued
        if self.rank == 0:
            (staging / CONFIG).write_text(self.config_yaml)
            (staging / STATE).write_text(json.dumps({
                **state.__dict__, "meter": meter.state_dict(), "world": self.world,
                "stage": engine.zero_optimization_stage(), "parameters": optimizer_order(engine),
                "steps": self.plan.clock.history(state.step), "run_dir": str(self.run_dir)}))
        writer, rank, uploaded = engine.checkpoint_engine, self.rank, self.uploaded

        def upload(checkpoint, name: str):  # in Ray's upload thread (asynchronous) or here (synchronous)
            try:
                writer.wait()
                write_manifest(staging, rank)
                return ray.train.get_context().get_storage().persist_current_checkpoint(checkpoint, name)
            finally:
                uploaded.set()
        mode = ray.train.CheckpointUploadMode.ASYNC if self.asynchronous else ray.train.CheckpointUploadMode.SYNC
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(staging)),
                         checkpoint_upload_mode=mode, checkpoint_upload_fn=upload,
                         delete_local_checkpoint_after_upload=True)
        blocked = time.perf_counter() - started
        meter.checkpoint_s += blocked
        upload_state = "uploading in the background" if self.asynchronous else "uploaded"
        self.log.say(f"checkpoint at step {state.step}: training blocked {blocked:.2f} s ({waited:.2f} s of it "
                     f"waiting for the previous upload; {upload_state})")



def snapshot_writer(engine):
    """DeepSpeed's checkpoint engine, made asynchronous (its pluggable ``CheckpointEngine``, as Nebula's and
    DataStates' are), installed on ``engine``. ``save`` only queues a state dict: a background thread copies its
    tensors into host memory and, once DeepSpeed commits the checkpoint, writes the copies with ``torch.save``;
    ``wait`` blocks until every file is written. Only an optimizer step changes what a checkpoint holds (weights,
    master weights, moments), so a pre-step hook on the optimizer waits for the copies: the next step's forward
    and backward overlap them. DeepSpeed still decides what goes into which file."""
    from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine  # at call time: engine.py

    class SnapshotWriter(CheckpointEngine):
        def __init__(self):
            super().__init__(None)
            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
            self.copies, self.queued, self.writes = [], [], []

        def create(self, info) -> None:
            pass

        def save(self, state_dict, path: str) -> None:
            copy = self.pool.submit(host_copy, state_dict)
            self.copies.append(copy)
            self.queued.append((copy, path))

        def commit(self, info) -> bool:  # every file of the checkpoint is queued: copies first, then writes
            queued, self.queued = self.queued, []
            self.writes += [self.pool.submit(lambda c=c, p=p: torch.save(c.result(), p)) for c, p in queued]
            return True

        def load(self, path: str, map_location=None):
            return torch.load(path, map_location=map_location, weights_only=False)

        def wait_for_copies(self, *args) -> None:
            copies, self.copies = self.copies, []
            for copy in copies:
                copy.result()

        def wait(self) -> None:
            self.wait_for_copies()
            writes, self.writes = self.writes, []
            for write in writes:
                write.result()

    writer = SnapshotWriter()
    optimizer = engine.optimizer if engine.zero_optimization_stage() == 0 else engine.optimizer.optimizer
    optimizer.register_step_pre_hook(writer.wait_for_copies)
    engine.checkpoint_engine = writer
    return writer


def host_copy(value):
    """Every tensor in a (nested) state dict copied to host memory; other values as they are."""
    if torch.is_tensor(value):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return type(value)((k, host_copy(v)) for k, v in value.items())
    if isinstance(value, list):
        return [host_copy(v) for v in value]
    return value


def lineage(donor: Config, ours: Config) -> dict:
    """What a run started from ``donor``'s checkpoint changed: every key but the run section's that differs."""
    before, after = (flatten(c.model_dump(mode="json", exclude={"run"})) for c in (donor, ours))
    changed = {k: [before.get(k), after.get(k)] for k in sorted(set(before) | set(after))
               if before.get(k) != after.get(k)}
    return {"changed": changed, "lr": ours.train.lr, "donor_lr": donor.train.lr}


def newest_checkpoint() -> str:
    """Where the newest checkpoint this run registered is (after its upload), or 'none yet'."""
    import ray.train
    reported = ray.train.get_all_reported_checkpoints(
        consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
    return reported[-1].checkpoint.path if reported else "none yet"


def candidates():
    """The run's checkpoints Ray registered, newest first (the one Ray offers, then the older ones)."""
    import ray.train
    newest = ray.train.get_checkpoint()
    if newest is None:
        return []
    older = [c for c in listed_checkpoints(newest) if c.path != newest.path]
    return [newest, *reversed(older)]


def run_checkpoints(storage: str, run_name: str) -> list[str]:
    """The checkpoint directories of a run, oldest first: under run.storage (a path or URI) or run.dir."""
    import pyarrow.fs
    filesystem, root = pyarrow.fs.FileSystem.from_uri(storage if "://" in storage
                                                      else Path(storage).expanduser().absolute().as_uri())
    found = filesystem.get_file_info(pyarrow.fs.FileSelector(f"{root.rstrip('/')}/{run_name}", allow_not_found=True))
    prefix = storage.split("://", 1)[0] + "://" if "://" in storage else ""
    return [prefix + info.path for info in sorted(found, key=lambda i: i.path)
            if info.type == pyarrow.fs.FileType.Directory and info.base_name.startswith("checkpoint_")]


def listed_checkpoints(newest) -> list:
    """Every checkpoint directory beside ``newest`` in its storage (local path or URI), oldest first: their
    names carry the time they were made."""
    import pyarrow.fs
    from ray.train import Checkpoint
    parent = newest.path.rstrip("/").rsplit("/", 1)[0]
    found = newest.filesystem.get_file_info(pyarrow.fs.FileSelector(parent))
    return [Checkpoint(info.path, filesystem=newest.filesystem) for info in sorted(found, key=lambda i: i.path)
            if info.type == pyarrow.fs.FileType.Directory and info.base_name.startswith("checkpoint_")]


# --- the world-size-free state: whole parameters, whole moments ---------------

def optimizer_order(engine) -> list[str]:
    """Parameter names in the optimizer's order: ZeRO-0 checkpoints key torch's AdamW state by position (ZeRO 1-3
    keep their own map of names to partitions)."""
    if engine.zero_optimization_stage():
        return []
    names = {id(p): n for n, p in engine.module.named_parameters()}
    return [names[id(p)] for group in engine.optimizer.param_groups for p in group["params"]]


def full_state(directory: Path) -> tuple[dict[str, dict[str, torch.Tensor]], float]:
    """({parameter name: {"fp32": weights, "exp_avg": .., "exp_avg_sq": ..}}, Adam's step) of a checkpoint,
    every tensor whole, whatever the number of ranks and ZeRO stage that saved it."""
    engine_dir = Path(directory) / ENGINE
    optim_files = sorted(engine_dir.glob("*_optim_states.pt"), key=lambda p: rank_of(p.name))
    if not optim_files:  # ZeRO-0: the module and torch's AdamW state, whole, in one file
        saved = torch.load(engine_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        order = json.loads((Path(directory) / STATE).read_text())["parameters"]
        optimizer = saved["optimizer"]["state"]
        tensors = {name: {"fp32": saved["module"][name], **{k: optimizer[i][k] for k in MOMENTS}}
                   for i, name in enumerate(order)}
        return tensors, float(optimizer[0]["step"])
    model_files = sorted(engine_dir.glob("*model_states.pt"))
    shapes = torch.load(model_files[0], map_location="cpu", weights_only=False)["param_shapes"]
    ranks = [torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"] for f in optim_files]
    stage = ranks[0]["zero_stage"]
    if stage <= 2:
        flat = {"fp32": [r["single_partition_of_fp32_groups"] for r in ranks]}
        moments = [r["base_optimizer_state"]["state"] for r in ranks]
        paddings = ranks[0].get("param_alignment_paddings")
    else:
        flat = {"fp32": [r["fp32_flat_groups"] for r in ranks]}
        moments = [r["optimizer_state_dict"]["state"] for r in ranks]
    for kind in MOMENTS:
        flat[kind] = [[state[g][kind] for g in sorted(state)] for state in moments]
    merge = (lambda groups: merge_zero2(groups, shapes, paddings)) if stage <= 2 else \
        (lambda groups: merge_zero3(groups, shapes))
    merged = {kind: merge(groups) for kind, groups in flat.items()}
    tensors = {name: {kind: merged[kind][name] for kind in merged} for name in merged["fp32"]}
    return tensors, float(moments[0][0]["step"])


def rank_of(name: str) -> int:
    """zero_pp_rank_R_mp_rank_00_optim_states.pt -> R."""
    return int(name.split("_")[3])


def merge_zero2(groups: list[list[torch.Tensor]], shapes: list[dict], paddings) -> dict[str, torch.Tensor]:
    """ZeRO-1/2: each group is one flat vector cut into equal consecutive partitions, one per rank; parameters
    lie in it in order, each followed by its alignment padding."""
    whole = {}
    for g, group_shapes in enumerate(shapes):
        vector, offset = torch.cat([rank_groups[g] for rank_groups in groups]), 0
        for i, (name, shape) in enumerate(group_shapes.items()):
            numel = shape.numel()
            whole[name] = vector.narrow(0, offset, numel).view(shape).clone()
            offset += numel + (paddings[g][i] if paddings else 0)
    return whole


def merge_zero3(groups: list[list[torch.Tensor]], shapes: list[dict]) -> dict[str, torch.Tensor]:
    """ZeRO-3: every parameter is cut into equal partitions (the last padded), rank r holding partition r; each
    rank's flat groups hold its partitions of every parameter in order."""
    world = len(groups)
    vectors = [torch.cat(rank_groups) for rank_groups in groups]
    whole, offset = {}, 0
    for group_shapes in shapes:
        for name, shape in group_shapes.items():
            part = -(-shape.numel() // world)
            pieces = [vector.narrow(0, offset, part) for vector in vectors]
            whole[name] = torch.cat(pieces)[:shape.numel()].view(shape).clone()
            offset += part
    return whole


def load_full_state(engine, tensors: dict[str, dict[str, torch.Tensor]], step: float) -> None:
    """Cut whole weights and moments into a live engine of any ZeRO stage and number of ranks. Collective."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    stage = engine.zero_optimization_stage()
    optimizer = engine.optimizer if stage == 0 else engine.optimizer.optimizer  # the torch AdamW underneath
    # torch's AdamW creates its state at the first step: create it now, for every flat partition DeepSpeed keeps
    # (ZeRO-3 swaps its sub-groups' flats in and out of the param groups, so those alone can miss some)
    flats = [p for group in optimizer.param_groups for p in group["params"]]
    flats += list(getattr(engine.optimizer, "fp32_partitioned_groups_flat", None) or [])  # ZeRO-3
    flats += list(getattr(engine.optimizer, "single_partition_of_fp32_groups", None) or [])  # ZeRO-1/2
    for flat in {id(f): f for f in flats}.values():
        optimizer.state[flat] = {"step": torch.tensor(step), **{k: torch.zeros_like(flat) for k in MOMENTS}}
    if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2 and BF16_Optimizer
        # each parameter's view of the moments is linked only after the first step: link it to the state above
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    for name, param in engine.module.named_parameters():
        saved = tensors[name]
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):  # ZeRO-3: every rank gets rank 0's
            param.data.copy_(saved["fp32"].to(param.device))
        if stage == 0:
            for kind in MOMENTS:
                optimizer.state[param][kind].copy_(saved[kind])
            continue
        safe_set_full_fp32_param(param, saved["fp32"].to(param.device))
        for kind in MOMENTS:
            safe_set_full_optimizer_state(param, saved[kind].to(param.device), kind)


def copy_out(checkpoint_path: str, out: Path) -> Path:
    """A checkpoint at a local path or a storage URI (s3://...) as a local directory."""
    import pyarrow.fs
    if "://" not in checkpoint_path:
        return Path(checkpoint_path)
    filesystem, path = pyarrow.fs.FileSystem.from_uri(checkpoint_path)
    out.mkdir(parents=True, exist_ok=True)
    pyarrow.fs.copy_files(path, str(out), source_filesystem=filesystem,
                          destination_filesystem=pyarrow.fs.LocalFileSystem())
    return out
