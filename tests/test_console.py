"""What the console shows: raytrain's lines, a dependency's warning unless it is known harmless, everything with
--verbose; every line, whole, in the log file. Through real file descriptors in a child process."""
import subprocess
import sys
import textwrap

import pytest

from raytrain.console import HARMLESS, shown

# What a healthy run's other libraries printed (tests/test_training.py's default run sees them for real)
RAY_LINES = [
    "\x1b[36m(RayTrainWorker pid=11051)\x1b[0m Reporting training result 1: TrainingReport(checkpoint=None, ...)",
    "(RayTrainWorker pid=11051) Checkpoint successfully created at: Checkpoint(filesystem=local, path=/x)",
    "(TrainController pid=10940) [2026-12-03 11:18:51,768 E 10940 10972] core_worker.cc:2465: Actor with class "
    "name: 'PreemptionWatcher' and ID: '099e' has constructor arguments in the object store",
    "2026-12-03 11:18:29,449\tWARNING authentication_token_setup.py:85 -- Token authentication is enabled for "
    "this Ray cluster.",
    "(RayTrainWorker pid=11078) DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully",
    "(RayTrainWorker pid=11051) /x/torch/distributed/c10d_logger.py:83: FutureWarning: "
    "`torch.distributed.all_gather_into_tensor` is deprecated.",
    "2026-12-03 11:18:34,766\tINFO worker.py:2029 -- Started a local Ray instance.",
]


@pytest.mark.parametrize("line", RAY_LINES)
def test_other_libraries_routine_and_known_harmless_lines_stay_off_the_console(line):
    assert shown(line, verbose=False) is None
    assert shown(line, verbose=True) is not None  # --verbose: everything


def test_our_lines_show_without_rays_prefix_and_other_ranks_are_named():
    assert shown("\x1b[36m(RayTrainWorker pid=1)\x1b[0m [raytrain:0] step 5/20 | loss 5.0", False) == \
        "step 5/20 | loss 5.0"
    assert shown("(RayTrainWorker pid=2, ip=10.0.0.2) [raytrain:3] warning: x", False) == "[rank 3] warning: x"
    assert shown("[raytrain:-] done: 20 steps", False) == "done: 20 steps"


def test_a_warning_that_is_not_known_harmless_reaches_the_console():
    line = "(RayTrainWorker pid=1) UserWarning: the tokenizer has no pad token"
    assert shown(line, False) == line
    assert shown("(raylet) [E 12:00:00] worker died: out of memory", False) is not None
    assert all(reason and len(reason) > 20 for reason in HARMLESS.values())  # each says why


def test_a_search_shows_tunes_table_and_its_own_lines_but_not_the_trials_step_lines():
    assert shown("Trial status: 2 RUNNING | 1 TERMINATED", False, tune_table=True) is not None
    assert shown("│ trial-00001   RUNNING   uniform   [64, 128] │", False, tune_table=True) is not None
    assert shown("(RayTrainWorker pid=1) [raytrain:0] step 5/20", False, tune_table=True) is None
    assert shown("[raytrain:-] best: trial-00001", False, tune_table=True) == "best: trial-00001"
    exploit = "INFO pbt.py:907 -- [ValidPBT] [Exploit] Cloning trial c_00003 (score = -2.77) into trial c_00002"
    assert shown(exploit, False, tune_table=True) == exploit  # population-based training's copies are news
    assert shown("INFO pbt.py:745 -- [pbt]: no checkpoint for trial t. Skip exploit", False, tune_table=True) is None


CHILD = textwrap.dedent("""
    import os, subprocess, sys
    from pathlib import Path
    from raytrain import console
    with console.capture(Path(sys.argv[1]), verbose=sys.argv[2] == "1"):
        print("(RayTrainWorker pid=7) Reporting training result 1: TrainingReport(...)")
        os.write(2, b"a native library's INFO line on fd 2\\n")
        subprocess.run(["echo", "a child process's line"])
        print("(RayTrainWorker pid=7) [raytrain:0] step 1/1 | loss 1.0")
        console.say("done: 1 steps")
    print("after the command: the console again")
""")


@pytest.mark.parametrize("verbose", [False, True])
def test_capture_sends_every_line_to_the_log_and_only_ours_to_the_console(tmp_path, verbose):
    log = tmp_path / "libraries.log"
    done = subprocess.run([sys.executable, "-c", CHILD, str(log), str(int(verbose))], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    console = (done.stdout + done.stderr).splitlines()
    ours = ["step 1/1 | loss 1.0", "done: 1 steps", "after the command: the console again"]
    theirs = ["(RayTrainWorker pid=7) Reporting training result 1: TrainingReport(...)",
              "a native library's INFO line on fd 2", "a child process's line"]
    assert sorted(console) == sorted(ours + (theirs if verbose else []))
    logged = log.read_text().splitlines()
    assert set(theirs) <= set(logged) and "[raytrain:-] done: 1 steps" in logged


LAST_LINE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from raytrain import console
    with console.capture(Path(sys.argv[1])):
        console.say("waiting for another command's lock")
        time.sleep(1.5)  # longer than settle's quiet time: the pump has nothing to do when the last line comes
        for i in range(200):
            console.say(f"line {i}")
""")


def test_a_commands_last_lines_reach_the_console_before_it_exits(tmp_path):
    """The case of `raytrain prepare` printing the corpus directory last, after waiting on another's lock: the
    process ends at once, and what the pump has not read yet must not be lost with it."""
    for attempt in range(2):
        done = subprocess.run([sys.executable, "-c", LAST_LINE, str(tmp_path / f"{attempt}.log")],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines()[-1] == "line 199" and done.stdout.count("line ") == 200


# The built-in default's losses, as docs/results.md shows them (2 workers x 1 CPU, fp32, gloo): a change that
# moves every variant alike (the loss normalisation, the windows, the schedule, the initialisation) moves these.
PINNED_EVAL = {0: (5.4558, 5.4573, 5.4600), 80: (2.6295, 2.6223, 2.6390), 240: (1.9965, 1.9722, 2.0712)}
PINNED_TRAIN = {10: 4.732426, 80: 2.508975, 240: 1.769182}  # metrics.jsonl's loss: the interval's token mean
NOT_OURS = ["Reporting training result", "Checkpoint successfully created", "PreemptionWatcher",
            "Token authentication", "shm_comm_op built", "FutureWarning", "pid=", "run directory:", "INFO"]


@pytest.mark.ray
@pytest.mark.own_ray  # the command starts its own Ray, before the shared one exists
def test_the_default_run_prints_only_ours_ends_with_the_summary_and_keeps_its_losses(tmp_path, cache_dir):
    """`raytrain train` exactly as the README's first command runs it (its cache and run directories aside)."""
    import json
    import os
    import re

    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "PYTEST"))}
    done = subprocess.run(["raytrain", "train", f"data.cache_dir={cache_dir}", f"run.dir={tmp_path}",
                           "run.name=default"], capture_output=True, text=True, timeout=900, env=env)
    console = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", done.stdout + done.stderr).splitlines()
    assert done.returncode == 0, "\n".join(console[-40:])
    assert not [line for line in console if any(s in line for s in NOT_OURS) or re.fullmatch(r"/\S+", line)]
    assert console[-10].startswith("done: 240 steps, 1,950,048 tokens in ") and console[-1].startswith(
        f"  raytrain eval {tmp_path / 'default' / 'model'}")
    logged = (tmp_path / "default" / "libraries.log").read_text()
    assert "Reporting training result" in logged and "Started a local Ray instance" in logged
    evals = {r["step"]: r for r in map(json.loads, (tmp_path / "default" / "eval.jsonl").read_text().splitlines())}
    for step, losses in PINNED_EVAL.items():
        assert [evals[step][f"val/loss@{length}"] for length in (64, 256, 512)] == pytest.approx(losses, abs=1e-4)
    metrics = {r["step"]: r for r in map(json.loads, (tmp_path / "default" / "metrics.jsonl").read_text().splitlines())}
    assert {step: metrics[step]["loss"] for step in PINNED_TRAIN} == pytest.approx(PINNED_TRAIN, rel=1e-5)
