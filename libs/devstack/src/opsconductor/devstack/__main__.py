"""``python -m opsconductor.devstack`` (``make run``): the whole system on this machine.

See :mod:`opsconductor.devstack.supervisor` for what it does and
:mod:`opsconductor.devstack.config` for the ports and the ``OPSC_*`` variables that move them.
"""

from __future__ import annotations

import logging
import sys

from opsconductor.common.logconfig import configure_logging
from opsconductor.devstack.config import DevstackSettings
from opsconductor.devstack.supervisor import run_devstack


def main() -> int:
    """Run the dev stack until Ctrl-C/SIGTERM; 0 on a clean stop, 1 if it failed."""
    settings = DevstackSettings()
    configure_logging(level="INFO", json=False, stream=sys.stderr, service="devstack")
    # pgserver logs every command line and its full output at INFO; its warnings are enough here.
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    return run_devstack(settings)


if __name__ == "__main__":
    sys.exit(main())
