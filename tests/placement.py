"""Place a RayJob's training workers on the pods it declares, with Ray's own scheduler.

Run as a script (it starts a simulated Ray cluster of its own): ``python -m tests.placement MANIFEST``;
prints one JSON line: ``{"placed": bool, "nodes": [...], "bundles": [...]}``.
"""
import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def pod_resources(group: dict) -> dict:
    """The Ray resources one pod of a worker group offers: num-cpus (else the CPU limit), GPUs, custom ones."""
    params, container = group["rayStartParams"], group["template"]["spec"]["containers"][0]
    limits = container["resources"]["limits"]
    resources = {"num_cpus": int(params.get("num-cpus", limits["cpu"])),
                 "num_gpus": int(limits.get("nvidia.com/gpu", 0))}
    if "resources" in params:
        resources["resources"] = json.loads(params["resources"].strip('"').replace('\\"', '"'))
    return resources


def training_bundles(job: dict) -> tuple[list[dict], str]:
    """The bundles Ray Train asks for: the entrypoint's config through raytrain's own ScalingConfig."""
    from raytrain.launch import scaling_config
    from raytrain.loading import load_config
    config = ROOT / "cluster" / "configs" / Path(job["spec"]["entrypoint"].split()[3]).name
    scaling = scaling_config(load_config(str(config), environment=False).scaling)
    return [dict(scaling.resources_per_worker)] * scaling.num_workers, scaling.placement_strategy


def place(job: dict, timeout_s: float = 20) -> dict:
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.placement_group import placement_group
    bundles, strategy = training_bundles(job)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = []
    try:
        for group in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
            for _ in range(group["replicas"]):
                nodes.append(pod_resources(group))
                cluster.add_node(**nodes[-1])
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        group = placement_group(bundles, strategy=strategy)
        placed = group.wait(timeout_seconds=timeout_s)
    finally:
        ray.shutdown()
        cluster.shutdown()
    return {"placed": placed, "nodes": nodes, "bundles": bundles}


if __name__ == "__main__":
    manifest = [doc for doc in yaml.safe_load_all(Path(sys.argv[1]).read_text()) if doc["kind"] == "RayJob"][0]
    print(json.dumps(place(manifest)))
