"""cluster/: every shipped file validates, and 2 workers on 2 simulated Ray nodes train like one node."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raytrain.loading import load_config
from tests.helpers import TINY, read_jsonl

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


ROOT = CLUSTER.parent
LAUNCHER, MANIFEST = CLUSTER / "aws-gpu.yaml", CLUSTER / "kuberay-rayjob.yaml"


def rayjob(text: str) -> dict:
    return next(doc for doc in yaml.safe_load_all(text) if doc["kind"] == "RayJob")


def pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return dict(line.split("==") for line in lines if "==" in line and not line.startswith("#"))


def test_dockerfile_installs_torchs_cuda_build_that_the_nodes_drivers_run():
    """torch 2.13.0's PyPI wheel on x86_64 is built for CUDA 13.0 (driver 580 or newer); the image takes the
    same version's CUDA 12.8 build (driver 570 or newer), and raytrain doctor knows both drivers' floors."""
    from raytrain.doctor import MIN_DRIVER
    text = (CLUSTER / "Dockerfile").read_text()
    assert f"--index-url https://download.pytorch.org/whl/cu128 torch=={pins()['torch']}" in text
    assert MIN_DRIVER["12.8"] == 570.26 and MIN_DRIVER["13.0"] == 580.65


def test_dockerfile_base_is_rays_gpu_image_at_the_pinned_ray_on_a_python_every_pin_supports():
    from importlib.metadata import PackageNotFoundError, metadata, version

    from packaging.specifiers import SpecifierSet
    base = next(line.split()[1] for line in (CLUSTER / "Dockerfile").read_text().splitlines()
                if line.startswith("FROM "))
    image, tag = base.split(":")
    ray_version, python, flavour = tag.split("-")
    assert image == "rayproject/ray" and flavour == "gpu"
    assert ray_version == pins()["ray"] == version("ray")
    python = f"{python[2]}.{python[3:]}"  # py311 -> 3.11
    needs = {}
    for name in pins():
        try:
            needs[name] = SpecifierSet(metadata(name).get("Requires-Python") or "")
        except PackageNotFoundError:
            continue
    assert len(needs) > 50
    refused = {name: str(spec) for name, spec in needs.items() if not spec.contains(python)}
    assert not refused, f"the image's Python {python} is refused by {refused}"
    # pyproject's requires-python says what the pins need: its lowest version passes every pin, the one below not
    import tomllib
    declared = SpecifierSet(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"])
    assert declared.contains("3.11") and not declared.contains("3.10")
    assert all(spec.contains("3.11") for spec in needs.values())
    assert any(not spec.contains("3.10") for spec in needs.values())


def test_launcher_and_manifest_run_the_one_image():
    launcher = yaml.safe_load(LAUNCHER.read_text())
    job = rayjob(MANIFEST.read_text())
    cluster = job["spec"]["rayClusterSpec"]
    images = {c["image"] for g in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
              for c in g["template"]["spec"]["containers"]}
    assert images == {launcher["docker"]["image"]}
    assert "cluster/Dockerfile" in LAUNCHER.read_text() and "cluster/Dockerfile" in MANIFEST.read_text()
    assert cluster["rayVersion"] == pins()["ray"]


def test_launcher_yaml_passes_rays_own_schema_and_opens_only_ssh():
    from ray.autoscaler._private.util import prepare_config, validate_config
    config = yaml.safe_load(LAUNCHER.read_text())
    prepared = prepare_config(config)
    validate_config(prepared)
    types = prepared["available_node_types"]
    gpu_types = [t for t in types.values() if t["resources"].get("GPU")]
    assert gpu_types and all(t["max_workers"] >= 1 for t in gpu_types)
    assert types[prepared["head_node_type"]]["resources"].get("GPU", 0) == 0
    # Ray adds SSH from 0.0.0.0/0 to a security group it creates (ray.autoscaler._private.aws.config), so the
    # file names a pre-created group on every node type and asks Ray to create none.
    assert "security_group" not in prepared["provider"]
    assert all(t["node_config"]["SecurityGroupIds"] for t in types.values())
    text = LAUNCHER.read_text()
    assert "--dashboard-host=127.0.0.1" in text and "0.0.0.0/0\n" not in text
    mount = " ".join(prepared["initialization_commands"])
    assert "nfsvers=4.1,rsize=1048576,wsize=1048576,hard,timeo=600,retrans=2,noresvport" in mount
    options = " ".join(prepared["docker"]["run_options"])
    assert "-v /mnt/shared:/mnt/shared" in options and "NCCL_SOCKET_IFNAME" in options
    assert prepared["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    assert "RAY_AUTH_MODE=token" in (CLUSTER / "Dockerfile").read_text()


def test_kuberay_manifest_defines_its_volume_and_runs_a_real_raytrain_config():
    docs = list(yaml.safe_load_all(MANIFEST.read_text()))
    claim = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    job = rayjob(MANIFEST.read_text())
    spec = job["spec"]
    head = spec["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1" and head["rayStartParams"]["num-cpus"] == "0"
    groups = [head] + spec["rayClusterSpec"]["workerGroupSpecs"]
    claims = {v["persistentVolumeClaim"]["claimName"] for g in groups for v in g["template"]["spec"]["volumes"]
              if "persistentVolumeClaim" in v}
    assert claims == {claim["metadata"]["name"]}
    # Token authentication through KubeRay's authOptions (1.5.1 and later), which gives the generated token to
    # every Ray container and to the submitter pod; a token injected by hand into the pods never reaches it.
    assert spec["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    for group in groups:
        env = {e["name"] for e in group["template"]["spec"]["containers"][0].get("env", [])}
        assert not env & {"RAY_AUTH_TOKEN", "RAY_AUTH_MODE"}
    assert "KubeRay >= 1.5.1" in MANIFEST.read_text()
    assert all(e.get("value") == "^lo,docker,veth" for g in spec["rayClusterSpec"]["workerGroupSpecs"]
               for e in g["template"]["spec"]["containers"][0]["env"] if e["name"] == "NCCL_SOCKET_IFNAME")
    for group in spec["rayClusterSpec"]["workerGroupSpecs"]:  # room for Ray's own processes beside the workers
        limit = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
        assert int(group["rayStartParams"]["num-cpus"]) <= limit - 4
    command = spec["entrypoint"].split()
    assert command[:3] == ["raytrain", "train", "-c"]
    shipped = CLUSTER / "configs" / Path(command[3]).name
    assert command[3] == f"/opt/raytrain/cluster/configs/{shipped.name}" and shipped.is_file()
    assert "COPY cluster ./cluster" in (CLUSTER / "Dockerfile").read_text() and "WORKDIR /opt/raytrain" in \
        (CLUSTER / "Dockerfile").read_text()


def readme_job_lines() -> list[str]:
    text = (CLUSTER / "README.md").read_text()
    block = text.split("<!-- job-check")[1].split("```bash\n")[1].split("```")[0]
    return [line for line in block.splitlines() if line.strip()]


@pytest.mark.ray
@pytest.mark.own_ray
def test_readme_job_command_trains_on_a_token_authenticated_head(tmp_path):
    """cluster/README.md's lines as written: a token, a `ray start --head` with token authentication, the
    `ray job submit` of a short run, `ray stop`. Runs before any other Ray instance (conftest orders it first)
    because `ray stop` stops every Ray on the machine."""
    import psutil
    assert not [p for p in psutil.process_iter(["name"]) if p.info["name"] in ("raylet", "gcs_server")], \
        "another Ray instance is running; this test runs `ray stop` as the README does"
    lines = readme_job_lines()
    assert lines[0] == "ray get-auth-token --generate" and lines[-1] == "ray stop"
    env = {**os.environ, "HOME": str(tmp_path)}
    env.pop("RAY_ADDRESS", None)
    done = []
    try:
        for line in lines[:-1]:
            done.append(subprocess.run(line, shell=True, cwd=ROOT, env=env, capture_output=True, text=True,
                                       timeout=600))
            assert done[-1].returncode == 0, f"{line}\n{done[-1].stdout[-3000:]}\n{done[-1].stderr[-3000:]}"
        # without the token mode the same client is refused: the README's warning is real
        refused = subprocess.run("ray job list --address http://127.0.0.1:8265", shell=True, cwd=ROOT,
                                 env={**env, "RAY_AUTH_MODE": "disabled"}, capture_output=True, text=True,
                                 timeout=120)
        assert refused.returncode != 0 and "authentication" in (refused.stdout + refused.stderr).lower()
        # KubeRay's submitter pod: a separate process with only what authOptions gives it (the token in
        # RAY_AUTH_TOKEN, token mode), no token file, submitting the manifest's kind of job
        submitter = {"PATH": os.environ["PATH"], "HOME": str(tmp_path / "submitter"), "RAY_AUTH_MODE": "token",
                     "RAY_AUTH_TOKEN": (tmp_path / ".ray" / "auth_token").read_text().strip()}
        plan = "raytrain plan -c cluster/configs/gpu-125m-zero2.yaml --vocab 50257"
        submitted = subprocess.run(f"ray job submit --address http://127.0.0.1:8265 --working-dir . -- {plan}",
                                   shell=True, cwd=ROOT, env=submitter, capture_output=True, text=True, timeout=600)
        assert submitted.returncode == 0 and "fits: A10G has 22.5 GiB" in submitted.stdout, submitted.stderr[-2000:]
        without = subprocess.run("ray job list --address http://127.0.0.1:8265", shell=True, cwd=ROOT,
                                 env={k: v for k, v in submitter.items() if k != "RAY_AUTH_TOKEN"},
                                 capture_output=True, text=True, timeout=120)
        assert without.returncode != 0
    finally:
        subprocess.run(lines[-1], shell=True, cwd=ROOT, env=env, capture_output=True, timeout=120)
    assert (tmp_path / ".ray" / "auth_token").is_file()
    run = tmp_path / "raytrain-runs" / "first-job"
    metrics = read_jsonl(run / "metrics.jsonl")
    assert metrics[-1]["step"] == 20 and metrics[-1]["loss"] < metrics[0]["loss"]
    # the built-in model after 20 steps already uses context: later positions are predicted better than the first
    final = read_jsonl(run / "eval.jsonl")[-1]
    assert final["val/loss@256/pos128-255"] < final["val/loss@256/pos0-0"] - 0.1
    assert (run / "model" / "model.safetensors").is_file() and (run / "model" / "config.json").is_file()


def place(manifest_text: str, tmp_path) -> dict:
    """tests/placement.py in its own process: it starts a simulated Ray cluster of the manifest's pods."""
    path = tmp_path / "manifest.yaml"
    path.write_text(manifest_text)
    done = subprocess.run([sys.executable, "-m", "tests.placement", str(path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.ray  # starts simulated Ray clusters (in a subprocess)
def test_rayjob_workers_fit_its_pods_and_too_few_cpus_do_not(tmp_path):
    """Ray's own scheduler places the job's 8 training bundles (the config's ScalingConfig) on the 2 declared
    pods; with the pods cut to 16 CPUs (Ray offers the limit when num-cpus is not given) it cannot."""
    result = place(MANIFEST.read_text(), tmp_path)
    assert result["placed"] and len(result["bundles"]) == 8 and len(result["nodes"]) == 2
    docs = list(yaml.safe_load_all(MANIFEST.read_text()))
    job = next(d for d in docs if d["kind"] == "RayJob")
    group = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    group["rayStartParams"].pop("num-cpus")
    resources = group["template"]["spec"]["containers"][0]["resources"]
    resources["limits"]["cpu"] = resources["requests"]["cpu"] = "16"
    result = place(yaml.safe_dump_all(docs), tmp_path)
    assert not result["placed"] and result["nodes"][0]["num_cpus"] == 16


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

    from raytrain.launch import fit
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


@pytest.fixture(scope="module")
def doctored(tmp_path_factory):
    """tests/doctor_cluster.py in its own process: a simulated two-node cluster with token authentication."""
    out = tmp_path_factory.mktemp("doctor")
    done = subprocess.run([sys.executable, "-m", "tests.doctor_cluster", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def lines_of(result: dict, start: str) -> list[str]:
    return [line for line in result["out"].splitlines() if line.startswith(start)]


@pytest.mark.ray  # starts a simulated cluster (in a subprocess)
def test_doctor_passes_every_check_on_a_healthy_cluster(doctored):
    healthy = doctored["healthy"]
    assert doctored["prepare"]["code"] == 0 and healthy["code"] == 0, healthy["out"][-3000:]
    checks = {line.split(":")[0][6:]: line for line in lines_of(healthy, "ok  ") + lines_of(healthy, "FAIL")}
    assert set(checks) == {"capacity", "token authentication", "data.cache_dir", "run.dir", "prepared corpus",
                           "accelerators", "all-reduce"}
    assert all(line.startswith("ok") for line in checks.values())
    assert "on, on 2 worker(s) on 2 node(s)" in checks["token authentication"]
    assert "complete on every node" in checks["prepared corpus"]
    assert "2 workers, 64 MiB fp32 over gloo: bus bandwidth" in checks["all-reduce"]


@pytest.mark.ray
@pytest.mark.parametrize("case, check, says", [
    ("node-local cache", "data.cache_dir", "here is not the directory the driver sees"),
    ("unwritable run.dir", "run.dir", "/proc/raytrain-runs"),
    ("too many workers", "capacity", "5 workers need 5 CPU but the Ray cluster this process is connected to has 2"),
])
def test_doctor_names_each_broken_thing_with_its_fix(doctored, case, check, says):
    result = doctored[case]
    assert result["code"] == 1, result["out"][-3000:]
    (failed,) = [line for line in lines_of(result, "FAIL") if line.startswith(f"FAIL  {check}:")]
    assert says in failed and ("fix:" in failed or "use at most" in failed)


@pytest.mark.ray
def test_a_worker_group_that_cannot_be_placed_fails_within_the_start_timeout(doctored):
    """A resource no node has, joining a cluster through RAY_ADDRESS (nothing to check before connecting):
    the run fails after scaling.start_timeout_s (10 s) saying what it asked for and what the cluster has."""
    result = doctored["unplaceable start"]
    assert result["code"] == 1 and result["seconds"] < 120, result["out"][-3000:]
    assert "the 2 workers could not be placed within scaling.start_timeout_s (10 s)" in result["out"]
    assert "'accelerator_type:H100': 2.0" in result["out"] and "cannot grow (no autoscaler)" in result["out"]
