"""Ports for test services that bind a port named in their settings.

Picked outside the kernel's ephemeral range (``ip_local_port_range``, 32768-60999 by default):
a port from ``bind(0)``, once released, can be taken by any outgoing connection of a parallel
test worker before the service binds it (seen as ``Address already in use`` under xdist).
Below that range only another explicit bind can collide, and the pick is random and checked.
"""

from __future__ import annotations

import random
import socket

LOW, HIGH = 20000, 32767


def free_port() -> int:
    """A port below the ephemeral range that nothing listens on right now."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct such ports."""
    ports: list[int] = []
    while len(ports) < count:
        port = random.randint(LOW, HIGH)
        if port in ports:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
    return ports
