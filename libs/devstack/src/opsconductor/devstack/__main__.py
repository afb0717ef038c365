"""``python -m opsconductor.devstack`` (``make run``): the whole system on this machine.

See :mod:`opsconductor.devstack.supervisor` for what it does and
:mod:`opsconductor.devstack.config` for the ports and the ``OPSC_*`` variables that move them.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pydantic import ValidationError

from opsconductor.common.logconfig import configure_logging
from opsconductor.devstack.config import DevstackSettings
from opsconductor.devstack.dev_identity import DEV_PRINCIPAL, DEV_TENANT, dev_token, signing_key
from opsconductor.devstack.supervisor import run_devstack


def main() -> int:
    """Run the dev stack until Ctrl-C/SIGTERM; 0 on a clean stop, 1 if it failed.

    ``--workers N`` starts N worker processes (default ``OPSC_WORKERS``, else 1).
    ``token [--actor A] [--tenant T]`` prints a token for the running stack instead.
    """
    parser = argparse.ArgumentParser(prog="python -m opsconductor.devstack")
    parser.add_argument(
        "--workers", type=int, default=None, metavar="N", help="worker processes to start"
    )
    sub = parser.add_subparsers(dest="command")
    mint = sub.add_parser("token", help="print a 12 h token signed with the stack's dev key")
    mint.add_argument("--actor", default=DEV_PRINCIPAL)
    mint.add_argument("--tenant", default=DEV_TENANT)
    args = parser.parse_args()
    overrides = {} if args.workers is None else {"workers": args.workers}
    try:
        settings = DevstackSettings(**overrides)
    except ValidationError as exc:
        parser.error(str(exc))
    if args.command == "token":
        print(dev_token(signing_key(settings.devstack_dir), actor=args.actor, tenant=args.tenant))
        return 0
    configure_logging(level="INFO", json=False, stream=sys.stderr, service="devstack")
    # pgserver logs every command line and its full output at INFO; its warnings are enough here.
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    return run_devstack(settings)


if __name__ == "__main__":
    sys.exit(main())
