"""Real DeepSpeed engines on several ranks without Ray: gloo processes spawned by torch, and the CUDA view of
autocast that lets CPU tests take the branch DeepSpeed takes on a GPU.

``run_ranks(fn, world, *args)`` runs ``fn(rank, world, *args)`` in ``world``
processes joined in one gloo process group (DeepSpeed's own ``init_distributed``);
``fn`` must be importable (a module-level function) and returns nothing: it
writes what the test reads into a file.
"""
import os
import socket
from contextlib import contextmanager

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import deepspeed  # after DS_ACCELERATOR: DeepSpeed picks its accelerator at import
    deepspeed.init_distributed("gloo")
    fn(rank, world, *args)


def run_ranks(fn, world: int, *args) -> None:
    mp.spawn(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True)


@contextmanager
def cuda_autocast_view(device: str = "cpu"):
    """Make the no-argument ``torch.is_autocast_enabled()`` report ``device``'s autocast state.

    Without an argument torch reads CUDA's state, which on a CPU is never on: so
    DeepSpeed's ``autocast_if_enabled`` (``torch.is_autocast_enabled()``, then
    ``torch.autocast(enabled=False)`` when its own ``torch_autocast`` section is
    off) never switches a CPU run's autocast off, while on a GPU it always does.
    Under this view a CPU run takes the GPU's branch.
    """
    original = torch.is_autocast_enabled

    def view(device_type=None):
        return original(device_type or device)
    torch.is_autocast_enabled = view
    try:
        yield
    finally:
        torch.is_autocast_enabled = original
