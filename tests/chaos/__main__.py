"""``python -m tests.chaos`` (``make chaos``): the chaos soak, sized by the environment.

``CHAOS_PLANS`` (default 500), ``CHAOS_SEED`` (default 1), ``CHAOS_MINUTES`` (default 9, at most
10: the run stops by itself), ``CHAOS_JSON`` (default ``.chaos/verdict-seed<SEED>.json``),
``CHAOS_KEEP=1`` keeps the run's folder (service logs) for a post-mortem. Prints the verdict
table; exits 1 if any must-be-zero figure is not zero.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path

from opsconductor.common.logconfig import configure_logging

from .driver import SoakConfig, run_soak


def main() -> int:
    seed = int(os.environ.get("CHAOS_SEED", "1"))
    minutes = min(float(os.environ.get("CHAOS_MINUTES", "9")), 10.0)
    config = SoakConfig(
        plans=int(os.environ.get("CHAOS_PLANS", "500")),
        seed=seed,
        minutes=minutes,
        json_path=Path(os.environ.get("CHAOS_JSON", f".chaos/verdict-seed{seed}.json")),
        keep_run_dir=os.environ.get("CHAOS_KEEP") == "1",
    )
    configure_logging(level="WARNING", json=False, stream=sys.stderr, service="chaos")
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    print(f"chaos soak: {config.plans} plans, seed {seed}, at most {minutes:g} min", flush=True)
    verdict = asyncio.run(run_soak(config))
    print(verdict.table())
    print(f"verdict JSON: {config.json_path}")
    return 1 if verdict.failed() else 0


if __name__ == "__main__":
    sys.exit(main())
