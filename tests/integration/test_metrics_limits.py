"""A real server's /metrics endpoint holds a bounded number of connections, each for a bounded time."""

from __future__ import annotations

import os
import select
import socket
from pathlib import Path

from ops_harness import ServerProcess, scrape
from server_harness import free_port, wait_until

from nextchar.server.ops.metrics import METRICS_MAX_CONNECTIONS, METRICS_TIMEOUT_S


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


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


def test_idle_connections_are_capped_and_time_out(model_repo: Path, tmp_path: Path) -> None:
    port = free_port()
    server = ServerProcess(model_repo, "--metrics-port", str(port), log_path=tmp_path / "server.log")
    conns = None
    try:
        scrape(port)
        before = _threads(server.proc.pid)
        extra = 16
        conns = _Connections(port, METRICS_MAX_CONNECTIONS + extra)
        # Past the cap, connections are closed as they are accepted; the ones served keep a thread each.
        wait_until(lambda: conns.count_closed() >= extra, 5, f"{extra} connections past the cap to be closed")
        assert conns.count_closed() == extra
        assert _threads(server.proc.pid) - before <= METRICS_MAX_CONNECTIONS
        # The served ones never finish their request line: each is closed once its read times out.
        wait_until(lambda: conns.count_closed() == METRICS_MAX_CONNECTIONS + extra, METRICS_TIMEOUT_S + 10,
                   "the idle connections to time out")
        wait_until(lambda: _threads(server.proc.pid) <= before, 5, "their threads to end")
        assert ("nextchar_calls_in_flight", ()) in scrape(port)  # and /metrics is served as before
        assert "Traceback" not in server.log()  # a timed-out caller is not an error of the server's
    finally:
        if conns is not None:
            conns.close()
        server.close()
