# OpsConductor Execution — the two commands are `make run` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PACKAGES := libs/proto libs/common libs/lifecycle libs/actions libs/policy libs/rpc libs/client libs/devstack services/api services/worker services/approvals services/progress
PYPROJECTS := $(addsuffix /pyproject.toml,$(PACKAGES))
SRC_DIRS := $(addsuffix /src,$(PACKAGES))

# proto-lint needs Node.js (npx fetches the official @bufbuild/buf); make test checks the same
# naming rules without it (tests/unit/test_proto_contracts.py).
.PHONY: help chaos venv sandbox-tools protos protos-check proto-lint lint fmt typecheck importlint k8s-validate test test-fast migrate migrate-down run bench bench-immediate bench-background bench-scale bench-peers bench-round-trips bench-masking bench-cpu-ab bench-progress browser-tools ui ui-check clean
.PHONY: monitoring-tools

help:
	@echo "make run          start the whole system on this machine (embedded Postgres/Redis unless DATABASE_URL/REDIS_URL)"
	@echo "make test         lint, type-check, layering, stale-protos check and the whole test suite with coverage gates"
	@echo "make protos       regenerate libs/proto from protos/"
	@echo "make migrate      apply migrations to DATABASE_URL; make migrate-down reverts one step"
	@echo "make k8s-validate render every kustomize overlay and validate it against the Kubernetes schemas"
	@echo "make bench        run the benchmarks under bench/ and print one summary table (~15 min)"
	@echo "make bench-peers  the background no-op workload through saq and pgqueuer, ours / theirs"
	@echo "make bench-scale  the figures with 1 000 000 stored + 100 000 queued executions vs empty"
	@echo "make chaos        the chaos soak: CHAOS_PLANS (500), CHAOS_SEED (1), CHAOS_MINUTES (9, max 10)"

venv: $(STAMP)

# One .venv for the whole monorepo; every package installed editable, every version from one lock.
$(STAMP): requirements/constraints.txt requirements/dev.txt $(PYPROJECTS) tests/plugins/opsc_test_actions/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c requirements/constraints.txt pip hatchling
	$(PY) -m pip install -q --disable-pip-version-check -c requirements/constraints.txt \
		-r requirements/dev.txt $(addprefix -e ./,$(PACKAGES)) -e ./tests/plugins/opsc_test_actions
	touch $(STAMP)

# The shell action's sandbox (docs/security.md): Debian's bubblewrap; setpriv and prlimit come
# with util-linux. Idempotent and quiet: nothing happens when bwrap is already there.
sandbox-tools:
	@command -v bwrap >/dev/null || { export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -qq --no-install-recommends bubblewrap >/dev/null 2>&1 || \
		{ apt-get update -qq >/dev/null && \
		  apt-get install -y -qq --no-install-recommends bubblewrap >/dev/null; }; }
	@command -v bwrap >/dev/null && command -v setpriv >/dev/null && command -v prlimit >/dev/null

# The alert rules' and dashboard's checks (docs/observability.md): Debian's Prometheus
# (promtool, and the server the dashboard test scrapes with) and Alertmanager (amtool).
monitoring-tools:
	@command -v promtool >/dev/null && command -v amtool >/dev/null || { \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -qq --no-install-recommends prometheus prometheus-alertmanager \
			>/dev/null 2>&1 || \
		{ apt-get update -qq >/dev/null && \
		  apt-get install -y -qq --no-install-recommends prometheus prometheus-alertmanager \
			>/dev/null; }; }
	@command -v promtool >/dev/null && command -v amtool >/dev/null && command -v prometheus >/dev/null

# Browser tests (tests/e2e/test_progress_ui.py): Debian's chromium, driven by the playwright pip package of the
# venv; never `playwright install` (it downloads a browser build). Quiet when already there.
browser-tools:
	@command -v chromium >/dev/null || { export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || \
		{ apt-get update -qq >/dev/null && \
		  apt-get install -y -qq --no-install-recommends chromium >/dev/null; }; }
	@command -v chromium >/dev/null

# The UI's grpc-web client (Node.js: @bufbuild/buf + protoc-gen-es + @connectrpc/connect-web,
# bundled by esbuild) is committed, so serving the UI needs no Node.js; ui-check (no Node.js)
# fails when protos/ or ui-src/ changed since the last `make ui`, like protos-check.
ui: $(STAMP)
	cd services/progress/ui-src && npm ci --no-audit --no-fund && npx buf generate && npm run -s bundle
	$(PY) tools/ui_bundle.py --stamp

ui-check: $(STAMP)
	$(PY) tools/ui_bundle.py --check

protos: $(STAMP)
	$(PY) tools/gen_protos.py

proto-lint:
	npx --yes @bufbuild/buf@1.75.0 lint

protos-check: $(STAMP)
	$(PY) tools/gen_protos.py --check

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

fmt: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

importlint: $(STAMP)
	$(VENV)/bin/lint-imports

# The whole suite: hygiene first (fast, fails early), then every test with the coverage gates.
test: $(STAMP) sandbox-tools monitoring-tools browser-tools lint typecheck importlint protos-check ui-check k8s-validate
	$(PY) tools/run_tests.py

# Render k8s/base and every overlay (kubectl kustomize) and validate each object offline against
# the Kubernetes 1.30 schemas (kubernetes-validate --strict); without kubectl it says what it
# could not render.
k8s-validate: $(STAMP)
	$(PY) tools/k8s_validate.py -k 1.30.0

test-fast: $(STAMP) sandbox-tools
	$(VENV)/bin/pytest tests/unit -q

migrate: $(STAMP)
	$(PY) -m opsconductor.lifecycle.storage.migrate up

migrate-down: $(STAMP)
	$(PY) -m opsconductor.lifecycle.storage.migrate down --steps 1

# make run WORKERS=3: several worker processes.
run: $(STAMP) sandbox-tools
	$(PY) -m opsconductor.devstack $(if $(WORKERS),--workers $(WORKERS))

# The whole system under a seeded storm of crashes, pauses and outages (tests/chaos); prints
# the verdict table, writes it as JSON, exits non-zero if anything was lost.
chaos: $(STAMP) sandbox-tools
	$(PY) -m tests.chaos

# Log levels the benchmarks run the services at: INFO is the production default, WARNING
# shows what the per-request log lines cost.
BENCH_LOG_LEVELS ?= INFO WARNING

# Every benchmark, then one summary table of this run's figures (bench/summary.py; ~15 min).
bench: $(STAMP)
	@started=$$(date -u +%Y-%m-%dT%H:%M:%S+00:00); \
	$(MAKE) --no-print-directory bench-immediate bench-background bench-round-trips bench-masking \
	&& $(PY) bench/summary.py --since $$started --levels $(BENCH_LOG_LEVELS)

bench-immediate: $(STAMP)
	@for level in $(BENCH_LOG_LEVELS); do \
		$(PY) bench/immediate_latency.py --log-level $$level \
			--output bench/results/immediate_latency_$$level.json || exit 1; done

bench-background: $(STAMP)
	@for level in $(BENCH_LOG_LEVELS); do \
		$(PY) bench/background_throughput.py --log-level $$level \
			--output bench/results/background_throughput_$$level.json || exit 1; done

# 1 000 live subscribers of one execution on one progress process, over gRPC then SSE: delivery
# latency (commit → subscriber), the process's peak RSS and CPU per delivery, median of 3 runs.
bench-progress: $(STAMP)
	@for transport in grpc sse; do \
		$(PY) bench/progress_fanout.py --transport $$transport --repeat 3 \
			--output bench/results/progress_fanout_$$transport.json || exit 1; done

# The same submit and background figures with 1 000 000 executions stored and 100 000 queued
# (seeded with COPY), next to the empty system's, with a verdict per figure (~30 min).
bench-scale: $(STAMP)
	$(PY) bench/scale.py

# saq and pgqueuer on the same servers, one worker each, in a virtualenv of their own (never
# in requirements/): versions pinned in bench/peers-requirements.txt.
PEERS_VENV := bench/.venv-peers
$(PEERS_VENV)/.installed: bench/peers-requirements.txt
	test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install -q --disable-pip-version-check -r bench/peers-requirements.txt
	touch $@

bench-peers: $(STAMP) $(PEERS_VENV)/.installed
	$(PY) bench/peers.py --peers-python $(PEERS_VENV)/bin/python

bench-round-trips: $(STAMP)
	$(PY) bench/round_trips.py

bench-masking: $(STAMP)
	$(PY) bench/masking.py

# CPU ms per execution of code variants run side by side, e.g.
#   git worktree add /tmp/base main && make bench-cpu-ab AB="--tree base=/tmp/base this:"
AB ?= this:
bench-cpu-ab: $(STAMP)
	$(PY) bench/cpu_ab.py $(AB)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage* htmlcov .devstack
