"""CPU microseconds per INFO log line through the services' sink, one worker-shaped line.

``.venv/bin/python bench/log_line.py [--lines N] [--repeat R] [--profile]``

The sink is configured as a service configures it (``configure_logging``, JSON, ``service``
field) writing to ``/dev/null``; the spec §7.2 fields of a running immediate execution are bound
(as ``bind_execution`` binds them) and each sample logs the worker's ``execution_transitioned``
and ``execution_started`` lines (~1 000 characters each). Process CPU time, not wall time, so
the figure holds on a loaded machine better than a latency; the median of ``--repeat`` samples.
``--profile`` prints cProfile's top functions by own time for one more sample.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import time

import structlog

from opsconductor.common.logconfig import bind_request_context, configure_logging

EXECUTION_ID = "d97e5125-c780-48e2-a6ef-7cd232edeb8a"
CONTEXT = {
    "request_id": "117708a2d2114439b0b0675c5feefc56",
    "plan_hash": "b443affad9afa4016ba29a52037274772d92cade5006e54a38da065e51ee3606",
    "exec_id": EXECUTION_ID,
    "actor_id": "alice",
    "tenant_id": "t-2271671b",
    "action": "probe",
    "targets": ["host:imm"],
    "approval_level": 0,
    "timing": {
        "created_at": "2026-12-03T16:01:56.150613+00:00",
        "started_at": "2026-12-03T16:01:56.197644+00:00",
        "ended_at": None,
    },
    "status": "running",
    "error_class": None,
    "duration_ms": None,
    "retries_total": 0,
    "queue_wait_ms": None,
    "worker_id": "vm:23551",
    "lease_renewals": 0,
    "cancel_checks_performed": 0,
    "execution_mode": "immediate",
    "sla_class": "fast",
    "timeout_policy_id": "fast_read",
    "rpc_method": "opsconductor.execution.v1.WorkerService/RunImmediate",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--lines", type=int, default=10_000, help="lines per sample")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()

    with open(os.devnull, "w", encoding="utf-8") as sink:
        configure_logging(stream=sink, service="worker")
        bind_request_context(**CONTEXT)
        storage = structlog.get_logger("opsconductor.lifecycle.storage.executions")
        runner = structlog.get_logger("opsconductor.worker.logic.runner")

        def two_lines() -> None:
            storage.info(
                "execution_transitioned",
                execution_id=EXECUTION_ID,
                from_status="pending",
                to_status="running",
                by="vm:23551",
            )
            runner.info("execution_started")

        pairs = max(args.lines // 2, 1)
        for _ in range(pairs):  # warm-up: caches, cached loggers
            two_lines()
        samples = []
        for _ in range(args.repeat):
            started = time.process_time()
            for _ in range(pairs):
                two_lines()
            samples.append((time.process_time() - started) / (2 * pairs) * 1e6)
        print(
            f"us per INFO line: median {statistics.median(samples):.1f}"
            f" (min {min(samples):.1f}, max {max(samples):.1f}; {args.repeat} x {2 * pairs} lines)"
        )
        if args.profile:
            profile = cProfile.Profile()
            profile.enable()
            for _ in range(pairs):
                two_lines()
            profile.disable()
            pstats.Stats(profile).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
