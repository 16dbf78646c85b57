"""The domain package must import and run without Airflow (STYLE: include/ has no airflow imports)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import almanac


def test_no_domain_module_imports_airflow():
    modules = [m.name for m in pkgutil.walk_packages(almanac.__path__, "almanac.")]
    assert "almanac.invitations.cleanup" in modules
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m == 'airflow' or m.startswith('airflow.'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
