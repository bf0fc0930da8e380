"""cluster/: every shipped file validates, and 2 workers on 2 simulated Ray nodes train like one node."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raytrain.config import load_config
from tests.test_training import TINY, read_jsonl

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


@pytest.mark.parametrize("path", sorted(CLUSTER.glob("*.yaml")), ids=lambda p: p.name)
def test_launcher_yaml_passes_rays_own_schema(path):
    config = yaml.safe_load(path.read_text())
    if config.get("kind") == "RayJob":
        pytest.skip("KubeRay manifest: checked below")
    from ray.autoscaler._private.util import prepare_config, validate_config
    prepared = prepare_config(config)
    validate_config(prepared)
    gpu_types = [t for t in prepared["available_node_types"].values() if t["resources"].get("GPU")]
    assert gpu_types and all(t["max_workers"] >= 1 for t in gpu_types)
    assert prepared["available_node_types"][prepared["head_node_type"]]["resources"].get("GPU", 0) == 0
    text = path.read_text()
    assert "--dashboard-host=127.0.0.1" in text and "0.0.0.0/0\n" not in text.replace("never 0.0.0.0/0", "")
    assert "constraints.txt" in text  # installs the pinned versions


def test_kuberay_manifest_runs_a_real_raytrain_config():
    job = yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    head = spec["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    assert head["template"]["spec"]["containers"][0]["image"]
    workers = spec["rayClusterSpec"]["workerGroupSpecs"]
    gpus = [int(c["resources"]["limits"]["nvidia.com/gpu"]) for g in workers
            for c in g["template"]["spec"]["containers"]]
    assert gpus and min(gpus) >= 1 and all(g["groupName"] and g["replicas"] >= 1 for g in workers)
    command = spec["entrypoint"].split()
    assert command[:3] == ["raytrain", "train", "-c"]
    shipped = CLUSTER / "configs" / Path(command[3]).name
    assert command[3].endswith(f"cluster/configs/{shipped.name}") and shipped.is_file()


@pytest.mark.parametrize("path", sorted((CLUSTER / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_gpu_training_configs_validate(path):
    cfg = load_config(str(path), environment=False)  # its paths live on the cluster's shared volume
    assert cfg.scaling.use_gpu and cfg.scaling.num_workers >= 8
    params = cfg.model.num_layers * (4 * cfg.model.hidden_size ** 2 + 3 * cfg.model.hidden_size
                                     * cfg.model.intermediate_size) + 50257 * cfg.model.hidden_size
    assert 100e6 < params < 400e6  # a real model size
    assert 2048 <= cfg.lengths.max <= cfg.model.max_positions and cfg.deepspeed.zero_stage in (2, 3)


@pytest.mark.ray
def test_two_simulated_nodes_match_one_node(ray_session, cache_dir, tmp_path):
    """The corpus prepared by tasks on both of 2 Ray nodes, then 2 workers SPREAD over them, joined through
    RAY_ADDRESS, checkpoints in a shared directory: the same records as one node."""
    from ray.cluster_utils import Cluster

    from raytrain.train import fit
    common = TINY + [f"data.cache_dir={cache_dir}", f"run.dir={tmp_path}", "deepspeed.zero_stage=1"]
    fit(load_config(None, common + ["run.name=one-node"]))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        env = {**os.environ, "RAY_ADDRESS": cluster.address}
        command = [sys.executable, "-m", "raytrain.cli", "train", *common, "run.name=two-nodes",
                   "scaling.placement_strategy=STRICT_SPREAD", f"data.cache_dir={tmp_path / 'shared-cache'}",
                   "data.shard_bytes=400000"]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        # Each worker ran on its own node: the ranks' log lines name different nodes.
        lines = (done.stdout + done.stderr).splitlines()
        nodes = {rank: line.split(" on node ")[1].split(",")[0] for rank in ("0/2", "1/2")
                 for line in lines if f"rank {rank} on node " in line}
        assert len(nodes) == 2 and nodes["0/2"] != nodes["1/2"]
        units = [json.loads(p.read_text()) for p in (tmp_path / "shared-cache").glob("tokens/*/unit-*.json")]
        assert len(units) >= 10 and {u["node"] for u in units} == {n[:12] for n in nodes.values()}
    finally:
        cluster.shutdown()
    one, two = read_jsonl(tmp_path / "one-node" / "metrics.jsonl"), read_jsonl(tmp_path / "two-nodes" / "metrics.jsonl")
    assert [m["tokens"] for m in two] == [m["tokens"] for m in one]
    assert [m["loss"] for m in two] == pytest.approx([m["loss"] for m in one], rel=1e-5)
    assert sorted((tmp_path / "two-nodes").glob("checkpoint_*/engine/zero_pp_rank_1_mp_rank_00_optim_states.pt"))
