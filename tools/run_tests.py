"""Run the whole test suite under coverage and enforce the coverage gates.

Gates (branch coverage): each shared library holding safety-critical code must reach 90 % —
`libs/common` (plan, hashing, FSM, masking, secrets), `libs/lifecycle` (storage, locks, queue),
`libs/policy` (RBAC, quotas), `libs/actions` (the sandbox) and `libs/rpc` (status mapping,
authentication); the services together 85 %. Subprocesses
started by tests (services in e2e tests, crash tests) are measured too (coverage `patch`).

The test files are spread over ``OPSC_TEST_WORKERS`` (default 3) pytest-xdist worker processes,
a whole file per worker (``--dist loadfile``) so that a module's stack starts once: most e2e time
is spent waiting on service processes, so even 2 cores keep 3 workers busy. ``OPSC_TEST_WORKERS=0``
runs everything in this one process. Each worker is a process of its own, so its ``RUN_ID``
(tests/conftest.py) and with it its databases and Redis key prefixes are its own.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GATES = [
    ("libs/common (primitives)", "*/libs/common/src/opsconductor/common/*", 90.0),
    (
        "libs/lifecycle (storage, locks, queue)",
        "*/libs/lifecycle/src/opsconductor/lifecycle/*",
        90.0,
    ),
    ("libs/policy (RBAC, quotas)", "*/libs/policy/src/opsconductor/policy/*", 90.0),
    ("libs/actions (actions, sandbox)", "*/libs/actions/src/opsconductor/actions/*", 90.0),
    ("libs/rpc (gRPC plumbing)", "*/libs/rpc/src/opsconductor/rpc/*", 90.0),
    ("services", "*/services/*/src/opsconductor/*", 85.0),
]


def run(cmd: list[str]) -> int:
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=ROOT)


def main() -> int:
    bin_dir = Path(sys.executable).parent
    coverage = str(bin_dir / "coverage")
    pg = "DATABASE_URL" if os.environ.get("DATABASE_URL") else "embedded Postgres"
    redis = "REDIS_URL" if os.environ.get("REDIS_URL") else "embedded Redis"
    print(f"test run against: {pg}, {redis}")
    workers = int(os.environ.get("OPSC_TEST_WORKERS", "3"))
    # In collection order (chaos, deploy, e2e, ..., unit): the long single-test files start
    # first and the many short unit files fill the end (xdist's default puts big files first).
    spread = ["-n", str(workers), "--dist", "loadfile", "--no-loadscope-reorder"]
    if workers <= 0:
        spread = []
    # Every xdist worker must collect the same tests in the same order, and a parametrization
    # built by iterating a set follows str hashing: one seed per run, shared by the workers.
    seed = os.environ.setdefault("PYTHONHASHSEED", str(random.randint(1, 2**32 - 1)))
    print(f"PYTHONHASHSEED={seed}, {workers or 'no'} xdist workers")
    run([coverage, "erase"])
    code = run([str(bin_dir / "pytest"), "--cov", "--cov-report=", *spread, *sys.argv[1:]])
    if code != 0:
        return code
    failed = False
    for label, include, threshold in GATES:
        print(f"\ncoverage gate: {label} >= {threshold:.0f}% (branch)")
        if run([coverage, "report", f"--include={include}", f"--fail-under={threshold}"]) != 0:
            print(f"coverage gate FAILED: {label}")
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
