"""What the comparison benchmarks (``peers.py``, ``scale.py``) share around their own figures.

Each runs its measurement as one coroutine building a result dict, renders it as a table, and
writes it as JSON; the run is started, timed, reported and cleaned up the same way here, and the
header lines saying what a table was measured on read the same in both.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from _stack import ScriptFailedError

from opsconductor.common.logconfig import configure_logging


def progress(message: str) -> None:
    """A line of progress on stderr, so that stdout holds only the table."""
    print(message, file=sys.stderr, flush=True)


def stop_on_sigterm() -> None:
    """SIGTERM cancels the running benchmark, so that its ``servers()`` context cleans up."""
    task = asyncio.current_task()
    if task is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)


def started_result(**fields: Any) -> dict[str, Any]:
    """A result dict with the load average before anything ran, and ``fields``."""
    return {**fields, "load_before": os.getloadavg()[0]}


def machine_line(result: dict[str, Any], **loads: float) -> str:
    """``machine : nproc …, model; load average before …, <name> …, at the end …``."""
    box = result["machine"]
    during = "".join(f", {name} {value:.2f}" for name, value in loads.items())
    return (
        f"  machine : nproc {box['nproc']}, {box['cpu_model']}; load average before"
        f" {result['load_before']:.2f}{during}, at the end {box['loadavg'][0]:.2f}"
    )


def report(
    benchmark: str,
    measure: Callable[[], Coroutine[Any, Any, dict[str, Any]]],
    render: Callable[[dict[str, Any]], str],
    output: Path,
    *,
    failures: tuple[type[BaseException], ...] = (),
) -> int:
    """Run ``measure``, print ``render`` of its result and write it to ``output`` as JSON.

    Returns the exit status: 1 when the benchmark failed (``ScriptFailedError`` or one of
    ``failures``, reported in one line), 130 when interrupted (everything started is stopped by
    then), else 0."""
    configure_logging(level="WARNING", json=False, stream=sys.stderr, cache_loggers=False)
    started = time.monotonic()
    failed: tuple[type[BaseException], ...] = (ScriptFailedError, *failures)
    try:
        result = asyncio.run(measure())
    except failed as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; everything started was stopped and removed", file=sys.stderr)
        return 130
    result["finished_at"] = datetime.now(UTC).isoformat()
    result["run_time_s"] = round(time.monotonic() - started, 1)
    print(render(result))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"benchmark": benchmark, **result}, indent=2) + "\n")
    print(f"run time: {result['run_time_s']:.0f} s; results written to {output}")
    return 0
