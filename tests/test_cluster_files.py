"""The cluster files, read the way their tools read them: the launcher YAML against Ray's own schema,
the KubeRay manifests against the configs they run, the runtime_env by Ray's RuntimeEnv, every config
by qsae's loader. Nothing here starts a cluster; tests/test_job_submit.py submits a real job."""
from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.runtime_env import RuntimeEnv

from qsae.config import PipelineConfig, load_config

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
LAUNCHER = CLUSTER / "ray-cluster.yaml"
RAYCLUSTER = CLUSTER / "kuberay" / "raycluster.yaml"
RAYJOB = CLUSTER / "kuberay" / "rayjob.yaml"
GPU_DOCKERFILE = ROOT / "docker" / "gpu.Dockerfile"


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def by_kind(path: Path) -> dict[str, dict]:
    docs = documents(path)
    kinds = {doc["kind"]: doc for doc in docs}
    assert len(kinds) == len(docs), f"{path.name} holds two documents of one kind"
    return kinds


def dockerfile_pin(package: str) -> str:
    match = re.search(rf'"?{re.escape(package)}(?:\[[^\]]*\])?==([^"\s]+)', GPU_DOCKERFILE.read_text())
    assert match, f"docker/gpu.Dockerfile does not pin {package}"
    return match.group(1)


def job_config(entrypoint: str) -> PipelineConfig:
    """The config a `python jobs/release.py --config FILE [k=v ...]` entrypoint runs with."""
    argv = shlex.split(entrypoint)
    assert argv[:2] == ["python", "jobs/release.py"], entrypoint
    assert "--config" in argv, entrypoint
    at = argv.index("--config")
    config = ROOT / argv[at + 1]
    assert config.is_file(), f"the entrypoint names {argv[at + 1]}, which is not in the repository"
    overrides = [arg for arg in argv[2:at] + argv[at + 2:] if "=" in arg and not arg.startswith("-")]
    return load_config(config, overrides)


def pod_specs(cluster_spec: dict) -> list[dict]:
    return [cluster_spec["headGroupSpec"]["template"]["spec"]] + [
        group["template"]["spec"] for group in cluster_spec["workerGroupSpecs"]
    ]


def shared_mounts(pod: dict, claim: str) -> list[str]:
    """Mount paths, in the pod's Ray container, of the volume bound to `claim`."""
    volumes = {v["name"] for v in pod["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == claim}
    container = pod["containers"][0]
    return [m["mountPath"] for m in container.get("volumeMounts", []) if m["name"] in volumes]


def is_under(path: str, directory: str) -> bool:
    return Path(path).is_relative_to(directory)


@pytest.mark.parametrize("path", sorted(CLUSTER.rglob("*.yaml")), ids=lambda p: p.relative_to(CLUSTER).as_posix())
def test_every_cluster_yaml_parses(path):
    docs = documents(path)
    assert docs and all(isinstance(doc, dict) for doc in docs)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_config_loads(path):
    cfg = load_config(path)
    assert cfg.capture.layers and cfg.out


# --- cluster launcher -----------------------------------------------------------------------------

def launcher_config() -> dict:
    """The launcher YAML as `ray up` sees it: merged with the provider's defaults, then validated."""
    prepared = prepare_config(copy.deepcopy(yaml.safe_load(LAUNCHER.read_text())))
    validate_config(prepared)
    return prepared


def test_launcher_yaml_validates_against_rays_schema():
    config = launcher_config()
    assert config["provider"]["type"] == "aws"
    assert config["head_node_type"] in config["available_node_types"]


def test_launcher_schema_check_rejects_a_misspelt_field():
    raw = yaml.safe_load(LAUNCHER.read_text())
    raw["setup_command"] = raw.pop("setup_commands")
    with pytest.raises(jsonschema.ValidationError, match="setup_command"):
        validate_config(prepare_config(raw))


def test_launcher_installs_nothing_at_run_time():
    """Ray's AWS defaults pip-install Ray and boto3 on every node unless the YAML overrides them."""
    config = launcher_config()
    commands = [c for key in ("setup_commands", "head_setup_commands", "worker_setup_commands", "initialization_commands")
                for c in config.get(key, [])]
    commands += [c for node in config["available_node_types"].values() for c in node.get("worker_setup_commands", [])]
    assert not [c for c in commands if re.search(r"\b(pip|uv|conda|apt|apt-get)\b", c)]


def test_launcher_gpu_workers_fit_the_full_config_and_share_its_storage():
    config = launcher_config()
    cfg = load_config(ROOT / "configs" / "supergpqa_full.toml")
    gpus = sum(node["min_workers"] * node["resources"].get("GPU", 0)
               for name, node in config["available_node_types"].items() if name != config["head_node_type"])
    assert gpus >= cfg.capture.num_actors * cfg.capture.gpus_per_actor
    assert gpus >= len(cfg.capture.layers) * cfg.train.gpus_per_layer
    volumes = [opt.split()[1].split(":")[1] for opt in config["docker"]["run_options"] if opt.startswith("--volume")]
    assert any(is_under(cfg.out, v) for v in volumes), f"{cfg.out} is not on a volume every container mounts"
    assert any(is_under(cfg.rollout.questions, v) for v in volumes)
    assert "--gpus all" in config["docker"]["worker_run_options"]  # the head has no GPU, so not in run_options
    assert "--gpus all" not in config["docker"]["run_options"]


# --- KubeRay ----------------------------------------------------------------------------------------

def test_kuberay_manifests_have_the_expected_kinds():
    cluster = by_kind(RAYCLUSTER)
    job = by_kind(RAYJOB)
    assert set(cluster) == {"PersistentVolumeClaim", "RayCluster"}
    assert set(job) == {"PersistentVolumeClaim", "RayJob"}
    assert cluster["RayCluster"]["apiVersion"] == job["RayJob"]["apiVersion"] == "ray.io/v1"
    assert cluster["PersistentVolumeClaim"]["apiVersion"] == "v1"
    assert cluster["PersistentVolumeClaim"] == job["PersistentVolumeClaim"]
    assert "ReadWriteMany" in cluster["PersistentVolumeClaim"]["spec"]["accessModes"]


def test_rayjob_runs_on_the_raycluster_spec():
    assert by_kind(RAYJOB)["RayJob"]["spec"]["rayClusterSpec"] == by_kind(RAYCLUSTER)["RayCluster"]["spec"]


def test_kuberay_ray_version_is_the_images():
    spec = by_kind(RAYCLUSTER)["RayCluster"]["spec"]
    assert spec["rayVersion"] == dockerfile_pin("ray")
    images = {c["image"] for pod in pod_specs(spec) for c in pod["containers"]}
    launcher = yaml.safe_load(LAUNCHER.read_text())
    assert images == {launcher["docker"]["image"]}


def test_rayjob_entrypoint_names_a_config_that_loads():
    cfg = job_config(by_kind(RAYJOB)["RayJob"]["spec"]["entrypoint"])
    assert cfg.capture.gpus_per_actor >= 1 and cfg.train.gpus_per_layer >= 1


def test_kuberay_gpu_workers_fit_the_jobs_config():
    kinds = by_kind(RAYJOB)
    spec = kinds["RayJob"]["spec"]["rayClusterSpec"]
    cfg = job_config(kinds["RayJob"]["spec"]["entrypoint"])
    gpus = 0
    for group in spec["workerGroupSpecs"]:
        container = group["template"]["spec"]["containers"][0]
        limit = int(container["resources"]["limits"]["nvidia.com/gpu"])
        assert int(container["resources"]["requests"]["nvidia.com/gpu"]) == limit
        gpus += limit * group["minReplicas"]
    assert gpus >= cfg.capture.num_actors * cfg.capture.gpus_per_actor
    assert gpus >= len(cfg.capture.layers) * cfg.train.gpus_per_layer
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {})


def test_every_kuberay_pod_mounts_the_run_directory():
    """Capture replicas on different nodes write one activation store; trainers and the driver read it."""
    kinds = by_kind(RAYJOB)
    claim = kinds["PersistentVolumeClaim"]["metadata"]["name"]
    cfg = job_config(kinds["RayJob"]["spec"]["entrypoint"])
    for pod in pod_specs(kinds["RayJob"]["spec"]["rayClusterSpec"]):
        mounts = shared_mounts(pod, claim)
        assert any(is_under(cfg.out, m) for m in mounts), f"{cfg.out} is not on {claim} in every pod"
        assert any(is_under(cfg.rollout.questions, m) for m in mounts)


# --- runtime_env ------------------------------------------------------------------------------------

def runtime_env_file() -> dict:
    return yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())


def test_runtime_env_is_accepted_by_ray():
    env = runtime_env_file()
    assert set(env) <= RuntimeEnv.known_fields, "RuntimeEnv takes unknown keys as plugins: check the spelling"
    parsed = RuntimeEnv(**env)
    assert parsed["env_vars"] == env["env_vars"]
    assert {".venv/", ".git/", "runs/"} <= set(parsed["excludes"])


def test_rayjob_runtime_env_is_the_files_with_the_images_repository():
    job_env = yaml.safe_load(by_kind(RAYJOB)["RayJob"]["spec"]["runtimeEnvYAML"])
    workdir = re.search(r"^WORKDIR\s+(\S+)", GPU_DOCKERFILE.read_text(), re.MULTILINE).group(1)
    assert job_env.pop("working_dir") == workdir
    assert job_env == runtime_env_file()
    # The image's WORKDIR holds this repository; validate with the checkout standing in for it.
    assert RuntimeEnv(working_dir=str(ROOT), **job_env)["working_dir"] == str(ROOT)
