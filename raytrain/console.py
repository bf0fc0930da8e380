"""What the console shows: raytrain's own lines, and another library's only when it needs the user.

Ray, Ray Train, Ray Data, DeepSpeed, torch and transformers log a great deal
that matters only when debugging (Ray Train's per-report lines carry the whole
metrics dict; Ray's core worker logs an error-level line in healthy runs). While
a command runs under ``capture(log_path)``, the process's standard output and
error (file descriptors 1 and 2, so native code and the lines Ray forwards from
its workers too) go through a pipe to a pump thread. Every line goes, whole, to
``log_path``; the console gets raytrain's own lines (written with ``say``, here
or in a worker: workers mark theirs with their rank), and another library's
warning or error unless ``HARMLESS`` names it. ``verbose`` shows every line.
"""
from __future__ import annotations

import os
import re
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

MARK = "[raytrain:{}] "  # a raytrain line from rank N ("-" for the driver), as the pump finds it in Ray's output
MARKED = re.compile(r"\[raytrain:(-|\d+)\] (.*)$")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# Ray Tune's own progress display in a search's driver: its status table and trial events
TUNE_TABLE = re.compile(r"^(Trial status:|Current time:|Logical resource usage:|[╭╰│├┌└]|Trial \S+ (started|completed|"
                        r"errored|finished))|\[Exploit\] Cloning trial")  # the last: population-based training
ATTENTION = re.compile(r"(?i)warn|error|exception|traceback|fatal|critical|killed|out of memory")

# Warnings and errors of other libraries seen in healthy runs, and why each one is harmless. A match keeps the
# line out of the console (it is still in the log file).
HARMLESS = {
    r"Token authentication is enabled": "Ray 2.60's notice on every local instance; the instance is this "
                                        "machine's own and a cluster's token is the user's to set",
    r"PreemptionWatcher": "Ray Train's preemption watcher: its constructor arguments sit in the object store, "
                          "which Ray's core worker reports at error level although nothing fails",
    r"all_gather_into_tensor|_all_gather_base|reduce_scatter_tensor": "torch deprecating a collective that "
                                                                      "DeepSpeed calls; the results are the same",
    r"Progress bars disabled": "Ray Data's own progress bars; raytrain draws its own",
    r"Setting accelerator to CPU": "DeepSpeed on a CPU run: the accelerator raytrain asked for (DS_ACCELERATOR)",
}
_HARMLESS = re.compile("|".join(f"(?:{pattern})" for pattern in HARMLESS))

_state = {"console": None, "last": 0.0}  # the console while a capture runs; when the pump last saw a line
DRAINED = "\x00raytrain: the pump has read everything written before this line"
_drained = threading.Event()


def say(line: str, rank: int | None = None) -> None:
    """A raytrain line for the user: from the driver (rank None) or from a worker's rank."""
    if rank is None and _state["console"] is None:
        print(line, flush=True)
        return
    text = "\n".join(MARK.format("-" if rank is None else rank) + part for part in line.split("\n"))
    # Not print() in a worker: Ray Train patches print there and would echo each line twice.
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def stream():
    """Where a progress bar draws: the console itself while a capture runs (a bar redraws one line)."""
    return _state["console"] or sys.stderr


def shown(line: str, verbose: bool, tune_table: bool = False) -> str | None:
    """What the console shows for one line of output (ANSI colours removed), or None. In a search
    (``tune_table``) the trials' own lines stay in their run directories and Tune's table shows instead."""
    plain = ANSI.sub("", line)
    marked = MARKED.search(plain)
    if marked:
        rank, text = marked.groups()
        if rank == "-" or verbose or not tune_table:
            return text if rank in ("-", "0") else f"[rank {rank}] {text}"
    if verbose or (tune_table and TUNE_TABLE.search(plain)):
        return plain
    if not marked and ATTENTION.search(plain) and not _HARMLESS.search(plain):
        return plain
    return None


def pump(read_fd: int, log, console, verbose: bool, tune_table: bool) -> None:
    pending = b""
    while chunk := os.read(read_fd, 1 << 16):
        *lines, pending = (pending + chunk).split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8", "replace")
            if line == DRAINED:
                _drained.set()
                continue
            log.write(line + "\n")
            text = shown(line, verbose, tune_table)
            if text is not None:
                console.write(text + "\n")
        log.flush()
        console.flush()
        _state["last"] = time.monotonic()


@contextmanager
def capture(log_path: Path, verbose: bool = False, tune_table: bool = False):
    """Run the block with every other library's output in ``log_path`` and only what ``shown`` passes on the
    console. The pump outlives the block (Ray's processes keep writing into the pipe until Ray shuts down).
    Only where standard output is the process's own descriptor 1: under a caller that redirected it (a test
    capturing output, a notebook) everything stays where that caller sends it."""
    if not on_descriptor_1():
        yield None
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # Ray holds back lines that look alike ("rank 1/2 ...", "rank 0/2 ...") to print them as one: every line
    # goes into the log as it is, and the console shows each of ours once anyway.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    sys.stdout.flush()
    sys.stderr.flush()
    console = os.fdopen(os.dup(1), "w", buffering=1)
    saved = os.dup(1), os.dup(2)
    read_fd, write_fd = os.pipe()
    threading.Thread(target=pump, args=(read_fd, log_path.open("a"), console, verbose, tune_table),
                     daemon=True).start()
    sys.stdout.reconfigure(line_buffering=True)  # Ray prints its workers' lines here: at once, not when full
    os.dup2(write_fd, 1)
    os.dup2(write_fd, 2)
    os.close(write_fd)
    _state["console"] = console
    try:
        yield console
    finally:
        disconnect_ray()  # its processes' last lines (Ray Train's reports, shutdown) into the log, not after it
        sys.stdout.flush()
        sys.stderr.flush()
        settle()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        _state["console"] = None


def on_descriptor_1() -> bool:
    try:
        return sys.stdout.fileno() == 1
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError and a ValueError
        return False


def disconnect_ray() -> None:
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()


def settle(quiet_s: float = 1.0, most_s: float = 10.0) -> None:
    """Wait until the pump has read all this process wrote (a marker line written last comes through), then
    until it has been quiet for ``quiet_s`` (the workers' last lines travel through Ray's log stream and arrive
    after the run returns), at most ``most_s`` in all. Without the marker, a command's last line written just
    before it ends could still sit in the pipe when the process exits."""
    deadline = time.monotonic() + most_s
    if _state["console"] is None:
        return  # no capture: nothing goes through a pump
    _drained.clear()
    os.write(1, (DRAINED + "\n").encode())
    _drained.wait(most_s)
    while time.monotonic() < deadline and time.monotonic() - _state["last"] < quiet_s:
        time.sleep(0.1)
