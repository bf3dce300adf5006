"""Who a call is from, for the per-client cap: x-forwarded-for is believed only from a local proxy."""

from __future__ import annotations

import pytest

from nextchar.server.scheduling.clients import ClientLimitError, ClientSlots, client_key

XFF = (("x-forwarded-for", "203.0.113.7, 10.0.0.1"),)


def test_client_key() -> None:
    assert client_key("ipv4:192.0.2.5:4242", ()) == "192.0.2.5"
    assert client_key("ipv6:[2001:db8::1]:80", ()) == "[2001:db8::1]"
    assert client_key("ipv4:192.0.2.5:4242", XFF) == "192.0.2.5"  # a remote caller cannot pick its key
    # A proxy on this host appends the address it saw; what the caller wrote to its left is not believed.
    assert client_key("ipv4:127.0.0.1:9", XFF) == "10.0.0.1"
    assert client_key("ipv4:127.0.0.1:9", ()) == "127.0.0.1"


def test_client_slots() -> None:
    slots = ClientSlots(1)
    with slots.hold("a"), slots.hold("b"), \
            pytest.raises(ClientLimitError, match=r"\(a\) already has 1 calls in flight"), slots.hold("a"):
        pass
    assert slots.in_flight == {}
    with ClientSlots(0).hold("a"), ClientSlots(0).hold("a"):
        pass
