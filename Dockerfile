# syntax=docker/dockerfile:1
#
# queue-bridge container image.
#
#   docker build -t queue-bridge .
#   docker run --rm queue-bridge config        # effective settings (BRIDGE_* env), secrets masked
#   docker run --rm -e BRIDGE_... queue-bridge  # = queue-bridge run
#
# Two stages on the same Python image: the builder resolves the locked dependencies (uv.lock) into
# /app/.venv; the runtime image gets only that venv (and examples/), runs as uid 10001, and has
# no build tools. docker-compose.yml and deploy/kubernetes/ use this image.

############################ builder ############################
FROM python:3.11.11-slim-bookworm AS builder

ARG UV_VERSION=0.13.9
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=/usr/local/bin/python3.11 \
    UV_PROJECT_ENVIRONMENT=/app/.venv \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# uv by hash (deploy/python/uv-requirements.txt): a rebuild installs these bytes or fails. The ARG
# names the version the file pins (checked by tests/unit/test_deploy_files.py).
COPY deploy/python/uv-requirements.txt /tmp/uv-requirements.txt
RUN pip install --require-hashes --no-deps -r /tmp/uv-requirements.txt

WORKDIR /app

# 1. Dependencies only. This layer is rebuilt only when pyproject.toml or uv.lock change.
COPY pyproject.toml uv.lock ./
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-install-project --no-editable --extra fast

# 2. The project itself, installed as a regular package (not editable), so the venv needs no
#    source tree at runtime. examples/ is copied to the runtime image for the compose demo;
#    the mkdir keeps that COPY working when a checkout has no examples/.
COPY . .
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable --extra fast \
 && mkdir -p /app/examples

############################ runtime ############################
FROM python:3.11.11-slim-bookworm AS runtime

LABEL org.opencontainers.image.title="queue-bridge" \
      org.opencontainers.image.description="Persistent work queue: AMQP in front, Apache Cassandra behind, tasks encrypted per owner." \
      org.opencontainers.image.licenses="MIT"

# tini runs as PID 1 and starts the bridge (ENTRYPOINT below). The kernel gives PID 1 no default
# action for a signal: as PID 1, the bridge dropped a SIGTERM that came before it installed its
# handler (its first second or two: imports, settings), and the container ran on until the SIGKILL
# a stop grace later. tini forwards the signal (the bridge's default action or its handler ends
# it), reaps, and exits with the bridge's code.
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/*

# An unprivileged user with a fixed uid (deploy/kubernetes/deployment.yaml sets runAsUser: 10001).
# /keys is owned by it, so a named volume mounted there (the compose dev key-ring) is writable.
RUN groupadd --gid 10001 bridge \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin bridge \
 && mkdir -p /keys \
 && chown 10001:10001 /keys

ENV PATH=/app/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /app
COPY --from=builder /app/.venv /app/.venv
COPY --from=builder /app/examples /app/examples

USER 10001:10001

# Health (/health/live, /health/ready) and Prometheus metrics (/metrics): BRIDGE_HTTP_PORT, 8080.
EXPOSE 8080

# No curl in the slim image: the standard library does the probe. urlopen raises on a refused
# connection or an HTTP status >= 400, so python exits 1 = unhealthy. Liveness, not readiness:
# Swarm and autoheal tools replace an unhealthy container, and readiness fails during a RabbitMQ
# or Cassandra outage, when every bridge would be replaced (and the new ones exit while the
# outage lasts). docker-compose.yml probes readiness instead, to start the demos once it serves.
# It asks where the bridge listens: BRIDGE_HTTP_HOST (its wildcard as loopback), BRIDGE_HTTP_PORT;
# with the port 0 (no HTTP) there is nothing to ask and the container counts as healthy (it
# probed 127.0.0.1:8080 whatever the settings, and such a bridge was replaced in a loop).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as r; p = os.environ.get('BRIDGE_HTTP_PORT', '8080'); h = os.environ.get('BRIDGE_HTTP_HOST', '0.0.0.0'); h = {'0.0.0.0': '127.0.0.1', '': '127.0.0.1', '::': '[::1]'}.get(h, '[%s]' % h if ':' in h else h); p == '0' or r.urlopen('http://%s:%s/health/live' % (h, p), timeout=4)"]

# Exec form, under tini (see above): the SIGTERM sent to PID 1 reaches queue-bridge (graceful stop,
# BRIDGE_SHUTDOWN_GRACE). -s: tini reaps as a subreaper where it is not PID 1 itself (docker-compose.yml's
# `init: true` puts Docker's own init first), instead of warning at every start.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "-s", "--", "queue-bridge"]
CMD ["run"]
