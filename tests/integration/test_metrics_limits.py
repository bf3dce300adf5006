"""A real server's /metrics endpoint holds a bounded number of connections, each for a bounded time."""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time

from ops_harness import scrape
from server_harness import free_port, wait_until

from nextchar.server.ops import metrics
from nextchar.server.ops.metrics import METRICS_MAX_CONNECTIONS


class _Connections:
    """Client sockets, each remembered as closed once the server has closed it (EOF or reset)."""

    def __init__(self, port: int, n: int) -> None:
        self.open: list[socket.socket] = []
        self.closed: list[socket.socket] = []
        for _ in range(n):
            conn = socket.create_connection(("127.0.0.1", port), timeout=5)
            conn.sendall(b"GET /metr")  # half a request line, never finished
            self.open.append(conn)

    def count_closed(self) -> int:
        readable, _, _ = select.select(self.open, [], [], 0)
        for conn in readable:
            try:
                gone = conn.recv(1) == b""
            except ConnectionError:
                gone = True
            if gone:
                self.open.remove(conn)
                self.closed.append(conn)
        return len(self.closed)

    def close(self) -> None:
        for conn in self.open + self.closed:
            conn.close()


def _handler_threads() -> int:
    """The endpoint's connection threads in this process (socketserver names them after the method)."""
    return sum("process_request_thread" in t.name for t in threading.enumerate())


def test_connections_are_capped_and_each_ends_within_the_timeout(make_server, monkeypatch) -> None:
    """At most METRICS_MAX_CONNECTIONS connections are served at once (more are closed as they are
    accepted), and each ends within METRICS_TIMEOUT_S (1 s here), whether it goes quiet or sends a byte
    now and then (each within the read timeout, which alone kept it open for ever)."""
    monkeypatch.setattr(metrics, "METRICS_TIMEOUT_S", 1.0)
    port = free_port()
    make_server(metrics_port=port)
    scrape(port)
    before = _handler_threads()
    extra = 16
    conns = _Connections(port, METRICS_MAX_CONNECTIONS + extra)
    try:
        # Past the cap, connections are closed as they are accepted; the ones served keep a thread each.
        wait_until(lambda: conns.count_closed() >= extra, 5, f"{extra} connections past the cap to be closed")
        assert _handler_threads() - before <= METRICS_MAX_CONNECTIONS
        # The served ones never finish their request line: each is closed once its time is up.
        wait_until(lambda: conns.count_closed() == METRICS_MAX_CONNECTIONS + extra, 10,
                   "the idle connections to time out")
        wait_until(lambda: _handler_threads() <= before, 5, "their threads to end")
    finally:
        conns.close()
    drip = _Connections(port, 1)
    try:
        started = time.monotonic()
        while drip.count_closed() == 0 and time.monotonic() - started < 10:
            with contextlib.suppress(OSError):
                drip.open[0].sendall(b"e")  # a byte every 0.2 s: never a read timeout
            time.sleep(0.2)
        assert drip.count_closed() == 1 and time.monotonic() - started < 5, "a dripping caller kept its slot"
    finally:
        drip.close()
    assert ("nextchar_calls_in_flight", ()) in scrape(port)  # and /metrics is served as before
