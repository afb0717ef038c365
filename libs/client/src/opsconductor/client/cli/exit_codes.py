"""``opsctl``'s exit codes: what a script can tell apart without parsing any output.

====  ==========================================================================================
code  meaning
====  ==========================================================================================
0     success; for ``submit``, the execution succeeded (or has not finished yet, without
      ``--watch``)
1     the command failed: the service refused it (permission, not found, precondition such as
      ``STAGE_E_DISABLED``) or could not be reached
2     bad usage: an unknown option, a bad plan file (the message names the field path), a plan
      the service rejected as invalid, incomplete connection settings, no development key
3     the execution failed (``submit``; ``get`` exits 0 for any execution it found)
4     the execution was cancelled
5     the execution timed out (failed with ``timed_out``)
6     the execution was rejected (an approver refused it)
7     ``--watch`` gave up (``--watch-timeout``) before the execution finished
8     ``shadow-report`` found mismatches; ``audit verify`` found the chain broken
130   interrupted (Ctrl-C)
====  ==========================================================================================
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "CANCELLED",
    "ERROR",
    "FAILED",
    "INTERRUPTED",
    "MISMATCH",
    "OK",
    "REJECTED",
    "TIMED_OUT",
    "USAGE",
    "WATCH_GAVE_UP",
    "for_execution",
]

OK: Final = 0
ERROR: Final = 1
USAGE: Final = 2
FAILED: Final = 3
CANCELLED: Final = 4
TIMED_OUT: Final = 5
REJECTED: Final = 6
WATCH_GAVE_UP: Final = 7
MISMATCH: Final = 8
INTERRUPTED: Final = 130


def for_execution(status: str, *, timed_out: bool) -> int:
    """The exit code of an execution in ``status`` (non-terminal statuses exit 0)."""
    if status == "failed":
        return TIMED_OUT if timed_out else FAILED
    return {"cancelled": CANCELLED, "rejected": REJECTED}.get(status, OK)
