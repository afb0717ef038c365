# syntax=docker/dockerfile:1
# One image per service, from one file: `docker build --target api -t opsconductor-api:0.1.0 .`
# (targets: api, worker, approvals, progress; the reaper and the migrations Job run the worker
# image). Runtime images hold a virtualenv of the service's own packages and their pinned
# dependencies (requirements/constraints.txt) — no compilers, no test or dev tools — and run as
# uid 10001. No Docker engine runs on the project's machines: tests/deploy/test_dockerfile.py
# checks these rules on the text of this file; it has not been built there.

# ---- build: a virtualenv per service, installed from the local packages --------------------------
FROM python:3.11.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY requirements/constraints.txt requirements/constraints.txt
COPY libs/proto libs/proto
COPY libs/common libs/common
COPY libs/lifecycle libs/lifecycle
COPY libs/actions libs/actions
COPY libs/policy libs/policy
COPY libs/rpc libs/rpc
COPY libs/client libs/client
COPY services services

FROM build AS build-api
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install -c requirements/constraints.txt \
        ./libs/proto ./libs/common ./libs/lifecycle ./libs/actions ./libs/policy \
        ./libs/rpc ./libs/client ./services/api

FROM build AS build-worker
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install -c requirements/constraints.txt \
        ./libs/proto ./libs/common ./libs/lifecycle ./libs/actions ./libs/policy \
        ./libs/rpc ./libs/client ./services/worker

FROM build AS build-approvals
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install -c requirements/constraints.txt \
        ./libs/proto ./libs/common ./libs/lifecycle ./libs/actions ./libs/policy \
        ./libs/rpc ./libs/client ./services/approvals

FROM build AS build-progress
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install -c requirements/constraints.txt \
        ./libs/proto ./libs/common ./libs/lifecycle ./libs/policy ./libs/actions \
        ./libs/rpc ./libs/client ./services/progress

# ---- runtime: what every service image shares -----------------------------------------------------
FROM python:3.11.11-slim-bookworm AS runtime
RUN groupadd --system --gid 10001 opsc \
 && useradd --system --uid 10001 --gid opsc --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin opsc
# The migration files travel with every image (the migrations Job runs the worker image).
COPY migrations /app/migrations
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    OPSC_MIGRATIONS_DIR=/app/migrations \
    OPSC_GRPC_HOST=0.0.0.0
WORKDIR /app

FROM runtime AS api
COPY --from=build-api /opt/venv /opt/venv
USER 10001:10001
EXPOSE 50051 9101
CMD ["python", "-m", "opsconductor.api"]

FROM runtime AS worker
# The shell action's sandbox (docs/security.md, "Kubernetes"): bubblewrap for nodes that allow
# user namespaces; elsewhere setpriv (util-linux) switches each step to a uid of its own. That
# copy of setpriv carries the file capabilities cap_setuid,cap_setgid and only the worker's group
# may run it (0750); kill comes from procps. Debian packages pinned to the bookworm release.
USER root
RUN apt-get update \
 && apt-get install -y --no-install-recommends bubblewrap=0.8.0-2+deb12u1 \
        libcap2-bin=1:2.66-4+deb12u3+b1 procps=2:4.0.2-3 \
 && install -o root -g opsc -m 0750 /usr/bin/setpriv /usr/local/bin/opsc-setpriv \
 && setcap cap_setuid,cap_setgid=ep /usr/local/bin/opsc-setpriv \
 && rm -rf /var/lib/apt/lists/*
ENV OPSC_SANDBOX_SETPRIV=/usr/local/bin/opsc-setpriv
COPY --from=build-worker /opt/venv /opt/venv
USER 10001:10001
EXPOSE 50052 9102
CMD ["python", "-m", "opsconductor.worker"]

FROM runtime AS approvals
COPY --from=build-approvals /opt/venv /opt/venv
USER 10001:10001
EXPOSE 50053 9103
CMD ["python", "-m", "opsconductor.approvals"]

FROM runtime AS progress
COPY --from=build-progress /opt/venv /opt/venv
USER 10001:10001
EXPOSE 50054 8080 9104
CMD ["python", "-m", "opsconductor.progress"]
