"""Objects named by import path, resolved when a task or worker runs (keeps DAG parsing light).

One spelling is accepted in two forms: ``"package.module:name"`` (the entry-point form) and
``"package.module.name"`` (the dotted form Airflow uses for classpaths).
"""

from __future__ import annotations

import importlib
from typing import Any


def import_object(path: str) -> Any:
    """The object ``path`` names. Raises ``ImportError``/``AttributeError`` (or ``ValueError`` for a
    path that names no attribute of a module) like ``import`` would."""
    module, sep, name = path.partition(":")
    if not sep:
        module, _, name = path.rpartition(".")
    if not module or not name:
        raise ValueError(f"not an import path 'package.module:name': {path!r}")
    return getattr(importlib.import_module(module), name)


def resolve(obj_or_path: Any) -> Any:
    """``obj_or_path`` itself, or the object it names when it is a string."""
    return import_object(obj_or_path) if isinstance(obj_or_path, str) else obj_or_path
