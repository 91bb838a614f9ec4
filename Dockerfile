# syntax=docker/dockerfile:1
# classify-worker: slim, non-root, read-only-root-filesystem friendly, default model inside.

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml README.md ./
COPY worker ./worker
RUN /opt/venv/bin/pip install . \
 && /opt/venv/bin/python -m compileall -q /opt/venv/lib

FROM python:3.11-slim AS runtime
LABEL org.opencontainers.image.title="classify-worker" \
      org.opencontainers.image.description="Streaming classification worker for model routing on Kafka" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --gid 10001 worker \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin worker
COPY --from=build /opt/venv /opt/venv
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

# Sample traffic for docker-compose (`--target dev`): the dev kit on top of the worker image.
# The worker image itself (`runtime`, made the default by the last line) does not contain it.
FROM runtime AS dev
COPY --chown=10001:10001 devkit /opt/devkit/devkit
ENV PYTHONPATH=/opt/devkit
ENTRYPOINT ["python", "-m", "devkit"]

# `docker build .` builds the worker image.
FROM runtime
