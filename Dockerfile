# syntax=docker/dockerfile:1
#
# Almanac's Airflow image: the official Apache Airflow 3.3.2 image plus Almanac's pinned
# dependencies and the almanac package itself (so `import almanac` and the `almanac` console
# script work in every container). docker-compose.yaml builds it as almanac-airflow:3.3.2.
#
# Python 3.11, because constraints.txt is resolved for Python 3.11.
ARG AIRFLOW_BASE_IMAGE=apache/airflow:3.3.2-python3.11
FROM ${AIRFLOW_BASE_IMAGE}

# Build directory owned by airflow: pip builds the project in place (build/, *.egg-info).
USER root
RUN install -d -o airflow -g 0 /opt/almanac

# The official image installs Python packages into the airflow user's virtualenv
# (/home/airflow/.local) and refuses to run pip as root, so install as airflow.
USER airflow
WORKDIR /opt/almanac

# Dependencies first so this layer is reused until requirements.txt or constraints.txt change.
# requirements.txt pins apache-airflow==3.3.2, which keeps pip from moving Airflow itself.
COPY --chown=airflow:0 requirements.txt constraints.txt ./
RUN pip install --no-cache-dir -r requirements.txt -c constraints.txt

# The project itself. README.m[d] is a wildcard so the COPY still works if there is no README.md;
# it's copied because a pyproject `readme = "README.md"` makes the build need it.
COPY --chown=airflow:0 pyproject.toml README.m[d] ./
COPY --chown=airflow:0 include/ ./include/
RUN pip install --no-cache-dir --no-deps . \
    && python -c "import almanac" \
    && command -v almanac

# Back to the official image's working directory (AIRFLOW_HOME). Compose mounts ./include at
# /opt/airflow/include and puts it first on PYTHONPATH, so the mounted code takes precedence over
# the copy installed above; without the mount the installed copy is used.
WORKDIR /opt/airflow
