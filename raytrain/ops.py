"""DeepSpeed's CPU communication op: built once per installation, never waited on after a dead build."""
from __future__ import annotations

import fcntl
import hashlib
import os
import sys
from pathlib import Path

from raytrain import console

COMM_OP = "deepspeed_shm_comm"


def extensions_dir() -> Path:
    """Where this installation JIT-builds torch extensions: inside its own environment, so two virtual
    environments never rebuild into (or lock) each other's folder, as they do in ~/.cache/torch_extensions."""
    own = Path(sys.prefix) / "var" / "raytrain-torch-extensions"
    try:
        own.mkdir(parents=True, exist_ok=True)
        return own
    except OSError:  # a read-only system Python: a per-installation folder in the user's cache
        key = hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]
        return Path("~/.cache/raytrain/torch-extensions").expanduser() / key


def comm_op_built() -> bool:
    """A finished build is on disk (then only the workers load it: the driver need not import DeepSpeed)."""
    op = extensions_dir() / COMM_OP
    return bool(list(op.glob("*.so"))) and not (op / "lock").exists()


def build_comm_op(say=console.say) -> None:
    """Build (once) or load DeepSpeed's CPU shared-memory communication op, never waiting on a dead build.

    torch guards a JIT build with a plain lock file that a killed build leaves
    behind, after which every later build waits forever, silently. Builds here
    take an OS lock first (released when its holder dies, however it dies), so
    a torch lock file found while holding it belongs to a dead build: it is
    reported and removed.
    """
    root = extensions_dir()
    os.environ["TORCH_EXTENSIONS_DIR"] = str(root)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with open(root / ".raytrain-build.lock", "a+") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        try:
            stale = root / COMM_OP / "lock"
            if stale.exists():
                say(f"warning: removed a lock file left by a build that did not finish ({stale})")
                stale.unlink()
            if not comm_op_built():  # the stale lock is gone: no finished build on disk
                say(f"building DeepSpeed's CPU communication op into {root} (once per installation, about a minute)")
            from deepspeed.accelerator import get_accelerator  # after DS_ACCELERATOR: DeepSpeed reads it at import
            builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
            if builder is not None:
                builder.load(verbose=False)
        finally:
            fcntl.flock(guard, fcntl.LOCK_UN)
