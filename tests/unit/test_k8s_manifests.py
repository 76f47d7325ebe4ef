"""Static checks of the Kubernetes deployment (deploy/kustomization.yaml and deploy/k8s/).

No cluster is needed. The kustomization is rendered with ``kubectl kustomize`` (kustomize is built
into kubectl, installed on this project's machines) exactly as ``kubectl apply -k deploy`` would
render it, and every object is validated: the Kubernetes kinds against the API's own schemas
(the ``kubernetes-validate`` package, strict: an unknown field is an error), KEDA's against the
openAPIV3Schema of KEDA's CRDs (tests/unit/data/keda, taken unchanged from KEDA v2.20.2), made
strict the same way. Then the properties the deployment relies on are checked one by one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from ser_cli.cli import build_parser
from ser_shared.contracts import QUEUE_CPU, QUEUE_GPU
from ser_shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent.parent
DEPLOY = ROOT / "deploy"
NGINX_TEMPLATE = DEPLOY / "nginx" / "ser.conf.template"
COMPOSE_FILE = ROOT / "docker-compose.yml"
KEDA_CRDS = Path(__file__).resolve().parent / "data" / "keda"

# The oldest Kubernetes minor these manifests promise to work on, and the newest the validator knows.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
SECRET_NAME = "ser-secrets"
CONFIG_NAME = "ser-config"
# Settings the app refuses to start in production without, all secret-bearing (URLs carry passwords).
REQUIRED_SECRET_ENV = ("SER_DATABASE_URL", "SER_BROKER_URL", "SER_SECRET_KEY")
# Names that must never have a literal value in a manifest.
SECRET_WORDS = ("SECRET", "PASSWORD", "TOKEN", "KEY", "DATABASE_URL", "BROKER_URL", "REDIS")
# Object-store settings added by the S3 work (issue 16, part 1) and not yet fields of Settings here.
WORKERS = {"ser-worker": QUEUE_CPU, "ser-worker-gpu": QUEUE_GPU}


# --------------------------------------------------------------------------- rendering


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    # A failure, not a skip: a missing renderer must not pass the manifests unchecked.
    assert kubectl is not None, "kubectl (for `kubectl kustomize`) is not installed: install kubectl to run these tests"
    out = subprocess.run([kubectl, "kustomize", str(DEPLOY)], check=True, capture_output=True,
                         text=True, timeout=120).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    assert docs, "the kustomization rendered nothing"
    return docs


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    hits = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected one {kind}/{name}, found {len(hits)}"
    return hits[0]


def pod_specs(objects: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for o in objects:
        if o["kind"] in ("Deployment", "Job"):
            yield f'{o["kind"]}/{o["metadata"]["name"]}', o["spec"]["template"]["spec"]


def containers(objects: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for where, spec in pod_specs(objects):
        for c in spec.get("initContainers", []) + spec["containers"]:
            yield f'{where}/{c["name"]}', c


def container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    hits = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    assert len(hits) == 1, f'{deployment["metadata"]["name"]} has no container {name}'
    return hits[0]


def env_of(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env", [])}


# --------------------------------------------------------------------------- schemas


def _strict(schema: Any) -> Any:
    """An OpenAPI object schema with properties but no rule for others gets
    ``additionalProperties: false`` (what kubeconform's and kubernetes-validate's strict modes do
    to the API's schemas), so a misspelt field fails instead of being ignored."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def keda_validators() -> dict[str, jsonschema.protocols.Validator]:
    validators = {}
    for path in sorted(KEDA_CRDS.glob("keda.sh_*.yaml")):
        crd = yaml.safe_load(path.read_text(encoding="utf-8"))
        (version,) = [v for v in crd["spec"]["versions"] if v["storage"]]
        schema = _strict(version["schema"]["openAPIV3Schema"])
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
        cls.check_schema(schema)
        key = f'{crd["spec"]["group"]}/{version["name"]}/{crd["spec"]["names"]["kind"]}'
        validators[key] = cls(schema)
    assert set(validators) == {"keda.sh/v1alpha1/ScaledObject", "keda.sh/v1alpha1/TriggerAuthentication"}
    return validators


def validate(obj: dict[str, Any], keda: dict[str, jsonschema.protocols.Validator]) -> None:
    if obj["apiVersion"].startswith("keda.sh/"):
        keda[f'{obj["apiVersion"]}/{obj["kind"]}'].validate(obj)
    else:
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)


def test_every_object_validates_against_its_schema(objects, keda_validators) -> None:
    kinds = sorted({(o["apiVersion"], o["kind"]) for o in objects})
    assert kinds == [
        ("apps/v1", "Deployment"), ("batch/v1", "Job"), ("keda.sh/v1alpha1", "ScaledObject"),
        ("keda.sh/v1alpha1", "TriggerAuthentication"), ("networking.k8s.io/v1", "NetworkPolicy"),
        ("policy/v1", "PodDisruptionBudget"), ("v1", "ConfigMap"), ("v1", "Service"),
    ]
    for obj in objects:
        validate(obj, keda_validators)


def test_the_validators_refuse_a_misspelt_field(objects, keda_validators) -> None:
    # The schema checks above can fail: a field Kubernetes or KEDA does not know is refused.
    web = find(objects, "Deployment", "ser-web")
    broken = {**web, "spec": {**web["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken, keda_validators)
    scaled = find(objects, "ScaledObject", "ser-worker")
    broken = {**scaled, "spec": {**scaled["spec"], "minReplicas": 0}}
    with pytest.raises(jsonschema.ValidationError):
        validate(broken, keda_validators)
    trigger = {**scaled["spec"]["triggers"][0], "metadata": {"listName": "cpu", "listLength": 4}}
    broken = {**scaled, "spec": {**scaled["spec"], "triggers": [trigger]}}
    with pytest.raises(jsonschema.ValidationError):  # trigger metadata values are strings
        validate(broken, keda_validators)


# --------------------------------------------------------------------------- the web tier


def test_web_runs_gunicorn_behind_the_shared_nginx_template(objects) -> None:
    web = find(objects, "Deployment", "ser-web")
    app, proxy = container(web, "web"), container(web, "proxy")
    assert app["command"][:2] == ["ser", "web"]
    assert env_of(app)["SER_TRUSTED_PROXIES"]["value"] == "1"  # exactly one proxy in front

    compose = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert proxy["image"] == compose["services"]["proxy"]["image"]
    proxy_env = env_of(proxy)
    assert proxy_env["NGINX_ENVSUBST_FILTER"]["value"] == "^SER_"
    port = {p["name"]: p["containerPort"] for p in proxy["ports"]}["http"]
    assert proxy_env["SER_PROXY_LISTEN"]["value"] == str(port)
    app_port = app["command"][app["command"].index("--port") + 1]
    assert proxy_env["SER_PROXY_UPSTREAM"]["value"] == f"127.0.0.1:{app_port}"

    # The template nginx renders is deploy/nginx/ser.conf.template itself, byte for byte.
    (mount,) = [m for m in proxy["volumeMounts"] if m["mountPath"] == "/etc/nginx/templates"]
    (volume,) = [v for v in web["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    config = find(objects, "ConfigMap", volume["configMap"]["name"])
    assert config["data"] == {"default.conf.template": NGINX_TEMPLATE.read_text(encoding="utf-8")}


def test_the_service_and_other_pods_reach_nginx_only(objects) -> None:
    web = find(objects, "Deployment", "ser-web")
    labels = web["spec"]["template"]["metadata"]["labels"]
    service = find(objects, "Service", "ser-web")
    assert service["spec"]["selector"].items() <= labels.items()
    proxy_ports = {p["name"]: p["containerPort"] for p in container(web, "proxy")["ports"]}
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
    assert "http" in proxy_ports
    policy = find(objects, "NetworkPolicy", "ser-web")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]] == [proxy_ports["http"]]


def test_web_probes_use_healthz_and_readyz(objects) -> None:
    app = container(find(objects, "Deployment", "ser-web"), "web")
    assert app["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert app["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_migrate_job_runs_the_migrations(objects) -> None:
    job = find(objects, "Job", "ser-migrate")
    spec = job["spec"]["template"]["spec"]
    assert spec["restartPolicy"] in ("OnFailure", "Never")
    (c,) = spec["containers"]
    assert c["command"] == ["ser", "migrate"]
    assert c["image"].split(":")[0] == container(find(objects, "Deployment", "ser-web"), "web")["image"].split(":")[0]


def test_container_commands_are_real_ser_commands(objects) -> None:
    parser = build_parser()
    for where, c in containers(objects):
        if c.get("command", [""])[0] == "ser":
            parser.parse_args(c["command"][1:])  # SystemExit (a failure) on an unknown option
        else:
            assert c["image"].startswith("nginx:"), f"{where}: what does it run?"


# --------------------------------------------------------------------------- workers and KEDA


@pytest.mark.parametrize("name", sorted(WORKERS))
def test_each_worker_consumes_its_queue_and_scales_on_it_to_zero(objects, name: str) -> None:
    queue = WORKERS[name]
    deployment = find(objects, "Deployment", name)
    (worker,) = deployment["spec"]["template"]["spec"]["containers"]
    command = worker["command"]
    assert command[:2] == ["ser", "worker"]
    assert command[command.index("--queues") + 1] == queue
    # KEDA owns the replica count: a fixed one here would be reset by every `kubectl apply`.
    assert "replicas" not in deployment["spec"]

    scaled = find(objects, "ScaledObject", name)
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == name
    assert spec.get("scaleTargetRef", {}).get("kind", "Deployment") == "Deployment"
    assert spec["minReplicaCount"] == 0
    assert spec["maxReplicaCount"] >= 1
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "redis"
    # Celery's Redis transport keeps each queue as the Redis list named after it.
    assert trigger["metadata"]["listName"] == queue
    assert trigger["metadata"]["activationListLength"] == "0"
    assert int(trigger["metadata"]["listLength"]) >= 1
    assert trigger["metadata"]["databaseIndex"].isdigit()
    # Where Redis is, and its password, only by reference to the Secret.
    assert not {"address", "addresses", "host", "hosts", "password"} & set(trigger["metadata"])
    auth = find(objects, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    refs = {r["parameter"]: r for r in auth["spec"]["secretTargetRef"]}
    assert set(refs) == {"address", "password"}
    assert {r["name"] for r in refs.values()} == {SECRET_NAME}


def test_gpu_worker_gets_one_gpu_and_gpu_nodes(objects) -> None:
    deployment = find(objects, "Deployment", "ser-worker-gpu")
    spec = deployment["spec"]["template"]["spec"]
    (worker,) = spec["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["command"][worker["command"].index("--pool") + 1] == "solo"
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in spec["tolerations"])
    assert spec["nodeSelector"]
    cpu = find(objects, "Deployment", "ser-worker")["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in cpu["resources"].get("limits", {})


def test_worker_liveness_is_the_heartbeat_check(objects) -> None:
    for name in WORKERS:
        (worker,) = find(objects, "Deployment", name)["spec"]["template"]["spec"]["containers"]
        for probe in ("startupProbe", "livenessProbe"):
            assert worker[probe]["exec"]["command"] == ["ser", "worker", "--check"], (name, probe)
        # A check that reads the database can be slow under load: never a hair trigger.
        assert worker["livenessProbe"]["timeoutSeconds"] >= 10
        assert worker["livenessProbe"]["failureThreshold"] >= 3


def _app_settings(objects: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The Settings a worker pod builds from ser-config (the secrets filled with stand-ins)."""
    for name in list(os.environ):
        if name.startswith("SER_"):
            monkeypatch.delenv(name)
    for name, value in find(objects, "ConfigMap", CONFIG_NAME)["data"].items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SER_DATABASE_URL", "postgresql+psycopg://ser:x@db/ser")
    monkeypatch.setenv("SER_BROKER_URL", "redis://redis:6379/0")
    monkeypatch.setenv("SER_SECRET_KEY", "x" * 32)
    return Settings()


def test_workers_stop_gracefully_after_the_hard_time_limit(objects, monkeypatch) -> None:
    settings = _app_settings(objects, monkeypatch)
    assert settings.env == "production" and settings.auth_enabled
    hard = settings.task_time_limit_s
    assert hard >= Settings.model_fields["task_time_limit_s"].default
    for name in WORKERS:
        spec = find(objects, "Deployment", name)["spec"]["template"]["spec"]
        # SIGTERM = Celery's warm shutdown; a running task ends by its hard limit at the latest,
        # and the pod must not be SIGKILLed before that (30 s for the process to exit after).
        assert spec["terminationGracePeriodSeconds"] >= hard + 30, name
        (worker,) = spec["containers"]
        assert "preStop" not in worker.get("lifecycle", {}), "SIGTERM itself is the graceful stop"


def test_config_names_only_real_settings(objects) -> None:
    config = find(objects, "ConfigMap", CONFIG_NAME)["data"]
    fields = {f"SER_{name.upper()}" for name in Settings.model_fields}
    unknown = {k for k in config if k.startswith("SER_")} - fields
    assert not unknown, f"ser-config sets what no setting reads: {sorted(unknown)}"
    assert config["SER_STORAGE_URL"].startswith("s3://"), "pods share no disk: audio goes to S3"


# --------------------------------------------------------------------------- every pod


def test_every_long_running_container_has_probes(objects) -> None:
    for where, c in containers(objects):
        if where.startswith("Job/"):
            continue
        assert "livenessProbe" in c, f"{where}: no liveness probe"
        if c.get("ports"):
            assert "readinessProbe" in c, f"{where}: serves a port without a readiness probe"


def test_every_container_requests_resources(objects) -> None:
    for where, c in containers(objects):
        resources = c.get("resources", {})
        assert {"cpu", "memory"} <= set(resources.get("requests", {})), f"{where}: no cpu/memory requests"
        assert "memory" in resources.get("limits", {}), f"{where}: no memory limit"


def test_every_image_is_pinned(objects) -> None:
    for where, c in containers(objects):
        image = c["image"]
        name, _, tag = image.rpartition(":")
        assert "@sha256:" in image or (name and "/" not in tag and tag not in ("", "latest")), \
            f"{where}: image {image!r} has no fixed tag"


def test_secrets_are_referenced_never_written(objects) -> None:
    assert not [o for o in objects if o["kind"] == "Secret"], "the Secret is the operator's, not the repo's"
    for key in find(objects, "ConfigMap", CONFIG_NAME)["data"]:
        assert not any(w in key for w in SECRET_WORDS), f"ser-config holds {key}"
    for where, c in containers(objects):
        env = env_of(c)
        for name, entry in env.items():
            if any(w in name for w in SECRET_WORDS):
                assert "value" not in entry, f"{where}: {name} has a literal value"
        for source in c.get("envFrom", []):
            assert "configMapRef" in source or "secretRef" in source
        if c.get("command", [""])[0] == "ser":
            for name in REQUIRED_SECRET_ENV:
                assert env[name]["valueFrom"]["secretKeyRef"]["name"] == SECRET_NAME, (where, name)
            assert {"configMapRef": {"name": CONFIG_NAME}} in c["envFrom"], where


def test_disruption_budgets_cover_every_deployment(objects) -> None:
    budgets = [o for o in objects if o["kind"] == "PodDisruptionBudget"]
    web = next(b for b in budgets if b["metadata"]["name"] == "ser-web")
    assert web["spec"]["minAvailable"] >= 1
    assert find(objects, "Deployment", "ser-web")["spec"]["replicas"] > web["spec"]["minAvailable"]
    for deployment in (o for o in objects if o["kind"] == "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        covering = [b for b in budgets if b["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert len(covering) == 1, f'{deployment["metadata"]["name"]}: {len(covering)} budgets'
