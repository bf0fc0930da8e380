"""raytrain doctor, and a start that cannot be placed, against a simulated two-node Ray cluster with token
authentication, each node's HOME its own (so '~' is node-local, as on real nodes).

Run as a script (it starts a Ray cluster of its own): ``python -m tests.doctor_cluster OUT_DIR``; prints one
JSON line: {case: {"code": exit status, "out": what it printed, "seconds": how long it took}}.
"""
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEYS = ["scaling.num_workers=2", "scaling.placement_strategy=STRICT_SPREAD", "scaling.cpus_per_worker=1"]


def raytrain(args: list[str], env: dict, timeout: float = 300) -> dict:
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "raytrain.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    return {"code": done.returncode, "out": done.stdout + done.stderr, "seconds": time.time() - started}


def main(out: Path) -> dict:
    # before Ray is imported: it reads its authentication mode once, at import
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    from ray.cluster_utils import Cluster
    homes = {name: out / f"home-{name}" for name in ("head", "worker", "driver")}
    for home in homes.values():
        home.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "env_vars": {"HOME": str(homes["head"])}})
    results = {}
    try:
        cluster.add_node(num_cpus=1, env_vars={"HOME": str(homes["worker"])})
        cluster.wait_for_nodes()
        env = {**os.environ, "RAY_ADDRESS": cluster.address, "HOME": str(homes["driver"])}
        shared = [f"data.cache_dir={out / 'shared-cache'}", f"run.dir={out / 'runs'}"]
        results["prepare"] = raytrain(["prepare", *shared[:1]], env)
        results["healthy"] = raytrain(["doctor", *KEYS, *shared], env)
        results["node-local cache"] = raytrain(["doctor", *KEYS, "data.cache_dir=~/cache", shared[1]], env)
        results["unwritable run.dir"] = raytrain(["doctor", *KEYS, shared[0], "run.dir=/proc/raytrain-runs"], env)
        results["too many workers"] = raytrain(["doctor", *KEYS, *shared, "scaling.num_workers=5"], env)
        results["unplaceable start"] = raytrain(
            ["train", *KEYS, *shared, "run.name=unplaceable", "scaling.start_timeout_s=10",
             "scaling.resources_per_worker={accelerator_type:H100: 1}"], env)
    finally:
        cluster.shutdown()
    return results


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
