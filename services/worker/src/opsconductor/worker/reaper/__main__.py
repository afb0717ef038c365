"""``python -m opsconductor.worker.reaper [--once] [--interval S]`` — the reaper command.

``--once`` runs one pass and exits (the Kubernetes CronJob, every minute); without it the
reaper loops every ``--interval`` seconds (``make run``), serving its gauges on
``OPSC_METRICS_PORT`` when set, until SIGTERM/SIGINT. Settings are the worker's ``OPSC_*``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from datetime import timedelta

import structlog
from prometheus_client import start_http_server

from opsconductor.common.errors import OpsConductorError
from opsconductor.common.logconfig import configure_logging
from opsconductor.lifecycle.maintenance_port import PostgresRedisMaintenance
from opsconductor.lifecycle.queue.redis_queue import open_queue
from opsconductor.lifecycle.storage.db import create_pool
from opsconductor.rpc.server import load_settings
from opsconductor.worker.logic.reaper import reap_once
from opsconductor.worker.settings import WorkerSettings

log = structlog.get_logger("opsconductor.worker.reaper")


async def run(settings: WorkerSettings, *, once: bool, interval_s: float) -> int:
    # The pass holds a session advisory lock: keep asyncpg's full reset on release.
    pool = await create_pool(
        settings.database_url.get_secret_value(), min_size=1, max_size=4, session_reset=True
    )
    queue = (
        open_queue(settings.redis_url.get_secret_value(), prefix=settings.queue_prefix)
        if settings.redis_url is not None
        else None
    )
    stores = PostgresRedisMaintenance(pool, queue)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        while True:
            try:
                await reap_once(
                    stores,
                    dedup_window=timedelta(seconds=settings.dedup_window_s),
                    deadline_grace=timedelta(seconds=settings.reaper_deadline_grace_s),
                    unstarted_grace=timedelta(seconds=settings.reaper_unstarted_grace_s),
                )
            except OpsConductorError as exc:
                # Postgres unreachable mid-pass: the loop must outlive the outage (the next
                # pass redoes whatever this one could not); a CronJob run reports the failure.
                if once:
                    raise
                log.warning("reaper_pass_failed", error_class=exc.reason)
            if once:
                return 0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)
            if stop.is_set():
                return 0
    finally:
        if queue is not None:
            await queue.aclose()
        await pool.close()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m opsconductor.worker.reaper")
    parser.add_argument("--once", action="store_true", help="one pass, then exit (CronJob)")
    parser.add_argument("--interval", type=float, default=60.0, help="seconds between passes")
    args = parser.parse_args()
    settings = load_settings(WorkerSettings)
    configure_logging(
        level=settings.log_level, json=settings.log_json, service="reaper", file=settings.log_file
    )
    if not args.once and settings.metrics_port:
        start_http_server(settings.metrics_port, addr=settings.grpc_host)
    return asyncio.run(run(settings, once=args.once, interval_s=args.interval))


if __name__ == "__main__":
    sys.exit(main())
