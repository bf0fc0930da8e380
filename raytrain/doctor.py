"""``raytrain doctor``: about a minute against the cluster a job would run on, checking what fails runs later.

It asks Ray for the workers the config asks for (the same bundles and placement
as ``raytrain train``, so the same nodes), and on each of them checks: the token
authentication Ray runs with; ``data.cache_dir`` and ``run.dir`` are visible and
writable there; the prepared corpus is complete there; the accelerators are
visible, their driver suits the installed torch, and bf16 computes; an
all-reduce across all the workers succeeds (its bus bandwidth is printed); and
``run.storage`` accepts a write and a read. Each check prints ok or the fix;
exit status 1 if any fails.
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import torch
import torch.distributed as dist
from ray.train import FailureConfig, RunConfig
from ray.train.torch import TorchTrainer

from raytrain.checks import resource_problems, worker_resources
from raytrain.config import Config
from raytrain.launch import controller_settings, scaling_config
from raytrain.prepare import corpus_directory
from raytrain.section import ConfigError

# The oldest NVIDIA driver (Linux) each CUDA toolkit version needs (NVIDIA's CUDA release notes, table 3).
MIN_DRIVER = {"12.0": 525.60, "12.1": 530.30, "12.2": 535.54, "12.3": 545.23, "12.4": 550.54, "12.5": 555.42,
              "12.6": 560.28, "12.8": 570.26, "12.9": 575.51, "13.0": 580.65}
ALLREDUCE_BYTES = 64 * 2**20


@dataclass
class Check:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'}  {self.name}: {self.detail}"


@ray.remote(num_cpus=0)
class Findings:
    """Where every worker leaves what it found (the shared file system may be the thing that is broken)."""

    def __init__(self):
        self.found = {}

    def put(self, rank: int, found: dict) -> None:
        self.found[rank] = found

    def all(self) -> dict:
        return self.found


def doctor(cfg: Config, say=print) -> int:
    """Run every check, print one line each; 0 when all pass, else 1."""
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=False)
    s = cfg.scaling
    say(f"raytrain doctor: {s.num_workers} workers x {worker_resources(s)}, placement {s.placement_strategy}, on "
        f"{'the cluster at ' + os.environ['RAY_ADDRESS'] if os.environ.get('RAY_ADDRESS') else 'this machine'}")
    capacity = resource_problems(s)
    checks = [Check("capacity", not capacity, "; ".join(f"{k} = {v!r}: {fix}" for k, v, fix in capacity) or
                    f"the cluster holds the {s.num_workers} workers (now or once it has grown)")]
    if not capacity:
        checks += node_checks(cfg)
    for check in checks:
        say(check.line())
    failed = [c.name for c in checks if not c.ok]
    say(f"raytrain doctor: {'all checks passed' if not failed else 'failed: ' + ', '.join(failed)}")
    return 1 if failed else 0


def node_checks(cfg: Config) -> list[Check]:
    """The checks that run on every worker, through a Ray Train run of the config's own scaling."""
    findings, marker = Findings.remote(), f".raytrain-doctor-{uuid.uuid4().hex[:8]}"
    paths = {"data.cache_dir": cfg.data.cache_dir, "run.dir": cfg.run.dir}
    for path in paths.values():  # what every node must see where it looks for it: a file written here
        leave_marker(path, marker)
    try:
        corpus = corpus_directory(cfg.data, cfg.tokenizer)
    except ConfigError:  # inputs that live only on the cluster's nodes: the workers look for what they can see
        corpus = None
    trainer = TorchTrainer(
        check_worker, train_loop_config={"config": cfg.model_dump(mode="json"), "findings": findings,
                                         "corpus": str(corpus) if corpus else None, "marker": marker},
        scaling_config=scaling_config(cfg.scaling),
        run_config=RunConfig(name=f"doctor-{uuid.uuid4().hex[:8]}", storage_path=tempfile.mkdtemp(),
                             failure_config=FailureConfig(max_failures=0, controller_failure_limit=0)))
    with controller_settings(min(cfg.scaling.start_timeout_s, 120)):
        try:
            trainer.fit()
        except Exception as err:  # noqa: BLE001 - the workers could not run at all: say why, as one check
            return [Check("workers", False, f"the worker group did not run: {str(err).splitlines()[0][:300]}")]
        finally:
            for path in paths.values():
                (Path(path).expanduser() / marker).unlink(missing_ok=True)
    found = ray.get(findings.all.remote())
    return summarize(cfg, found)


def leave_marker(path: str, marker: str) -> None:
    """A file where the driver sees ``path``, for the workers to find (nothing when the driver cannot write)."""
    try:
        Path(path).expanduser().mkdir(parents=True, exist_ok=True)
        (Path(path).expanduser() / marker).write_text(marker)
    except OSError:
        pass


def check_worker(payload: dict) -> None:
    """What one worker finds on its node (Ray Train runs it on every rank)."""
    from ray._private.authentication.authentication_utils import is_token_auth_enabled  # Ray's own answer
    cfg = Config.model_validate(payload["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    found = {"node": ray.get_runtime_context().get_node_id()[:12], "token": is_token_auth_enabled(),
             "paths": {key: shared_problem(path, payload["marker"]) for key, path in
                       (("data.cache_dir", cfg.data.cache_dir), ("run.dir", cfg.run.dir))},
             "corpus": corpus_problem(payload["corpus"]), "accelerator": accelerator(cfg.scaling.use_gpu),
             "allreduce": bus_bandwidth(world, cfg.scaling.use_gpu),
             "storage": storage_roundtrip(cfg.run.storage) if cfg.run.storage else None}
    ray.get(payload["findings"].put.remote(rank, found))


def shared_problem(path: str, marker: str) -> str | None:
    """None when this node sees the driver's marker in ``path`` and can write there, else what is wrong."""
    target = Path(path).expanduser()
    problem = try_writing(target)
    if problem is None and not (target / marker).is_file():
        problem = f"{target} here is not the directory the driver sees (its marker is missing): not a shared path"
    return problem


def try_writing(target: Path) -> str | None:
    """None when a file can be created, read back and removed in ``target`` (created if missing), else why not."""
    try:
        target.mkdir(parents=True, exist_ok=True)
        probe = target / f".raytrain-doctor-{uuid.uuid4().hex[:8]}"
        probe.write_text("ok")
        ok = probe.read_text() == "ok"
        probe.unlink()
        return None if ok else "a file written there reads back differently"
    except OSError as err:
        return f"{err.strerror}: {err.filename or target}"


def corpus_problem(directory: str | None) -> str | None:
    """None when the prepared corpus is complete on this node (or not prepared yet), else what is missing."""
    if directory is None:
        return None
    index_path = Path(directory) / "index.json"
    if not index_path.is_file():
        return f"{index_path} is not visible here"
    index = json.loads(index_path.read_text())
    width = np.dtype(index["dtype"]).itemsize
    for shard in index["train"] + index["val"]:
        path = Path(directory) / shard["path"]
        if not path.is_file() or path.stat().st_size != shard["tokens"] * width:
            return f"{path} is missing or short"
    return None


def accelerator(use_gpu: bool) -> dict:
    """What computes here: the device, the driver against the installed torch's CUDA, and a bf16 matmul."""
    if not use_gpu:
        return {"device": "CPU", "problem": bf16_problem("cpu")}
    if not torch.cuda.is_available():
        return {"device": "none", "problem": f"no GPU visible to torch {torch.__version__} (CUDA "
                                             f"{torch.version.cuda}); check the node's driver and the device plugin"}
    driver = nvidia_driver()
    need = MIN_DRIVER.get(".".join((torch.version.cuda or "").split(".")[:2]))
    problem = None
    if driver is not None and need is not None and driver < need:
        problem = (f"NVIDIA driver {driver:.2f} is older than CUDA {torch.version.cuda} (torch {torch.__version__}) "
                   f"needs ({need:.2f}); use node images with a newer driver, or a torch built for an older CUDA")
    return {"device": torch.cuda.get_device_name(), "driver": driver, "cuda": torch.version.cuda,
            "problem": problem or bf16_problem("cuda")}


def nvidia_driver() -> float | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.split()
        major, minor = out[0].split(".")[:2]
        return float(f"{major}.{minor}")
    except (OSError, IndexError, ValueError, subprocess.SubprocessError):
        return None


def bf16_problem(device: str) -> str | None:
    """None when a bf16 matmul agrees with fp32 to bf16's precision on ``device``."""
    a, b = torch.randn(256, 256, device=device), torch.randn(256, 256, device=device)
    exact = a @ b
    try:
        with torch.autocast(device, dtype=torch.bfloat16):
            rounded = a @ b
    except RuntimeError as err:
        return f"bf16 autocast fails: {err}"
    error = float((rounded.float() - exact).norm() / exact.norm())
    if rounded.dtype != torch.bfloat16 or error > 2e-2:
        return f"a bf16 matmul gave {rounded.dtype} with relative error {error:.1e}"
    return None


def bus_bandwidth(world: int, use_gpu: bool) -> dict:
    """A 64 MiB fp32 all-reduce across every worker, timed over 3 rounds after one warm-up: the bus bandwidth
    (NCCL's measure: 2 (n - 1) / n x bytes / seconds)."""
    if world == 1:
        return {"gbps": None}
    device = torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")
    tensor = torch.ones(ALLREDUCE_BYTES // 4, device=device)
    dist.all_reduce(tensor)
    if use_gpu:
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(3):
        dist.all_reduce(tensor)
    if use_gpu:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / 3
    correct = bool(torch.all(tensor == world ** 4))  # four all-reduces of ones over `world` ranks
    return {"gbps": 2 * (world - 1) / world * ALLREDUCE_BYTES / seconds / 1e9, "backend": dist.get_backend(),
            "correct": correct}


def storage_roundtrip(storage: str) -> str | None:
    """None when run.storage (a path or URI) takes a small object and gives it back, else why not."""
    import pyarrow.fs
    try:
        filesystem, root = pyarrow.fs.FileSystem.from_uri(storage if "://" in storage else
                                                          Path(storage).expanduser().absolute().as_uri())
        path = f"{root.rstrip('/')}/.raytrain-doctor-{uuid.uuid4().hex[:8]}"
        with filesystem.open_output_stream(path) as out:
            out.write(b"ok")
        with filesystem.open_input_stream(path) as stream:
            ok = stream.read() == b"ok"
        filesystem.delete_file(path)
        return None if ok else "an object written there reads back differently"
    except Exception as err:  # noqa: BLE001 - whatever the file system says is the answer
        return f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"


def summarize(cfg: Config, found: dict) -> list[Check]:
    """One check per concern across every worker's findings, naming the nodes where it failed."""
    nodes = sorted({f["node"] for f in found.values()})
    where = f"{len(found)} worker(s) on {len(nodes)} node(s)"

    def across(name: str, problem_of, ok_detail: str, fix: str) -> Check:
        bad = {f["node"]: problem_of(f) for f in found.values() if problem_of(f)}
        if not bad:
            return Check(name, True, ok_detail)
        return Check(name, False, "; ".join(f"node {node}: {problem}" for node, problem in sorted(bad.items()))
                     + f"; fix: {fix}")
    checks = [across("token authentication", lambda f: None if f["token"] else "token authentication is off",
                     f"on, on {where}", "start Ray with RAY_AUTH_MODE=token (cluster/README.md)")]
    for key in ("data.cache_dir", "run.dir"):
        value = getattr(cfg.data if key.startswith("data") else cfg.run, key.split(".")[1])
        checks.append(across(key, lambda f, key=key: f["paths"][key], f"{value} is shared and writable on {where}",
                             f"{key} must be a path every node shares and can write (EFS, NFS, a ReadWriteMany "
                             "volume), mounted at the same place"))
    checks.append(across("prepared corpus", lambda f: f["corpus"],
                         "complete on every node" if found[0]["corpus"] is None else "not prepared yet",
                         "prepare it into a data.cache_dir every node shares (raytrain prepare)"))
    devices = sorted({f["accelerator"]["device"] for f in found.values()})
    checks.append(across("accelerators", lambda f: f["accelerator"]["problem"],
                         f"{', '.join(devices)}; bf16 computes", "see above"))
    reduce = found[0]["allreduce"]
    detail = "one worker: nothing to reduce" if reduce["gbps"] is None else \
        f"{len(found)} workers, 64 MiB fp32 over {reduce['backend']}: bus bandwidth {reduce['gbps']:.2f} GB/s"
    checks.append(across("all-reduce", lambda f: None if f["allreduce"].get("correct", True) else
                         "the all-reduce gave a wrong sum", detail, "check the nodes' network (NCCL_SOCKET_IFNAME)"))
    if cfg.run.storage:
        checks.append(across("run.storage", lambda f: f["storage"], f"{cfg.run.storage} takes a write and a read",
                             "check the storage URI and the nodes' credentials"))
    return checks
