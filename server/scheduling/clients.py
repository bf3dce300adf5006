"""Per-client admission: no one client may hold more than its share of the server's call slots."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence

from nextchar.server.ops.security import is_loopback_peer


class ClientLimitError(RuntimeError):
    """This client already has its --max-per-client calls in flight; others are still served."""


def client_key(peer: str, metadata: Sequence[tuple[str, object]]) -> str:
    """Who a call is from: the peer's address without its port, or, when the peer is a proxy on this
    host (loopback: the compose profile's Envoy), the last `x-forwarded-for` address: the one that proxy
    appended itself. Entries to its left came from the caller, who could name anyone."""
    if is_loopback_peer(peer):
        forwarded = next((v for k, v in metadata if k == "x-forwarded-for"), None)
        if isinstance(forwarded, str) and forwarded.strip():
            return forwarded.split(",")[-1].strip()[:64]
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return rest.rpartition(":")[0]
    return kind or peer


class ClientSlots:
    """At most `per_client` calls in flight per client key (0 = no per-client limit)."""

    def __init__(self, per_client: int) -> None:
        self.per_client = per_client
        self.in_flight: dict[str, int] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def hold(self, key: str) -> Iterator[None]:
        with self._lock:
            held = self.in_flight.get(key, 0)
            if self.per_client and held >= self.per_client:
                raise ClientLimitError(
                    f"this client ({key}) already has {held} calls in flight (--max-per-client="
                    f"{self.per_client}); retry when one ends")
            self.in_flight[key] = held + 1
        try:
            yield
        finally:
            with self._lock:
                left = self.in_flight[key] - 1
                if left:
                    self.in_flight[key] = left
                else:
                    del self.in_flight[key]
