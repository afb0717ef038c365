"""The egress rule on addresses: what is public, what needs the tenant's allow_networks, and
the service's own ports."""

from __future__ import annotations

import ipaddress

import pytest

from opsconductor.common import egress
from opsconductor.common.egress import (
    address_kind,
    egress_problem,
    literal_address,
    reserve_local_ports,
    reserved_ports,
)
from opsconductor.common.tenant_policy import EgressPolicy, TenantPolicies, TenantPolicyError


def ip(text: str) -> egress.IpAddress:
    return ipaddress.ip_address(text)


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("8.8.8.8", None),
        ("1.1.1.1", None),
        ("2606:4700:4700::1111", None),
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("::1", "loopback"),
        ("0.0.0.0", "unspecified"),
        ("0.1.2.3", "unspecified"),
        ("::", "unspecified"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("224.0.0.251", "multicast"),
        ("ff02::1", "multicast"),
        ("100.64.0.1", "shared (CGNAT)"),
        ("100.127.255.254", "shared (CGNAT)"),
        ("10.0.0.1", "private"),
        ("172.31.255.255", "private"),
        ("192.168.0.1", "private"),
        ("fd12:3456::1", "private"),
        ("fec0::1", "site-local"),
        ("192.0.2.10", "private"),  # documentation (TEST-NET-1) counts as private in ipaddress
        ("240.0.0.1", "private"),
        ("255.255.255.255", "private"),
        ("2001:db8::1", "private"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:169.254.169.254", "link-local"),
        ("::ffff:8.8.8.8", None),
        ("64:ff9b::7f00:1", "loopback"),
        ("64:ff9b::808:808", None),
        ("2002:a9fe:a9fe::", "link-local"),
    ],
)
def test_address_kinds(address: str, kind: str | None) -> None:
    assert address_kind(ip(address)) == kind


def test_allowed_networks_admit_their_addresses_only() -> None:
    allowed = (ipaddress.ip_network("10.20.0.0/16"), ipaddress.ip_network("fd00::/8"))
    assert egress_problem(ip("10.20.3.4"), 443, allowed) is None
    assert egress_problem(ip("fd00::5"), 443, allowed) is None
    assert egress_problem(ip("::ffff:10.20.3.4"), 443, allowed) is None  # mapped: its IPv4
    problem = egress_problem(ip("10.21.0.1"), 443, allowed)
    assert problem is not None
    assert "private" in problem
    assert "10.21" not in problem  # the address is not repeated back
    assert egress_problem(ip("8.8.8.8"), 443, ()) is None


def test_own_ports_are_refused_on_non_public_addresses_even_when_allowed() -> None:
    before = reserved_ports()
    reserve_local_ports([65001, None, 0])
    try:
        assert 65001 in reserved_ports()
        assert 0 not in reserved_ports()
        loopback = (ipaddress.ip_network("127.0.0.0/8"),)
        problem = egress_problem(ip("127.0.0.1"), 65001, loopback)
        assert problem is not None
        assert "own" in problem
        assert egress_problem(ip("127.0.0.1"), 65002, loopback) is None
        assert egress_problem(ip("8.8.8.8"), 65001, ()) is None  # public: not this machine
    finally:
        egress._reserved.difference_update(reserved_ports() - before)


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("[::1]", "::1"),
        ("localhost", "127.0.0.1"),
        ("LOCALHOST.", "127.0.0.1"),
        ("api.localhost", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("fe80::1%eth0", "fe80::1"),
        ("api.example.com", None),
        ("", None),
    ],
)
def test_literal_addresses_in_every_spelling(host: str, address: str | None) -> None:
    found = literal_address(host)
    assert (None if found is None else str(found)) == address


def test_the_tenant_policy_carries_allow_networks() -> None:
    policies = TenantPolicies.from_document(
        {"tenants": {"acme": {"egress": {"allow_networks": ["10.0.0.0/8", "127.0.0.1"]}}}}
    )
    networks = policies.for_tenant("acme").egress.networks
    assert [str(n) for n in networks] == ["10.0.0.0/8", "127.0.0.1/32"]
    assert policies.for_tenant("other").egress.networks == ()
    with pytest.raises(TenantPolicyError, match="not a network"):
        TenantPolicies.from_document({"defaults": {"egress": {"allow_networks": ["10.0.0.0/33"]}}})
    assert EgressPolicy().allow_networks == ()
