"""The count limits of a plan, known to both sides: the client's codec refuses by counting what
the server would refuse anyway, and ``opsconductor.common.plan`` validates with the same numbers.
"""

from __future__ import annotations

from typing import Final

__all__ = ["MAX_STEPS", "MAX_TARGETS_PER_PLAN", "MAX_TARGETS_PER_STEP"]

MAX_STEPS: Final = 100
MAX_TARGETS_PER_STEP: Final = 500
#: No valid plan comes close (512 KiB hold ~23 000 of the smallest targets); a bound on the
#: total lets the transport refuse a huge plan by counting alone, before any parsing.
MAX_TARGETS_PER_PLAN: Final = 10_000
