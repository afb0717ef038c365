"""Where a decision came from: the peer's address, or a trusted proxy's ``X-Forwarded-For``.

The header is only believed when the peer itself is a trusted proxy (setting
``trusted_proxies``, none by default). Then the header is read right to left, skipping the
trusted proxies that appended to it: the first address that is not one of them is the client.
Anything unparseable stops the walk (everything left of it could be forged by the client).
"""

from __future__ import annotations

from collections.abc import Sequence
from ipaddress import IPv4Network, IPv6Network, ip_address
from typing import Any, Final

import grpc.aio

from opsconductor.rpc.auth import peer_ip

FORWARDED_FOR: Final = "x-forwarded-for"
#: Width of ``approvals.source_ip``.
MAX_SOURCE_IP: Final = 64

Network = IPv4Network | IPv6Network


def _trusted(address: str, trusted: Sequence[Network]) -> bool:
    try:
        ip = ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)


def resolve_source_ip(peer: str, forwarded_for: Sequence[str], trusted: Sequence[Network]) -> str:
    """The client's address given the peer, the ``X-Forwarded-For`` values and the trusted
    proxies (see the module docstring)."""
    client = peer
    if not _trusted(peer, trusted):
        return client[:MAX_SOURCE_IP]
    hops = [hop.strip() for value in forwarded_for for hop in value.split(",") if hop.strip()]
    for hop in reversed(hops):
        try:
            ip_address(hop)
        except ValueError:
            break
        client = hop
        if not _trusted(hop, trusted):
            break
    return client[:MAX_SOURCE_IP]


def source_ip(context: grpc.aio.ServicerContext[Any, Any], trusted: Sequence[Network]) -> str:
    """The address to record for the caller of this RPC."""
    values = [
        value
        for key, value in (context.invocation_metadata() or ())
        if key.lower() == FORWARDED_FOR and isinstance(value, str)
    ]
    return resolve_source_ip(peer_ip(context), values, trusted)
