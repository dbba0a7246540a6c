"""infra/: the Ray cluster launcher config, the KubeRay and Prefect manifests, the knet image
and the team MLflow server.

Everything is checked statically (no cloud, no cluster, no network): each file parses and has
what its tool requires, the versions in it match requirements/constraints.txt, references
between files resolve, and no file carries a secret. The MLflow server is also started for
real (marked slow): basic auth answers 401 / 200 and a run logs a metric and an artifact.
"""

from __future__ import annotations

import base64
import configparser
import copy
import functools
import json
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import free_port, venv_env

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
CONSTRAINTS = ROOT / "requirements" / "constraints.txt"
CLUSTER_YAML = INFRA / "ray" / "cluster.yaml"
K8S = INFRA / "k8s"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
MLFLOW_DIR = INFRA / "mlflow"
START_SH = MLFLOW_DIR / "start.sh"
IMAGE_ROOT = "/home/ray/knet"  # where the image (and the launcher's file mount) has the repo
# Files whose Ray version must equal the pin (each names it at least once).
RAY_VERSIONED = [
    CLUSTER_YAML,
    DOCKERFILE,
    K8S / "raycluster.yaml",
    K8S / "rayjob.yaml",
    K8S / "prefect-worker.yaml",
]
MANIFESTS = sorted(K8S.glob("*.yaml"))
BIN = Path(sys.executable).parent


def infra_files() -> list[Path]:
    files = [p for p in INFRA.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    return sorted(files) + [ROOT / ".dockerignore"]


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


# ------------------------------------------------------------------------------------------
# helpers: pins, versions, secrets


def canonical(name: str) -> str:
    """PEP 503 name: Flask_WTF, flask-wtf and Flask.WTF are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_constraints(path: Path = CONSTRAINTS) -> dict[str, str]:
    """``name==version`` lines of a pip constraints file as {canonical name: version}."""
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*==\s*([^\s;]+)", line)
        if match:
            pins[canonical(match[1])] = match[3]
    return pins


PIN_RE = re.compile(r"(?<![\w.\-/=])([A-Za-z][A-Za-z0-9._-]*)(\[[\w,.-]*\])?==(\d[\w.+!-]*)")


def pinned_packages(text: str) -> list[tuple[str, str]]:
    """Every ``package==1.2.3`` (optionally ``package[extra]==``) in a file's text."""
    return [(canonical(m[1]), m[3].rstrip(".")) for m in PIN_RE.finditer(text)]


def pin_problems(path: Path, pins: dict[str, str]) -> list[str]:
    """Packages pinned in ``path`` to another version than the constraints pin them to."""
    return [
        f"{rel(path)}: {name}=={version}, constraints pin {pins[name]}"
        for name, version in pinned_packages(path.read_text())
        if name in pins and pins[name] != version
    ]


def walk(node: Any, path: str = ""):
    """(dotted path, key, value) of every mapping item of parsed YAML, depth first."""
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{path}.{key}" if path else str(key)
            yield here, key, value
            yield from walk(value, here)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, f"{path}[{i}]")


def mappings(node: Any):
    """Every mapping in parsed YAML (list items included), depth first."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from mappings(value)
    elif isinstance(node, list):
        for value in node:
            yield from mappings(value)


def load_yaml_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def ray_versions(path: Path) -> list[tuple[str, str]]:
    """(where, version) of every Ray version a file states: rayproject/ray image tags, knet
    image tags (``knet:<version>-ray<ray>-...``) and KubeRay ``rayVersion`` fields."""
    text = path.read_text()
    found = [("rayproject/ray tag", v) for v in re.findall(r"rayproject/ray:(\d[\w.]*?)-", text)]
    found += [("knet image tag", v) for v in re.findall(r"knet:[\w.]+-ray(\d[\d.]*\d)", text)]
    if path.suffix == ".yaml":
        for doc in load_yaml_docs(path):
            found += [(where, str(v)) for where, key, v in walk(doc) if key == "rayVersion"]
    return found


def ray_version_problems(path: Path, pin: str) -> list[str]:
    found = ray_versions(path)
    if not found:
        return [f"{rel(path)}: states no Ray version"]
    return [f"{rel(path)}: {where} {v} != ray=={pin}" for where, v in found if v != pin]


SECRET_KEY_RE = re.compile(
    r"(?i)(pass(word|wd)?|secret|token|api[_-]?key|access[_-]?key|private[_-]?key)"
)
REFERENCE_KEY_RE = re.compile(r"(Ref|Name|_NAME|_PATH|Path|_FILE|File|Mode|_MODE)$")
PLACEHOLDER_RE = re.compile(r"^(|CHANGE_ME\S*|<[^>]*>.*|\$.*|\{.*|~?/.*|\.{1,2}/.*|null)$")
ASSIGN_RE = re.compile(
    r"^\s*(?:export\s+|ENV\s+|Environment=|-\s+)?[\"']?(?P<key>[A-Za-z_][\w.-]*)[\"']?"
    r"\s*[=:]\s*(?P<value>.*?)\s*$"
)
ENV_OPTION_RE = re.compile(r"(?:--env|-e)[ =](?P<key>[A-Za-z_]\w*)=(?P<value>\S*)")


def is_secret_key(key: str) -> bool:
    return bool(SECRET_KEY_RE.search(key)) and not REFERENCE_KEY_RE.search(key)


def is_placeholder(value: str) -> bool:
    return bool(PLACEHOLDER_RE.match(value.strip().strip("\"'")))


def is_literal(value: Any) -> bool:
    """A scalar YAML value that is not a placeholder (mappings and lists are references)."""
    return isinstance(value, str | int) and not is_placeholder(str(value))


def secret_findings(path: Path) -> list[str]:
    """Lines / YAML items that give a password, secret, token or key a literal value."""
    findings = []
    text = path.read_text()
    for number, raw in enumerate(text.splitlines(), 1):
        line = re.sub(r"^\s*(#|//|;)+\s?", "", raw)  # comments count too
        candidates = [m.groupdict() for m in ENV_OPTION_RE.finditer(line)]
        if match := ASSIGN_RE.match(line):
            candidates.append(match.groupdict())
        for item in candidates:
            value = re.split(r"\s+#", item["value"], maxsplit=1)[0]
            if is_secret_key(item["key"]) and not is_placeholder(value):
                findings.append(f"{rel(path)}:{number}: {item['key']} has a literal value")
    if path.suffix in (".yaml", ".yml"):
        for doc in load_yaml_docs(path):
            for node in mappings(doc):  # env entries: {name: X_PASSWORD, value: literal}
                name, value = str(node.get("name", "")), node.get("value")
                if is_secret_key(name) and is_literal(value):
                    findings.append(f"{rel(path)}: env {name} has a literal value")
            for where, key, value in walk(doc):
                if is_secret_key(str(key)) and is_literal(value):
                    findings.append(f"{rel(path)}: {where} has a literal value")
    return findings


# ------------------------------------------------------------------------------------------
# versions and pins


def test_read_constraints_has_the_stack_pins():
    pins = read_constraints()
    for name in ("ray", "mlflow", "prefect", "dvc", "torch"):
        assert re.fullmatch(r"\d+(\.\d+)+", pins[name]), (name, pins.get(name))
    assert pins["flask-wtf"] == pins[canonical("Flask-WTF")]


@pytest.mark.parametrize("path", RAY_VERSIONED, ids=rel)
def test_ray_version_matches_the_pin(path):
    assert ray_version_problems(path, read_constraints()["ray"]) == []


def test_version_checks_catch_drift(tmp_path):
    """The helpers report a changed pin and a changed tag (so the tests above can fail)."""
    moved = tmp_path / "constraints.txt"
    moved.write_text(CONSTRAINTS.read_text().replace("\nray==", "\nray==9.9.9\nold-ray=="))
    assert read_constraints(moved)["ray"] == "9.9.9"
    for path in RAY_VERSIONED:
        assert ray_version_problems(path, "9.9.9"), rel(path)
    pin = read_constraints()["ray"]
    for path in RAY_VERSIONED:
        copy_ = tmp_path / path.name
        text = path.read_text()
        copy_.write_text(text.replace(f"ray:{pin}-", "ray:2.0.0-", 1))
        if copy_.read_text() == text:  # no rayproject tag: a knet tag or rayVersion
            copy_.write_text(text.replace(f"-ray{pin}", "-ray2.0.0", 1))
        assert ray_version_problems(copy_, pin), rel(path)
    req = tmp_path / "requirements.txt"
    req.write_text("mlflow[auth]==3.0.0\nboto3==1.0\n")
    assert pin_problems(req, read_constraints()) == [
        f"{req}: mlflow==3.0.0, constraints pin {read_constraints()['mlflow']}"
    ]


@pytest.mark.parametrize("path", infra_files(), ids=rel)
def test_pins_in_infra_files_match_constraints(path):
    assert pin_problems(path, read_constraints()) == []


def test_a_package_is_pinned_alike_in_every_infra_file():
    seen: dict[str, dict[str, str]] = {}
    for path in infra_files():
        for name, version in pinned_packages(path.read_text()):
            seen.setdefault(name, {})[rel(path)] = version
    assert {n: where for n, where in seen.items() if len(set(where.values())) > 1} == {}
    assert "boto3" in seen and "mlflow" in seen  # the scan sees the pins at all


def test_image_tags_name_the_project_version():
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)[1]
    tags = set()
    for path in infra_files():
        tags |= set(re.findall(r"knet-project/knet:([\w.-]+)", path.read_text()))
    assert tags, "no knet image tag in infra/"
    assert {tag.split("-ray")[0] for tag in tags} == {version}, tags


def test_paths_in_the_image_exist_in_the_repo():
    """Every /home/ray/knet/<path> an infra file names is a file of this checkout (a renamed
    config or a moved constraints file breaks the cluster, not a local run)."""
    missing = []
    for path in infra_files():
        for ref in re.findall(rf"{IMAGE_ROOT}/([\w./-]+)", path.read_text()):
            ref = ref.rstrip(".")
            if ref.split("/")[0] in ("data", "outputs", "metrics", "reports"):
                continue  # shared-volume mounts, not repository files
            if not (ROOT / ref).exists():
                missing.append(f"{rel(path)}: {IMAGE_ROOT}/{ref}")
    assert missing == []


# ------------------------------------------------------------------------------------------
# no secrets


@pytest.mark.parametrize("path", infra_files(), ids=rel)
def test_no_secret_values_in_infra_files(path):
    assert secret_findings(path) == []


def test_secret_scan_catches_literal_values(tmp_path):
    leaks = {
        "a.yaml": "env:\n  - name: MLFLOW_TRACKING_PASSWORD\n    value: hunter2hunter2\n",
        "b.yaml": "stringData:\n  password: s3cr3t-value\n",
        "c.yaml": "run_options:\n  - --env AWS_SECRET_ACCESS_KEY=abcd1234\n",
        "d.sh": "export MLFLOW_AUTH_ADMIN_PASSWORD=correct-horse\n",
        "e.ini": "[mlflow]\nadmin_password = letmein123456\n",
        "f.env": "# MLFLOW_FLASK_SERVER_SECRET_KEY=0123456789abcdef\n",
    }
    for name, text in leaks.items():
        (tmp_path / name).write_text(text)
        assert secret_findings(tmp_path / name), name
    fine = tmp_path / "fine.yaml"
    fine.write_text(
        "stringData: {password: CHANGE_ME}\nenv:\n  - name: RAY_AUTH_TOKEN\n"
        "    valueFrom: {secretKeyRef: {name: t, key: auth_token}}\n"
        '  - name: X_PASSWORD\n    value: "${X_PASSWORD}"\n'
    )
    assert secret_findings(fine) == []


# ------------------------------------------------------------------------------------------
# the Ray cluster launcher


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_has_the_launcher_keys(cluster):
    for key in (
        "cluster_name",
        "max_workers",
        "provider",
        "auth",
        "docker",
        "available_node_types",
        "head_node_type",
        "file_mounts",
        "setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    ):
        assert key in cluster, key
    assert cluster["cluster_name"] == "knet"
    assert cluster["provider"]["type"] == "aws"
    assert cluster["provider"]["cache_stopped_nodes"] is False
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] in types
    for name, node_type in types.items():
        assert isinstance(node_type["node_config"], dict) and node_type["node_config"], name
        assert isinstance(node_type["resources"], dict), name
        if name != cluster["head_node_type"]:
            assert 0 <= node_type["min_workers"] <= node_type["max_workers"], name
            assert node_type["max_workers"] <= cluster["max_workers"], name
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu_types, "no worker type with GPU resources"
    assert all(t["max_workers"] >= 1 for t in gpu_types)


def test_cluster_yaml_commands(cluster):
    assert any(
        "pip install" in c and "requirements/constraints.txt" in c and f"-e {IMAGE_ROOT}" in c
        for c in cluster["setup_commands"]
    )
    head = " ; ".join(cluster["head_start_ray_commands"])
    assert "ray start --head" in head and "--port=6379" in head
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "RAY_TRAIN_ENABLE_STATE_TRACKING=1" in head
    worker = " ; ".join(cluster["worker_start_ray_commands"])
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker
    assert cluster["file_mounts"][IMAGE_ROOT] == "."
    # Ray's AWS default would pip-install an unpinned boto3 on the head.
    assert cluster["head_setup_commands"] == []


def test_cluster_yaml_docker_and_environment(cluster):
    docker = cluster["docker"]
    assert docker["container_name"] == "knet" and docker["pull_before_run"] is True
    options = docker["run_options"]
    assert "--ulimit nofile=65536:65536" in options
    assert any(o.startswith("--shm-size=") for o in options)
    env = dict(m.groups() for o in options if (m := re.fullmatch(r"--env (\w+)=(\S+)", o)))
    for name in ("MLFLOW_TRACKING_URI", "KNET_TRACKING_URI", "PREFECT_API_URL"):
        assert env[name].startswith("http"), name
    assert env["KNET_RAY_ADDRESS"] == "auto"
    assert env["KNET_ROOT"] == IMAGE_ROOT
    assert env["RAY_AUTH_MODE"] == "token"
    # With token auth on, every node gets the same token file.
    assert cluster["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    for node_type in cluster["available_node_types"].values():
        assert "Arn" in node_type["node_config"]["IamInstanceProfile"]


def test_cluster_yaml_passes_rays_own_schema(cluster):
    """Ray's launcher fills in its AWS defaults and validates against ray-schema.json."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cluster)))
    broken = copy.deepcopy(cluster)
    head = broken["available_node_types"]["head"]
    head["node_cfg"] = head.pop("node_config")
    with pytest.raises(Exception, match="node_c"):
        validate_config(prepare_config(broken))


# ------------------------------------------------------------------------------------------
# KubeRay and Kubernetes manifests


@pytest.fixture(scope="module")
def objects() -> dict[tuple[str, str], dict[str, Any]]:
    """Every manifest object of infra/k8s by (kind, name)."""
    found = {}
    for path in MANIFESTS:
        for doc in load_yaml_docs(path):
            found[(doc["kind"], doc["metadata"]["name"])] = {**doc, "_file": path.name}
    return found


@pytest.mark.parametrize("path", MANIFESTS, ids=rel)
def test_manifests_parse_and_name_their_objects(path):
    docs = load_yaml_docs(path)
    assert docs
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(doc), path.name
        assert doc["metadata"]["name"]
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "knet", (path.name, doc["kind"])


def containers_of(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    containers = pod_spec["containers"]
    assert containers and all(c.get("name") and c.get("image") for c in containers)
    return containers


def head_container(spec: dict[str, Any]) -> dict[str, Any]:
    return spec["headGroupSpec"]["template"]["spec"]["containers"][0]


def worker_container(group: dict[str, Any]) -> dict[str, Any]:
    return group["template"]["spec"]["containers"][0]


def gpu_limit(container: dict[str, Any]) -> Any:
    return container["resources"]["limits"]["nvidia.com/gpu"]


def check_ray_cluster_spec(spec: dict[str, Any]) -> None:
    """What KubeRay needs of a RayCluster spec (also the rayClusterSpec of a RayJob)."""
    assert spec["rayVersion"] == read_constraints()["ray"]
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    (head_container,) = containers_of(head["template"]["spec"])
    assert head_container["name"] == "ray-head"
    ports = {p["containerPort"] for p in head_container["ports"]}
    assert {6379, 8265, 10001} <= ports
    assert {"cpu", "memory"} <= set(head_container["resources"]["limits"])
    env = {e["name"]: e for e in head_container["env"]}
    assert env["RAY_TRAIN_ENABLE_STATE_TRACKING"]["value"] == "1"
    for key in ("username", "password"):
        ref = env[f"MLFLOW_TRACKING_{key.upper()}"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "knet-mlflow-auth", "key": key}
    assert env["MLFLOW_TRACKING_URI"]["valueFrom"]["configMapKeyRef"]["name"] == "knet-config"
    groups = spec["workerGroupSpecs"]
    assert groups
    for group in groups:
        assert group["groupName"] and isinstance(group["rayStartParams"], dict)
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
        pod = group["template"]["spec"]
        (worker,) = containers_of(pod)
        assert worker["name"] == "ray-worker"
        assert int(gpu_limit(worker)) >= 1
        assert {"cpu", "memory"} <= set(worker["resources"]["limits"])
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
        assert {e["name"] for e in worker["env"]} >= {"MLFLOW_TRACKING_PASSWORD"}


def test_raycluster(objects):
    cluster = objects[("RayCluster", "knet")]
    assert cluster["apiVersion"] == "ray.io/v1"
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    check_ray_cluster_spec(spec)
    (gpu,) = spec["workerGroupSpecs"]
    assert (gpu["groupName"], gpu["replicas"], gpu["minReplicas"], gpu["maxReplicas"]) == (
        "gpu",
        0,
        0,
        8,
    )
    head_env = {e["name"]: e for e in head_container(spec)["env"]}
    assert head_env["RAY_AUTH_MODE"]["value"] == "token"
    autoscaler_env = {e["name"] for e in spec["autoscalerOptions"]["env"]}
    assert {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} <= autoscaler_env


def test_raycluster_mounts_the_shared_volume_everywhere(objects):
    """Head, GPU workers and the Prefect worker see the same knet-shared folders."""
    spec = objects[("RayCluster", "knet")]["spec"]
    pods = [spec["headGroupSpec"]["template"]["spec"]]
    pods += [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    pods.append(objects[("Deployment", "knet-prefect-worker")]["spec"]["template"]["spec"])
    expected = {
        "/mnt/knet": None,
        f"{IMAGE_ROOT}/data": "data",
        f"{IMAGE_ROOT}/outputs": "outputs",
    }
    for pod in pods:
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in pod["volumes"]
            if "persistentVolumeClaim" in v
        }
        mounts = {
            m["mountPath"]: m.get("subPath")
            for m in pod["containers"][0]["volumeMounts"]
            if claims.get(m["name"]) == "knet-shared"
        }
        assert mounts == expected


def test_rayjob(objects):
    job = objects[("RayJob", "knet-train-coco-r50")]
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert "clusterSelector" not in spec
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] == 600
    assert isinstance(spec["activeDeadlineSeconds"], int) and spec["activeDeadlineSeconds"] > 0
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["RAY_TRAIN_ENABLE_STATE_TRACKING"] == "1"
    assert all(isinstance(v, str) for v in runtime_env["env_vars"].values())
    check_ray_cluster_spec(spec["rayClusterSpec"])
    entrypoint = spec["entrypoint"]
    assert entrypoint.startswith("knet train ")
    assert "--address auto" in entrypoint


def test_rayjob_entrypoint_is_a_valid_knet_command(objects):
    """The entrypoint parses with knet's own CLI and its params resolve (keys, values), with
    as many Train workers as the job's GPU pods give."""
    from knet.cli import build_parser, cmd_train
    from knet.config import load_config

    spec = objects[("RayJob", "knet-train-coco-r50")]["spec"]
    argv = shlex.split(spec["entrypoint"])
    args = build_parser().parse_args(argv[1:])
    assert args.func is cmd_train and args.address == "auto" and args.run_name
    assert args.params.startswith(f"{IMAGE_ROOT}/")
    params = ROOT / args.params[len(IMAGE_ROOT) + 1 :]
    assert params.name == "coco-panoptic-r50.yaml" and params.exists()
    cfg = load_config(params, args.overrides)
    groups = spec["rayClusterSpec"]["workerGroupSpecs"]
    gpus = sum(g["replicas"] * int(gpu_limit(worker_container(g))) for g in groups)
    assert cfg.train.use_gpu is True and cfg.train.num_workers == gpus
    assert cfg.tracking.uri.startswith("http")
    cpus = min(float(worker_container(g)["resources"]["limits"]["cpu"]) for g in groups)
    assert cfg.train.cpus_per_worker < cpus
    # The driver's working directory is Ray's choice: every path is absolute.
    for path in (cfg.data.raw, cfg.data.prepared, cfg.train.storage_path, cfg.train.output):
        assert path.startswith("/mnt/knet/"), path


def test_references_between_manifests_resolve(objects):
    """Every ConfigMap / Secret key and PVC a pod uses is defined in infra/k8s."""
    defined: dict[tuple[str, str], set[str]] = {}
    for (kind, name), obj in objects.items():
        if kind in ("ConfigMap", "Secret"):
            defined[(kind, name)] = set(obj.get("data") or {}) | set(obj.get("stringData") or {})
    missing = []
    for obj in objects.values():
        for where, key, value in walk(obj):
            ref = {"configMapKeyRef": "ConfigMap", "secretKeyRef": "Secret"}.get(key)
            if ref and value["key"] not in defined.get((ref, value["name"]), set()):
                missing.append(f"{obj['_file']}: {where} -> {ref} {value}")
            ref = {"configMapRef": "ConfigMap", "secretRef": "Secret"}.get(key)
            if ref and (ref, value["name"]) not in defined:
                missing.append(f"{obj['_file']}: {where} -> {ref} {value['name']}")
            claim = value.get("claimName") if key == "persistentVolumeClaim" else None
            if claim and ("PersistentVolumeClaim", claim) not in objects:
                missing.append(f"{obj['_file']}: {where} -> PVC {claim}")
            if key == "volumeMounts":
                volumes = {v["name"] for v in pod_spec_at(obj, where).get("volumes", [])}
                unknown = [m["name"] for m in value if m["name"] not in volumes]
                missing += [f"{obj['_file']}: {where} -> volume {name}" for name in unknown]
    assert missing == []


def pod_spec_at(obj: dict[str, Any], where: str) -> dict[str, Any]:
    """The pod spec that holds the container at ``where`` (a dotted walk() path)."""
    parts = re.findall(r"[^.\[\]]+|\[\d+\]", where)
    node: Any = obj
    pod = None
    for part in parts:
        node = node[int(part[1:-1])] if part.startswith("[") else node[part]
        if isinstance(node, dict) and "containers" in node:
            pod = node
    assert pod is not None, where
    return pod


def test_secret_templates_hold_placeholders_only(objects):
    secrets_ = [obj for (kind, _), obj in objects.items() if kind == "Secret"]
    assert {s["metadata"]["name"] for s in secrets_} == {
        "knet-mlflow-auth", "knet-ray-token", "knet-prefect-auth"}  # fmt: skip
    for secret in secrets_:
        assert "data" not in secret  # base64 would hide what is in it
        assert set(secret["stringData"].values()) == {"CHANGE_ME"}


def test_configmap_matches_the_cluster_and_the_deployments(objects):
    data = objects[("ConfigMap", "knet-config")]["data"]
    cluster = objects[("RayCluster", "knet")]
    namespace = cluster["metadata"]["namespace"]
    # KubeRay's head service is <cluster name>-head-svc.
    assert data["KNET_RAY_ADDRESS"] == f"knet-head-svc.{namespace}.svc:6379"
    assert data["KNET_ROOT"] == IMAGE_ROOT
    assert re.search(rf"^WORKDIR {IMAGE_ROOT}$", DOCKERFILE.read_text(), re.M)
    assert data["PREFECT_API_URL"].endswith("/api")
    # Every {{ $VAR }} of prefect.yaml is in the environment the worker deploys with.
    templated = set(re.findall(r"\{\{\s*\$(\w+)\s*\}\}", (ROOT / "prefect.yaml").read_text()))
    assert templated and templated <= set(data), templated - set(data)


def test_prefect_worker_polls_the_pool_of_the_deployments(objects):
    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    (pool,) = {d["work_pool"]["name"] for d in deployments}
    worker = objects[("Deployment", "knet-prefect-worker")]
    assert worker["apiVersion"] == "apps/v1"
    (container,) = worker["spec"]["template"]["spec"]["containers"]
    script = " ".join(container.get("command", []) + container.get("args", []))
    script = script.replace("\\\n", " ")  # shell line continuations
    start = re.search(r"prefect worker start ([^\n]*)", script)
    assert start, script
    options = shlex.split(start[1])
    assert options[options.index("--pool") + 1] == pool
    assert options[options.index("--type") + 1] == "process"
    assert "prefect --no-prompt deploy --all" in script
    assert {"configMapRef": {"name": "knet-config"}} in container["envFrom"]
    env = {e["name"]: e for e in container["env"]}
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "knet-ray-token"
    assert env["PREFECT_API_AUTH_STRING"]["valueFrom"]["secretKeyRef"] == {
        "name": "knet-prefect-auth", "key": "auth_string"}  # fmt: skip
    assert container["image"] == head_container(objects[("RayCluster", "knet")]["spec"])["image"]
    # A process pool needs no base job template.
    assert not (K8S / "work-pool.json").exists()


# ------------------------------------------------------------------------------------------
# the image


def test_dockerfile():
    text = DOCKERFILE.read_text()
    pins = read_constraints()
    (base,) = re.findall(r"^FROM (\S+)", text, re.M)
    assert base == f"rayproject/ray:{pins['ray']}-py311-gpu"
    assert 'requires-python = ">=3.11"' in (ROOT / "pyproject.toml").read_text()
    assert "pip install --no-cache-dir -c requirements/constraints.txt -e ." in text
    assert re.search(r"^ENV PYTHONUNBUFFERED=1", text, re.M)
    assert "RAY_AUTH_MODE" not in re.sub(r"#.*", "", text)  # Ray's default, decided at deploy


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_dockerfile_copies_files_that_exist_and_are_in_the_context():
    import fnmatch

    patterns = dockerignore_patterns()
    sources = []
    for line in re.findall(r"^COPY (.+)$", DOCKERFILE.read_text(), re.M):
        words = [w for w in line.split() if not w.startswith("--")]
        sources += words[:-1]
    assert "knet/" in sources and "requirements/" in sources
    for source in sources:
        assert (ROOT / source).exists(), source
        ignored = [p for p in patterns if fnmatch.fnmatch(source.rstrip("/"), p.lstrip("*/"))]
        assert not ignored, (source, ignored)


def test_dockerignore_keeps_run_state_out():
    patterns = set(dockerignore_patterns())
    for entry in (".venv", "mlflow.db", "mlartifacts", "outputs", "data", ".dvc/cache"):
        assert entry in patterns, entry
    for entry in ("reports", "metrics", ".prefect", ".servers", ".git"):
        assert entry in patterns, entry
    assert any("__pycache__" in p for p in patterns)


# ------------------------------------------------------------------------------------------
# the MLflow team server: files


def test_mlflow_requirements_pin_the_projects_mlflow():
    lines = (MLFLOW_DIR / "requirements.txt").read_text().splitlines()
    reqs = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    pins = read_constraints()
    assert f"mlflow[auth]=={pins['mlflow']}" in reqs
    assert {canonical(r.split("==")[0].split("[")[0]) for r in reqs} == {
        "mlflow",
        "psycopg",
        "boto3",
    }
    assert all("==" in r for r in reqs)


# Deprecation warnings of mlflow.server's own imports (SQLAlchemy, starlette.middleware.wsgi).
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:starlette.middleware.wsgi")
def test_basic_auth_ini_is_what_mlflow_reads(monkeypatch):
    from mlflow.server.auth.config import DEFAULT_AUTHORIZATION_FUNCTION, read_auth_config
    from mlflow.server.auth.permissions import get_permission

    path = MLFLOW_DIR / "basic_auth.ini"
    parser = configparser.ConfigParser()
    parser.read(path)
    assert "admin_password" not in parser["mlflow"]
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(path))
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_USERNAME", raising=False)
    config = read_auth_config()
    assert get_permission(config.default_permission).name == "NO_PERMISSIONS"
    assert config.database_uri.startswith("postgresql://")
    assert ":" not in config.database_uri.split("://", 1)[1].split("@")[0]  # no password
    assert config.admin_username == "admin" and config.admin_password is None
    assert config.authorization_function == DEFAULT_AUTHORIZATION_FUNCTION


def systemd_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        else:
            key, _, value = line.partition("=")
            assert current is not None, line
            current.setdefault(key, []).append(value)
    return sections


def test_mlflow_service_unit():
    unit = systemd_unit(MLFLOW_DIR / "mlflow.service")
    service = {k: v[-1] for k, v in unit["Service"].items()}
    assert service["User"] == "mlflow"
    assert service["EnvironmentFile"] == "/etc/knet/mlflow.env"
    assert service["ExecStart"].endswith("/start.sh")
    assert service["Restart"] == "on-failure"
    for key, value in {
        "NoNewPrivileges": "true",
        "ProtectSystem": "strict",
        "ProtectHome": "true",
        "PrivateTmp": "true",
    }.items():
        assert service[key] == value, key
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="no systemd-analyze")
def test_mlflow_service_unit_verifies(tmp_path):
    """systemd's own parser: no unknown key or bad value (with ExecStart at this start.sh)."""
    text = (MLFLOW_DIR / "mlflow.service").read_text()
    unit = tmp_path / "mlflow.service"
    unit.write_text(re.sub(r"^ExecStart=.*$", f"ExecStart={START_SH}", text, flags=re.M))
    done = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout + done.stderr == "", done.stdout + done.stderr


# ------------------------------------------------------------------------------------------
# start.sh without a server


def test_start_sh_is_executable_bash():
    assert START_SH.stat().st_mode & stat.S_IXUSR
    assert START_SH.read_text().startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in START_SH.read_text()
    subprocess.run(["bash", "-n", str(START_SH)], check=True, timeout=30)


def required_env(tmp_path: Path) -> dict[str, str]:
    return {
        "PATH": os.defpath,
        "HOME": str(tmp_path),
        "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path}/mlflow.db",
        "MLFLOW_ARTIFACTS_DESTINATION": str(tmp_path / "artifacts"),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
    }


@pytest.mark.parametrize(
    "missing",
    ["MLFLOW_BACKEND_STORE_URI", "MLFLOW_ARTIFACTS_DESTINATION", "MLFLOW_FLASK_SERVER_SECRET_KEY"],
)
def test_start_sh_refuses_without_a_required_setting(tmp_path, missing):
    env = required_env(tmp_path)
    del env[missing]
    done = subprocess.run(
        ["bash", str(START_SH)], env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode != 0
    assert f"{missing} is not set" in done.stderr and "Refusing to start" in done.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_start_sh_refuses_with_a_scrubbed_environment(tmp_path):
    done = subprocess.run(
        ["bash", str(START_SH)], env={}, capture_output=True, text=True, timeout=30
    )
    assert done.returncode != 0
    assert "MLFLOW_BACKEND_STORE_URI is not set" in done.stderr


FAKE_MLFLOW = """#!/usr/bin/env bash
# Stands in for mlflow: records its arguments, environment and auth config, then waits.
printf '%s\\n' "$@" > "$FAKE_OUT/args"
env > "$FAKE_OUT/env"
cp "$MLFLOW_AUTH_CONFIG_PATH" "$FAKE_OUT/auth.ini"
stat -c %a "$(dirname "$MLFLOW_AUTH_CONFIG_PATH")" "$MLFLOW_AUTH_CONFIG_PATH" > "$FAKE_OUT/mode"
echo "$MLFLOW_AUTH_CONFIG_PATH" > "$FAKE_OUT/path"
if [ "${FAKE_WAIT:-0}" = 1 ]; then
  trap 'echo stopped > "$FAKE_OUT/stopped"; kill "$nap"; exit 0' TERM
  sleep 60 >/dev/null 2>&1 &
  nap=$!
  wait
fi
"""


def run_with_fake_mlflow(tmp_path: Path, **extra: str) -> tuple[subprocess.Popen, Path]:
    out = tmp_path / "fake"
    out.mkdir()
    fake = tmp_path / "mlflow"
    fake.write_text(FAKE_MLFLOW)
    fake.chmod(0o755)
    env = {**required_env(tmp_path), "MLFLOW_BIN": str(fake), "FAKE_OUT": str(out)}
    env["TMPDIR"] = str(tmp_path)
    env.update(extra)
    proc = subprocess.Popen(
        ["bash", str(START_SH)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    return proc, out


def test_start_sh_defaults_and_auth_database_override(tmp_path):
    """Loopback by default; the auth database URI goes into a private copy of basic_auth.ini
    (% escaped for configparser), which is removed when the server ends."""
    uri = f"sqlite:///{tmp_path}/auth%20db.db"
    proc, out = run_with_fake_mlflow(tmp_path, MLFLOW_AUTH_DATABASE_URI=uri)
    stdout, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, stdout
    args = (out / "args").read_text().splitlines()
    assert args[:3] == ["server", "--app-name", "basic-auth"]
    option = dict(zip(args[3::2], args[4::2], strict=True))
    assert option["--host"] == "127.0.0.1" and option["--port"] == "5000"
    assert option["--backend-store-uri"] == f"sqlite:///{tmp_path}/mlflow.db"
    assert "reachable from this machine only" in stdout
    env = dict(line.split("=", 1) for line in (out / "env").read_text().splitlines() if "=" in line)
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    parser = configparser.ConfigParser()  # mlflow's reader, with its % interpolation
    parser.read(out / "auth.ini")
    assert parser["mlflow"]["database_uri"] == uri
    assert parser["mlflow"]["default_permission"] == "NO_PERMISSIONS"
    assert (out / "mode").read_text().split() == ["700", "600"]  # folder, file: private
    assert not Path((out / "path").read_text().strip()).exists()  # cleaned up


def test_start_sh_without_override_uses_the_repo_config_and_says_where_it_binds(tmp_path):
    proc, out = run_with_fake_mlflow(tmp_path, MLFLOW_HOST="0.0.0.0", MLFLOW_PORT="5123")
    stdout, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, stdout
    assert (out / "path").read_text().strip() == str(MLFLOW_DIR / "basic_auth.ini")
    assert "http://0.0.0.0:5123, reachable from the network" in stdout
    args = (out / "args").read_text().splitlines()
    assert args[args.index("--host") + 1] == "0.0.0.0"


def test_start_sh_rejects_a_bad_port(tmp_path):
    proc, _ = run_with_fake_mlflow(tmp_path, MLFLOW_PORT="50x0")
    stdout, _ = proc.communicate(timeout=30)
    assert proc.returncode != 0 and "MLFLOW_PORT must be a port number" in stdout


def test_start_sh_forwards_sigterm_and_cleans_up(tmp_path):
    proc, out = run_with_fake_mlflow(
        tmp_path, MLFLOW_AUTH_DATABASE_URI=f"sqlite:///{tmp_path}/a.db", FAKE_WAIT="1"
    )
    try:
        deadline = time.monotonic() + 30
        while not (out / "path").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        private = Path((out / "path").read_text().strip())
        assert private.exists()
        time.sleep(0.3)  # the fake's trap is set
        proc.send_signal(signal.SIGTERM)  # to start.sh only: it must pass it on
        stdout, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stdout
    assert (out / "stopped").exists()
    assert not private.exists()


# ------------------------------------------------------------------------------------------
# the MLflow team server, for real


def http(url: str, auth: tuple[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def server_env(
    tmp_path: Path, port: int, password: str | None, databases: tuple[str, str] | None = None
) -> dict[str, str]:
    """start.sh's environment; ``databases`` = (runs, users) URIs, else sqlite files."""
    store, users = databases or (
        f"sqlite:///{tmp_path}/mlflow.db",
        f"sqlite:///{tmp_path}/basic_auth.db",
    )
    env = {
        "PATH": f"{BIN}{os.pathsep}{os.defpath}",
        "HOME": str(tmp_path),
        "TMPDIR": str(tmp_path),
        "MLFLOW_BACKEND_STORE_URI": store,
        "MLFLOW_ARTIFACTS_DESTINATION": str(tmp_path / "artifacts"),
        "MLFLOW_AUTH_DATABASE_URI": users,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32),
        "MLFLOW_HOST": "127.0.0.1",
        "MLFLOW_PORT": str(port),
        "MLFLOW_WORKERS": "1",
    }
    if password is not None:
        env["MLFLOW_AUTH_ADMIN_PASSWORD"] = password
    return env


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@pytest.mark.slow
def test_mlflow_server_refuses_a_first_start_without_admin_password(tmp_path):
    log = tmp_path / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            ["bash", str(START_SH)],
            env=server_env(tmp_path, free_port(), None),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            proc.wait(timeout=120)
        finally:
            stop(proc)
    text = log.read_text()
    assert proc.returncode != 0, text
    assert "MLFLOW_AUTH_ADMIN_PASSWORD" in text


@pytest.fixture
def postgres(tmp_path_factory):
    """A PostgreSQL server of the test's own on 127.0.0.1 with databases ``mlflow`` and
    ``mlflow_auth``; yields its base URI. Skipped where PostgreSQL is not installed."""
    tools = {name: shutil.which(name) for name in ("initdb", "postgres", "pg_isready", "createdb")}
    if not all(tools.values()):
        pytest.skip(f"PostgreSQL is not installed here ({tools})")
    as_user: list[str] = []
    if os.geteuid() == 0:  # postgres refuses to run as root: use its own account
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres user to run PostgreSQL as")
        as_user = ["runuser", "-u", "postgres", "--"]
    data = Path(tempfile.mkdtemp(prefix="knet-pg-"))  # short: the unix socket lives here
    if as_user:
        shutil.chown(data, "postgres")
    port = free_port()
    run = functools.partial(subprocess.run, check=True, capture_output=True, timeout=120, cwd=data)
    run([*as_user, tools["initdb"], "-D", str(data), "-U", "postgres", "--auth=trust"])
    server = subprocess.Popen(
        [*as_user, tools["postgres"], "-D", str(data), "-h", "127.0.0.1", "-p", str(port),
         "-k", str(data)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, cwd=data,
    )  # fmt: skip
    try:
        address = ["-h", "127.0.0.1", "-p", str(port), "-U", "postgres"]
        deadline = time.monotonic() + 60
        while subprocess.run([tools["pg_isready"], *address], capture_output=True).returncode:
            assert server.poll() is None and time.monotonic() < deadline, "PostgreSQL did not start"
            time.sleep(0.3)
        for name in ("mlflow", "mlflow_auth"):
            run([tools["createdb"], *address, name])
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        os.killpg(server.pid, signal.SIGINT)  # PostgreSQL's fast shutdown
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        shutil.rmtree(data, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_mlflow_server_with_basic_auth(tmp_path, monkeypatch, request, backend):
    """The team server as infra/mlflow/start.sh starts it: on sqlite, and on PostgreSQL (the
    production backend: runs and the users database both there)."""
    from mlflow.tracking import MlflowClient

    from knet.tracking import check_tracking_uri

    databases = None
    if backend == "postgresql":
        base = request.getfixturevalue("postgres")
        databases = (f"{base}/mlflow", f"{base}/mlflow_auth")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    password = secrets.token_urlsafe(24)
    log = tmp_path / "server.log"
    out = log.open("w")
    proc = subprocess.Popen(
        ["bash", str(START_SH)],
        env=server_env(tmp_path, port, password, databases),
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180  # ~10 s idle; minutes on a loaded 2-core box
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if http(f"{url}/health")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "no /health in 180 s:\n" + log.read_text()
            time.sleep(0.5)
        check_tracking_uri(url)  # knet's pre-flight check works against the auth server

        search = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
        assert http(search)[0] == 401
        assert http(search, ("admin", "wrong-password"))[0] == 401
        status, body = http(search, ("admin", password))
        assert status == 200, body
        assert "experiments" in json.loads(body)

        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        client = MlflowClient(tracking_uri=url)
        experiment = client.create_experiment("infra-test")
        assert client.get_experiment(experiment).artifact_location.startswith("mlflow-artifacts:")
        run = client.create_run(experiment)
        client.log_metric(run.info.run_id, "pq", 42.5, step=1)
        artifact = tmp_path / "hello.txt"
        artifact.write_text("proxied through the server\n")
        client.log_artifact(run.info.run_id, str(artifact))
        client.set_terminated(run.info.run_id)
        history = client.get_metric_history(run.info.run_id, "pq")
        assert [(m.value, m.step) for m in history] == [(42.5, 1)]
        (landed,) = (tmp_path / "artifacts").rglob("hello.txt")
        assert landed.read_text() == "proxied through the server\n"
        assert run.info.run_id in landed.parts
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["hello.txt"]

        # default_permission NO_PERMISSIONS: another signed-in user sees nothing until granted.
        from mlflow.server.auth.client import AuthServiceClient

        auth = AuthServiceClient(url)
        auth.create_user("viewer", "viewer-password-123")
        viewer = ("viewer", "viewer-password-123")
        get_run = f"{url}/api/2.0/mlflow/runs/get?run_id={run.info.run_id}"
        assert http(get_run, viewer)[0] == 403
        assert (
            http(f"{url}/api/2.0/mlflow/experiments/get?experiment_id={experiment}", viewer)[0]
            == 403
        )
        auth.grant_user_permission("viewer", "experiment", experiment, "READ")
        assert http(get_run, viewer)[0] == 200
    finally:
        stop(proc)
        out.close()
    private = re.search(r"auth config:\s+(\S+)", log.read_text())[1]
    assert private != str(MLFLOW_DIR / "basic_auth.ini")
    assert not Path(private).exists()  # the private copy went with the server


@pytest.mark.slow
def test_a_prefect_server_with_the_auth_string_refuses_anonymous_callers(tmp_path):
    """What the k8s worker's PREFECT_API_AUTH_STRING relies on, on a real Prefect server."""
    port = free_port()
    env = {**venv_env(), "PREFECT_HOME": str(tmp_path), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_API_AUTH_STRING": "knet:s3cret-for-this-test"}  # fmt: skip
    env.pop("PREFECT_API_URL", None)
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if http(f"{url}/health", ("knet", "s3cret-for-this-test"))[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "no /health in 180 s:\n" + log.read_text()
            time.sleep(0.5)

        def post(auth: tuple[str, str] | None) -> int:
            request = urllib.request.Request(f"{url}/flows/filter", data=b"{}", method="POST")
            request.add_header("Content-Type", "application/json")
            if auth:
                token = base64.b64encode(":".join(auth).encode()).decode()
                request.add_header("Authorization", f"Basic {token}")
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    return response.status
            except urllib.error.HTTPError as err:
                return err.code

        assert post(None) == 401
        assert post(("knet", "wrong")) == 401
        assert post(("knet", "s3cret-for-this-test")) == 200
        client_env = {
            **env,
            "PREFECT_API_URL": url,
            "PREFECT_API_AUTH_STRING": "knet:s3cret-for-this-test",
        }
        client_env.pop("PREFECT_SERVER_API_AUTH_STRING")
        done = subprocess.run(["prefect", "work-pool", "ls"], env=client_env, capture_output=True,
                              text=True, timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
