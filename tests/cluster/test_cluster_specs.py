"""The specs in cluster/ are valid for the tools that read them, consistent with the code, and private.

Checked without a cloud account or a Kubernetes cluster: the launcher YAML against the JSON schema shipped
inside the installed ``ray`` package (and the same local checks ``ray up`` runs first), the KubeRay manifests
for the fields KubeRay requires, the Serve configs against Ray Serve's schema, every module, import path and
config file they name against this checkout, and the container image against the installed Ray version.
"""

from __future__ import annotations

import copy
import importlib
import importlib.resources
import importlib.util
import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml

from pipelines.train.config import ModelSection, load_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
LAUNCHER = CLUSTER / "launcher-aws-a100.yaml"
KUBERAY = CLUSTER / "kuberay"
SERVE_CONFIG = CLUSTER / "serve.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"

MANIFESTS = sorted(KUBERAY.glob("*.yaml"))
NAMESPACE = "vglaw"
SHARED_CLAIM = "vglaw-shared"
SHARED_MOUNT = "/mnt/shared"
DASHBOARD_PORT = 8265
SERVE_IMPORT_PATH = "pipelines.serve:build_app"
# Overrides whose values are paths on the cluster's shared volume, absent on a development machine.
CLUSTER_ONLY_PATHS = {"model.pretrained_vit", "model.pretrained_bert"}
PUBLIC_CIDRS = {"0.0.0.0/0", "::/0"}


def _ray_major_minor() -> str:
    return ".".join(ray.__version__.split(".")[:2])


def _launcher() -> dict[str, Any]:
    return yaml.safe_load(LAUNCHER.read_text())


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _all_documents() -> list[dict[str, Any]]:
    return [doc for path in MANIFESTS for doc in _documents(path)]


def _ray_resources() -> list[dict[str, Any]]:
    return [doc for doc in _all_documents() if doc["apiVersion"].startswith("ray.io/")]


def _of_kind(kind: str) -> list[dict[str, Any]]:
    found = [doc for doc in _ray_resources() if doc["kind"] == kind]
    assert found, f"no {kind} in {KUBERAY}"
    return found


def _cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    """The RayCluster spec of a RayCluster, RayJob or RayService."""
    spec = doc["spec"]
    return {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"), "RayService": spec.get("rayClusterConfig")}[
        doc["kind"]
    ]


def _groups(cluster: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name, group spec) for the head group and every worker group."""
    return [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])]


def _pod_specs(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every pod spec in a manifest: Ray groups and plain workloads (Deployment, Job, ...)."""
    if doc["apiVersion"].startswith("ray.io/"):
        for _, group in _groups(_cluster_spec(doc)):
            yield group["template"]["spec"]
    elif "template" in doc.get("spec", {}):
        yield doc["spec"]["template"]["spec"]


def _containers(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for pod in _pod_specs(doc):
        yield from pod["containers"]


def _import_target(import_path: str) -> Any:
    module, _, attribute = import_path.partition(":")
    assert module and attribute, f"import path {import_path!r} is not of the form module:attribute"
    return getattr(importlib.import_module(module), attribute)


def _serve_config_of_rayservice() -> dict[str, Any]:
    (service,) = _of_kind("RayService")
    return yaml.safe_load(service["spec"]["serveConfigV2"])


def _check_serve_config(config: dict[str, Any]) -> None:
    """Ray Serve's schema, plus unknown keys, which the schema lets through silently."""
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import DeploymentSchema, RayActorOptionsSchema, ServeApplicationSchema, ServeDeploySchema

    ServeDeploySchema.model_validate(config)
    for app in config["applications"]:
        assert set(app) <= set(ServeApplicationSchema.model_fields), app.keys()
        for deployment in app.get("deployments", []):
            assert set(deployment) <= set(DeploymentSchema.model_fields), deployment.keys()
            assert set(deployment.get("autoscaling_config", {})) <= set(AutoscalingConfig.model_fields)
            assert set(deployment.get("ray_actor_options", {})) <= set(RayActorOptionsSchema.model_fields)


def _commands(config: dict[str, Any]) -> list[str]:
    keys = [k for k in config if k.endswith("_commands")]
    commands = [c for k in keys for c in config[k]]
    for node_type in config["available_node_types"].values():
        commands += [c for k in node_type if k.endswith("_commands") for c in node_type[k]]
    return commands


def _modules_named(command: str) -> set[str]:
    """Modules a shell command runs (``python -m X``) or imports (``python -c "import a, b"``)."""
    modules = set(re.findall(r"python\s+-m\s+([\w.]+)", command))
    for statement in re.findall(r"\bimport\s+([\w.]+(?:\s*,\s*[\w.]+)*)", command):
        modules |= {name.strip() for name in statement.split(",")}
    return modules


# --------------------------------------------------------------------------------------------------
# Cluster launcher
# --------------------------------------------------------------------------------------------------


def test_launcher_validates_against_the_schema_shipped_with_ray() -> None:
    schema = json.loads((importlib.resources.files("ray.autoscaler") / "ray-schema.json").read_text())
    jsonschema.validate(_launcher(), schema)


def test_launcher_passes_the_local_checks_of_ray_up() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(_launcher()))
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_launcher_has_a_cpu_head_and_autoscaled_a100_workers() -> None:
    config = _launcher()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and not head["node_config"]["InstanceType"].startswith("p")
    a100 = [t for t in types.values() if t["node_config"]["InstanceType"] == "p4d.24xlarge"]
    assert len(a100) == 1
    (gpu,) = a100
    assert gpu["resources"]["GPU"] == 8
    assert 0 <= gpu["min_workers"] <= gpu["max_workers"] <= config["max_workers"]


def test_launcher_keeps_the_dashboard_private_and_requires_the_token() -> None:
    config = _launcher()
    for rule in config["provider"].get("security_group", {}).get("IpPermissions", []):
        public = {r.get("CidrIp") for r in rule.get("IpRanges", [])} | {
            r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])
        }
        ports = range(rule.get("FromPort", 0), rule.get("ToPort", 65535) + 1)
        assert not (public & PUBLIC_CIDRS and DASHBOARD_PORT in ports), rule
    (start,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=127.0.0.1" in start
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]


def test_launcher_starts_ray_only_with_the_serve_token() -> None:
    config = _launcher()
    commands = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    starts = [c for c in commands if "ray start" in c]
    assert len(starts) == 2
    for command in starts:
        assert re.search(r"VGLAW_SERVE_TOKEN=\$\(cat [^)]+\) && export VGLAW_SERVE_TOKEN &&", command), command


def test_launcher_commands_name_modules_that_exist() -> None:
    modules = set().union(*map(_modules_named, _commands(_launcher())))
    assert "jobs.train" in modules
    missing = [m for m in sorted(modules) if importlib.util.find_spec(m) is None]
    assert not missing, missing


def test_launcher_container_is_the_images_base() -> None:
    assert _launcher()["docker"]["image"] == _dockerfile_base()


# --------------------------------------------------------------------------------------------------
# KubeRay
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_parses_with_kind_and_name(path: Path) -> None:
    docs = _documents(path)
    assert docs
    for doc in docs:
        assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"]
        if doc["kind"] in ("RayCluster", "RayJob", "RayService"):
            assert doc["apiVersion"] == "ray.io/v1"
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == NAMESPACE


def test_the_three_ray_resources_exist() -> None:
    assert {doc["kind"] for doc in _ray_resources()} == {"RayCluster", "RayJob", "RayService"}
    assert {"Namespace", "PersistentVolumeClaim"} <= {doc["kind"] for doc in _all_documents()}


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob", "RayService"])
def test_ray_cluster_spec_has_a_head_and_a100_workers(kind: str) -> None:
    for doc in _of_kind(kind):
        cluster = _cluster_spec(doc)
        assert cluster is not None, f"{kind} {doc['metadata']['name']} has no cluster spec"
        assert cluster["rayVersion"].rsplit(".", 1)[0] == _ray_major_minor()
        assert cluster["authOptions"]["mode"] == "token"
        assert cluster["workerGroupSpecs"]
        for name, group in _groups(cluster):
            params = group["rayStartParams"]
            assert isinstance(params, dict) and all(isinstance(v, str) for v in params.values()), name
            containers = group["template"]["spec"]["containers"]
            assert containers and all(c["name"] and c["image"] for c in containers), name
        head_limits = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert "nvidia.com/gpu" not in head_limits
        gpu_groups = [
            group
            for _, group in _groups(cluster)[1:]
            if int(group["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) > 0
        ]
        assert gpu_groups, f"{kind} has no GPU worker group"
        for group in gpu_groups:
            pod = group["template"]["spec"]
            assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


# What one GPU's training ingest needs: decoding a 448 px canvas, its mask and both token rows cost 1.3 ms and, on a
# slower day of the same 2-core machine, 3.2 ms per image on one core (docs/benchmarks.md, "Training ingest"); a GPU
# taking 1,000 images/s then keeps 1.3-3.2 cores busy (with data.image_decode=device, the JPEG part moves to the GPU).
INGEST_CORES_PER_GPU = 4


def test_gpu_nodes_leave_cores_for_the_training_ingest() -> None:
    run = load_config(REPO / "configs/paper.yaml").run
    nodes = [
        (name, spec["resources"]["CPU"], spec["resources"]["GPU"])
        for name, spec in _launcher()["available_node_types"].items()
        if spec["resources"].get("GPU")
    ]
    for doc in _ray_resources():
        for name, group in _groups(_cluster_spec(doc))[1:]:
            limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
            if int(limits.get("nvidia.com/gpu", 0)):
                nodes.append((f"{doc['kind']}/{name}", int(limits["cpu"]), int(limits["nvidia.com/gpu"])))
    assert len(nodes) >= 4
    for name, cpus, gpus in nodes:
        free = cpus - gpus * run.cpus_per_worker  # one training worker per GPU
        assert free >= gpus * INGEST_CORES_PER_GPU, f"{name}: {free} CPUs left for the ingest of {gpus} GPUs"


def test_every_ray_pod_mounts_the_shared_volume() -> None:
    claims = {d["metadata"]["name"] for d in _all_documents() if d["kind"] == "PersistentVolumeClaim"}
    assert SHARED_CLAIM in claims
    for doc in _ray_resources():
        for pod in _pod_specs(doc):
            volumes = {v["name"]: v for v in pod["volumes"]}
            mounts = {m["mountPath"]: m["name"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
            assert volumes[mounts[SHARED_MOUNT]]["persistentVolumeClaim"]["claimName"] == SHARED_CLAIM


def test_one_image_everywhere() -> None:
    images = {c["image"] for doc in _all_documents() for c in _containers(doc)}
    assert len(images) == 1, images


def test_mlflow_uri_names_the_tracking_service() -> None:
    services = {
        f"http://{d['metadata']['name']}.{d['metadata']['namespace']}.svc.cluster.local:{p['port']}"
        for d in _all_documents()
        if d["kind"] == "Service"
        for p in d["spec"]["ports"]
    }
    uris = {
        env["value"]
        for doc in _all_documents()
        for c in _containers(doc)
        for env in c.get("env", [])
        if env["name"] == "MLFLOW_TRACKING_URI"
    }
    (job,) = _of_kind("RayJob")
    uris.add(yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]["MLFLOW_TRACKING_URI"])
    assert uris and uris <= services, (uris, services)


def test_rayjob_runs_the_training_entry_point_with_a_shipped_config() -> None:
    (job,) = _of_kind("RayJob")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.train"]
    assert importlib.util.find_spec(argv[2]) is not None
    config_path = argv[argv.index("--config") + 1]
    assert (REPO / config_path).is_file() and Path(config_path).parent == Path("configs")
    overrides = argv[argv.index("--config") + 2 :]
    cluster_only = [o for o in overrides if o.split("=", 1)[0] in CLUSTER_ONLY_PATHS]
    assert {o.split(".", 1)[1].split("=", 1)[0] for o in cluster_only} <= set(ModelSection.__dataclass_fields__)
    config = load_config(REPO / config_path, [o for o in overrides if o not in cluster_only])
    assert config.run.use_gpu and Path(config.run.storage_path).is_relative_to(SHARED_MOUNT)
    assert Path(config.data.path).is_relative_to(SHARED_MOUNT)
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == _dockerfile_workdir()


def test_rayservice_serves_the_application_on_gpu_replicas() -> None:
    from pipelines.serve.app import INGRESS_DEPLOYMENT, MODEL_DEPLOYMENT

    config = _serve_config_of_rayservice()
    _check_serve_config(config)
    (app,) = config["applications"]
    assert app["import_path"] == SERVE_IMPORT_PATH and app["args"]["model"]
    deployments = {d["name"]: d for d in app["deployments"]}
    assert set(deployments) == {MODEL_DEPLOYMENT, INGRESS_DEPLOYMENT}, "names must be the application's"
    assert deployments[MODEL_DEPLOYMENT]["ray_actor_options"]["num_gpus"] == 1
    for deployment in deployments.values():
        scaling = deployment["autoscaling_config"]
        assert 0 < scaling["min_replicas"] <= scaling["max_replicas"]


def test_rayservice_deploys_what_serve_yaml_describes() -> None:
    serve_yaml = yaml.safe_load(SERVE_CONFIG.read_text())
    rayservice = _serve_config_of_rayservice()
    for key in ("applications", "http_options", "proxy_location"):
        assert rayservice.get(key) == serve_yaml.get(key), f"{key}: copy cluster/serve.yaml into serveConfigV2"


def test_serve_yaml_uses_the_settings_defaults_for_load() -> None:
    """Autoscaling, queue limits and deadlines: the values ServeSettings documents, not a second set of numbers."""
    from pipelines.serve.app import INGRESS_DEPLOYMENT, MODEL_DEPLOYMENT
    from pipelines.serve.settings import ServeSettings

    defaults = ServeSettings(model="m")
    config = yaml.safe_load(SERVE_CONFIG.read_text())
    # The proxy's deadline is the bound of last resort, after the ingress's JSON 504.
    assert config["http_options"]["request_timeout_s"] == defaults.proxy_request_timeout_s() == 65
    (app,) = config["applications"]
    settings = ServeSettings.model_validate(app["args"])
    for name in ("request_timeout_s", "body_timeout_s", "max_header_bytes", "retry_after_s"):
        assert getattr(settings, name) == getattr(defaults, name), name
    deployments = {d["name"]: d for d in app["deployments"]}
    model, ingress = deployments[MODEL_DEPLOYMENT], deployments[INGRESS_DEPLOYMENT]
    scaling = model["autoscaling_config"]
    for name in ("target_ongoing_requests", "upscale_delay_s", "downscale_delay_s", "look_back_period_s"):
        assert scaling[name] == getattr(defaults, name), name
    assert model["max_queued_requests"] == defaults.max_queued_requests
    assert ingress["max_queued_requests"] == defaults.ingress_max_queued_requests
    assert model["max_ongoing_requests"] == defaults.max_ongoing_requests


def test_serve_token_comes_from_a_secret() -> None:
    (service,) = _of_kind("RayService")
    for container in _containers(service):
        (token,) = [env for env in container["env"] if env["name"] == "VGLAW_SERVE_TOKEN"]
        assert token["valueFrom"]["secretKeyRef"]["name"] and "value" not in token
    assert "auth_token" not in yaml.safe_dump(_serve_config_of_rayservice())


def test_no_token_is_written_into_a_manifest() -> None:
    for doc in _all_documents():
        assert doc["kind"] != "Secret", "Secrets are created with kubectl, never committed"
        for container in _containers(doc):
            literal = [env["name"] for env in container.get("env", []) if "TOKEN" in env["name"] and "value" in env]
            assert not literal, literal


def test_no_manifest_exposes_the_dashboard_outside_the_cluster() -> None:
    for doc in _all_documents():
        if doc["kind"] == "Service":
            exposed = doc["spec"].get("type", "ClusterIP") in ("LoadBalancer", "NodePort")
            ports = {p["port"] for p in doc["spec"]["ports"]} | {p.get("targetPort") for p in doc["spec"]["ports"]}
            assert not (exposed and ({DASHBOARD_PORT, "dashboard"} & ports)), doc["metadata"]["name"]
        if doc["kind"] == "Ingress":
            assert str(DASHBOARD_PORT) not in json.dumps(doc) and "head-svc" not in json.dumps(doc)
        if doc["apiVersion"].startswith("ray.io/"):
            assert _cluster_spec(doc)["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
            assert doc["spec"].get("serveService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP"


# --------------------------------------------------------------------------------------------------
# Serve configs: every import path resolves to the application builder
# --------------------------------------------------------------------------------------------------


SERVE_CONFIGS = {
    "rayservice.yaml": _serve_config_of_rayservice,
    "serve.yaml": lambda: yaml.safe_load(SERVE_CONFIG.read_text()),
}


@pytest.mark.parametrize("name", sorted(SERVE_CONFIGS))
def test_serve_import_paths_resolve_to_a_callable(name: str) -> None:
    config = SERVE_CONFIGS[name]()
    _check_serve_config(config)
    for app in config["applications"]:
        builder = _import_target(app["import_path"])
        assert callable(builder), app["import_path"]
        # The builder checks its args (unknown keys, types) without starting Ray or loading the model.
        if app["import_path"] == SERVE_IMPORT_PATH:
            builder(dict(app.get("args", {})))


# --------------------------------------------------------------------------------------------------
# Container image
# --------------------------------------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def _dockerfile_base() -> str:
    (base,) = [arg for instruction, arg in _dockerfile_instructions() if instruction == "FROM"]
    return base.split()[0]


def _dockerfile_workdir() -> str:
    return [arg for instruction, arg in _dockerfile_instructions() if instruction == "WORKDIR"][-1]


def test_image_base_is_ray_gpu_at_the_installed_version() -> None:
    repository, _, tag = _dockerfile_base().partition(":")
    assert repository == "rayproject/ray"
    version, *variants = tag.split("-")
    assert version.rsplit(".", 1)[0] == _ray_major_minor(), (tag, ray.__version__)
    assert "gpu" in variants or any(v.startswith("cu") for v in variants)


def test_image_runs_as_a_non_root_user() -> None:
    users = [arg for instruction, arg in _dockerfile_instructions() if instruction == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")


def test_image_copies_what_it_installs() -> None:
    copied = {arg.split()[-2] for instruction, arg in _dockerfile_instructions() if instruction == "COPY"}
    for package in ("vglaw", "pipelines", "jobs", "configs"):
        assert package in copied, package
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".venv", "data", "runs", "mlflow.db"} <= ignored
