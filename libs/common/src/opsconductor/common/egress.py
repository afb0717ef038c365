"""Where the ``http`` action may connect: the egress rule, applied to resolved addresses.

A plan chooses the URL, so without a rule any read-class step could fetch the worker's own
``/metrics`` on 127.0.0.1, the cloud metadata service (169.254.169.254) or anything on the
private network (issue 8, finding 3). The rule (`egress_problem`):

* **Public addresses** are allowed: globally routable unicast (``ipaddress``'s ``is_global``),
  not multicast, not reserved.
* **Everything else is refused** unless the tenant's policy lists a network containing it
  (``egress.allow_networks`` in ``tenant_policy.yaml``): loopback (127.0.0.0/8, ::1),
  unspecified and "this network" (0.0.0.0/8, ::), link-local (169.254.0.0/16 — the metadata
  service — and fe80::/10), RFC 1918 (10/8, 172.16/12, 192.168/16), CGNAT (100.64.0.0/10),
  unique-local (fc00::/7), site-local, multicast (224.0.0.0/4, ff00::/8), reserved and
  documentation ranges, broadcast. An IPv6 address embedding an IPv4 one (IPv4-mapped
  ``::ffff:127.0.0.1``, NAT64 ``64:ff9b::7f00:1``, 6to4 ``2002:7f00:1::``) is judged by the
  IPv4 address it carries.
* **The service's own ports** (`reserve_local_ports`: the gRPC, health and metrics ports this
  process bound) are refused on every non-public address, even in an allowed network: a tenant
  allowed 10.0.0.0/8 still cannot talk to the worker's own endpoints.

The rule is applied to the addresses a host name *resolves to*, and the request then goes to
exactly that checked address (``http`` keeps the original ``Host`` header and TLS server name),
so a DNS answer that changes between check and connect (rebinding) cannot move the request. The
same check runs again for every redirect hop. Numeric host forms (``2130706433``,
``0177.0.0.1``, ``127.1``) and names such as ``localhost.`` resolve to loopback and are refused
like it; `literal_address` lets the api refuse the literal ones at submit, before any DNS.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from typing import Final

__all__ = [
    "IpAddress",
    "IpNetwork",
    "address_kind",
    "egress_problem",
    "literal_address",
    "reserve_local_ports",
    "reserved_ports",
]

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_NAT64: Final = ipaddress.ip_network("64:ff9b::/96")
_CGNAT: Final = ipaddress.ip_network("100.64.0.0/10")
_THIS_NETWORK: Final = ipaddress.ip_network("0.0.0.0/8")
#: Names that always mean this machine, whatever a resolver says.
_LOCAL_NAMES: Final = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})
_reserved: set[int] = set()


def reserve_local_ports(ports: Iterable[int | None]) -> None:
    """Mark ``ports`` (this process's listeners) as never reachable on non-public addresses."""
    _reserved.update(port for port in ports if port)


def reserved_ports() -> frozenset[int]:
    """The ports `reserve_local_ports` registered."""
    return frozenset(_reserved)


def _embedded_ipv4(address: IpAddress) -> ipaddress.IPv4Address | None:
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def address_kind(address: IpAddress) -> str | None:
    """Why ``address`` is not public ("loopback", "private"...), or None when it is."""
    embedded = _embedded_ipv4(address)
    if embedded is not None:
        return address_kind(embedded)
    if address.is_loopback:
        return "loopback"
    if address.is_unspecified or address in _THIS_NETWORK:
        return "unspecified"
    if address.is_link_local:
        return "link-local"
    if address.is_multicast:
        return "multicast"
    if isinstance(address, ipaddress.IPv4Address) and address in _CGNAT:
        return "shared (CGNAT)"
    if isinstance(address, ipaddress.IPv6Address) and address.is_site_local:
        return "site-local"
    if address.is_private:
        return "private"
    if address.is_reserved or not address.is_global:
        return "reserved"
    return None


def egress_problem(address: IpAddress, port: int, allowed: Iterable[IpNetwork]) -> str | None:
    """Why a connection to ``address``:``port`` is refused, or None if it is allowed.

    ``allowed`` are the tenant's extra networks. The answer names the kind of address and the
    policy setting, never the address itself (it may be an internal one the plan did not name).
    """
    kind = address_kind(address)
    if kind is None:
        return None
    candidates = [address]
    embedded = _embedded_ipv4(address)
    if embedded is not None:
        candidates.append(embedded)
    if not any(c in net for c in candidates for net in allowed if c.version == net.version):
        return (
            f"the host resolves to a {kind} address, which this tenant may not reach "
            "(policy egress.allow_networks)"
        )
    if port in _reserved:
        return "the port is one of this service's own, which no step may reach"
    return None


def literal_address(host: str) -> IpAddress | None:
    """The address ``host`` spells without DNS: an IP literal in any form a resolver accepts
    (dotted, decimal ``2130706433``, octal ``0177.0.0.1``, short ``127.1``, ``[::1]``) or a
    name that always means this machine (``localhost``, ``localhost.``); else None."""
    name = host.strip("[]").lower().removesuffix(".")
    if name in _LOCAL_NAMES or name.endswith(".localhost"):
        return ipaddress.IPv4Address("127.0.0.1")
    try:
        return ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        pass
    try:
        # inet_aton takes the legacy numeric forms glibc's resolver also accepts.
        return ipaddress.IPv4Address(socket.inet_aton(name))
    except OSError:
        return None
