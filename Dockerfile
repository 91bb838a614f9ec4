# classify-worker: slim, non-root, read-only-root-filesystem friendly, default model inside.
# `make image` builds it with docker or podman and prints its name (classify-worker:<version>).
#
# BASE_IMAGE: any Debian-like image whose `python` is CPython >= 3.11 with the venv module, and
# which has groupadd/useradd. `make image` uses the default when it is there or can be pulled, else
# a base built from Debian's packages (debootstrap minbase + Debian's python3; deploy/image/build.sh).
# No `# syntax=` line: BuildKit would have to pull that frontend from a registry.
ARG BASE_IMAGE=docker.io/library/python:3.11-slim

# The runtime requirements alone, read from pyproject.toml: the install layer below is reused
# until they change, whatever else changes in pyproject.toml or the code.
FROM ${BASE_IMAGE} AS requirements
WORKDIR /src
COPY pyproject.toml ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
    > requirements.txt

# pip steps: the build secret `pip-cert` (optional) is a CA bundle for networks that intercept TLS;
# `make image` passes the host's. Mounted for the step only, it is never stored in a layer.
FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
COPY --from=requirements /src/requirements.txt /tmp/requirements.txt
RUN --mount=type=secret,id=pip-cert \
    if [ -s /run/secrets/pip-cert ]; then export PIP_CERT=/run/secrets/pip-cert; fi \
 && /opt/venv/bin/pip install -q -r /tmp/requirements.txt
COPY pyproject.toml README.md ./
COPY worker ./worker
# pip and setuptools are build tools: a worker never installs anything, so they stay out of the image.
RUN --mount=type=secret,id=pip-cert \
    if [ -s /run/secrets/pip-cert ]; then export PIP_CERT=/run/secrets/pip-cert; fi \
 && /opt/venv/bin/pip install -q --no-deps . \
 && /opt/venv/bin/pip uninstall -q -y pip setuptools \
 && python -m compileall -q /opt/venv/lib

# Everything but the venv comes first, so a code change rebuilds one layer here (with podman's
# vfs storage every step after a changed one copies the whole file system again).
FROM ${BASE_IMAGE} AS runtime
ARG BASE_IMAGE
ARG VERSION
LABEL org.opencontainers.image.title="classify-worker" \
      org.opencontainers.image.description="Streaming classification worker for model routing on Kafka" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"
RUN groupadd --gid 10001 worker \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin worker
# Bytecode is compiled at build time, so nothing needs to be written under /opt at run time:
# with readOnlyRootFilesystem the only writable path is /tmp (an emptyDir in the Helm chart).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TMPDIR=/tmp
USER 10001:10001
EXPOSE 9108
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('CW_METRICS__PORT', '9108'); sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["classify-worker"]
CMD ["run"]
COPY --from=build /opt/venv /opt/venv

# Sample traffic for docker-compose (`--target dev`): the dev kit on top of the worker image.
# The worker image itself (`runtime`, made the default by the last line) does not contain it.
FROM runtime AS dev
COPY --chown=10001:10001 devkit /opt/devkit/devkit
ENV PYTHONPATH=/opt/devkit
ENTRYPOINT ["python", "-m", "devkit"]

# `docker build .` builds the worker image.
FROM runtime
