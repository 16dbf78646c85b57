"""Benchmark: how long each DAG file takes to parse, and the whole folder through ``DagBag``.

    eval "$(./dev env --profile test)"   # the AIRFLOW_* settings a dag-processor would see
    ./.venv/bin/python benchmarks/dag_parse.py [--repeats 20] [--dags DIR]

Per DAG file, in a fresh process with ``plugins/`` and the DAG folder on ``sys.path`` (as
Airflow has them) and ``airflow.sdk`` already imported (its lazily exported names resolved
too), so Airflow's own start-up is left out:

* cold: the first import of the file (``importlib.util.spec_from_file_location``), which pays
  for every ``almanac``/``almanac_airflow`` module and Airflow helper the file pulls in;
* warm: the median (with min and max) of ``--repeats`` re-imports, the module removed from
  ``sys.modules`` before each — what a dag-processor pays on each re-parse once those
  modules are loaded.

Then, in another fresh process (``airflow.sdk`` warm as above): Airflow's ``DagBag`` over the
whole folder, first (cold) and again with a new ``DagBag`` (warm), which adds the DAG
validation and cluster-policy work to the imports. Importing ``airflow.dag_processing.dagbag``
is timed on its own line and left out: it already loads much of what the DAG files' first
imports pay for (Asset support, providers' asset handlers), so the cold DagBag figure is
lower than the sum of the per-file cold figures.

Target: < 50 ms per file warm. Figures only: nothing here asserts on them, and the exit
status is 0 unless a probe itself failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_WARM_MS = 50.0

# Shared start of both probes: sys.path as Airflow sets it, airflow.sdk warm.
_WARM_UP = r"""
import importlib.util, json, os, statistics, sys, time
dags_dir, plugins_dir = sys.argv[1], sys.argv[2]
for folder in (plugins_dir, dags_dir):
    if folder not in sys.path:
        sys.path.append(folder)
import airflow.sdk
for _name in getattr(airflow.sdk, "__all__", ()):
    try:
        getattr(airflow.sdk, _name)
    except Exception:
        pass
"""

# argv: dags_dir plugins_dir dag_file repeats
_FILE_PROBE = (
    _WARM_UP
    + r"""
dag_file, repeats = sys.argv[3], int(sys.argv[4])
mod_name = "almanac_parse_bench_" + os.path.splitext(os.path.basename(dag_file))[0]

def import_once():
    sys.modules.pop(mod_name, None)
    spec = importlib.util.spec_from_file_location(mod_name, dag_file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    start = time.perf_counter()
    spec.loader.exec_module(module)
    return (time.perf_counter() - start) * 1000

before = len(sys.modules)
cold = import_once()
new_modules = len(sys.modules) - before - 1
warm = [import_once() for _ in range(repeats)]
print("BENCH " + json.dumps({
    "cold_ms": cold, "warm_median_ms": statistics.median(warm), "warm_min_ms": min(warm),
    "warm_max_ms": max(warm), "new_modules": new_modules,
}))
"""
)

# argv: dags_dir plugins_dir
_DAGBAG_PROBE = (
    _WARM_UP
    + r"""
start = time.perf_counter()
from airflow.dag_processing.dagbag import DagBag
import_ms = (time.perf_counter() - start) * 1000

start = time.perf_counter()
cold_bag = DagBag(dag_folder=dags_dir)
cold = (time.perf_counter() - start) * 1000
start = time.perf_counter()
warm_bag = DagBag(dag_folder=dags_dir)
warm = (time.perf_counter() - start) * 1000
print("BENCH " + json.dumps({
    "import_ms": import_ms, "cold_ms": cold, "warm_ms": warm, "dags": len(warm_bag.dags),
    "tasks": sum(len(d.tasks) for d in warm_bag.dags.values()),
    "import_errors": sorted(set(cold_bag.import_errors) | set(warm_bag.import_errors)),
    "files": len(warm_bag.dagbag_stats),
}))
"""
)


def _run_probe(code: str, *args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-P", "-c", code, *args],  # -P: no cwd on sys.path, as under Airflow
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCH ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"probe {args} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("BENCH "))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--dags", type=Path, default=ROOT / "dags", help="DAG folder (default: dags/)")
    parser.add_argument("--plugins", type=Path, default=ROOT / "plugins", help="plugins folder")
    parser.add_argument("--repeats", type=int, default=20, help="warm re-imports per file (default 20)")
    args = parser.parse_args(argv)
    dags_dir, plugins_dir = args.dags.resolve(), args.plugins.resolve()
    if "AIRFLOW_HOME" not in os.environ:
        print('note: AIRFLOW_HOME is not set; run inside eval "$(./dev env --profile test)"', file=sys.stderr)

    files = sorted(p for p in dags_dir.glob("*.py") if not p.name.startswith("_"))
    print(f"DAG parse times: {len(files)} file(s) in {dags_dir}")
    print(
        f"python {sys.version.split()[0]}; airflow.sdk imported before timing; warm = median of "
        f"{args.repeats} re-imports"
    )
    print(f"Target: < {TARGET_WARM_MS:.0f} ms per file warm\n")
    header = f"{'file':<32} {'cold ms':>9} {'warm ms':>9} {'min':>7} {'max':>7} {'modules':>8}  target"
    print(header)
    print("-" * len(header))
    failed = 0
    over = 0
    for path in files:
        try:
            r = _run_probe(_FILE_PROBE, str(dags_dir), str(plugins_dir), str(path), str(args.repeats))
        except RuntimeError as exc:
            failed += 1
            print(f"{path.name:<32} probe failed: {str(exc).splitlines()[-1] if str(exc) else exc}")
            continue
        ok = r["warm_median_ms"] < TARGET_WARM_MS
        over += not ok
        print(
            f"{path.name:<32} {r['cold_ms']:>9.1f} {r['warm_median_ms']:>9.2f} {r['warm_min_ms']:>7.2f} "
            f"{r['warm_max_ms']:>7.2f} {r['new_modules']:>8}  {'ok' if ok else 'OVER'}"
        )
    print()
    print(
        f"{len(files) - failed - over} of {len(files)} file(s) within the {TARGET_WARM_MS:.0f} ms warm target"
        + (f"; {over} over" if over else "")
        + (f"; {failed} probe(s) failed" if failed else "")
    )
    print("cold = first import in a fresh process (pays for the almanac/almanac_airflow modules it pulls in)")

    try:
        bag = _run_probe(_DAGBAG_PROBE, str(dags_dir), str(plugins_dir))
    except RuntimeError as exc:
        print(f"\nDagBag: probe failed\n{exc}")
        return 1
    print(
        f"\nDagBag over the whole folder "
        f"({bag['files']} file(s), {bag['dags']} DAG(s), {bag['tasks']} task(s)):"
    )
    print(
        f"  import of dagbag      {bag['import_ms']:>9.1f} ms "
        "(airflow.dag_processing.dagbag; not counted below)"
    )
    print(f"  first DagBag (cold)   {bag['cold_ms']:>9.1f} ms")
    print(f"  second DagBag (warm)  {bag['warm_ms']:>9.1f} ms")
    if bag["import_errors"]:
        print(f"  import errors in: {', '.join(bag['import_errors'])}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
