"""Almanac's domain: the jobs' logic as plain Python, with no Airflow imports."""
