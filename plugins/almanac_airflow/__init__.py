"""Airflow-facing glue shared by Almanac's DAGs: defaults, notifiers, hooks, settings.

Airflow puts ``plugins/`` on ``sys.path``, so DAGs import this as ``almanac_airflow``.
Nothing here does I/O at import time.
"""
