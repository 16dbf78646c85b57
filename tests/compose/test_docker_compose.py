"""Checks for docker-compose.yaml and the Dockerfile it builds.

Only ``test_compose_config_is_valid`` needs Docker (the CLI with the compose plugin) and it is
skipped without it. The rest parse the files with PyYAML and run anywhere. PyYAML's safe loader
resolves the ``<<`` merge keys the same way Compose does, so each service is checked as Compose
will see it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO_ROOT / "docker-compose.yaml"
DOCKERFILE = REPO_ROOT / "Dockerfile"

AIRFLOW_SERVICES = (
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-worker",
    "airflow-triggerer",
    "airflow-init",
)
REQUIRED_SERVICES = (*AIRFLOW_SERVICES, "postgres", "redis", "app-db")

# Services that run a command once and exit, so a healthcheck makes no sense: airflow-init
# (migrations, demo data) and airflow-cli (the official file's `docker compose run` helper).
ONE_SHOT_SERVICES = {"airflow-init", "airflow-cli"}

DEPENDS_ON_CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}

# Config options that hold secrets, as AIRFLOW__SECTION__KEY environment variables.
SECRET_ENV_VARS = (
    "AIRFLOW__CORE__FERNET_KEY",
    "AIRFLOW__API_AUTH__JWT_SECRET",
    "AIRFLOW__API__SECRET_KEY",
)
# The whole value is one Compose interpolation: ${VAR}, ${VAR:-default}, ${VAR:?error}, ...
INTERPOLATION = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}$")


@cache
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def services() -> dict[str, dict]:
    return compose()["services"]


def environment(service: dict) -> dict[str, str]:
    """A service's environment as a dict, whichever of Compose's two forms it uses."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return dict(env)


def command_text(service: dict) -> str:
    command = service.get("command", "")
    return "\n".join(command) if isinstance(command, list) else str(command)


def depends_on(service: dict) -> dict[str, dict]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):  # short form: plain service names, condition service_started
        return {name: {"condition": "service_started"} for name in deps}
    return deps


# --- with Docker -------------------------------------------------------------------------------


def _compose_plugin_missing() -> str | None:
    """Why `docker compose` can't be used here, or None if it can."""
    if shutil.which("docker") is None:
        return "the docker CLI is not installed"
    try:
        result = subprocess.run(
            ["docker", "compose", "version"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`docker compose version` failed to run: {exc}"
    if result.returncode != 0:
        output = (result.stderr or result.stdout).strip().splitlines()
        return "the docker compose plugin is not available (`docker compose version`: {})".format(
            output[0] if output else f"exit {result.returncode}"
        )
    return None


def test_compose_config_is_valid():
    if reason := _compose_plugin_missing():
        pytest.skip(reason)
    result = subprocess.run(
        ["docker", "compose", "-f", "docker-compose.yaml", "config", "--quiet"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


# --- without Docker ----------------------------------------------------------------------------


def test_required_services_present():
    missing = [name for name in REQUIRED_SERVICES if name not in services()]
    assert not missing, f"services missing from docker-compose.yaml: {missing}"


def test_airflow_services_use_common_anchor():
    common = compose()["x-airflow-common"]
    common_env = common["environment"]
    for name, service in services().items():
        if not name.startswith("airflow-"):
            continue
        assert service.get("image") == common["image"], name
        assert service.get("volumes") == common["volumes"], name
        assert service.get("user") in (common["user"], "0:0"), name
        missing = sorted(set(common_env) - set(environment(service)))
        assert not missing, f"{name} lacks common environment variables {missing}"


def test_image_is_built_from_dockerfile_with_overridable_tag():
    image = compose()["x-airflow-common"]["image"]
    assert re.fullmatch(r"\$\{AIRFLOW_IMAGE_NAME:-almanac-airflow:3\.3\.2\}", image), image
    # Exactly one service builds the image (several services building one tag at the same time
    # collide on older Compose releases); every service with that image gets it from this build.
    builders = [name for name, service in services().items() if "build" in service]
    assert builders == ["airflow-init"], builders
    assert services()["airflow-init"]["build"] in (".", {"context": "."})


def test_executor_broker_and_metadata_db():
    env = compose()["x-airflow-common"]["environment"]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__CELERY__BROKER_URL"] == "redis://:@redis:6379/0"
    assert urlsplit(env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]).hostname == "postgres"
    result_backend = env["AIRFLOW__CELERY__RESULT_BACKEND"]
    assert result_backend.startswith("db+postgresql://")
    assert urlsplit(result_backend).hostname == "postgres"
    assert env["AIRFLOW__CORE__LOAD_EXAMPLES"] == "false"
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/"
    assert env["AIRFLOW__CORE__AUTH_MANAGER"].endswith("simple_auth_manager.SimpleAuthManager")
    for name in AIRFLOW_SERVICES:
        assert environment(services()[name])["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name


def test_app_db_connection_points_at_app_db_service():
    env = compose()["x-airflow-common"]["environment"]
    url = urlsplit(env["AIRFLOW_CONN_APP_DB"])
    assert url.scheme in ("postgres", "postgresql")
    assert url.hostname == "app-db"
    assert (url.username, url.path) == ("almanac", "/almanac")

    app_db = services()["app-db"]
    assert app_db["image"].startswith("postgres:16")
    assert environment(app_db) == {
        "POSTGRES_USER": "almanac",
        "POSTGRES_PASSWORD": "almanac",
        "POSTGRES_DB": "almanac",
    }
    # A database of its own, not a second name for the metadata DB.
    assert app_db.get("volumes") != services()["postgres"].get("volumes")


def test_redis_connection_points_at_redis_db_1():
    env = compose()["x-airflow-common"]["environment"]
    url = urlsplit(env["AIRFLOW_CONN_REDIS_DEFAULT"])
    assert url.scheme == "redis"
    assert url.hostname == "redis"
    # Airflow turns URI query parameters into the connection's extra, and RedisHook reads the
    # database from extra["db"] only: without ?db=1 it silently uses db 0, the Celery broker's.
    assert parse_qs(url.query).get("db") == ["1"]
    assert url.path in ("", "/", "/1")
    broker_db = urlsplit(env["AIRFLOW__CELERY__BROKER_URL"]).path.strip("/")
    assert broker_db == "0"


def test_every_long_running_service_has_a_healthcheck():
    missing = [
        name
        for name, service in services().items()
        if name not in ONE_SHOT_SERVICES and "healthcheck" not in service
    ]
    assert not missing, f"services without a healthcheck: {missing}"
    assert "healthcheck" not in services()["airflow-init"]


def test_depends_on_references_existing_services():
    all_services = services()
    for name, service in all_services.items():
        for dep, spec in depends_on(service).items():
            assert dep in all_services, f"{name} depends on unknown service {dep!r}"
            condition = spec.get("condition", "service_started")
            assert condition in DEPENDS_ON_CONDITIONS, f"{name} -> {dep}: {condition}"
            target = all_services[dep]
            if condition == "service_healthy":
                assert "healthcheck" in target, f"{name} waits for {dep} to be healthy; it has no healthcheck"
            if condition == "service_completed_successfully":
                # A restarting one-shot service never "completes".
                assert target.get("restart", "no") == "no", f"{dep} must not restart"


def test_init_waits_for_databases_and_runs_migrations_in_order():
    init = services()["airflow-init"]
    deps = depends_on(init)
    for dep in ("postgres", "redis", "app-db"):
        assert deps[dep]["condition"] == "service_healthy", dep
    script = command_text(init)
    steps = ["airflow db migrate", "almanac db migrate", "almanac demo load"]
    positions = [script.find(step) for step in steps]
    assert -1 not in positions, f"init command lacks one of {steps}"
    assert positions == sorted(positions), f"init command runs {steps} out of order"
    # Every Airflow service starts only after airflow-init has finished successfully.
    for name in AIRFLOW_SERVICES:
        if name != "airflow-init":
            assert depends_on(services()[name])["airflow-init"]["condition"] == (
                "service_completed_successfully"
            ), name


def test_api_server_port_and_include_on_pythonpath():
    assert services()["airflow-apiserver"]["ports"] == ["${ALMANAC_API_PORT:-8080}:8080"]
    common = compose()["x-airflow-common"]
    assert common["environment"]["PYTHONPATH"] == "/opt/airflow/include"
    mounts = {volume.split(":")[-1]: volume for volume in common["volumes"]}
    for directory in ("dags", "plugins", "include", "logs", "config"):
        assert f"/opt/airflow/{directory}" in mounts, directory
        assert mounts[f"/opt/airflow/{directory}"].startswith("${AIRFLOW_PROJ_DIR:-.}/" + directory)


def _all_environments():
    yield "x-airflow-common", environment(compose()["x-airflow-common"])
    for name, service in services().items():
        yield name, environment(service)


def test_no_literal_secrets():
    for where, env in _all_environments():
        for key in SECRET_ENV_VARS:
            if key not in env:
                continue
            value = str(env[key] or "")
            match = INTERPOLATION.match(value)
            assert match, f"{where}: {key} must come from ${{...}} interpolation, not a literal"
            # A non-empty default (${VAR:-value}, ${VAR:+value}) is a literal secret in disguise;
            # after ? it is only the error message.
            if match.group("op") and "?" not in match.group("op"):
                assert not match.group("arg"), f"{where}: {key} has a literal default"


def test_jwt_secret_is_never_set_to_empty():
    # Airflow treats an empty AIRFLOW__API_AUTH__JWT_SECRET as set: it overrides the secret that
    # airflow-init generated into the shared airflow.cfg, and each process then makes up its own
    # key, so task tokens from the scheduler fail validation on the API server. If the variable
    # is set at all, it has to be one that can't come out empty (${VAR:?message}).
    for where, env in _all_environments():
        for key in ("AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__API__SECRET_KEY"):
            if key in env:
                assert re.fullmatch(r"\$\{[A-Za-z0-9_]+:\?[^}]*\}", str(env[key] or "")), (
                    f"{where}: {key}={env[key]!r} can resolve to an empty string"
                )


def test_dockerfile_installs_pinned_requirements_and_the_project():
    text = DOCKERFILE.read_text()
    logical_lines = re.sub(r"\\\n", " ", text).splitlines()
    # FROM apache/airflow:3.3.2[-pythonX.Y], directly or through an ARG default.
    base = re.compile(r"apache/airflow:3\.3\.2(?:-python3\.\d+)?$")
    froms = [line.split()[1] for line in logical_lines if line.startswith("FROM ")]
    args = dict(line[4:].split("=", 1) for line in logical_lines if line.startswith("ARG ") and "=" in line)
    resolved = [args.get(f.strip("${}"), f) if f.startswith("$") else f for f in froms]
    assert resolved and all(base.match(image) for image in resolved), resolved
    runs = [line for line in logical_lines if line.startswith("RUN ")]
    requirements_install = [line for line in runs if "pip install" in line and "-r requirements.txt" in line]
    assert requirements_install, "no `pip install -r requirements.txt` in the Dockerfile"
    for line in requirements_install:
        assert "-c constraints.txt" in line, line
        assert "--no-cache-dir" in line, line
    # The project itself: a lone `.` argument (`pip install --no-deps .` or `-e .`).
    assert any(re.search(r"pip install\b.*\s\.(?:\s|$)", line) for line in runs), (
        "the Dockerfile does not install the project itself"
    )
    # pip runs as the airflow user, as the official image requires.
    users = [(i, line.split()[1]) for i, line in enumerate(logical_lines) if line.startswith("USER ")]
    first_pip = next(i for i, line in enumerate(logical_lines) if "pip install" in line)
    assert [user for i, user in users if i < first_pip][-1] == "airflow"
    for source in ("requirements.txt", "constraints.txt", "pyproject.toml", "include/"):
        assert any(line.startswith("COPY ") and source in line for line in logical_lines), source


def test_dockerignore_keeps_build_inputs():
    lines = [
        line.strip()
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    if "*" in lines:  # allow-list style: whatever the Dockerfile copies must be re-included
        for source in ("requirements.txt", "constraints.txt", "pyproject.toml", "include/"):
            assert f"!{source}" in lines, source
    else:
        assert ".venv" in lines or ".venv/" in lines


def test_compose_file_matches_compose_spec_schema():
    """Validate against the Compose specification's JSON schema.

    check-jsonschema (pinned in requirements.txt) ships a copy of the schema, so this runs offline
    everywhere; a missing install fails here rather than skipping.
    """
    import importlib.resources

    import jsonschema

    schema_file = importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(compose()), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)
