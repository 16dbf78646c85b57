"""Nothing at parse time: importing a DAG file connects to nothing, spawns nothing, writes nothing.

Each DAG file is imported in a fresh Python process (the test environment as given, so the
same ``AIRFLOW_*`` settings and connections a dag-processor would see, except that
``PYTHONDONTWRITEBYTECODE`` is dropped: the interpreter writes its bytecode cache, as a
dag-processor does by default and as on a fresh machine), the way Airflow does it:
``plugins/`` and ``dags/`` on ``sys.path``, the file loaded with
``importlib.util.spec_from_file_location``. Before the import the probe warms ``airflow.sdk``
(including the names it exports lazily, e.g. the cron timetables) and ``almanac_airflow``:
what those cost is Airflow's, not the DAG file's. Then, while the DAG file itself is being
imported (and re-imported for the warm timing), an audit hook (``sys.addaudithook``) records

* network: ``socket.connect`` and name look-ups (``socket.getaddrinfo``/``gethostbyname``...),
* processes: ``subprocess.Popen``, ``os.system``, ``os.exec*``, ``os.spawn*``, ``os.posix_spawn``,
  ``os.fork``,
* files opened for writing: ``open``/``os.open``/``io.FileIO`` with a write mode or write flags,
  by path or by file descriptor (``os.fdopen``, ``open(fd, "w")``; an fd is resolved to its path
  through ``/proc/self/fd`` where there is one). The interpreter's own bytecode cache is told
  apart by *who* writes, not by where: a write is the cache only when it is made directly by
  importlib's ``_write_atomic`` (``SourceFileLoader.set_data``) and its target is a ``.pyc`` in a
  ``__pycache__`` folder (or under ``sys.pycache_prefix``). Those are listed apart
  (``bytecode_cache``) and are not problems; a DAG file writing into ``__pycache__`` itself is
  still caught,

and the probe records ``sys.modules`` before and after, plus every absolute ``import``
statement executed (so a module-level ``import psycopg2`` is caught even though Airflow's
metadata engine already loaded psycopg2 before the DAG file ran).

The warm parse time of each file is printed (``-s``); it is never asserted on (project rule:
tests never assert on timings). ``benchmarks/dag_parse.py`` has the fuller figures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DAGS_DIR = ROOT / "dags"
PLUGINS_DIR = ROOT / "plugins"

#: Modules a DAG file must not import at parse time (import them inside the task instead).
HEAVY_MODULES = (
    "psycopg",
    "psycopg2",
    "redis",
    "requests",
    "googleapiclient",
    "icalendar",
    "recurring_ical_events",
    "airflow.providers.postgres.hooks",
    "airflow.providers.redis.hooks",
)

WARM_REPEATS = 5
PROBE_TIMEOUT_S = 180

# Runs in the child process: argv = dags_dir plugins_dir dag_file heavy_json warm_repeats.
PROBE = r'''
import builtins, importlib.util, json, os, statistics, sys, time

dags_dir, plugins_dir, dag_file, heavy_json, repeats = sys.argv[1:6]
HEAVY = tuple(json.loads(heavy_json))
NET = {"socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex",
       "socket.gethostbyaddr", "socket.sendto", "socket.sendmsg"}
PROC = {"subprocess.Popen", "os.system", "os.posix_spawn", "os.fork", "os.forkpty", "os.startfile"}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
#: importlib's bytecode writer: SourceFileLoader.set_data -> _write_atomic (os.open, then FileIO(fd)).
IMPORTLIB_FILES = ("<frozen importlib._bootstrap_external>",
                   os.path.join("importlib", "_bootstrap_external.py"))
recording = False
in_hook = False
network, processes, writes, bytecode_cache, imported = [], [], [], [], set()

def describe(args):
    return repr(args)[:300]

def fd_path(fd):
    """The path behind an open file descriptor, or None where the OS does not say."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None

def is_pyc_in_cache_dir(name):
    folder, base = os.path.split(name)
    in_cache = os.path.basename(folder) == "__pycache__" or bool(
        sys.pycache_prefix and name.startswith(sys.pycache_prefix + os.sep))
    # _write_atomic writes "<name>.pyc.<id>" and renames it onto "<name>.pyc".
    return in_cache and (base.endswith(".pyc") or ".pyc." in base)

def is_bytecode_cache(frame, name):
    """True when the interpreter itself writes a bytecode cache file.

    ``frame`` is the Python frame that raised the event: it must be importlib's own
    ``_write_atomic``, not a DAG file (or a library it calls) that happens to write a .pyc.
    ``name`` is the target (None: an fd the OS would not resolve; the frame decides alone).
    """
    code = frame.f_code if frame is not None else None
    if code is None or code.co_name != "_write_atomic":
        return False
    if not (code.co_filename == IMPORTLIB_FILES[0] or code.co_filename.endswith(IMPORTLIB_FILES[1])):
        return False
    return name is None or is_pyc_in_cache_dir(name)

def record_open(frame, path, mode, flags):
    if isinstance(mode, str):
        writing = any(c in mode for c in "wax+")
    else:
        writing = bool((flags or 0) & WRITE_FLAGS)
    if not writing:
        return
    if isinstance(path, int):
        name = fd_path(path)
        shown = f"fd {path} ({name or 'path unknown'})"
    else:
        name = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else str(path)
        shown = repr(name)
    entry = f"open {shown} mode={mode!r} flags={flags!r}"
    (bytecode_cache if is_bytecode_cache(frame, name) else writes).append(entry)

def hook(event, args):
    global in_hook
    if not recording or in_hook:
        return
    in_hook = True  # what the hook itself does (readlink...) is not the DAG file's
    try:
        if event in NET:
            network.append(f"{event} {describe(args)}")
        elif event in PROC or event.startswith(("os.exec", "os.spawn")):
            processes.append(f"{event} {describe(args)}")
        elif event == "open":
            record_open(sys._getframe(1), *args)
    finally:
        in_hook = False

sys.addaudithook(hook)

# As Airflow: plugins/ (settings.prepare_syspath_for_config_and_plugins) and the bundle
# folder dags/ (BundleDagBag) are appended to sys.path.
for folder in (plugins_dir, dags_dir):
    if folder not in sys.path:
        sys.path.append(folder)

import airflow.sdk
for name in getattr(airflow.sdk, "__all__", ()):
    try:
        getattr(airflow.sdk, name)
    except Exception:
        pass
import almanac_airflow

real_import = builtins.__import__

def spy_import(name, globals=None, locals=None, fromlist=(), level=0):
    if recording and level == 0 and name:
        imported.add(name)
        for attr in fromlist or ():
            if attr != "*":
                imported.add(f"{name}.{attr}")
    return real_import(name, globals, locals, fromlist, level)

builtins.__import__ = spy_import

mod_name = "almanac_parse_probe_" + os.path.splitext(os.path.basename(dag_file))[0]

def import_dag_file():
    sys.modules.pop(mod_name, None)
    spec = importlib.util.spec_from_file_location(mod_name, dag_file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    start = time.perf_counter()
    spec.loader.exec_module(module)
    return time.perf_counter() - start

def heavy(names):
    """The HEAVY entries ``names`` hit (a package and its submodules count once)."""
    return sorted({h for n in names for h in HEAVY if n == h or n.startswith(h + ".")})

before = set(sys.modules)
error = None
cold = None
warm = []
recording = True
try:
    cold = import_dag_file()
    for _ in range(int(repeats)):
        warm.append(import_dag_file())
except BaseException as exc:
    import traceback
    error = "".join(traceback.format_exception(exc))
finally:
    recording = False
new_modules = set(sys.modules) - before - {mod_name}
result = {
    "error": error,
    "network": network,
    "processes": processes,
    "writes": writes,
    "bytecode_cache": bytecode_cache,
    "dont_write_bytecode": sys.dont_write_bytecode,
    "heavy_modules_loaded": heavy(new_modules),
    "heavy_imports_executed": heavy(imported),
    "heavy_in_baseline": heavy(before),
    "new_module_count": len(new_modules),
    "cold_ms": None if cold is None else cold * 1000,
    "warm_ms": statistics.median(warm) * 1000 if warm else None,
}
print("PARSE-PROBE " + json.dumps(result))
'''


def probe_dag_file(
    dag_file: Path,
    *,
    dags_dir: Path = DAGS_DIR,
    plugins_dir: Path = PLUGINS_DIR,
    repeats: int = WARM_REPEATS,
    write_bytecode: bool = True,
) -> dict:
    """Import ``dag_file`` in a fresh process under the audit hook; return what it recorded.

    ``write_bytecode``: the child writes its bytecode cache (the default, whatever
    ``PYTHONDONTWRITEBYTECODE`` says here), or not (``PYTHONDONTWRITEBYTECODE=1``).
    """
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if not write_bytecode:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    proc = subprocess.run(
        [
            sys.executable,
            "-P",  # no cwd on sys.path: only what Airflow itself would put there
            "-c",
            PROBE,
            str(dags_dir),
            str(plugins_dir),
            str(dag_file),
            json.dumps(HEAVY_MODULES),
            str(repeats),
        ],
        env=env,
        cwd=str(dag_file.parent),
        capture_output=True,
        text=True,
        timeout=PROBE_TIMEOUT_S,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("PARSE-PROBE ")]
    assert proc.returncode == 0 and lines, (
        f"probe for {dag_file.name} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
        f"stderr:\n{proc.stderr[-3000:]}"
    )
    return json.loads(lines[-1].removeprefix("PARSE-PROBE "))


def parse_time_problems(result: dict) -> list[str]:
    """What a probe result says was done at parse time (empty: nothing)."""
    problems = []
    if result["error"]:
        problems.append(f"import failed:\n{result['error']}")
    problems += [f"network at parse time: {e}" for e in result["network"]]
    problems += [f"process spawned at parse time: {e}" for e in result["processes"]]
    problems += [f"file written at parse time: {e}" for e in result["writes"]]
    problems += [f"heavy module loaded at parse time: {m}" for m in result["heavy_modules_loaded"]]
    loaded = set(result["heavy_modules_loaded"])
    problems += [
        f"heavy module imported at parse time: {m}"
        for m in result["heavy_imports_executed"]
        if m not in loaded
    ]
    return problems


DAG_FILES = sorted(p for p in DAGS_DIR.glob("*.py") if not p.name.startswith("_"))


@pytest.mark.parametrize("dag_file", DAG_FILES, ids=[p.stem for p in DAG_FILES])
def test_importing_dag_file_does_no_io_and_no_heavy_imports(dag_file):
    result = probe_dag_file(dag_file)
    cold, warm = result["cold_ms"], result["warm_ms"]
    print(
        f"\n[parse] {dag_file.name}: warm {warm:.1f} ms (median of {WARM_REPEATS}), "
        f"first import {cold:.1f} ms, {result['new_module_count']} modules newly imported"
        if cold is not None and warm is not None
        else f"\n[parse] {dag_file.name}: import failed"
    )
    problems = parse_time_problems(result)
    assert not problems, f"{dag_file.name}:\n" + "\n".join(problems)


# --------------------------------------------------------------------------- the probe can fail

DAG_TAIL = """
import pendulum
from airflow.sdk import dag, task


@dag(schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False)
def bad_parse_dag():
    @task
    def work() -> int:
        return 1

    work()


bad_parse_dag()
"""

BAD_MODULE_LEVEL_CODE = {
    "socket": (
        "import socket\n"
        "_s = socket.socket()\n"
        "_s.settimeout(1)\n"
        "_s.connect_ex(('127.0.0.1', 9))  # refused or not: the attempt is what counts\n"
        "_s.close()\n",
        "network at parse time: socket.connect",
    ),
    "subprocess": (
        "import subprocess\nsubprocess.run(['true'], check=False)\n",
        "process spawned at parse time: subprocess.Popen",
    ),
    # Every write lands in the DAG file's own folder (tmp_path).
    "file_write": (
        "import os\n"
        "with open(os.path.join(os.path.dirname(__file__), 'written.txt'), 'w') as _f:\n"
        "    _f.write('x')\n",
        "file written at parse time: open '",
    ),
    "file_write_os_open": (
        "import os\n"
        "_fd = os.open(os.path.join(os.path.dirname(__file__), 'written.txt'), os.O_WRONLY | os.O_CREAT)\n"
        "os.write(_fd, b'x')\n"
        "os.close(_fd)\n",
        "file written at parse time: open '",
    ),
    # mkstemp's os.open and then os.fdopen's FileIO(fd, "w"): the fd is resolved to its path.
    "file_write_through_fd": (
        "import os, tempfile\n"
        "_fd, _path = tempfile.mkstemp(dir=os.path.dirname(__file__))\n"
        "with os.fdopen(_fd, 'w') as _f:\n"
        "    _f.write('x')\n",
        "file written at parse time: open fd ",
    ),
    # Exactly what importlib does for a bytecode cache, but by the DAG file: still a write.
    "file_write_like_the_bytecode_cache": (
        "import os\n"
        "_dir = os.path.join(os.path.dirname(__file__), '__pycache__')\n"
        "os.makedirs(_dir, exist_ok=True)\n"
        "_fd = os.open(os.path.join(_dir, 'fake.cpython-311.pyc.1'), os.O_CREAT | os.O_WRONLY)\n"
        "with open(_fd, 'wb') as _f:\n"
        "    _f.write(b'x')\n",
        "file written at parse time: open '",
    ),
    "heavy_import": ("import redis\n", "heavy module loaded at parse time: redis"),
    # psycopg2 is already loaded by Airflow's metadata engine: caught by the import spy.
    "heavy_import_already_loaded": (
        "import psycopg2\n",
        "heavy module imported at parse time: psycopg2",
    ),
    "hook_at_module_level": (
        "from airflow.providers.postgres.hooks.postgres import PostgresHook\n",
        "airflow.providers.postgres.hooks",
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD_MODULE_LEVEL_CODE))
def test_probe_catches_parse_time_side_effect(tmp_path, kind):
    code, expected = BAD_MODULE_LEVEL_CODE[kind]
    dag_file = tmp_path / f"bad_{kind}.py"
    dag_file.write_text(code + DAG_TAIL)
    result = probe_dag_file(dag_file, dags_dir=tmp_path, repeats=1)
    assert result["error"] is None, result["error"]  # caught for the side effect, not a crash
    problems = parse_time_problems(result)
    assert any(expected in p for p in problems), f"{expected!r} not reported; got: {problems}"


@pytest.mark.parametrize("write_bytecode", [True, False], ids=["bytecode_on", "bytecode_off"])
def test_probe_passes_a_dag_file_that_does_nothing_at_parse_time(tmp_path, write_bytecode):
    """Regression: on a fresh machine (PYTHONDONTWRITEBYTECODE unset) the interpreter's own
    ``__pycache__/*.pyc`` write (os.open, then FileIO on the fd) was reported as the DAG's."""
    dag_file = tmp_path / "quiet.py"
    dag_file.write_text(DAG_TAIL)
    result = probe_dag_file(dag_file, dags_dir=tmp_path, repeats=1, write_bytecode=write_bytecode)
    assert parse_time_problems(result) == []
    assert result["dont_write_bytecode"] is not write_bytecode
    if write_bytecode:  # the cache was really written, and recognised as the interpreter's
        assert any("__pycache__" in entry for entry in result["bytecode_cache"]), result
        assert list((tmp_path / "__pycache__").glob("quiet.*.pyc"))
    else:
        assert result["bytecode_cache"] == []
