"""Which address a decision records: the peer's, unless the peer is a trusted proxy."""

from __future__ import annotations

from ipaddress import ip_network

import pytest

from opsconductor.approvals.servicers.client_address import MAX_SOURCE_IP, resolve_source_ip
from opsconductor.approvals.settings import ApprovalsSettings

PROXIES = (ip_network("10.0.0.0/8"), ip_network("fd00::/8"))


def test_without_trusted_proxies_the_header_is_ignored() -> None:
    """Default (no trusted proxy): X-Forwarded-For cannot change the recorded address."""
    assert resolve_source_ip("127.0.0.1", ["203.0.113.9"], ()) == "127.0.0.1"


def test_an_untrusted_peer_cannot_forge_its_address() -> None:
    """A peer outside the trusted networks is recorded as itself, whatever it sends."""
    assert resolve_source_ip("198.51.100.7", ["203.0.113.9"], PROXIES) == "198.51.100.7"


@pytest.mark.parametrize(
    ("forwarded", "expected"),
    [
        (["203.0.113.9"], "203.0.113.9"),
        # Proxies appended themselves after the client: skipped, right to left.
        (["203.0.113.9, 10.0.0.2", "10.0.0.3"], "203.0.113.9"),
        # Whatever the client wrote before the first untrusted hop is not believed.
        (["1.1.1.1, 203.0.113.9, 10.0.0.2"], "203.0.113.9"),
        # Garbage stops the walk at the last address believed.
        (["not-an-ip, 10.0.0.2"], "10.0.0.2"),
        ([], "10.0.0.1"),
        (["2001:db8::5, fd00::1"], "2001:db8::5"),
    ],
)
def test_a_trusted_proxy_is_believed_right_to_left(forwarded: list[str], expected: str) -> None:
    """Behind trusted proxies the client is the right-most address that is not a proxy."""
    assert resolve_source_ip("10.0.0.1", forwarded, PROXIES) == expected


def test_the_recorded_address_fits_its_column() -> None:
    """A long peer description (e.g. a unix socket path) is cut to the column width."""
    assert len(resolve_source_ip("unix:" + "x" * 200, [], ())) == MAX_SOURCE_IP


def test_trusted_proxies_setting_is_validated_and_parsed() -> None:
    """OPSC_TRUSTED_PROXIES takes addresses or CIDRs; anything else is refused at start-up."""
    settings = ApprovalsSettings(
        database_url="postgresql://x/y", trusted_proxies=("10.0.0.0/8", "192.0.2.1")
    )
    assert settings.trusted_proxy_networks == (ip_network("10.0.0.0/8"), ip_network("192.0.2.1"))
    with pytest.raises(ValueError, match="trusted proxy"):
        ApprovalsSettings(database_url="postgresql://x/y", trusted_proxies=("nope",))
